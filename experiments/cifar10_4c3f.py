r"""CIFAR-10, 4C3F, CLL (CLL paper table 2 and table B4).

  python -m experiments.main --config=experiments/cifar10_4c3f.py \
      --workdir=/tmp/cifar10_4c3f
  # The offline JPEG copy in ../shared/datasets instead of TFDS:
  python -m experiments.main --config=experiments/cifar10_4c3f.py:data=offline
  # A two-epoch smoke run on 1,024 offline images:
  python -m experiments.main --config=experiments/cifar10_4c3f.py:data=offline,tiny

Arguments: data ('tfds' or 'offline'), p (slack, paper 0.15), p_convention
('paper': p of CLL eq. 5 in (0, 0.5); 'code': the official code's p_code =
2 p in (0, 1), as fig. 5's p up to 0.8: `:p=0.7,p_convention=code`), eps
(paper 0.15), tiny.
"""

from cll_jax import configs


def get_config(arg=None):
  arg = configs.parse_arg(arg, data='tfds', p=0.15, p_convention='paper',
                          eps=0.15, tiny=False)
  c = configs.default_config()
  c.model.name = '4c3f'
  configs.set_cifar10_source(c, arg.data)
  c.loss.name = 'cll'
  c.loss.epsilon = arg.eps  # eps_train = 0.15 (B4).
  c.loss.p_start = c.loss.p_end = arg.p  # Fixed slack 0.15 (B4).
  # B4's 0.15 is the p of eq. 5: K^(h o f) = 11.6 as in table 2.
  c.loss.p_convention = arg.p_convention
  c.loss.lam = 1e-4  # lambda (B4).
  c.optimizer.learning_rate = 1e-3
  c.optimizer.decay_epochs = (400, 600, 780)  # 1e-4, 1e-5, 1e-6 (B4).
  c.train.num_epochs = 800
  c.train.batch_size = 128
  if arg.tiny:
    configs.make_tiny(c)
  return c
