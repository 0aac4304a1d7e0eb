"""The margin offset delta: CLL fig. D4b, supplement D.1; 4C3F, CIFAR-10.

CLL's offset (canonically delta = eps = 0.15) as a free parameter, 11 values
in [0.1, 0.3]. The paper: robust accuracy grows with delta while clean
accuracy falls; delta = 0.2 reaches 62.0% CRA (+0.6) at 76.2% clean (-1.4).
"""

from __future__ import annotations

from cll_jax import study
from experiments.studies import common

DELTAS = tuple(round(0.1 + 0.02 * i, 2) for i in range(11))


def _member(delta: float) -> study.Member:
  return study.Member(name=f'delta{delta:.2f}', role='cll',
                      overrides={'loss.delta': delta}, params={'delta': delta})


def report(results, output_dir: str) -> study.Report:
  records = common.sorted_by(results['members'], 'delta')
  table = common.sweep_table(records, ['delta'],
                             lambda r: [f"{r['params']['delta']:.2f}"])
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.6))
  common.accuracy_axes(ax, [r['params']['delta'] for r in records], records,
                       'margin offset delta')
  epsilons = sorted({r['epsilon'] for r in records})
  for eps in epsilons:
    ax.axvline(eps, color='gray', ls=':', lw=1)
  ax.legend(fontsize=8)
  ax.set_title('delta (CLL fig. D4b; dotted: delta = eps)')
  figure = common.save_figure(fig, output_dir, 'delta.png')
  summary = {'cra_36': {f"{r['params']['delta']:.2f}":
                        study.cra_at(r, common.R36) for r in records},
             'clean': {f"{r['params']['delta']:.2f}": r['clean_accuracy']
                       for r in records},
             'paper': {'delta_0.2': {'cra_36': 0.620, 'clean': 0.762}}}
  return study.Report(table, summary, [figure])


STUDY = study.Study(
    name='delta',
    title='CLL margin offset delta in [0.1, 0.3] (CLL fig. D4b; 4C3F, '
          'CIFAR-10)',
    bases={'cll': common.CIFAR10_4C3F},
    members=tuple(_member(d) for d in DELTAS),
    report=report)
