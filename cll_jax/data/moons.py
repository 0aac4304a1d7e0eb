"""Two-moons with noise uniform in a disc (CLL supplement B, "Two-moons setup").

The noiseless moons are the two unit half-circles of scikit-learn's
`make_moons`:

  outer (label 0):  (cos t, sin t),              t in [0, pi]
  inner (label 1):  (1 - cos t, 0.5 - sin t),    t in [0, pi]

The two arcs are exactly 0.5 apart (e.g. the outer end point (1, 0) and the
inner apex (1, -0.5)). CLL replaces sklearn's Gaussian noise by noise drawn
uniformly from a disc of radius 0.1, so no noisy point leaves the 0.1-tube
around its arc and the classes are separated by a true margin of exactly
0.5 - 2 * 0.1 = 0.3 (= 2 epsilon in the paper, figure 4).
"""

from __future__ import annotations

import numpy as np

from cll_jax.data.dataset import Dataset

# Gap between the noiseless arcs; the data margin is this minus 2 * radius.
ARC_DISTANCE = 0.5


def uniform_disc(rng: np.random.Generator, n: int, radius: float) -> np.ndarray:
  """`n` points uniform (in area) in the disc of `radius` around 0, (n, 2).

  Uniform in area needs r = R sqrt(u): P(r <= s) = (s / R)^2.
  """
  r = radius * np.sqrt(rng.uniform(size=n))
  phi = rng.uniform(0.0, 2 * np.pi, size=n)
  return np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1)


ARC_POSITIONS = ('grid', 'uniform')


def make_moons(num_points: int, *, noise_radius: float = 0.1,
               seed: int | np.random.SeedSequence = 0,
               arc_positions: str = 'grid'
               ) -> tuple[np.ndarray, np.ndarray]:
  """Samples the two-moons data set with uniform-disc noise.

  Args:
    num_points: number of points; num_points // 2 on the outer arc (label 0)
      and the rest on the inner arc (label 1), as sklearn.
    noise_radius: radius R of the noise disc; the class margin is 0.5 - 2 R.
    seed: seed of the numpy generator. With the same seed, noise_radius=0
      gives the noiseless points of the same draw.
    arc_positions: where on its arc each point sits before the noise.
      'grid' (default, as sklearn's `make_moons`, which the paper uses):
      t = linspace(0, pi, n) per arc, so both end points of each arc are
      always drawn. 'uniform': t drawn uniformly in [0, pi]. Either way the
      sampled margin is above 0.3 (train sets of `load_moons`, seeds 0-4:
      0.327 to 0.346 on the grid, 0.316 to 0.358 uniform).

  Returns:
    points: (num_points, 2) float32, in random order.
    labels: (num_points,) int32.
  """
  if num_points < 0:
    raise ValueError(f'num_points must be >= 0, got {num_points}')
  if not 0 <= noise_radius:
    raise ValueError(f'noise_radius must be >= 0, got {noise_radius}')
  if arc_positions not in ARC_POSITIONS:
    raise ValueError(f'arc_positions must be one of {ARC_POSITIONS}, got '
                     f'{arc_positions!r}')
  rng = np.random.default_rng(seed)
  n_out = num_points // 2
  n_in = num_points - n_out
  if arc_positions == 'grid':
    t_out = np.linspace(0.0, np.pi, n_out)
    t_in = np.linspace(0.0, np.pi, n_in)
  else:
    t = rng.uniform(0.0, np.pi, size=num_points)
    t_out, t_in = t[:n_out], t[n_out:]
  outer = np.stack([np.cos(t_out), np.sin(t_out)], axis=1)
  inner = np.stack([1.0 - np.cos(t_in), 0.5 - np.sin(t_in)], axis=1)
  points = np.concatenate([outer, inner], axis=0)
  labels = np.concatenate([np.zeros(n_out), np.ones(n_in)]).astype(np.int32)
  points = points + uniform_disc(rng, num_points, noise_radius)
  order = rng.permutation(num_points)
  return points[order].astype(np.float32), labels[order]


def load_moons(num_train: int = 2000, num_test: int = 20000,
               noise_radius: float = 0.1, seed: int = 0,
               arc_positions: str = 'grid') -> Dataset:
  """Two-moons train/validation sets (CLL: 2,000 train, 20,000 validation).

  Train and test are independent draws (seeds derived from `seed`).
  """
  train = make_moons(num_train, noise_radius=noise_radius,
                     seed=np.random.SeedSequence([seed, 0]),
                     arc_positions=arc_positions)
  test = make_moons(num_test, noise_radius=noise_radius,
                    seed=np.random.SeedSequence([seed, 1]),
                    arc_positions=arc_positions)
  return Dataset(train[0], train[1], test[0], test[1], num_classes=2,
                 class_names=('outer', 'inner'))
