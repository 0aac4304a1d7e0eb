"""Time of the tightness estimate (CLL supplement C) on 4C3F.

The paper's estimate runs `cll_jax.attacks.empirical_lipschitz_lower_bound`
on 4000 training pairs for 1000 Adam steps. Every step costs one forward and
one backward pass over all 2P points, so the cost is linear in
pairs x steps (at sizes that fill the machine). This benchmark times a
scaled-down run (default 64 pairs x 20 steps, jitted, compile time apart) and
extrapolates:

    full_s = measured_s * (4000 * 1000) / (pairs * steps).

Run: `python -m benchmarks.tightness [--tiny] [--pairs P] [--steps S]`.
"""

from __future__ import annotations

import argparse
import functools

import jax

from benchmarks import time_calls
from cll_jax import attacks
from cll_jax import train
from experiments import cifar10_4c3f

FULL_PAIRS = 4000
FULL_STEPS = 1000


def run(tiny: bool = False, pairs: int = 64, steps: int = 20,
        repeats: int = 3, seed: int = 0, verbose: bool = True) -> list[dict]:
  config = cifar10_4c3f.get_config()
  input_shape = (32, 32, 3)
  if tiny:
    config.model.name = 'tiny_cnn'
    input_shape = (8, 8, 3)
    pairs, steps, repeats = min(pairs, 4), min(steps, 2), 1
  model = train.create_model(config, 10)
  state = train.create_train_state(config, model, jax.random.PRNGKey(seed),
                                   input_shape, 1)
  rng = jax.random.PRNGKey(seed + 1)
  images = jax.random.uniform(rng, (max(2 * pairs, 2), *input_shape))
  x1, x2 = attacks.sample_pairs(images, pairs, jax.random.fold_in(rng, 1))

  def logits(x):
    return state.apply_fn(state.variables, x).logits

  lower = jax.jit(functools.partial(attacks.empirical_lipschitz_lower_bound,
                                    logits, num_steps=steps))
  timing = time_calls(lambda: lower(x1, x2), repeats)
  per_pair_step_ms = timing['median_ms'] / (pairs * steps)
  row = dict(benchmark='tightness', model=config.model.name, pairs=pairs,
             steps=steps, per_pair_step_ms=per_pair_step_ms,
             full_pairs=FULL_PAIRS, full_steps=FULL_STEPS,
             full_estimate_h=per_pair_step_ms * FULL_PAIRS * FULL_STEPS
             / 3.6e6, **timing)
  if verbose:
    print(f"{pairs} pairs x {steps} steps: {timing['median_ms']:.0f} ms "
          f"(compile {timing['compile_s']:.1f} s); full {FULL_PAIRS} x "
          f"{FULL_STEPS}: about {row['full_estimate_h']:.2f} h", flush=True)
  return [row]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tiny', action='store_true')
  parser.add_argument('--pairs', type=int, default=64)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  run(tiny=args.tiny, pairs=args.pairs, steps=args.steps,
      repeats=args.repeats)


if __name__ == '__main__':
  main()
