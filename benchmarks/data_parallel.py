"""One training step on 1 vs 8 (fake CPU) devices with the same global batch.

The step is `cll_jax.train.train_step`, jitted as in `train_and_evaluate`
(state replicated, batch sharded over a 1-D 'data' mesh, state donated).
Reported: the largest absolute difference of the parameters (and of the
power-iteration vectors) after `steps` steps on 1 device and on 8, and the
median step time of each. On one CPU the 8 "devices" share the same cores, so
the time ratio measures the partitioning and all-reduce overhead, not a
speed-up.

The device count must be fixed before JAX initialises, so `run` starts
`python -m benchmarks.data_parallel --worker` in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` and reads its JSON line.

Run: `python -m benchmarks.data_parallel [--tiny] [--repeats N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

NUM_DEVICES = 8


def _worker(tiny: bool, repeats: int, steps: int, seed: int) -> dict:
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  from benchmarks import fake_batch, time_calls  # pylint: disable=g-import-not-at-top
  from cll_jax import train  # pylint: disable=g-import-not-at-top
  from experiments import cifar10_4c3f  # pylint: disable=g-import-not-at-top

  if jax.device_count() < NUM_DEVICES:
    raise RuntimeError(f'need {NUM_DEVICES} devices, have {jax.device_count()}')
  config = cifar10_4c3f.get_config()
  input_shape = (32, 32, 3)
  if tiny:
    config.model.name = 'tiny_cnn'
    config.train.batch_size = 16
    config.data.augment.enabled = False  # compiles much faster
    input_shape = (8, 8, 3)
  model = train.create_model(config, 10)
  sched = train.loss_schedules(config, 390)
  batch = fake_batch(jax.random.PRNGKey(seed + 1), config.train.batch_size,
                     input_shape, 10)
  result = {'benchmark': 'data_parallel', 'model': config.model.name,
            'batch': config.train.batch_size, 'steps_compared': steps}
  finals = {}
  for n in (1, NUM_DEVICES):
    mesh = train.make_mesh(jax.devices()[:n])
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec('data'))
    step = jax.jit(
        functools.partial(train.train_step, config=config, sched=sched,
                          steps_per_epoch=390, rng=jax.random.PRNGKey(2)),
        in_shardings=(replicated, sharded),
        out_shardings=(replicated, replicated), donate_argnums=0)

    def fresh_state():
      state = train.create_train_state(config, model, jax.random.PRNGKey(seed),
                                       input_shape, 390)
      return jax.device_put(state, replicated)

    local_batch = jax.device_put(batch, sharded)
    state = fresh_state()
    for _ in range(steps):
      state, _ = step(state, local_batch)
    finals[n] = jax.device_get((state.params, state.power_iteration))
    holder = {'state': fresh_state()}

    def call():
      holder['state'], metrics = step(holder['state'], local_batch)
      return metrics

    timing = time_calls(call, repeats, warmup=2)
    for k, v in timing.items():
      result[f'{n}dev_{k}'] = v

  def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  result['max_abs_param_diff'] = max_diff(finals[1][0], finals[NUM_DEVICES][0])
  result['max_abs_power_iteration_diff'] = max_diff(finals[1][1],
                                                    finals[NUM_DEVICES][1])
  result['max_abs_param'] = max(float(np.max(np.abs(np.asarray(x))))
                                for x in jax.tree.leaves(finals[1][0]))
  result['time_ratio'] = (result[f'{NUM_DEVICES}dev_median_ms']
                          / result['1dev_median_ms'])
  return result


def run(tiny: bool = False, repeats: int = 10, steps: int = 3, seed: int = 0,
        verbose: bool = True) -> list[dict]:
  """Runs the comparison in a subprocess with 8 fake CPU devices."""
  env = dict(os.environ)
  flags = ' '.join(f for f in env.get('XLA_FLAGS', '').split()
                   if not f.startswith('--xla_force_host_platform_device'))
  env['XLA_FLAGS'] = (
      f'{flags} --xla_force_host_platform_device_count={NUM_DEVICES}').strip()
  env.setdefault('JAX_PLATFORMS', 'cpu')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, '-m', 'benchmarks.data_parallel', '--worker',
         '--repeats', str(repeats), '--steps', str(steps), '--seed', str(seed)]
  if tiny:
    cmd.append('--tiny')
  proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True,
                        text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f'data-parallel worker failed:\n{proc.stderr[-3000:]}')
  row = json.loads(proc.stdout.strip().splitlines()[-1])
  if verbose:
    print(f"1 device {row['1dev_median_ms']:.1f} ms, {NUM_DEVICES} devices "
          f"{row[f'{NUM_DEVICES}dev_median_ms']:.1f} ms (x"
          f"{row['time_ratio']:.2f}); max |param diff| after {steps} steps "
          f"{row['max_abs_param_diff']:.2e}", flush=True)
  return [row]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tiny', action='store_true')
  parser.add_argument('--worker', action='store_true')
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(_worker(args.tiny, args.repeats, args.steps, args.seed)))
  else:
    run(tiny=args.tiny, repeats=args.repeats, steps=args.steps,
        seed=args.seed)


if __name__ == '__main__':
  main()
