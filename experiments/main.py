r"""Runs one experiment: `train_and_evaluate(config, workdir)`.

  python -m experiments.main --config=experiments/tinyimagenet_8c2f.py \
      --workdir=/tmp/tin --config.train.num_epochs=100

Without flags it trains the two-moons CLL model of the paper (offline, a few
minutes on a laptop CPU). A rerun with the same workdir resumes from the
latest checkpoint; a finished one reruns as a no-op. A rerun whose config
changes what was trained (model, data, loss, optimizer, ...) stops before
training and names the changed fields; `--allow_config_changes` continues
the run with the new values (recorded in `config_changes.jsonl`). Changing
only `train.num_epochs` or `eval.*` needs no flag.

Exit codes: 0 done, 1 a non-finite training step (the last good checkpoint
is kept) or a refused config, 2 bad command-line flags.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cll_jax import run_records
from cll_jax import train
from cll_jax.config_validation import InvalidConfigError
from cll_jax.config_validation import validate_config

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'moons_cll.py')

_CONFIG = config_flags.DEFINE_config_file(
    'config', _DEFAULT_CONFIG, 'Experiment config file (path[:argument]).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, metrics and figures '
    '(default: ./workdir/<config file name>).')
_ALLOW_CONFIG_CHANGES = flags.DEFINE_bool(
    'allow_config_changes', False,
    'Resume a workdir although the config differs from the one it was '
    'trained with (beyond train.num_epochs and eval.*).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    # Orbax logs every checkpoint step at INFO; --verbosity=0 brings it back.
    # Progress and status lines go to stderr regardless.
    logging.set_verbosity(logging.WARNING)
  workdir = _WORKDIR.value
  if workdir is None:
    name = os.path.splitext(os.path.basename(
        config_flags.get_config_filename(flags.FLAGS['config'])))[0]
    workdir = os.path.join('workdir', name)
  print(f'workdir: {workdir}', file=sys.stderr)
  try:
    validate_config(_CONFIG.value)
    final = train.train_and_evaluate(
        _CONFIG.value, workdir,
        allow_config_changes=_ALLOW_CONFIG_CHANGES.value)
  except (train.NonFiniteError, run_records.ConfigChangeError,
          InvalidConfigError) as e:
    sys.exit(f'error: {e}')
  print({k: v for k, v in final.items() if not isinstance(v, list)})


def parse_flags(argv):
  """absl's flag parsing, with a one-line error for unknown config fields.

  ml_collections raises from deep inside the override machinery for
  `--config.loss.pp=1`; its message already names the field (and a close
  match), so that message is all the user needs.
  """
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    message = str(e.args[0] if e.args else e)
    field = message.split('\n')[0].strip('"\'')
    hint = ' '.join(message.split('\n')[1:])
    bad = [a for a in argv if a.startswith('--config.') and field in a]
    where = bad[0] if bad else '--config'
    sys.stderr.write(
        f'error: {where}: the config has no field {field!r}. {hint}\n')
    sys.exit(2)
  except flags.Error as e:
    sys.stderr.write(f'FATAL Flags parsing error: {e}\n')
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
