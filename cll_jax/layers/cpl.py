"""Convex Potential Layers (Meunier, Delattre, Araujo, Allauzen, ICML 2022).

"A Dynamical System Perspective for Lipschitz Neural Networks" (arXiv
2110.12690), eq. 6: the gradient step on the convex potential
x -> sum relu-primitive(W x + b) gives

    y = x - h W^T relu(W x + b),   h = 2 / ||W||_2^2,

with W a dense kernel (`CPLDense`: W x = x @ kernel, kernel `(d, features)`)
or a stride-1 conv with zero padding k // 2 and odd k (`CPLConv`: W x = conv
with kernel `(k, k, c, features)`, W^T its exact adjoint, the flipped conv;
`_residual.conv_operators`). `features` is the width of W x; the output has
the input's shape. The ReLU is inside the layer: the network applies no
activation after it (`activated = False`).

Bound (kind PROVEN). The Jacobian is J = I - h W^T D W with D = diag(relu')
in [0, 1]: symmetric, with eigenvalues in [1 - h ||W||^2, 1] (W^T D W is
PSD with norm <= ||W||^2), so

    ||J|| <= max(1, h ||W||^2 - 1)

for the TRUE ||W||, and the layer is 1-Lipschitz iff h <= 2 / ||W||^2. The
layer takes h from a warm-started power-iteration estimate sigma = ||W u||
(`base.power_iterated_norm`; the vector u lives in the `power_iteration`
collection, 1 step per training call in the paper's code), and a power
iteration converges from below: sigma <= ||W||, h can be too large and the
layer expansive (unconverged u, or weights that moved faster than the
iterate). The certificate does not trust the estimate:

    certified_bound = max(1, h_up ||W||_upper^2 - 1),

with ||W||_upper a guaranteed upper bound (`_residual.sound_norm`: Gram
iteration, in float64 when x64 is on, explicit matrix for small convs) and
h_up >= h = 2 / ||W u||^2 for the vector u the eval forward pass reads,
from a rigorous lower bound of the exact ||W u|| (`_sigma_bounds`). The
layer's exact function (what certificates are about) uses the exact
h = 2 / max(||W u||^2, TAU); the forward pass's float h^ differs from it by
its rounding, which `rounding_step` charges (`_residual.residual_step`).
With a converged u the bound is 1 up to ~4 (||W||_upper / sigma - 1); with a
poor u it is honestly above 1 (tests/test_layers_cpl.py).

Estimate of a conv's norm (`estimate`): the paper's code runs power
iteration on the zero-padded conv itself ('padded'). Its sound upper bound
goes through the circular conv on the padded grid (H + k - 1) x (W + k - 1)
(`sound_bounds.conv_embedding`), whose norm exceeds the zero-padded conv's
(the Toeplitz / circulant gap): on random 3x3 kernels with 8 channels by
0.3% at 32x32, 1.4% at 16x16 and 4.4% at 8x8 (converged, float64). So
'padded' certifies about 2 (1.003)^2 - 1 = 1.012 per layer at 32x32; with
this init and 16 channels, 1.0099 at 32x32 and 1.045 at 16x16 (maps of at
most 2048 inputs are bounded on their explicit matrix and stay tight:
1.0 at 8x8). Compounded over CPL-XL's 70 convs that is ~2x. The default
'circular' runs the power iteration on the circular conv instead
(`CircularConv`, a vector of the padded grid's shape): its norm bounds the
layer's (||W|| <= ||W_circ||), the estimate converges to ||W_circ|| and
the sound bound of W_circ is tight, so the certificate is 1 + O(4 x the
iteration's deficit): 1 + 2e-7 at 16x16, 1 + 1.3e-4 at 32x32 after 3000
steps from a random vector (the circular conv's near-top frequencies
converge slowly; warm starts over training help). h is then smaller than
the paper's by the same 0.3% - 4%: the layer is that much more
contractive than it needs to be. Dense layers have one estimate.

Training bound: the module returns 1 (what the paper assumes). The
estimate-based value max(1, h sigma^2 - 1) is exactly 1 as well (h sigma^2
= 2 by construction), so nothing better is available in training: the gap
between the estimate and the true norm is invisible to the loss, and only
the certified bound shows it.

Initialisation as the authors' code: kernel and bias uniform in
+-1 / sqrt(fan_in) (PyTorch's default `kaiming_uniform_(a=sqrt(5))`), fan_in
= d (dense) or k^2 c (conv). Their code adds 1e-4 to sigma^2 in h (which
only lowers h); here h = 2 / max(sigma^2, TAU) with TAU the smallest normal
float32, a guard against sigma = 0 only, so that the certificate shows the
layer's real margin.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from cll_jax import _rounding
from cll_jax.layers import _residual
from cll_jax.layers import base
from cll_jax.operators import LinearOperator

# h = 2 / max(sigma^2, TAU), in every dtype (so the exact function is one).
TAU = float(jnp.finfo(jnp.float32).tiny)
ESTIMATES = ('circular', 'padded')

# PyTorch's default init of conv and linear weights and biases: uniform in
# +-1 / sqrt(fan_in).
_uniform_fan_in = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in',
                                                   'uniform')


def _bias_init(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


@flax.struct.dataclass
class CircularConv:
  """The circular conv on an (m1, m2) grid (cross-correlation):

      z[i, j, o] = sum_{a, b, c} k[a, b, c, o] x[(i + a) mod m1,
                                                 (j + b) mod m2, c],

  as `sound_bounds.circular_conv_norm_upper_bound` defines it. On the grid
  (H + k - 1, W + k - 1) it is the circular embedding of the zero-padded
  'same' conv (`sound_bounds.conv_embedding`), so its norm bounds that
  conv's. Duck-types what power iteration needs of a `LinearOperator`
  (`kernel`, `input_shape`, call, `transpose`, `gram`, `replace`).
  """
  kernel: jax.Array
  input_shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
  precision: Any = flax.struct.field(pytree_node=False, default=None)
  kind: str = flax.struct.field(pytree_node=False, default='circular')

  @property
  def output_shape(self) -> tuple[int, ...]:
    m1, m2, _ = self.input_shape
    return (m1, m2, self.kernel.shape[-1])

  def __call__(self, x: jax.Array) -> jax.Array:
    batch = x.shape[:x.ndim - 3]
    x = x.reshape((-1, *self.input_shape))
    k1, k2 = self.kernel.shape[:2]
    x = jnp.pad(x, ((0, 0), (0, k1 - 1), (0, k2 - 1), (0, 0)), mode='wrap')
    y = jax.lax.conv_general_dilated(
        x, self.kernel, (1, 1), 'VALID',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=self.precision)
    return y.reshape((*batch, *y.shape[1:]))

  def transpose(self, y: jax.Array) -> jax.Array:
    x0 = jax.ShapeDtypeStruct(self.input_shape, y.dtype)
    (x,) = jax.linear_transpose(self.__call__, x0)(y)
    return x

  def gram(self, x: jax.Array) -> jax.Array:
    return self.transpose(self(x))


def _padded_grid(input_shape, kernel_size: int) -> tuple[int, int, int]:
  h, w, c = input_shape
  return (h + kernel_size - 1, w + kernel_size - 1, c)


def _estimate_operator(kernel: jax.Array, input_shape, estimate: str,
                       precision):
  """The operator whose power-iterated norm sets h."""
  if kernel.ndim == 2:
    return _residual.dense_operators(kernel, precision)[0]
  if estimate == 'circular':
    return CircularConv(kernel, _padded_grid(input_shape, kernel.shape[0]),
                        precision)
  if estimate == 'padded':
    return _residual.conv_operators(kernel, input_shape, precision)[0]
  raise ValueError(f'CPL estimate must be one of {ESTIMATES}, got '
                   f'{estimate!r}')


def _cpl_apply(module: nn.Module, kernel: jax.Array, x: jax.Array,
               estimate: str, num_power_iterations: int,
               use_bias: bool, fan_in: int) -> tuple[jax.Array, jax.Array]:
  precision = base.precision(module)
  if kernel.ndim == 2:
    inner, outer = _residual.dense_operators(kernel, precision)
  else:
    inner, outer = _residual.conv_operators(kernel, x.shape[1:], precision)
  op = _estimate_operator(kernel, x.shape[1:], estimate, precision)
  sigma = base.power_iterated_norm(module, op, num_power_iterations)
  h = 2.0 / jnp.maximum(sigma * sigma, TAU)
  # The scale the forward pass used, for tests of the rounding bound
  # (a no-op unless the 'intermediates' collection is mutable).
  module.sow('intermediates', 'scale', h)
  bias = None
  if use_bias:
    bias = module.param('bias', _bias_init(fan_in), (kernel.shape[-1],),
                        jnp.float32).astype(x.dtype)
  y = _residual.residual_apply(inner, outer, bias, h, x)
  return y, jnp.ones((), jnp.float32)


class CPLDense(nn.Module):
  """Dense CPL: `(x - h W^T relu(W x + b), 1)`, W x = x @ kernel."""
  features: int
  num_power_iterations: int = 1
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    if x.ndim != 2:
      raise ValueError(f'CPLDense expects (batch, d) inputs, got {x.shape}')
    _residual.check_features(self.features)
    d = x.shape[-1]
    kernel = self.param('kernel', _uniform_fan_in, (d, self.features),
                        jnp.float32).astype(x.dtype)
    return _cpl_apply(self, kernel, x, 'padded', self.num_power_iterations,
                      self.use_bias, d)


class CPLConv(nn.Module):
  """Conv CPL (NHWC, stride 1, zero padding k // 2, odd k).

  Attributes:
    features: hidden channels of W x.
    kernel_size: odd k.
    estimate: 'circular' or 'padded', the operator power iteration runs on
      (module docstring).
    num_power_iterations: power-iteration steps per training call.
  """
  features: int
  kernel_size: int = 3
  estimate: str = 'circular'
  num_power_iterations: int = 1
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    if x.ndim != 4:
      raise ValueError(f'CPLConv expects NHWC input, got shape {x.shape}')
    _residual.check_features(self.features)
    _residual.check_kernel_size(self.kernel_size)
    if self.estimate not in ESTIMATES:
      raise ValueError(f'CPL estimate must be one of {ESTIMATES}, got '
                       f'{self.estimate!r}')
    k, c = self.kernel_size, x.shape[-1]
    kernel = self.param('kernel', _uniform_fan_in, (k, k, c, self.features),
                        jnp.float32).astype(x.dtype)
    return _cpl_apply(self, kernel, x, self.estimate,
                      self.num_power_iterations, self.use_bias, k * k * c)


def _size(shape) -> int:
  return int(math.prod(shape))


def _dot_length(op) -> int:
  if isinstance(op, LinearOperator):
    return _residual.dot_length(op)
  return int(math.prod(op.kernel.shape[:3]))  # CircularConv


def _sigma_bounds(op, u: jax.Array, dtype
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(sigma_lo, a_up, flush): sigma_lo <= ||op u|| exactly, a_up >=
  || |op| |u| ||, and the absolute underflow allowance `flush`.

  Computed in `dtype` with round-to-nearest and directed corrections.
  v^ = fl(op u) is within gamma_{n+1} |op| |u| of op u entrywise (n the
  dot length), so ||op u|| >= ||v^|| - gamma_{n+1} a - flush. ||v^|| >=
  sqrt(fl(sum v^2) / (1 + gamma_{N+1})) (N squares and their sum:
  nonnegative terms; flushed squares only lower the computed sum). `flush`
  covers what XLA reads or writes as zero (the exact function has it): the
  float32 kernel's and u's subnormal entries (a kernel change of norm
  < tiny sqrt(size), times sqrt(kh kw) taps; a change of u of norm
  < tiny sqrt(size(u)), times || |op| ||) and the products and partial sums
  that underflow (2 n tiny per output entry).
  """
  from cll_jax import forward_error  # pylint: disable=g-import-not-at-top
  abs_norm = _rounding.round_up_into(
      forward_error._abs_operator_norm(  # pylint: disable=protected-access
          _residual.dense_operators(op.kernel)[0] if op.kernel.ndim == 2
          else LinearOperator(op.kernel, 'conv', op.input_shape)), dtype)
  kernel = op.kernel.astype(dtype)
  op = op.replace(kernel=kernel)
  abs_op = op.replace(kernel=jnp.abs(kernel))
  u = u.astype(dtype)
  n = _dot_length(op)
  size_out = _size(op.output_shape)
  taps = 1 if kernel.ndim == 2 else int(math.prod(kernel.shape[:2]))
  flush = _rounding.next_up(_rounding.round_up_into(
      (kernel.size * taps + 2 * (n + 2) * size_out + 4) * TAU, dtype)
      + abs_norm * _rounding.round_up_into(u.size * TAU, dtype))
  gamma_n = _rounding.round_up_into(_rounding.gamma(n + 1, dtype), dtype)
  v = op(u)
  a = abs_op(jnp.abs(u))
  # || |op| |u| || <= ||a^|| (1 + gamma_n) + flush (nonnegative sums).
  a_up = _rounding.next_up(_rounding.inflate(
      _norm_upper(a), n + 1) + flush)
  e1 = _rounding.next_up(_rounding.next_up(gamma_n * a_up) + flush)
  sq = jnp.sum(v * v)
  factor = _rounding.round_up_into(
      1 + _rounding.gamma(size_out + 1, dtype), dtype)
  v_lo = _rounding.next_down(jnp.sqrt(_rounding.next_down(sq / factor)))
  sigma_lo = _rounding.next_down(v_lo - e1)
  return jnp.maximum(sigma_lo, 0), a_up, flush


def _norm_upper(x: jax.Array) -> jax.Array:
  from cll_jax import forward_error  # pylint: disable=g-import-not-at-top
  return forward_error._norm_upper(  # pylint: disable=protected-access
      x, tuple(range(x.ndim)))


def _h_upper(sigma_lo: jax.Array) -> jax.Array:
  """>= 2 / max(s^2, TAU) for every s >= sigma_lo."""
  dtype = sigma_lo.dtype
  sq_lo = jnp.maximum(_rounding.next_down(sigma_lo * sigma_lo),
                      jnp.asarray(TAU, dtype))
  return _rounding.next_up(jnp.asarray(2.0, dtype) / sq_lo)


class _CPLSpec:
  """What CPLDenseSpec and CPLConvSpec share, through `self.operators` and
  `self.estimate_operator`."""

  bound_kind: ClassVar[str] = base.PROVEN
  activated: ClassVar[bool] = False

  def output_shape(self, input_shape) -> tuple[int, ...]:
    return tuple(input_shape)

  def power_iteration_operators(self, params, input_shape):
    return {'u': self.estimate_operator(params['kernel'], input_shape)}

  def _pieces(self, variables, input_shape, dtype):
    """(C, C^T, U >= ||C||, h_up >= h, sigma_lo, (a_up, flush)) in
    `dtype` (`_sigma_bounds`)."""
    params = variables['params']
    # The stored kernel: the bounds below read it in their own precision
    # (an in-graph cast to float64 would flush its subnormal entries).
    inner, outer = self.operators(params['kernel'], input_shape)
    norm = _rounding.round_up_into(_residual.sound_norm(inner), dtype)
    est = self.estimate_operator(params['kernel'], input_shape)
    sigma_lo, a_up, flush = _sigma_bounds(
        est, variables[base.POWER_ITERATION]['u'], dtype)
    return inner, outer, norm, _h_upper(sigma_lo), sigma_lo, (a_up, flush)

  @staticmethod
  def _bound(norm: jax.Array, h_up: jax.Array) -> jax.Array:
    """max(1, h_up U^2 - 1), rounded up."""
    c = _rounding.next_up(h_up * _rounding.next_up(norm * norm))
    one = jnp.ones((), c.dtype)
    return jnp.maximum(one, _rounding.next_up(c - one))

  def certified_bound(self, variables, input_shape) -> jax.Array:
    """max(1, h_up ||C||_upper^2 - 1) (module docstring).

    Computed in float64 when x64 is on (as certification runs it), else in
    float32 (sound, looser: the float32 Gram iteration and norm roundings
    leave ~1e-4). Returned as float32, rounded up.
    """
    from cll_jax import forward_error  # pylint: disable=g-import-not-at-top
    dtype = forward_error.certification_dtype()
    _, _, norm, h_up, _, _ = self._pieces(variables, input_shape, dtype)
    return _rounding.round_up_into(self._bound(norm, h_up), jnp.float32)

  def rounding_step(self, variables, input_shape, forms, norm, *, dtype,
                    forward_dtype):
    """`_residual.residual_step` with S = h.

    L = the certified bound, S_C = U, N_out = h_up U, B_S = h_up B,
    s_max = h_up. theta:
    the forward pass's sigma^ = fl(||fl(op u)||) is within a relative
    rho = gamma_{n+1} a / sigma + gamma_{N+2} of the exact ||op u||
    (`_sigma_bounds`), h^ = fl(2 / fl(sigma^2)) and z^ = fl(h^ r) add three
    roundings, so with x = rho + u (all at the forward's roundoff) z^_i =
    h r_i (1 + theta_i), |theta_i| <= (1 + u)^3 / (1 - x)^2 - 1 <= 6 x for
    x <= 0.01 (infinite beyond: nothing certifies).
    """
    del norm  # the layer's own proven bound is recomputed here
    inner, outer, u_norm, h_up, sigma_lo, (a_up, flush) = self._pieces(
        variables, input_shape, dtype)
    lip = self._bound(u_norm, h_up)
    est = self.estimate_operator(variables['params']['kernel'], input_shape)
    n = _dot_length(est)
    size_out = _size(est.output_shape)
    up = lambda v: _rounding.round_up_into(v, dtype)
    u_f = up(_rounding.unit_roundoff(forward_dtype))
    g_n = up(_rounding.gamma(n + 1, forward_dtype))
    g_big = up(_rounding.gamma(size_out + 2, forward_dtype))
    # rho: the forward's ||v^ - W u|| <= gamma_{n+1} a + flush, relative to
    # sigma >= sigma_lo, plus the norm's own rounding.
    error = _rounding.next_up(_rounding.next_up(g_n * a_up) + flush)
    rho = _rounding.next_up(_rounding.next_up(
        error / jnp.maximum(sigma_lo, jnp.finfo(dtype).tiny)) + g_big)
    x = _rounding.next_up(rho + u_f)
    theta = jnp.where(x <= 0.01, _rounding.next_up(6 * x), jnp.inf)
    bias = variables['params'].get('bias')
    # pylint: disable=protected-access
    from cll_jax import forward_error  # pylint: disable=g-import-not-at-top
    b_norm = forward_error._bias_norm(inner, bias, dtype)
    # pylint: enable=protected-access
    return _residual.residual_step(
        inner, outer, bias, forms, lipschitz=lip, inner_norm=u_norm,
        scaled_norm=_rounding.next_up(h_up * u_norm),
        scaled_bias=_rounding.next_up(h_up * b_norm), scale_max=h_up,
        scale_error=theta, dtype=dtype, forward_dtype=forward_dtype)


@dataclasses.dataclass(frozen=True)
class CPLDenseSpec(_CPLSpec):
  """A `CPLDense` layer of a network (see the module docstring)."""
  features: int

  flattens: ClassVar[bool] = True

  def module(self, name: str, num_power_iterations: int) -> nn.Module:
    return CPLDense(self.features, num_power_iterations=num_power_iterations,
                    name=name)

  def operators(self, kernel, input_shape):
    del input_shape
    return _residual.dense_operators(kernel, base.HIGHEST)

  def estimate_operator(self, kernel, input_shape):
    del input_shape
    return _residual.dense_operators(kernel, base.HIGHEST)[0]


@dataclasses.dataclass(frozen=True)
class CPLConvSpec(_CPLSpec):
  """A `CPLConv` layer of a network (see the module docstring)."""
  features: int
  kernel_size: int = 3
  estimate: str = 'circular'

  flattens: ClassVar[bool] = False

  def module(self, name: str, num_power_iterations: int) -> nn.Module:
    return CPLConv(self.features, self.kernel_size, self.estimate,
                   num_power_iterations=num_power_iterations, name=name)

  def operators(self, kernel, input_shape):
    return _residual.conv_operators(kernel, tuple(input_shape), base.HIGHEST)

  def estimate_operator(self, kernel, input_shape):
    return _estimate_operator(kernel, tuple(input_shape), self.estimate,
                              base.HIGHEST)
