"""Lipschitz certificates: certified radii and certified robust accuracy.

For logits f(x) with predicted class `c = argmax_i f_i(x)` and pairwise bounds
`K_{c,j}` on the Lipschitz constants (L2) of `f_c - f_j`, every perturbation
`||d||_2 <= epsilon` keeps `f_c(x + d) - f_j(x + d) >= f_c(x) - f_j(x) -
epsilon K_{c,j}`. The prediction is therefore certified at radius epsilon when

  f_c(x) - f_j(x) > epsilon * K_{c,j}   for every j != c   (CLL supp. eq. 18),

strictly: at equality a perturbation may reach a tie. Certification compares
the margin with `epsilon * K` (no division), and a tie for the argmax is never
certified. Computations run in at least float32 whatever the logits' dtype.

Shapes: `logits` `(B, N)`, `labels` `(B,)` ints, `pairwise_lipschitz` `(N, N)`
symmetric with positive off-diagonal entries (the diagonal is never read),
`radii` `(R,)`.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

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


def _check_logits_k(logits, pairwise_lipschitz) -> int:
  num_classes = _check_logits_2d(logits)
  _check_pairwise_lipschitz(pairwise_lipschitz, num_classes)
  return num_classes


def _check_radius(name: str, value, ndim: int) -> None:
  _validation.check_ndim(name, value, ndim)
  _validation.check_finite(name, value)
  _check_nonnegative(name, value)


def _top_gaps(logits: Array, pairwise_lipschitz: Array):
  """`(c, gap, k_row, is_top)`: gap_j = f_c - f_j, k_row_j = K_{c,j}."""
  dtype = jnp.promote_types(
      jnp.result_type(logits, pairwise_lipschitz), jnp.float32)
  logits = logits.astype(dtype)
  k = pairwise_lipschitz.astype(dtype)
  top = jnp.argmax(logits, axis=-1)
  gap, k_row, is_top = _pairwise_differences(logits, k, top)
  return top, gap, k_row, is_top


def prediction_margins(logits: Array, pairwise_lipschitz: Array) -> Array:
  r"""Per-class certified radii of the predicted class.

  .. math::
    r_j(x) = \frac{f_c(x) - f_j(x)}{K_{c,j}}, \quad j \ne c, \qquad
    r_c = +\infty,

  the L2 distance from x that provably keeps `f_c > f_j` (exact for a linear
  model with `K_{c,j} = ||w_c - w_j||`).

  Args:
    logits: `(B, N)` float logits.
    pairwise_lipschitz: `(N, N)` bounds K.

  Returns:
    `(B, N)` radii, `+inf` at the predicted class.
  """
  _check_logits_k(logits, pairwise_lipschitz)
  _, gap, k_row, is_top = _top_gaps(logits, pairwise_lipschitz)
  return jnp.where(is_top, jnp.inf, gap / k_row)


def certified_radius(logits: Array, pairwise_lipschitz: Array) -> Array:
  r"""Certified L2 radius `min_{j != c} (f_c - f_j) / K_{c,j}`.

  Zero when the argmax is tied. For a yes/no decision at a given radius use
  `is_certified`, which avoids the division's rounding.

  Args:
    logits: `(B, N)` float logits.
    pairwise_lipschitz: `(N, N)` bounds K.

  Returns:
    `(B,)` radii >= 0.
  """
  return jnp.min(prediction_margins(logits, pairwise_lipschitz), axis=-1)


def _certified_at(gap: Array, k_row: Array, is_top: Array,
                  epsilon: ArrayLike) -> Array:
  return jnp.all(is_top | (gap > epsilon * k_row), axis=-1)


def is_certified(logits: Array, pairwise_lipschitz: Array,
                 epsilon: ArrayLike) -> Array:
  r"""Whether the prediction is certified at L2 radius epsilon (supp. eq. 18).

  .. math::
    f_c(x) - f_j(x) > \epsilon K_{c,j} \quad \forall j \ne c.

  Strict: a point with some `f_c - f_j <= epsilon K_{c,j}`, or with a tied
  argmax, is not certified. `epsilon = 0` certifies a unique argmax.

  Args:
    logits: `(B, N)` float logits.
    pairwise_lipschitz: `(N, N)` bounds K.
    epsilon: scalar radius >= 0.

  Returns:
    `(B,)` booleans.
  """
  _check_logits_k(logits, pairwise_lipschitz)
  _check_radius('epsilon', epsilon, 0)
  _, gap, k_row, is_top = _top_gaps(logits, pairwise_lipschitz)
  return _certified_at(gap, k_row, is_top, epsilon)


def certified_correct(logits: Array, labels: Array, pairwise_lipschitz: Array,
                      epsilon: ArrayLike) -> Array:
  """`argmax f == label` and `is_certified(...)`, `(B,)` booleans.

  Args:
    logits: `(B, N)` float logits.
    labels: `(B,)` integer labels.
    pairwise_lipschitz: `(N, N)` bounds K.
    epsilon: scalar radius >= 0.
  """
  num_classes = _check_logits_k(logits, pairwise_lipschitz)
  _check_labels(labels, jnp.shape(logits)[0], num_classes)
  _check_radius('epsilon', epsilon, 0)
  top, gap, k_row, is_top = _top_gaps(logits, pairwise_lipschitz)
  return (top == labels) & _certified_at(gap, k_row, is_top, epsilon)


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


def certified_counts(
    logits: Array,
    labels: Array,
    pairwise_lipschitz: Array,
    radii: ArrayLike = DEFAULT_RADII,
    mask: Array | None = None,
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

  Returns:
    `CertifiedCounts` (int32); add the counts of all batches, then call
    `.certified_accuracy()`.
  """
  num_classes = _check_logits_k(logits, pairwise_lipschitz)
  batch = jnp.shape(logits)[0]
  _check_labels(labels, batch, num_classes)
  radii = jnp.asarray(radii)
  _check_radius('radii', radii, 1)
  if mask is None:
    mask = jnp.ones((batch,), dtype=bool)
  else:
    _validation.check_ndim('mask', mask, 1)
    if jnp.shape(mask)[0] != batch:
      raise ValueError(
          f'mask must have shape ({batch},) to match the logits, got shape '
          f'{jnp.shape(mask)}')
    mask = jnp.asarray(mask) != 0
  top, gap, k_row, is_top = _top_gaps(logits, pairwise_lipschitz)
  correct = (top == labels) & mask
  # (R, B): one exact margin comparison per radius.
  cert = jax.vmap(lambda r: _certified_at(gap, k_row, is_top, r))(
      radii.astype(gap.dtype))
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

  Returns:
    `(R,)` float32 fractions (NaN if the mask selects no example).
  """
  return certified_counts(
      logits, labels, pairwise_lipschitz, radii, mask).certified_accuracy()
