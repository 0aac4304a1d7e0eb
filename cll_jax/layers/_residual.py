"""What CPL and SLL share: y = x - C^T S relu(C x + b), and its rounding.

Both families (`cll_jax.layers.cpl`, `cll_jax.layers.sll`) are residual
layers

    f(x) = x - C^T S relu(C x + b),

with C the layer's inner linear map (a dense kernel `(d, features)`, or a
stride-1 'same' zero-padded conv `(k, k, c, features)` with odd k), C^T its
exact adjoint and S >= 0 a diagonal scaling of the hidden units (CPL: the
scalar h = 2 / ||C||^2 estimate; SLL: 2 T^-1). The Jacobian is
I - C^T S D C with D = diag(relu'(.)) in [0, 1]; each family proves its own
bound of it. This module holds the parts that do not depend on S:

* the operators: `dense_operators` / `conv_operators` give C and C^T. For
  the conv, C^T is the conv with the kernel flipped in space and its
  channels swapped, zero padding k // 2 (exactly the adjoint for odd k and
  stride 1: `soc.transpose_kernel`);
* `residual_apply`, the forward pass: z = S relu(C x + b), y = x - C^T z
  (this order is what `residual_step` analyses);
* `sound_norm`: a guaranteed upper bound of ||C|| with a chosen accuracy,
  tightened for small operators on the explicit matrix;
* `residual_step`: the forward pass's float rounding, propagated as the
  (X, E) bounds of `cll_jax.forward_error`.

Rounding (`residual_step`). Write x^ for the computed input, X >= ||x^||,
E >= ||x^ - x||, u the forward pass's unit roundoff, n (m) the dot length
of C (of C^T), A >= || |C| || (`forward_error._abs_operator_norm`, also
|| |C^T| ||), B the bias norm over all hidden positions. The forward pass
computes

    t^ = fl(C x^ + b):  |t^ - (C x^ + b)| <= gamma_{n+1} (|C| |x^| + |b|)
                        (Higham, 2nd ed., eq. 3.5), so ||.|| <= R1 with
                        R1 = gamma_{n+1} (A X + B);
    r^ = relu(t^):      exact; ||r^ - relu(C x^ + b)|| <= R1 (relu is
                        1-Lipschitz entrywise) and |r^| <= |C x^| + |b| +
                        |t^ - (C x^ + b)|, so with N_out >= ||S C|| =
                        ||C^T S|| (S the exact scaling) and
                        B_S >= ||S b||, ||S r^|| <= Z = N_out X + B_S +
                        s_max R1, s_max >= max_i s_i;
    z^ = fl(S^ r^):     entrywise z^_i = s_i r^_i (1 + theta_i) with
                        |theta_i| <= theta: the computed scale's relative
                        error against the exact s_i plus the product's
                        rounding (each family bounds theta), so
                        ||z^ - S r^|| <= theta Z and ||z^|| <= (1 + theta) Z;
    w^ = fl(C^T z^):    |w^ - C^T z^| <= gamma_{m+1} |C^T| |z^|, whose norm
                        is <= gamma_{m+1} A (1 + theta) Z;
    y^ = fl(x^ - w^):   within u ||x^ - w^|| of x^ - w^.

The exact layer on x^ is f(x^) = x^ - C^T S relu(C x^ + b), and with
S_C >= ||C|| (= ||C^T||)

    ||w^ - C^T S relu(C x^ + b)||
        <= ||C^T S (r^ - relu(C x^ + b))|| + ||C^T (z^ - S r^)|| + ||e_w||
        <= N_out R1 + (S_C theta + gamma_{m+1} A (1 + theta)) Z =: D0.

||f(x^)|| <= L X + ||f(0)|| <= L X + N_out B (L the layer's proven bound,
f(0) = -C^T S relu(b)), so ||x^ - w^|| <= L X + N_out B + D0 and the
subtraction adds e4 = u (L X + N_out B + D0). Then

    X' = L X + N_out B + D0 + e4,      E' = L E + D0 + e4,

E' because ||y^ - f(x)|| <= ||y^ - f(x^)|| + ||f(x^) - f(x)|| and the input's
error passes through the exact layer with factor L. Every term is affine in
||x||_2, as the forms (p, q) of `forward_error` are. The coefficients are
computed in `dtype` by round-to-nearest from upper bounds and inflated by
gamma of their operation count (`_rounding.inflate`), so they are upper
bounds themselves.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from cll_jax import _rounding
from cll_jax.operators import LinearOperator

# Convs with at most this many inputs are bounded on their explicit matrix
# (as `soc.EXPLICIT_MATRIX_MAX_INPUTS`): exact for small maps, where the
# circular embedding of a zero-padded conv is loose.
EXPLICIT_MATRIX_MAX_INPUTS = 2048
# Relative accuracy of the Gram iteration in `sound_norm` when it runs in
# float64: CPL's bound is 2 (||C||_upper / sigma)^2 - 1, so the sound norm's
# slack enters it four times; the default 1e-4 of `sound_bounds` would leave
# the bound up to 1 + 4e-4.
FLOAT64_RTOL = 1e-10
# Operations along any path in `residual_step`'s coefficients, with room.
_STEP_OPS = 40


def check_kernel_size(kernel_size: int) -> None:
  if kernel_size < 1 or kernel_size % 2 == 0:
    raise ValueError(
        f'the residual conv needs an odd kernel size (its adjoint is the '
        f'flipped conv with the same zero padding k // 2 only then), got '
        f'{kernel_size}')


def check_features(features: int) -> None:
  if features < 1:
    raise ValueError(f'features (inner units / channels) must be >= 1, got '
                     f'{features}')


def transpose_kernel(kernel: jax.Array) -> jax.Array:
  """The HWIO kernel of the adjoint of a stride-1 'same' conv (odd k)."""
  return jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)


def dense_operators(kernel: jax.Array, precision=None
                    ) -> tuple[LinearOperator, LinearOperator]:
  """(C, C^T) of a dense kernel `(d, features)`: C x = x @ kernel."""
  d, features = kernel.shape
  return (LinearOperator(kernel, 'dense', (d,), precision=precision),
          LinearOperator(kernel.T, 'dense', (features,), precision=precision))


def conv_operators(kernel: jax.Array, input_shape: tuple[int, ...],
                   precision=None) -> tuple[LinearOperator, LinearOperator]:
  """(C, C^T) of a stride-1 conv with zero padding k // 2 on `input_shape`.

  C^T is the conv of the flipped, channel-swapped kernel with the same
  padding on the hidden shape `(H, W, features)`.
  """
  k = kernel.shape[0]
  check_kernel_size(k)
  pad = ((k // 2, k // 2), (k // 2, k // 2))
  h, w, _ = input_shape
  inner = LinearOperator(kernel, 'conv', tuple(input_shape), padding=pad,
                         precision=precision)
  outer = LinearOperator(transpose_kernel(kernel), 'conv',
                         (h, w, kernel.shape[-1]), padding=pad,
                         precision=precision)
  return inner, outer


def residual_apply(inner: LinearOperator, outer: LinearOperator, bias,
                   scale: jax.Array, x: jax.Array) -> jax.Array:
  """y = x - C^T (scale * relu(C x + b)); `scale` broadcasts on channels."""
  t = inner(x)
  if bias is not None:
    t = t + bias
  return x - outer(scale * jax.nn.relu(t))


def sound_norm(op: LinearOperator) -> jax.Array:
  """A guaranteed upper bound of ||op||, tight in float64.

  `sound_bounds.operator_norm_upper_bound` (Gram iteration; a conv through
  its circular embedding, which exceeds a zero-padded conv's norm by ~1% at
  16x16, more on smaller maps), with rtol `FLOAT64_RTOL` when x64 is on
  (the bound then runs in float64) and the default otherwise. A conv with
  at most `EXPLICIT_MATRIX_MAX_INPUTS` inputs (and an explicit matrix of at
  most 2^24 entries) is bounded on its explicit matrix instead, whose
  entries are the kernel's (no rounding): the operator itself. The result
  has the dtype of `op.kernel` (at least float32).
  """
  from cll_jax import sound_bounds  # pylint: disable=g-import-not-at-top
  rtol = (FLOAT64_RTOL if jax.config.jax_enable_x64
          else sound_bounds.DEFAULT_RTOL)
  inputs = math.prod(op.input_shape)
  if (op.kind == 'conv' and inputs <= EXPLICIT_MATRIX_MAX_INPUTS
      and inputs * math.prod(op.output_shape) <= 2**24):
    return sound_bounds.dense_norm_upper_bound(op.dense_matrix().T,
                                               rtol=rtol)
  return sound_bounds.operator_norm_upper_bound(op, rtol=rtol)


def dot_length(op: LinearOperator) -> int:
  """Products summed per output entry: d (dense), kh kw c_in (conv)."""
  if op.kind == 'dense':
    return int(op.kernel.shape[0])
  kh, kw, c_in, _ = op.kernel.shape
  return int(kh * kw * c_in)


def residual_step(inner: LinearOperator, outer: LinearOperator, bias,
                  forms, *, lipschitz, inner_norm, scaled_norm, scaled_bias,
                  scale_max, scale_error, dtype, forward_dtype):
  """(X, E) after y = x - C^T S relu(C x + b) (module docstring).

  Args:
    inner, outer: C and C^T.
    bias: the hidden bias `(features,)` or None.
    forms: ((X_p, X_q), (E_p, E_q)), bounds p + q ||x||_2.
    lipschitz: L >= the exact layer's Lipschitz constant.
    inner_norm: S_C >= ||C||.
    scaled_norm: N_out >= ||S C|| = ||C^T S||.
    scaled_bias: B_S >= ||S b|| over all hidden positions.
    scale_max: s_max >= max_i s_i.
    scale_error: theta, the computed z^_i = s_i r^_i (1 + theta_i) has
      |theta_i| <= theta.
    dtype: dtype of the coefficients.
    forward_dtype: dtype of the forward pass (its unit roundoff enters).

  Returns:
    The new ((X_p, X_q), (E_p, E_q)); +inf where a coefficient is infinite
    (nothing certifies then).
  """
  from cll_jax import forward_error  # pylint: disable=g-import-not-at-top
  # pylint: disable=protected-access
  (xp, xq), (ep, eq) = forms

  def up(v):
    return _rounding.round_up_into(jnp.asarray(v), dtype)

  u = up(_rounding.unit_roundoff(forward_dtype))
  g_in = forward_error._gamma(dot_length(inner) + 1, dtype, forward_dtype)
  g_out = forward_error._gamma(dot_length(outer) + 1, dtype, forward_dtype)
  # || |C| || = || |C^T| || (the same entries, transposed).
  a = up(forward_error._abs_operator_norm(inner))
  b = forward_error._bias_norm(inner, bias, dtype)
  # pylint: enable=protected-access
  lip, s_c, n_out, b_s, s_max, theta = (
      up(v) for v in (lipschitz, inner_norm, scaled_norm, scaled_bias,
                      scale_max, scale_error))
  r1 = (g_in * (a * xp + b), g_in * a * xq)
  z = (n_out * xp + b_s + s_max * r1[0], n_out * xq + s_max * r1[1])
  k = s_c * theta + g_out * a * (1 + theta)
  d0 = (n_out * r1[0] + k * z[0], n_out * r1[1] + k * z[1])
  x_exact = (lip * xp + n_out * b + d0[0], lip * xq + d0[1])
  e4 = (u * x_exact[0], u * x_exact[1])
  x_new = (x_exact[0] + e4[0], x_exact[1] + e4[1])
  e_new = (lip * ep + d0[0] + e4[0], lip * eq + d0[1] + e4[1])
  finite = (jnp.isfinite(lip) & jnp.isfinite(n_out) & jnp.isfinite(b_s)
            & jnp.isfinite(s_max) & jnp.isfinite(k))

  def out(v):
    v = _rounding.inflate(v, _STEP_OPS)
    return jnp.where(finite & ~jnp.isnan(v), v, jnp.inf)

  return ((out(x_new[0]), out(x_new[1])), (out(e_new[0]), out(e_new[1])))
