r"""Runs a named study of the CLL paper (`experiments/studies/`).

  python -m experiments.study --study=slack --config_arg=data=offline \
      --epochs=3 --set=data.num_train_examples=10000 \
      --tightness_pairs=64 --tightness_steps=50 --workdir=/tmp/studies/slack
  # The paper's schedule (800 epochs, tightness 4000 x 1000; for a GPU):
  python -m experiments.study --study=margin_width
  # A cluster: one job per member, then one collecting job.
  python -m experiments.study --study=lambda --members=lambda1e-04
  python -m experiments.study --study=lambda --collect_only
  # List the studies and their members.
  python -m experiments.study --list

Each member trains in `<workdir>/<member>` (an ordinary `experiments.main`
workdir: resumable, a finished member is kept); the study then gathers every
finished member into `<output_dir>/<study>.md`, `<study>.json` (every number,
the commit, the schedule) and its figures. Studies: slack, margin_width,
lambda, delta, gloro_temperature, convergence, eps_p_grid, seeds.

Flags that shape the members, in the order they apply: the study's base
configs (`--base` replaces them; `--config_arg` is their argument, e.g.
`data=offline`), the members' swept values, `--tiny` (tiny_cnn, 256
examples, 1 epoch), `--epochs` (the schedule scaled to it), the study's own
adjustment, then `--set field=value` (repeatable), e.g.
`--set=data.num_train_examples=10000 --set=optimizer.decay_epochs=()`.

Exit codes: 0 done, 1 a member failed (non-finite training) or a refused
config, 2 bad flags.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging

from cll_jax import run_records
from cll_jax import study as study_lib
from cll_jax import tightness
from cll_jax.config_validation import InvalidConfigError
from experiments.studies import STUDIES

_STUDY = flags.DEFINE_enum('study', None, sorted(STUDIES), 'The study.')
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Folder of the member runs (default: '
    'workdir/studies/<study>).')
_OUTPUT_DIR = flags.DEFINE_string(
    'output_dir', None, 'Where the figures, <study>.md and <study>.json go '
    '(default: the workdir).')
_MEMBERS = flags.DEFINE_list(
    'members', None, 'Members to train (default: all); every finished one is '
    'gathered.')
_EPOCHS = flags.DEFINE_integer(
    'epochs', None, 'Epochs of every member, the schedule scaled to them '
    '(default: the configs\', i.e. the paper\'s).')
_TINY = flags.DEFINE_bool('tiny', False, 'Smoke-test sizes (tiny_cnn, 256 '
                          'examples, 1 epoch, tightness 4 x 2).')
_COLLECT_ONLY = flags.DEFINE_bool(
    'collect_only', False, 'Train nothing: gather the finished members (and '
    'measure the tightness of those that lack it).')
_CONFIG_ARG = flags.DEFINE_string(
    'config_arg', '', 'Argument of every base config, e.g. data=offline.')
_BASE = flags.DEFINE_multi_string(
    'base', [], 'A base config file replacing the study\'s: PATH (studies '
    'with one role) or ROLE=PATH.')
_SET = flags.DEFINE_multi_string(
    'set', [], 'field=value applied to every member last (repeatable).')
_TIGHTNESS_PAIRS = flags.DEFINE_integer(
    'tightness_pairs', tightness.PAPER_PAIRS,
    'Training pairs of the tightness estimate (0: none).')
_TIGHTNESS_STEPS = flags.DEFINE_integer(
    'tightness_steps', tightness.PAPER_STEPS, 'Its Adam steps.')
_LIST = flags.DEFINE_bool('list', False, 'List the studies and exit.')


def _list_studies() -> None:
  for name, s in STUDIES.items():
    print(f'{name}: {s.title}')
    print('  bases: ' + ', '.join(f'{r}={p}' for r, p in s.bases.items()))
    print('  members: ' + ', '.join(m.name for m in s.members))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _LIST.value:
    _list_studies()
    return
  if _STUDY.value is None:
    raise app.UsageError(f'--study is required; one of {sorted(STUDIES)}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint.
  study = STUDIES[_STUDY.value]
  workdir = _WORKDIR.value or os.path.join('workdir', 'studies', study.name)
  try:
    options = study_lib.StudyOptions(
        epochs=_EPOCHS.value, tiny=_TINY.value, config_arg=_CONFIG_ARG.value,
        overrides=tuple(study_lib.parse_override(s) for s in _SET.value),
        bases=study_lib.parse_bases(study, _BASE.value),
        tightness_pairs=_TIGHTNESS_PAIRS.value,
        tightness_steps=_TIGHTNESS_STEPS.value)
    results = study_lib.run_study(
        study, workdir, options, members=_MEMBERS.value,
        collect_only=_COLLECT_ONLY.value, output_dir=_OUTPUT_DIR.value,
        command=' '.join(['python -m experiments.study'] + sys.argv[1:]))
  except (run_records.ConfigChangeError, InvalidConfigError, ValueError) as e:
    sys.exit(f'error: {e}')
  if results['failed']:
    sys.exit(f"error: members failed: {sorted(results['failed'])}")


if __name__ == '__main__':
  app.run(main)
