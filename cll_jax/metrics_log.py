"""The run's metric log: `metrics.jsonl`, TensorBoard events, `curves.png`.

One JSON record per evaluation point (epoch end), keyed by the global step.
A resumed run first drops the records past the step it resumes from (written
by the killed run after its last checkpoint), so the log never holds two
records of one step; TensorBoard events are purged the same way
(`purge_step`).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import jax
import numpy as np

METRICS_FILE = 'metrics.jsonl'


def to_python(v):
  """Arrays and numpy scalars -> floats/lists (JSON-ready)."""
  if isinstance(v, (list, tuple)):
    return [to_python(x) for x in v]
  if isinstance(v, (np.ndarray, jax.Array, np.generic)):
    return v.tolist() if np.ndim(v) else v.item()
  return v


def read_records(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue  # A line cut short by a kill: its epoch is rerun.
  return records


def write_records(workdir: str, records: list[dict[str, Any]]) -> None:
  """Replaces the log with `records`, atomically."""
  os.makedirs(workdir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=workdir, prefix=f'.{METRICS_FILE}.')
  try:
    with os.fdopen(fd, 'w') as f:
      for r in records:
        f.write(json.dumps(r) + '\n')
    os.replace(tmp, os.path.join(workdir, METRICS_FILE))
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def truncate_after(workdir: str, step: int) -> int:
  """Drops records with step > `step` (and lines cut short by a kill).

  Returns:
    How many records were dropped.
  """
  if not os.path.exists(os.path.join(workdir, METRICS_FILE)):
    return 0
  records = read_records(workdir)
  keep = [r for r in records if r.get('step', 0) <= step]
  write_records(workdir, keep)
  return len(records) - len(keep)


def replace_record(workdir: str, record: dict[str, Any]) -> None:
  """Replaces the record of `record['step']` (or appends it)."""
  record = {k: to_python(v) for k, v in record.items()}
  records = [r for r in read_records(workdir)
             if r.get('step') != record['step']]
  write_records(workdir, sorted(records + [record],
                                key=lambda r: r.get('step', 0)))


class MetricWriter:
  """JSON lines plus TensorBoard events, written by process 0 only.

  Args:
    workdir: the run folder.
    resume_step: the step the run (re)starts from; records and events past
      it are removed first.
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    self._active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if not self._active:
      return
    os.makedirs(workdir, exist_ok=True)
    truncate_after(workdir, resume_step)
    self._jsonl = open(os.path.join(workdir, METRICS_FILE), 'a')
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    except ImportError:  # TensorBoard events are optional.
      return
    # Events of steps after `resume_step` came from the killed run.
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'),
                             purge_step=resume_step + 1)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self._active:
      return
    record = {'step': int(step),
              **{k: to_python(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    os.fsync(self._jsonl.fileno())
    if self._tb is not None:
      for k, v in record.items():
        if isinstance(v, (int, float)) and k != 'step':
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def plot_curves(workdir: str) -> None:
  """Saves `curves.png`: loss, clean accuracy and CRA per radius vs epoch.

  Records may carry different metric sets (a resume with other evaluation
  radii): every series is drawn over the records that have it.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = [r for r in read_records(workdir) if 'epoch' in r]
  if not rows:
    return

  def series(key):
    points = [(r['epoch'], r[key]) for r in rows
              if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]

  fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
  epochs, loss = series('train_loss')
  if any(v > 0 for v in loss):
    axes[0].set_yscale('log')
  axes[0].plot(epochs, loss)
  axes[0].set_title('train loss')
  axes[1].plot(*series('train_accuracy'), label='train')
  if any('test_accuracy' in r for r in rows):
    axes[1].plot(*series('test_accuracy'), 'o-', label='test')
  axes[1].set_title('clean accuracy')
  axes[1].legend()
  cra_keys = sorted({k for r in rows for k in r if k.startswith('test_cra_')})
  for key in cra_keys:
    axes[2].plot(*series(key), 'o-', label=key[len('test_cra_'):])
  axes[2].set_title('certified robust accuracy (radius)')
  if cra_keys:
    axes[2].legend()
  for ax in axes:
    ax.set_xlabel('epoch')
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'curves.png'), dpi=100)
  plt.close(fig)
