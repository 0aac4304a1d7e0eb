r"""Tiny-ImageNet, LipConv-10 / -20 (SOC), SOC's loss or CLL (CLL tables 1, B3).

  # CLL on LipConv-20 (table 1: eps 0.15, p 0.3, lambda 1e-5):
  python -m experiments.main --config=experiments/tinyimagenet_lipconv.py \
      --config.data.kwargs.root=/data/tiny-imagenet-200 --workdir=/tmp/tin_lc
  # SOC on LipConv-10 with LLN and the certificate regulariser of table B3:
  python -m experiments.main \
      --config=experiments/tinyimagenet_lipconv.py:loss=soc,depth=10,gamma=0.3
  python -m experiments.main --config=experiments/tinyimagenet_lipconv.py:tiny

The official scripts (`soc/train_cll_on_tinyimagenet.sh`) give CLL
`--calib_err_quantile 3e-1` on LipConv-20 and 1e-1 on LipConv-10, the code's
p (split over both sides): p of eq. 5 is 0.15 and 0.05. Table B3's SOC sweep
is gamma in {0.05, 0.15, 0.3, 0.4}, 0.3 best on LipConv-10.

Arguments: loss ('cll' or 'soc'), depth (10 or 20), gamma (loss=soc; the
table B3 variants), root (folder or zip of tiny-imagenet-200), download,
tiny.
"""

from cll_jax import configs

SOC_GAMMAS = (0.0, 0.05, 0.15, 0.3, 0.4)  # table B3 (+ plain CE)
CLL_P = {10: 0.05, 20: 0.15}  # p_code 0.1 / 0.3 of the official scripts


def get_config(arg=None):
  arg = configs.parse_arg(arg, loss='cll', depth=20, gamma=0.3,
                          root='~/tensorflow_datasets/tiny-imagenet-200.zip',
                          download=False, tiny=False)
  if arg.loss == 'soc' and arg.gamma not in SOC_GAMMAS:
    raise ValueError(f'gamma must be one of table B3 {SOC_GAMMAS}, got '
                     f'{arg.gamma}')
  if arg.loss == 'cll' and arg.depth not in CLL_P:
    raise ValueError(f'CLL settings exist for depth {sorted(CLL_P)}, got '
                     f'{arg.depth}')
  c = configs.default_config()
  c.data.name = 'tiny_imagenet'
  c.data.kwargs.root = arg.root
  c.data.kwargs.download = arg.download
  configs.use_lipconv(c, depth=arg.depth, loss=arg.loss, gamma=arg.gamma,
                      tiny=arg.tiny)
  c.data.augment.crop_padding = 8  # 64x64 crops pad by 8 (supp. B).
  c.loss.epsilon = 0.15  # eps_train (B4).
  c.loss.p_start = c.loss.p_end = CLL_P.get(arg.depth, 0.15)
  c.loss.lam = 1e-5 if arg.loss == 'cll' else 0.0  # lambda (B4).
  if arg.tiny:
    configs.make_tiny(c)
  return c
