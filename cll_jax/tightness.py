"""Tightness of a trained run: K_lobo / K^(f) (CLL supplement C, eq. 19-20).

`measure_tightness(config, workdir, upper, pairs=..., steps=...)` restores
the run's final checkpoint, draws `pairs` pairs of training examples and runs
`attacks.empirical_lipschitz_lower_bound` (Adam, `steps` steps) on them: the
largest quotient reached is K_lobo <= max_ij K_ij, and K_lobo / upper is a
lower bound on the true tightness of the bound `upper`. The paper's budget is
4000 pairs x 1000 steps (hours on a CPU for 4C3F, see `benchmarks.tightness`);
a smaller budget gives a smaller K_lobo, i.e. a more pessimistic tightness.

The attack is jitted with the network's variables as an argument, so every
run of one architecture and budget shares one compiled program.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cll_jax import attacks
from cll_jax import steps as steps_lib
from cll_jax import train

PAPER_PAIRS = 4000
PAPER_STEPS = 1000
PAPER_LEARNING_RATE = 3e-4


@functools.lru_cache(maxsize=16)
def _lower_bound_fn(model, num_steps: int, learning_rate: float,
                    clip: tuple[float, float] | None):
  clip_min, clip_max = clip if clip is not None else (None, None)

  def lower_bound(variables, x1, x2):
    return attacks.empirical_lipschitz_lower_bound(
        lambda x: model.apply(variables, x).logits, x1, x2,
        num_steps=num_steps, learning_rate=learning_rate, clip_min=clip_min,
        clip_max=clip_max)
  return jax.jit(lower_bound)


def measure_tightness(config, workdir: str, upper: float, *, pairs: int,
                      steps: int, seed: int = 0,
                      learning_rate: float = PAPER_LEARNING_RATE,
                      dataset=None) -> dict[str, Any]:
  """K_lobo of the run in `workdir` and its ratio to the bound `upper`.

  Args:
    config: the run's config (e.g. `run_records.load_config(workdir)`).
    workdir: the run folder (its latest checkpoint is used).
    upper: the upper bound max_ij K_ij the tightness is of (the run's
      `lipschitz_f`), > 0.
    pairs: number of training pairs P >= 1.
    steps: Adam steps >= 0.
    seed: draws the pool of training examples and the pairs.
    learning_rate: Adam learning rate (paper: 3e-4).
    dataset: the run's data set, if already loaded.

  Returns:
    `{'lipschitz_lower', 'lipschitz_upper', 'tightness' (in [0, 1] for a
    sound bound), 'tightness_pairs', 'tightness_steps', 'tightness_seed',
    'tightness_seconds', 'step'}` (`step`: the checkpoint's step).

  Raises:
    ValueError: `upper` <= 0, `pairs` < 1 or `steps` < 0.
    FileNotFoundError: `workdir` holds no checkpoint.
  """
  if not upper > 0:
    raise ValueError(f'upper must be > 0, got {upper!r}')
  if dataset is None:
    dataset = train.load_dataset(config)
  model, state = train.restore_state(config, workdir, dataset.num_classes,
                                     dataset.train_images.shape[1:])
  # Loaders may group examples by class: draw the pool at random.
  pool = np.random.default_rng(seed).permutation(
      len(dataset.train_images))[:max(4 * pairs, 2)]
  raw = dataset.train_images[pool]
  images = steps_lib.prepare_images(config, jnp.asarray(raw), None)
  # Integer images are scaled to [0, 1], the input domain; others are free.
  clip = (0.0, 1.0) if np.issubdtype(raw.dtype, np.integer) else None
  x1, x2 = attacks.sample_pairs(images, pairs, jax.random.PRNGKey(seed))
  start = time.time()
  lower, _ = _lower_bound_fn(model, steps, learning_rate, clip)(
      state.variables, x1, x2)
  lower = float(lower)
  return {'lipschitz_lower': lower, 'lipschitz_upper': float(upper),
          'tightness': lower / float(upper), 'tightness_pairs': pairs,
          'tightness_steps': steps, 'tightness_seed': seed,
          'tightness_seconds': time.time() - start, 'step': int(state.step)}
