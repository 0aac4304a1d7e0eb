r"""Tiny-ImageNet with the CRM loss and the LipLT bound (arXiv 2310.00116).

lambda 150, temperature 12, R0 0.2, Adam, batch 256, 300 epochs, ReLU 8C2F
with a 200-class LipLT pairwise head (chunked, no class-count fallback).

  python -m experiments.main --config=experiments/tinyimagenet_crm.py \
      --workdir=/tmp/tin_crm --config.data.kwargs.root=/data/tiny-imagenet-200

Arguments: root (folder or zip), download, bound ('liplt' or 'naive'), tiny.
"""

from cll_jax import configs


def get_config(arg=None):
  arg = configs.parse_arg(arg, root='~/tensorflow_datasets/tiny-imagenet-200.zip',
                          download=False, bound='liplt', tiny=False)
  c = configs.default_config()
  c.model.name = '8c2f'
  c.data.name = 'tiny_imagenet'
  c.data.kwargs.root = arg.root
  c.data.kwargs.download = arg.download
  c.data.augment.crop_padding = 8
  configs.use_crm(c, crm_lambda=150.0, temperature=12.0, radius_threshold=0.2,
                  epochs=300, batch_size=256, bound=arg.bound)
  c.loss.epsilon = 36 / 255
  if arg.tiny:
    configs.make_tiny(c)
  return c
