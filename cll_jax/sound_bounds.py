"""Guaranteed upper bounds on the operator norms of dense and conv layers.

Power iteration (`cll_jax.lipschitz`) converges to the largest singular value
from *below*: a certificate resting on an unconverged estimate can be wrong.
This module computes upper bounds that hold whatever the number of iterations,
by Gram iteration (Delattre, Barthelemy, Araujo, Allauzen, ICML 2023,
"Efficient Bound of Lipschitz Constant for Convolutional Layers by Gram
Iteration"):

    G_0 = W,   G_{t+1} = G_t^H G_t,   sigma_1(W) = sigma_1(G_t)^(2^-t)
                                                 <= ||G_t||_F^(2^-t).

With r = rank(W), ||G_t||_F^(2^-t) = (sum_i sigma_i^(2^(t+1)))^(2^-(t+1))
<= r^(2^-(t+1)) sigma_1, so the bound converges to sigma_1 from above, at worst
(all singular values equal) like r^(2^-(t+1)); `worst_case_iterations` turns
that into an iteration count. Every step also yields the lower bound
sigma_1(G_t) >= ||G_{t+1}||_F / ||G_t||_F, so the gap between the two is
known; by default (`num_iterations=None`) the iteration stops once that gap
is below `rtol` (the lower bound only decides when to stop; the returned value
is always the upper bound).

G_t is divided by its Frobenius norm before every product and the scale is
carried in the log domain (ell_t = 2^-t log-scale), so nothing overflows:
with H_t = G_t / exp(2^t ell_t), f_t = ||H_t||_F,

    ell_{t+1} = ell_t + 2^-t log f_t,   H_{t+1} = (H_t/f_t)^H (H_t/f_t),
    log sigma_1 <= ell_T + 2^-T log ||H_T||_F.

Convolutions: see `circular_conv_norm_upper_bound` (exact block
diagonalisation by the 2-D DFT) and `conv_norm_upper_bound` (zero padding and
stride reduce to a circular conv on an enlarged grid).

Floating-point rounding (what `relative_float_allowance` covers): the bounds
are computed in the kernel's dtype (float32 normally; float64 when
`jax_enable_x64` is on and the kernel is float64), with
`Precision.HIGHEST` on every product: on GPUs the default float32 matmul
precision is TF32 (11-bit mantissa), whose errors (~5e-4) would swamp the
bound. The computed value differs from the exact-arithmetic bound by:
  * normalisations, norms, log/exp: a few ulps each, weighted by 2^-t, so
    < ~10 ulps in total;
  * the DFT of a conv kernel: each entry of K_hat(w) is a sum of kh*kw <= 16
    products with phases accurate to an ulp: <= ~20 ulps of sum|k| per entry;
  * the Gram products: fl(H^H H) = H^H H + E with |E| <= gamma_n |H|^H |H|
    (Higham, Accuracy and Stability of Numerical Algorithms, sec. 3.5). The
    perturbation of sigma_1(H_{t+1}) relative to itself is amplified by the
    stable rank of H_t and enters the final bound with weight 2^-(t+1).
    The *worst-case* (all roundings aligned) figure, ~n * srank * u / 2, is
    about 2e-3 for a 512 x 512 Gaussian layer and far too pessimistic; with the
    standard probabilistic model of rounding (independent mean-zero errors,
    Higham & Mary, SIAM J. Sci. Comput. 41(5), 2019) E behaves like a random
    matrix whose entries are ~sqrt(n) u times the entries of |H|^H|H|, and
    its first-order effect on sigma_1, u_1^H E v_1, is of order sqrt(n) u
    relative to sigma_1, i.e. tens of ulps for n <= 512.
Measured (`benchmarks/sound_bounds.py`, CPU, Kaiming-normal 4C3F and 8C2F
layers): the float32 bounds lie at most 1.9e-7 relative below the float64
value they converge to (exact SVD, or exact norm of the circular embedding);
the tests allow 2e-6. `DEFAULT_RELATIVE_FLOAT_ALLOWANCE` = 2^-12 ~ 2.4e-4 per layer
(about 2000 float32 ulps) covers that with a margin of ~100x; it rests on the
probabilistic model, not on the worst-case bound. For a bound whose rounding
is covered rigorously, enable x64 and pass float64 kernels: then even the
worst-case figure (~1e-11) is far below the allowance.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cll_jax import _validation
from cll_jax.operators import LinearOperator

# The relative accuracy the default iteration aims at (upper minus lower bound).
DEFAULT_RTOL = 1e-4
# Per-layer relative allowance for float32 rounding in the bound computation
# (2^-12, ~2000 float32 ulps); see the module docstring.
DEFAULT_RELATIVE_FLOAT_ALLOWANCE = 2.0 ** -12

_HIGHEST = jax.lax.Precision.HIGHEST


def worst_case_iterations(rank: int, rtol: float = DEFAULT_RTOL) -> int:
  """Gram steps T after which r^(2^-(T+1)) <= 1 + rtol for rank r.

  After T steps the bound is at most r^(2^-(T+1)) sigma_1 in exact arithmetic,
  whatever the spectrum, so T steps always reach relative accuracy `rtol`.
  """
  if rank < 1:
    raise ValueError(f'rank must be >= 1, got {rank}')
  if not 0 < rtol < 1:
    raise ValueError(f'rtol must lie in (0, 1), got {rtol}')
  if rank == 1:
    return 0  # ||W||_F = sigma_1 exactly.
  ratio = math.log(rank) / math.log1p(rtol)
  return max(math.ceil(math.log2(ratio)) - 1, 0)


def _frobenius(h: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.real(h * jnp.conj(h)), axis=(-2, -1)))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _gram_log_upper_bounds(mats: jax.Array, num_iterations: int | None,
                           rtol: float) -> jax.Array:
  """Batched Gram iteration; log upper bounds on sigma_1 of each matrix.

  Args:
    mats: `(B, m, n)` real or complex matrices.
    num_iterations: number of products G <- G^H G; None stops once
      max_b(upper) - max_b(lower) <= log1p(rtol) (at most
      `worst_case_iterations(min(m, n), rtol)` products).
    rtol: relative accuracy for the adaptive stop.

  Returns:
    `(B,)` real: log of an upper bound on sigma_1 of each matrix (-inf for a
    zero matrix).
  """
  m, n = mats.shape[-2:]
  if m < n:  # G^H G of the transpose is the smaller Gram matrix.
    mats = jnp.swapaxes(mats, -1, -2)
  rank_bound = min(m, n)
  if num_iterations is None:
    cap = worst_case_iterations(rank_bound, rtol)
    threshold = math.log1p(rtol)
  else:
    if num_iterations < 0:
      raise ValueError(f'num_iterations must be >= 0, got {num_iterations}')
    cap = num_iterations
    threshold = -math.inf  # never converged: run exactly `cap` steps.
  real_dtype = jnp.real(mats).dtype
  tiny = jnp.finfo(real_dtype).tiny

  # First scale by the max-abs entry so that squaring cannot overflow.
  peak = jnp.maximum(jnp.max(jnp.abs(mats), axis=(-2, -1)), tiny)
  # Multiplying by a real reciprocal: XLA's complex division of 0 by a tiny
  # denominator gives NaN.
  h = mats * (1 / peak)[:, None, None]
  ell = jnp.log(peak)
  if cap == 0:
    return ell + jnp.log(_frobenius(h))

  def step(h, ell, scale):
    f = jnp.maximum(_frobenius(h), tiny)
    hn = h * (1 / f)[:, None, None]
    ell = ell + scale * jnp.log(f)
    h = jnp.einsum('bij,bik->bjk', jnp.conj(hn), hn, precision=_HIGHEST)
    return h, ell

  def log_bounds(h, ell, scale):
    # scale = 2^-t for the step that produced h from H_{t}.
    log_norm = jnp.log(_frobenius(h))
    upper = ell + 0.5 * scale * log_norm
    lower = ell + scale * log_norm  # log_norm <= 0 up to rounding
    return upper, lower

  one = jnp.ones((), real_dtype)
  h, ell = step(h, ell, one)
  upper, lower = log_bounds(h, ell, one)
  gap = jnp.max(upper) - jnp.max(lower)

  def cond(state):
    _, _, _, t, gap = state
    return jnp.logical_and(t < cap, jnp.logical_not(gap <= threshold))

  def body(state):
    h, ell, scale, t, _ = state
    h, ell = step(h, ell, scale)
    upper, lower = log_bounds(h, ell, scale)
    return h, ell, 0.5 * scale, t + 1, jnp.max(upper) - jnp.max(lower)

  # `scale` is the weight 2^-t of the next step; halving is exact.
  state = (h, ell, 0.5 * one, jnp.array(1), gap)
  h, ell, scale, _, _ = jax.lax.while_loop(cond, body, state)
  return ell + scale * jnp.log(_frobenius(h))


def _compute_dtype(kernel: jax.Array):
  _validation.check_floating('kernel', kernel)
  return jnp.promote_types(kernel.dtype, jnp.float32)


def dense_norm_upper_bound(kernel: jax.Array,
                           num_iterations: int | None = None,
                           rtol: float = DEFAULT_RTOL) -> jax.Array:
  """Guaranteed upper bound on sigma_1 of a `(d_in, d_out)` matrix.

  Gram iteration (Delattre et al. 2023): sigma_1(W) <=
  ||G_T||_F^(2^-T), computed with per-step rescaling (module docstring).

  Args:
    kernel: `(d_in, d_out)` dense kernel.
    num_iterations: number of Gram products (static). None (default): stop
      once the certified gap to the lower bound is <= rtol, at most
      `worst_case_iterations(min(d_in, d_out), rtol)` products (which reach
      rtol for any spectrum, e.g. 15 for rank 512 and rtol 1e-4).
    rtol: relative accuracy of the adaptive stop.

  Returns:
    Scalar upper bound on the largest singular value (exact-arithmetic bound;
    see `DEFAULT_RELATIVE_FLOAT_ALLOWANCE` for rounding).
  """
  _validation.check_ndim('kernel', kernel, 2)
  dtype = _compute_dtype(kernel)
  _validation.check_finite('kernel', kernel)
  log_bound = _gram_log_upper_bounds(kernel.astype(dtype)[None],
                                     num_iterations, rtol)
  return jnp.exp(log_bound[0])


def _dft_phases(n: int, k: int, num_freqs: int, dtype) -> jax.Array:
  """(num_freqs, k) matrix exp(-2 pi i w a / n), w < num_freqs, a < k."""
  # (w * a) mod n keeps the angle in [0, 2 pi): accurate cos/sin in float32.
  wa = (np.arange(num_freqs)[:, None] * np.arange(k)[None, :]) % n
  angle = jnp.asarray(2.0 * np.pi * wa / n, dtype)
  return jax.lax.complex(jnp.cos(angle), -jnp.sin(angle))


def circular_conv_norm_upper_bound(kernel: jax.Array,
                                   grid_shape: tuple[int, int],
                                   num_iterations: int | None = None,
                                   rtol: float = DEFAULT_RTOL) -> jax.Array:
  """Upper bound on the norm of a 2-D circular convolution on an n1 x n2 grid.

  The operator (a cross-correlation, like `lax.conv_general_dilated`) is

      z[i, j, o] = sum_{a, b, c} k[a, b, c, o] x[(i + a) mod n1,
                                                 (j + b) mod n2, c].

  With the unitary 2-D DFT, Z(w) = M(w) X(w) where
  M(w) = (sum_{a,b} k[a, b] e^{+2 pi i (w1 a / n1 + w2 b / n2)})^T is
  `(c_out, c_in)`: the operator is unitarily block-diagonal, so its norm is
  max_w sigma_1(M(w)) (Sedghi, Gupta, Long, ICLR 2019). Since
  M(w) = K_hat(-w)^T with K_hat(w) = sum_{a,b} k[a,b] e^{-2 pi i (...)} (the
  2-D DFT of the kernel zero-padded to the grid; kernel taps beyond the grid
  alias, as they do in the operator), and w -> -w permutes the grid, the norm
  is max_w sigma_1(K_hat(w)). For a real kernel K_hat(-w) = conj(K_hat(w)),
  so only w2 in [0, n2 // 2] is evaluated. Each sigma_1(K_hat(w)) is bounded
  by complex Gram iteration (G <- G^H G), batched over w; the maximum of the
  bounds bounds the norm (as in Delattre et al. 2023).

  K_hat is computed directly as a kh*kw-term sum per entry (not by an FFT of
  the padded kernel): more accurate and as cheap for small kernels.

  Args:
    kernel: `(kh, kw, c_in, c_out)` real kernel (HWIO).
    grid_shape: `(n1, n2)` spatial grid of the circular conv.
    num_iterations: Gram products; None: adaptive, see
      `dense_norm_upper_bound`.
    rtol: relative accuracy of the adaptive stop.

  Returns:
    Scalar upper bound on the operator norm of the circular convolution.
  """
  _validation.check_ndim('kernel', kernel, 4)
  dtype = _compute_dtype(kernel)
  _validation.check_finite('kernel', kernel)
  if (len(grid_shape) != 2
      or not all(isinstance(n, (int, np.integer)) and n >= 1
                 for n in grid_shape)):
    raise ValueError(
        f'grid_shape must be two positive ints, got {grid_shape}')
  return _circular_bound(kernel.astype(dtype), tuple(int(n) for n in grid_shape),
                         num_iterations, rtol)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _circular_bound(kernel: jax.Array, grid_shape: tuple[int, int],
                    num_iterations: int | None, rtol: float) -> jax.Array:
  n1, n2 = grid_shape
  dtype = kernel.dtype
  kh, kw, c_in, c_out = kernel.shape
  ph1 = _dft_phases(n1, kh, n1, dtype)
  ph2 = _dft_phases(n2, kw, n2 // 2 + 1, dtype)
  k_hat = jnp.einsum('ia,jb,abcd->ijcd', ph1, ph2,
                     kernel.astype(ph1.dtype), precision=_HIGHEST)
  mats = k_hat.reshape(-1, c_in, c_out)
  return jnp.exp(jnp.max(_gram_log_upper_bounds(mats, num_iterations, rtol)))


def conv_embedding(op: LinearOperator) -> tuple[jax.Array, tuple[int, int]]:
  """A circular conv (kernel, grid) whose norm bounds the layer's norm.

  The layer computes the cross-correlation (per spatial axis; the 2-D case is
  the product of the two 1-D constructions)

      y[i] = sum_{a < k} w[a] p[s i + a],   i < H_out,

  of the zero-padded input p (length P = pad_lo + H + pad_hi; p[j] =
  x[j - pad_lo] inside, 0 outside), with H_out = floor((P - k) / s) + 1.

  Polyphase (exact rewrite of the stride): write a = s q + r, 0 <= r < s,
  q < k' = ceil(k / s), w'[q, r] = w[s q + r] (0 past the kernel), and
  X_r[j] = p[s j + r] for j < m = ceil(P / s) (p extended by zeros to length
  s m). Then y[i] = sum_{q, r} w'[q, r] X_r[i + q]: a stride-1
  cross-correlation with kernel size k' of the input (X_r)_r, which has
  s*c_in channels (the kernel becomes (k1', k2', s1*s2*c_in, c_out)).

  Circular embedding: on the grid of size m, the circular cross-correlation
  z[i] = sum_q w'[q] X[(i + q) mod m] equals y[i] whenever i + k' - 1 <= m - 1.
  Every output of the layer satisfies it: with P = k + s (H_out - 1) + rho,
  0 <= rho < s, m = ceil(P / s) = H_out - 1 + ceil((k + rho) / s)
  >= H_out - 1 + k'. Hence

      layer = S o C o E,

  where E: x -> (X_r)_r places each input entry at its own grid position and
  fills the rest with zeros (an isometry, ||E|| = 1), C is the circular conv
  on the m1 x m2 grid, and S keeps the outputs i < H_out (a coordinate
  restriction, ||S|| = 1). So ||layer|| <= ||C||. For stride 1 this is just
  the circular conv of the original kernel on the padded P1 x P2 grid; the
  polyphase form is tighter for strided layers than bounding the stride-1
  conv (whose rows the strided layer subsamples), and equally sound.

  Returns:
    (polyphase kernel `(k1', k2', s1*s2*c_in, c_out)`, grid `(m1, m2)`).
  """
  if op.kind != 'conv':
    raise ValueError(f"conv_embedding needs a 'conv' operator, got {op.kind!r}")
  kernel = op.kernel
  kh, kw, c_in, c_out = kernel.shape
  s1, s2 = op.strides
  (pt, pb), (pl, pr) = op.padding
  h, w, _ = op.input_shape
  op.output_shape  # raises if the layer has no output.
  k1, k2 = -(-kh // s1), -(-kw // s2)
  m1, m2 = -(-(h + pt + pb) // s1), -(-(w + pl + pr) // s2)
  kernel = jnp.pad(kernel, ((0, k1 * s1 - kh), (0, k2 * s2 - kw), (0, 0),
                            (0, 0)))
  kernel = kernel.reshape(k1, s1, k2, s2, c_in, c_out)
  kernel = kernel.transpose(0, 2, 1, 3, 4, 5).reshape(
      k1, k2, s1 * s2 * c_in, c_out)
  return kernel, (m1, m2)


def conv_norm_upper_bound(op: LinearOperator,
                          num_iterations: int | None = None,
                          rtol: float = DEFAULT_RTOL) -> jax.Array:
  """Upper bound on the norm of a conv layer with its stride and zero padding.

  The layer equals S o C o E with E an isometric embedding, C a circular
  convolution on an enlarged grid and S a restriction of outputs (proof in
  `conv_embedding`), so ||layer|| <= ||C||, bounded by
  `circular_conv_norm_upper_bound`.

  Args:
    op: a 'conv' `LinearOperator` (`input_shape`, `strides`, `padding` as the
      layer uses them).
    num_iterations, rtol: as in `circular_conv_norm_upper_bound`.

  Returns:
    Scalar upper bound on the layer's operator norm.
  """
  kernel, grid = conv_embedding(op)
  return circular_conv_norm_upper_bound(kernel, grid, num_iterations, rtol)


def operator_norm_upper_bound(op: LinearOperator,
                              num_iterations: int | None = None,
                              rtol: float = DEFAULT_RTOL) -> jax.Array:
  """Upper bound on ||op||_2 for a dense or conv `LinearOperator`."""
  if op.kind == 'dense':
    return dense_norm_upper_bound(op.kernel, num_iterations, rtol)
  if op.kind == 'conv':
    return conv_norm_upper_bound(op, num_iterations, rtol)
  raise ValueError(f"op.kind must be 'dense' or 'conv', got {op.kind!r}")


def network_upper_bound(
    ops: Sequence[LinearOperator],
    input_scale: float | jax.Array = 1.0,
    relative_float_allowance: float = DEFAULT_RELATIVE_FLOAT_ALLOWANCE,
    num_iterations: int | None = None,
    rtol: float = DEFAULT_RTOL) -> jax.Array:
  """Upper bound on the Lipschitz constant of a chain of 1-Lipschitz-activated
  linear layers: input_scale * prod_l ||op_l|| (CLL eq. 1).

  Returns input_scale * prod_l b_l * (1 + a)^L with b_l =
  `operator_norm_upper_bound(op_l)` and a = `relative_float_allowance` per
  layer, covering the float rounding of each b_l (module docstring) and of
  the product itself (L multiplications, <= L/2 ulps).

  Args:
    ops: the layers' linear operators, in order.
    input_scale: Lipschitz constant of any fixed input map (e.g. 1/std of a
      normalisation), >= 0.
    relative_float_allowance: per-layer relative allowance, >= 0.
    num_iterations, rtol: passed to each layer bound.

  Returns:
    Scalar upper bound.
  """
  if not ops:
    raise ValueError('ops must hold at least one LinearOperator, got none')
  if relative_float_allowance < 0:
    raise ValueError(
        f'relative_float_allowance must be >= 0, got {relative_float_allowance}')
  if _validation.is_concrete(input_scale) and np.any(np.asarray(input_scale) < 0):
    raise ValueError(f'input_scale must be >= 0, got {input_scale}')
  bound = jnp.asarray(input_scale, jnp.float32)
  for op in ops:
    bound = bound * operator_norm_upper_bound(op, num_iterations, rtol)
  return bound * (1.0 + relative_float_allowance) ** len(ops)
