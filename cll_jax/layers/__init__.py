"""Lipschitz layers, one module per family, each stating its bound.

| module | layers | bound kind | how the bound is known |
|---|---|---|---|
| `unconstrained` | `LipschitzDense`, `LipschitzConv` (specs `Dense`, `Conv`) | estimated | power iteration in training; Gram-iteration sound bound in certificates |
| `soc` | `SOCConv`, `SOCDense` (specs `SOCConvSpec`, `SOCDenseSpec`) | proven | skew-symmetric A is normal: series remainder bound with a sound bound of norm(A) |
| `orthogonal` | space-to-depth, channel pad / keep | proven | permutation, isometric embedding, projection: norm 1 |
| `activations` | `minmax`, `Householder` | proven | piecewise orthogonal and continuous: 1-Lipschitz |
| `heads` | `DenseHead`, `LLNHead` | exact pairwise | norm(w_i - w_j) from the weights |

The contract every layer follows is in `cll_jax.layers.base`.
"""

from cll_jax.layers.activations import Householder
from cll_jax.layers.activations import minmax
from cll_jax.layers.base import ESTIMATED
from cll_jax.layers.base import HIGHEST
from cll_jax.layers.base import is_training
from cll_jax.layers.base import kaiming_normal
from cll_jax.layers.base import LayerSpec
from cll_jax.layers.base import POWER_ITERATION
from cll_jax.layers.base import power_iterated_norm
from cll_jax.layers.base import PROVEN
from cll_jax.layers.heads import DenseHead
from cll_jax.layers.heads import HEADS
from cll_jax.layers.heads import LLNDense
from cll_jax.layers.heads import LLNHead
from cll_jax.layers.soc import SOCConv
from cll_jax.layers.soc import SOCConvSpec
from cll_jax.layers.soc import SOCDense
from cll_jax.layers.soc import SOCDenseSpec
from cll_jax.layers.unconstrained import Conv
from cll_jax.layers.unconstrained import Dense
from cll_jax.layers.unconstrained import LipschitzConv
from cll_jax.layers.unconstrained import LipschitzDense

__all__ = [
    'Conv', 'Dense', 'DenseHead', 'ESTIMATED', 'HEADS', 'HIGHEST',
    'Householder', 'LLNDense', 'LLNHead', 'LayerSpec', 'LipschitzConv',
    'LipschitzDense', 'POWER_ITERATION', 'PROVEN', 'SOCConv', 'SOCConvSpec',
    'SOCDense', 'SOCDenseSpec', 'is_training', 'kaiming_normal', 'minmax',
    'power_iterated_norm',
]
