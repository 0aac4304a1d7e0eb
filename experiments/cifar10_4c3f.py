r"""CIFAR-10, 4C3F, CLL (CLL paper table 2 and table B4).

  python -m experiments.main --config=experiments/cifar10_4c3f.py \
      --workdir=/tmp/cifar10_4c3f
  # The offline JPEG copy in ../shared/datasets instead of TFDS:
  python -m experiments.main --config=experiments/cifar10_4c3f.py:data=offline
  # A two-epoch smoke run on 1,024 offline images:
  python -m experiments.main --config=experiments/cifar10_4c3f.py:data=offline,tiny

Arguments: data ('tfds' or 'offline'), p (slack, paper 0.15), eps (paper
0.15), tiny.
"""

from cll_jax import configs


def get_config(arg=None):
  arg = configs.parse_arg(arg, data='tfds', p=0.15, eps=0.15, tiny=False)
  c = configs.default_config()
  c.model.name = '4c3f'
  configs.set_cifar10_source(c, arg.data)
  c.loss.name = 'cll'
  c.loss.epsilon = arg.eps  # eps_train = 0.15 (B4).
  c.loss.p_start = c.loss.p_end = arg.p  # Fixed slack 0.15 (B4).
  c.loss.lam = 1e-4  # lambda (B4).
  c.optimizer.learning_rate = 1e-3
  c.optimizer.decay_epochs = (400, 600, 780)  # 1e-4, 1e-5, 1e-6 (B4).
  c.train.num_epochs = 800
  c.train.batch_size = 128
  if arg.tiny:
    configs.make_tiny(c)
  return c
