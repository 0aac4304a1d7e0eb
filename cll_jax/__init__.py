"""cll_jax: certified L2 robustness with Lipschitz margins, in JAX/Flax.

Pure functions for the losses (`losses`), Lipschitz bounds (`lipschitz`,
`sound_bounds`, `liplt`), certification (`certify`) and attacks (`attacks`);
Flax layers and models that carry their power-iteration state (`layers`,
`models`); data sets (`data`) and the training loop (`train`).
"""

from cll_jax import certify
from cll_jax import layers
from cll_jax import lipschitz
from cll_jax import losses
from cll_jax import models
from cll_jax import operators

__version__ = '0.1.0'
