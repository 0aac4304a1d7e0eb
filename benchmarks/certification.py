"""Certification throughput of 4C3F against plain inference of the same model.

  * `plain`: logits of the network alone (`benchmarks.plain_forward`: no norm
    estimates, no K_ij) and their argmax, jitted;
  * `certified`: the real `cll_jax.train.eval_step` (clean accuracy plus
    certified-correct counts at the CRA radii) with the pairwise bound K_ij
    and the logits' error bound precomputed once, as `train.evaluate` does;
    in float32 (`config.eval.precision = 'float32'`; the default float64
    certification is slower on CPU);
  * one-off costs: `train.certification_bounds(..., 'sound')` (guaranteed
    Gram-iteration bounds of every layer) and `'power'`, each jitted, compile
    time reported separately.

Throughput is images per second at the evaluation batch size (500 in the
configs). Target: certified >= 0.9 x plain.

Run: `python -m benchmarks.certification [--tiny] [--repeats N]`.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from benchmarks import block, fake_batch, plain_forward, time_calls
from cll_jax import configs
from cll_jax import train
from experiments import cifar10_4c3f

TARGET_RATIO = 0.9


def run(tiny: bool = False, repeats: int = 10, seed: int = 0,
        verbose: bool = True) -> list[dict]:
  config = cifar10_4c3f.get_config()
  input_shape = (32, 32, 3)
  batch_size = config.eval.batch_size
  if tiny:
    config.model.name = 'tiny_cnn'
    input_shape = (8, 8, 3)
    batch_size = 16
  model = train.create_model(config, 10)
  state = train.create_train_state(config, model, jax.random.PRNGKey(seed),
                                   input_shape, 1)
  batch = fake_batch(jax.random.PRNGKey(seed + 1), batch_size, input_shape,
                     10)
  batch['mask'] = jnp.ones((batch_size,), jnp.float32)
  radii = tuple(configs.DEFAULT_RADII) + (config.loss.epsilon,)

  rows = []
  # One-off cost of the bounds (jitted; the first call includes compilation).
  for method in ('sound', 'power'):
    bounds_fn = jax.jit(functools.partial(
        train.certification_bounds, model=model, input_shape=input_shape,
        method=method))
    timing = time_calls(lambda: bounds_fn(state), max(repeats // 3, 1))
    rows.append(dict(benchmark='certification', variant=f'bound_{method}',
                     model=config.model.name, batch=None, **timing))
  bounds = block(train.certification_bounds(state, model, input_shape,
                                            'sound'))

  @jax.jit
  def plain(params, images):
    images = train.prepare_images(config, images, None)
    return jnp.argmax(plain_forward(model, params, images), -1)

  certified = jax.jit(functools.partial(train.eval_step, config=config,
                                        radii=radii))
  for name, call in (
      ('plain', lambda: plain(state.params, batch['image'])),
      ('certified', lambda: certified(state, batch, bounds))):
    timing = time_calls(call, repeats, warmup=2)
    rows.append(dict(benchmark='certification', variant=name,
                     model=config.model.name, batch=batch_size,
                     images_per_s=batch_size / (timing['median_ms'] / 1e3),
                     images_per_cpu_s=batch_size / (timing['cpu_ms'] / 1e3),
                     **timing))
  if verbose:
    for row in rows:
      extra = (f"{row['images_per_s']:9.0f} img/s" if 'images_per_s' in row
               else '')
      print(f"{row['variant']:12s} median {row['median_ms']:9.1f} ms "
            f"compile {row['compile_s']:5.1f} s {extra}", flush=True)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tiny', action='store_true')
  parser.add_argument('--repeats', type=int, default=10)
  args = parser.parse_args()
  run(tiny=args.tiny, repeats=args.repeats)


if __name__ == '__main__':
  main()
