r"""Tiny-ImageNet, 8C2F, CLL (CLL paper table 1 and table B4).

  python -m experiments.main --config=experiments/tinyimagenet_8c2f.py \
      --workdir=/tmp/tin_8c2f --config.data.kwargs.root=/data/tiny-imagenet-200
  # The second paper setting (eps 1.0, p 0.025):
  python -m experiments.main \
      --config=experiments/tinyimagenet_8c2f.py:variant=eps1.0
  # GloRo with TRADES, the paper's 8C2F baseline:
  python -m experiments.main \
      --config=experiments/tinyimagenet_8c2f.py:loss=gloro_trades

Arguments: variant ('eps0.5' -> eps 0.5, p 0.01; 'eps1.0' -> eps 1.0,
p 0.025), loss ('cll' or 'gloro_trades'), root (folder or zip of
tiny-imagenet-200), download (fetch the zip if root is missing), tiny.

The p of table B4 is the official code's p_code = 2 p of eq. 5
(`loss.p_convention='code'`): only then is K^(h o f) = 1 / sigma_eps(p) the
10.6 and 4.4 of table 1 (with p of eq. 5 it would be 9.2 and 3.7).
"""

from cll_jax import configs

VARIANTS = {'eps0.5': (0.5, 0.01), 'eps1.0': (1.0, 0.025)}


def get_config(arg=None):
  arg = configs.parse_arg(arg, variant='eps0.5', loss='cll',
                          root='~/tensorflow_datasets/tiny-imagenet-200.zip',
                          download=False, tiny=False)
  if arg.variant not in VARIANTS:
    raise ValueError(f'variant must be one of {sorted(VARIANTS)}, got '
                     f'{arg.variant!r}')
  eps, p = VARIANTS[arg.variant]
  c = configs.default_config()
  c.model.name = '8c2f'
  c.data.name = 'tiny_imagenet'
  c.data.kwargs.root = arg.root
  c.data.kwargs.download = arg.download
  c.data.augment.crop_padding = 8  # 64x64 crops pad by 8 (supp. B).
  c.loss.name = arg.loss
  c.loss.epsilon = eps
  c.loss.p_start = c.loss.p_end = p
  c.loss.p_convention = 'code'  # p_code = 2 p (see the docstring).
  c.loss.lam = 1e-5  # lambda (B4).
  # K-scale warm-up: the loss sees beta(t) K, beta 0.01 -> 1, gamma 10 (B4).
  c.loss.lipschitz_scale_start = 0.01
  c.loss.lipschitz_scale_gamma = 10.0
  if arg.loss == 'gloro_trades':  # GloRo 8C2F-TRADES baseline (B4).
    c.loss.epsilon = 0.15
    c.loss.epsilon_schedule = 'logarithmic'
    c.loss.epsilon_schedule_epochs = 400
    c.loss.lam = 0.0
    c.loss.lipschitz_scale_start = 1.0
    c.loss.trades_beta_start, c.loss.trades_beta_end = 0.5, 20.0
    c.loss.trades_beta_epochs = 400
  c.optimizer.learning_rate = 2.5e-4
  c.optimizer.decay_epochs = (400, 600, 780)
  c.train.num_epochs = 800
  c.train.batch_size = 256
  if arg.tiny:
    configs.make_tiny(c)
  return c
