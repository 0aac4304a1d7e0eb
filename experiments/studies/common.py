"""What the study reports share: CRA radii, number formats, tables, figures."""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

from cll_jax import study

# The paper's CRA radii (tables 1-2).
R36, R72, R108 = 36 / 255, 72 / 255, 108 / 255
CIFAR10_4C3F = 'experiments/cifar10_4c3f.py'
CIFAR10_4C3F_GLORO = 'experiments/cifar10_4c3f_gloro.py'
TINYIMAGENET_8C2F = 'experiments/tinyimagenet_8c2f.py'
# Colours of the paper's figures: clean accuracy green, CRA blue.
CLEAN_COLOUR, CRA_COLOUR, K_COLOUR = 'tab:green', 'tab:blue', 'tab:orange'
METHOD_COLOURS = {'cll': 'tab:blue', 'gloro': 'tab:red'}
METHOD_LABELS = {'cll': 'CLL', 'gloro': 'GloRo'}


def percent(x: float | None, digits: int = 1) -> str:
  """A fraction as percent ('n/a' for None)."""
  return 'n/a' if x is None else f'{100 * x:.{digits}f}'


def number(x: float | None, fmt: str = '.3g') -> str:
  return 'n/a' if x is None else format(x, fmt)


def tightness_cell(record: Mapping[str, Any]) -> str:
  t = study.tightness_percent(record)
  return 'n/a' if t is None else f'{t:.1f}'


def markdown_table(headers: Sequence[str],
                   rows: Iterable[Sequence[str]]) -> str:
  lines = ['| ' + ' | '.join(headers) + ' |',
           '|' + '---|' * len(headers)]
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def standard_columns(record: Mapping[str, Any]) -> list[str]:
  """clean, CRA 36/72/108, CRA at eps_train, K^(f), K^(h o f), tightness."""
  return [percent(record['clean_accuracy']),
          percent(study.cra_at(record, R36)),
          percent(study.cra_at(record, R72)),
          percent(study.cra_at(record, R108)),
          percent(record['cra_train_eps']),
          number(record['lipschitz_f']), number(record['lipschitz_hf']),
          tightness_cell(record)]


STANDARD_HEADERS = ['clean %', 'CRA 36 %', 'CRA 72 %', 'CRA 108 %',
                    'CRA eps_train %', 'K^(f)', 'K^(h o f)', 'tightness %']


def sweep_table(records: Sequence[Mapping[str, Any]],
                param_headers: Sequence[str],
                params: Callable[[Mapping[str, Any]], Sequence[str]]) -> str:
  """One row per member: its swept values, then the standard columns."""
  return markdown_table(
      list(param_headers) + STANDARD_HEADERS,
      [list(params(r)) + standard_columns(r) for r in records])


def sorted_by(records, key: str) -> list[Mapping[str, Any]]:
  return sorted(records, key=lambda r: r['params'][key])


def values(records, fn: Callable[[Mapping[str, Any]], float | None]):
  """fn of every record, NaN where it is None (gaps in a plotted line)."""
  out = []
  for r in records:
    v = fn(r)
    out.append(math.nan if v is None else v)
  return out


def pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_figure(fig, output_dir: str, name: str) -> str:
  """Saves `fig` as `output_dir/name` (atomically) and returns `name`."""
  plt = pyplot()
  fig.tight_layout()
  path = os.path.join(output_dir, name)
  tmp = os.path.join(output_dir, '.tmp_' + name)
  fig.savefig(tmp, dpi=120, format=os.path.splitext(name)[1][1:])
  plt.close(fig)
  os.replace(tmp, path)
  return name


def accuracy_axes(ax, x, records, xlabel: str, *, log_x: bool = False):
  """Clean accuracy (green) and CRA at 36/255 (blue) against x, in percent."""
  ax.plot(x, [100 * v for v in values(records, lambda r: r['clean_accuracy'])],
          'o-', color=CLEAN_COLOUR, label='clean accuracy')
  ax.plot(x, [100 * v for v in values(records, lambda r: study.cra_at(r, R36))],
          's-', color=CRA_COLOUR, label='CRA 36/255')
  ax.set_xlabel(xlabel)
  ax.set_ylabel('accuracy (%)')
  if log_x:
    ax.set_xscale('log')
  ax.grid(alpha=0.3)
  return ax


def joint_legend(ax, twin, **kwargs) -> None:
  """One legend on `ax` for the lines of `ax` and its twin axes."""
  lines, labels = ax.get_legend_handles_labels()
  twin_lines, twin_labels = twin.get_legend_handles_labels()
  ax.legend(lines + twin_lines, labels + twin_labels, fontsize=8, **kwargs)
