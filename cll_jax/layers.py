"""Flax layers that carry the power-iteration state of their spectral norm.

Each Lipschitz layer returns `(y, sigma)`: its output and the current estimate
of the spectral norm of its linear map. The power-iteration vector lives in
the variable collection `power_iteration` (one vector per layer, shaped like
one input example). It advances `num_power_iterations` steps per call only
when that collection is mutable, i.e. in training
(`apply(..., mutable=['power_iteration'])`); evaluation with the collection
frozen re-uses the converged vector.

Flax's `nn.SpectralNorm` normalises the reshaped kernel matrix, whose norm is
not the operator norm of a convolution; these layers run power iteration on
the convolution itself (input shape, stride, padding), see
`cll_jax.operators.LinearOperator`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cll_jax import lipschitz
from cll_jax.operators import LinearOperator

POWER_ITERATION = 'power_iteration'

# Kaiming normal with fan_in and gain sqrt(2), untruncated, as in the paper's
# PyTorch code (`kaiming_normal_`).
kaiming_normal = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


def _spectral_norm(module: nn.Module, op: LinearOperator,
                   num_iterations: int) -> jax.Array:
  """Reads, advances (when mutable) and stores the layer's iterate."""
  u = module.variable(
      POWER_ITERATION, 'u',
      lambda: lipschitz.random_unit_vector(
          module.make_rng('params'), op.input_shape, op.kernel.dtype))
  steps = num_iterations if module.is_mutable_collection(POWER_ITERATION) else 0
  new_u, sigma = lipschitz.power_iteration(op, u.value, steps)
  if steps:
    u.value = new_u
  return sigma


class LipschitzDense(nn.Module):
  """Dense layer returning `(x @ W + b, ||W||_2 estimate)`."""
  features: int
  use_bias: bool = True
  num_power_iterations: int = 5
  kernel_init: Any = kaiming_normal
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    kernel = self.param('kernel', self.kernel_init,
                        (x.shape[-1], self.features), self.param_dtype)
    op = LinearOperator(kernel, 'dense', (x.shape[-1],))
    y = op(x)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,),
                         self.param_dtype)
    return y, _spectral_norm(self, op, self.num_power_iterations)


class LipschitzConv(nn.Module):
  """2-D convolution (NHWC) with explicit symmetric zero padding.

  Returns `(conv(x) + b, ||conv||_2 estimate)`. The operator norm is that of
  the convolution on this layer's input shape, which is fixed at init.
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  use_bias: bool = True
  num_power_iterations: int = 5
  kernel_init: Any = kaiming_normal
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    if x.ndim != 4:
      raise ValueError(f'LipschitzConv expects NHWC input, got {x.shape}')
    k = self.kernel_size
    kernel = self.param('kernel', self.kernel_init,
                        (k, k, x.shape[-1], self.features), self.param_dtype)
    pad = (self.padding, self.padding)
    op = LinearOperator(kernel, 'conv', tuple(x.shape[1:]),
                        (self.stride, self.stride), (pad, pad))
    y = op(x)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,),
                         self.param_dtype)
    return y, _spectral_norm(self, op, self.num_power_iterations)


def minmax(x: jax.Array) -> jax.Array:
  """MinMax activation (Anil et al. 2019) on the last (channel) axis.

  Splits the channels into halves a, b and returns [max(a, b), min(a, b)].
  Per pair (a_k, b_k) this sorts two numbers, so it is a piecewise permutation:
  1-Lipschitz in L2 and gradient-norm preserving. Pairing halves rather than
  neighbours avoids an interleaving reshape; with learned weights on both
  sides the choice of pairs is immaterial. Elementwise selects are used
  instead of a sort, which is about 3x slower on CPU.
  """
  channels = x.shape[-1]
  if channels % 2:
    raise ValueError(f'MinMax needs an even number of channels, got {channels}')
  a, b = jnp.split(x, 2, axis=-1)
  # A select, not maximum/minimum: at ties a == b those split the gradient
  # 0.5/0.5, which shrinks gradient norms; a select keeps the Jacobian a
  # permutation everywhere.
  a_wins = a >= b
  return jnp.concatenate([jnp.where(a_wins, a, b), jnp.where(a_wins, b, a)],
                         axis=-1)
