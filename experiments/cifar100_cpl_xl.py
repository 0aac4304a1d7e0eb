r"""CIFAR-100, CPL-XL, CLL or CPL's loss (CLL table 2 and table B4).

  python -m experiments.main --config=experiments/cifar100_cpl_xl.py \
      --workdir=/tmp/cifar100_cpl_xl
  # CPL's own loss and LLN head, the paper's baseline row:
  python -m experiments.main --config=experiments/cifar100_cpl_xl.py:loss=cpl
  # A two-epoch smoke run on the tiny CPL network:
  python -m experiments.main --config=experiments/cifar100_cpl_xl.py:tiny

Table B4 (CLL on CPL-XL): 200 epochs, batch 256, Adam 1e-3 with the triangular
schedule, eps 1.0, p 1e-3 (the code's p), lambda 1e-3. The p of table B4 is the
official code's (`clip_p`, p_code / 2 on each side of the margin), hence
`loss.p_convention = 'code'`. The XL network: 70 residual convs and 15 residual
dense layers (`cll_jax.models.RESIDUAL_SIZES`).

Arguments: loss ('cll' or 'cpl'), tiny.
"""

from cll_jax import configs


def get_config(arg=None):
  arg = configs.parse_arg(arg, loss='cll', tiny=False)
  c = configs.default_config()
  c.data.name = 'cifar100'
  configs.use_constrained(c, family='cpl', size='xl', loss=arg.loss,
                          epochs=200, learning_rate=1e-3,
                          input_mean=configs.CIFAR100_MEAN, tiny=arg.tiny)
  if arg.loss == 'cll':
    c.loss.epsilon = 1.0  # eps_train (B4); also the CLL offset delta.
    c.loss.p_start = c.loss.p_end = 0.001  # B4's p (the code's convention).
    c.loss.lam = 0.001  # lambda (B4).
  if arg.tiny:
    configs.make_tiny(c)
  return c
