"""SDP-based Lipschitz Layers (Araujo, Havens, Delattre, Allauzen, Hu, ICLR
2023, "A Unified Algebraic Perspective on Lipschitz Neural Networks", arXiv
2303.03169, theorem 3):

    y = x - 2 W T^-1 relu(W^T x + b),
    T = diag(t),  t_i = sum_j |W^T W|_ij q_j / q_i,  q = exp(q_tilde).

Dense (`SLLDense`): W is `(d, features)`, W^T x = x @ kernel. Conv
(`SLLConv`, NHWC, stride 1, zero padding k // 2, odd k): W^T x is the conv
with kernel K `(k, k, c, features)` (c -> features channels) and W its
adjoint, the flipped conv (`_residual.conv_operators`); |W^T W| is the
kernel's autocorrelation, t_i = sum over the (2k - 1)^2 offsets delta and j
of |M_ij(delta)| q_j / q_i with M_ij(delta) = sum_{a, c} K[a + delta, c, i]
K[a, c, j] (`_gram_terms`). The ReLU is inside: the network applies no
activation after the layer (`activated = False`).

Why it is 1-Lipschitz (the proof the implementation keeps). Write C = W^T
(the inner map) and s_i the scale of hidden unit i (s = 2 / t). The
Jacobian is J = I - C^T S D C, D = diag(relu') in [0, 1]. If
C C^T <= T (Loewner order, T acting on the hidden channels at every
position) and 0 <= s_i <= 2 / t_i, then with D' = S T D / 2 in [0, 1],
J = I - 2 C^T T^{-1/2} D' T^{-1/2} C, and
0 <= C^T T^{-1/2} D' T^{-1/2} C <= ||T^{-1/2} C||^2 I <= I, so J is symmetric
with eigenvalues in [-1, 1]: ||J|| <= 1 (and the Lipschitz constant, the
Jacobians' set being convex).

* C C^T <= T (Gershgorin with the positive weights q): Q (T - C C^T) Q with
  Q = diag(q) has diagonal q_i^2 (t_i - M_ii(0)) and absolute off-diagonal
  row sums q_i sum_{(delta, j) != (0, i)} |M_ij(delta)| q_j; t_i >= the full
  sum makes it diagonally dominant with a nonnegative diagonal, hence PSD.
  This holds for ANY vector q > 0, e.g. the one the forward pass computes
  (whatever the accuracy of its exp). For the zero-padded conv on a finite
  image the rows at the border are partial sums, which Gershgorin alone
  does not bound; instead C = R C_circ E (`sound_bounds.conv_embedding`: E
  an isometric embedding into the padded grid, C_circ the circular conv, R
  a restriction of outputs), so C C^T <= R C_circ C_circ^T R^T, and
  C_circ C_circ^T is the circular conv with kernel M (aliased offsets
  summed: |sum| <= sum |.|), dominated by T on the grid; R T R^T = T.
  Valid at every input size.
* Any t' >= t keeps C C^T <= T' (so s = 2 / t' <= 2 / t): the forward pass
  uses t_up >= t, rounded up rigorously from the float computation
  (`t_upper`: the computed Gram terms' error gamma_d |W|^T |W|, the sums'
  relative gamma and an absolute allowance for underflow are added, then
  `_rounding.inflate`), so the layer it evaluates, with the scale 2 / t_up
  it uses, is 1-Lipschitz whatever the float error of t. The allowance is
  a worst case, ~ (d + S f) u relative (3e-12 in float64 for a 3x3 conv
  with 120 channels, 0.16% in float32), so the evaluation layer is a hair
  more contractive than the paper's; training uses the plain float t (not
  certified, and 0.16% per layer would compound: `sll_scale`). The tiny
  absolute terms also keep
  t_up > 0, so no epsilon is needed against division by zero; a hidden
  unit whose kernel is entirely zero (or subnormal, read as zero) gets
  s_i = 0 (allowed: its term vanishes), which keeps 0 * inf from arising.

So `certified_bound` is exactly 1 for the function the eval forward pass
computes (the `power_iteration` collection frozen: HIGHEST precision, and
IEEE arithmetic, which t_up relies on);
`rounding_step` bounds the forward pass's remaining float error. Note the
function's scale is the forward pass's own t_up (a float vector, dtype- and
compile-dependent by ulps): every such function is 1-Lipschitz.

The first published dense code divided by |q| + eps against q = |q|, which
breaks the Gershgorin scaling (not 1-Lipschitz); the authors' later code
(and this one) uses q_j / q_i with q = exp(q_tilde), normalised here by
max(q_tilde) (the ratios are unchanged; exp cannot overflow) and floored at
the smallest normal float (q stays a positive vector).

Initialisation as the authors' code: kernel Glorot (Xavier) normal, q_tilde
standard normal, bias uniform in +-1 / sqrt(fan_in) (fan_in = d, or k^2 c).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from cll_jax import _rounding
from cll_jax.layers import _residual
from cll_jax.layers import base

_xavier_normal = nn.initializers.variance_scaling(1.0, 'fan_avg', 'normal')
# Products of the q-weighted sums that may be evaluated from two separate
# computations of q = exp(.) (XLA may duplicate an elementwise op into
# several fusions): each within 4 ulps of the other's, so the ratio
# q_j / q_i of the numerator and the denominator is off by at most
# (1 + 4u) / (1 - 4u) <= 1 + gamma_8.
_Q_DUPLICATION_ROUNDINGS = 8
_TAU32 = float(jnp.finfo(jnp.float32).tiny)


def _bias_init(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _gram_terms(kernel: jax.Array, precision) -> tuple[jax.Array, int]:
  """(M, d): M `(S, f, f)` the Gram terms of C C^T, d their dot length.

  Dense `(d, f)`: S = 1, M[0] = W^T W. Conv `(k, k, c, f)`: S = (2k - 1)^2
  offsets delta, M[delta, i, j] = sum_{a, c} K[a + delta, c, i] K[a, c, j]
  (K zero outside its taps), each a sum of k^2 c products (the zeros of the
  padded kernel are exact).
  """
  if kernel.ndim == 2:
    return (jnp.einsum('di,dj->ij', kernel, kernel,
                       precision=precision)[None], int(kernel.shape[0]))
  k, _, c, f = kernel.shape
  s = 2 * k - 1
  padded = jnp.pad(kernel, ((k - 1, k - 1), (k - 1, k - 1), (0, 0), (0, 0)))
  # windows[p, r, a, b] = padded[p + a, r + b] = K[a + delta] with
  # delta = (p, r) - (k - 1): one gather (copies, exact).
  index = jnp.arange(s)[:, None] + jnp.arange(k)[None, :]
  windows = padded[index[:, None, :, None], index[None, :, None, :]]
  m = jnp.einsum('prabci,abcj->prij', windows, kernel, precision=precision)
  return m.reshape(s * s, f, f), int(k * k * c)


def t_upper(kernel: jax.Array, q: jax.Array, precision=base.HIGHEST
            ) -> jax.Array:
  """t_up >= t_i = sum_{delta, j} |M_ij(delta)| q_j / q_i, in kernel's dtype.

  For the exact Gram terms M of the given kernel and the given positive
  vector q (both read as exact). With u, tiny of the dtype, d the Gram dot
  length and n = S f the number of weighted terms:

  * |M - M^| <= gamma_d P + a1 entrywise (Higham eq. 3.5), P = |K| * |K|
    the autocorrelation of |K|, a1 = 2 d tiny (1 + max |K|) for products
    and partial sums flushed to zero and subnormal entries read as zero;
    P <= P^ (1 + gamma_d) + a1 (nonnegative sums). Hence
    |M| <= G = |M^| + c1 P^ + c_abs with c1 = gamma_d (1 + gamma_d) and
    c_abs = (4 d + 2) tiny (1 + max |K|) (also covering c1 P^ flushed);
  * G^ = fl(G) (3 roundings of nonnegative terms) and the weighted sum
    N^_i = fl(sum G^ q_j) (n products and their sum) give
    sum |M_ij| q_j <= N^_i (1 + gamma_{n+3}) + 3 n tiny (products and
    partial sums flushed), and the two computations of q
    (`_Q_DUPLICATION_ROUNDINGS`) one more factor 1 + gamma_8: N^ times
    1 + gamma_{n+11}, plus 3 n tiny, each rounded up, bounds it;
  * t_up = next_up(that / q_i) (a faithful division rounded up).

  Assumes IEEE arithmetic and dots as sums of products (`precision`
  HIGHEST on GPUs/TPUs).
  """
  dtype = kernel.dtype
  m, d = _gram_terms(kernel, precision)
  p, _ = _gram_terms(jnp.abs(kernel), precision)
  n = int(m.shape[0] * m.shape[1])
  tiny = float(jnp.finfo(dtype).tiny)
  g_d = _rounding.gamma(d, dtype)
  c1 = _rounding.round_up_into(g_d * (1 + g_d) * (1 + 2.0**-50), dtype)
  c_abs = _rounding.next_up(
      _rounding.next_up(1 + jnp.max(jnp.abs(kernel)))
      * _rounding.round_up_into((4 * d + 2) * tiny, dtype))
  g = jnp.abs(m) + c1 * p + c_abs
  numerator = jnp.einsum('sij,j->i', g, q, precision=precision)
  factor = _rounding.round_up_into(
      1 + _rounding.gamma(n + 3 + _Q_DUPLICATION_ROUNDINGS, dtype), dtype)
  absolute = _rounding.round_up_into(3 * n * tiny, dtype)
  numerator = _rounding.next_up(_rounding.next_up(numerator * factor)
                                + absolute)
  return _rounding.next_up(numerator / q)


def _positive_q(q_tilde: jax.Array) -> jax.Array:
  """exp(q_tilde - max q_tilde), floored at the smallest normal float."""
  q = jnp.exp(q_tilde - jax.lax.stop_gradient(jnp.max(q_tilde)))
  return jnp.maximum(q, jnp.finfo(q.dtype).tiny)


def _zero_units(kernel: jax.Array) -> jax.Array:
  """Hidden units whose kernel entries are all zero or subnormal."""
  kernel = jax.lax.stop_gradient(kernel)
  zero = _rounding.is_zero(kernel) | _rounding.is_subnormal(kernel)
  return jnp.all(zero.reshape(-1, kernel.shape[-1]), axis=0)


def sll_scale(kernel: jax.Array, q_tilde: jax.Array, precision=base.HIGHEST,
              rigorous: bool = True) -> jax.Array:
  """s = 2 / t per hidden unit, differentiable; 0 for all-zero units.

  `rigorous` (evaluation): t = t_up (`t_upper`, from stop-gradient inputs)
  in value, with the gradient of the float formula t_smooth added as
  t_smooth - stop_gradient(t_smooth), exactly 0. Otherwise (training) t is
  the float formula itself, as the paper's code computes it: t_up's worst-
  case allowance is 0.16% of t for a 3x3 conv with 120 channels and 0.5%
  for a 2048-unit dense layer in float32 (3e-12 and 1e-11 in float64), which
  over CPL-XL's 85 layers would make the trained network ~17% more
  contractive than the paper's. Float64 evaluation (the default
  certification) then differs from training by ~1e-11 per layer.
  """
  q = _positive_q(q_tilde)
  m, _ = _gram_terms(kernel, precision)
  t_smooth = jnp.einsum('sij,j->i', jnp.abs(m), q, precision=precision) / q
  if rigorous:
    t_up = t_upper(jax.lax.stop_gradient(kernel), jax.lax.stop_gradient(q),
                   precision)
    delta = t_smooth - jax.lax.stop_gradient(t_smooth)
    t = t_up + jnp.where(jnp.isfinite(t_smooth), delta, 0)
    dead = _zero_units(kernel)
  else:
    t = t_smooth
    # As the published code's safe_inv: a zero t (a unit whose squares all
    # underflow) gets s = 0.
    dead = _zero_units(kernel) | (jax.lax.stop_gradient(t) <= 0)
  # t of a dead unit is ~0: 2 / t would be finite at best, its gradient not.
  return jnp.where(dead, 0, 2 / jnp.where(dead, 1, t))


def _sll_apply(module: nn.Module, kernel: jax.Array, x: jax.Array,
               fan_in: int) -> tuple[jax.Array, jax.Array]:
  precision = base.precision(module)
  features = kernel.shape[-1]
  q_tilde = module.param('q', nn.initializers.normal(1.0), (features,),
                         jnp.float32).astype(x.dtype)
  bias = module.param('bias', _bias_init(fan_in), (features,),
                      jnp.float32).astype(x.dtype)
  if kernel.ndim == 2:
    inner, outer = _residual.dense_operators(kernel, precision)
  else:
    inner, outer = _residual.conv_operators(kernel, x.shape[1:], precision)
  s = sll_scale(kernel, q_tilde, precision,
                rigorous=not base.is_training(module))
  # The scale the forward pass used, for tests of the rounding bound
  # (a no-op unless the 'intermediates' collection is mutable).
  module.sow('intermediates', 'scale', s)
  return (_residual.residual_apply(inner, outer, bias, s, x),
          jnp.ones((), jnp.float32))


class SLLDense(nn.Module):
  """Dense SLL: `(x - 2 W T^-1 relu(W^T x + b), 1)`, W^T x = x @ kernel."""
  features: int
  num_power_iterations: int = 0  # unused: no power iteration

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    if x.ndim != 2:
      raise ValueError(f'SLLDense expects (batch, d) inputs, got {x.shape}')
    _residual.check_features(self.features)
    d = x.shape[-1]
    kernel = self.param('kernel', _xavier_normal, (d, self.features),
                        jnp.float32).astype(x.dtype)
    return _sll_apply(self, kernel, x, d)


class SLLConv(nn.Module):
  """Conv SLL (NHWC, stride 1, zero padding k // 2, odd k)."""
  features: int
  kernel_size: int = 3
  num_power_iterations: int = 0  # unused: no power iteration

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    if x.ndim != 4:
      raise ValueError(f'SLLConv expects NHWC input, got shape {x.shape}')
    _residual.check_features(self.features)
    _residual.check_kernel_size(self.kernel_size)
    k, c = self.kernel_size, x.shape[-1]
    kernel = self.param('kernel', _xavier_normal, (k, k, c, self.features),
                        jnp.float32).astype(x.dtype)
    return _sll_apply(self, kernel, x, k * k * c)


class _SLLSpec:
  """What SLLDenseSpec and SLLConvSpec share, through `self.operators`."""

  bound_kind: ClassVar[str] = base.PROVEN
  activated: ClassVar[bool] = False

  def output_shape(self, input_shape) -> tuple[int, ...]:
    return tuple(input_shape)

  def certified_bound(self, variables, input_shape) -> jax.Array:
    """1: the forward pass's t_up >= t makes its layer 1-Lipschitz."""
    del variables, input_shape
    return jnp.ones((), jnp.float32)

  def power_iteration_operators(self, params, input_shape):
    del params, input_shape
    return {}

  def rounding_step(self, variables, input_shape, forms, norm, *, dtype,
                    forward_dtype):
    """`_residual.residual_step` with S = diag(2 / t_up), L = 1.

    For the t_up of any forward pass: s_i = 2 / t_up_i <= 2 / t_i, and
    t_i >= M_ii(0) = ||K_i||^2 (the unit's own term, free of q), so
    s_i <= sigma_i = 2 / ||K_i||^2 for the units with a nonzero kernel
    (the others have s_i = 0), s_max = max_i sigma_i and
    B_S = ||sigma b|| over the positions. C C^T <= T gives
    ||S C||^2 = ||S C C^T S|| <= max_i s_i^2 t_i <= 2 s_max: N_out =
    sqrt(2 s_max). ||C||^2 <= max_i t_i for any q > 0, here q = 1
    (`t_upper` in `dtype`), plus the float32 subnormals an in-graph cast
    flushes. theta = gamma_2: s^ = fl(2 / t_up) and z^ = fl(r s^), against
    the exact s = 2 / t_up.
    """
    del norm  # the layer's bound is 1
    from cll_jax import forward_error  # pylint: disable=g-import-not-at-top
    kernel = variables['params']['kernel']
    bias = variables['params'].get('bias')
    inner, outer = self.operators(kernel, input_shape)
    wide = kernel.astype(dtype)
    features = kernel.shape[-1]
    t1 = t_upper(wide, jnp.ones((features,), dtype))
    taps = 1 if kernel.ndim == 2 else int(math.prod(kernel.shape[:2]))
    flush = _rounding.round_up_into(
        math.sqrt(taps * kernel.size) * _TAU32 * 2, dtype)
    inner_norm = _rounding.next_up(
        _rounding.next_up(jnp.sqrt(jnp.max(t1))) + flush)
    # Lower bounds of ||K_i||^2 (flushed squares only lower the sum).
    squares = jnp.sum((wide * wide).reshape(-1, features), axis=0)
    d = int(kernel.size // features)
    factor = _rounding.round_up_into(1 + _rounding.gamma(d + 1, dtype), dtype)
    own = _rounding.next_down(squares / factor)
    nonzero = jnp.any(~_rounding.is_zero(kernel).reshape(-1, features),
                      axis=0)
    two = jnp.asarray(2.0, dtype)
    # 2 / 0 = inf for a unit whose squares all underflow: nothing certifies.
    sigma = jnp.where(nonzero, _rounding.next_up(two / own),
                      jnp.zeros((), dtype))
    s_max = jnp.max(sigma)
    scaled_norm = _rounding.next_up(jnp.sqrt(_rounding.next_up(two * s_max)))
    if bias is None:
      scaled_bias = jnp.zeros((), dtype)
    else:
      # pylint: disable=protected-access
      positions = math.prod(self.output_shape(input_shape)[:-1])
      # + TAU: a float32 subnormal bias entry an in-graph cast flushes.
      magnitude = jnp.abs(bias.astype(dtype)) + jnp.asarray(_TAU32, dtype)
      weighted = _rounding.inflate(sigma * magnitude, 2)
      root = _rounding.round_up_into(
          math.sqrt(positions) * (1 + 2.0**-50), dtype)
      scaled_bias = _rounding.next_up(
          forward_error._norm_upper(weighted, 0) * root)
      # pylint: enable=protected-access
    theta = _rounding.round_up_into(_rounding.gamma(2, forward_dtype), dtype)
    return _residual.residual_step(
        inner, outer, bias, forms, lipschitz=jnp.ones((), dtype),
        inner_norm=inner_norm, scaled_norm=scaled_norm,
        scaled_bias=scaled_bias, scale_max=s_max, scale_error=theta,
        dtype=dtype, forward_dtype=forward_dtype)


@dataclasses.dataclass(frozen=True)
class SLLDenseSpec(_SLLSpec):
  """An `SLLDense` layer of a network (see the module docstring)."""
  features: int

  flattens: ClassVar[bool] = True

  def module(self, name: str, num_power_iterations: int) -> nn.Module:
    del num_power_iterations
    return SLLDense(self.features, name=name)

  def operators(self, kernel, input_shape):
    del input_shape
    return _residual.dense_operators(kernel, base.HIGHEST)


@dataclasses.dataclass(frozen=True)
class SLLConvSpec(_SLLSpec):
  """An `SLLConv` layer of a network (see the module docstring)."""
  features: int
  kernel_size: int = 3

  flattens: ClassVar[bool] = False

  def module(self, name: str, num_power_iterations: int) -> nn.Module:
    del num_power_iterations
    return SLLConv(self.features, self.kernel_size, name=name)

  def operators(self, kernel, input_shape):
    return _residual.conv_operators(kernel, tuple(input_shape), base.HIGHEST)
