"""Rounding error of a network's logits, and the precision of certification.

A certificate (`cll_jax.certify`) is about the exact function f of the stored
weights: x -> head(act(... act(W_1 ((x - mean) / std) + b_1) ...)). The
logits a forward pass returns are f(x) plus rounding error. This module bounds
that error a priori (from the weights and ||x||_2 only) so that it can be
subtracted from every margin (`certify`'s `margin_error`), and runs the
certification forward pass in float64 (on CPU and GPU) or float32.

Error bound. Let z_l be the exact activations and z^_l the computed ones,
X_l >= ||z^_l||_2 and E_l >= ||z^_l - z_l||_2. Every linear layer computes
each output as a sum of n_l products (n_l = d_in, or kh kw c_in for a conv:
padding adds exact zeros) plus the bias, in some order, so (Higham, "Accuracy
and Stability of Numerical Algorithms", 2nd ed., eq. 3.5)

    fl(W z^ + b) = W z^ + b + r,  |r| <= gamma_{n+1} (|W| |z^| + |b|)

entrywise, gamma_k = k u / (1 - k u) for the forward pass's unit roundoff u.
With S_l >= ||W_l||_2 (the layer bounds), A_l >= || |W_l| ||_2 (||W_l||_F
for a dense layer, sqrt(kh kw) ||k||_F for a conv: `_abs_operator_norm`)
and B_l = ||b_l||_2 over all output positions:

    ||r_l|| <= R_l = gamma_{n_l+1} (A_l X_{l-1} + B_l),
    X_l = S_l X_{l-1} + B_l + R_l,    E_l = S_l E_{l-1} + R_l,

because the activations (MinMax, ReLU) are exact, 1-Lipschitz and do not
increase norms. The input normalisation computes fl(fl(x - m^) / s^) with
m^, s^ the mean and std rounded to the compute dtype (and XLA may divide as a
multiplication by fl(1 / s^)): entrywise within gamma_4 (|x| + 2 |m|) / s of
(x - m) / s, so E_0 = gamma_4 (||x|| + 2 M) / s_min and X_0 = ((1 + gamma_4)
||x|| + (1 + 2 gamma_4) M) / s_min, M the norm of the broadcast mean (E_0 = 0,
X_0 = ||x|| without normalisation). For the head (columns w_i, bias b_i, n_L
inputs) the computed margin f^_c - f^_j is within

    delta(x) = D E_{L-1} + 2 gamma_{n_L+1} (omega X_{L-1} + beta)

of the exact one, D = max_{c != j} ||w_c - w_j||, omega = max_i ||w_i||,
beta = max_i |b_i|. X and E are affine in ||x||, so
delta(x) = offset + slope ||x||_2 (`LogitErrorBound`). The coefficients are
computed with round-to-nearest from rigorous upper bounds of their inputs
and then inflated by gamma of their operation count (`_rounding.inflate`).

Assumptions: IEEE arithmetic in the forward pass (as on CPUs, and on GPUs
with full-precision matmuls: `certified_forward` sets
`jax.default_matmul_precision('highest')`, without which float32 matmuls may
run in TF32), and convolutions evaluated as sums of products (direct or
GEMM-based; not Winograd or FFT algorithms, which cuDNN may choose on GPUs:
certify in float64 there). The bound is a worst case: in float32 it is large
(each layer adds about n_l u || |W| || ||x||, ~1e-3 relative for n_l in
the thousands), in float64 it is ~1e-12 relative. Hence the default
certification precision is float64.

Reference: CLL = arXiv 2309.06166 (the certificate, supp. eq. 18).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cll_jax import _rounding
from cll_jax import models
from cll_jax.operators import LinearOperator

Array = jax.Array

# Certification precisions: 'float64' (default; CPU and GPU) computes the
# logits and the layer bounds in float64; 'float32' computes the logits in
# float32 and subtracts the (larger) float32 rounding allowance.
PRECISIONS = ('float64', 'float32')
# Activations that are exact in floating point, 1-Lipschitz and map 0 to 0.
_EXACT_ACTIVATIONS = ('minmax', 'relu')
# Operations on the coefficients per layer in `chain_logit_error`, with room.
_OPS_PER_LAYER = 12


def check_precision(precision: str) -> None:
  if precision not in PRECISIONS:
    raise ValueError(
        f'certification precision must be one of {PRECISIONS}, got '
        f'{precision!r}')
  if precision == 'float64' and jax.default_backend() == 'tpu':
    raise ValueError(
        "certification precision 'float64' needs a CPU or GPU backend; "
        "TPUs lack float64: use 'float32'")


def precision_scope(precision: str):
  """Context for a certification in `precision` (x64 on for 'float64')."""
  check_precision(precision)
  if precision == 'float64':
    return jax.enable_x64(True)
  return contextlib.nullcontext()


def in_precision(fn: Callable, precision: str) -> Callable:
  """`fn` called inside `precision_scope(precision)`.

  Jitted functions retrace under x64, so the same `jax.jit` object serves
  both precisions.
  """
  check_precision(precision)

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    with precision_scope(precision):
      return fn(*args, **kwargs)

  return wrapper


def certification_dtype():
  """float64 inside a float64 scope (x64 on), else float32."""
  return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


@flax.struct.dataclass
class LogitErrorBound:
  """|(f^_c - f^_j) - (f_c - f_j)| <= offset + slope ||x||_2 for all c, j.

  Attributes:
    offset: scalar >= 0.
    slope: scalar >= 0.
  """
  offset: Array
  slope: Array

  def margin_error(self, inputs: Array) -> Array:
    """`(B,)` margin error bounds for the batch `inputs` `(B, ...)`."""
    dtype = self.offset.dtype
    axes = tuple(range(1, inputs.ndim))
    norms = _norm_upper(inputs.astype(dtype), axes)
    return _rounding.inflate(self.offset + self.slope * norms, 2)


def _gamma(k: int, dtype, forward_dtype) -> Array:
  return _rounding.round_up_into(_rounding.gamma(k, forward_dtype), dtype)


def _host_up(x: float) -> float:
  """x computed by <= 3 float64 roundings -> a float >= the exact value."""
  return math.nextafter(x * (1 + 2.0**-50), math.inf)


def _own_precision(x) -> Array:
  """x in its own dtype, at least float32: no cast that could flush
  subnormals (their loss is covered by `_rounding.inflate`'s terms)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# Entries up to 2^48 in magnitude: squares and their sums cannot overflow.
_NORM_RANGE = 2.0**48


def _norm_upper(x: Array, axis) -> Array:
  """Upper bound of ||x||_2 over `axis` for real x; +inf past `_NORM_RANGE`.

  Cheaper to compile than `_rounding.frobenius_upper` (no rescaling):
  squares that underflow are covered by `inflate`'s absolute term, and
  entries too large for their squares return +inf, which certifies nothing.
  """
  axis = tuple(np.atleast_1d(axis) % x.ndim)
  count = math.prod(x.shape[a] for a in axis)
  bound = _rounding.next_up(jnp.sqrt(_rounding.inflate(
      jnp.sum(x * x, axis=axis), count + 1)))
  in_range = jnp.max(jnp.abs(x), axis=axis) <= _NORM_RANGE
  return jnp.where(in_range, bound, jnp.inf)


def _abs_operator_norm(op: LinearOperator) -> Array:
  """Upper bound of || |W| ||_2: ||W||_F (dense), sqrt(kh kw) ||k||_F (conv).

  A conv with kernel |k| is a sum over taps of restricted shifts (norm <= 1)
  times the channel matrices |k[a, b]|, so its norm is at most
  sum_{a,b} ||k[a, b]||_F <= sqrt(kh kw) ||k||_F (Cauchy-Schwarz).
  """
  kernel = _own_precision(op.kernel)
  norm = _norm_upper(kernel, tuple(range(kernel.ndim)))
  if op.kind == 'dense':
    return norm
  kh, kw = op.kernel.shape[:2]
  return _rounding.next_up(norm * _rounding.round_up_into(
      _host_up(math.sqrt(kh * kw)), kernel.dtype))


def _dot_length(op: LinearOperator) -> int:
  if op.kind == 'dense':
    return int(op.kernel.shape[0])
  kh, kw, c_in, _ = op.kernel.shape
  return int(kh * kw * c_in)


def _bias_norm(op: LinearOperator, bias, dtype) -> Array:
  """||b||_2 over all output positions (a conv repeats it at each)."""
  if bias is None:
    return jnp.zeros((), dtype)
  positions = 1 if op.kind == 'dense' else math.prod(op.output_shape[:2])
  bias = _own_precision(bias)
  norm = _norm_upper(bias, 0)
  norm = _rounding.next_up(
      norm * _rounding.round_up_into(_host_up(math.sqrt(positions)),
                                     bias.dtype))
  return _rounding.round_up_into(norm, dtype)


Form = tuple[Array, Array]  # (p, q): a bound p + q ||x||_2


def input_forms(input_mean_norm: float, input_std_min: float, dtype,
                forward_dtype) -> tuple[Form, Form]:
  """(X_0, E_0) of the input normalisation (module docstring)."""
  if not (math.isfinite(input_mean_norm) and input_mean_norm >= 0):
    raise ValueError(f'input_mean_norm must be finite and >= 0, got '
                     f'{input_mean_norm}')
  if not (math.isfinite(input_std_min) and input_std_min > 0):
    raise ValueError(f'input_std_min must be finite and > 0, got '
                     f'{input_std_min}')
  up = functools.partial(_rounding.round_up_into, dtype=dtype)
  zero = jnp.zeros((), dtype)
  if input_mean_norm == 0 and input_std_min == 1:
    return (zero, jnp.ones((), dtype)), (zero, zero)
  g4 = _rounding.gamma(4, forward_dtype)
  inv_s = 1.0 / input_std_min
  # Python floats (<= 3 roundings each), rounded up into dtype.
  return ((up(_host_up((1 + 2 * g4) * input_mean_norm * inv_s)),
           up(_host_up((1 + g4) * inv_s))),
          (up(_host_up(2 * g4 * input_mean_norm * inv_s)),
           up(_host_up(g4 * inv_s))))


def linear_step(op: LinearOperator, bias, norm, forms: tuple[Form, Form], *,
                dtype, forward_dtype, abs_norm=None,
                extra_roundings: int = 0) -> tuple[Form, Form]:
  """(X, E) after a dense/conv layer: R = gamma (A X + B), X' = S X + B + R,
  E' = S E + R (module docstring).

  `abs_norm` replaces A = || |W| || (`_abs_operator_norm(op)`) by a bound the
  caller knows, and `extra_roundings` adds roundings per entry of W (e.g. a
  kernel computed from parameters: gamma_{n+1+extra})."""
  x_form, e_form = forms
  gamma = _gamma(_dot_length(op) + 1 + extra_roundings, dtype, forward_dtype)
  a_norm = _rounding.round_up_into(
      _abs_operator_norm(op) if abs_norm is None else abs_norm, dtype)
  b_norm = _bias_norm(op, bias, dtype)
  s = _rounding.round_up_into(norm, dtype)
  r_form = (gamma * (a_norm * x_form[0] + b_norm), gamma * a_norm * x_form[1])
  return ((s * x_form[0] + b_norm + r_form[0], s * x_form[1] + r_form[1]),
          (s * e_form[0] + r_form[0], s * e_form[1] + r_form[1]))


# Relative error of the computed Householder reflection per channel pair, in
# units of the roundoff: cos/sin of the angle (assumed within 4 ulps, as
# XLA's are), the inner product, the reflection, and the branch chosen at a
# computed inner product (both branches agree where it vanishes, so a wrong
# branch costs at most twice the inner product's error).
_HOUSEHOLDER_ULPS = 64


def activation_step(activation: str, forms: tuple[Form, Form], *,
                    forward_dtype) -> tuple[Form, Form]:
  """(X, E) after the activation: exact ones change nothing; Householder
  adds its rounding, `_HOUSEHOLDER_ULPS` u ||z||, to both."""
  if activation in _EXACT_ACTIVATIONS:
    return forms
  if activation != 'householder':
    raise ValueError(
        f'the logit error bound needs a 1-Lipschitz activation with a known '
        f'rounding error ({_EXACT_ACTIVATIONS + ("householder",)}), got '
        f'{activation!r}')
  (xp, xq), (ep, eq) = forms
  k = _rounding.round_up_into(
      _HOUSEHOLDER_ULPS * _rounding.unit_roundoff(forward_dtype), xp.dtype)
  return ((xp + k * xp, xq + k * xq), (ep + k * xp, eq + k * xq))


def series_step(op: LinearOperator, scale_bound, a_bound, terms: int, bias,
                positions: int, forms: tuple[Form, Form], *, dtype,
                forward_dtype, scale_error) -> tuple[Form, Form]:
  """(X, E) after y = p_T(s A) x + b by Horner's rule (SOC layers).

  Horner computes z^_i = fl(x^ + fl(s A z^_{i+1}) / i), z^_{T-1} = x^,
  y^ = z^_0. Let w_i be the same recursion in exact arithmetic on x^
  (w_0 = p_T(s A) x^), d_i = z^_i - w_i and r_i the rounding of step i.
  Then d_i = (s / i) A d_{i+1} + r_i, d_{T-1} = 0, so
  d_0 = sum_i (s A)^i / i! r_i and ||d_0|| <= exp(a) max_i ||r_i||, with
  a >= ||s A||. Each r_i is within rho Z, Z bounding every ||z^_i||:
  rho = s gamma_{n+1} || |A| || (the products) + (scale_error + gamma_3) a
  (the scale s as computed, the scaling, the division) + u (1 + a) (the
  sum). ||w_i|| <= exp(a) ||x^||, so Z = exp(a) X (1 + 2 exp(a) rho) when
  exp(a) rho <= 1/2 (else the bound is infinite: nothing certifies). The
  input's error passes through the exact series: ||p_T(s A) e|| <= B ||e||
  with B = `series_norm_bound(a, T)` (~1). So

      E' = B E + exp(a) rho Z,   X' = B X + exp(a) rho Z + B_b,

  plus one rounding u (X' ) for the bias, B_b = ||b|| sqrt(positions). The
  crop to the output channels is exact.
  """
  from cll_jax.layers import soc  # pylint: disable=g-import-not-at-top
  x_form, e_form = forms
  u = _rounding.round_up_into(_rounding.unit_roundoff(forward_dtype), dtype)
  gamma = _gamma(_dot_length(op) + 1, dtype, forward_dtype)
  g3 = _gamma(3, dtype, forward_dtype)
  s = _rounding.round_up_into(scale_bound, dtype)
  a = _rounding.round_up_into(a_bound, dtype)
  a_abs = s * _rounding.round_up_into(_abs_operator_norm(op), dtype)
  rho = (gamma * a_abs + (g3 + _rounding.round_up_into(scale_error, dtype)) * a
         + u * (1 + a))
  e_a = _rounding.next_up(jnp.exp(a))
  small = e_a * rho <= 0.5
  growth = jnp.where(small, e_a * (1 + 2 * e_a * rho), jnp.inf)
  # Rounding injected by the series, per unit of (p, q) of X.
  injected = (e_a * rho * growth * x_form[0], e_a * rho * growth * x_form[1])
  b = _rounding.round_up_into(soc.series_norm_bound(a, terms), dtype)
  b_norm = jnp.zeros((), dtype) if bias is None else _rounding.round_up_into(
      _rounding.next_up(_norm_upper(_own_precision(bias), 0)
                        * _host_up(math.sqrt(positions))), dtype)
  x_form = (b * x_form[0] + injected[0] + b_norm, b * x_form[1] + injected[1])
  e_form = (b * e_form[0] + injected[0] + u * x_form[0],
            b * e_form[1] + injected[1] + u * x_form[1])
  return ((x_form[0] + u * x_form[0], x_form[1] + u * x_form[1]), e_form)


def soc_step(op: LinearOperator, u: Array, max_norm: float, terms: int,
             bias, positions: int, forms: tuple[Form, Form], *, dtype,
             forward_dtype) -> tuple[Form, Form]:
  """`series_step` for an SOC layer: A = op (the skew operator), the scale
  s = max_norm / ||A u|| as its forward pass computes it.

  The computed ||A u|| is within gamma_{n+1} || |A| || ||u|| (the products)
  plus gamma_{N+1} (the norm of N entries) of the exact one, relative to
  itself; s adds one rounding. a = s ||A||_upper (`sound_bounds`).
  """
  from cll_jax.layers import soc  # pylint: disable=g-import-not-at-top
  sigma = jnp.linalg.norm(op(u.astype(op.kernel.dtype))).astype(dtype)
  n = _dot_length(op)
  size = math.prod(op.output_shape)
  a_abs = _rounding.round_up_into(_abs_operator_norm(op), dtype)
  scale_error = (_gamma(n + 1, dtype, forward_dtype) * a_abs
                 / jnp.maximum(sigma, jnp.finfo(dtype).tiny)
                 + _gamma(size + 3, dtype, forward_dtype))
  scale = _rounding.next_up(max_norm / sigma * (1 + scale_error))
  norm = _rounding.round_up_into(soc.sound_operator_norm(op), dtype)
  a = _rounding.next_up(scale * norm)
  return series_step(op, scale, a, terms, bias, positions, forms,
                     dtype=dtype, forward_dtype=forward_dtype,
                     scale_error=scale_error)


def head_error(class_vectors: Array, head_bias, forms: tuple[Form, Form], *,
               dtype, forward_dtype,
               vector_error: float = 0.0) -> LogitErrorBound:
  """delta(x) = D E + 2 gamma (omega X + beta) + 2 v X for the head.

  `vector_error` v bounds ||w^_i - w_i|| of computed class vectors (LLN's
  normalisation; 0 for a stored kernel).
  """
  x_form, e_form = forms
  kernel = _own_precision(class_vectors)
  gamma = _gamma(kernel.shape[0] + 1, dtype, forward_dtype)
  # ||w_c - w_j|| from the rounded differences d^ (|d| <= |d^| / (1 - u)),
  # times 1 + 2u.
  differences = _norm_upper(kernel[:, :, None] - kernel[:, None, :], 0)
  d_max = _rounding.round_up_into(_rounding.next_up(jnp.max(
      differences) * _rounding.round_up_into(
          1 + 2 * _rounding.unit_roundoff(kernel.dtype), kernel.dtype)), dtype)
  omega = _rounding.round_up_into(jnp.max(_norm_upper(kernel, 0)), dtype)
  if head_bias is None:
    beta = jnp.zeros((), dtype)
  else:  # `abs` flushes subnormals: count them as the smallest normal.
    head_bias = _own_precision(head_bias)
    beta = _rounding.round_up_into(jnp.max(jnp.where(
        _rounding.is_subnormal(head_bias), jnp.finfo(head_bias.dtype).tiny,
        jnp.abs(head_bias))), dtype)
  two_gamma = 2 * gamma
  v2 = _rounding.round_up_into(2 * vector_error, dtype)
  # The vectors given here are computed too: the exact ones' differences
  # and norms are within 2 v and v of theirs.
  d_max = d_max + v2
  omega = omega + v2
  offset = (d_max * e_form[0] + two_gamma * (omega * x_form[0] + beta)
            + v2 * x_form[0])
  slope = d_max * e_form[1] + two_gamma * omega * x_form[1] + v2 * x_form[1]
  return LogitErrorBound(offset=offset, slope=slope)


def _inflated(bound: LogitErrorBound, depth: int) -> LogitErrorBound:
  ops = _OPS_PER_LAYER * depth
  return LogitErrorBound(offset=_rounding.inflate(bound.offset, ops),
                         slope=_rounding.inflate(bound.slope, ops))


def chain_logit_error(
    ops: Sequence[LinearOperator],
    biases: Sequence[Array | None],
    layer_norms: Sequence[Array] | Array,
    *,
    input_mean_norm: float = 0.0,
    input_std_min: float = 1.0,
    forward_dtype=jnp.float32,
    dtype=None,
) -> LogitErrorBound:
  """The module docstring's bound for a chain of layers with a dense head.

  Args:
    ops: the layers' operators, head (dense, `(d, N)`) last.
    biases: each layer's bias (`(c_out,)`) or None.
    layer_norms: upper bounds S_l >= ||W_l||_2 of the layers before the head
      (a head entry, if present, is not used).
    input_mean_norm: M, the L2 norm of the mean subtracted from an input
      (broadcast to the input shape); 0 without normalisation.
    input_std_min: the smallest std the input is divided by (1: none).
    forward_dtype: dtype of the forward pass (its unit roundoff enters).
    dtype: dtype of the coefficients (default: `certification_dtype()`).

  Returns:
    The `LogitErrorBound`.
  """
  if ops[-1].kind != 'dense':
    raise ValueError(f"the head must be a dense layer, got {ops[-1].kind!r}")
  if len(biases) != len(ops) or len(layer_norms) < len(ops) - 1:
    raise ValueError(
        f'need one bias per layer and a norm bound per hidden layer: got '
        f'{len(ops)} ops, {len(biases)} biases, {len(layer_norms)} norms')
  dtype = certification_dtype() if dtype is None else dtype
  forms = input_forms(input_mean_norm, input_std_min, dtype, forward_dtype)
  for op, bias, norm in zip(ops[:-1], biases[:-1], layer_norms):
    forms = linear_step(op, bias, norm, forms, dtype=dtype,
                        forward_dtype=forward_dtype)
  return _inflated(head_error(ops[-1].kernel, biases[-1], forms, dtype=dtype,
                              forward_dtype=forward_dtype), len(ops))


def network_logit_error(model: models.LipschitzNetwork, variables,
                        input_shape: Sequence[int],
                        layer_norms: Sequence[Array] | Array,
                        forward_dtype=None) -> LogitErrorBound:
  """The logits' rounding bound of a `models.LipschitzNetwork`.

  Every layer family propagates (X, E) itself (its spec's `rounding_step`:
  `linear_step` for dense/conv layers, `series_step` for SOC layers), then
  the activation (`activation_step`) and the head (`head_error`).

  Args:
    model: the network (its normalisation and activation are read).
    variables: its `{'params', 'power_iteration'}` (or just its params, for
      networks without power-iteration-dependent layers).
    input_shape: shape of one input example.
    layer_norms: upper bounds of the layers' norms (head entry ignored), e.g.
      the sound bounds of `train.certification_bounds`.
    forward_dtype: dtype of the forward pass; default
      `certification_dtype()`.
  """
  if model.activation not in _EXACT_ACTIVATIONS + ('householder',):
    raise ValueError(
        f'the logit error bound needs an exact, 1-Lipschitz activation with '
        f'act(0) = 0 ({_EXACT_ACTIVATIONS}) or householder, got '
        f'{model.activation!r}')
  forward_dtype = (certification_dtype() if forward_dtype is None
                   else forward_dtype)
  dtype = certification_dtype()
  params = variables.get('params', variables)
  state = variables.get('power_iteration', {}) if 'params' in variables else {}
  mean_norm = 0.0
  if model.input_mean is not None:
    mean = np.asarray(model.input_mean, np.float64)
    positions = math.prod(input_shape) // mean.size
    mean_norm = _host_up(float(np.sqrt(positions * np.sum(mean * mean)))
                         * (1 + 1e-14))
  std_min = 1.0 if model.input_std is None else float(min(model.input_std))
  forms = input_forms(mean_norm, std_min, dtype, forward_dtype)
  shapes = models.layer_input_shapes(model, input_shape)
  names = models.layer_names(model)
  for i, (name, spec) in enumerate(zip(names, model.architecture)):
    forms = spec.rounding_step(
        {'params': params.get(name, {}),
         'power_iteration': state.get(name, {})},
        shapes[i], forms, layer_norms[i], dtype=dtype,
        forward_dtype=forward_dtype)
    if spec.activated:
      forms = activation_step(model.activation, forms,
                              forward_dtype=forward_dtype)
  head = model.head_spec
  vectors = head.class_vectors(params['head'])
  vector_error = head.class_vector_error(vectors.shape[0], forward_dtype)
  return _inflated(head_error(vectors, params['head'].get('bias'), forms,
                              dtype=dtype, forward_dtype=forward_dtype,
                              vector_error=vector_error),
                   len(model.architecture) + 1)


def cast_floats(tree: Any, dtype) -> Any:
  """Every floating-point leaf of `tree` cast to `dtype` (others kept)."""
  return jax.tree.map(
      lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating)
      else a, tree)


def certified_forward(apply_fn: Callable, variables, inputs: Array,
                      logit_error: LogitErrorBound):
  """The forward pass of a certification, and each example's margin error.

  Casts the variables and the inputs to `certification_dtype()` (exact for
  float32 inputs) and runs `apply_fn(variables, inputs)` with
  full-precision matmuls.

  Returns:
    `(apply_fn's output, (B,) margin error bounds)`.
  """
  dtype = certification_dtype()
  variables, inputs = cast_floats((variables, inputs), dtype)
  with jax.default_matmul_precision('highest'):
    out = apply_fn(variables, inputs)
  return out, logit_error.margin_error(inputs)
