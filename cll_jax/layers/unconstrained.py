"""Unconstrained dense and conv layers: trained with power iteration.

Bound kind: ESTIMATED. Each layer returns `(y, sigma)`, sigma the current
power-iteration estimate of the spectral norm of its linear map (from
below; the vector lives in the `power_iteration` collection, one per layer,
shaped like one input example, and advances `num_power_iterations` steps per
training call). The certified bound is a guaranteed upper bound of the same
operator's norm (`cll_jax.sound_bounds`: Gram iteration, convs through an
enclosing circular convolution), with a float-rounding allowance.

Flax's `nn.SpectralNorm` normalises the reshaped kernel matrix, whose norm is
not the operator norm of a convolution; these layers run power iteration on
the convolution itself (input shape, stride, padding), see
`cll_jax.operators.LinearOperator`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from cll_jax.layers import base
from cll_jax.operators import LinearOperator, conv_output_spatial

kaiming_normal = base.kaiming_normal


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
    op = LinearOperator(kernel, 'dense', (x.shape[-1],),
                        precision=base.precision(self))
    y = op(x)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,),
                         self.param_dtype)
    return y, base.power_iterated_norm(self, op, self.num_power_iterations)


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
                        (self.stride, self.stride), (pad, pad),
                        precision=base.precision(self))
    y = op(x)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,),
                         self.param_dtype)
    return y, base.power_iterated_norm(self, op, self.num_power_iterations)


def _sound_norm(op: LinearOperator) -> jax.Array:
  from cll_jax import sound_bounds  # pylint: disable=g-import-not-at-top
  # The allowance covers the float32 rounding of the bound's computation
  # (see `sound_bounds`).
  return base.round_up(sound_bounds.operator_norm_upper_bound(op),
                       sound_bounds.DEFAULT_RELATIVE_FLOAT_ALLOWANCE)


class _EstimatedLinearSpec:
  """What Conv and Dense share: a linear map plus bias, whose certified bound
  is a sound upper bound of its operator norm."""

  def certified_bound(self, variables, input_shape) -> jax.Array:
    return _sound_norm(self.operator(variables['params'], input_shape))

  def power_iteration_operators(self, params, input_shape):
    return {'u': self.operator(params, input_shape)}

  def rounding_step(self, variables, input_shape, forms, norm, *, dtype,
                    forward_dtype):
    """The forward pass's rounding error (`forward_error.linear_step`)."""
    from cll_jax import forward_error  # pylint: disable=g-import-not-at-top
    params = variables['params']
    return forward_error.linear_step(
        self.operator(params, input_shape), params.get('bias'), norm, forms,
        dtype=dtype, forward_dtype=forward_dtype)


@dataclasses.dataclass(frozen=True)
class Conv(_EstimatedLinearSpec):
  """c(features, kernel_size, stride, padding) of CLL table B2."""
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0

  bound_kind: ClassVar[str] = base.ESTIMATED
  flattens: ClassVar[bool] = False
  activated: ClassVar[bool] = True

  def module(self, name: str, num_power_iterations: int) -> nn.Module:
    return LipschitzConv(self.features, self.kernel_size, self.stride,
                         self.padding,
                         num_power_iterations=num_power_iterations,
                         name=name)

  def operator(self, params, input_shape) -> LinearOperator:
    pad = (self.padding, self.padding)
    return LinearOperator(params['kernel'], 'conv', tuple(input_shape),
                          (self.stride, self.stride), (pad, pad),
                          precision=base.HIGHEST)

  def output_shape(self, input_shape) -> tuple[int, ...]:
    h, w, _ = input_shape
    pad = (self.padding, self.padding)
    return (conv_output_spatial(h, self.kernel_size, self.stride, pad),
            conv_output_spatial(w, self.kernel_size, self.stride, pad),
            self.features)


@dataclasses.dataclass(frozen=True)
class Dense(_EstimatedLinearSpec):
  """d(features) of CLL table B2."""
  features: int

  bound_kind: ClassVar[str] = base.ESTIMATED
  flattens: ClassVar[bool] = True
  activated: ClassVar[bool] = True

  def module(self, name: str, num_power_iterations: int) -> nn.Module:
    return LipschitzDense(self.features,
                          num_power_iterations=num_power_iterations,
                          name=name)

  def operator(self, params, input_shape) -> LinearOperator:
    return LinearOperator(params['kernel'], 'dense',
                          (math.prod(input_shape),), precision=base.HIGHEST)

  def output_shape(self, input_shape) -> tuple[int, ...]:
    del input_shape
    return (self.features,)
