r"""Tiny-ImageNet, LBDN's Sandwich network, its own loss (CLL table 1, LBDN).

  python -m experiments.main --config=experiments/tinyimagenet_sandwich.py \
      --config.data.kwargs.root=/data/tiny-imagenet-200 \
      --workdir=/tmp/tinyimagenet_sandwich
  # CLL on the same network (eps 0.15, p 0.3 in the code's convention):
  python -m experiments.main \
      --config=experiments/tinyimagenet_sandwich.py:loss=cll
  python -m experiments.main --config=experiments/tinyimagenet_sandwich.py:tiny

LBDN's recipe: 8 Sandwich convs 64 -> 512 channels, Sandwich dense layers 2048
/ 2048 / 1024, an LLN head, 400 epochs, batch 256, Adam 1e-2 with the
triangular schedule, the offset cross-entropy (offset 1.5, temperature 0.25).
The convs are circular (the Sandwich conv is built per frequency): the
certificate is that of the circular network this config trains.

Arguments: loss ('sandwich' or 'cll'), root (folder or zip of
tiny-imagenet-200), download, tiny.
"""

from cll_jax import configs

TINY_IMAGENET_MEAN = (0.4802, 0.4481, 0.3975)


def get_config(arg=None):
  arg = configs.parse_arg(arg, loss='sandwich',
                          root='~/tensorflow_datasets/tiny-imagenet-200.zip',
                          download=False, tiny=False)
  c = configs.default_config()
  c.data.name = 'tiny_imagenet'
  c.data.kwargs.root = arg.root
  c.data.kwargs.download = arg.download
  configs.use_constrained(c, family='sandwich', size='m', loss=arg.loss,
                          epochs=400, learning_rate=1e-2,
                          input_mean=TINY_IMAGENET_MEAN, tiny=arg.tiny)
  c.data.augment.crop_padding = 8  # 64x64 crops pad by 8 (supp. B).
  c.loss.epsilon = 0.15  # CLL's Tiny-ImageNet eps_train (B4).
  if arg.loss == 'cll':
    c.loss.p_start = c.loss.p_end = 0.3  # the code's p, as on LipConv-20
    c.loss.lam = 1e-5  # lambda (B4, Tiny-ImageNet)
  if arg.tiny:
    configs.make_tiny(c)
  return c
