r"""CIFAR-10, LipConv-20 (SOC), CLL or SOC's loss (CLL table 2 and table B4).

  python -m experiments.main --config=experiments/cifar10_lipconv20.py \
      --workdir=/tmp/cifar10_lipconv20
  # SOC's own loss and recipe, the paper's baseline row:
  python -m experiments.main --config=experiments/cifar10_lipconv20.py:loss=soc
  # The offline JPEG copy, a two-epoch smoke run on a narrow LipConv-5:
  python -m experiments.main \
      --config=experiments/cifar10_lipconv20.py:data=offline,tiny

Table B4 (CLL on LipConv): 200 epochs, batch 128, eps 0.25, p 5e-2, lambda
1e-3, lr 1e-3 decayed x0.1 at 100 and 150, no LLN. The p of table B4 for
LipConv is the official code's (`--calib_err_quantile 5.e-2`, which puts
p_code / 2 on each side of the margin), so p of eq. 5 is 0.025.

Arguments: loss ('cll' or 'soc'), depth (5, 10, ..., 40), gamma (SOC's
certificate regulariser, loss=soc), data ('tfds' or 'offline'), tiny.
"""

from cll_jax import configs


def get_config(arg=None):
  arg = configs.parse_arg(arg, loss='cll', depth=20, gamma=0.0, data='tfds',
                          tiny=False)
  c = configs.default_config()
  configs.set_cifar10_source(c, arg.data)
  configs.use_lipconv(c, depth=arg.depth, loss=arg.loss, gamma=arg.gamma,
                      tiny=arg.tiny)
  c.loss.epsilon = 0.25  # eps_train (B4); also the CLL offset delta.
  c.loss.p_start = c.loss.p_end = 0.025  # B4's p_code 5e-2 (see above).
  c.loss.lam = 1e-3 if arg.loss == 'cll' else 0.0  # lambda (B4).
  if arg.tiny:
    configs.make_tiny(c)
  return c
