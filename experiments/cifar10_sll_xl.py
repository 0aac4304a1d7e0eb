r"""CIFAR-10, SLL-XL, CLL or SLL's loss (CLL table 2 and table B4).

  python -m experiments.main --config=experiments/cifar10_sll_xl.py \
      --workdir=/tmp/cifar10_sll_xl
  # SLL's own loss and LLN head, the paper's baseline row:
  python -m experiments.main --config=experiments/cifar10_sll_xl.py:loss=sll
  # The offline JPEG copy, a two-epoch smoke run on the tiny SLL network:
  python -m experiments.main \
      --config=experiments/cifar10_sll_xl.py:data=offline,tiny

Table B4 (CLL on SLL-XL): 1000 epochs, batch 256, Adam 1e-2 with the triangular
schedule, eps 1.0, p 5e-5 (the code's p), lambda 1e-3. The p of table B4 is the
official code's (`clip_p`, p_code / 2 on each side of the margin), hence
`loss.p_convention = 'code'`. The XL network: 70 residual convs and 15 residual
dense layers (`cll_jax.models.RESIDUAL_SIZES`).

Arguments: loss ('cll' or 'sll'), data ('tfds' or 'offline'), tiny.
"""

from cll_jax import configs


def get_config(arg=None):
  arg = configs.parse_arg(arg, loss='cll', data='tfds', tiny=False)
  c = configs.default_config()
  configs.set_cifar10_source(c, arg.data)
  configs.use_constrained(c, family='sll', size='xl', loss=arg.loss,
                          epochs=1000, learning_rate=1e-2,
                          input_mean=configs.CIFAR10_MEAN, tiny=arg.tiny)
  if arg.loss == 'cll':
    c.loss.epsilon = 1.0  # eps_train (B4); also the CLL offset delta.
    c.loss.p_start = c.loss.p_end = 5e-05  # B4's p (the code's convention).
    c.loss.lam = 0.001  # lambda (B4).
  if arg.tiny:
    configs.make_tiny(c)
  return c
