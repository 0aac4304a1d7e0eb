r"""Two-moons with a 1-Lipschitz SOC MLP and SOC's loss (CLL fig. D3).

  python -m experiments.main --config=experiments/moons_soc.py \
      --workdir=/tmp/moons_soc
  python -m experiments.main --config=experiments/moons_soc.py:depth=25,gamma=1.0
  python -m experiments.main --config=experiments/moons_soc.py:tiny

Fig. D3 trains SOC networks of depth 3, 7 and 25 with SOC's certificate
regulariser gamma in {0, 0.3, 1.0} and last-layer normalisation, on the
table B1 set-up (1000 epochs, batch 100, Adam 1e-3 -> 1e-4 at epoch 400);
the paper reports no configuration above 90% CRA and K^(h o f) = 2. The
official code's depth-7 network is SOC 1x1 convs 2-10-20-40-40-20-10 with an
LLN head; this library's `soc_mlp{3,7,25}` use width 32 (the 2-D input
zero-padded) for all depths, as the other depths' widths are not published.

Arguments: depth (3, 7 or 25), gamma, eps (the certification radius of the
reports; the true margin is 0.3, eps 0.15), tiny (20 epochs).
"""

from cll_jax import configs
from experiments import moons_cll

DEPTHS = (3, 7, 25)
GAMMAS = (0.0, 0.3, 1.0)


def get_config(arg=None):
  arg = configs.parse_arg(arg, depth=7, gamma=0.0, eps=0.15, tiny=False)
  if arg.depth not in DEPTHS:
    raise ValueError(f'depth must be one of {DEPTHS}, got {arg.depth}')
  c = moons_cll.get_config(f'eps={arg.eps},tiny={arg.tiny}')
  c.model.name = f'soc_mlp{arg.depth}'
  c.model.head = 'lln'
  c.model.num_power_iterations = 1  # SOC: one update per step
  c.loss.name = 'soc'
  c.loss.soc_gamma = arg.gamma
  c.loss.lam = 0.0
  return c
