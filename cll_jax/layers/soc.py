"""Skew orthogonal convolutions and dense layers (Singla & Feizi, ICML 2021).

A skew-symmetric operator A (A^T = -A) has an orthogonal exponential
exp(A). SOC builds A from a free kernel L:

* conv: A = conv(L - L*), L* the kernel with input/output channels swapped
  and both spatial axes flipped. With odd kernel size k, stride 1 and zero
  padding k // 2, conv(L*) is exactly the adjoint of conv(L), so A is
  skew-adjoint on the layer's input space;
* dense: A = W - W^T.

and scales it, A <- (max_norm / sigma) A with sigma a power-iteration
estimate of ||A|| (the vector lives in the `power_iteration` collection). The
layer computes y = p_T(A) x + b with the truncated series
p_T(A) = sum_{k < T} A^k / k! (T = `terms_train` in training, `terms_eval`
otherwise), evaluated by Horner's rule.

Bound (kind PROVEN). A is real skew-symmetric, hence normal with eigenvalues
i t, |t| <= ||A||, and p_T(A) is normal with eigenvalues p_T(i t), so

    ||p_T(A)|| = max_t |p_T(i t)| <= max_{|t| <= a} |p_T(i t)|
               <= min(1 + sum_{k >= T} a^k / k!,  sum_{k < T} a^k / k!)

for any a >= ||A|| (|p_T(i t)| <= |e^{i t}| + |remainder|, or the triangle
inequality term by term). `series_norm_bound` evaluates this with the
remainder bounded by a^T / T! / (1 - a / (T + 1)) (a geometric series, for
a < T + 1), rounded up. The certificate takes a from a *sound* upper bound
of ||conv(L - L*)|| (`cll_jax.sound_bounds`) times the layer's scale, never
from the power-iteration estimate, so a truncation that leaves the layer at
1.004 is certified as at least 1.004, not 1. With the default max_norm 1.5
and T = 15 the bound is 1 + 5e-7 (the float32 rounding allowance; the
remainder is 4e-10); in training (T = 6) 1 + 0.02, while the true norm of
p_6 there is at most 1.0045 (`series_peak`, what the training loss uses).

max_norm plays the role of SOC's normalisation: SOC divides by the smallest
of four reshaped-kernel norm estimates, which leaves ||A|| between about 1
and 3 for 3x3 kernels; a fixed target makes the truncation error known.

Resolution and width changes (norm 1, see `cll_jax.layers.orthogonal`):
stride 2 is an invertible downsampling (space-to-depth, 4x the channels)
before the SOC conv; more output than input channels zero-pads the input
channels (then the layer is an isometry), fewer keeps the first output
channels (a projection: the layer is not orthogonal, still 1-Lipschitz).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cll_jax.layers import base
from cll_jax.layers import orthogonal
from cll_jax.operators import LinearOperator

_TINY = 1e-30


def transpose_kernel(kernel: jax.Array) -> jax.Array:
  """L*: the HWIO kernel of the adjoint of a stride-1 'same' conv."""
  return jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)


def exp_series(apply: Callable[[jax.Array], jax.Array], x: jax.Array,
               terms: int) -> jax.Array:
  """sum_{k < terms} A^k x / k! by Horner's rule (terms - 1 applications)."""
  if terms < 1:
    raise ValueError(f'the series needs at least 1 term, got {terms}')
  z = x
  for i in range(terms - 1, 0, -1):
    z = x + apply(z) / i
  return z


def series_norm_bound(a: jax.Array, terms: int) -> jax.Array:
  """Upper bound of max_{|t| <= a} |sum_{k < terms} (i t)^k / k!|.

  min(1 + remainder bound, sum_{k < terms} a^k / k!) (module docstring),
  computed in the dtype of `a` (at least float32). The powers are built by
  repeated multiplication, a^k / k! = (a^{k-1} / (k-1)!) * a / k, so each
  carries at most 2k rounding errors and each sum of positive terms at most
  `terms` more: each sum, or the remainder, is scaled up by 4 (terms + 1)
  ulps, and 1 + remainder by 4 more. Sound for any a >= 0 (the remainder
  form only where a < terms + 1).
  """
  a = jnp.asarray(a)
  a = a.astype(jnp.promote_types(a.dtype, jnp.float32))
  term = jnp.ones_like(a)
  partial = jnp.ones_like(a)
  for k in range(1, terms):
    term = term * a / k
    partial = partial + term
  first = term * a / terms  # a^T / T!
  ratio = a / (terms + 1)
  remainder = jnp.where(ratio < 1, first / jnp.maximum(1 - ratio, _TINY),
                        jnp.inf)
  ulp = float(jnp.finfo(a.dtype).eps)
  sums = 1.0 + 4 * (terms + 1) * ulp
  # The remainder's own errors scale the (tiny) remainder only; adding 1
  # and the scaling round once more each (4 ulps of the total cover both).
  return jnp.minimum((1.0 + remainder * sums) * (1.0 + 4 * ulp),
                     partial * sums)


def series_peak(a: float, terms: int, points: int = 2001) -> float:
  """max_{|t| <= a} |p_T(i t)| on a grid: an estimate (not a bound).

  What the training loss uses as the layer's constant; the certificate uses
  `series_norm_bound`.
  """
  t = np.linspace(0.0, float(a), points)
  z = np.zeros_like(t, dtype=np.complex128)
  term = np.ones_like(z)
  for k in range(terms):
    z += term
    term = term * (1j * t) / (k + 1)
  return float(np.max(np.abs(z)))


def _skew_conv_operator(kernel: jax.Array, input_shape, precision=None
                        ) -> LinearOperator:
  k = kernel.shape[0]
  pad = (k // 2, k // 2)
  return LinearOperator(kernel - transpose_kernel(kernel), 'conv',
                        tuple(input_shape), (1, 1), (pad, pad),
                        precision=precision)


def _skew_dense_operator(kernel: jax.Array, precision=None) -> LinearOperator:
  return LinearOperator(kernel - kernel.T, 'dense', (kernel.shape[0],),
                        precision=precision)


def _soc_apply(module: nn.Module, op: LinearOperator, x: jax.Array,
               features: int, max_norm: float, terms_train: int,
               terms_eval: int, num_power_iterations: int,
               use_bias: bool) -> tuple[jax.Array, jax.Array]:
  """y = p_T(scale * op) x, cropped to `features`, plus bias; and its value."""
  sigma = base.power_iterated_norm(module, op, num_power_iterations)
  scale = max_norm / jnp.maximum(sigma, _TINY)
  terms = terms_train if base.is_training(module) else terms_eval
  y = exp_series(lambda z: scale * op(z), x, terms)
  y = orthogonal.keep_channels(y, features)
  if use_bias:
    y = y + module.param('bias', nn.initializers.zeros, (features,),
                         jnp.float32).astype(y.dtype)
  return y, jnp.asarray(series_peak(max_norm, terms), jnp.float32)


def _check_soc(terms_train: int, terms_eval: int, max_norm: float) -> None:
  if terms_train < 1 or terms_eval < 1:
    raise ValueError(f'SOC needs terms >= 1, got terms_train={terms_train}, '
                     f'terms_eval={terms_eval}')
  if not max_norm > 0:
    raise ValueError(f'SOC max_norm must be > 0, got {max_norm}')


class SOCConv(nn.Module):
  """Skew orthogonal convolution (NHWC): `(p_T(A) x + b, constant)`.

  Attributes:
    features: output channels.
    kernel_size: odd kernel size k (zero padding k // 2).
    stride: 1, or 2 for an invertible downsampling first.
    max_norm: ||A|| after scaling (from the power-iteration estimate).
    terms_train, terms_eval: series terms T in training / evaluation.
    num_power_iterations: power-iteration steps per training call.
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  max_norm: float = 1.5
  terms_train: int = 6
  terms_eval: int = 15
  num_power_iterations: int = 1
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    if x.ndim != 4:
      raise ValueError(f'SOCConv expects NHWC input, got shape {x.shape}')
    if self.kernel_size % 2 == 0:
      raise ValueError(f'SOC needs an odd kernel size (its skew-adjoint '
                       f'construction), got {self.kernel_size}')
    if self.stride not in (1, 2):
      raise ValueError(f'SOC stride must be 1 or 2, got {self.stride}')
    _check_soc(self.terms_train, self.terms_eval, self.max_norm)
    x = orthogonal.space_to_depth(x, self.stride)
    channels = max(x.shape[-1], self.features)
    x = orthogonal.pad_channels(x, channels)
    k = self.kernel_size
    kernel = self.param(
        'kernel', nn.initializers.normal(1.0 / math.sqrt(channels)),
        (k, k, channels, channels), jnp.float32).astype(x.dtype)
    op = _skew_conv_operator(kernel, x.shape[1:], base.precision(self))
    return _soc_apply(self, op, x, self.features, self.max_norm,
                      self.terms_train, self.terms_eval,
                      self.num_power_iterations, self.use_bias)


class SOCDense(nn.Module):
  """Skew orthogonal dense layer: `(p_T(A) x + b, constant)`, A = W - W^T."""
  features: int
  max_norm: float = 1.5
  terms_train: int = 6
  terms_eval: int = 15
  num_power_iterations: int = 1
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    _check_soc(self.terms_train, self.terms_eval, self.max_norm)
    channels = max(x.shape[-1], self.features)
    x = orthogonal.pad_channels(x, channels)
    kernel = self.param(
        'kernel', nn.initializers.normal(1.0 / math.sqrt(channels)),
        (channels, channels), jnp.float32).astype(x.dtype)
    op = _skew_dense_operator(kernel, base.precision(self))
    return _soc_apply(self, op, x, self.features, self.max_norm,
                      self.terms_train, self.terms_eval,
                      self.num_power_iterations, self.use_bias)


# Operators with at most this many inputs are bounded on their explicit
# matrix as well: at small resolutions (the last SOC blocks work on 2x2 and
# 1x1 maps) the circular embedding of a zero-padded conv is loose (it lets
# the kernel wrap around), the explicit matrix is the operator itself.
EXPLICIT_MATRIX_MAX_INPUTS = 2048


def sound_operator_norm(op: LinearOperator) -> jax.Array:
  """A guaranteed upper bound of ||op||, tightened for small operators."""
  from cll_jax import sound_bounds  # pylint: disable=g-import-not-at-top
  bound = sound_bounds.operator_norm_upper_bound(op)
  if op.kind == 'conv' and math.prod(op.input_shape) <= (
      EXPLICIT_MATRIX_MAX_INPUTS):
    # The explicit matrix's entries are the kernel's (each basis vector's
    # image copies weights, no rounding), so both bounds are of one map.
    bound = jnp.minimum(bound, sound_bounds.dense_norm_upper_bound(
        op.dense_matrix().T))
  return bound


def _certified_series_bound(op: LinearOperator, u: jax.Array,
                            max_norm: float, terms: int) -> jax.Array:
  """The proven bound of p_T(scale * op), scale as the forward pass's."""
  from cll_jax import sound_bounds  # pylint: disable=g-import-not-at-top
  allowance = sound_bounds.DEFAULT_RELATIVE_FLOAT_ALLOWANCE
  sigma = jnp.linalg.norm(op(u))
  # The allowance also covers an ulp of difference between this sigma and
  # the forward pass's (the same computation, compiled elsewhere).
  a = (max_norm / jnp.maximum(sigma, _TINY) * sound_operator_norm(op)
       * (1 + allowance))
  return series_norm_bound(a, terms)


class _SeriesSpec:
  """What SOCConvSpec and SOCDenseSpec share: the series' proven bound, its
  power iteration and its rounding step, all through `self.operator`."""

  def certified_bound(self, variables, input_shape) -> jax.Array:
    return self.proven_bound(variables, input_shape, training=False)

  def proven_bound(self, variables, input_shape,
                   training: bool = False) -> jax.Array:
    """The layer's proven bound with the terms of training or evaluation.

    `variables` holds the power-iteration vector the forward pass used (in
    training: the one it returned, after its update).
    """
    op = self.operator(variables['params'], input_shape)
    return _certified_series_bound(
        op, variables[base.POWER_ITERATION]['u'], self.max_norm,
        self.terms_train if training else self.terms_eval)

  def power_iteration_operators(self, params, input_shape):
    return {'u': self.operator(params, input_shape)}

  def rounding_step(self, variables, input_shape, forms, norm, *, dtype,
                    forward_dtype):
    """The eval forward pass's rounding error (`forward_error.soc_step`)."""
    del norm  # the series' own bound enters through a
    from cll_jax import forward_error  # pylint: disable=g-import-not-at-top
    params = variables['params']
    op = self.operator(params, input_shape)
    positions = math.prod(self.output_shape(input_shape)[:-1])
    return forward_error.soc_step(
        op, variables[base.POWER_ITERATION]['u'], self.max_norm,
        self.terms_eval, params.get('bias'), positions, forms, dtype=dtype,
        forward_dtype=forward_dtype)


@dataclasses.dataclass(frozen=True)
class SOCConvSpec(_SeriesSpec):
  """An `SOCConv` layer of a network (see the module docstring)."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  max_norm: float = 1.5
  terms_train: int = 6
  terms_eval: int = 15

  bound_kind: ClassVar[str] = base.PROVEN
  flattens: ClassVar[bool] = False
  activated: ClassVar[bool] = True

  def module(self, name: str, num_power_iterations: int) -> nn.Module:
    return SOCConv(self.features, self.kernel_size, self.stride,
                   self.max_norm, self.terms_train, self.terms_eval,
                   num_power_iterations=num_power_iterations, name=name)

  def _inner_shape(self, input_shape) -> tuple[int, ...]:
    h, w, c = orthogonal.space_to_depth_shape(tuple(input_shape), self.stride)
    return (h, w, max(c, self.features))

  def output_shape(self, input_shape) -> tuple[int, ...]:
    h, w, _ = self._inner_shape(input_shape)
    return (h, w, self.features)

  def operator(self, params, input_shape) -> LinearOperator:
    return _skew_conv_operator(params['kernel'], self._inner_shape(input_shape),
                               base.HIGHEST)


@dataclasses.dataclass(frozen=True)
class SOCDenseSpec(_SeriesSpec):
  """An `SOCDense` layer of a network (see the module docstring)."""
  features: int
  max_norm: float = 1.5
  terms_train: int = 6
  terms_eval: int = 15

  bound_kind: ClassVar[str] = base.PROVEN
  flattens: ClassVar[bool] = True
  activated: ClassVar[bool] = True

  def module(self, name: str, num_power_iterations: int) -> nn.Module:
    return SOCDense(self.features, self.max_norm, self.terms_train,
                    self.terms_eval,
                    num_power_iterations=num_power_iterations, name=name)

  def output_shape(self, input_shape) -> tuple[int, ...]:
    del input_shape
    return (self.features,)

  def operator(self, params, input_shape) -> LinearOperator:
    del input_shape
    return _skew_dense_operator(params['kernel'], base.HIGHEST)
