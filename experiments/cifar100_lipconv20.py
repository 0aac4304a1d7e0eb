r"""CIFAR-100, LipConv-20 (SOC), CLL or SOC's loss (CLL table 2).

  python -m experiments.main --config=experiments/cifar100_lipconv20.py \
      --workdir=/tmp/cifar100_lipconv20
  python -m experiments.main --config=experiments/cifar100_lipconv20.py:loss=soc
  python -m experiments.main --config=experiments/cifar100_lipconv20.py:tiny

Table B4 lists CLL's LipConv settings for CIFAR-10 only; the same recipe is
used here (eps 0.25, p 0.025 = p_code 5e-2 / 2, lambda 1e-3, 200 epochs).

Arguments: loss ('cll' or 'soc'), depth, gamma (loss=soc), tiny.
"""

import ml_collections

from cll_jax import configs
from experiments import cifar10_lipconv20


def get_config(arg=None):
  arg = configs.parse_arg(arg, loss='cll', depth=20, gamma=0.0, tiny=False)
  c = cifar10_lipconv20.get_config(
      f'loss={arg.loss},depth={arg.depth},gamma={arg.gamma},tiny={arg.tiny}')
  c.data.name = 'cifar100'
  c.data.kwargs = ml_collections.ConfigDict()  # TFDS 'cifar100'
  return c
