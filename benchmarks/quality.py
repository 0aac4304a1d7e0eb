r"""Certified quality on real data, side by side, on offline CIFAR-10.

Comparisons (`--comparison`), each two losses on the same network and
schedule, through `cll_jax.train.train_and_evaluate`:

* `4c3f`: CLL (`experiments/cifar10_4c3f.py`, eps 0.15, p 0.15) vs GloRo
  (`experiments/cifar10_4c3f_gloro.py`), the paper's table 2 rows;
* `lipconv20`: CLL vs SOC's loss on LipConv-20
  (`experiments/cifar10_lipconv20.py:loss=cll|soc`), table 2's SOC rows;
* `cpl`, `sll`, `aol`, `sandwich`: CLL vs the family's own loss (CPL's
  hinge; the offset cross-entropy) on one network of the family, with the
  recipe of `experiments/cifar10_cpl_xl.py` / `cifar10_sll_xl.py` (the XL
  networks by default; `--model` picks another, e.g. `sll_s` or the CPU-sized
  `sll_tiny`).

Reported: clean accuracy, certified robust accuracy (CRA) at L2 radii
36/255, 72/255, 108/255 and 255/255, the bound K^(f) = max_ij K_ij (sound
bounds, `config.eval.bound`), K^(h o f) and the tightness K_lobo / K^(f)
(CLL supplement C, `cll_jax.attacks.empirical_lipschitz_lower_bound`).

  # The paper's schedule (800 / 200 epochs; for a GPU): the configs as they are.
  python -m benchmarks.quality [--comparison lipconv20]
  # A short schedule: E epochs, learning-rate decays and GloRo's eps ramp
  # scaled by E / (the config's epochs).
  python -m benchmarks.quality --epochs 20
  # Smoke test: a tiny network on 256 images, 1 epoch.
  python -m benchmarks.quality --tiny

Tightness defaults to the paper's 4000 pairs x 1000 Adam steps; lower them
with --tightness-pairs / --tightness-steps on a CPU. A rerun with the same
--workdir resumes training from its checkpoints. The table is printed; full
(non-tiny) runs also write results/quality/<comparison>_results.json (the
4c3f one as quality_results.json), which `python -m benchmarks.run` puts
into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from cll_jax import configs
from cll_jax import tightness as tightness_lib
from cll_jax import train
from experiments import cifar10_4c3f
from experiments import cifar10_4c3f_gloro
from experiments import cifar10_cpl_xl
from experiments import cifar10_lipconv20
from experiments import cifar10_sll_xl

# comparison -> method -> (config module, config argument, tiny model[,
# model]).
COMPARISONS = {
    '4c3f': {'cll': (cifar10_4c3f, '', 'tiny_cnn'),
             'gloro': (cifar10_4c3f_gloro, '', 'tiny_cnn')},
    'lipconv20': {'cll': (cifar10_lipconv20, 'loss=cll', 'lipconv_tiny'),
                  'soc': (cifar10_lipconv20, 'loss=soc', 'lipconv_tiny')},
    'cpl': {'cll': (cifar10_cpl_xl, 'loss=cll', 'cpl_tiny'),
            'cpl': (cifar10_cpl_xl, 'loss=cpl', 'cpl_tiny')},
    'sll': {'cll': (cifar10_sll_xl, 'loss=cll', 'sll_tiny'),
            'sll': (cifar10_sll_xl, 'loss=sll', 'sll_tiny')},
    # AOL and Sandwich on SLL's recipe (their own loss is SLL's).
    'aol': {'cll': (cifar10_sll_xl, 'loss=cll', 'aol_tiny', 'aol_small'),
            'aol': (cifar10_sll_xl, 'loss=sll', 'aol_tiny', 'aol_small')},
    'sandwich': {
        'cll': (cifar10_sll_xl, 'loss=cll', 'sandwich_tiny', 'sandwich_s'),
        'sandwich': (cifar10_sll_xl, 'loss=sll', 'sandwich_tiny',
                     'sandwich_s')},
}
METHODS = COMPARISONS['4c3f']
RADII = configs.DEFAULT_RADII + (1.0,)  # 36, 72, 108 and 255 / 255.
PAPER_EPOCHS = 800
RESULTS_JSON = 'quality_results.json'
RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'results', 'quality')
# Where full (non-tiny) runs leave their rows for `benchmarks.run`.
REPO_RESULTS = os.path.join(RESULTS_DIR, RESULTS_JSON)


def results_name(comparison: str) -> str:
  return RESULTS_JSON if comparison == '4c3f' else (
      f'{comparison}_results.json')


def make_config(method: str, epochs: int | None, tiny: bool,
                comparison: str = '4c3f', model: str | None = None,
                train_examples: int | None = None):
  """The method's offline config, optionally on a shortened schedule."""
  module, arg, tiny_model, *network = COMPARISONS[comparison][method]
  config = module.get_config(','.join(filter(None, (
      'data=offline', arg, 'tiny' if tiny else None))))
  config.eval.radii = RADII
  config.train.progress_bar = False
  if network and not tiny:
    config.model.name = network[0]
  if model:
    config.model.name = model
  if train_examples:
    config.data.num_train_examples = train_examples
  if tiny:
    config.model.name = model or tiny_model
    config.train.num_epochs = 1
    config.train.eval_every_epochs = 1
    config.data.num_train_examples = 256
    config.data.num_test_examples = 96
    config.eval.batch_size = 48
    config.train.batch_size = 32
    config.optimizer.decay_epochs = ()
    config.loss.epsilon_schedule_epochs = 1
    config.data.augment.enabled = False
    return config
  if epochs is not None and epochs != config.train.num_epochs:
    configs.shorten_schedule(config, epochs)
    config.train.eval_every_epochs = epochs
  return config


def tightness(config, workdir: str, upper: float, pairs: int, steps: int,
              seed: int = 0) -> dict:
  """K_lobo on `pairs` training pairs x `steps` Adam steps, and K_lobo/K^f."""
  row = tightness_lib.measure_tightness(config, workdir, upper, pairs=pairs,
                                        steps=steps, seed=seed)
  return {k: row[k] for k in ('lipschitz_lower', 'tightness',
                              'tightness_pairs', 'tightness_steps',
                              'tightness_seconds')}


def run_method(method: str, workdir: str, epochs: int | None, tiny: bool,
               tightness_pairs: int, tightness_steps: int,
               comparison: str = '4c3f', model: str | None = None,
               train_examples: int | None = None) -> dict:
  config = make_config(method, epochs, tiny, comparison, model,
                       train_examples)
  start = time.time()
  final = train.train_and_evaluate(config, os.path.join(workdir, method))
  seconds = time.time() - start
  row = {'benchmark': 'quality', 'comparison': comparison, 'method': method,
         'model': config.model.name, 'epochs': config.train.num_epochs,
         'train_examples': config.data.get('num_train_examples') or 50000,
         'epsilon': config.loss.epsilon,
         'p': config.loss.p_end if config.loss.name == 'cll' else None,
         'loss': config.loss.name,
         'bound': config.eval.bound,
         'clean_accuracy': final['test_accuracy'],
         'lipschitz_f': final['lipschitz_f'],
         'lipschitz_hf': final['lipschitz_hf'],
         'train_eval_seconds': seconds}
  for radius, name in zip(RADII, train.radius_names(RADII)):
    row[f'cra_{round(radius * 255)}'] = final[f'test_{name}']
  if tightness_pairs > 0 and tightness_steps >= 0:
    row.update(tightness(config, os.path.join(workdir, method),
                         final['lipschitz_f'], tightness_pairs,
                         tightness_steps))
  return row


def run(tiny: bool = False, epochs: int | None = None,
        workdir: str = '/tmp/cll_jax_quality', tightness_pairs: int = 4000,
        tightness_steps: int = 1000, methods=None,
        verbose: bool = True, comparison: str = '4c3f',
        model: str | None = None,
        train_examples: int | None = None) -> list[dict]:
  """Trains and evaluates every method; returns one row per method."""
  if comparison not in COMPARISONS:
    raise ValueError(f'comparison must be one of {sorted(COMPARISONS)}, got '
                     f'{comparison!r}')
  methods = tuple(methods or COMPARISONS[comparison])
  if tiny:
    tightness_pairs, tightness_steps = min(tightness_pairs, 4), min(
        tightness_steps, 2)
  if comparison != '4c3f':
    workdir = os.path.join(workdir, comparison)
  rows = [run_method(m, workdir, epochs, tiny, tightness_pairs,
                     tightness_steps, comparison, model, train_examples)
          for m in methods]
  os.makedirs(workdir, exist_ok=True)
  paths = [os.path.join(workdir, results_name(comparison))]
  if not tiny:
    paths.append(os.path.join(RESULTS_DIR, results_name(comparison)))
  for path in paths:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      json.dump(rows, f, indent=1)
  if verbose:
    print(markdown_table(rows), flush=True)
  return rows


def markdown_table(rows: list[dict]) -> str:
  head = ('| method | model | epochs | clean | CRA 36 | CRA 72 | CRA 108 | '
          'CRA 255 | K^(f) | K^(h o f) | K_lobo | tightness | train+eval s |')
  lines = [head, '|' + '---|' * 13]
  for r in rows:
    lob = (f"{r['lipschitz_lower']:.3f} ({r['tightness_pairs']}x"
           f"{r['tightness_steps']})" if 'lipschitz_lower' in r else 'n/a')
    tight = f"{r['tightness']:.3f}" if 'tightness' in r else 'n/a'
    lines.append(
        f"| {r['method']} | {r['model']} | {r['epochs']} | "
        f"{r['clean_accuracy']:.4f} | {r['cra_36']:.4f} | {r['cra_72']:.4f} | "
        f"{r['cra_108']:.4f} | {r['cra_255']:.4f} | {r['lipschitz_f']:.3f} | "
        f"{r['lipschitz_hf']:.3f} | {lob} | {tight} | "
        f"{r['train_eval_seconds']:.0f} |")
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tiny', action='store_true')
  parser.add_argument('--epochs', type=int, default=None,
                      help='short schedule (default: the configs, 800)')
  parser.add_argument('--workdir', default='/tmp/cll_jax_quality')
  parser.add_argument('--tightness-pairs', type=int, default=4000)
  parser.add_argument('--tightness-steps', type=int, default=1000)
  parser.add_argument('--comparison', default='4c3f',
                      choices=sorted(COMPARISONS))
  parser.add_argument('--methods', default=None,
                      help='comma-separated subset (default: all)')
  parser.add_argument('--model', default=None,
                      help="another network for every method, e.g. 'sll_s'")
  parser.add_argument('--train-examples', type=int, default=None,
                      help='train on the first N images only')
  args = parser.parse_args()
  run(tiny=args.tiny, epochs=args.epochs, workdir=args.workdir,
      tightness_pairs=args.tightness_pairs,
      tightness_steps=args.tightness_steps,
      methods=args.methods.split(',') if args.methods else None,
      comparison=args.comparison, model=args.model,
      train_examples=args.train_examples)


if __name__ == '__main__':
  main()
