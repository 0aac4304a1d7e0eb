"""GloRo with a fixed temperature: CLL fig. D4c, supplement D.1; 4C3F, CIFAR-10.

GloRo's loss on logits scaled by s = 1 / T, L_GloRo(y; h(s f(x)))
(`config.loss.gloro_logit_scale`). Unlike CLL's calibrated scale, such a
scaling does not control slack: the paper finds that K^(h o f) = s K^(f)
and CRA hardly move with s, because training rescales f to compensate.
"""

from __future__ import annotations

from cll_jax import study
from experiments.studies import common

SCALES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def _member(scale: float) -> study.Member:
  return study.Member(name=f's{scale:g}', role='gloro',
                      overrides={'loss.gloro_logit_scale': scale},
                      params={'s': scale})


def report(results, output_dir: str) -> study.Report:
  records = common.sorted_by(results['members'], 's')
  table = common.sweep_table(records, ['s = 1/T'],
                             lambda r: [f"{r['params']['s']:g}"])
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.6))
  x = [r['params']['s'] for r in records]
  common.accuracy_axes(ax, x, records, 'logit scale s = 1/T', log_x=True)
  k_ax = ax.twinx()
  k_ax.plot(x, [r['lipschitz_hf'] for r in records], '^--',
            color=common.K_COLOUR, label='K^(h o f) = s K^(f)')
  k_ax.plot(x, [r['lipschitz_f'] for r in records], 'v:',
            color='tab:gray', label='K^(f)')
  k_ax.set_yscale('log')
  k_ax.set_ylabel('Lipschitz bound')
  common.joint_legend(ax, k_ax)
  ax.set_title('GloRo temperature (CLL fig. D4c)')
  figure = common.save_figure(fig, output_dir, 'gloro_temperature.png')
  hf = [r['lipschitz_hf'] for r in records]
  s = [r['params']['s'] for r in records]
  summary = {'lipschitz_hf_ratio_max_min': max(hf) / min(hf),
             'scale_ratio_max_min': max(s) / min(s),
             'cra_36': {f"{r['params']['s']:g}": study.cra_at(r, common.R36)
                        for r in records}}
  text = (table + f'\n\nK^(h o f) varies by a factor '
          f"{summary['lipschitz_hf_ratio_max_min']:.2f} while s varies by "
          f"{summary['scale_ratio_max_min']:g} (paper: K^(h o f) does not "
          'move).')
  return study.Report(text, summary, [figure])


STUDY = study.Study(
    name='gloro_temperature',
    title='GloRo with logits scaled by s = 1/T: K^(h o f) and CRA do not '
          'follow s (CLL fig. D4c; 4C3F, CIFAR-10)',
    bases={'gloro': common.CIFAR10_4C3F_GLORO},
    members=tuple(_member(s) for s in SCALES),
    report=report)
