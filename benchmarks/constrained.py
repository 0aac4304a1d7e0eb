"""Training-step time and memory of constrained networks beside 4C3F.

Each row is the real `train.train_step` (CLL loss, jitted, state donated,
no augmentation) of one network on CIFAR-10 shapes (32x32x3, 10 classes) at
batch 128:

* `4c3f`: the unconstrained reference (5 power iterations per layer);
* `lipconv10`, `lipconv20`: SOC LipConv-n (Householder activations, 6 series
  terms in training, dense head), the CLL paper's constrained rows;
* `family_<name>` (`--families`): one network per 1-Lipschitz layer family
  (SOC, CPL, SLL, AOL, Sandwich) at matched depth and width: the input
  zero-padded (or, for AOL and Sandwich, mapped by the first layer) to
  `FAMILY_WIDTH` channels, `FAMILY_DEPTH` 3x3 convs of the family at
  32x32, a scaled sum-pool by 4 (norm 1) and a dense head; MaxMin after
  SOC and AOL convs (CPL, SLL and Sandwich have their ReLU inside).

Memory is XLA's own accounting of the compiled step
(`compiled.memory_analysis()`: arguments + outputs + temporaries, the peak
device memory the step needs; on a GPU the same figure bounds its
footprint), not the process size.

Run: `python -m benchmarks.constrained [--tiny] [--repeats N] [--models a,b]
[--families]`.
"""

from __future__ import annotations

import argparse

import jax

from benchmarks import fake_batch, time_calls
from benchmarks.train_step import train_step_fn
from cll_jax import models
from cll_jax import train
from cll_jax.layers import orthogonal
from cll_jax.layers import soc
from experiments import cifar10_4c3f
from experiments import cifar10_lipconv20

# name -> (config module, argument, tiny model)
NETWORKS = {
    '4c3f': (cifar10_4c3f, '', 'tiny_cnn'),
    'lipconv10': (cifar10_lipconv20, 'depth=10', 'lipconv_tiny'),
    'lipconv20': (cifar10_lipconv20, 'depth=20', 'lipconv_tiny'),
}


FAMILY_DEPTH = 8
FAMILY_WIDTH = 64
FAMILIES = ('soc', 'cpl', 'sll', 'aol', 'sandwich')


def family_body(family: str, depth: int, width: int):
  """`depth` 3x3 convs of `family` at `width` channels, pooled by 4."""
  from cll_jax.layers import aol, cpl, sandwich, sll  # pylint: disable=g-import-not-at-top
  pad = (orthogonal.PadChannels(width),)
  convs = {
      'soc': lambda: pad + tuple(soc.SOCConvSpec(width) for _ in range(depth)),
      'cpl': lambda: pad + tuple(cpl.CPLConvSpec(width) for _ in range(depth)),
      'sll': lambda: pad + tuple(sll.SLLConvSpec(width) for _ in range(depth)),
      'aol': lambda: tuple(aol.AOLConvSpec(width) for _ in range(depth)),
      'sandwich': lambda: tuple(sandwich.SandwichConvSpec(width)
                                for _ in range(depth)),
  }[family]()
  return convs + (orthogonal.ScaledSumPool(4),)


def family_model(family: str, tiny: bool) -> models.LipschitzNetwork:
  depth, width = (2, 8) if tiny else (FAMILY_DEPTH, FAMILY_WIDTH)
  return models.LipschitzNetwork(family_body(family, depth, width), 10,
                                 activation='minmax', num_power_iterations=1)


def make_config(name: str, tiny: bool):
  if name.startswith('family_'):
    return make_config('4c3f', tiny)  # the 4C3F CLL recipe, another body
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


def run(tiny: bool = False, repeats: int = 5, networks=None, seed: int = 0,
        verbose: bool = True) -> list[dict]:
  """Times every network's step; returns one row per network."""
  rows = []
  input_shape = (32, 32, 3)
  for name in networks or NETWORKS:
    config = make_config(name, tiny)
    if name.startswith('family_'):
      model = family_model(name[len('family_'):], tiny)
    else:
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
               model=(name if name.startswith('family_')
                      else config.model.name),
               batch=config.train.batch_size,
               parameters=int(params), layers=len(model.architecture) + 1,
               **timing, **{f'memory_{k}_bytes': v
                            for k, v in memory_bytes(compiled).items()})
    rows.append(row)
    if verbose:
      peak = row.get('memory_peak_bytes', 0) / 2**20
      print(f"{name:16s} median {row['median_ms']:9.1f} ms  "
            f"(min {row['min_ms']:.1f})  peak {peak:8.1f} MiB  "
            f"{params / 1e6:.2f} M params", flush=True)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tiny', action='store_true')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--models', default=None,
                      help=f'comma-separated subset of {sorted(NETWORKS)}')
  parser.add_argument('--families', action='store_true',
                      help=f'add the matched family networks {FAMILIES}')
  args = parser.parse_args()
  networks = args.models.split(',') if args.models else list(NETWORKS)
  if args.families:
    networks += [f'family_{f}' for f in FAMILIES]
  run(tiny=args.tiny, repeats=args.repeats, networks=networks)


if __name__ == '__main__':
  main()
