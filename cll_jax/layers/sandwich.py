"""Sandwich layers (Wang & Manchester, ICML 2023: "Direct parameterization of
Lipschitz-bounded deep networks", LBDN).

A Sandwich layer contains its own ReLU (`activated` is False: the network
applies no activation after it):

    h -> sqrt2 A^T Psi relu(sqrt2 Psi^-1 B h + b),   Psi = diag(exp d),

with [A B] (A: fout x fout, B: fout x fin) from the Cayley transform of
W = alpha [X; Y] / ||[X; Y]||_F (X: fout x fout, Y: fin x fout; the free
parameter is `kernel` = [X; Y], `(fin + fout, fout)`):

    Z = X - X^T + Y^T Y,   A^T = (I + Z)^-1 (I - Z),   B^T = -2 Y (I + Z)^-1,

so [A^T; B^T] has orthonormal columns and A A^T + B B^T = I (I + Z is
invertible: its symmetric part is I + Y^T Y). alpha is a trainable
parameter created at init with the value ||[X; Y]||_F of the initial
kernel (the reference PyTorch code creates the conv's alpha lazily in its
forward pass, where it never reaches the optimizer). The kernel and bias
start as PyTorch's nn.Linear / nn.Conv2d defaults (uniform, bound
1 / sqrt(fan_in)) and d at 0, as in the reference code.

Why 1-Lipschitz (paper, thm. 3.1; the form used here holds for any
matrices). Write the layer as f(h) = A^T diag(post) relu(diag(pre) B h + b)
with pre, post > 0 (pre = sqrt2 / psi, post = sqrt2 psi in the paper) and
c = max_k pre_k post_k. f is continuous and piecewise linear, so its
Lipschitz constant is the largest norm of its Jacobians
J = A^T diag(post) L diag(pre) B = A^T (L Gamma) B (L diagonal in {0, 1},
Gamma = diag(pre * post): diagonal maps commute). Let G = [A B][A B]^T
<= kappa I and J = (c kappa / 2) 2 A'^T L' B' with A' = A / sqrt(kappa),
B' = B / sqrt(kappa), L' = L Gamma / c diagonal in [0, 1]. For a unit u and
p = L' B' u: ||p||^2 <= p^T B' u (L'^2 <= L') and
A' A'^T <= I - B' B'^T, so

    ||2 A'^T p||^2 <= 4 ||p||^2 - 4 ||B'^T p||^2 <= 4 u^T B'^T p
                      - 4 ||B'^T p||^2 = 1 - ||u - 2 B'^T p||^2 <= 1,

hence Lip(f) <= (c / 2) lambda_max(G) = (max_k pre_k post_k / 2)
||[A B]||_2^2: 1 for the exact Cayley transform, whatever Psi (only
pre * post enters). d is clipped to [-PSI_RANGE, PSI_RANGE] before exp,
so exp(+-d) cannot overflow; any positive Psi keeps the proof.

Floating point: the computed Cayley transform is only nearly orthogonal
(a solve in floats). The eval forward pass therefore certifies its OWN
matrices: it computes, at precision HIGHEST, a rigorous upper bound kappa of
||[A^ B^]||^2 = lambda_max(G), G = [A^ B^][A^ B^]^T:
lambda_max(G) <= 1 + ||G - I||_F <= 1 + ||fl(G) - I||_F + c ||Q||_F^2,
with c = gamma_n (real) or sqrt2 gamma_{n+2} (complex; n = fin + fout, the
product's length) bounding fl(G)'s entrywise error by c |Q|^T |Q|
(Higham, ch. 3), every norm rounded up (`cll_jax._rounding`), and
scales both sides by sigma = sqrt2 rsqrt(kappa (1 + 32 u)):
pre = sigma exp(-d), post = sigma exp(d). With exp and rsqrt within 4 ulps
(assumed, as XLA's), the computed pre_k post_k <= 2 / kappa, so the eval
layer's Lipschitz constant is <= 1 exactly; `certified_bound` returns
1 + 2^-21 (8 float32 ulps on top of the assumption). The normalisation
contracts the eval layer by 1 / kappa: ~1e-12 in float64 (the default
certification precision); in float32 the worst-case term c ||Q||_F^2 ~
fout (fin + fout) u dominates (measured kappa - 1: 3e-2 for a 512 x 512
dense layer whose true defect is 1e-6, 5e-2 for fin = 1024, 7e-4 for a
64-channel conv on 32 x 32): certify in float64. Training uses
sigma = sqrt2 (the paper's layer).

Convolutions (`SandwichConv`, NHWC) are CIRCULAR only: per frequency w of
the rfft2 grid, the free kernel's spectrum P(w) = sum_{a,b} k[a, b]
e^{+2 pi i (w1 (a - s) / n1 + w2 (b - s) / n2)} (s = (k - 1) // 2: the
circular cross-correlation centred like a 'same' conv), normalised by the
norm of the whole spectrum, gives a complex Cayley transform
(Z = X - X^H + Y^H Y); the layer is
irfft2(A^H(w) rfft2(post relu(pre irfft2(B(w) rfft2(h)) + b))). The block-
diagonal form, on which A A^H + B B^H = I per frequency rests, exists for
the circular convolution: the certified function is the circular one (it
wraps around the image borders). There is no zero-padded variant (a
zero-padded conv is not block-diagonalised by the DFT; the spec refuses any
padding but 'circular'). On the columns w2 = 0 (and n2 / 2) the rfft2 grid
holds both w and -w: the matrices there are replaced by
(Q(w) + conj Q(-w)) / 2 (exact in floats), so the computed per-frequency
matrices define a real operator. kappa is the maximum over frequencies.
Stride 2 is an orthogonal space-to-depth first (`orthogonal.space_to_depth`)
and then, as in the reference code, kernel size max(1, k // 2) on the
half-resolution grid.

Rounding of the eval forward pass (`rounding_step`). Let a = ||[A^ B^]||
(a^2 <= kappa), r = the rank bound, and let each linear stage (B^ on the
input, A^T on the ReLU output) compute M x^ with ||fl - M x^|| <= a rho ||x^||:
dense: rho = gamma_n sqrt(r) (|fl(x M) - x M| <= gamma_n |x| |M|,
|| |M| || <= ||M||_F <= sqrt(r) a); conv: the FFT assumption below gives
rho = sqrt2 delta + eta (1 + sqrt2 delta), delta = eta + sqrt2 gamma_{n+2}
sqrt(r) (1 + eta). The diagonal steps (z pre + b, exact ReLU, * post) round
twice and once. Since pre * post <= 2 / a^2 entrywise and diagonal maps
commute, the rounding R added by the layer to an input of norm <= X is
(g = 2, beta >= a ||b * post|| <= sqrt2 (1 + 16 u) ||b * exp(d)||, over all
positions for a conv):

    W = g (1 + rho_B) X + beta,   V = (1 + gamma_2) W,
    R = g rho_B X + gamma_2 W + u V + rho_A (1 + u) V,

and X' = S X + beta + R, E' = S E + R (S the layer's bound, ||f(0)|| <= beta).

FFT rounding assumption (conv only; Higham, "Accuracy and Stability of
Numerical Algorithms", 2nd ed., thm. 24.2: a radix-2 Cooley-Tukey FFT with
twiddle factors within mu of exact has ||fl(F x) - F x|| <= log2(n) eta0
/ (1 - log2(n) eta0) ||F x||, eta0 = mu + gamma_4 (sqrt2 + mu), i.e. about
6.7 u per level for mu ~ u):

* the computed 1-D FFT of length n (forward or inverse, real or complex) has
  relative error <= eta1(n) = 16 u (log2 n + 2) (eta1(1) = 0): 16 per level
  is 2.4 times Higham's radix-2 constant and covers the direct radix-p
  butterflies (3 <= p <= 13, about sqrt(p) gamma_{p+2} ~ 5.5 - 15 u per
  log2 level) of mixed-radix libraries (XLA's ducc on CPU, cuFFT on GPU);
  the +2 levels cover the real-data packing and the 1/N scaling. Lengths
  with a prime factor above 13 (Bluestein's algorithm) are not covered:
  `rounding_step` raises NotImplementedError for them;
* the 2-D transforms compose: eta = (1 + eta1(n1)) (1 + eta1(n2)) - 1;
* irfft2 of a half spectrum that breaks Hermitian symmetry on the
  self-paired columns acts there as a real-linear map of norm <= sqrt2
  (ducc: the Hermitian projection, norm 1; an implementation reading one
  bin of each pair: sqrt2).

`tests/test_layers_sandwich.py` measures the float32 FFTs against float64
ones (the bound / worst observed error is reported there).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cll_jax import _rounding
from cll_jax.layers import base
from cll_jax.layers import orthogonal

# exp(+-d) with |d| <= PSI_RANGE: e^8 ~ 3e3, far from float32 overflow.
PSI_RANGE = 8.0
# kappa is enlarged by this many roundoffs before the rsqrt, covering the
# rounding of sqrt2, rsqrt (4 ulps), exp (4 ulps each) and the products.
KAPPA_ULPS = 32
# The certified bound: 1 (proven under the ulp assumptions) + 8 float32 ulps.
CERTIFIED_BOUND = 1.0 + 2.0 ** -21
# FFT rounding constant per level (module docstring) and the largest prime
# factor of a grid length it is stated for.
FFT_ULPS_PER_LEVEL = 16
FFT_MAX_PRIME = 13
PADDINGS = ('circular',)

_SQRT2 = math.sqrt(2.0)


class Factors(NamedTuple):
  """What a Sandwich forward pass multiplies by (as it computes them).

  `a_t` = A^T `(..., fout, fout)` and `b_t` = B^T `(..., fin, fout)` (a
  leading frequency grid for convs), `pre` and `post` `(fout,)`.
  """
  a_t: jax.Array
  b_t: jax.Array
  pre: jax.Array
  post: jax.Array


def _compute_dtype(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def _swap(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def _batched_inverse(m: jax.Array) -> jax.Array:
  """`jnp.linalg.inv` over the leading axes; on CPU one matrix at a time.

  JAX's CPU LU kernel spreads a batch over XLA's intra-op thread pool
  (`ParallelBatchMap`); in a step running on several (fake) CPU devices
  each device's program then waits for pool threads that are all taken by
  the other devices' programs, and the step deadlocks (seen with 2 and 8
  devices). `lax.map` hands the kernel one matrix per call, which it
  factors inline. GPUs and TPUs keep the batched call.
  """
  if m.ndim == 2 or jax.default_backend() != 'cpu':
    return jnp.linalg.inv(m)
  n = m.shape[-1]
  flat = m.reshape(-1, n, n)
  return jax.lax.map(jnp.linalg.inv, flat).reshape(m.shape)


def cayley(w: jax.Array, fout: int, precision=None
           ) -> tuple[jax.Array, jax.Array]:
  """(A^T, B^T) of the Cayley transform of w = [X; Y] `(..., fin+fout, fout)`.

  Z = X - X^H + Y^H Y, A^T = (I + Z)^-1 (I - Z), B^T = -2 Y (I + Z)^-1;
  [A^T; B^T] has orthonormal columns in exact arithmetic.
  """
  x, y = w[..., :fout, :], w[..., fout:, :]
  z = x - jnp.conj(_swap(x)) + jnp.matmul(jnp.conj(_swap(y)), y,
                                          precision=precision)
  eye = jnp.eye(fout, dtype=w.dtype)
  # One inverse for both (as the reference code): its accuracy does not
  # matter for the certificate, which bounds the matrices as computed.
  inverse = _batched_inverse(eye + z)
  a_t = jnp.matmul(inverse, eye - z, precision=precision)
  b_t = -2 * jnp.matmul(y, inverse, precision=precision)
  return a_t, b_t


def norm_squared_bound(q: jax.Array) -> jax.Array:
  """A rigorous upper bound of ||q||_2^2 = lambda_max(q^H q), batched.

  For `q` `(..., n, m)` near an isometry: with G = q^H q and the computed
  G^ within c |q|^T |q| entrywise (plus flush-to-zero losses),
  lambda_max(G) <= 1 + ||G - I||_2 <= 1 + ||G^ - I||_F + c ||q||_F^2
  (module docstring), evaluated with upward roundings. Valid in any float
  dtype (the c of that dtype), at HIGHEST precision (on GPUs the default
  TF32 products would break c).
  """
  real = jnp.real(q).dtype
  n, m = q.shape[-2:]
  u = _rounding.unit_roundoff(real)
  if jnp.iscomplexobj(q):
    c = math.nextafter(_SQRT2 * _rounding.gamma(n + 2, real), math.inf)
  else:
    c = _rounding.gamma(n, real)
  gram = jnp.einsum('...ip,...iq->...pq', jnp.conj(q), q,
                    precision=base.HIGHEST)
  defect = gram - jnp.eye(m, dtype=gram.dtype)
  # Off-diagonal entries are exact; fl(g_pp - 1) is within u |g_pp - 1|
  # of its value, so the exact one is within (1 + 2u) of the computed.
  f = _rounding.next_up(_rounding.frobenius_upper(defect, (-2, -1))
                        * _rounding.round_up_into(1 + 2 * u, real))
  fq = _rounding.frobenius_upper(q, (-2, -1))
  q2 = _rounding.next_up(fq * fq)
  # Flush-to-zero: each of the m^2 entries of G^ loses < 4 n tiny to
  # products and partial sums flushed to zero (Frobenius: < 4 n m tiny).
  flush = _rounding.round_up_into(4.0 * n * m * float(jnp.finfo(real).tiny),
                                  real)
  return _rounding.inflate(
      1 + f + _rounding.round_up_into(c, real) * q2 + flush, 4)


def _scalings(psi: jax.Array, kappa: jax.Array | None, dtype
              ) -> tuple[jax.Array, jax.Array]:
  """(pre, post) = sigma (exp(-d), exp(d)), d = clip(psi).

  sigma = sqrt2 in training; sqrt2 rsqrt(kappa (1 + KAPPA_ULPS u)) in
  evaluation, which makes pre * post <= 2 / kappa (module docstring).
  """
  d = jnp.clip(psi.astype(dtype), -PSI_RANGE, PSI_RANGE)
  sigma = jnp.asarray(_SQRT2, dtype)
  if kappa is not None:
    sigma = sigma * jax.lax.rsqrt(_rounding.inflate(kappa.astype(dtype),
                                                    KAPPA_ULPS))
  return sigma * jnp.exp(-d), sigma * jnp.exp(d)


def _normalised(w: jax.Array, alpha: jax.Array) -> jax.Array:
  """alpha w / ||w||_F (a guard keeps a zero w finite)."""
  norm = jnp.sqrt(jnp.sum(jnp.real(w * jnp.conj(w))))
  tiny = jnp.finfo(jnp.real(w).dtype).tiny
  return alpha.astype(w.dtype) * w / jnp.maximum(norm, tiny).astype(w.dtype)


def dense_factors(kernel: jax.Array, alpha: jax.Array, psi: jax.Array,
                  training: bool) -> Factors:
  """The dense layer's factors as its forward pass computes them."""
  dtype = _compute_dtype(kernel.dtype)
  fout = kernel.shape[1]
  precision = None if training else base.HIGHEST
  a_t, b_t = cayley(_normalised(kernel.astype(dtype), alpha), fout,
                    precision)
  kappa = None if training else norm_squared_bound(
      jnp.concatenate([a_t, b_t], axis=0))
  pre, post = _scalings(psi, kappa, dtype)
  return Factors(a_t, b_t, pre, post)


def dense_apply(factors: Factors, bias, x: jax.Array,
                precision=None) -> jax.Array:
  """A^T post relu(pre B x + b), for x `(batch, fin)`."""
  z = jnp.matmul(x, factors.b_t.astype(x.dtype), precision=precision)
  z = z * factors.pre.astype(x.dtype)
  if bias is not None:
    z = z + bias.astype(x.dtype)
  v = jax.nn.relu(z) * factors.post.astype(x.dtype)
  return jnp.matmul(v, _swap(factors.a_t).astype(x.dtype),
                    precision=precision)


def _shift(kernel_size: int) -> int:
  return (kernel_size - 1) // 2


def kernel_spectrum(kernel: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """P(w) `(n1, n2 // 2 + 1, c_in, c_out)` of a `(k, k, c_in, c_out)` kernel.

  P(w) = sum_{a,b} k[a, b] e^{+2 pi i (w1 (a - s) / n1 + w2 (b - s) / n2)}:
  the transfer matrices of the circular cross-correlation
  y[i] = sum_a k[a] x[(i + a - s) mod n] (taps beyond the grid alias, as in
  that map). Phases from float64, rounded once.
  """
  k = kernel.shape[0]
  n1, n2 = grid
  dtype = jnp.result_type(_compute_dtype(kernel.dtype), jnp.complex64)
  s = _shift(k)

  def phases(n, count):
    wa = (np.arange(count)[:, None] * (np.arange(k)[None, :] - s)) % n
    return jnp.asarray(np.exp(2j * np.pi * wa / n), dtype)

  return jnp.einsum('ia,jb,abcd->ijcd', phases(n1, n1),
                    phases(n2, n2 // 2 + 1), kernel.astype(dtype),
                    precision=base.HIGHEST)


def _hermitian(q: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """(Q(w) + conj Q(-w)) / 2 on the rfft2 columns that hold w and -w.

  Exactly Hermitian in floats (the sum and the halving are symmetric), so
  the per-frequency matrices define a real operator.
  """
  n1, n2 = grid
  cols = [0] + ([n2 // 2] if n2 % 2 == 0 and n2 > 1 else [])
  partner = (-np.arange(n1)) % n1
  for c in cols:
    column = q[:, c]
    q = q.at[:, c].set((column + jnp.conj(column[partner])) / 2)
  return q


def conv_factors(kernel: jax.Array, alpha: jax.Array, psi: jax.Array,
                 grid: tuple[int, int], training: bool) -> Factors:
  """The circular conv's per-frequency factors, as its forward pass
  computes them: `a_t` `(n1, n2//2+1, fout, fout)`, `b_t` `(..., fin, fout)`.
  """
  dtype = _compute_dtype(kernel.dtype)
  fout = kernel.shape[-1]
  precision = None if training else base.HIGHEST
  spectrum = kernel_spectrum(kernel.astype(dtype), grid)
  a_t, b_t = cayley(_normalised(spectrum, alpha), fout, precision)
  a_t, b_t = _hermitian(a_t, grid), _hermitian(b_t, grid)
  kappa = None if training else jnp.max(norm_squared_bound(
      jnp.concatenate([a_t, b_t], axis=-2)))
  pre, post = _scalings(psi, kappa, dtype)
  return Factors(a_t, b_t, pre, post)


def conv_apply(factors: Factors, bias, x: jax.Array,
               precision=None) -> jax.Array:
  """The circular Sandwich conv on x `(batch, n1, n2, fin)` (real)."""
  grid = x.shape[1:3]
  fft_axes = (1, 2)
  spectrum = jnp.fft.rfft2(x, axes=fft_axes)
  b_t = factors.b_t.astype(spectrum.dtype)
  z = jnp.fft.irfft2(jnp.einsum('bijc,ijco->bijo', spectrum, b_t,
                                precision=precision), s=grid, axes=fft_axes)
  z = z * factors.pre.astype(x.dtype)
  if bias is not None:
    z = z + bias.astype(x.dtype)
  v = jax.nn.relu(z) * factors.post.astype(x.dtype)
  spectrum = jnp.fft.rfft2(v, axes=fft_axes)
  a_h = jnp.conj(factors.a_t).astype(spectrum.dtype)  # A^H as (o, c)
  return jnp.fft.irfft2(jnp.einsum('bijc,ijoc->bijo', spectrum, a_h,
                                   precision=precision), s=grid,
                        axes=fft_axes)


def _torch_uniform(fan_in: int):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default Linear/Conv2d."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _frobenius(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.real(x * jnp.conj(x))))


class SandwichDense(nn.Module):
  """Sandwich dense layer (ReLU inside): `(f(x), 1)` (module docstring)."""
  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    if x.ndim != 2:
      raise ValueError(f'SandwichDense expects (batch, features) inputs, got '
                       f'shape {x.shape}')
    fin, fout = x.shape[-1], self.features
    kernel = self.param('kernel', _torch_uniform(fin + fout),
                        (fin + fout, fout), jnp.float32)
    # A real parameter with ||[X; Y]||_F of the initial kernel.
    alpha = self.param('alpha', lambda _: _frobenius(kernel))
    psi = self.param('psi', nn.initializers.zeros, (fout,), jnp.float32)
    bias = self.param('bias', _torch_uniform(fin + fout), (fout,),
                      jnp.float32) if self.use_bias else None
    factors = dense_factors(kernel.astype(x.dtype), alpha, psi,
                            base.is_training(self))
    return (dense_apply(factors, bias, x, base.precision(self)),
            jnp.ones((), jnp.float32))


def _check_conv(kernel_size: int, stride: int, padding: str) -> None:
  if padding not in PADDINGS:
    raise ValueError(
        f'Sandwich convolutions are circular only (padding={PADDINGS[0]!r}): '
        f'their 1-Lipschitz proof needs the per-frequency Cayley transform, '
        f'i.e. the DFT block-diagonal form that only the circular conv has; '
        f'got padding={padding!r} (a zero-padded Sandwich conv has no '
        f'certificate here)')
  if stride not in (1, 2):
    raise ValueError(f'Sandwich conv stride must be 1 or 2 (space-to-depth), '
                     f'got {stride}')
  if kernel_size < 1:
    raise ValueError(f'Sandwich conv kernel_size must be >= 1, got '
                     f'{kernel_size}')


def _inner_kernel_size(kernel_size: int, stride: int) -> int:
  """The kernel on the (space-to-depth) grid the conv runs on."""
  return kernel_size if stride == 1 else max(1, kernel_size // 2)


class SandwichConv(nn.Module):
  """Circular Sandwich convolution (NHWC, ReLU inside): `(f(x), 1)`.

  Attributes:
    features: output channels.
    kernel_size: k (stride 2: max(1, k // 2) after space-to-depth).
    stride: 1, or 2 for an orthogonal space-to-depth first.
    padding: 'circular' only (module docstring).
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: str = 'circular'
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    if x.ndim != 4:
      raise ValueError(f'SandwichConv expects NHWC input, got shape '
                       f'{x.shape}')
    _check_conv(self.kernel_size, self.stride, self.padding)
    x = orthogonal.space_to_depth(x, self.stride)
    grid = tuple(x.shape[1:3])
    fin, fout = x.shape[-1], self.features
    k = _inner_kernel_size(self.kernel_size, self.stride)
    fan_in = k * k * (fin + fout)
    kernel = self.param('kernel', _torch_uniform(fan_in),
                        (k, k, fin + fout, fout), jnp.float32)
    # ||P||_F of the initial kernel's spectrum on this grid (the reference
    # code's lazily created alpha, here a parameter from init on).
    alpha = self.param('alpha',
                       lambda _: _frobenius(kernel_spectrum(kernel, grid)))
    psi = self.param('psi', nn.initializers.zeros, (fout,), jnp.float32)
    bias = self.param('bias', _torch_uniform(fan_in), (fout,),
                      jnp.float32) if self.use_bias else None
    factors = conv_factors(kernel.astype(x.dtype), alpha, psi, grid,
                           base.is_training(self))
    return (conv_apply(factors, bias, x, base.precision(self)),
            jnp.ones((), jnp.float32))


# --------------------------------------------------------------------------
# Rounding of the eval forward pass (module docstring)


def _largest_prime_factor(n: int) -> int:
  largest, m, p = 1, n, 2
  while p * p <= m:
    while m % p == 0:
      largest, m = p, m // p
    p += 1
  return max(largest, m) if m > 1 else largest


def _fft_levels(n: int) -> float:
  """log2(n) + 2 levels for the assumption's eta1(n); 0 for n = 1."""
  if n == 1:
    return 0.0
  largest = _largest_prime_factor(n)
  if largest > FFT_MAX_PRIME:
    raise NotImplementedError(
        f'the FFT rounding assumption of cll_jax.layers.sandwich covers grid '
        f'lengths whose prime factors are <= {FFT_MAX_PRIME}; {n} has the '
        f'factor {largest} (Bluestein FFTs): no rounding bound for this '
        f'Sandwich conv (certify it on another grid size)')
  return math.log2(n) + 2


def fft_relative_error(grid: tuple[int, int], dtype) -> float:
  """eta of a 2-D (i)rfft2 on `grid` in `dtype` (module docstring)."""
  u = _rounding.unit_roundoff(dtype)
  etas = [FFT_ULPS_PER_LEVEL * u * _fft_levels(int(n)) for n in grid]
  return math.nextafter((1 + etas[0]) * (1 + etas[1]) - 1 + 2.0 ** -50
                        * (1 + etas[0]) * (1 + etas[1]), math.inf)


def _up(x: float) -> float:
  return math.nextafter(x * (1 + 2.0 ** -50), math.inf)


def _dense_rho(dot_length: int, rank: int, forward_dtype) -> float:
  return _up(_rounding.gamma(dot_length, forward_dtype) * math.sqrt(rank))


def _fft_rho(dot_length: int, rank: int, eta: float, forward_dtype) -> float:
  """rho of rfft2 -> per-frequency complex matmul -> irfft2 (docstring)."""
  c = _SQRT2 * _rounding.gamma(dot_length + 2, forward_dtype)
  delta = _up(eta + c * math.sqrt(rank) * (1 + eta))
  return _up(_SQRT2 * delta + eta * (1 + _SQRT2 * delta))


def _bias_term(params, positions: int, dtype, forward_dtype) -> jax.Array:
  """beta >= a ||b * post|| over all positions: sqrt2 (1 + 16 u)
  ||b * exp(clip(d))|| sqrt(positions), rounded up."""
  from cll_jax import forward_error  # pylint: disable=g-import-not-at-top
  bias = params.get('bias')
  if bias is None:
    return jnp.zeros((), dtype)
  wide = _compute_dtype(bias.dtype)
  d = jnp.clip(params['psi'].astype(wide), -PSI_RANGE, PSI_RANGE)
  u_wide = _rounding.unit_roundoff(wide)
  # exp within 4 ulps (assumed), the product one more.
  scaled = jnp.abs(bias.astype(wide)) * jnp.exp(d)
  norm = forward_error._norm_upper(  # pylint: disable=protected-access
      scaled, 0)
  u = _rounding.unit_roundoff(forward_dtype)
  factor = _up(_SQRT2 * (1 + 16 * u) * (1 + 6 * u_wide)
               * math.sqrt(positions))
  return _rounding.round_up_into(_rounding.next_up(
      norm * _rounding.round_up_into(factor, wide)), dtype)


def _sandwich_step(rho_b: float, rho_a: float, beta: jax.Array, norm,
                   forms, *, dtype, forward_dtype):
  """(X, E) after a Sandwich layer (module docstring's R, X', E')."""
  def up(x):
    return _rounding.round_up_into(x, dtype)

  u = _rounding.unit_roundoff(forward_dtype)
  g2 = _rounding.gamma(2, forward_dtype)
  # Python floats of a few float64 roundings each, rounded up into dtype:
  # W = w_x X + beta, R = r_x X + r_w W with V = (1 + gamma_2) W folded in.
  w_x = up(_up(2 * (1 + rho_b)))
  r_x = up(_up(2 * rho_b))
  r_w = up(_up(g2 + (u + rho_a * (1 + u)) * (1 + g2)))
  s = _rounding.round_up_into(norm, dtype)
  beta = beta.astype(dtype)
  x_form, e_form = forms

  def rounding(p, q, offset):
    # R = r_x X + r_w W, W = w_x X + beta (per coefficient of (p, q)).
    return (r_x * p + r_w * (w_x * p + offset), r_x * q + r_w * w_x * q)

  r_p, r_q = rounding(x_form[0], x_form[1], beta)
  new_x = (s * x_form[0] + beta + r_p, s * x_form[1] + r_q)
  new_e = (s * e_form[0] + r_p, s * e_form[1] + r_q)
  # Each coefficient takes <= 12 roundings of nonnegative terms here.
  return tuple(tuple(_rounding.inflate(c, 12) for c in form)
               for form in (new_x, new_e))


def _certified_bound() -> jax.Array:
  return jnp.asarray(CERTIFIED_BOUND, jnp.float32)


@dataclasses.dataclass(frozen=True)
class SandwichDenseSpec:
  """A `SandwichDense` layer of a network: fin -> `features`, ReLU inside."""
  features: int

  bound_kind: ClassVar[str] = base.PROVEN
  flattens: ClassVar[bool] = True
  activated: ClassVar[bool] = False

  def __post_init__(self):
    if self.features < 1:
      raise ValueError(f'SandwichDenseSpec features must be >= 1, got '
                       f'{self.features}')

  def module(self, name: str, num_power_iterations: int) -> nn.Module:
    del num_power_iterations  # no power iteration: the bound is proven
    return SandwichDense(self.features, name=name)

  def output_shape(self, input_shape) -> tuple[int, ...]:
    del input_shape
    return (self.features,)

  def _check(self, params, input_shape) -> int:
    fin = math.prod(input_shape)
    want = (fin + self.features, self.features)
    if tuple(params['kernel'].shape) != want:
      raise ValueError(f'SandwichDenseSpec({self.features}) on input shape '
                       f'{tuple(input_shape)} needs a kernel of shape {want}, '
                       f'got {tuple(params["kernel"].shape)}')
    return fin

  def certified_bound(self, variables, input_shape) -> jax.Array:
    """1 + 2^-21 for the eval forward pass's own matrices (docstring)."""
    self._check(variables['params'], input_shape)
    return _certified_bound()

  def power_iteration_operators(self, params, input_shape):
    del params, input_shape
    return {}

  def rounding_step(self, variables, input_shape, forms, norm, *, dtype,
                    forward_dtype):
    """Matmuls gamma_n each, exact ReLU, diagonal scalings (docstring)."""
    params = variables['params']
    fin = self._check(params, input_shape)
    fout = self.features
    rho_b = _dense_rho(fin, min(fin, fout), forward_dtype)
    rho_a = _dense_rho(fout, fout, forward_dtype)
    beta = _bias_term(params, 1, dtype, forward_dtype)
    return _sandwich_step(rho_b, rho_a, beta, norm, forms, dtype=dtype,
                          forward_dtype=forward_dtype)


@dataclasses.dataclass(frozen=True)
class SandwichConvSpec:
  """A circular `SandwichConv` layer: c_in -> `features`, ReLU inside.

  `padding` must be 'circular': the certificate is for the circular conv
  only, and any other value raises ValueError.
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: str = 'circular'

  bound_kind: ClassVar[str] = base.PROVEN
  flattens: ClassVar[bool] = False
  activated: ClassVar[bool] = False

  def __post_init__(self):
    if self.features < 1:
      raise ValueError(f'SandwichConvSpec features must be >= 1, got '
                       f'{self.features}')
    _check_conv(self.kernel_size, self.stride, self.padding)

  def module(self, name: str, num_power_iterations: int) -> nn.Module:
    del num_power_iterations
    return SandwichConv(self.features, self.kernel_size, self.stride,
                        self.padding, name=name)

  def _inner_shape(self, input_shape) -> tuple[int, int, int]:
    return orthogonal.space_to_depth_shape(tuple(input_shape), self.stride)

  def output_shape(self, input_shape) -> tuple[int, ...]:
    h, w, _ = self._inner_shape(input_shape)
    return (h, w, self.features)

  def _check(self, params, input_shape) -> tuple[int, int, int]:
    _check_conv(self.kernel_size, self.stride, self.padding)
    h, w, fin = self._inner_shape(input_shape)
    k = _inner_kernel_size(self.kernel_size, self.stride)
    want = (k, k, fin + self.features, self.features)
    if tuple(params['kernel'].shape) != want:
      raise ValueError(f'SandwichConvSpec on input shape '
                       f'{tuple(input_shape)} needs a kernel of shape {want}, '
                       f'got {tuple(params["kernel"].shape)}')
    return h, w, fin

  def certified_bound(self, variables, input_shape) -> jax.Array:
    """1 + 2^-21 for the CIRCULAR conv the layer computes (docstring)."""
    self._check(variables['params'], input_shape)
    return _certified_bound()

  def power_iteration_operators(self, params, input_shape):
    del params, input_shape
    return {}

  def rounding_step(self, variables, input_shape, forms, norm, *, dtype,
                    forward_dtype):
    """FFT stages under the module docstring's FFT assumption."""
    params = variables['params']
    h, w, fin = self._check(params, input_shape)
    fout = self.features
    eta = fft_relative_error((h, w), forward_dtype)
    rho_b = _fft_rho(fin, min(fin, fout), eta, forward_dtype)
    rho_a = _fft_rho(fout, fout, eta, forward_dtype)
    beta = _bias_term(params, h * w, dtype, forward_dtype)
    return _sandwich_step(rho_b, rho_a, beta, norm, forms, dtype=dtype,
                          forward_dtype=forward_dtype)


__all__ = ['CERTIFIED_BOUND', 'Factors', 'SandwichConv', 'SandwichConvSpec',
           'SandwichDense', 'SandwichDenseSpec', 'conv_apply', 'conv_factors',
           'dense_apply', 'dense_factors', 'fft_relative_error',
           'kernel_spectrum', 'norm_squared_bound']
