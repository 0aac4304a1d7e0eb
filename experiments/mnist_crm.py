r"""MNIST with the CRM loss and the LipLT bound (arXiv 2310.00116).

lambda 30, temperature 5, R0 2.2, Adam, batch 512, 400 epochs, ReLU 4C3F.
MNIST is read through TFDS (`--config.data.kwargs.download=True` prepares it).

  python -m experiments.main --config=experiments/mnist_crm.py \
      --workdir=/tmp/mnist_crm

Arguments: bound ('liplt' or 'naive'), tiny.
"""

from cll_jax import configs


def get_config(arg=None):
  arg = configs.parse_arg(arg, bound='liplt', tiny=False)
  c = configs.default_config()
  c.model.name = '4c3f'
  c.data.name = 'mnist'
  c.data.augment.enabled = False  # No augmentation is reported for MNIST.
  configs.use_crm(c, crm_lambda=30.0, temperature=5.0, radius_threshold=2.2,
                  epochs=400, batch_size=512, bound=arg.bound)
  c.loss.epsilon = 1.58  # The usual MNIST L2 radius for reporting.
  c.eval.radii = (1.58,)
  if arg.tiny:
    configs.make_tiny(c)
  return c
