"""Training schedules of the CLL paper and its baselines, as optax schedules.

All schedules map the optimizer step (an int or traced int) to a value, so
they can be evaluated inside a jitted train step.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import optax


def learning_rate(base: float, steps_per_epoch: int,
                  decay_epochs: Sequence[int] = (),
                  decay_factor: float = 0.1) -> optax.Schedule:
  """Step decay: `base`, times `decay_factor` at each epoch in `decay_epochs`.

  CLL supplement B: 1e-3 decayed by 0.1 at epochs 400, 600 and 780.
  """
  boundaries = {int(e) * steps_per_epoch: decay_factor for e in decay_epochs}
  return optax.piecewise_constant_schedule(base, boundaries)


def polynomial_anneal(start: float, end: float, gamma: float,
                      total_steps: int) -> optax.Schedule:
  """p(t) = p_T + (p_0 - p_T) (1 - t/T)^gamma (CLL supplement eq. 17).

  Used for the slack p (two-moons: 1e-3 -> 1e-12, gamma = 50) and for the
  Lipschitz-scale warm-up beta on Tiny-ImageNet (0.01 -> 1, gamma = 10).
  Constant `end` after step T. optax's polynomial schedule is exactly this
  formula; `start == end` gives the constant itself, whose compiled step
  does not depend on T (so runs of other lengths share it).
  """
  if start == end:
    return optax.constant_schedule(end)
  return optax.polynomial_schedule(
      init_value=start, end_value=end, power=gamma,
      transition_steps=max(int(total_steps), 1))


def gloro_epsilon(epsilon: float, kind: str,
                  total_steps: int) -> optax.Schedule:
  """GloRo's epsilon schedules (Leino et al. 2021, its public code).

  'fixed': epsilon throughout. 'logarithmic': epsilon * log((e - e^0.01) t/T
  + e^0.01), which rises from 0.01 epsilon to epsilon at t = T, fast at
  first. The code steps it per epoch; this is the same curve per step.
  """
  if kind == 'fixed':
    return optax.constant_schedule(epsilon)
  if kind == 'logarithmic':
    lo, hi = jnp.exp(0.01), jnp.e
    steps = max(int(total_steps), 1)

    def schedule(count):
      frac = jnp.clip(count / steps, 0.0, 1.0)
      return epsilon * jnp.log((hi - lo) * frac + lo)
    return schedule
  raise ValueError(
      f"epsilon schedule must be 'fixed' or 'logarithmic', got {kind!r}")


def linear(start: float, end: float, total_steps: int) -> optax.Schedule:
  """Linear ramp, e.g. the TRADES factor 0.5 -> 20 over 400 epochs (B4)."""
  return optax.linear_schedule(start, end, max(int(total_steps), 1))


def triangular(peak: float, total_steps: int,
               peak_fraction: float = 0.4) -> optax.Schedule:
  """Linear warm-up from 0 to `peak`, then linear decay to 0 (one cycle).

  The 'triangular' schedule of CPL's and SLL's code (peak at 2/5 of the
  run), used for their XL rows and CLL's on them (CLL table B4), as two
  joined optax linear schedules.
  """
  if not 0 < peak_fraction < 1:
    raise ValueError(f'peak_fraction must lie in (0, 1), got {peak_fraction}')
  total = max(int(total_steps), 2)
  up = min(max(int(round(peak_fraction * total)), 1), total - 1)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, up),
       optax.linear_schedule(peak, 0.0, total - up)], [up])
