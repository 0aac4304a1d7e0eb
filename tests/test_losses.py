"""Tests of cll_jax.losses against independent float64 numpy computations."""

from __future__ import annotations

import decimal
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cll_jax import losses

# 3-class example used by the hand computations: K symmetric, zero diagonal.
K3 = np.array([[0.0, 1.0, 2.0],
               [1.0, 0.0, 1.5],
               [2.0, 1.5, 0.0]], dtype=np.float32)


def _random_k(rng, n, low=0.5, high=2.0):
  a = rng.uniform(low, high, size=(n, n))
  k = np.triu(a, 1)
  return (k + k.T).astype(np.float32)


def _logsumexp64(x):
  x = np.asarray(x, dtype=np.float64)
  m = x.max(axis=-1, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]


# ---------------------------------------------------------------------------
# calibrated_scale
# ---------------------------------------------------------------------------


def test_calibrated_scale_matches_eq5_in_high_precision():
  eps = 0.3
  p32 = np.logspace(-15, np.log10(0.49), 61).astype(np.float32)
  got = np.array([losses.calibrated_scale(eps, p) for p in p32])
  assert got.dtype == np.float32
  # Eq. 5 as printed, logit(q) = ln(q / (1 - q)), in 50-digit decimal
  # arithmetic on the exact float32 inputs (in float64 the printed form
  # already fails: 1 - (1 - 1e-15) keeps only one significant digit).
  decimal.getcontext().prec = 50
  logit = lambda q: (q / (1 - q)).ln()
  eps_d = decimal.Decimal(float(np.float32(eps)))
  want = []
  for p in p32:
    p_d = decimal.Decimal(float(p))
    want.append(float(2 * eps_d / (logit(1 - p_d) - logit(p_d))))
  np.testing.assert_allclose(got, want, rtol=3e-6)


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_calibrated_scale_within_ulps_of_50_digit_reference(dtype):
  # eps / (ln(1 - p) - ln p) in 50-digit decimal arithmetic on the exact
  # inputs; dense near p = 0.5, where log1p(-p) - log(p) used to cancel.
  p_all = np.concatenate([np.logspace(-15, np.log10(0.4999), 150),
                          0.5 - np.logspace(-4, -1, 50)]).astype(dtype)
  eps = dtype(0.3)
  with jax.enable_x64(dtype == np.float64):
    got = np.asarray(jax.jit(jax.vmap(
        lambda p: losses.calibrated_scale(eps, p)))(p_all))
    assert got.dtype == dtype
  with decimal.localcontext() as ctx:
    ctx.prec = 50
    eps_d = decimal.Decimal(float(eps))
    for p, value in zip(p_all, got):
      p_d = decimal.Decimal(float(p))
      want = eps_d / ((1 - p_d).ln() - p_d.ln())
      ulp = decimal.Decimal(float(np.spacing(dtype(float(want)))))
      assert abs(decimal.Decimal(float(value)) - want) <= 4 * ulp, p


def test_calibrated_scale_puts_p_at_the_margin():
  # Definition (supp. eq. 13-14): h(-eps; sigma) = p, h(+eps; sigma) = 1 - p.
  eps = 0.15
  for p in [1e-15, 1e-12, 1e-6, 1e-3, 0.1, 0.3]:
    sigma = float(losses.calibrated_scale(eps, p))
    eps32 = float(np.float32(eps))
    at_minus = 1.0 / (1.0 + math.exp(eps32 / sigma))
    assert at_minus == pytest.approx(float(np.float32(p)), rel=1e-5)
    assert 1.0 / (1.0 + math.exp(-eps32 / sigma)) == pytest.approx(
        1 - p, rel=1e-12, abs=1e-6)


def test_calibrated_scale_traced_under_jit():
  fn = jax.jit(losses.calibrated_scale)
  np.testing.assert_allclose(
      fn(jnp.float32(0.5), jnp.float32(1e-3)),
      0.5 / (np.log1p(-1e-3) - np.log(1e-3)), rtol=1e-6)
  # Value checks are skipped for tracers (schedules pass traced p).
  assert np.isnan(fn(0.5, 0.7)) or fn(0.5, 0.7) < 0


# ---------------------------------------------------------------------------
# CLL
# ---------------------------------------------------------------------------


def _sigma64(eps, p):
  return 2 * eps / (2 * (np.log1p(-p) - np.log(p)))


def test_multiclass_cll_hand_computed_3_classes():
  f = np.array([[1.0, 2.0, 0.5],
                [0.3, -0.2, 0.9]], dtype=np.float32)
  y = np.array([0, 2])
  eps, p = 0.1, 1e-3
  sigma = _sigma64(eps, p)  # 0.1 / log(999) = 0.014476...
  assert sigma == pytest.approx(0.1 / np.log(999.0), rel=1e-12)
  # Example 0, y = 0, delta = eps:
  #   g_0 = -0.1 / sigma
  #   g_1 = (0.1 + (2.0 - 1.0) / K_10) / sigma = 1.1 / sigma
  #   g_2 = (0.1 + (0.5 - 1.0) / K_20) / sigma = (0.1 - 0.25) / sigma
  g0 = np.array([-0.1, 1.1, 0.1 - 0.25]) / sigma
  # Example 1, y = 2:
  #   g_0 = (0.1 + (0.3 - 0.9) / K_02) / sigma = (0.1 - 0.3) / sigma
  #   g_1 = (0.1 + (-0.2 - 0.9) / K_12) / sigma = (0.1 - 1.1 / 1.5) / sigma
  #   g_2 = -0.1 / sigma
  g1 = np.array([0.1 - 0.3, 0.1 - 1.1 / 1.5, -0.1]) / sigma
  want_g = np.stack([g0, g1])
  got_g = losses.cll_logits(f, y, K3, eps, p)
  np.testing.assert_allclose(got_g, want_g, rtol=2e-5, atol=1e-4)
  # -log softmax(g)_y.
  want = np.array([-g0[0] + _logsumexp64(g0), -g1[2] + _logsumexp64(g1)])
  got = losses.multiclass_cll_loss(f, y, K3, eps, p)
  np.testing.assert_allclose(got, want, rtol=2e-5)


def test_multiclass_cll_custom_delta_hand_computed():
  f = np.array([[1.0, 2.0, 0.5]], dtype=np.float32)
  y = np.array([1])
  eps, p, delta = 0.2, 0.05, 0.07
  sigma = _sigma64(eps, p)
  # y = 1: g_0 = (0.07 + (1 - 2) / 1) / s, g_1 = -0.07 / s,
  #        g_2 = (0.07 + (0.5 - 2) / 1.5) / s.
  g = np.array([0.07 - 1.0, -0.07, 0.07 - 1.0]) / sigma
  want = -g[1] + _logsumexp64(g)
  got = losses.multiclass_cll_loss(f, y, K3, eps, p, delta=delta)
  np.testing.assert_allclose(got, [want], rtol=1e-5)


def test_cll_logits_label_entry_is_exact_and_diagonal_gets_no_gradient():
  rng = np.random.default_rng(0)
  f = rng.normal(size=(6, 4)).astype(np.float32)
  y = np.array([0, 1, 2, 3, 0, 2])
  k = _random_k(rng, 4)
  eps, p, delta = np.float32(0.25), np.float32(1e-6), np.float32(0.1)
  g = np.asarray(losses.cll_logits(f, y, k, eps, p, delta))
  sigma = np.float32(losses.calibrated_scale(eps, p))
  np.testing.assert_array_equal(g[np.arange(6), y],
                                np.full(6, -delta / sigma, np.float32))
  grad = jax.grad(lambda kk: losses.multiclass_cll_loss(
      f, y, kk, eps, p, delta).sum())(jnp.asarray(k))
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(np.diag(grad), 0.0)


def test_binary_cll_matches_bce_definition():
  rng = np.random.default_rng(1)
  f = rng.normal(size=16).astype(np.float32)
  y = rng.integers(0, 2, size=16)
  k, eps, p, delta = 1.7, 0.2, 1e-2, 0.12
  sigma = _sigma64(eps, p)
  y_pm = 2 * y - 1
  z = (-y_pm * delta + f.astype(np.float64) / k) / sigma
  h = 1 / (1 + np.exp(-z))
  want = -(y * np.log(h) + (1 - y) * np.log(1 - h))
  got = losses.binary_cll_loss(f, y, k, eps, p, delta)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # delta defaults to epsilon.
  z = (-y_pm * eps + f.astype(np.float64) / k) / sigma
  h = 1 / (1 + np.exp(-z))
  want = -(y * np.log(h) + (1 - y) * np.log(1 - h))
  np.testing.assert_allclose(
      losses.binary_cll_loss(f, y, k, eps, p), want, rtol=1e-5)


def test_multiclass_n2_equals_binary_with_doubled_offset():
  # Supp. eq. 3-5: for N = 2, shifting g by delta/sigma gives
  # g_y = 0 and g_other = (2 delta + (f_other - f_y)/K) / sigma, i.e. the
  # binary loss on f_1 - f_0 with K = K_01 and offset 2 delta:
  #   y = 1: softplus(-(-2 delta + (f_1 - f_0)/K) / sigma)
  #   y = 0: softplus(+(+2 delta + (f_1 - f_0)/K) / sigma).
  rng = np.random.default_rng(2)
  f = rng.normal(size=(32, 2)).astype(np.float32)
  y = rng.integers(0, 2, size=32)
  k01 = np.float32(1.3)
  k = np.array([[0.0, k01], [k01, 0.0]], dtype=np.float32)
  for eps, p, delta in [(0.3, 1e-3, 0.1), (0.1, 0.2, 0.0), (1.0, 1e-12, 0.5)]:
    multi = losses.multiclass_cll_loss(f, y, k, eps, p, delta)
    binary = losses.binary_cll_loss(f[:, 1] - f[:, 0], y, k01, eps, p,
                                    2 * delta)
    np.testing.assert_allclose(multi, binary, rtol=2e-5, atol=1e-6)
  # Default offsets: multiclass delta = eps <-> binary delta = 2 eps.
  np.testing.assert_allclose(
      losses.multiclass_cll_loss(f, y, k, 0.2, 1e-3),
      losses.binary_cll_loss(f[:, 1] - f[:, 0], y, k01, 0.2, 1e-3, 0.4),
      rtol=2e-5, atol=1e-6)


def test_multiclass_cll_invariant_to_logit_shift():
  rng = np.random.default_rng(3)
  f = rng.normal(size=(8, 5)).astype(np.float32)
  y = rng.integers(0, 5, size=8)
  k = _random_k(rng, 5)
  base = losses.multiclass_cll_loss(f, y, k, 0.5, 0.05)
  for c in [-3.0, 2.5]:
    shifted = losses.multiclass_cll_loss(f + np.float32(c), y, k, 0.5, 0.05)
    np.testing.assert_allclose(shifted, base, rtol=1e-4, atol=1e-5)


def test_losses_and_gradients_finite_for_extreme_k_and_p():
  rng = np.random.default_rng(4)
  f = jnp.asarray(rng.normal(size=(4, 3)).astype(np.float32))
  y = jnp.asarray([0, 1, 2, 1])
  k0 = jnp.asarray(_random_k(rng, 3))

  def cll(f, scale, eps, p):
    return losses.multiclass_cll_loss(f, y, k0 * scale, eps, p).sum()

  def binary(f, scale, eps, p):
    return losses.binary_cll_loss(f[:, 0], y % 2, scale, eps, p).sum()

  def gloro(f, scale, eps, p):
    del p
    return (losses.gloro_loss(f, y, k0 * scale, eps).sum()
            + losses.gloro_trades_loss(f, y, k0 * scale, eps, 3.0).sum())

  def crm(f, scale, eps, p):
    del p
    return losses.crm_loss(f, y, k0 * scale, 0.5, 10.0, eps * 1e6).sum()

  for fn in (cll, binary, gloro, crm):
    val_grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))
    for scale in (1e-6, 1.0, 1e6):
      for p in (1e-15, 1e-3, 0.49):
        value, grads = val_grad(f, jnp.float32(scale), jnp.float32(0.1),
                                jnp.float32(p))
        assert np.isfinite(value), (fn.__name__, scale, p)
        for g in grads:
          assert np.all(np.isfinite(g)), (fn.__name__, scale, p)


# ---------------------------------------------------------------------------
# GloRo and TRADES
# ---------------------------------------------------------------------------


def _bottom_loop(f, k, eps):
  out = []
  for row in f:
    j = int(np.argmax(row))
    best = -np.inf
    for i in range(len(row)):
      if i != j:
        best = max(best, float(row[i]) + eps * float(k[j, i]))
    out.append(best)
  return np.array(out)


def test_gloro_bottom_logit_brute_force():
  rng = np.random.default_rng(5)
  f = rng.normal(size=(10, 6)).astype(np.float32)
  k = _random_k(rng, 6)
  eps = 0.3
  got = np.asarray(losses.gloro_logits(f, k, eps))
  assert got.shape == (10, 7)
  np.testing.assert_array_equal(got[:, :6], f)
  np.testing.assert_allclose(got[:, 6], _bottom_loop(f, k, eps), rtol=1e-6)
  # The robust prediction is not bottom exactly when f_j - f_i > eps K_ji.
  margin_ok = np.array([
      all(row.max() - row[i] > eps * k[row.argmax(), i]
          for i in range(6) if i != row.argmax()) for row in f])
  np.testing.assert_array_equal(got.argmax(axis=1) != 6, margin_ok)


def test_gloro_tie_is_not_robust():
  f = np.array([[2.0, 2.0, 0.0]], dtype=np.float32)
  robust = losses.gloro_logits(f, K3, 1e-3)
  assert robust[0, 3] >= robust[0, 0]


def test_gloro_loss_vs_numpy():
  rng = np.random.default_rng(6)
  f = rng.normal(size=(7, 4)).astype(np.float32)
  y = rng.integers(0, 4, size=7)
  k = _random_k(rng, 4)
  eps = 0.2
  z = np.concatenate([f, _bottom_loop(f, k, eps)[:, None]], axis=1)
  want = _logsumexp64(z) - z[np.arange(7), y]
  np.testing.assert_allclose(losses.gloro_loss(f, y, k, eps), want, rtol=1e-5)


def test_gloro_logit_scale_vs_numpy():
  """L_GloRo(y; h(s f)) of CLL supp. D.1: all N + 1 logits scaled by s."""
  rng = np.random.default_rng(16)
  f = rng.normal(size=(6, 4)).astype(np.float32)
  y = rng.integers(0, 4, size=6)
  k = _random_k(rng, 4)
  eps = 0.3
  z = np.concatenate([f, _bottom_loop(f, k, eps)[:, None]], axis=1)
  for s in (0.25, 1.0, 3.0):
    zs = s * z.astype(np.float64)
    want = np.log(np.exp(zs).sum(axis=1)) - zs[np.arange(6), y]
    got = losses.gloro_loss(f, y, k, eps, logit_scale=s)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # A traced scale gives the same values.
    traced = jax.jit(lambda scale: losses.gloro_loss(
        f, y, k, eps, logit_scale=scale))(jnp.float32(s))
    np.testing.assert_allclose(traced, want, rtol=1e-5)
  np.testing.assert_array_equal(losses.gloro_loss(f, y, k, eps, logit_scale=1),
                                losses.gloro_loss(f, y, k, eps))
  for bad in (0.0, -1.0, np.inf):
    with pytest.raises(ValueError, match='logit_scale must be'):
      losses.gloro_loss(f, y, k, eps, logit_scale=bad)


def test_gloro_trades_vs_direct_numpy_kl():
  rng = np.random.default_rng(7)
  f = (3 * rng.normal(size=(9, 5))).astype(np.float32)
  y = rng.integers(0, 5, size=9)
  k = _random_k(rng, 5)
  eps, beta = 0.4, 6.0
  f64 = f.astype(np.float64)
  p = np.exp(f64 - _logsumexp64(f64)[:, None])
  z = np.concatenate([f64, _bottom_loop(f, k, eps)[:, None]], axis=1)
  q = np.exp(z - _logsumexp64(z)[:, None])
  ce = -np.log(p[np.arange(9), y])
  # KL([p, 0] || q) = sum_i p_i log(p_i / q_i); the bottom term is 0 log 0.
  kl = np.sum(p * np.log(p / q[:, :5]), axis=1)
  want = ce + beta * kl
  got = losses.gloro_trades_loss(f, y, k, eps, beta)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      losses.gloro_trades_loss(f, y, k, eps, 0.0), ce, rtol=1e-5)


def _two_layer_net(x, w1, w2, b2):
  """2-class, 2-layer net: logits, head input, body norm P, ||w_0 - w_1||.

  K_01 = P ||w_0 - w_1|| with P = ||W1||_2 (the naive bound of a ReLU net).
  """
  h = jnp.maximum(x @ w1, 0.0)
  body = jnp.linalg.norm(w1, 2)
  distance = jnp.linalg.norm(w2[:, 0] - w2[:, 1])
  k = body * distance * (1.0 - jnp.eye(2))
  return h @ w2 + b2, h, body, distance, k


def _hand_head_gradient(f, h, y, body, w2, eps, multiplicity, trades_beta):
  """d mean(loss) / dW2 by hand, float64, for N = 2.

  GloRo: with j = argmax f, i = 1 - j, z = [f_0, f_1, f_i + eps K_01] and
  q = softmax(z), dl/df_k = q_k - [k = y] + q_bot [k = i], dl/dK = eps q_bot.
  TRADES: l = CE(f) + beta softplus(f_bot - lse(f)); with s the logistic of
  the softplus' argument and p = softmax(f), dl/df_k = p_k - [k = y]
  + beta (s [k = i] - s p_k) and dl/dK = beta eps s.
  K_01 = P ||w_0 - w_1|| gives dK/dw_0 = -dK/dw_1 = m P (w_0 - w_1) / d,
  where m = 1 for the loss as defined and m = 2 for the official variant
  (K ||w_0 - w_1|| / sg(||w_0 - w_1||)).
  """
  f, h, w2 = (np.asarray(a, np.float64) for a in (f, h, w2))
  n = len(y)
  k01 = body * np.linalg.norm(w2[:, 0] - w2[:, 1])
  top = f.argmax(axis=1)
  other = 1 - top
  bottom = f[np.arange(n), other] + eps * k01
  is_other = np.eye(2)[other]
  if trades_beta is None:
    z = np.concatenate([f, bottom[:, None]], axis=1)
    q = np.exp(z - _logsumexp64(z)[:, None])
    dl_df = q[:, :2] - np.eye(2)[y] + q[:, 2:] * is_other
    dl_dk = eps * q[:, 2]
  else:
    p = np.exp(f - _logsumexp64(f)[:, None])
    sig = 1.0 / (1.0 + np.exp(-(bottom - _logsumexp64(f))))
    dl_df = p - np.eye(2)[y] + trades_beta * sig[:, None] * (is_other - p)
    dl_dk = trades_beta * eps * sig
  unit = (w2[:, 0] - w2[:, 1]) / np.linalg.norm(w2[:, 0] - w2[:, 1])
  dk_dw = multiplicity * body * np.stack([unit, -unit], axis=1)
  return h.T @ dl_df / n + dl_dk.mean() * dk_dw


@pytest.mark.parametrize('trades_beta', [None, 3.0])
def test_gloro_official_variant_doubles_the_head_gradient_of_k(trades_beta):
  rng = np.random.default_rng(21)
  x = rng.normal(size=(8, 3)).astype(np.float32)
  y = np.array([0, 1, 1, 0, 1, 0, 0, 1])
  w1 = rng.normal(size=(3, 4)).astype(np.float32) * 0.6
  w2 = rng.normal(size=(4, 2)).astype(np.float32) * 0.6
  b2 = np.array([0.1, -0.2], np.float32)
  eps = 0.3

  def loss(w1, w2, official):
    f, _, _, distance, k = _two_layer_net(x, w1, w2, b2)
    head = distance if official else None
    if trades_beta is None:
      values = losses.gloro_loss(f, y, k, eps, head_lipschitz=head)
    else:
      values = losses.gloro_trades_loss(f, y, k, eps, trades_beta,
                                        head_lipschitz=head)
    return values.mean(), values

  (_, faithful), grads_faithful = jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True)(w1, w2, False)
  (_, official), grads_official = jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True)(w1, w2, True)
  # Equal values: K h / sg(h) is K exactly.
  np.testing.assert_array_equal(faithful, official)

  f, h, body, _, _ = _two_layer_net(x, w1, w2, b2)
  f = np.asarray(f)
  assert (f.argmax(1) == y).any() and (f.argmax(1) != y).any()
  for multiplicity, grads in ((1, grads_faithful), (2, grads_official)):
    want = _hand_head_gradient(f, h, y, float(body), w2, eps, multiplicity,
                               trades_beta)
    np.testing.assert_allclose(grads[1], want, rtol=2e-5, atol=1e-6)
  # The head's K-path term is what differs, and it is not negligible here.
  extra = (_hand_head_gradient(f, h, y, float(body), w2, eps, 2, trades_beta)
           - _hand_head_gradient(f, h, y, float(body), w2, eps, 1,
                                 trades_beta))
  assert np.abs(extra).max() > 0.05 * np.abs(np.asarray(grads[1])).max()
  # The body's gradient is the same in both variants.
  np.testing.assert_allclose(grads_official[0], grads_faithful[0], rtol=1e-6,
                             atol=1e-7)


def test_gloro_head_lipschitz_bad_inputs():
  f = np.array([[1.0, 0.0]], np.float32)
  k = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
  with pytest.raises(ValueError, match='head_lipschitz must be a scalar'):
    losses.gloro_loss(f, np.array([0]), k, 0.1, head_lipschitz=np.ones(2))
  with pytest.raises(ValueError, match='head_lipschitz must be > 0'):
    losses.gloro_trades_loss(f, np.array([0]), k, 0.1, 1.0,
                             head_lipschitz=0.0)


# ---------------------------------------------------------------------------
# lambda K^2 and CRM
# ---------------------------------------------------------------------------


def test_lipschitz_penalty_value_and_gradient():
  assert float(losses.lipschitz_penalty(3.0, 1e-2)) == pytest.approx(0.09)
  grad = jax.grad(losses.lipschitz_penalty)(jnp.float32(3.0), 1e-2)
  assert float(grad) == pytest.approx(2 * 1e-2 * 3.0)


def _crm_numpy(f, y, k, lam, t, r0):
  out = []
  for row, label in zip(f.astype(np.float64), y):
    others = [i for i in range(len(row)) if i != label]
    radii = np.array([(row[label] - row[i]) / k[label, i] for i in others])
    ce = -(row[label] - _logsumexp64(row))
    in_s = radii.min() > 0 and radii.min() < r0
    reg = _logsumexp64(-t * radii) / t if in_s else 0.0
    out.append(ce + lam * reg)
  return np.array(out)


def test_crm_hand_computed():
  # Example 0 (y = 0): R_1 = (1.0 - 0.2) / 1 = 0.8, R_2 = (1.0 + 0.4) / 2 = 0.7;
  #   correct, min R = 0.7 < R0 = 1: in S.
  # Example 1 (y = 1): R_0 = (0.5 - 0.1) / 1 = 0.4 ... correct but with
  #   R0 = 1 the radius to class 2 is (0.5 + 3.0) / 1.5 > 1, min 0.4: in S.
  # Example 2 (y = 2): misclassified: not in S.
  # Example 3 (y = 0): R_1 = 5 / 1, R_2 = 6 / 2 = 3 >= R0: not in S.
  f = np.array([[1.0, 0.2, -0.4],
                [0.1, 0.5, -3.0],
                [2.0, 0.0, 1.0],
                [5.0, 0.0, -1.0]], dtype=np.float32)
  y = np.array([0, 1, 2, 0])
  lam, t, r0 = 0.7, 5.0, 1.0
  ce0 = -(1.0 - np.log(np.exp(1.0) + np.exp(0.2) + np.exp(-0.4)))
  reg0 = np.log(np.exp(-5 * 0.8) + np.exp(-5 * 0.7)) / 5
  got = np.asarray(losses.crm_loss(f, y, K3, lam, t, r0))
  assert got[0] == pytest.approx(ce0 + lam * reg0, rel=1e-5)
  np.testing.assert_allclose(got, _crm_numpy(f, y, K3, lam, t, r0), rtol=1e-5)
  # The batch mean is the paper's J = mean CE + lam/B sum_{S} softmin term.
  ce = np.array([-(r[l] - _logsumexp64(r.astype(np.float64)))
                 for r, l in zip(f, y)])
  reg1 = np.log(np.exp(-5 * 0.4) + np.exp(-5 * 3.5 / 1.5)) / 5
  j = ce.mean() + lam / 4 * (reg0 + reg1)
  assert float(np.mean(got)) == pytest.approx(j, rel=1e-5)


def test_crm_no_robust_gradient_outside_s():
  rng = np.random.default_rng(8)
  f = np.array([[1.0, 0.2, -0.4],   # in S
                [2.0, 0.0, 1.0],    # misclassified (y = 2)
                [5.0, 0.0, -1.0],   # correct, radius >= R0
                [1.0, 1.0, 0.0]],   # tie for the top: counted as wrong
               dtype=np.float32)
  y = np.array([0, 2, 0, 1])
  k = jnp.asarray(_random_k(rng, 3, 0.9, 1.1))
  lam, t, r0 = 2.0, 4.0, 1.5

  def total(ff, kk):
    return losses.crm_loss(ff, y, kk, lam, t, r0).sum()

  grad_f, grad_k = jax.grad(total, argnums=(0, 1))(jnp.asarray(f), k)
  # Outside S the gradient is exactly that of the cross-entropy.
  p = jax.nn.softmax(f[1:], axis=-1)
  ce_grad = np.asarray(p) - np.eye(3)[y[1:]]
  np.testing.assert_allclose(grad_f[1:], ce_grad, rtol=1e-6, atol=1e-7)
  # K only enters the robustness term, so all of its gradient is example 0's.
  grad_k0 = jax.grad(lambda kk: losses.crm_loss(
      f[:1], y[:1], kk, lam, t, r0).sum())(k)
  assert np.any(np.asarray(grad_k0) != 0)
  np.testing.assert_allclose(grad_k, grad_k0, rtol=1e-6)
  for i in (1, 2, 3):
    g_i = jax.grad(lambda kk, i=i: losses.crm_loss(
        f[i:i + 1], y[i:i + 1], kk, lam, t, r0).sum())(k)
    np.testing.assert_array_equal(g_i, 0.0)


# ---------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------

F = np.zeros((2, 3), np.float32)
Y = np.array([0, 2])


@pytest.mark.parametrize('p', [0.0, 0.5, 0.7, -1e-3, float('nan')])
def test_bad_p(p):
  with pytest.raises(ValueError, match=r'p must lie in the open interval'):
    losses.calibrated_scale(0.1, p)
  with pytest.raises(ValueError, match=r'p must lie'):
    losses.multiclass_cll_loss(F, Y, K3, 0.1, p)
  with pytest.raises(ValueError, match=r'p must lie'):
    losses.binary_cll_loss(F[:, 0], Y % 2, 1.0, 0.1, p)


@pytest.mark.parametrize('eps', [0.0, -0.1, float('nan')])
def test_bad_epsilon(eps):
  for call in (lambda: losses.calibrated_scale(eps, 0.1),
               lambda: losses.cll_logits(F, Y, K3, eps, 0.1),
               lambda: losses.gloro_loss(F, Y, K3, eps),
               lambda: losses.gloro_trades_loss(F, Y, K3, eps, 1.0)):
    with pytest.raises(ValueError, match=r'epsilon must be > 0'):
      call()


@pytest.mark.parametrize('epsilon, p, message', [
    (0.1, 1e-39, r'p=1e-39 is below the smallest normal float32'),
    (1e-46, 0.1, r'epsilon=1e-46 is below the smallest normal float32'),
    (1e-40, 0.1, r'epsilon=1e-40 is below the smallest normal float32'),
    (float('inf'), 0.1, r'epsilon must be finite'),
])
def test_values_that_flush_or_overflow_raise(epsilon, p, message):
  for call in (lambda: losses.calibrated_scale(epsilon, p),
               lambda: losses.multiclass_cll_loss(F, Y, K3, epsilon, p),
               lambda: losses.binary_cll_loss(F[:, 0], Y % 2, 1.0, epsilon,
                                              p)):
    with pytest.raises(ValueError, match=message):
      call()
  # Under jit the checks cannot run: the scale is NaN, never 0 or inf.
  value = jax.jit(losses.calibrated_scale)(jnp.float32(epsilon),
                                           jnp.float32(p))
  assert np.isnan(value)


def test_infinite_delta_and_gloro_epsilon_raise():
  with pytest.raises(ValueError, match=r'delta must be finite'):
    losses.multiclass_cll_loss(F, Y, K3, 0.1, 0.1, delta=float('inf'))
  with pytest.raises(ValueError, match=r'delta must be finite'):
    losses.binary_cll_loss(F[:, 0], Y % 2, 1.0, 0.1, 0.1, delta=np.inf)
  with pytest.raises(ValueError, match=r'epsilon must be finite'):
    losses.gloro_loss(F, Y, K3, float('inf'))
  with pytest.raises(ValueError, match=r'epsilon must be finite'):
    losses.gloro_logits(F, K3, np.inf)
  # Normal in float64: accepted there.
  with jax.enable_x64(True):
    assert losses.calibrated_scale(0.1, 1e-39) > 0


def test_bad_delta_and_scalars():
  with pytest.raises(ValueError, match=r'delta must be >= 0'):
    losses.multiclass_cll_loss(F, Y, K3, 0.1, 0.1, delta=-0.01)
  with pytest.raises(ValueError, match=r'delta must be >= 0'):
    losses.binary_cll_loss(F[:, 0], Y % 2, 1.0, 0.1, 0.1, delta=-1.0)
  with pytest.raises(ValueError, match=r'epsilon must be a scalar'):
    losses.multiclass_cll_loss(F, Y, K3, np.array([0.1, 0.2]), 0.1)
  with pytest.raises(ValueError, match=r'trades_beta must be >= 0'):
    losses.gloro_trades_loss(F, Y, K3, 0.1, -1.0)
  with pytest.raises(ValueError, match=r'lam must be >= 0'):
    losses.lipschitz_penalty(1.0, -1e-3)
  with pytest.raises(ValueError, match=r'lipschitz_constant must be a scalar'):
    losses.lipschitz_penalty(np.ones(2), 1e-3)
  with pytest.raises(ValueError, match=r'lipschitz must be > 0'):
    losses.binary_cll_loss(F[:, 0], Y % 2, 0.0, 0.1, 0.1)
  with pytest.raises(ValueError, match=r'lam must be >= 0'):
    losses.crm_loss(F, Y, K3, -1.0, 1.0, 1.0)
  with pytest.raises(ValueError, match=r'temperature must be > 0'):
    losses.crm_loss(F, Y, K3, 1.0, 0.0, 1.0)
  with pytest.raises(ValueError, match=r'radius_threshold must be > 0'):
    losses.crm_loss(F, Y, K3, 1.0, 1.0, -1.0)


ALL_MULTICLASS = [
    lambda f, y, k: losses.cll_logits(f, y, k, 0.1, 0.1),
    lambda f, y, k: losses.multiclass_cll_loss(f, y, k, 0.1, 0.1),
    lambda f, y, k: losses.gloro_loss(f, y, k, 0.1),
    lambda f, y, k: losses.gloro_trades_loss(f, y, k, 0.1, 1.0),
    lambda f, y, k: losses.crm_loss(f, y, k, 1.0, 1.0, 1.0),
]


@pytest.mark.parametrize('fn', ALL_MULTICLASS)
def test_bad_shapes_and_values(fn):
  fn(F, Y, K3)  # the good inputs pass
  cases = [
      (F[0], Y, K3, r'logits must have 2 dimensions'),
      (F[:, :1], Y, K3[:1, :1], r'at least 2 classes'),
      (F, Y[:1], K3, r'labels must have shape \(2,\)'),
      (F, Y[:, None], K3, r'labels must have 1 dimensions'),
      (F, Y, K3[:2, :2], r'pairwise_lipschitz must have shape \(3, 3\)'),
      (F, Y.astype(np.float32), K3, r'labels must be an integer array'),
      (F.astype(np.int32), Y, K3, r'logits must be a floating-point'),
      (F, np.array([0, 3]), K3, r'labels must lie in \[0, 3\)'),
      (F, np.array([-1, 0]), K3, r'labels must lie in \[0, 3\)'),
      (np.array([[0, np.nan, 0], [0, 0, 0]], np.float32), Y, K3,
       r'logits must be finite'),
      (F, Y, np.where(np.eye(3) > 0, 0, np.inf).astype(np.float32),
       r'pairwise_lipschitz must be finite'),
      (F, Y, K3 * np.float32(-1), r'pairwise_lipschitz must be > 0'),
      (F, Y, K3 + np.triu(np.ones((3, 3), np.float32), 1),
       r'pairwise_lipschitz must be symmetric'),
  ]
  for f, y, k, msg in cases:
    with pytest.raises(ValueError, match=msg):
      fn(f, y, k)


def test_gloro_logits_bad_inputs():
  with pytest.raises(ValueError, match=r'logits must have 2 dimensions'):
    losses.gloro_logits(F[0], K3, 0.1)
  with pytest.raises(ValueError, match=r'pairwise_lipschitz must have shape'):
    losses.gloro_logits(F, K3[:2], 0.1)


def test_binary_bad_inputs():
  f = F[:, 0]
  with pytest.raises(ValueError, match=r'logits must have 1 dimensions'):
    losses.binary_cll_loss(F, Y % 2, 1.0, 0.1, 0.1)
  with pytest.raises(ValueError, match=r'labels must lie in \[0, 2\)'):
    losses.binary_cll_loss(f, np.array([0, 2]), 1.0, 0.1, 0.1)
  with pytest.raises(ValueError, match=r'labels must be an integer'):
    losses.binary_cll_loss(f, np.array([0.0, 1.0]), 1.0, 0.1, 0.1)
  with pytest.raises(ValueError, match=r'labels must have shape \(2,\)'):
    losses.binary_cll_loss(f, np.array([0, 1, 1]), 1.0, 0.1, 0.1)
  with pytest.raises(ValueError, match=r'logits must be finite'):
    losses.binary_cll_loss(np.array([np.inf, 0], np.float32), np.array([0, 1]),
                           1.0, 0.1, 0.1)


def test_value_checks_skipped_for_traced_hyperparameters():
  # p, epsilon and delta come from schedules as traced scalars.
  fn = jax.jit(losses.multiclass_cll_loss)
  out = fn(F, Y, K3, jnp.float32(0.1), jnp.float32(1e-3), jnp.float32(0.05))
  want = losses.multiclass_cll_loss(F, Y, K3, 0.1, 1e-3, 0.05)
  np.testing.assert_allclose(out, want, rtol=1e-6)


def test_certificate_regularized_loss_against_a_direct_formula():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(32, 5)).astype(np.float32) * 3
  labels = rng.integers(0, 5, 32).astype(np.int32)
  w = rng.normal(size=(7, 5))
  k = np.linalg.norm(w[:, :, None] - w[:, None, :], axis=0) * 2.5
  gamma = 0.7
  got = np.asarray(losses.certificate_regularized_loss(
      jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(k, jnp.float32),
      gamma))
  for b in range(32):
    f, y = logits[b].astype(np.float64), labels[b]
    ce = -f[y] + np.log(np.sum(np.exp(f)))
    others = [j for j in range(5) if j != y]
    radius = min((f[y] - f[j]) / k[y, j] for j in others)
    correct = all(f[y] > f[j] for j in others)
    expect = ce - gamma * max(radius, 0.0) * correct
    assert got[b] == pytest.approx(expect, rel=1e-5, abs=1e-5), b
  # gamma 0 is cross-entropy; the regulariser never raises the loss.
  ce = np.asarray(losses.certificate_regularized_loss(
      jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(k, jnp.float32),
      0.0))
  assert np.all(got <= ce + 1e-6)
  with pytest.raises(ValueError, match='gamma'):
    losses.certificate_regularized_loss(jnp.asarray(logits),
                                        jnp.asarray(labels),
                                        jnp.asarray(k, jnp.float32), -1.0)


def test_certificate_regularizer_gradient_pushes_the_closest_class():
  logits = jnp.asarray([[3.0, 1.0, 2.5]])
  labels = jnp.asarray([0])
  k = jnp.full((3, 3), 2.0) * (1 - jnp.eye(3))

  def reg(f):
    return (losses.certificate_regularized_loss(f, labels, k, 1.0)
            - losses.certificate_regularized_loss(f, labels, k, 0.0))[0]

  # The radius is (3 - 2.5) / 2: d(-radius)/df = (-1/2, 0, +1/2).
  np.testing.assert_allclose(jax.grad(reg)(logits), [[-0.5, 0.0, 0.5]],
                             atol=1e-7)
