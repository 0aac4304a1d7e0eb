"""The regulariser lambda K^2: CLL fig. D4a, supplement D.1; 4C3F, CIFAR-10.

lambda of eq. 3 from 1e-15 to 1e-1. The paper finds CRA insensitive to
lambda over a wide range (1e-10 <= lambda <= 1e-4 state of the art), with
drops for lambda >= 1e-3 and <= 1e-11, and K^(f) rising exponentially as
lambda falls.
"""

from __future__ import annotations

from cll_jax import study
from experiments.studies import common

LAMBDAS = (1e-15, 1e-13, 1e-11, 1e-10, 1e-9, 1e-7, 1e-5, 1e-4, 1e-3, 1e-2,
           1e-1)


def _member(lam: float) -> study.Member:
  return study.Member(name=f'lambda{lam:.0e}', role='cll',
                      overrides={'loss.lam': lam}, params={'lambda': lam})


def report(results, output_dir: str) -> study.Report:
  records = common.sorted_by(results['members'], 'lambda')
  table = common.sweep_table(records, ['lambda'],
                             lambda r: [f"{r['params']['lambda']:.0e}"])
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.6))
  x = [r['params']['lambda'] for r in records]
  ax.plot(x, [100 * v for v in common.values(
      records, lambda r: study.cra_at(r, common.R36))], 's-',
          color=common.CRA_COLOUR, label='CRA 36/255')
  ax.set_xscale('log')
  ax.set_xlabel('lambda')
  ax.set_ylabel('CRA 36/255 (%)', color=common.CRA_COLOUR)
  ax.grid(alpha=0.3)
  k_ax = ax.twinx()
  k_ax.plot(x, [r['lipschitz_f'] for r in records], 'o--',
            color=common.CLEAN_COLOUR, label='K^(f)')
  k_ax.set_yscale('log')
  k_ax.set_ylabel('K^(f)', color=common.CLEAN_COLOUR)
  ax.set_title('lambda (CLL fig. D4a)')
  figure = common.save_figure(fig, output_dir, 'lambda.png')
  summary = {'cra_36': {f"{r['params']['lambda']:.0e}":
                        study.cra_at(r, common.R36) for r in records},
             'lipschitz_f': {f"{r['params']['lambda']:.0e}": r['lipschitz_f']
                             for r in records},
             'paper': {'insensitive_range': [1e-10, 1e-4]}}
  return study.Report(table, summary, [figure])


STUDY = study.Study(
    name='lambda',
    title='CRA and K^(f) against the regulariser lambda (CLL fig. D4a; 4C3F, '
          'CIFAR-10)',
    bases={'cll': common.CIFAR10_4C3F},
    members=tuple(_member(lam) for lam in LAMBDAS),
    report=report)
