"""Slack: CLL fig. 5 (left), sec. 4.3; 4C3F on CIFAR-10.

The calibration probability p of CLL trades clean accuracy for CRA: in the
paper clean accuracy falls from 80% to 68% as p grows over [0.01, 0.8], and
CRA (36/255) peaks at p = 0.4 with 61.9%. Values up to 0.8 are the official
code's p_code = 2 p of eq. 5 (`loss.p_convention='code'`); the table also
gives p of eq. 5. K^(h o f) = 1 / sigma_eps(p) falls as p grows (sec. 3.3).
"""

from __future__ import annotations

from cll_jax import study
from experiments.studies import common

P_CODE = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def _member(p_code: float) -> study.Member:
  return study.Member(
      name=f'p_code{p_code:g}', role='cll',
      overrides={'loss.p_start': p_code, 'loss.p_end': p_code,
                 'loss.p_convention': 'code'},
      params={'p_code': p_code, 'p': p_code / 2})


def report(results, output_dir: str) -> study.Report:
  records = common.sorted_by(results['members'], 'p_code')
  table = common.sweep_table(
      records, ['p_code', 'p (eq. 5)'],
      lambda r: [f"{r['params']['p_code']:g}", f"{r['params']['p']:g}"])
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.6))
  x = [r['params']['p_code'] for r in records]
  common.accuracy_axes(ax, x, records, 'slack p_code (= 2 p of eq. 5)')
  k_ax = ax.twinx()
  k_ax.plot(x, [r['lipschitz_hf'] for r in records], '^--',
            color=common.K_COLOUR, label='K^(h o f)')
  k_ax.set_ylabel('K^(h o f)')
  k_ax.set_yscale('log')
  common.joint_legend(ax, k_ax, loc='lower left')
  ax.set_title('Slack (CLL fig. 5 left)')
  figure = common.save_figure(fig, output_dir, 'slack.png')
  cra = [(study.cra_at(r, common.R36), r['params']['p_code'])
         for r in records if study.cra_at(r, common.R36) is not None]
  best = max(cra) if cra else (None, None)
  summary = {
      'peak_cra_36': best[0], 'peak_p_code': best[1],
      'clean_at_smallest_p': records[0]['clean_accuracy'],
      'clean_at_largest_p': records[-1]['clean_accuracy'],
      'paper': {'clean_range': [0.80, 0.68], 'peak_cra_36': 0.619,
                'peak_p_code': 0.4},
  }
  text = (table + '\n\nPeak CRA 36/255: '
          f"{common.percent(best[0])}% at p_code = {best[1]} "
          '(paper: 61.9% at 0.4); clean accuracy '
          f"{common.percent(records[0]['clean_accuracy'])}% at p_code = "
          f"{records[0]['params']['p_code']:g} -> "
          f"{common.percent(records[-1]['clean_accuracy'])}% at "
          f"{records[-1]['params']['p_code']:g} (paper: 80% -> 68% over "
          '0.01 ... 0.8).')
  return study.Report(text, summary, [figure])


STUDY = study.Study(
    name='slack',
    title='slack p trades clean accuracy for CRA (CLL fig. 5 left; 4C3F, '
          'CIFAR-10)',
    bases={'cll': common.CIFAR10_4C3F},
    members=tuple(_member(p) for p in P_CODE),
    report=report)
