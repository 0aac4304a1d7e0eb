"""Lipschitz certificates: certified radii and certified robust accuracy.

For logits f(x) with predicted class `c = argmax_i f_i(x)` and pairwise bounds
`K_{c,j}` on the Lipschitz constants (L2) of `f_c - f_j`, every perturbation
`||d||_2 <= epsilon` keeps `f_c(x + d) - f_j(x + d) >= f_c(x) - f_j(x) -
epsilon K_{c,j}`. The prediction is therefore certified at radius epsilon when

  f_c(x) - f_j(x) > epsilon * K_{c,j}   for every j != c   (CLL supp. eq. 18),

strictly: at equality a perturbation may reach a tie. A tie for the argmax is
never certified.

Rounding: why a decision made in floating point holds in exact arithmetic.
The logits, K, epsilon (a Python float is the real number it denotes) and the
optional `margin_error` are taken as exact. The decision is computed in the
dtype d = the widest of float32 and the logits' and K's dtypes, so that
casting f and K to d is exact; float64 numpy inputs make the call run with
`jax_enable_x64` scoped to it (JAX would otherwise round them to float32).

1. epsilon and radii are rounded *up* into d (`_rounding.round_up_into`), and
   positive values below the smallest normal number (which flush-to-zero
   hardware reads as 0) up to it; positive subnormal K entries likewise. A
   larger epsilon or K can only refuse. (Under `jit`, close over a Python
   float epsilon or pass an array of dtype d: a Python float passed as a
   traced argument is rounded to nearest by JAX before this module sees it.)
2. Rounding to nearest is monotone: for reals x <= y, fl(x) <= fl(y)
   (flushing subnormal results to zero keeps this). So if the exact margin
   f_c - f_j is <= epsilon K, then fl(f_c - f_j) <= fl(epsilon K): the test
   `fl(f_c - f_j) > fl(epsilon K)` can refuse a point whose exact margin is
   within an ulp of the threshold, and never grants one whose margin is not
   above it. At an exact tie both sides round alike and the strict test
   refuses. Operands are exact (step 1), and a row whose logits are not
   finite or are subnormal (read as 0 by DAZ) is never certified.
3. With `margin_error` delta (a bound on |computed - exact| of every margin,
   e.g. the forward-pass error of `cll_jax.forward_error`), the threshold is
   T = up(up(epsilon K) + delta), each op followed by `next_up`
   (`nextafter` toward +inf, never below the smallest normal number), so
   T >= epsilon K + delta, and fl(margin) > T implies margin > T (step 2).
4. Radii are rounded toward zero. A candidate r is returned only when
   r K <= margin is proven: fl(r K) < fl(margin) implies r K < margin
   (step 2), and fl(r K) == m for a float m <= margin, with r K exact (the
   significands' bit counts add up to at most the precision), gives
   r K = m <= margin. m is fl(margin) when Sterbenz's lemma makes the
   subtraction exact (f_j / 2 <= f_c <= 2 f_j, or a zero operand), and with
   delta, m = down(down(fl(margin)) - delta). The candidates are fl(m / K)
   and the next three floats toward zero; the largest proven one is
   returned, 0 if none. So the radius never exceeds the exact one, and it is
   the exact radius rounded toward zero whenever that is decided by these
   tests (e.g. an exactly representable quotient of exact operands).

Under `jit` invalid values cannot raise, and certify nothing instead: a point
gets "not certified" and radius 0 when epsilon is negative or NaN, when any
off-diagonal K entry is <= 0 or NaN, when its logits are not finite (or
subnormal), or when its margin error is negative or NaN (`jnp.where`).
Eager calls raise ValueError on these values.

Shapes: `logits` `(B, N)`, `labels` `(B,)` ints, `pairwise_lipschitz` `(N, N)`
symmetric with positive off-diagonal entries (the diagonal is never read),
`radii` `(R,)`, `margin_error` `(B,)` or scalar, >= 0.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cll_jax import _rounding
from cll_jax import _validation
from cll_jax import losses as _losses

Array = jax.Array
ArrayLike = Any

# Input checks and the diagonal-safe gather shared with `losses`.
# pylint: disable=protected-access
_check_logits_2d = _losses._check_logits_2d
_check_pairwise_lipschitz = _losses._check_pairwise_lipschitz
_check_labels = _losses._check_labels
_check_nonnegative = _losses._check_nonnegative
_pairwise_differences = _losses._pairwise_differences
# pylint: enable=protected-access

# The L2 radii reported on CIFAR-10 / Tiny-ImageNet (CLL tables 1-2).
DEFAULT_RADII = (36 / 255, 72 / 255, 108 / 255)

# Radius candidates tried below fl(margin / K) (step 4 of the docstring):
# covers a division off by up to 2 ulps and a product that rounds up onto
# the margin.
_RADIUS_CANDIDATES = 4


def _is_host_float64(x) -> bool:
  return (not isinstance(x, jax.Array)
          and np.asarray(x).dtype in (np.float64, np.complex128))


def _callers_precision(fn):
  """Runs `fn` with x64 scoped on when logits or K are float64 host arrays.

  Without it JAX would round them to float32 to nearest, which can move a
  margin up across the threshold.
  """
  signature = inspect.signature(fn)

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    bound = signature.bind(*args, **kwargs)
    wide = any(_is_host_float64(bound.arguments[name])
               for name in ('logits', 'pairwise_lipschitz'))
    if wide and not jax.config.jax_enable_x64:
      with jax.enable_x64(True):
        return fn(*args, **kwargs)
    return fn(*args, **kwargs)

  return wrapper


def _check_logits_k(logits, pairwise_lipschitz) -> int:
  num_classes = _check_logits_2d(logits)
  _check_pairwise_lipschitz(pairwise_lipschitz, num_classes)
  return num_classes


def _check_radius(name: str, value, ndim: int) -> None:
  _validation.check_ndim(name, value, ndim)
  _validation.check_finite(name, value)
  _check_nonnegative(name, value)


def _check_margin_error(margin_error, batch: int) -> None:
  if margin_error is None:
    return
  if jnp.ndim(margin_error) not in (0, 1) or (
      jnp.ndim(margin_error) == 1 and jnp.shape(margin_error)[0] != batch):
    raise ValueError(
        f'margin_error must be a scalar or have shape ({batch},), got shape '
        f'{jnp.shape(margin_error)}')
  _validation.check_finite('margin_error', margin_error)
  _check_nonnegative('margin_error', margin_error)


class _Gaps(NamedTuple):
  """Margins to the predicted class, in the decision dtype (`_top_gaps`)."""
  top: Array  # (B,) predicted class c
  gap: Array  # (B, N) fl(f_c - f_j)
  k_row: Array  # (B, N) K_{c,j} (1 at j == c)
  is_top: Array  # (B, N) j == c
  exact_gap: Array  # (B, N) whether fl(f_c - f_j) is exact (Sterbenz)
  valid: Array  # (B,) finite, normal logits and a valid K


@jax.jit
def _top_gaps(logits: Array, pairwise_lipschitz: Array) -> _Gaps:
  dtype = jnp.promote_types(
      jnp.result_type(logits, pairwise_lipschitz), jnp.float32)
  logits = jnp.asarray(logits).astype(dtype)
  k = _rounding.raise_subnormal(jnp.asarray(pairwise_lipschitz).astype(dtype))
  num_classes = k.shape[0]
  # NaN > 0 is false: a NaN entry invalidates K too.
  k_valid = jnp.all(jnp.eye(num_classes, dtype=bool) | (k > 0))
  top = jnp.argmax(logits, axis=-1)
  gap, k_row, is_top = _pairwise_differences(logits, k, top)
  f_top = jnp.take_along_axis(logits, top[:, None], axis=1)
  # Sterbenz: f_c - f_j is exact for f_j / 2 <= f_c <= 2 f_j (f_c >= f_j
  # here), and with a zero operand.
  exact_gap = ((logits == 0) | (f_top == 0)
               | ((logits > 0) & (f_top <= 2 * logits))
               | ((f_top < 0) & (logits >= 2 * f_top)))
  normal = jnp.isfinite(logits) & ~_rounding.is_subnormal(logits)
  valid = jnp.all(normal, axis=-1) & k_valid
  return _Gaps(top, gap, k_row, is_top, exact_gap, valid)


def _margin_allowance(margin_error, dtype) -> Array | None:
  """(B, 1) delta rounded up into `dtype`, or None; NaN/negative stay so."""
  if margin_error is None:
    return None
  delta = _rounding.round_up_into(
      margin_error if isinstance(margin_error, jax.Array)
      else np.asarray(margin_error, np.float64), dtype)
  return jnp.reshape(delta, (-1, 1))


@jax.jit
def _certified_at(g: _Gaps, epsilon: Array, epsilon_ok: Array,
                  delta: Array | None) -> Array:
  """Docstring steps 2-3 for one rounded-up epsilon; `(B,)` booleans."""
  product = epsilon * g.k_row
  if delta is None:
    above = g.gap > product
    ok = g.valid
  else:
    above = g.gap > _rounding.next_up(_rounding.next_up(product) + delta)
    ok = g.valid & (delta[:, 0] >= 0)  # NaN >= 0 is false
  return jnp.all(g.is_top | above, axis=-1) & ok & epsilon_ok


def _rounded_epsilon(epsilon, dtype) -> tuple[Array, Array]:
  """(epsilon rounded up into dtype, in-graph validity epsilon >= 0)."""
  if isinstance(epsilon, jax.Array):
    epsilon_ok = epsilon >= 0  # NaN >= 0 is false
  else:  # Concrete: already checked by `_check_radius`.
    epsilon_ok = jnp.ones(jnp.shape(epsilon), bool)
  return _rounding.round_up_into(epsilon, dtype), epsilon_ok


@jax.jit
def _radii(g: _Gaps, delta: Array | None) -> Array:
  """Docstring step 4: per-class radii rounded toward zero, `(B, N)`."""
  k = g.k_row
  if delta is None:
    strict = g.gap
    low = jnp.where(g.exact_gap, g.gap, -jnp.inf)
    ok_row = g.valid
  else:
    strict = low = _rounding.next_down(_rounding.next_down(g.gap) - delta)
    ok_row = g.valid & (delta[:, 0] >= 0)
  candidate = strict / k
  best = jnp.zeros_like(candidate)
  found = jnp.zeros(candidate.shape, bool)
  for _ in range(_RADIUS_CANDIDATES):
    # A subnormal candidate would be read as 0 in the product (DAZ).
    candidate = jnp.where(_rounding.is_subnormal(candidate), 0, candidate)
    product = candidate * k
    proven = (product < strict) | (
        (product == low) & _rounding.product_is_exact(candidate, k, product))
    proven &= candidate >= 0
    best = jnp.where(found | ~proven, best, candidate)
    found |= proven
    candidate = _rounding.next_down(candidate)
  radius = jnp.where(found & (best > 0) & ok_row[:, None], best, 0)
  return jnp.where(g.is_top, jnp.inf, radius)


@_callers_precision
def prediction_margins(logits: Array, pairwise_lipschitz: Array,
                       margin_error: ArrayLike | None = None) -> Array:
  r"""Per-class certified radii of the predicted class.

  .. math::
    r_j(x) = \frac{f_c(x) - f_j(x) - \delta}{K_{c,j}}, \quad j \ne c,
    \qquad r_c = +\infty,

  the L2 distance from x that provably keeps `f_c > f_j` (exact for a linear
  model with `K_{c,j} = ||w_c - w_j||` and delta = 0), rounded toward zero
  (module docstring, step 4) and clipped at 0.

  Args:
    logits: `(B, N)` float logits.
    pairwise_lipschitz: `(N, N)` bounds K.
    margin_error: optional `(B,)` or scalar delta >= 0 bounding the error of
      every computed margin f_c - f_j; None: the logits are exact.

  Returns:
    `(B, N)` radii >= 0, `+inf` at the predicted class.
  """
  _check_logits_k(logits, pairwise_lipschitz)
  _check_margin_error(margin_error, jnp.shape(logits)[0])
  g = _top_gaps(logits, pairwise_lipschitz)
  return _radii(g, _margin_allowance(margin_error, g.gap.dtype))


@_callers_precision
def certified_radius(logits: Array, pairwise_lipschitz: Array,
                     margin_error: ArrayLike | None = None) -> Array:
  r"""Certified L2 radius `min_{j != c} (f_c - f_j - delta) / K_{c,j}`.

  Rounded toward zero (never above the exact radius); zero when the argmax
  is tied. For a yes/no decision at a given radius use `is_certified`.

  Args:
    logits: `(B, N)` float logits.
    pairwise_lipschitz: `(N, N)` bounds K.
    margin_error: optional `(B,)` or scalar margin error bound delta >= 0.

  Returns:
    `(B,)` radii >= 0.
  """
  return jnp.min(
      prediction_margins(logits, pairwise_lipschitz, margin_error), axis=-1)


@_callers_precision
def is_certified(logits: Array, pairwise_lipschitz: Array,
                 epsilon: ArrayLike,
                 margin_error: ArrayLike | None = None) -> Array:
  r"""Whether the prediction is certified at L2 radius epsilon (supp. eq. 18).

  .. math::
    f_c(x) - f_j(x) - \delta > \epsilon K_{c,j} \quad \forall j \ne c,

  decided so that rounding can only refuse (module docstring). Strict: a
  point with some `f_c - f_j - delta <= epsilon K_{c,j}`, or with a tied
  argmax, is not certified. `epsilon = 0` certifies a unique argmax.

  Args:
    logits: `(B, N)` float logits.
    pairwise_lipschitz: `(N, N)` bounds K.
    epsilon: scalar radius >= 0.
    margin_error: optional `(B,)` or scalar bound delta >= 0 on the error of
      every computed margin; None: the logits are exact.

  Returns:
    `(B,)` booleans.
  """
  _check_logits_k(logits, pairwise_lipschitz)
  _check_radius('epsilon', epsilon, 0)
  _check_margin_error(margin_error, jnp.shape(logits)[0])
  g = _top_gaps(logits, pairwise_lipschitz)
  dtype = g.gap.dtype
  return _certified_at(g, *_rounded_epsilon(epsilon, dtype),
                       _margin_allowance(margin_error, dtype))


@_callers_precision
def certified_correct(logits: Array, labels: Array, pairwise_lipschitz: Array,
                      epsilon: ArrayLike,
                      margin_error: ArrayLike | None = None) -> Array:
  """`argmax f == label` and `is_certified(...)`, `(B,)` booleans.

  Args:
    logits: `(B, N)` float logits.
    labels: `(B,)` integer labels.
    pairwise_lipschitz: `(N, N)` bounds K.
    epsilon: scalar radius >= 0.
    margin_error: optional `(B,)` or scalar margin error bound delta >= 0.
  """
  num_classes = _check_logits_k(logits, pairwise_lipschitz)
  _check_labels(labels, jnp.shape(logits)[0], num_classes)
  _check_radius('epsilon', epsilon, 0)
  _check_margin_error(margin_error, jnp.shape(logits)[0])
  g = _top_gaps(logits, pairwise_lipschitz)
  dtype = g.gap.dtype
  return (g.top == labels) & _certified_at(
      g, *_rounded_epsilon(epsilon, dtype),
      _margin_allowance(margin_error, dtype))


@flax.struct.dataclass
class CertifiedCounts:
  """Counts for certified robust accuracy; sum them over batches with `+`.

  Attributes:
    certified: `(R,)` int32, examples correct and certified at each radius.
    correct: int32 scalar, examples with `argmax f == label` (clean).
    total: int32 scalar, real (unmasked) examples.
  """
  certified: Array
  correct: Array
  total: Array

  def __add__(self, other: CertifiedCounts) -> CertifiedCounts:
    return jax.tree.map(jnp.add, self, other)

  def certified_accuracy(self) -> Array:
    """`(R,)` fractions certified/total; NaN when total is 0."""
    return _fraction(self.certified, self.total)

  def clean_accuracy(self) -> Array:
    """Scalar fraction correct/total; NaN when total is 0."""
    return _fraction(self.correct, self.total)


def _fraction(count: Array, total: Array) -> Array:
  total = jnp.asarray(total)
  safe = jnp.maximum(total, 1).astype(jnp.float32)
  return jnp.where(total > 0, count.astype(jnp.float32) / safe, jnp.nan)


@_callers_precision
def certified_counts(
    logits: Array,
    labels: Array,
    pairwise_lipschitz: Array,
    radii: ArrayLike = DEFAULT_RADII,
    mask: Array | None = None,
    margin_error: ArrayLike | None = None,
) -> CertifiedCounts:
  """Counts of correct and certified-correct examples at each radius.

  Args:
    logits: `(B, N)` float logits.
    labels: `(B,)` integer labels.
    pairwise_lipschitz: `(N, N)` bounds K.
    radii: `(R,)` L2 radii >= 0 (a tuple or array).
    mask: optional `(B,)` booleans (or 0/1 numbers), true for real examples;
      padding rows of a last partial batch are false and are not counted.
      `None` counts every row.
    margin_error: optional `(B,)` or scalar bound delta >= 0 on the error of
      every computed margin (see `is_certified`).

  Returns:
    `CertifiedCounts` (int32); add the counts of all batches, then call
    `.certified_accuracy()`.
  """
  num_classes = _check_logits_k(logits, pairwise_lipschitz)
  batch = jnp.shape(logits)[0]
  _check_labels(labels, batch, num_classes)
  if not isinstance(radii, jax.Array):
    radii = np.asarray(radii, np.float64)  # rounded up below, not by JAX
  _check_radius('radii', radii, 1)
  _check_margin_error(margin_error, batch)
  if mask is None:
    mask = jnp.ones((batch,), dtype=bool)
  else:
    _validation.check_ndim('mask', mask, 1)
    if jnp.shape(mask)[0] != batch:
      raise ValueError(
          f'mask must have shape ({batch},) to match the logits, got shape '
          f'{jnp.shape(mask)}')
    mask = jnp.asarray(mask) != 0
  g = _top_gaps(logits, pairwise_lipschitz)
  dtype = g.gap.dtype
  delta = _margin_allowance(margin_error, dtype)
  correct = (g.top == labels) & mask
  radii, radii_ok = _rounded_epsilon(radii, dtype)
  # (R, B): one margin comparison per radius.
  cert = jax.vmap(lambda r, r_ok: _certified_at(g, r, r_ok, delta))(
      radii, radii_ok)
  return CertifiedCounts(
      certified=jnp.sum(cert & correct[None, :], axis=-1, dtype=jnp.int32),
      correct=jnp.sum(correct, dtype=jnp.int32),
      total=jnp.sum(mask, dtype=jnp.int32))


def certified_accuracy(
    logits: Array,
    labels: Array,
    pairwise_lipschitz: Array,
    radii: ArrayLike = DEFAULT_RADII,
    mask: Array | None = None,
    margin_error: ArrayLike | None = None,
) -> Array:
  """Certified robust accuracy (CRA, CLL supp. C) at each radius.

  The fraction of real (masked-in) examples that are correctly classified
  and certified (`certified_correct`). For a dataset split into batches, sum
  `certified_counts` instead of averaging these fractions.

  Args:
    logits: `(B, N)` float logits.
    labels: `(B,)` integer labels.
    pairwise_lipschitz: `(N, N)` bounds K.
    radii: `(R,)` L2 radii >= 0.
    mask: optional `(B,)`, true for real examples.
    margin_error: optional `(B,)` or scalar margin error bound delta >= 0.

  Returns:
    `(R,)` float32 fractions (NaN if the mask selects no example).
  """
  return certified_counts(logits, labels, pairwise_lipschitz, radii, mask,
                          margin_error).certified_accuracy()
