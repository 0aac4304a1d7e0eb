r"""Two-moons with the GloRo loss, the baseline of CLL fig. 4 (table B1).

  python -m experiments.main --config=experiments/moons_gloro.py \
      --workdir=/tmp/moons_gloro
  python -m experiments.main --config=experiments/moons_gloro.py:eps=0.2,tiny

Arguments: eps (constant training radius), tiny (20 epochs).
"""

from experiments import moons_cll


def get_config(arg=None):
  c = moons_cll.get_config(arg)
  c.loss.name = 'gloro'  # Constant eps, no slack, no K^2 term (B1: N/A).
  c.loss.epsilon_schedule = 'fixed'
  c.loss.lam = 0.0
  return c
