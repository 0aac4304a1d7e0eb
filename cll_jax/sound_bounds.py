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

G_t is rescaled before every product by an exact power of two (Frobenius
norm of the rescaled H_t in [1/2, 1)), and the exponents are carried as
integers: with H_0 = W 2^-e_0, Hn_t = H_t 2^-k_t and H_{t+1} = Hn_t^H Hn_t,

    sigma_1(W) = 2^e_0 sigma_1(H_0),  sigma_1(H_t) = 2^k_t sqrt(sigma_1(H_{t+1})),

so nothing overflows and no scale error arises at any magnitude (the log
domain is used only for the stopping rule).

Convolutions: see `circular_conv_norm_upper_bound` (exact block
diagonalisation by the 2-D DFT) and `conv_norm_upper_bound` (zero padding and
stride reduce to a circular conv on an enlarged grid).

Floating-point rounding: every returned value bounds the norm of the given
kernel, rounding of this computation included (Higham, "Accuracy and
Stability of Numerical Algorithms", 2nd ed., ch. 3; `cll_jax._rounding`):
  * a computed product is fl(Hn^H Hn) = Hn^H Hn + E with entrywise
    |E| <= c |Hn|^H |Hn|, c = gamma_m (real) or sqrt(2) gamma_{m+2}
    (complex) for sums of m terms in any order, so
    ||E||_2 <= c ||Hn||_F^2 and sigma_1(Hn_t)^2 <= sigma_1(H_{t+1}) + c F_t
    with F_t an upper bound of ||Hn_t||_F^2. The bound is evaluated
    backwards from v_T >= ||H_T||_F >= sigma_1(H_T):
        v_t = 2^k_t sqrt(v_{t+1} + c F_t) >= sigma_1(H_t),
    plus absolute terms for entries flushed to zero (FTZ), and a final
    factor for the rounding of this recursion (`_BACKWARD_ROUNDING_ULPS`);
  * the DFT of a conv kernel (phases from float64, one rounding each) is
    within `_dft_error_factor` * sum_{a,b} |k[a, b]| entrywise; its
    Frobenius norm is added to every frequency's bound (Weyl).
The term c F_t is the worst case, relative to sigma_1^2 about c times the
stable rank of H_t: with u = 2^-24 (float32) it adds ~5e-4 for a 256 x 192
Gaussian matrix and ~3e-3 for a near-orthogonal one, with u = 2^-53
(float64) ~1e-12. The bounds are therefore computed in float64 whenever JAX
can: always for eager calls (x64 scoped to the call; not on TPUs), and under
`jit` when x64 is on; under `jit` without x64 in the kernel's dtype, with its
own (larger) terms. Products use `Precision.HIGHEST`: on GPUs the default
float32 matmul precision is TF32, for which c above does not hold.
Assumptions: IEEE arithmetic (correctly rounded +, *, sqrt; FTZ allowed),
dots evaluated as sums of products (complex ones by the 4-multiplication
formula).

`DEFAULT_RELATIVE_FLOAT_ALLOWANCE` = 2^-12 per layer is kept on top in
`network_upper_bound` (and `train.certification_bounds`): it covers the
rounding of the product of the layer bounds, of the input scale and of the
head's column distances ||w_i - w_j|| (a few ulps each, and about d/2 ulps
for a d-dimensional column: below 2^-12 for d <= 4096).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cll_jax import _rounding
from cll_jax import _validation
from cll_jax.operators import LinearOperator

# The relative accuracy the default iteration aims at (upper minus lower bound).
DEFAULT_RTOL = 1e-4
# Per-layer relative allowance for the float32 rounding around the layer
# bounds (product, input scale, head distances), 2^-12 ~ 2000 float32 ulps;
# see the module docstring.
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


def _product_error_factor(inner: int, dtype, is_complex: bool) -> float:
  """c with ||fl(H^H H) - H^H H||_F <= c ||H||_F^2 (sums of `inner` terms).

  Entrywise |E| <= gamma_inner |H|^H |H| for real and sqrt(2) gamma_{inner+2}
  |H|^H |H| for complex products (Higham, 2nd ed., sec. 3.1 and 3.6), and
  ||(|H|^H |H|)||_F <= ||H||_F^2.
  """
  if is_complex:
    return math.nextafter(math.sqrt(2.0) * _rounding.gamma(inner + 2, dtype),
                          math.inf)
  return _rounding.gamma(inner, dtype)


# The backward recursion v_t = 2^k (sqrt(v_{t+1} + a_t) + b) rounds to
# nearest 5 times per step (the power of two is exact). If the computed
# v_{t+1} is >= (1 - e) times its exact-arithmetic value, the computed v_t is
# >= (1 - u)^2.5 (1 - e)^(1/2) times its own, so the relative deficit stays
# below the fixed point e = 5u + O(u^2) however many steps there are; a
# final factor 1 + 8u (rounded up) covers it.
_BACKWARD_ROUNDING_ULPS = 8


def _up_constant(value: float, dtype) -> jax.Array:
  return _rounding.round_up_into(value, dtype)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _gram_upper_bounds(mats: jax.Array, num_iterations: int | None,
                       rtol: float) -> jax.Array:
  """Batched Gram iteration; rigorous upper bounds on sigma_1 of each matrix.

  Exact-arithmetic bound (module docstring) plus the rounding of this very
  computation, carried a posteriori (module docstring, "Floating-point
  rounding").

  Args:
    mats: `(B, m, n)` real or complex matrices.
    num_iterations: number of products G <- G^H G; None stops once
      max_b(upper) - max_b(lower) <= log1p(rtol) of the exact-arithmetic
      estimates (at most `worst_case_iterations(min(m, n), rtol)` products).
    rtol: relative accuracy for the adaptive stop.

  Returns:
    `(B,)` real upper bounds on sigma_1 of each matrix (0 for a zero matrix).
  """
  m, n = mats.shape[-2:]
  if m < n:  # G^H G of the transpose is the smaller Gram matrix.
    mats = jnp.swapaxes(mats, -1, -2)
    m, n = n, m
  if num_iterations is None:
    cap = worst_case_iterations(n, rtol)
    threshold = math.log1p(rtol)
  else:
    if num_iterations < 0:
      raise ValueError(f'num_iterations must be >= 0, got {num_iterations}')
    cap = num_iterations
    threshold = -math.inf  # never converged: run exactly `cap` steps.
  real_dtype = jnp.real(mats).dtype
  is_complex = jnp.iscomplexobj(mats)
  tiny = float(jnp.finfo(real_dtype).tiny)
  batch = mats.shape[0]
  # Absolute terms for flush-to-zero: a scaling that flushes entries below
  # tiny (Frobenius norm < tiny sqrt(m n) <= tiny m), and the products and
  # partial sums of one Gram entry (2 m of them, twice if complex).
  flush_first = _up_constant(tiny * math.sqrt(m * n), real_dtype)
  flush_scale = _up_constant(tiny * m, real_dtype)
  flush_product = _up_constant(tiny * 4 * m * n, real_dtype)
  first_factor = _up_constant(
      _product_error_factor(m, real_dtype, is_complex), real_dtype)
  gram_factor = _up_constant(
      _product_error_factor(n, real_dtype, is_complex), real_dtype)
  ln2 = math.log(2.0)

  # H_0 = W 2^-e0, an exact power-of-two scaling: no scale error at all.
  peak = jnp.max(jnp.abs(mats), axis=(-2, -1))
  e0 = _rounding.exponent(_rounding.raise_subnormal(peak)) + 1
  h = _rounding.scale_by_pow2(mats, -e0[:, None, None])
  all_zero = jnp.all(_rounding.is_zero(mats), axis=(-2, -1))

  def finish(v):
    # sigma_1(W) <= 2^e0 (v + flush) + tiny sqrt(m n) (DAZ-read inputs).
    bound = _rounding.next_up(_rounding.scale_by_pow2(
        _rounding.next_up(v + flush_first), e0))
    bound = _rounding.next_up(bound + flush_first)
    # Only subnormal entries (read as 0): sigma_1 < tiny sqrt(m n).
    bound = jnp.where(peak == 0, flush_first, bound)
    return jnp.where(all_zero, jnp.zeros((), real_dtype), bound)

  def squared_norm(h):
    return jnp.sum(jnp.real(h * jnp.conj(h)), axis=(-2, -1))

  def squared_norm_upper(sq, h):
    """>= ||h||_F^2 from sq = squared_norm(h), h with moderate entries."""
    # Per entry: re^2 + im^2 (3 roundings), then the sum of the entries.
    return _rounding.inflate(sq, h.shape[-1] * h.shape[-2] + 3)

  if cap == 0:
    return finish(_rounding.next_up(jnp.sqrt(
        squared_norm_upper(squared_norm(h), h))))

  def step(h, sq, ell, scale):
    """One product: H -> Hn = H 2^-k (exact), fl(Hn^H Hn); sq = ||H||_F^2."""
    sq_upper = squared_norm_upper(sq, h)
    # ||Hn||_F in [1/2, 1) up to rounding: no overflow in the product.
    k = jnp.where(sq > 0, (_rounding.exponent(
        _rounding.raise_subnormal(sq)) + 2) // 2, 0)
    hn = _rounding.scale_by_pow2(h, -k[:, None, None])
    product = jnp.einsum('bij,bik->bjk', jnp.conj(hn), hn, precision=_HIGHEST)
    # Exact-arithmetic log scale, only for the stopping rule.
    ell = ell + scale * ln2 * k.astype(real_dtype)
    log_f = 0.5 * jnp.log(jnp.maximum(sq, tiny)) - ln2 * k.astype(real_dtype)
    product_sq = squared_norm(product)
    # Exact-arithmetic log bounds (module docstring), for the stopping rule;
    # scale = 2^-t for the step that produced the product from H_t.
    log_norm = 0.5 * jnp.log(jnp.maximum(product_sq, tiny))
    gap = (jnp.max(ell + 0.5 * scale * log_norm)
           - jnp.max(ell + scale * (log_norm - log_f)))
    return (product, product_sq, ell, k,
            _rounding.scale_by_pow2(sq_upper, -2 * k), gap)

  one = jnp.ones((), real_dtype)
  ell0 = ln2 * e0.astype(real_dtype)
  h, sq, ell, k_first, f_first, gap = step(h, squared_norm(h), ell0, one)
  # Per-step records for the rigorous bound: exponent k_t and an upper bound
  # of ||Hn_t||_F^2, t = 1 .. cap - 1 (step 0 is kept apart: its products
  # sum m terms, the later ones n).
  ks = jnp.zeros((max(cap - 1, 1), batch), jnp.int32)
  fs = jnp.zeros((max(cap - 1, 1), batch), real_dtype)

  def cond(state):
    t, gap = state[4:6]
    return jnp.logical_and(t < cap, jnp.logical_not(gap <= threshold))

  def body(state):
    h, sq, ell, scale, t, _, ks, fs = state
    h, sq, ell, k, f2, gap = step(h, sq, ell, scale)
    return (h, sq, ell, 0.5 * scale, t + 1, gap, ks.at[t - 1].set(k),
            fs.at[t - 1].set(f2))

  # `scale` is the weight 2^-t of the next step; halving is exact.
  state = (h, sq, ell, 0.5 * one, jnp.array(1), gap, ks, fs)
  h, sq, _, _, steps, _, ks, fs = jax.lax.while_loop(cond, body, state)

  def back_step(v, k, f2, factor):
    # sigma_1(H_t) <= 2^k_t (sqrt(v_{t+1} + c F_t + flush) + flush), rounded
    # to nearest: see `_BACKWARD_ROUNDING_ULPS` for why that is enough.
    s = v + (factor * f2 + flush_product)
    return _rounding.scale_by_pow2(jnp.sqrt(s) + flush_scale, k)

  def back(i, v):
    t = cap - 1 - i  # from steps - 1 down to 1; entries past `steps` skipped
    return jnp.where(t < steps, back_step(v, ks[t - 1], fs[t - 1],
                                          gram_factor), v)

  v = _rounding.next_up(jnp.sqrt(squared_norm_upper(sq, h)))
  if cap > 1:
    v = jax.lax.fori_loop(0, cap - 1, back, v)
  v = back_step(v, k_first, f_first, first_factor)
  backward = _up_constant(
      1.0 + _BACKWARD_ROUNDING_ULPS * _rounding.unit_roundoff(real_dtype),
      real_dtype)
  return finish(_rounding.next_up(v * backward))


def _compute_dtype(kernel: jax.Array):
  _validation.check_floating('kernel', kernel)
  return jnp.promote_types(kernel.dtype, jnp.float32)


def _in_float64_when_possible(bound_fn, kernel: jax.Array):
  """`bound_fn(kernel in float64)` rounded up to the kernel's dtype.

  Float64 is used whenever JAX can: x64 on, or an eager call (x64 is then
  scoped to it; not on TPUs, which lack float64). Under `jit` without x64
  the bound is computed in the kernel's dtype, with that dtype's (larger)
  rounding terms.
  """
  out_dtype = _compute_dtype(kernel)
  if _validation.is_concrete(kernel) and jax.default_backend() != 'tpu':
    # Cast on the host: XLA's conversion would flush subnormals to zero.
    wide = np.asarray(kernel).astype(np.float64)
    with jax.enable_x64(True):
      return _rounding.round_up_into(bound_fn(jnp.asarray(wide)), out_dtype)
  if jax.config.jax_enable_x64 and kernel.dtype != jnp.float64:
    bound = bound_fn(kernel.astype(jnp.float64))
    # The in-graph cast reads subnormal entries as 0: a kernel change of
    # Frobenius norm < tiny sqrt(size), which moves a dense or circular-conv
    # norm by less than tiny * size.
    flush = _rounding.round_up_into(
        float(jnp.finfo(kernel.dtype).tiny) * kernel.size, jnp.float64)
    return _rounding.round_up_into(_rounding.next_up(bound + flush),
                                   out_dtype)
  return bound_fn(kernel.astype(out_dtype))


def dense_norm_upper_bound(kernel: jax.Array,
                           num_iterations: int | None = None,
                           rtol: float = DEFAULT_RTOL) -> jax.Array:
  """Guaranteed upper bound on sigma_1 of a `(d_in, d_out)` matrix.

  Gram iteration (Delattre et al. 2023): sigma_1(W) <=
  ||G_T||_F^(2^-T), computed with exact power-of-two rescaling and the
  rounding of the computation included (module docstring), so the returned
  value bounds sigma_1 of the given matrix at any scale.

  Args:
    kernel: `(d_in, d_out)` dense kernel.
    num_iterations: number of Gram products (static). None (default): stop
      once the certified gap to the lower bound is <= rtol, at most
      `worst_case_iterations(min(d_in, d_out), rtol)` products (which reach
      rtol for any spectrum, e.g. 15 for rank 512 and rtol 1e-4).
    rtol: relative accuracy of the adaptive stop.

  Returns:
    Scalar upper bound on the largest singular value, in the kernel's dtype
    (at least float32), computed in float64 when possible
    (`_in_float64_when_possible`).
  """
  _validation.check_ndim('kernel', kernel, 2)
  _compute_dtype(kernel)
  _validation.check_finite('kernel', kernel)
  return _in_float64_when_possible(
      lambda k: _gram_upper_bounds(k[None], num_iterations, rtol)[0],
      jnp.asarray(kernel))


def _dft_phases(n: int, k: int, num_freqs: int, dtype) -> jax.Array:
  """(num_freqs, k) matrix exp(-2 pi i w a / n), w < num_freqs, a < k.

  Computed in float64 by numpy and rounded once to `dtype` (each component
  within u of the exact phase, hence |error| <= u).
  """
  # (w * a) mod n keeps the angle in [0, 2 pi).
  wa = (np.arange(num_freqs)[:, None] * np.arange(k)[None, :]) % n
  phases = np.exp(-2j * np.pi * wa / n)
  return jnp.asarray(phases, jnp.result_type(dtype, jnp.complex64))


def _dft_error_factor(kh: int, kw: int, dtype) -> float:
  """c with |fl(K_hat(w)) - K_hat(w)| <= c sum_{a,b} |k[a, b]| entrywise.

  Each term is a product of two phases (each within u of exact, from
  float64) and a kernel entry, summed over kh * kw taps in whatever order
  XLA contracts the three operands: at most kh kw + kh + kw additions and
  complex multiplications (sqrt(2) gamma_2 each, Higham sec. 3.6); 2 gamma
  of that count, plus 8 for the phases, covers every order.
  """
  return math.nextafter(2.0 * _rounding.gamma(kh * kw + 2 * (kh + kw) + 8,
                                              dtype), math.inf)


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
  _compute_dtype(kernel)
  _validation.check_finite('kernel', kernel)
  if (len(grid_shape) != 2
      or not all(isinstance(n, (int, np.integer)) and n >= 1
                 for n in grid_shape)):
    raise ValueError(
        f'grid_shape must be two positive ints, got {grid_shape}')
  grid_shape = tuple(int(n) for n in grid_shape)
  return _in_float64_when_possible(
      lambda k: _circular_bound(k, grid_shape, num_iterations, rtol),
      jnp.asarray(kernel))


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
  # sigma_1(K_hat(w)) <= sigma_1(fl(K_hat(w))) + ||error||_F, the error
  # bounded entrywise by c * sum_{a,b} |k[a, b]| (`_dft_error_factor`).
  taps = jnp.sum(jnp.abs(kernel), axis=(0, 1))
  dft_error = _rounding.next_up(
      _up_constant(_dft_error_factor(kh, kw, dtype), dtype)
      * _rounding.frobenius_upper(_rounding.inflate(taps, kh * kw),
                                  (0, 1)))
  bounds = _gram_upper_bounds(mats, num_iterations, rtol)
  bound = _rounding.next_up(jnp.max(bounds) + dft_error)
  return jnp.where(jnp.all(_rounding.is_zero(kernel)), 0, bound)


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
  `operator_norm_upper_bound(op_l)` (each a bound with its own rounding
  included) and a = `relative_float_allowance` per layer, covering the
  float32 rounding of input_scale and of the product itself (L
  multiplications, <= L/2 ulps).

  Args:
    ops: the layers' linear operators, in order.
    input_scale: Lipschitz constant of any fixed input map (e.g. 1/std of a
      normalisation), finite and >= 0.
    relative_float_allowance: per-layer relative allowance, >= 0.
    num_iterations, rtol: passed to each layer bound.

  Returns:
    Scalar upper bound. Eager calls raise ValueError on a bad input_scale;
    under `jit` a traced NaN, infinite or negative one gives NaN.
  """
  if not ops:
    raise ValueError('ops must hold at least one LinearOperator, got none')
  if relative_float_allowance < 0:
    raise ValueError(
        f'relative_float_allowance must be >= 0, got {relative_float_allowance}')
  if _validation.is_concrete(input_scale):
    scale = np.asarray(input_scale, np.float64)
    if not (np.all(np.isfinite(scale)) and np.all(scale >= 0)):
      raise ValueError(
          f'input_scale must be finite and >= 0, got {input_scale}')
  bound = jnp.asarray(input_scale, jnp.float32)
  for op in ops:
    bound = bound * operator_norm_upper_bound(op, num_iterations, rtol)
  bound = bound * (1.0 + relative_float_allowance) ** len(ops)
  # Under jit a traced NaN, infinite or negative scale cannot raise: the bound
  # is NaN, which certifies nothing (`cll_jax.certify`).
  scale_ok = jnp.isfinite(input_scale) & (jnp.asarray(input_scale) >= 0)
  return jnp.where(scale_ok, bound, jnp.nan)
