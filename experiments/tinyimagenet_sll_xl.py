r"""Tiny-ImageNet, SLL-XL with SLL's loss (the baseline row of CLL table 1).

  python -m experiments.main --config=experiments/tinyimagenet_sll_xl.py \
      --config.data.kwargs.root=/data/tiny-imagenet-200 \
      --workdir=/tmp/tinyimagenet_sll_xl
  # CLL on the same network (eps 0.15, p 0.3 in the code's convention):
  python -m experiments.main \
      --config=experiments/tinyimagenet_sll_xl.py:loss=cll
  python -m experiments.main --config=experiments/tinyimagenet_sll_xl.py:tiny

SLL's recipe: 1000 epochs, batch 256, Adam 1e-2 with the triangular schedule,
the offset cross-entropy (offset 1.5, temperature 0.25), an LLN head. The XL
network pools 64x64 to 16x16 before its 15 dense layers (each 30720 -> 2048 ->
30720 units): about 1e9 parameters (CLL: "XL ... 1.1B"), for multi-GPU runs
only.

Arguments: loss ('sll' or 'cll'), root (folder or zip of
tiny-imagenet-200), download, tiny.
"""

from cll_jax import configs

TINY_IMAGENET_MEAN = (0.4802, 0.4481, 0.3975)


def get_config(arg=None):
  arg = configs.parse_arg(arg, loss='sll',
                          root='~/tensorflow_datasets/tiny-imagenet-200.zip',
                          download=False, tiny=False)
  c = configs.default_config()
  c.data.name = 'tiny_imagenet'
  c.data.kwargs.root = arg.root
  c.data.kwargs.download = arg.download
  configs.use_constrained(c, family='sll', size='xl', loss=arg.loss,
                          epochs=1000, learning_rate=1e-2,
                          input_mean=TINY_IMAGENET_MEAN, tiny=arg.tiny)
  c.data.augment.crop_padding = 8  # 64x64 crops pad by 8 (supp. B).
  c.loss.epsilon = 0.15  # CLL's Tiny-ImageNet eps_train (B4).
  if arg.loss == 'cll':
    c.loss.p_start = c.loss.p_end = 0.3  # the code's p, as on LipConv-20
    c.loss.lam = 1e-5  # lambda (B4, Tiny-ImageNet)
  if arg.tiny:
    configs.make_tiny(c)
  return c
