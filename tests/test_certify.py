"""Tests of cll_jax.certify against linear models with exact certificates.

For f(x) = W x + b the decision region of the predicted class c is the
polyhedron {f_c >= f_j for all j}, so the exact L2 distance from x to another
decision is min_j (f_c - f_j) / ||w_c - w_j||: with K_cj = ||w_c - w_j|| the
certificate is tight, and brute-force perturbations can check it both ways.
"""

from __future__ import annotations

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cll_jax import certify


def _linear_model(rng, n_classes=4, dim=5):
  w = rng.normal(size=(n_classes, dim))
  b = rng.normal(size=n_classes)
  k = np.linalg.norm(w[:, None, :] - w[None, :, :], axis=-1)
  return w, b, k


def _certified_loop(f, k, eps):
  """Supp. eq. 18 by explicit loops (float64)."""
  out = []
  for row in np.asarray(f, np.float64):
    c = int(np.argmax(row))
    ok = all(row[c] - row[j] > eps * k[c, j]
             for j in range(len(row)) if j != c)
    out.append(ok)
  return np.array(out)


def test_radius_is_exact_distance_for_linear_model():
  rng = np.random.default_rng(0)
  w, b, k = _linear_model(rng)
  x = rng.normal(size=(24, 5))
  f = x @ w.T + b
  radius = np.asarray(certify.certified_radius(
      f.astype(np.float32), k.astype(np.float32)))
  c = f.argmax(axis=1)
  for n in range(len(x)):
    dist = [(f[n, c[n]] - f[n, j]) / np.linalg.norm(w[c[n]] - w[j])
            for j in range(4) if j != c[n]]
    assert radius[n] == pytest.approx(min(dist), rel=1e-4, abs=1e-6)
  margins = np.asarray(certify.prediction_margins(
      f.astype(np.float32), k.astype(np.float32)))
  assert np.all(np.isinf(margins[np.arange(24), c]))
  np.testing.assert_allclose(margins.min(axis=1), radius)


def test_brute_force_perturbations_agree_with_certificate():
  rng = np.random.default_rng(1)
  w, b, k = _linear_model(rng)
  x = rng.normal(size=(12, 5))
  f = x @ w.T + b
  f32, k32 = f.astype(np.float32), k.astype(np.float32)
  radius = np.asarray(certify.certified_radius(f32, k32), np.float64)
  c = f.argmax(axis=1)
  for n in range(len(x)):
    r = radius[n]
    # Slightly inside: no perturbation of norm r (1 - 1e-3) flips the class.
    u = rng.normal(size=(300, 5))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    j_star = min((j for j in range(4) if j != c[n]),
                 key=lambda j: (f[n, c[n]] - f[n, j]) / k[c[n], j])
    worst = (w[j_star] - w[c[n]]) / k[c[n], j_star]
    inside = x[n] + r * (1 - 1e-3) * np.concatenate([u, worst[None]])
    assert np.all((inside @ w.T + b).argmax(axis=1) == c[n])
    # Slightly outside, along the worst direction, the class changes.
    outside = x[n] + r * (1 + 1e-3) * worst
    assert (outside @ w.T + b).argmax() != c[n]
    # is_certified agrees on both sides of the radius.
    for scale, want in ((1 - 1e-3, True), (1 + 1e-3, False)):
      got = certify.is_certified(f32[n:n + 1], k32, np.float32(r * scale))
      assert bool(got[0]) is want


def test_exact_boundary_is_not_certified():
  # w_0 = 0, w_1 = (-3, -4), w_2 = (0, 8), x = 0, b = (1.25, 0, -10):
  # K_01 = 5, margin f_0 - f_1 = 1.25, so the distance to class 1 is exactly
  # 0.25 (all numbers are exact in binary floating point).
  w = np.array([[0.0, 0.0], [-3.0, -4.0], [0.0, 8.0]])
  b = np.array([1.25, 0.0, -10.0])
  k = np.linalg.norm(w[:, None] - w[None], axis=-1).astype(np.float32)
  assert k[0, 1] == 5.0
  f = b[None].astype(np.float32)
  # At radius 0.25 the perturbation -0.25 * (w_0 - w_1)/5 reaches a tie.
  x_adv = -0.25 * (w[0] - w[1]) / 5.0
  f_adv = w @ x_adv + b
  assert f_adv[0] == f_adv[1]
  assert float(certify.certified_radius(f, k)[0]) == 0.25
  assert not bool(certify.is_certified(f, k, 0.25)[0])
  assert bool(certify.is_certified(f, k, 0.25 - 2.0**-12)[0])
  labels = np.array([0])
  assert not bool(certify.certified_correct(f, labels, k, 0.25)[0])
  counts = certify.certified_counts(f, labels, k, (0.25 - 2.0**-12, 0.25))
  np.testing.assert_array_equal(counts.certified, [1, 0])


def test_ties_are_never_certified():
  k = np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0]], np.float32)
  f = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]], np.float32)
  assert not np.any(certify.is_certified(f, k, 1e-12))
  assert not np.any(certify.is_certified(f, k, 0.0))
  np.testing.assert_array_equal(certify.certified_radius(f, k), [0.0, 0.0])
  labels = np.array([0, 1])
  assert not np.any(certify.certified_correct(f, labels, k, 0.0))


def test_is_certified_and_correct_vs_loops():
  rng = np.random.default_rng(2)
  f = (2 * rng.normal(size=(40, 6))).astype(np.float32)
  a = rng.uniform(0.5, 3.0, size=(6, 6))
  k = np.triu(a, 1)
  k = (k + k.T).astype(np.float32)
  labels = rng.integers(0, 6, size=40)
  for eps in (0.0, 0.1, 0.5, 1.0):
    want = _certified_loop(f, k, eps)
    np.testing.assert_array_equal(certify.is_certified(f, k, eps), want)
    np.testing.assert_array_equal(
        certify.certified_correct(f, labels, k, eps),
        want & (f.argmax(axis=1) == labels))


def test_counts_with_mask_over_padded_batches():
  rng = np.random.default_rng(3)
  n, batch = 10, 4
  f = (3 * rng.normal(size=(n, 5))).astype(np.float32)
  a = rng.uniform(0.5, 2.0, size=(5, 5))
  k = np.triu(a, 1)
  k = (k + k.T).astype(np.float32)
  labels = rng.integers(0, 5, size=n)
  labels[:6] = f[:6].argmax(axis=1)  # make some correct examples
  radii = (0.0, 0.2, 0.5, 1.0)
  want = np.array([
      np.sum(_certified_loop(f, k, r) & (f.argmax(1) == labels))
      for r in radii])
  counts_fn = jax.jit(certify.certified_counts)
  total = None
  for start in range(0, n, batch):
    fb, lb = f[start:start + batch], labels[start:start + batch]
    real = len(fb)
    pad = batch - real
    # Padding rows that would be correct and certified if counted.
    fb = np.concatenate([fb, np.tile([[50.0, 0, 0, 0, 0]], (pad, 1))])
    fb = fb.astype(np.float32)
    lb = np.concatenate([lb, np.zeros(pad, int)])
    mask = np.arange(batch) < real
    c = counts_fn(fb, lb, k, jnp.asarray(radii), mask)
    total = c if total is None else total + c
  np.testing.assert_array_equal(total.certified, want)
  assert int(total.total) == n
  assert int(total.correct) == int(np.sum(f.argmax(1) == labels))
  np.testing.assert_allclose(total.certified_accuracy(), want / n)
  np.testing.assert_allclose(
      certify.certified_accuracy(f, labels, k, radii), want / n)
  assert float(total.clean_accuracy()) == pytest.approx(
      np.mean(f.argmax(1) == labels))
  # An all-padding batch counts nothing and has no accuracy.
  empty = certify.certified_counts(f, labels, k, radii, np.zeros(n, bool))
  assert int(empty.total) == 0
  assert np.all(np.isnan(empty.certified_accuracy()))


def test_default_radii():
  assert certify.DEFAULT_RADII == (36 / 255, 72 / 255, 108 / 255)
  f = np.array([[1.0, 0.0]], np.float32)
  k = np.array([[0, 1], [1, 0]], np.float32)
  # Radius 1 > 108/255: certified at all three default radii.
  np.testing.assert_array_equal(
      certify.certified_accuracy(f, np.array([0]), k), [1.0, 1.0, 1.0])


def test_low_precision_logits_are_promoted():
  f = np.array([[1.0, 0.5]], np.float32)
  k = np.array([[0, 1], [1, 0]], np.float32)
  out = certify.certified_radius(jnp.asarray(f, jnp.bfloat16), k)
  assert out.dtype == jnp.float32
  assert float(out[0]) == 0.5


F = np.array([[1.0, 0.0, 0.5]], np.float32)
K = np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0]], np.float32)
L = np.array([0])


@pytest.mark.parametrize('call, msg', [
    (lambda: certify.certified_radius(F[0], K), 'logits must have 2'),
    (lambda: certify.prediction_margins(F, K[:2]), 'pairwise_lipschitz must'),
    (lambda: certify.certified_radius(F * np.nan, K), 'logits must be finite'),
    (lambda: certify.is_certified(F, K, -0.1), 'epsilon must be >= 0'),
    (lambda: certify.is_certified(F, K, np.ones(2)), 'epsilon must have 0'),
    (lambda: certify.is_certified(F, -K, 0.1), 'must be > 0 off the diag'),
    (lambda: certify.certified_correct(F, np.array([3]), K, 0.1),
     r'labels must lie in \[0, 3\)'),
    (lambda: certify.certified_correct(F, np.array([0.0]), K, 0.1),
     'labels must be an integer'),
    (lambda: certify.certified_counts(F, L, K, (-0.1, 0.2)),
     'radii must be >= 0'),
    (lambda: certify.certified_counts(F, L, K, np.ones((2, 2))),
     'radii must have 1 dimensions'),
    (lambda: certify.certified_counts(F, L, K, (0.1,), np.ones(2, bool)),
     r'mask must have shape \(1,\)'),
    (lambda: certify.certified_accuracy(F, np.array([0, 1]), K),
     r'labels must have shape \(1,\)'),
    (lambda: certify.is_certified(F, K, 0.1, -1.0), 'margin_error must be >= 0'),
    (lambda: certify.is_certified(F, K, 0.1, np.nan), 'margin_error must be'),
    (lambda: certify.certified_radius(F, K, np.ones(3)),
     r'margin_error must be a scalar or have shape \(1,\)'),
    (lambda: certify.is_certified(F, K, np.inf), 'epsilon must be finite'),
])
def test_bad_inputs(call, msg):
  with pytest.raises(ValueError, match=msg):
    call()


# ---------------------------------------------------------------------------
# Directed rounding: exact-arithmetic checks with fractions.
# ---------------------------------------------------------------------------


def _exact(x) -> Fraction:
  return Fraction(float(x))


def _exactly_certified(logits, k, eps, delta=0.0) -> list[bool]:
  """Supp. eq. 18 in exact rational arithmetic on the given numbers."""
  out = []
  for row, d in zip(np.asarray(logits), np.broadcast_to(delta, len(logits))):
    c = int(np.argmax(row))
    out.append(all(
        _exact(row[c]) - _exact(row[j]) - _exact(d) > _exact(eps) * _exact(
            k[c, j]) for j in range(len(row)) if j != c))
  return out


def _exact_radius(row, k, delta=0.0) -> Fraction:
  c = int(np.argmax(row))
  return max(Fraction(0), min(
      (_exact(row[c]) - _exact(row[j]) - _exact(delta)) / _exact(k[c, j])
      for j in range(len(row)) if j != c))


def test_issue_example_is_refused():
  # A 2-class linear model f = (w . x, 0) with ||w|| = K exactly: the exact
  # margin is below eps * K by 2e-10, but float32(eps) is below eps and the
  # float32 product used to certify it.
  eps, k_value, margin = 0.03803647443400834, 1.641022801399231, 0.06241872161626816
  f = np.array([[margin, 0.0]], np.float32)
  k = np.array([[0.0, k_value], [k_value, 0.0]], np.float32)
  assert _exact(f[0, 0]) < _exact(eps) * _exact(k[0, 1])
  assert not bool(certify.is_certified(f, k, eps)[0])
  assert not bool(jax.jit(lambda f, k: certify.is_certified(f, k, eps))(f, k)[0])
  assert not bool(certify.certified_correct(f, np.array([0]), k, eps)[0])
  counts = certify.certified_counts(f, np.array([0]), k, (eps,))
  np.testing.assert_array_equal(counts.certified, [0])
  radius = certify.certified_radius(f, k)[0]
  assert _exact(radius) <= _exact(f[0, 0]) / _exact(k[0, 1])


def _near_tie_cases(rng, count, num_classes=3):
  """Logits, K and eps whose margins sit within a few ulps of eps * K."""
  for _ in range(count):
    k = np.zeros((num_classes, num_classes), np.float32)
    iu = np.triu_indices(num_classes, 1)
    k[iu] = (10.0 ** rng.uniform(-3, 3, size=len(iu[0]))).astype(np.float32)
    k = k + k.T
    eps = float(10.0 ** rng.uniform(-4, 1))  # a float64 Python radius
    f = np.zeros((8, num_classes), np.float32)
    for b in range(8):
      c = rng.integers(num_classes)
      base = np.float32(rng.normal() * 10.0 ** rng.uniform(-2, 3))
      f[b] = base
      for j in range(num_classes):
        if j != c:
          target = np.float32(base - np.float32(eps) * k[c, j])
          f[b, j] = target + np.float32(rng.integers(-3, 4)) * np.spacing(
              target)
      if b == 0:
        f[b, (c + 1) % num_classes] = base  # an exact tie
    yield f, k, eps


def _relative_slack(row, k, eps) -> Fraction:
  """min_j (f_c - f_j - eps K_cj) / (eps K_cj), exactly."""
  c = int(np.argmax(row))
  return min((_exact(row[c]) - _exact(row[j]) - _exact(eps) * _exact(k[c, j]))
             / (_exact(eps) * _exact(k[c, j]))
             for j in range(len(row)) if j != c)


def test_certificates_hold_in_exact_arithmetic_near_ties():
  rng = np.random.default_rng(4)
  certified = 0
  for f, k, eps in _near_tie_cases(rng, 150):
    got = np.asarray(certify.is_certified(f, k, eps))
    want = _exactly_certified(f, k, eps)
    # Rounding may refuse, never grant.
    assert not np.any(got & ~np.asarray(want)), (f, k, eps)
    # It refuses only within a few ulps of the threshold.
    for row, ok in zip(f, got):
      assert ok or _relative_slack(row, k, eps) <= Fraction(1, 2**20)
    certified += int(np.sum(got))
    np.testing.assert_array_equal(
        np.asarray(certify.certified_counts(f, np.argmax(f, 1), k,
                                            (eps,)).certified),
        [np.sum(got)])
    radius = np.asarray(certify.certified_radius(f, k))
    for row, r in zip(f, radius):
      exact = _exact_radius(row, k)
      assert _exact(r) <= exact
      # Rounded toward zero, a few ulps at most.
      assert _exact(r) >= exact * (1 - Fraction(8, 2**24))
    assert radius[0] == 0.0  # the tie
    assert not got[0]
  assert certified > 100  # the cases are not all refused


def test_exact_boundary_and_representable_radii_are_exact():
  # Margins exactly eps * K (both factors with few significant bits): never
  # certified; radii exactly representable: returned exactly.
  rng = np.random.default_rng(5)
  for _ in range(200):
    k_value = np.float32(rng.integers(1, 2**10) * 2.0 ** rng.integers(-8, 8))
    eps = float(rng.integers(1, 2**10) * 2.0 ** rng.integers(-12, 0))
    margin = np.float32(eps * float(k_value))
    assert _exact(margin) == _exact(eps) * _exact(k_value)
    f = np.array([[margin, 0.0], [0.0, margin]], np.float32)
    k = np.array([[0.0, k_value], [k_value, 0.0]], np.float32)
    assert not np.any(certify.is_certified(f, k, eps))
    np.testing.assert_array_equal(certify.certified_radius(f, k), [eps, eps])
    below = float(np.nextafter(np.float32(eps), np.float32(0.0)))
    assert np.all(certify.is_certified(f, k, below))


def test_margin_error_is_subtracted_soundly():
  rng = np.random.default_rng(6)
  for f, k, eps in _near_tie_cases(rng, 40):
    delta = (np.float32(eps) * np.min(k[k > 0])
             * rng.uniform(0, 0.5, size=len(f))).astype(np.float32)
    # Shift the logits so that the margins sit near eps * K + delta.
    top = np.argmax(f, 1)
    f = f.copy()
    f[np.arange(len(f)), top] += delta
    got = np.asarray(certify.is_certified(f, k, eps, delta))
    want = np.asarray(_exactly_certified(f, k, eps, delta))
    assert not np.any(got & ~want)
    radius = np.asarray(certify.certified_radius(f, k, delta))
    for row, r, d in zip(f, radius, delta):
      assert _exact(r) <= _exact_radius(row, k, d)
    # delta = 0 decides like no delta; a huge delta certifies nothing.
    np.testing.assert_array_equal(
        certify.is_certified(f, k, eps, np.zeros(len(f))) & want,
        certify.is_certified(f, k, eps) & want)
    assert not np.any(certify.is_certified(f, k, 0.0, 1e30))


def test_float64_host_logits_are_not_rounded_to_float32():
  # Float64 margins just below eps * K that float32 rounding lifts above it.
  rng = np.random.default_rng(7)
  found = 0
  for _ in range(200):
    eps, k_value = rng.uniform(0.01, 1.0, size=2)
    margin = eps * k_value * (1 - 1e-10)
    if _exact(margin) >= _exact(eps) * _exact(k_value):
      continue
    if not np.float32(margin) > np.float32(eps) * np.float32(k_value):
      continue  # float32 would refuse it anyway
    found += 1
    f = np.array([[margin, 0.0]])
    k = np.array([[0.0, k_value], [k_value, 0.0]])
    assert not bool(certify.is_certified(f, k, eps)[0])
    assert not bool(certify.certified_correct(f, np.array([0]), k, eps)[0])
    assert _exact(certify.certified_radius(f, k)[0]) <= _exact(
        margin) / _exact(k_value)
  assert found > 10


def test_invalid_values_under_jit_certify_nothing():
  f = np.array([[3.0, 0.0, 1.0], [0.0, 2.0, 0.5]], np.float32)
  labels = np.array([0, 1])
  k = np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0]], np.float32)
  is_cert = jax.jit(certify.is_certified)
  radius = jax.jit(certify.certified_radius)
  correct = jax.jit(certify.certified_correct)
  counts = jax.jit(certify.certified_counts)
  assert np.all(is_cert(f, k, 0.1)) and np.all(radius(f, k) > 0)
  one_negative = k.copy()
  one_negative[0, 2] = one_negative[2, 0] = -1.0
  bad_k = [-k, 0 * k, one_negative,
           np.where(np.eye(3) > 0, 0, np.nan).astype(np.float32)]
  for kk in bad_k:
    assert not np.any(is_cert(f, kk, 0.1))
    assert not np.any(correct(f, labels, kk, 0.1))
    np.testing.assert_array_equal(radius(f, kk), [0.0, 0.0])
    np.testing.assert_array_equal(
        counts(f, labels, kk, jnp.asarray([0.0, 0.1])).certified, [0, 0])
  for eps in (-0.1, np.nan):
    assert not np.any(is_cert(f, k, eps))
    assert not np.any(correct(f, labels, k, eps))
  np.testing.assert_array_equal(
      counts(f, labels, k, jnp.asarray([-0.1, np.nan, 0.1])).certified,
      [0, 0, 2])
  for delta in (-1.0, np.nan):
    assert not np.any(is_cert(f, k, 0.1, jnp.full(2, delta)))
    np.testing.assert_array_equal(
        jax.jit(certify.certified_radius)(f, k, jnp.full(2, delta)), [0, 0])
  for bad in (np.inf, np.nan, 1e-40):  # non-finite or subnormal logits
    ff = f.copy()
    ff[0, 1] = bad
    assert not bool(is_cert(ff, k, 0.1)[0]) and bool(is_cert(ff, k, 0.1)[1])
    assert float(radius(ff, k)[0]) == 0.0
