"""Two-moons: geometry of the arcs, the 0.3 margin and the disc noise."""

import numpy as np
import pytest
from scipy import optimize

from cll_jax import data
from cll_jax.data import moons


def _outer(t):
  return np.stack([np.cos(t), np.sin(t)], -1)


def _inner(s):
  return np.stack([1 - np.cos(s), 0.5 - np.sin(s)], -1)


def _min_cross_distance(a, b, chunk=1000):
  best = np.inf
  for i in range(0, len(a), chunk):
    d = np.linalg.norm(a[i:i + chunk, None, :] - b[None, :, :], axis=-1)
    best = min(best, d.min())
  return best


def test_noiseless_arcs_are_half_apart():
  # Brute force on a grid, then polish the best grid pairs with L-BFGS-B:
  # the continuum minimum of |outer(t) - inner(s)| over [0, pi]^2.
  grid = np.linspace(0, np.pi, 1001)
  d = np.linalg.norm(_outer(grid)[:, None] - _inner(grid)[None], axis=-1)
  assert d.min() == pytest.approx(moons.ARC_DISTANCE, abs=1e-12)
  fun = lambda ts: np.linalg.norm(_outer(ts[0]) - _inner(ts[1]))
  best = np.inf
  for flat in np.argsort(d, axis=None)[:30]:
    i, j = np.unravel_index(flat, d.shape)
    res = optimize.minimize(fun, [grid[i], grid[j]], method='L-BFGS-B',
                            bounds=[(0, np.pi), (0, np.pi)])
    best = min(best, res.fun)
  assert best == pytest.approx(0.5, abs=1e-7)
  # The closest pair: outer end point (1, 0) and inner apex (1, -0.5).
  assert np.linalg.norm(_outer(0.0) - _inner(np.pi / 2)) == pytest.approx(0.5)


def test_sampled_margin_at_least_point_three():
  ds = data.load_moons(seed=3)
  for x, y in [(ds.train_images, ds.train_labels),
               (ds.test_images[:8000], ds.test_labels[:8000])]:
    dist = _min_cross_distance(x[y == 0].astype(np.float64),
                               x[y == 1].astype(np.float64))
    assert dist >= 0.3 - 1e-6
    assert dist < 0.5  # The noise does eat into the 0.5 gap.


def test_shapes_sizes_and_balance():
  ds = data.load_dataset('moons')
  assert ds.train_images.shape == (2000, 2)
  assert ds.test_images.shape == (20000, 2)
  assert ds.train_images.dtype == np.float32
  assert ds.train_labels.dtype == np.int32
  assert ds.image_shape == (2,)
  assert ds.num_classes == 2 and len(ds.class_names) == 2
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [1000, 1000])
  np.testing.assert_array_equal(np.bincount(ds.test_labels), [10000, 10000])
  _, y = data.make_moons(1001, seed=0)
  np.testing.assert_array_equal(np.bincount(y), [500, 501])  # As sklearn.
  # Shuffled, not 1000 zeros then 1000 ones.
  assert 0 < np.abs(np.diff(ds.train_labels)).sum() < 1999


def test_seeds():
  a = data.load_moons(seed=1)
  b = data.load_moons(seed=1)
  c = data.load_moons(seed=2)
  np.testing.assert_array_equal(a.train_images, b.train_images)
  assert not np.allclose(a.train_images, c.train_images)
  assert not np.allclose(a.train_images, a.test_images[:2000])


def test_clean_points_on_arcs_with_uniform_t():
  x, y = data.make_moons(20000, noise_radius=0.0, seed=5,
                         arc_positions='uniform')
  x = x.astype(np.float64)
  out, inn = x[y == 0], x[y == 1]
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
  np.testing.assert_allclose(
      np.linalg.norm(inn - [1.0, 0.5], axis=1), 1.0, atol=1e-6)
  assert out[:, 1].min() >= -1e-6 and inn[:, 1].max() <= 0.5 + 1e-6
  t = np.arctan2(out[:, 1], out[:, 0])
  # Uniform in [0, pi]: ~10% per tenth, and random (no repeated grid step).
  hist = np.histogram(t, bins=10, range=(0, np.pi))[0] / len(t)
  np.testing.assert_allclose(hist, 0.1, atol=0.015)
  steps = np.diff(np.sort(t))
  assert steps.std() > 0.5 * steps.mean()


def test_default_grid_is_sklearns_arc_layout():
  # sklearn's make_moons: t = linspace(0, pi, n) per arc, outer n // 2 points.
  x, y = data.make_moons(7, noise_radius=0.0, seed=2)
  x = x.astype(np.float64)
  out, inn = x[y == 0], x[y == 1]
  assert len(out) == 3 and len(inn) == 4
  t_out = np.sort(np.arctan2(out[:, 1], out[:, 0]))
  np.testing.assert_allclose(t_out, [0, np.pi / 2, np.pi], atol=1e-6)
  s_in = np.sort(np.arctan2(0.5 - inn[:, 1], 1 - inn[:, 0]))
  np.testing.assert_allclose(s_in, np.arange(4) * np.pi / 3, atol=1e-6)
  # The outer end (1, 0) is always drawn, and the inner apex (1, -0.5) when
  # the inner arc has an odd number of points: the noiseless gap is then the
  # arc distance itself.
  x, y = data.make_moons(2002, noise_radius=0.0, seed=0)
  gap = _min_cross_distance(x[y == 0].astype(np.float64),
                            x[y == 1].astype(np.float64))
  assert gap == pytest.approx(moons.ARC_DISTANCE, abs=1e-6)


def test_noise_uniform_in_disc():
  n = 40000
  noisy, y1 = data.make_moons(n, noise_radius=0.1, seed=11)
  clean, y2 = data.make_moons(n, noise_radius=0.0, seed=11)
  np.testing.assert_array_equal(y1, y2)
  noise = noisy.astype(np.float64) - clean
  r = np.linalg.norm(noise, axis=1)
  assert r.max() <= 0.1 + 1e-6
  # Uniform in area: P(r <= s) = (s / 0.1)^2 (uniform radius would give s/0.1).
  for s in (0.025, 0.05, 0.1 * np.sqrt(0.5), 0.09):
    assert np.mean(r <= s) == pytest.approx((s / 0.1)**2, abs=0.01)
  phi = np.arctan2(noise[:, 1], noise[:, 0])
  assert abs(np.mean(np.cos(phi))) < 0.02 and abs(np.mean(np.sin(phi))) < 0.02


def test_errors():
  with pytest.raises(ValueError, match='moons'):
    data.load_dataset('no_such_dataset')
  with pytest.raises(ValueError, match='noise_radius'):
    data.make_moons(10, noise_radius=-1.0)
  with pytest.raises(ValueError, match="'spiral'"):
    data.make_moons(10, arc_positions='spiral')
