r"""Runs one experiment: `train_and_evaluate(config, workdir)`.

  python -m experiments.main --config=experiments/tinyimagenet_8c2f.py \
      --workdir=/tmp/tin --config.train.num_epochs=100

Without flags it trains the two-moons CLL model of the paper (offline, a few
minutes on a laptop CPU). A rerun with the same workdir resumes from the
latest checkpoint.
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cll_jax import train

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'moons_cll.py')

_CONFIG = config_flags.DEFINE_config_file(
    'config', _DEFAULT_CONFIG, 'Experiment config file (path[:argument]).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, metrics and figures '
    '(default: ./workdir/<config file name>).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    # Orbax logs every checkpoint step at INFO; --verbosity=0 brings it back.
    logging.set_verbosity(logging.WARNING)
  workdir = _WORKDIR.value
  if workdir is None:
    name = os.path.splitext(os.path.basename(
        config_flags.get_config_filename(flags.FLAGS['config'])))[0]
    workdir = os.path.join('workdir', name)
  logging.warning('workdir: %s', workdir)
  final = train.train_and_evaluate(_CONFIG.value, workdir)
  print({k: v for k, v in final.items() if not isinstance(v, list)})


if __name__ == '__main__':
  app.run(main)
