"""The CLL paper's analysis experiments as named studies (`cll_jax.study`).

  python -m experiments.study --study=NAME [--epochs=E] [--workdir=...]

| name | paper | members |
|---|---|---|
| slack | fig. 5 left | p_code in 0.01 ... 0.8 (CLL, 4C3F) |
| margin_width | fig. 5 middle/right | eps 0.15 ... 1.25, CLL and GloRo |
| lambda | fig. D4a | lambda 1e-15 ... 1e-1 |
| delta | fig. D4b | 11 offsets delta in [0.1, 0.3] |
| gloro_temperature | fig. D4c | GloRo, logit scale s 1/8 ... 8 |
| convergence | fig. D1 | CLL and GloRo at fixed eps, CRA per epoch |
| eps_p_grid | table D5 | 5 x 5 eps_train x p_code (8C2F, Tiny-ImageNet) |
| seeds | tables D6/D8 | seeds 0-8 of one config |
"""

from experiments.studies import convergence
from experiments.studies import delta
from experiments.studies import eps_p_grid
from experiments.studies import gloro_temperature
from experiments.studies import lam
from experiments.studies import margin_width
from experiments.studies import seeds
from experiments.studies import slack

STUDIES = {s.name: s for s in (
    slack.STUDY, margin_width.STUDY, lam.STUDY, delta.STUDY,
    gloro_temperature.STUDY, convergence.STUDY, eps_p_grid.STUDY,
    seeds.STUDY)}
