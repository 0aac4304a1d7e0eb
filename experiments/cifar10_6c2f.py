r"""CIFAR-10, 6C2F, CLL (CLL paper table 2 and table B4).

  python -m experiments.main --config=experiments/cifar10_6c2f.py \
      --workdir=/tmp/cifar10_6c2f
  python -m experiments.main --config=experiments/cifar10_6c2f.py:data=offline,tiny

Arguments: data ('tfds' or 'offline'), p (paper 0.15), p_convention
('paper' or 'code', see `cifar10_4c3f`), eps (paper 0.15), tiny.
"""

from experiments import cifar10_4c3f


def get_config(arg=None):
  c = cifar10_4c3f.get_config(arg)
  c.model.name = '6c2f'  # Same training set-up as 4C3F (B4).
  return c
