r"""Two-moons with the GloRo loss, the baseline of CLL fig. 4 (table B1).

  python -m experiments.main --config=experiments/moons_gloro.py \
      --workdir=/tmp/moons_gloro
  python -m experiments.main --config=experiments/moons_gloro.py:eps=0.2,tiny
  python -m experiments.main \
      --config=experiments/moons_gloro.py:variant=official

Arguments: eps (constant training radius), tiny (20 epochs), variant
('faithful': GloRo's loss as its paper defines it; 'official': the gradient
of the official CLL code's GloroLoss, see `losses.gloro_loss`).
"""

from cll_jax import configs
from experiments import moons_cll


def get_config(arg=None):
  arg = configs.parse_arg(arg, eps=0.15, tiny=False, variant='faithful')
  c = moons_cll.get_config(f'eps={arg.eps}' + (',tiny' if arg.tiny else ''))
  c.loss.name = 'gloro'  # Constant eps, no slack, no K^2 term (B1: N/A).
  c.loss.gloro_variant = arg.variant
  c.loss.epsilon_schedule = 'fixed'
  c.loss.lam = 0.0
  return c
