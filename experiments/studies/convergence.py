"""Convergence: CLL fig. D1, supplement D.1; 4C3F, CIFAR-10.

CRA over the training epochs, CLL against GloRo, both at a fixed eps = 0.15
(GloRo without its eps ramp, for a fair comparison, as in the paper). The
paper: CLL converges faster and less noisily. The curves are read from each
member's `metrics.jsonl`; evaluation runs about 40 times per schedule
(every epoch for schedules up to 40 epochs).
"""

from __future__ import annotations

from cll_jax import study
from experiments.studies import common

EVALUATIONS = 40  # Test evaluations per schedule (at most one per epoch).
FRACTIONS = (0.9, 0.95)  # "Epochs to reach this fraction of the final CRA".


def adjust(config) -> None:
  config.train.eval_every_epochs = max(
      1, config.train.num_epochs // EVALUATIONS)


def curve(record, radius: float):
  """(epochs, test CRA at radius) of a member's evaluations."""
  key = f'{radius:.4f}'
  points = [(h['epoch'], h['test_cra'][key]) for h in record['history']
            if 'test_cra' in h and key in h['test_cra']]
  return [p[0] for p in points], [p[1] for p in points]


def epochs_to_reach(epochs, cra, fraction: float) -> int | None:
  """The first evaluated epoch with CRA >= fraction x the final CRA."""
  if not cra:
    return None
  target = fraction * cra[-1]
  return next(e for e, c in zip(epochs, cra) if c >= target)


def report(results, output_dir: str) -> study.Report:
  records = {r['params']['method']: r for r in results['members']}
  curves = {m: curve(r, common.R36) for m, r in records.items()}
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  for method, r in records.items():
    colour = common.METHOD_COLOURS[method]
    label = common.METHOD_LABELS[method]
    epochs, cra = curves[method]
    ax.plot(epochs, [100 * c for c in cra], 'o-', color=colour, ms=3,
            label=f'{label}, test CRA 36/255')
    train_points = [(h['epoch'], h['train_cra_train_eps'])
                    for h in r['history']
                    if h.get('train_cra_train_eps') is not None]
    ax.plot([p[0] for p in train_points], [100 * p[1] for p in train_points],
            '--', color=colour, lw=1,
            label=f'{label}, train CRA at eps_train (running)')
  ax.set_xlabel('epoch')
  ax.set_ylabel('CRA (%)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  ax.set_title('Convergence (CLL fig. D1)')
  figure = common.save_figure(fig, output_dir, 'convergence.png')

  all_epochs = sorted({e for epochs, _ in curves.values() for e in epochs})
  step = max(1, len(all_epochs) // 20)
  shown = sorted(set(all_epochs[::step]) | set(all_epochs[-1:]))
  methods = list(records)
  rows = []
  for epoch in shown:
    row = [str(epoch)]
    for m in methods:
      epochs, cra = curves[m]
      row.append(common.percent(cra[epochs.index(epoch)])
                 if epoch in epochs else 'n/a')
    rows.append(row)
  table = common.markdown_table(
      ['epoch'] + [f'{common.METHOD_LABELS[m]} CRA 36 %' for m in methods],
      rows)
  reach = {m: {f'{f:g}': epochs_to_reach(*curves[m], f) for f in FRACTIONS}
           for m in methods}
  lines = [f'* {common.METHOD_LABELS[m]}: final CRA 36/255 '
           f'{common.percent(curves[m][1][-1] if curves[m][1] else None)}%; '
           + ', '.join(f'{100 * f:g}% of it first at epoch {reach[m][f"{f:g}"]}'
                       for f in FRACTIONS) for m in methods]
  summary = {'curves': {m: {'epochs': curves[m][0], 'cra_36': curves[m][1]}
                        for m in methods},
             'epochs_to_reach_fraction_of_final': reach}
  return study.Report(table + '\n\n' + '\n'.join(lines), summary, [figure])


STUDY = study.Study(
    name='convergence',
    title='CRA over training epochs, CLL vs GloRo at a fixed eps (CLL fig. '
          'D1; 4C3F, CIFAR-10)',
    bases={'cll': common.CIFAR10_4C3F, 'gloro': common.CIFAR10_4C3F_GLORO},
    members=(
        study.Member('cll', 'cll', {}, {'method': 'cll'}),
        study.Member('gloro_fixed_eps', 'gloro',
                     {'loss.epsilon_schedule': 'fixed'}, {'method': 'gloro'})),
    report=report, adjust=adjust)
