"""Random seeds: CLL tables D6 / D8, supplement D.2.

N runs of one config that differ only in `config.seed` (initialisation, data
order, augmentation); per metric each seed's value and the mean +- the
sample standard deviation (ddof = 1). The default is CLL on 4C3F, CIFAR-10
(table D6, nine seeds: e.g. CRA 36/255 61.0 +- 0.2); `--base=<config>` runs
another, e.g. `experiments/tinyimagenet_8c2f.py` for table D8.
"""

from __future__ import annotations

import statistics

from cll_jax import study
from experiments.studies import common

# Nine seeds as in tables D6 / D8 (which number them 1-9); seed 0 is the
# base configs' own.
SEEDS = tuple(range(9))
METRICS = {
    'clean accuracy %': (lambda r: r['clean_accuracy'], 100.0),
    'CRA 36/255 %': (lambda r: study.cra_at(r, common.R36), 100.0),
    'CRA 72/255 %': (lambda r: study.cra_at(r, common.R72), 100.0),
    'CRA 108/255 %': (lambda r: study.cra_at(r, common.R108), 100.0),
    'K^(f)': (lambda r: r['lipschitz_f'], 1.0),
    'tightness %': (study.tightness_percent, 1.0),
}


def mean_std(xs) -> tuple[float | None, float | None]:
  """Mean and sample standard deviation (ddof 1; 0 for one value)."""
  xs = [x for x in xs if x is not None]
  if not xs:
    return None, None
  return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def report(results, output_dir: str) -> study.Report:
  records = common.sorted_by(results['members'], 'seed')
  rows, summary = [], {}
  for name, (fn, scale) in METRICS.items():
    vals = [fn(r) for r in records]
    mean, std = mean_std(vals)
    scaled = [None if v is None else scale * v for v in vals]
    summary[name] = {'values': scaled,
                     'mean': None if mean is None else scale * mean,
                     'std': None if std is None else scale * std}
    cells = [common.number(v, '.1f') for v in scaled]
    avg = ('n/a' if mean is None else
           f'{scale * mean:.1f} +- {scale * std:.1f}')
    rows.append([name] + cells + [avg])
  table = common.markdown_table(
      ['metric'] + [f"seed {r['params']['seed']}" for r in records]
      + ['mean +- std'], rows)
  plt = common.pyplot()
  fig, axes = plt.subplots(1, len(METRICS), figsize=(2.2 * len(METRICS), 3))
  for ax, (name, entry) in zip(axes, summary.items()):
    points = [v for v in entry['values'] if v is not None]
    ax.plot([0] * len(points), points, 'o', alpha=0.6)
    if entry['mean'] is not None:
      ax.errorbar([0.3], [entry['mean']], yerr=[entry['std']], fmt='s',
                  color='black', capsize=4)
    ax.set_xticks([])
    ax.set_xlim(-0.5, 0.8)
    ax.set_title(name, fontsize=8)
  figure = common.save_figure(fig, output_dir, 'seeds.png')
  summary['seeds'] = [r['params']['seed'] for r in records]
  return study.Report(table, summary, [figure])


STUDY = study.Study(
    name='seeds',
    title='one config under N random seeds: mean +- std per metric (CLL '
          'tables D6/D8; default CLL 4C3F, CIFAR-10)',
    bases={'cll': common.CIFAR10_4C3F},
    members=tuple(study.Member(f'seed{s}', 'cll', {'seed': s}, {'seed': s})
                  for s in SEEDS),
    report=report)
