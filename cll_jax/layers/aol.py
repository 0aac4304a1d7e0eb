"""Almost-orthogonal Lipschitz (AOL) layers (Prach & Lampert, ECCV 2022).

AOL rescales a free parameter P so that the layer is 1-Lipschitz for every
P (paper, thm. 1). In this library's convention y = x @ W + b, a dense P is
`(n_in, n_out)` and

    W = D P,  D = diag(d),  d_i = (sum_j |M_ij| + eps)^(-1/2),  M = P P^T.

Why (the paper's Schur-test argument): for ANY d > 0 with
d_i^2 r_i <= 1, r_i = sum_j |M_ij|, and any x,

    ||W^T x||^2 = x^T D M D x <= sum_ij |M_ij| |d_i x_i| |d_j x_j|
                <= sum_ij |M_ij| (d_i^2 x_i^2 + d_j^2 x_j^2) / 2
                = sum_i d_i^2 x_i^2 r_i <= ||x||^2.

So eps > 0 (the paper's 1e-6, kept here in training and evaluation; it is
also the guard against a zero row of P) only enlarges the denominator and
keeps the bound. The network applies its activation (MinMax) after the layer
(`activated`); AOL has no native stride: the network pools separately.

Convolutions (NHWC, HWIO parameter P `(k, k, c_in, c_out)`, odd k, stride 1,
zero padding k // 2): D scales the input channels, W[a, b, i, o] =
d_i P[a, b, i, o], with r_i = sum_{s, j} |K[s, i, j]| over the full
(2k - 1) x (2k - 1) autocorrelation of the kernel

    K[s, i, j] = sum_{a, b, o} P[a, b, i, o] P[a + s1, b + s2, j, o].

The zero-padded conv on any H x W input is S o C o E: E embeds the input
isometrically into l2(Z^2) (zeros outside), C is the conv on the infinite
grid, S keeps the output positions (norm 1). D commutes with E, and C^T C is
the convolution with K, whose absolute row sums are exactly r_i; the Schur
argument holds for it, so ||layer|| <= ||C D|| <= 1 at EVERY input size,
also below the autocorrelation's (2k - 1) x (2k - 1), where some of K's
terms never meet an input.

Floating point. The certified function is the eval-mode layer with the
diagonal d^ its forward pass computes (in float32 or float64, any summation
order). d^ is not the exact d: M^ = fl(P P^T) (K^ for a conv) is within
gamma_N |P| |P|^T entrywise (N = n_out, or k^2 c_out: the longest dot
product), so the paper's d^ can exceed r_i^(-1/2) and the layer 1. The eval
forward pass therefore builds its denominator from quantities it can bound:
with S_i = sum_j (|P| |P|^T)_ij (for a conv the autocorrelation of |P|,
sum_o Q[i, o] sum_j Q[j, o], Q[i, o] = sum_{a,b} |P[a, b, i, o]|: nonnegative
terms, so its computed value is within a relative gamma of its own count),

    r_i <= r^_i (1 + gamma_R) + gamma_N S^_i (1 + gamma_m) + F

(R terms of r^, m roundings of S^, F the absolute loss to flush-to-zero),
and it computes t_i = fl(c1 r^_i + c2 S^_i + eps') with c1, c2, eps' those
factors times (1 + gamma_4) (the 4 roundings of t) and (1 + 3 c_d u), so
t_i >= r_i (1 + 3 c_d u); then d^_i = rsqrt(t_i) (assumed within c_d = 4
ulps, as XLA's are) has d^_i^2 <= (1 + c_d u)^2 / t_i <= 1 / r_i, and the
Schur argument gives ||D^ P|| <= 1 exactly. `certified_bound` returns
1 + 2^-21 (8 float32 ulps on top, which would cover an rsqrt up to 16 ulps
off). The allowance costs the eval layer a contraction of d by about
gamma_N S_i / (2 r_i): ~1e-14 in float64 (the default certification
precision), but in float32 (measured, worst channel) 4e-4 for a 3x3 conv
with 64 channels, 4e-3 with 256 and 1e-2 with 512 (near-orthogonal
kernels, where S_i / r_i is largest): certify in float64. Training uses
the paper's d (no allowance, default matmul precision). Evaluation runs at
`precision=HIGHEST`: the error model above is that of IEEE sums of
products, for the autocorrelation (one convolution, as in the AOL code) as
for the layer's own conv, under `cll_jax.forward_error`'s assumption that
convolutions are evaluated as sums of products (direct or GEMM-based, not
Winograd or FFT algorithms, which cuDNN may choose in float32 on GPUs).

Rounding of the eval forward pass (`rounding_step`): W^ = fl(D^ P) is
within u |W| of W = D^ P, so fl(x W^ + b) = x W + b + r with
|r| <= gamma_{n+3} (|x| |W| + |b|) (n the dot length), and
|| |W| || <= sqrt(kh kw) ||W||_F <= sqrt(kh kw c_in) (each input channel of
W has ||W_i||_F^2 = d_i^2 K[0, i, i] <= d_i^2 r_i <= 1): the bounds of
`cll_jax.forward_error.linear_step` with that a priori A.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from cll_jax import _rounding
from cll_jax.layers import base
from cll_jax.operators import LinearOperator

# The paper's guard inside the square root (a denominator >= r_i keeps the
# bound; it also bounds d by 1000 where a row of P vanishes).
EPSILON = 1e-6
# Assumed accuracy of the forward pass's rsqrt, in units of the roundoff.
RSQRT_ULPS = 4
# The certified bound: 1 (proven under RSQRT_ULPS) plus 8 float32 ulps.
CERTIFIED_BOUND = 1.0 + 2.0 ** -21


def _compute_dtype(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def _up(x: float) -> float:
  """A float64 >= x for x computed by a few float64 roundings."""
  return math.nextafter(x * (1 + 2.0 ** -50), math.inf)


def _allowance(dtype, dot_length: int, row_terms: int,
               abs_roundings: int, flush_terms: int):
  """(c1, c2, eps') of the eval denominator t = c1 r^ + c2 S^ + eps'."""
  u = _rounding.unit_roundoff(dtype)
  gamma = functools.partial(_rounding.gamma, dtype=dtype)
  common = _up((1 + gamma(4)) * (1 + 3 * RSQRT_ULPS * u))
  c1 = _up((1 + gamma(row_terms)) * common)
  c2 = _up(gamma(dot_length) * (1 + gamma(abs_roundings)) * common)
  flush = _up(4.0 * flush_terms * float(jnp.finfo(dtype).tiny) * common)
  return c1, c2, max(EPSILON, flush)


def _scales_from(r_hat: jax.Array, s_hat: jax.Array | None, dtype,
                 constants) -> jax.Array:
  """rsqrt of the denominator: the paper's (training) or the bounded one."""
  if s_hat is None:
    return jax.lax.rsqrt(r_hat + jnp.asarray(EPSILON, dtype))
  c1, c2, eps = (_rounding.round_up_into(c, dtype) for c in constants)
  return jax.lax.rsqrt(c1 * r_hat + c2 * s_hat + eps)


def dense_scales(p: jax.Array, training: bool) -> jax.Array:
  """d of a dense AOL parameter `(n_in, n_out)` (module docstring)."""
  dtype = _compute_dtype(p.dtype)
  p = p.astype(dtype)
  precision = None if training else base.HIGHEST
  gram = jnp.matmul(p, p.T, precision=precision)
  r_hat = jnp.sum(jnp.abs(gram), axis=1)
  if training:
    return _scales_from(r_hat, None, dtype, None)
  n_in, n_out = p.shape
  a = jnp.abs(p)
  # S_i = sum_o |P_io| sum_j |P_jo|: n_in + n_out + 1 roundings per path.
  s_hat = jnp.matmul(a, jnp.sum(a, axis=0), precision=precision)
  # Flushed terms per row: n_in dot products of n_out, S's n_in n_out
  # products, r's n_in terms.
  constants = _allowance(dtype, n_out, n_in, n_in + n_out + 2,
                         2 * n_in * n_out + n_in)
  return _scales_from(r_hat, s_hat, dtype, constants)


def autocorrelation_row_sums(p: jax.Array, precision=None) -> jax.Array:
  """r^_i = sum_{s, j} |K[s, i, j]| over the full autocorrelation of p.

  K is one convolution, as in the AOL code: the kernel's copies for each j
  (as a batch of c_out-channel images, zero-padded by k - 1) correlated
  with the kernel itself, giving K[s, i, j] at output (j, s + k - 1, i):
  sums of at most k^2 c_out products (the padding adds exact zeros).
  """
  k = p.shape[0]
  images = p.transpose(2, 0, 1, 3)  # (j, a, b, o)
  kernel = p.transpose(0, 1, 3, 2)  # (a, b, o, i)
  k_hat = jax.lax.conv_general_dilated(
      images, kernel, (1, 1), ((k - 1, k - 1), (k - 1, k - 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=precision)
  return jnp.sum(jnp.abs(k_hat), axis=(0, 1, 2))


def conv_scales(p: jax.Array, training: bool) -> jax.Array:
  """d of an AOL conv parameter `(k, k, c_in, c_out)` (module docstring)."""
  dtype = _compute_dtype(p.dtype)
  p = p.astype(dtype)
  precision = None if training else base.HIGHEST
  r_hat = autocorrelation_row_sums(p, precision)
  if training:
    return _scales_from(r_hat, None, dtype, None)
  k, _, c_in, c_out = p.shape
  q = jnp.sum(jnp.abs(p), axis=(0, 1))  # (c_in, c_out)
  # S_i = sum_o Q[i, o] sum_j Q[j, o]: the autocorrelation of |P| summed
  # over all shifts and j; k^2 + c_in + c_out + 1 roundings per path.
  s_hat = jnp.matmul(q, jnp.sum(q, axis=0), precision=precision)
  dot_length = k * k * c_out
  row_terms = (2 * k - 1) ** 2 * c_in
  constants = _allowance(
      dtype, dot_length, row_terms, k * k + c_in + c_out + 2,
      row_terms * dot_length + k * k * c_in * c_out + row_terms)
  return _scales_from(r_hat, s_hat, dtype, constants)


def dense_weight(p: jax.Array, training: bool) -> jax.Array:
  """W = D P, the dense layer's kernel as its forward pass computes it."""
  return p.astype(_compute_dtype(p.dtype)) * dense_scales(p, training)[:, None]


def conv_weight(p: jax.Array, training: bool) -> jax.Array:
  """W[a, b, i, o] = d_i P[a, b, i, o], as the forward pass computes it."""
  return (p.astype(_compute_dtype(p.dtype))
          * conv_scales(p, training)[None, None, :, None])


def repeated_orthogonal(key, shape, dtype=jnp.float32) -> jax.Array:
  """The AOL code's dense init: each pair of rows identical or orthogonal.

  With n_in <= n_out the rows are orthonormal. Otherwise each row is drawn
  (with replacement) from an orthonormal basis of R^{n_out} and divided by
  the square root of how often its basis vector was drawn, so that D P = P
  (r_i = 1) and the layer starts with norm 1.
  """
  rows, cols = math.prod(shape[:-1]), shape[-1]
  orthogonal = nn.initializers.orthogonal()
  basis_key, pick_key = jax.random.split(key)
  if rows <= cols:
    return orthogonal(basis_key, (rows, cols), dtype).reshape(shape)
  basis = orthogonal(basis_key, (cols, cols), dtype)
  picks = jax.random.randint(pick_key, (rows,), 0, cols)
  one_hot = jax.nn.one_hot(picks, cols, dtype=dtype)
  counts = jnp.maximum(jnp.sum(one_hot, axis=0), 1.0)
  return ((one_hot / jnp.sqrt(counts)) @ basis).reshape(shape)


def orthogonal_center(key, shape, dtype=jnp.float32) -> jax.Array:
  """The AOL code's conv init: an orthogonal matrix at the central tap."""
  kh, kw, c_in, c_out = shape
  center = nn.initializers.orthogonal()(key, (c_in, c_out), dtype)
  return jnp.zeros(shape, dtype).at[kh // 2, kw // 2].set(center)


def _check_kernel_size(kernel_size: int) -> None:
  if kernel_size < 1 or kernel_size % 2 == 0:
    raise ValueError(f'AOL convs use an odd kernel size with zero padding '
                     f'k // 2 (stride 1, same size), got {kernel_size}')


class AOLDense(nn.Module):
  """AOL dense layer: `(x @ D P + b, 1)` (module docstring)."""
  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    if x.ndim != 2:
      raise ValueError(f'AOLDense expects (batch, features) inputs, got '
                       f'shape {x.shape}')
    p = self.param('kernel', repeated_orthogonal,
                   (x.shape[-1], self.features), jnp.float32)
    w = dense_weight(p.astype(x.dtype), base.is_training(self))
    y = jnp.matmul(x, w.astype(x.dtype), precision=base.precision(self))
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,),
                         jnp.float32).astype(y.dtype)
    return y, jnp.ones((), jnp.float32)


def _conv_operator(kernel: jax.Array, input_shape, precision=None
                   ) -> LinearOperator:
  pad = kernel.shape[0] // 2
  return LinearOperator(kernel, 'conv', tuple(input_shape), (1, 1),
                        ((pad, pad), (pad, pad)), precision=precision)


class AOLConv(nn.Module):
  """AOL convolution (NHWC, stride 1, zero padding k // 2): `(y, 1)`."""
  features: int
  kernel_size: int = 3
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    if x.ndim != 4:
      raise ValueError(f'AOLConv expects NHWC input, got shape {x.shape}')
    _check_kernel_size(self.kernel_size)
    k = self.kernel_size
    p = self.param('kernel', orthogonal_center,
                   (k, k, x.shape[-1], self.features), jnp.float32)
    w = conv_weight(p.astype(x.dtype), base.is_training(self))
    op = _conv_operator(w.astype(x.dtype), x.shape[1:],
                        base.precision(self))
    y = op(x)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,),
                         jnp.float32).astype(y.dtype)
    return y, jnp.ones((), jnp.float32)


def _certified_bound() -> jax.Array:
  return jnp.asarray(CERTIFIED_BOUND, jnp.float32)


def _rounding_step(op: LinearOperator, bias, abs_norm: float, norm, forms, *,
                   dtype, forward_dtype):
  """(X, E) after y = x W + b with W = fl(D^ P) (module docstring):
  `forward_error.linear_step` with gamma_{n+3} (the two roundings of W's
  entries) and the a priori A = abs_norm (1 + u)."""
  from cll_jax import forward_error  # pylint: disable=g-import-not-at-top
  u = _rounding.unit_roundoff(forward_dtype)
  return forward_error.linear_step(
      op, bias, norm, forms, dtype=dtype, forward_dtype=forward_dtype,
      abs_norm=_up(abs_norm * (1 + u)), extra_roundings=2)


@dataclasses.dataclass(frozen=True)
class AOLDenseSpec:
  """An `AOLDense` layer of a network: n_in -> `features`."""
  features: int

  bound_kind: ClassVar[str] = base.PROVEN
  flattens: ClassVar[bool] = True
  activated: ClassVar[bool] = True

  def __post_init__(self):
    if self.features < 1:
      raise ValueError(f'AOLDenseSpec features must be >= 1, got '
                       f'{self.features}')

  def module(self, name: str, num_power_iterations: int) -> nn.Module:
    del num_power_iterations  # no power iteration: the bound is proven
    return AOLDense(self.features, name=name)

  def output_shape(self, input_shape) -> tuple[int, ...]:
    del input_shape
    return (self.features,)

  def _check(self, params, input_shape) -> None:
    shape = tuple(params['kernel'].shape)
    if shape != (math.prod(input_shape), self.features):
      raise ValueError(f'AOLDenseSpec({self.features}) on input shape '
                       f'{tuple(input_shape)} needs a kernel of shape '
                       f'{(math.prod(input_shape), self.features)}, got '
                       f'{shape}')

  def certified_bound(self, variables, input_shape) -> jax.Array:
    """1 + 2^-21: ||D^ P|| <= 1 for the computed D^ (module docstring)."""
    self._check(variables['params'], input_shape)
    return _certified_bound()

  def power_iteration_operators(self, params, input_shape):
    del params, input_shape
    return {}

  def rounding_step(self, variables, input_shape, forms, norm, *, dtype,
                    forward_dtype):
    params = variables['params']
    self._check(params, input_shape)
    n_in = math.prod(input_shape)
    op = LinearOperator(params['kernel'], 'dense', (n_in,))
    return _rounding_step(op, params.get('bias'), math.sqrt(n_in), norm,
                          forms, dtype=dtype, forward_dtype=forward_dtype)


@dataclasses.dataclass(frozen=True)
class AOLConvSpec:
  """An `AOLConv` layer: c_in -> `features`, stride 1, same size."""
  features: int
  kernel_size: int = 3

  bound_kind: ClassVar[str] = base.PROVEN
  flattens: ClassVar[bool] = False
  activated: ClassVar[bool] = True

  def __post_init__(self):
    if self.features < 1:
      raise ValueError(f'AOLConvSpec features must be >= 1, got '
                       f'{self.features}')
    _check_kernel_size(self.kernel_size)

  def module(self, name: str, num_power_iterations: int) -> nn.Module:
    del num_power_iterations
    return AOLConv(self.features, self.kernel_size, name=name)

  def output_shape(self, input_shape) -> tuple[int, ...]:
    h, w, _ = input_shape
    return (h, w, self.features)

  def _check(self, params, input_shape) -> None:
    k = self.kernel_size
    want = (k, k, input_shape[-1], self.features)
    if tuple(params['kernel'].shape) != want:
      raise ValueError(f'AOLConvSpec on input shape {tuple(input_shape)} '
                       f'needs a kernel of shape {want}, got '
                       f'{tuple(params["kernel"].shape)}')

  def certified_bound(self, variables, input_shape) -> jax.Array:
    """1 + 2^-21 at any input size (zero padding; module docstring)."""
    self._check(variables['params'], input_shape)
    return _certified_bound()

  def power_iteration_operators(self, params, input_shape):
    del params, input_shape
    return {}

  def rounding_step(self, variables, input_shape, forms, norm, *, dtype,
                    forward_dtype):
    params = variables['params']
    self._check(params, input_shape)
    op = _conv_operator(params['kernel'], input_shape)
    k = self.kernel_size
    return _rounding_step(op, params.get('bias'),
                          math.sqrt(k * k * input_shape[-1]), norm, forms,
                          dtype=dtype, forward_dtype=forward_dtype)


__all__ = ['AOLConv', 'AOLConvSpec', 'AOLDense', 'AOLDenseSpec',
           'CERTIFIED_BOUND', 'conv_weight', 'dense_weight']

