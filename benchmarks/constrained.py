"""Training-step time and memory of constrained networks beside 4C3F.

Each row is the real `train.train_step` (CLL loss, jitted, state donated,
no augmentation) of one network on CIFAR-10 shapes (32x32x3, 10 classes) at
batch 128:

* `4c3f`: the unconstrained reference (5 power iterations per layer);
* `lipconv10`, `lipconv20`: SOC LipConv-n (Householder activations, 6 series
  terms in training, dense head), the CLL paper's constrained rows.

Memory is XLA's own accounting of the compiled step
(`compiled.memory_analysis()`: arguments + outputs + temporaries, the peak
device memory the step needs; on a GPU the same figure bounds its
footprint), not the process size.

Run: `python -m benchmarks.constrained [--tiny] [--repeats N] [--models a,b]`.
"""

from __future__ import annotations

import argparse

import jax

from benchmarks import fake_batch, time_calls
from benchmarks.train_step import train_step_fn
from cll_jax import train
from experiments import cifar10_4c3f
from experiments import cifar10_lipconv20

# name -> (config module, argument, tiny model)
NETWORKS = {
    '4c3f': (cifar10_4c3f, '', 'tiny_cnn'),
    'lipconv10': (cifar10_lipconv20, 'depth=10', 'lipconv_tiny'),
    'lipconv20': (cifar10_lipconv20, 'depth=20', 'lipconv_tiny'),
}


def make_config(name: str, tiny: bool):
  module, arg, tiny_model = NETWORKS[name]
  config = module.get_config(arg or None)
  config.data.augment.enabled = False
  config.train.batch_size = 128
  if tiny:
    config.model.name = tiny_model
    config.train.batch_size = 8
  return config


def memory_bytes(compiled) -> dict[str, int]:
  """XLA's memory accounting of a compiled step (bytes)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  out = {k: int(getattr(stats, f'{k}_size_in_bytes', 0))
         for k in ('argument', 'output', 'temp', 'alias')}
  out['peak'] = out['argument'] + out['output'] + out['temp'] - out['alias']
  return out


def run(tiny: bool = False, repeats: int = 5, models=None, seed: int = 0,
        verbose: bool = True) -> list[dict]:
  """Times every network's step; returns one row per network."""
  rows = []
  input_shape = (32, 32, 3)
  for name in models or NETWORKS:
    config = make_config(name, tiny)
    model = train.create_model(config, 10)
    state = train.create_train_state(config, model, jax.random.PRNGKey(seed),
                                     input_shape, 390)
    batch = fake_batch(jax.random.PRNGKey(seed + 1), config.train.batch_size,
                       input_shape, 10)
    step = train_step_fn(config)
    compiled = step.lower(state, batch).compile()
    holder = {'state': state}

    def call(compiled=compiled, holder=holder, batch=batch):
      holder['state'], metrics = compiled(holder['state'], batch)
      return metrics

    timing = time_calls(call, repeats, warmup=1)
    params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    row = dict(benchmark='constrained_step', network=name,
               model=config.model.name, batch=config.train.batch_size,
               parameters=int(params), layers=len(model.architecture) + 1,
               **timing, **{f'memory_{k}_bytes': v
                            for k, v in memory_bytes(compiled).items()})
    rows.append(row)
    if verbose:
      peak = row.get('memory_peak_bytes', 0) / 2**20
      print(f"{name:10s} median {row['median_ms']:9.1f} ms  "
            f"(min {row['min_ms']:.1f})  peak {peak:8.1f} MiB  "
            f"{params / 1e6:.2f} M params", flush=True)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tiny', action='store_true')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--models', default=None,
                      help=f'comma-separated subset of {sorted(NETWORKS)}')
  args = parser.parse_args()
  run(tiny=args.tiny, repeats=args.repeats,
      models=args.models.split(',') if args.models else None)


if __name__ == '__main__':
  main()
