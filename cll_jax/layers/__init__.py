"""Lipschitz layers, one module per family, each stating its bound.

| module | layers | bound kind | how the bound is known |
|---|---|---|---|
| `unconstrained` | `LipschitzDense`, `LipschitzConv` (specs `Dense`, `Conv`) | estimated | power iteration in training; Gram-iteration sound bound in certificates |
| `soc` | `SOCConv`, `SOCDense` (specs `SOCConvSpec`, `SOCDenseSpec`) | proven | skew-symmetric A is normal: series remainder bound with a sound bound of norm(A) |
| `cpl` | `CPLConv`, `CPLDense` (specs `CPLConvSpec`, `CPLDenseSpec`) | proven | Jacobian I - h W^T D W: max(1, h norm(W)^2 - 1) with a sound upper bound of norm(W) (the h of a power-iteration estimate can exceed 2 / norm(W)^2) |
| `sll` | `SLLConv`, `SLLDense` (specs `SLLConvSpec`, `SLLDenseSpec`) | proven | Gershgorin / SDP argument with the T the forward pass uses, rounded up |
| `aol` | `AOLConv`, `AOLDense` (specs `AOLConvSpec`, `AOLDenseSpec`) | proven | diagonal rescaling from the (full autocorrelation) Gram matrix, the rounding of the computed D covered |
| `sandwich` | `SandwichConv`, `SandwichDense` (specs `SandwichConvSpec`, `SandwichDenseSpec`) | proven | per-frequency Cayley (circular convs only); the computed [A B] divided by a sound bound of its norm |
| `orthogonal` | space-to-depth, channel pad / keep, scaled sum-pool (also as parameter-free specs) | proven | permutation, isometric embedding, projection, orthonormal rows: norm 1 |
| `activations` | `minmax`, `Householder` | proven | piecewise orthogonal and continuous: 1-Lipschitz |
| `heads` | `DenseHead`, `LLNHead` | exact pairwise | norm(w_i - w_j) from the weights |

The contract every layer follows is in `cll_jax.layers.base`.
"""

from cll_jax.layers.activations import Householder
from cll_jax.layers.aol import AOLConv
from cll_jax.layers.aol import AOLConvSpec
from cll_jax.layers.aol import AOLDense
from cll_jax.layers.aol import AOLDenseSpec
from cll_jax.layers.activations import minmax
from cll_jax.layers.base import ESTIMATED
from cll_jax.layers.cpl import CPLConv
from cll_jax.layers.cpl import CPLConvSpec
from cll_jax.layers.cpl import CPLDense
from cll_jax.layers.cpl import CPLDenseSpec
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
from cll_jax.layers.orthogonal import KeepChannels
from cll_jax.layers.orthogonal import PadChannels
from cll_jax.layers.orthogonal import ScaledSumPool
from cll_jax.layers.orthogonal import SpaceToDepth
from cll_jax.layers.sandwich import SandwichConv
from cll_jax.layers.sandwich import SandwichConvSpec
from cll_jax.layers.sandwich import SandwichDense
from cll_jax.layers.sandwich import SandwichDenseSpec
from cll_jax.layers.sll import SLLConv
from cll_jax.layers.sll import SLLConvSpec
from cll_jax.layers.sll import SLLDense
from cll_jax.layers.sll import SLLDenseSpec
from cll_jax.layers.soc import SOCConv
from cll_jax.layers.orthogonal import KeepChannels
from cll_jax.layers.orthogonal import PadChannels
from cll_jax.layers.orthogonal import ScaledSumPool
from cll_jax.layers.orthogonal import SpaceToDepth
from cll_jax.layers.sandwich import SandwichConv
from cll_jax.layers.sandwich import SandwichConvSpec
from cll_jax.layers.sandwich import SandwichDense
from cll_jax.layers.sandwich import SandwichDenseSpec
from cll_jax.layers.sll import SLLConv
from cll_jax.layers.sll import SLLConvSpec
from cll_jax.layers.sll import SLLDense
from cll_jax.layers.sll import SLLDenseSpec
from cll_jax.layers.soc import SOCConvSpec
from cll_jax.layers.soc import SOCDense
from cll_jax.layers.soc import SOCDenseSpec
from cll_jax.layers.unconstrained import Conv
from cll_jax.layers.unconstrained import Dense
from cll_jax.layers.unconstrained import LipschitzConv
from cll_jax.layers.unconstrained import LipschitzDense

__all__ = [
    'AOLConv', 'AOLConvSpec', 'AOLDense', 'AOLDenseSpec', 'CPLConv',
    'CPLConvSpec', 'CPLDense', 'CPLDenseSpec', 'Conv', 'Dense', 'DenseHead',
    'ESTIMATED', 'HEADS', 'HIGHEST', 'Householder', 'KeepChannels',
    'LLNDense', 'LLNHead', 'LayerSpec', 'LipschitzConv', 'LipschitzDense',
    'POWER_ITERATION', 'PROVEN', 'PadChannels', 'SLLConv', 'SLLConvSpec',
    'SLLDense', 'SLLDenseSpec', 'SOCConv', 'SOCConvSpec', 'SOCDense',
    'SOCDenseSpec', 'SandwichConv', 'SandwichConvSpec', 'SandwichDense',
    'SandwichDenseSpec', 'ScaledSumPool', 'SpaceToDepth', 'is_training',
    'kaiming_normal', 'minmax', 'power_iterated_norm',
]
