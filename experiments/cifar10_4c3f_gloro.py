r"""CIFAR-10, 4C3F, GloRo baseline (CLL paper table 2 and table B4).

  python -m experiments.main --config=experiments/cifar10_4c3f_gloro.py \
      --workdir=/tmp/cifar10_4c3f_gloro
  python -m experiments.main \
      --config=experiments/cifar10_4c3f_gloro.py:data=offline,tiny

Arguments: data ('tfds' or 'offline'), eps (paper 0.15), tiny.
"""

from cll_jax import configs


def get_config(arg=None):
  arg = configs.parse_arg(arg, data='tfds', eps=0.15, tiny=False)
  c = configs.default_config()
  c.model.name = '4c3f'
  configs.set_cifar10_source(c, arg.data)
  c.loss.name = 'gloro'
  c.loss.epsilon = arg.eps
  c.loss.epsilon_schedule = 'logarithmic'  # GloRo's eps ramp (B4).
  c.loss.epsilon_schedule_epochs = 400
  c.loss.lam = 0.0
  c.optimizer.learning_rate = 1e-3
  c.optimizer.decay_epochs = (400, 600, 780)
  c.train.num_epochs = 800
  c.train.batch_size = 128
  if arg.tiny:
    configs.make_tiny(c)
    c.loss.epsilon_schedule_epochs = 1
  return c
