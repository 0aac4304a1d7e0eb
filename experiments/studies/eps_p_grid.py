"""eps_train x slack p: CLL table D5, supplement D.1; 8C2F, Tiny-ImageNet.

A 5 x 5 grid of eps_train and p for CLL (the paper: seed 1). Its p is the
official code's p_code = 2 p of eq. 5 (`loss.p_convention='code'`, as in
`experiments/tinyimagenet_8c2f.py`): only then is K^(h o f) =
1 / sigma_eps(p) the table's (e.g. 10.6 at eps 0.5, p 0.01). The paper: a
larger margin with less slack can beat a smaller one on every metric
(eps 0.75, p 0.005 over eps 0.5, p 0.05).
"""

from __future__ import annotations

import math

from cll_jax import study
from experiments.studies import common

EPSILONS = (0.15, 0.25, 0.5, 0.75, 1.0)
P_CODE = (0.1, 0.05, 0.01, 0.005, 0.001)  # Rows, as in table D5.
# K^(h o f) of table D5 (rows P_CODE, columns EPSILONS; the p = 0.005 row is
# partly unreadable in the source: None).
PAPER_LIPSCHITZ_HF = (
    (19.6, 11.8, 5.9, 3.9, 2.9),
    (24.4, 14.7, 7.4, 4.9, 3.7),
    (35.3, 21.2, 10.6, 7.1, 5.3),
    (None, None, 12.0, None, None),
    (50.7, 30.4, 15.2, 10.1, 7.6),
)
METRICS = {
    'clean': ('clean accuracy %', lambda r: r['clean_accuracy'], True),
    'cra_36': ('CRA 36/255 %', lambda r: study.cra_at(r, common.R36), True),
    'cra_108': ('CRA 108/255 %', lambda r: study.cra_at(r, common.R108), True),
    'lipschitz_hf': ('K^(h o f)', lambda r: r['lipschitz_hf'], False),
}


def member_name(epsilon: float, p_code: float) -> str:
  return f'eps{epsilon:g}_p{p_code:g}'


def _member(epsilon: float, p_code: float) -> study.Member:
  return study.Member(
      name=member_name(epsilon, p_code), role='cll',
      overrides={'loss.epsilon': epsilon, 'loss.p_start': p_code,
                 'loss.p_end': p_code, 'loss.p_convention': 'code'},
      params={'epsilon': epsilon, 'p_code': p_code, 'p': p_code / 2})


def grids(records) -> dict[str, list[list[float | None]]]:
  """{metric: rows over P_CODE of values over EPSILONS} (None: missing)."""
  by_cell = {(r['params']['p_code'], r['params']['epsilon']): r
             for r in records}
  out = {}
  for name, (_, fn, _) in METRICS.items():
    out[name] = [[fn(by_cell[(p, e)]) if (p, e) in by_cell else None
                  for e in EPSILONS] for p in P_CODE]
  return out


def report(results, output_dir: str) -> study.Report:
  tables = grids(results['members'])
  parts = []
  for name, (title, _, is_fraction) in METRICS.items():
    rows = [[f'{p:g}'] + [common.percent(v) if is_fraction else
                          common.number(v, '.1f') for v in row]
            for p, row in zip(P_CODE, tables[name])]
    parts.append(f'**{title}** (rows p_code, columns eps_train)\n\n'
                 + common.markdown_table(
                     ['p_code \\ eps_train'] + [f'{e:g}' for e in EPSILONS],
                     rows))
  plt = common.pyplot()
  fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.6))
  for ax, (name, (title, _, is_fraction)) in zip(axes, METRICS.items()):
    grid = [[math.nan if v is None else (100 * v if is_fraction else v)
             for v in row] for row in tables[name]]
    ax.imshow(grid, cmap='viridis', aspect='auto')
    for i, row in enumerate(grid):
      for j, v in enumerate(row):
        if not math.isnan(v):
          ax.text(j, i, f'{v:.1f}', ha='center', va='center', fontsize=7,
                  color='white')
    ax.set_xticks(range(len(EPSILONS)), [f'{e:g}' for e in EPSILONS])
    ax.set_yticks(range(len(P_CODE)), [f'{p:g}' for p in P_CODE])
    ax.set_xlabel('eps_train')
    ax.set_ylabel('p_code')
    ax.set_title(title)
  figure = common.save_figure(fig, output_dir, 'eps_p_grid.png')
  summary = {'grids': tables, 'epsilons': list(EPSILONS),
             'p_code': list(P_CODE),
             'paper_lipschitz_hf': [list(r) for r in PAPER_LIPSCHITZ_HF]}
  return study.Report('\n\n'.join(parts), summary, [figure])


STUDY = study.Study(
    name='eps_p_grid',
    title='eps_train x slack p grid for CLL: clean, CRA 36/108, K^(h o f) '
          '(CLL table D5; 8C2F, Tiny-ImageNet)',
    bases={'cll': common.TINYIMAGENET_8C2F},
    members=tuple(_member(e, p) for p in P_CODE for e in EPSILONS),
    report=report)
