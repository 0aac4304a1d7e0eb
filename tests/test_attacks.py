"""Tests for cll_jax.attacks against closed forms and exact (SVD) bounds."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cll_jax import attacks


def _linear(w, b):
  return lambda x: x.reshape(x.shape[0], -1) @ w + b


def _random_linear(seed, dim, num_classes):
  rs = np.random.RandomState(seed)
  w = rs.normal(size=(dim, num_classes)).astype(np.float32)
  b = rs.normal(size=(num_classes,)).astype(np.float32)
  return w, b


def _linear_flip_distance(w, b, x):
  """Exact minimal L2 distance to change the argmax of x @ w + b.

  min_{j != c} (f_c - f_j) / ||w_c - w_j||, c the argmax; returns (c, (B,)).
  """
  w, x = w.astype(np.float64), x.astype(np.float64)
  logits = x @ w + b
  c = logits.argmax(-1)
  gaps = logits[np.arange(len(x)), c][:, None] - logits
  norms = np.linalg.norm(w[:, c].T[:, :, None] - w[None], axis=1)
  is_c = np.arange(w.shape[1])[None] == c[:, None]
  return c, np.min(np.where(is_c, np.inf, gaps / np.where(is_c, 1.0, norms)),
                   axis=1)


# ----------------------------------------------------------------------------
# margin


def test_margin_matches_brute_force():
  rs = np.random.RandomState(0)
  logits = rs.normal(size=(7, 5)).astype(np.float32)
  classes = rs.randint(0, 5, size=7)
  expected = [logits[b, c] - max(logits[b, j] for j in range(5) if j != c)
              for b, c in enumerate(classes)]
  np.testing.assert_allclose(
      attacks.margin(jnp.asarray(logits), jnp.asarray(classes)), expected,
      rtol=1e-6)


def test_margin_tie_is_zero_and_bad_inputs_raise():
  logits = jnp.array([[1.0, 1.0, 0.0]])
  assert attacks.margin(logits, jnp.array([0]))[0] == 0.0
  with pytest.raises(ValueError, match='classes'):
    attacks.margin(logits, jnp.array([3]))
  with pytest.raises(ValueError, match='classes'):
    attacks.margin(logits, jnp.array([0, 1]))
  with pytest.raises(ValueError, match='N >= 2'):
    attacks.margin(jnp.ones((2, 1)), jnp.array([0, 0]))


# ----------------------------------------------------------------------------
# PGD on a linear model: the exact minimal adversarial distance is known.


@pytest.mark.parametrize('seed', [0, 1])
def test_pgd_linear_breaks_just_above_and_never_below_exact_distance(seed):
  w, b = _random_linear(seed, dim=8, num_classes=4)
  x = np.random.RandomState(100 + seed).normal(size=(16, 8)).astype(np.float32)
  c, dist = _linear_flip_distance(w, b, x)
  apply_fn = _linear(jnp.asarray(w), jnp.asarray(b))
  # One call: every point at 5% above and at 5% below its exact distance, and
  # four points with a wrong class at epsilon = 0.
  wrong = (c[:4] + 1) % 4
  eps = np.concatenate([1.05 * dist, 0.95 * dist, np.zeros(4)])
  x2, c2 = np.concatenate([x, x, x[:4]]), np.concatenate([c, c, wrong])
  x_adv, margins = attacks.pgd_l2_attack(
      apply_fn, jnp.asarray(x2), jnp.asarray(c2), jnp.asarray(eps, jnp.float32),
      rng=jax.random.PRNGKey(seed), clip_min=None, clip_max=None)
  x_adv, margins = np.asarray(x_adv), np.asarray(margins)
  assert np.all(margins[:16] < 0), (margins[:16], dist)
  assert np.all(margins[16:32] > 0), (margins[16:32], dist)
  # At epsilon 0 the input is returned, and a wrong class stays broken.
  np.testing.assert_array_equal(x_adv[32:], x[:4])
  assert np.all(margins[32:] < 0)
  np.testing.assert_array_less(
      np.linalg.norm(x_adv - x2, axis=1), eps * (1 + 1e-5) + 1e-30)
  # The returned margins are those of the returned points.
  np.testing.assert_allclose(
      margins, attacks.margin(apply_fn(x_adv), jnp.asarray(c2)), rtol=1e-5,
      atol=1e-6)
  # The exact minimum of the margin over the ball of radius eps is
  # min_j gap_j - eps ||w_c - w_j||: no point can beat it, and PGD gets most of
  # the way there (a fixed step on the sphere converges only geometrically).
  x2, c2, eps, margins = x2[:32], c2[:32], eps[:32], margins[:32]
  logits = x2 @ w + b
  gaps = logits[np.arange(32), c2][:, None] - logits
  norms = np.linalg.norm(w[:, c2].T[:, :, None] - w[None], axis=1)
  optimum = np.min(np.where(gaps > 0, gaps - eps[:, None] * norms, np.inf),
                   axis=1)
  clean = np.min(np.where(gaps > 0, gaps, np.inf), axis=1)
  assert np.all(margins >= optimum - 1e-5)
  assert np.all((clean - margins) / (clean - optimum) > 0.95)


# ----------------------------------------------------------------------------
# Empirical robust accuracy.


def test_empirical_robust_accuracy_with_mask_and_ties():
  w, b = _random_linear(7, dim=6, num_classes=4)
  x = np.random.RandomState(8).normal(size=(12, 6)).astype(np.float32)
  c, dist = _linear_flip_distance(w, b, x)
  labels = c.copy()
  labels[[1, 4, 5]] = (labels[[1, 4, 5]] + 1) % 4  # misclassified
  mask = np.ones(12, np.float32)
  mask[[4, 9, 10, 11]] = 0.0  # padding
  apply_fn = _linear(jnp.asarray(w), jnp.asarray(b))
  era = functools.partial(
      attacks.empirical_robust_accuracy, apply_fn, jnp.asarray(x),
      jnp.asarray(labels), rng=jax.random.PRNGKey(0), clip_min=None,
      clip_max=None)
  # Below the exact distance only the misclassified points are lost.
  correct = (labels == c).astype(np.float32)
  np.testing.assert_allclose(
      era(jnp.asarray(0.95 * dist, jnp.float32), mask=jnp.asarray(mask)),
      (correct * mask).sum() / mask.sum(), rtol=1e-6)
  assert float(era(jnp.asarray(1.05 * dist, jnp.float32))) == 0.0
  with pytest.raises(ValueError, match='mask'):
    era(0.1, mask=jnp.ones(11))

  # A tie (margin exactly 0) counts as broken; an all-zero mask gives 0.
  tie_fn = lambda z: jnp.zeros((z.shape[0], 3))
  tie_era = functools.partial(
      attacks.empirical_robust_accuracy, tie_fn, jnp.asarray(x),
      jnp.zeros(12, jnp.int32), 0.1, rng=jax.random.PRNGKey(0), num_steps=0,
      num_restarts=1)
  assert float(tie_era()) == 0.0
  assert float(tie_era(mask=jnp.zeros(12))) == 0.0


# ----------------------------------------------------------------------------
# A small ReLU MLP: exact spectral norms give a sound pairwise bound.


def _mlp_params(seed, sizes):
  rs = np.random.RandomState(seed)
  return [(rs.normal(size=(m, n)).astype(np.float32) / np.sqrt(m),
           0.1 * rs.normal(size=(n,)).astype(np.float32))
          for m, n in zip(sizes[:-1], sizes[1:])]


def _mlp_apply(params, x):
  h = x.reshape(x.shape[0], -1)
  for w, b in params[:-1]:
    h = jax.nn.relu(h @ w + b)
  w, b = params[-1]
  return h @ w + b


def _pairwise_bound(params):
  """K_ij = ||W_L[:, i] - W_L[:, j]|| * prod_{l<L} sigma_max(W_l), (N, N)."""
  prod = np.prod(
      [np.linalg.svd(w, compute_uv=False)[0] for w, _ in params[:-1]])
  w_last = params[-1][0].astype(np.float64)
  diff = w_last[:, :, None] - w_last[:, None, :]
  return np.linalg.norm(diff, axis=0) * prod


def test_pgd_never_breaks_exact_certificates_of_mlp():
  params = _mlp_params(0, [6, 16, 16, 3])
  k = _pairwise_bound(params)
  x = np.random.RandomState(1).uniform(size=(32, 6)).astype(np.float32)
  apply_fn = functools.partial(_mlp_apply, params)
  logits = np.asarray(apply_fn(x), np.float64)
  c = logits.argmax(-1)
  is_c = np.arange(3)[None] == c[:, None]
  gaps = logits[np.arange(32), c][:, None] - logits
  radii = np.min(np.where(is_c, np.inf, gaps / np.where(is_c, 1.0, k[c])),
                 axis=1)
  # One call: just inside each certified radius, and far beyond it.
  eps = np.concatenate([radii * (1 - 1e-3), 30 * radii])
  x2, c2 = np.concatenate([x, x]), np.concatenate([c, c])
  _, margins = attacks.pgd_l2_attack(
      apply_fn, jnp.asarray(x2), jnp.asarray(c2), jnp.asarray(eps, jnp.float32),
      rng=jax.random.PRNGKey(0), num_steps=50, num_restarts=4)
  margins = np.asarray(margins)
  assert np.all(margins[:32] > 0)
  # The attack is not idle: inside the certificate it lowers the margin, far
  # beyond it it breaks points.
  assert np.all(margins[:32] < gaps[~is_c].reshape(32, 2).min(1))
  assert np.mean(margins[32:] <= 0) > 0.25


def test_lower_bound_of_mlp_stays_below_exact_pairwise_bound():
  params = _mlp_params(2, [5, 12, 3])
  k_max = _pairwise_bound(params).max()
  x1, x2 = attacks.sample_pairs(
      jax.random.uniform(jax.random.PRNGKey(0), (50, 5)), 64,
      jax.random.PRNGKey(1))

  # Jitted with the parameters as arguments, as for a trained model.
  @jax.jit
  def lower_bound(params, x1, x2):
    return attacks.empirical_lipschitz_lower_bound(
        functools.partial(_mlp_apply, params), x1, x2, num_steps=300,
        learning_rate=1e-2)

  best, per_pair = lower_bound(params, x1, x2)
  assert per_pair.shape == (64,)
  assert 0.2 * k_max < float(best) <= k_max * (1 + 1e-5), (best, k_max)
  np.testing.assert_allclose(best, per_pair.max())
  assert 0.0 < float(attacks.tightness(best, k_max)) <= 1.0


def test_lower_bound_without_steps_is_eq19_on_the_pairs():
  params = _mlp_params(3, [4, 8, 5])
  apply_fn = functools.partial(_mlp_apply, params)
  rs = np.random.RandomState(0)
  x1 = rs.uniform(size=(6, 4)).astype(np.float32)
  x2 = rs.uniform(size=(6, 4)).astype(np.float32)
  _, per_pair = attacks.empirical_lipschitz_lower_bound(
      apply_fn, jnp.asarray(x1), jnp.asarray(x2), num_steps=0)
  f1 = np.asarray(apply_fn(x1), np.float64)
  f2 = np.asarray(apply_fn(x2), np.float64)
  expected = []
  for p in range(6):
    j = f1[p].argmax()
    expected.append(max(abs(f1[p, j] - f1[p, i] - (f2[p, j] - f2[p, i]))
                        for i in range(5)) / np.linalg.norm(x1[p] - x2[p]))
  np.testing.assert_allclose(per_pair, expected, rtol=1e-5)


def test_lower_bound_chunks_of_pairs_change_nothing():
  # Pairs and Adam's moments are independent: optimising 7 pairs in chunks
  # of 3 (the last padded) gives each pair the same result as all at once,
  # and each chunk alone matches the corresponding pairs run by themselves.
  params = _mlp_params(5, [4, 8, 5])
  apply_fn = functools.partial(_mlp_apply, params)
  rs = np.random.RandomState(2)
  x1 = jnp.asarray(rs.uniform(size=(7, 4)), jnp.float32)
  x2 = jnp.asarray(rs.uniform(size=(7, 4)), jnp.float32)
  run = functools.partial(attacks.empirical_lipschitz_lower_bound, apply_fn,
                          num_steps=20, learning_rate=1e-2)
  best, chunked = run(x1, x2, pair_chunk_size=3)
  _, whole = run(x1, x2, pair_chunk_size=None)
  _, last = run(x1[6:], x2[6:])
  assert chunked.shape == (7,)
  np.testing.assert_allclose(chunked, whole, rtol=1e-5)
  np.testing.assert_allclose(chunked[6:], last, rtol=1e-5)
  assert float(best) == float(np.max(chunked))
  with pytest.raises(ValueError, match='pair_chunk_size'):
    run(x1, x2, pair_chunk_size=0)


# ----------------------------------------------------------------------------
# Lower bound on a linear model: the supremum is max_i ||w_j - w_i||.


def _linear_fixed_argmax(seed):
  w, b = _random_linear(seed, dim=5, num_classes=4)
  b[0] = 100.0  # class 0 is the argmax everywhere the test goes
  targets = np.linalg.norm(w[:, :1].astype(np.float64) - w, axis=0)
  return w, b, targets


def test_lower_bound_of_linear_model_converges_and_is_monotone():
  w, b, targets = _linear_fixed_argmax(0)
  apply_fn = _linear(jnp.asarray(w), jnp.asarray(b))
  rs = np.random.RandomState(1)
  x1 = jnp.asarray(rs.normal(size=(8, 5)), jnp.float32)
  x2 = jnp.asarray(rs.normal(size=(8, 5)), jnp.float32)
  run = functools.partial(attacks.empirical_lipschitz_lower_bound, apply_fn,
                          x1, x2, learning_rate=5e-2, clip_min=None,
                          clip_max=None)
  previous = None
  for steps in (0, 30, 300):
    best, per_pair = run(num_steps=steps)
    # Float32 logits near 100 (the bias) carry ~1e-5 absolute rounding.
    assert np.all(np.asarray(per_pair) <= targets.max() * (1 + 1e-5))
    if previous is not None:
      assert np.all(np.asarray(per_pair) >= previous)
    previous = np.asarray(per_pair)
  assert float(best) > 0.99 * targets.max(), (best, targets.max())


def test_lower_bound_exact_for_aligned_pairs():
  w, b, targets = _linear_fixed_argmax(2)
  i_star = targets.argmax()
  apply_fn = _linear(jnp.asarray(w), jnp.asarray(b))
  x1 = np.random.RandomState(3).uniform(0.3, 0.7, size=(4, 5))
  x2 = x1 - np.array([0.01, 0.05, -0.02, 0.1])[:, None] * (
      w[:, 0] - w[:, i_star])
  for steps in (0, 50):
    best, per_pair = attacks.empirical_lipschitz_lower_bound(
        apply_fn, jnp.asarray(x1, jnp.float32), jnp.asarray(x2, jnp.float32),
        num_steps=steps, clip_min=None, clip_max=None)
    np.testing.assert_allclose(per_pair, targets.max(), rtol=1e-4)
    np.testing.assert_allclose(best, targets.max(), rtol=1e-4)


def test_lower_bound_of_identical_pair_is_zero():
  w, b, _ = _linear_fixed_argmax(4)
  apply_fn = _linear(jnp.asarray(w), jnp.asarray(b))
  x = jnp.full((2, 5), 0.5)
  best, per_pair = attacks.empirical_lipschitz_lower_bound(
      apply_fn, x, x, num_steps=5)
  np.testing.assert_array_equal(per_pair, [0.0, 0.0])
  assert np.isfinite(float(best))


def test_lower_bound_clips_to_data_range():
  # f = (||x||^2, 0): the quotient is |(x1 - x2).(x1 + x2)| / ||x1 - x2|| <=
  # ||x1 + x2||, at most 2 * 0.6 * sqrt(5) in [0, 0.6]^5 and unbounded outside.
  apply_fn = lambda x: jnp.stack(
      [jnp.sum(x**2, axis=1), jnp.zeros(x.shape[0])], axis=1)
  x1, x2 = jnp.full((2, 5), 0.3), jnp.full((2, 5), 0.2)
  run = functools.partial(attacks.empirical_lipschitz_lower_bound, apply_fn,
                          x1, x2, num_steps=40, learning_rate=0.1)
  sup = 2 * 0.6 * np.sqrt(5)
  clipped, _ = run(clip_min=0.0, clip_max=0.6)
  assert 0.9 * sup < float(clipped) <= sup * (1 + 1e-5)
  free, _ = run(clip_min=None, clip_max=None)
  assert float(free) > 1.5 * sup


# ----------------------------------------------------------------------------
# sample_pairs, jit, tightness, validation.


def test_sample_pairs_distinct():
  images = jnp.arange(7, dtype=jnp.float32)[:, None, None] * jnp.ones((7, 2, 2))
  x1, x2 = attacks.sample_pairs(images, 500, jax.random.PRNGKey(0))
  assert x1.shape == x2.shape == (500, 2, 2)
  i1, i2 = np.asarray(x1[:, 0, 0]), np.asarray(x2[:, 0, 0])
  assert np.all(i1 != i2)
  assert len(set(zip(i1.tolist(), i2.tolist()))) == 7 * 6
  with pytest.raises(ValueError, match='images'):
    attacks.sample_pairs(images[:1], 3, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match='num_pairs'):
    attacks.sample_pairs(images, 0, jax.random.PRNGKey(0))


def test_jit_shapes_and_clipping():
  w, b = _random_linear(9, dim=12, num_classes=3)
  x = jnp.asarray(np.random.RandomState(0).uniform(size=(4, 2, 3, 2)),
                  jnp.float32)
  c = jnp.asarray(np.asarray(_linear(w, b)(x)).argmax(-1))
  rng = jax.random.PRNGKey(0)

  # Parameters as jit arguments: the pattern for attacking a trained model.
  @functools.partial(jax.jit, static_argnames=('num_steps', 'num_restarts'))
  def attack(w, b, x, c, eps, rng, num_steps, num_restarts):
    return attacks.pgd_l2_attack(_linear(w, b), x, c, eps, rng=rng,
                                 num_steps=num_steps, num_restarts=num_restarts)

  jitted = attack(w, b, x, c, 0.7, rng, num_steps=7, num_restarts=3)
  x_adv, margins = attacks.pgd_l2_attack(
      _linear(w, b), x, c, 0.7, rng=rng, num_steps=7, num_restarts=3)
  for a, e in zip(jitted, (x_adv, margins)):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)
  # Shapes; the default clipping keeps [0, 1] and the ball.
  x_adv = np.asarray(x_adv)
  assert x_adv.shape == x.shape and margins.shape == (4,)
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  np.testing.assert_array_less(
      np.linalg.norm((x_adv - np.asarray(x)).reshape(4, -1), axis=1),
      0.7 * (1 + 1e-5))
  # Plain (untargeted) margin descent, with a per-example step size.
  x_adv, _ = attacks.pgd_l2_attack(
      _linear(w, b), x, c, 0.7, rng=rng, num_steps=7, num_restarts=2,
      multi_targeted=False, step_size=jnp.full((4,), 0.2))
  x_adv = np.asarray(x_adv)
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  np.testing.assert_array_less(
      np.linalg.norm((x_adv - np.asarray(x)).reshape(4, -1), axis=1),
      0.7 * (1 + 1e-5))


def test_validation_errors():
  w, b = _random_linear(0, dim=3, num_classes=2)
  apply_fn = _linear(jnp.asarray(w), jnp.asarray(b))
  x = jnp.zeros((2, 3))
  c = jnp.zeros(2, jnp.int32)
  rng = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match='epsilon'):
    attacks.pgd_l2_attack(apply_fn, x, c, -0.1, rng=rng)
  with pytest.raises(ValueError, match='epsilon'):
    attacks.pgd_l2_attack(apply_fn, x, c, jnp.ones(3), rng=rng)
  with pytest.raises(ValueError, match='classes'):
    attacks.pgd_l2_attack(apply_fn, x, jnp.zeros(3, jnp.int32), 0.1, rng=rng)
  with pytest.raises(ValueError, match='num_restarts'):
    attacks.pgd_l2_attack(apply_fn, x, c, 0.1, rng=rng, num_restarts=0)
  with pytest.raises(ValueError, match='clip_max'):
    attacks.pgd_l2_attack(apply_fn, x, c, 0.1, rng=rng, clip_max=None)
  with pytest.raises(ValueError, match='logits'):
    attacks.pgd_l2_attack(lambda z: z[:, 0], x, c, 0.1, rng=rng)
  with pytest.raises(ValueError, match='x1 and x2'):
    attacks.empirical_lipschitz_lower_bound(apply_fn, x, x[:1])
  with pytest.raises(ValueError, match='upper'):
    attacks.tightness(1.0, 0.0)
  np.testing.assert_allclose(attacks.tightness(2.0, 4.0), 0.5)
