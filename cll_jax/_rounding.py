"""Directed rounding on top of round-to-nearest, for bounds that must hold.

XLA has no directed rounding modes: every operation rounds to nearest. The
helpers here build upward/downward rounding and rigorous error factors from
three facts of IEEE 754 binary arithmetic (Higham, "Accuracy and Stability of
Numerical Algorithms", 2nd ed., ch. 2-3):

* rounding is monotone: x <= y implies fl(x) <= fl(y) for real x, y;
* the float next to a correctly rounded result, on the far side, lies beyond
  the exact result: nextafter(fl(x), +inf) >= x >= nextafter(fl(x), -inf);
* a sum or product of k nonnegative terms, computed in any order, satisfies
  computed >= exact * (1 - u)^k, i.e. exact <= computed * (1 + gamma_k) with
  gamma_k = k u / (1 - k u) and u = 2^-p the unit roundoff (lemma 3.1).

XLA on CPU and GPU flushes subnormal results to zero and reads subnormal
inputs as zero (FTZ/DAZ), also in comparisons. Flushing a result keeps
rounding monotone, but a flushed *input* is a different number, so values that
enter a bound are raised to at least the smallest normal number first
(`raise_subnormal`, by bit tests that DAZ cannot fool), `next_up` never
returns a subnormal, and `inflate` adds `k * tiny` for terms that underflowed.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def unit_roundoff(dtype) -> float:
  """u = 2^-p for a binary float type with p significand bits."""
  return 2.0 ** -(jnp.finfo(dtype).nmant + 1)


def gamma(k: int, dtype) -> float:
  """gamma_k = k u / (1 - k u), rounded up (as a Python float)."""
  ku = k * unit_roundoff(dtype)  # exact: an int times a power of two
  if not ku < 0.5:
    raise ValueError(
        f'gamma_{k} in {jnp.dtype(dtype).name}: k * u = {ku} must be < 1/2 '
        f'for the rounding-error bound to hold; the operation is too long '
        f'for this precision')
  return math.nextafter(ku / (1.0 - ku), math.inf)


def _int_dtype(dtype):
  return jnp.int64 if jnp.finfo(dtype).bits == 64 else jnp.int32


def _fields(x: jax.Array):
  """(biased exponent, fraction bits) of each entry of x, by bit tests."""
  info = jnp.finfo(x.dtype)
  bits = jax.lax.bitcast_convert_type(x, _int_dtype(x.dtype))
  frac = bits & ((1 << info.nmant) - 1)
  exponent = (bits >> info.nmant) & ((1 << info.nexp) - 1)
  return exponent, frac


def is_subnormal(x: jax.Array) -> jax.Array:
  """True for nonzero entries below the smallest normal number (bit test)."""
  exponent, frac = _fields(x)
  return (exponent == 0) & (frac != 0)


def is_zero(x: jax.Array) -> jax.Array:
  """True for +0 and -0 only (a bit test: DAZ reads subnormals as 0, and
  even `abs` flushes them)."""
  if jnp.iscomplexobj(x):
    return is_zero(jnp.real(x)) & is_zero(jnp.imag(x))
  exponent, frac = _fields(x)
  return (exponent == 0) & (frac == 0)


def raise_subnormal(x: jax.Array) -> jax.Array:
  """Positive subnormal entries -> the smallest normal number; others kept."""
  tiny = jnp.finfo(x.dtype).tiny
  return jnp.where(is_subnormal(x) & ~jnp.signbit(x), tiny, x)


def next_up(x: jax.Array) -> jax.Array:
  """A normal float >= the exact value whose rounding to nearest is x >= 0.

  `nextafter(x, +inf)` covers a correctly rounded (or faithful) result; the
  floor at the smallest normal number covers results flushed to zero and
  keeps the value usable under DAZ.
  """
  return jnp.maximum(jnp.nextafter(x, jnp.asarray(jnp.inf, x.dtype)),
                     jnp.finfo(x.dtype).tiny)


def next_down(x: jax.Array) -> jax.Array:
  """A float <= the exact value whose rounding to nearest is x."""
  return jnp.nextafter(x, jnp.asarray(-jnp.inf, x.dtype))


def round_up_into(x, dtype) -> jax.Array:
  """The smallest float of `dtype` >= x (then raised to >= the smallest
  normal number if positive).

  Python floats and numpy values are rounded on the host in float64 (before
  JAX could round them to nearest); JAX arrays in graph.
  """
  dtype = jnp.dtype(dtype)
  if not isinstance(x, jax.Array):
    wide = np.asarray(x, dtype=np.float64)
    y = wide.astype(dtype)
    y = np.where(y.astype(np.float64) < wide, np.nextafter(y, np.inf), y)
    tiny = np.finfo(dtype).tiny
    return jnp.asarray(np.where((y > 0) & (y < tiny), tiny, y).astype(dtype))
  y = x.astype(dtype)
  if x.dtype != dtype:  # a no-op test when x is narrower (exactly cast)
    y = jnp.where(y.astype(x.dtype) < x,
                  jnp.nextafter(y, jnp.asarray(jnp.inf, dtype)), y)
  return raise_subnormal(y)


def inflate(x: jax.Array, k: int) -> jax.Array:
  """An upper bound of a nonnegative quantity computed as x with at most k
  roundings along any path (sums and products of nonnegative terms).

  exact <= x (1 + gamma_k) + k tiny: the relative part from lemma 3.1, the
  absolute part for up to k terms that underflowed to zero. The result is
  rounded up (`next_up`).
  """
  dtype = x.dtype
  factor = round_up_into(1.0 + gamma(k, dtype), dtype)
  absolute = round_up_into(k * float(jnp.finfo(dtype).tiny), dtype)
  return next_up(next_up(x * factor) + absolute)


def pow2(e: jax.Array, dtype) -> jax.Array:
  """2^e exactly, for integer e in the normal range of `dtype`."""
  info = jnp.finfo(dtype)
  bias = 1 - info.minexp
  biased = jnp.clip(e.astype(_int_dtype(dtype)) + bias, 1,
                    (1 << info.nexp) - 2)
  return jax.lax.bitcast_convert_type(biased << info.nmant, dtype)


def scale_by_pow2(x: jax.Array, e: jax.Array) -> jax.Array:
  """x * 2^e in two exact steps (each factor in range for |e| <= 250).

  Exact unless the result over- or underflows. `e` broadcasts against x.
  """
  dtype = jnp.real(x).dtype
  half = e // 2
  return x * pow2(half, dtype) * pow2(e - half, dtype)


def exponent(x: jax.Array) -> jax.Array:
  """e with 2^e <= x < 2^(e+1) for positive normal x (int32); 0 for 0."""
  biased, _ = _fields(x)
  bias = 1 - jnp.finfo(x.dtype).minexp
  return jnp.where(biased == 0, 0, biased - bias).astype(jnp.int32)


def significant_bits(x: jax.Array) -> jax.Array:
  """Bits from the leading to the last nonzero bit of normal |x| (1..p)."""
  info = jnp.finfo(x.dtype)
  _, frac = _fields(x)
  mantissa = frac | (1 << info.nmant)  # the implicit leading bit
  trailing_zeros = jax.lax.population_count((mantissa & -mantissa) - 1)
  return (info.nmant + 1 - trailing_zeros).astype(jnp.int32)


def product_is_exact(a: jax.Array, b: jax.Array,
                     product: jax.Array) -> jax.Array:
  """Whether `product` = fl(a * b) equals a * b exactly (a, b >= 0).

  Sufficient test: a zero factor, or normal factors whose significands have
  at most p bits together (their product then fits in p bits) and a normal,
  finite product (no underflow or overflow).
  """
  info = jnp.finfo(product.dtype)

  def normal(x):
    exponent_bits, _ = _fields(x)
    return (exponent_bits > 0) & (exponent_bits < (1 << info.nexp) - 1)

  fits = (significant_bits(a) + significant_bits(b)) <= info.nmant + 1
  return ((a == 0) | (b == 0)
          | (normal(a) & normal(b) & normal(product) & fits))


def frobenius_upper(x: jax.Array, axis) -> jax.Array:
  """Upper bound of sqrt(sum |x|^2) over `axis`, at any magnitude (> 0).

  The entries are first scaled by an exact power of two near the largest
  magnitude, so that squares neither overflow nor underflow to a loss
  larger than `inflate`'s absolute term.
  """
  axis = tuple(np.atleast_1d(axis) % x.ndim)
  count = math.prod(x.shape[a] for a in axis)
  real_dtype = jnp.real(x).dtype
  mag = jnp.abs(x)
  peak = jnp.max(mag, axis=axis, keepdims=True)
  e = exponent(raise_subnormal(peak))
  scaled = scale_by_pow2(mag, -e)
  # Per term: |x| (complex: a hypot, within 2 ulps) and its square, then
  # the sum: count + 4 roundings along any path.
  total = inflate(jnp.sum(scaled * scaled, axis=axis, keepdims=True),
                  count + 4)
  norm = next_up(scale_by_pow2(next_up(jnp.sqrt(total)), e))
  return jnp.squeeze(norm, axis).astype(real_dtype)
