"""Lipschitz-margin losses: CLL (binary, multiclass), GloRo, TRADES, CRM, and
the losses of the 1-Lipschitz families (CPL's hinge, the offset cross-entropy).

All losses are pure, jittable and differentiable, and return one value per
example (no averaging inside), like `optax.losses`.

Notation, shared by all functions:

* `logits` f(x): `(B, N)` floats (binary CLL: `(B,)`).
* `labels` y: `(B,)` integers in `[0, N)`.
* `pairwise_lipschitz` K: `(N, N)` floats, `K[i, j]` an upper bound on the
  Lipschitz constant (L2) of the logit difference `f_i - f_j`. It is symmetric
  (the constant of `f_i - f_j` is that of `f_j - f_i`) with off-diagonal
  entries > 0; the diagonal is never read (it is 0 for
  `lipschitz.pairwise_lipschitz`). Row `K[y]` holds `K_{y,i}` = `K_{i,y}`.
* `epsilon`, `p`, `delta` and the other hyper-parameters are scalars; they may
  be traced (schedules pass them into jitted steps).

Paper references: `CLL` = arXiv 2309.06166 (equation numbers of the main
paper; "supp." for its supplement), `GloRo` = Leino et al. 2021, "Globally
Robust Neural Networks", `CRM` = arXiv 2310.00116.

Value checks (ranges, NaN/Inf, label range) run only on concrete inputs and
are skipped under `jit`/`grad`; shape and dtype checks always run.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cll_jax import _validation

Array = jax.Array
ArrayLike = Any  # jax.typing.ArrayLike: arrays and Python scalars.


# ---------------------------------------------------------------------------
# Input checks shared with `certify.py`.
# ---------------------------------------------------------------------------


def _check_scalar(name: str, x) -> None:
  if jnp.ndim(x) != 0:
    raise ValueError(f'{name} must be a scalar, got shape {jnp.shape(x)}')


def _check_nonnegative(name: str, x) -> None:
  """Raises if a concrete `x` has entries < 0 (or NaN); no-op under tracing."""
  if _validation.is_concrete(x):
    arr = np.asarray(x)
    if not np.all(arr >= 0):
      raise ValueError(f'{name} must be >= 0, got {arr.ravel()[:5].tolist()}')


def _check_logits_2d(logits) -> int:
  """Checks `(B, N)` float logits with N >= 2; returns N."""
  _validation.check_ndim('logits', logits, 2)
  _validation.check_floating('logits', logits)
  num_classes = jnp.shape(logits)[1]
  if num_classes < 2:
    raise ValueError(
        f'logits need at least 2 classes, got shape {jnp.shape(logits)}')
  _validation.check_finite('logits', logits)
  return num_classes


def _check_labels(labels, batch_size: int, num_classes: int) -> None:
  _validation.check_ndim('labels', labels, 1)
  if jnp.shape(labels)[0] != batch_size:
    raise ValueError(
        f'labels must have shape ({batch_size},) to match the logits, got '
        f'shape {jnp.shape(labels)}')
  _validation.check_labels('labels', labels, num_classes)


def _check_pairwise_lipschitz(k, num_classes: int) -> None:
  """K is `(N, N)`, float, finite, symmetric, > 0 off the diagonal."""
  if jnp.shape(k) != (num_classes, num_classes):
    raise ValueError(
        f'pairwise_lipschitz must have shape ({num_classes}, {num_classes}) '
        f'to match the logits, got shape {jnp.shape(k)}')
  _validation.check_floating('pairwise_lipschitz', k)
  _validation.check_finite('pairwise_lipschitz', k)
  if _validation.is_concrete(k):
    arr = np.asarray(k, dtype=np.float64)
    off = arr[~np.eye(num_classes, dtype=bool)]
    if not np.all(off > 0):
      raise ValueError(
          f'pairwise_lipschitz must be > 0 off the diagonal, got values down '
          f'to {off.min()}')
    # K_ij bounds f_i - f_j and f_j - f_i alike; an asymmetric K signals a
    # transposed or wrongly built matrix (rows are read as K_{y,i}).
    asym = np.abs(arr - arr.T)
    if np.any(asym > 1e-5 * np.maximum(np.abs(arr), np.abs(arr.T))):
      raise ValueError(
          f'pairwise_lipschitz must be symmetric, got |K - K^T| up to '
          f'{asym.max()}')


def _check_multiclass(logits, labels, pairwise_lipschitz) -> int:
  num_classes = _check_logits_2d(logits)
  _check_labels(labels, jnp.shape(logits)[0], num_classes)
  _check_pairwise_lipschitz(pairwise_lipschitz, num_classes)
  return num_classes


def _scale_dtype(epsilon, p):
  """The dtype `calibrated_scale` computes in (at least a float)."""
  dtype = jnp.result_type(epsilon, p)
  if not jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.result_type(float)
  return dtype


def _check_normal(name: str, x, dtype) -> None:
  """Raises if a concrete x > 0 is below the smallest normal `dtype` number.

  Such values are 0 or subnormal in `dtype`, and XLA on CPU and GPU flushes
  subnormals to 0: sigma would be 0 or a log of 0.
  """
  if _validation.is_concrete(x):
    tiny = float(jnp.finfo(dtype).tiny)
    value = float(np.asarray(x, np.float64))
    if 0 < value < tiny:
      raise ValueError(
          f'{name}={value!r} is below the smallest normal '
          f'{jnp.dtype(dtype).name} number {tiny!r}: it is 0 or subnormal '
          f'there, and subnormals are flushed to 0')


def _check_epsilon_p_delta(epsilon, p, delta) -> None:
  _check_scalar('epsilon', epsilon)
  _validation.check_positive('epsilon', epsilon)
  _validation.check_finite('epsilon', epsilon)
  _check_scalar('p', p)
  _validation.check_open_interval('p', p, 0.0, 0.5)
  dtype = _scale_dtype(epsilon, p)
  _check_normal('epsilon', epsilon, dtype)
  _check_normal('p', p, dtype)
  if delta is not None:
    _check_scalar('delta', delta)
    _check_nonnegative('delta', delta)
    _validation.check_finite('delta', delta)


def _gather_rows(k: Array, index: Array) -> Array:
  """`(B, N)` rows `K[index_b, :]`, i.e. `K_{index_b, i}`."""
  return jnp.take(k, index, axis=0)


def _pairwise_differences(logits: Array, k: Array, index: Array):
  """Logit gaps to class `index` and the matching K row, diagonal-safe.

  Returns:
    `(gap, k_row, is_index)`, all `(B, N)`: `gap_i = f_index - f_i`,
    `k_row_i = K_{index,i}` with 1 (not the 0 diagonal) at `i == index` so
    that callers can divide without producing Inf/NaN values or gradients,
    and the boolean mask `i == index`.
  """
  num_classes = logits.shape[1]
  is_index = jnp.arange(num_classes)[None, :] == index[:, None]
  f_index = jnp.take_along_axis(logits, index[:, None], axis=1)
  gap = f_index - logits
  # The where selects a constant at the diagonal, so no gradient (and no 0/0)
  # ever reaches K's diagonal entries.
  k_row = jnp.where(is_index, 1.0, _gather_rows(k, index)).astype(
      jnp.result_type(logits, k))
  return gap, k_row, is_index


def _label_nll(z: Array, labels: Array) -> Array:
  r"""`-log softmax(z)_y`, accurate also when it is tiny.

  Evaluated as `softplus(logsumexp_{i != y}(z_i - z_y))`: the usual
  `-log_softmax(z)[y]` is `log(1 + small)` rounded at 1, which leaves a
  relative error of ~1e-2 on a loss of ~1e-5 in float32 (well-fit examples,
  small p); softplus = log1p(exp(.)) keeps full precision, and both
  logsumexp and softplus are overflow-free.
  """
  num_classes = z.shape[-1]
  is_label = jnp.arange(num_classes)[None, :] == labels[:, None]
  z_label = jnp.take_along_axis(z, labels[:, None], axis=1)
  others = jnp.where(is_label, -jnp.inf, z - z_label)
  return jax.nn.softplus(jax.nn.logsumexp(others, axis=-1))


# ---------------------------------------------------------------------------
# CLL.
# ---------------------------------------------------------------------------


def calibrated_scale(epsilon: ArrayLike, p: ArrayLike) -> Array:
  r"""Calibrated logistic scale sigma_eps(p) (CLL eq. 5).

  .. math::
    \sigma_\epsilon(p) = \frac{2 \epsilon}{h^{-1}(1-p) - h^{-1}(p)}
                       = \frac{\epsilon}{\log(1-p) - \log p}
                       = \frac{\epsilon}{\operatorname{log1p}((1 - 2p) / p)},

  with the logit function `h^{-1}(p) = log(p / (1 - p))`: the logistic with
  this scale puts probability `p` at `-epsilon` and `1 - p` at `+epsilon`
  (supp. eq. 15). The last form is evaluated: `1 - 2p` is exact for
  p >= 1/4 (Sterbenz) and has relative error u below, the quotient adds u,
  and log1p keeps its argument's relative accuracy, so the result is within
  a few ulps for every p in (0, 0.5). The textbook form loses all accuracy
  in float32 for p below ~6e-8 (`1 - p` rounds to 1), and
  `log1p(-p) - log(p)` cancels near p = 0.5 (1.5e-4 relative at p = 0.4999
  in float32).

  Note on `p` in the official code: some of its experiments compute the width
  as `logit(1 - p/2) - logit(p/2)`, i.e. its `p_code` is the total mass
  outside the margin on both sides, and `p_paper = p_code / 2`. To reproduce
  such a setting pass `p = p_code / 2` here; training configs take p_code
  directly with `config.loss.p_convention = 'code'`.

  Args:
    epsilon: margin half-width (input-space L2 radius), scalar > 0, finite,
      at least the smallest normal number of the compute dtype.
    p: slack, the logistic's probability at the wrong margin side, scalar in
      the open interval (0, 0.5), at least the smallest normal number.

  Returns:
    The scalar sigma_eps(p) > 0. Eager calls raise ValueError on bad values;
    under `jit` (traced epsilon or p) the result is NaN instead.
  """
  _check_scalar('epsilon', epsilon)
  _validation.check_positive('epsilon', epsilon)
  _validation.check_finite('epsilon', epsilon)
  _check_scalar('p', p)
  _validation.check_open_interval('p', p, 0.0, 0.5)
  dtype = _scale_dtype(epsilon, p)
  _check_normal('epsilon', epsilon, dtype)
  _check_normal('p', p, dtype)
  epsilon = jnp.asarray(epsilon).astype(dtype)
  p = jnp.asarray(p).astype(dtype)
  tiny = jnp.finfo(dtype).tiny
  # Comparisons read subnormals as 0 (DAZ): they fail the >= tiny tests.
  valid = (jnp.isfinite(epsilon) & (epsilon >= tiny) & (p >= tiny)
           & (p < 0.5))
  return jnp.where(valid, epsilon / jnp.log1p((1 - 2 * p) / p), jnp.nan)


def cll_logits(
    logits: Array,
    labels: Array,
    pairwise_lipschitz: Array,
    epsilon: ArrayLike,
    p: ArrayLike,
    delta: ArrayLike | None = None,
) -> Array:
  r"""Inputs g of the calibrated softmax of multiclass CLL (supp. eq. 2).

  .. math::
    g_i = \begin{cases}
      \bigl(\delta + (f_i - f_y) / K_{i,y}\bigr) / \sigma_\epsilon(p)
          & i \ne y \\
      -\delta / \sigma_\epsilon(p) & i = y
    \end{cases}

  The paper uses delta = epsilon; supp. D.1 makes the margin offset delta a
  free hyper-parameter. The `i = y` entry is the constant `-delta / sigma`
  exactly: K's zero diagonal is never divided by, and no gradient reaches it.

  Args:
    logits: `(B, N)` float logits f(x).
    labels: `(B,)` integer labels y.
    pairwise_lipschitz: `(N, N)` bounds K (see the module docstring).
    epsilon: margin half-width, scalar > 0.
    p: slack in (0, 0.5) (see `calibrated_scale`).
    delta: margin offset, scalar >= 0; `None` means `epsilon`.

  Returns:
    `(B, N)` calibrated softmax inputs.
  """
  _check_multiclass(logits, labels, pairwise_lipschitz)
  _check_epsilon_p_delta(epsilon, p, delta)
  if delta is None:
    delta = epsilon
  sigma = calibrated_scale(epsilon, p)
  gap, k_row, is_label = _pairwise_differences(
      logits, pairwise_lipschitz, labels)
  # gap = f_y - f_i, so (f_i - f_y) / K_{i,y} = -gap / K.
  off = (delta - gap / k_row) / sigma
  return jnp.where(is_label, -delta / sigma, off)


def multiclass_cll_loss(
    logits: Array,
    labels: Array,
    pairwise_lipschitz: Array,
    epsilon: ArrayLike,
    p: ArrayLike,
    delta: ArrayLike | None = None,
) -> Array:
  r"""Multiclass calibrated Lipschitz-margin loss (CLL supp. eqs. 1-2).

  .. math::
    \ell(x, y) = -\log \mathrm{softmax}(g)_y
               = \operatorname{logsumexp}_i g_i + \delta / \sigma_\epsilon(p),

  with g from `cll_logits`. Evaluated as
  `softplus(logsumexp_{i != y}(g_i - g_y))`, where
  `g_i - g_y = (2 delta + (f_i - f_y) / K_{i,y}) / sigma` (supp. eq. 5):
  g reaches ~1e8 for small K and p, where a plain softmax overflows, and the
  loss of well-fit examples is tiny, where `log_softmax` loses its digits.
  The `lambda K^2` term of eq. 3 is separate (`lipschitz_penalty`).
  Invariant to adding a constant to all logits.

  Args:
    logits: `(B, N)` float logits.
    labels: `(B,)` integer labels.
    pairwise_lipschitz: `(N, N)` bounds K.
    epsilon: margin half-width, scalar > 0.
    p: slack in (0, 0.5).
    delta: margin offset >= 0; `None` means `epsilon`.

  Returns:
    `(B,)` per-example losses.
  """
  g = cll_logits(logits, labels, pairwise_lipschitz, epsilon, p, delta)
  return _label_nll(g, labels)


def binary_cll_loss(
    logits: Array,
    labels: Array,
    lipschitz: ArrayLike,
    epsilon: ArrayLike,
    p: ArrayLike,
    delta: ArrayLike | None = None,
) -> Array:
  r"""Binary calibrated Lipschitz-margin loss (CLL eqs. 3-4, supp. D.1).

  With `y_pm = 2 * label - 1` in {-1, +1},

  .. math::
    z = \bigl(-y_\pm \delta + f(x) / K\bigr) / \sigma_\epsilon(p), \qquad
    \ell = -[\,y \log h(z) + (1 - y) \log(1 - h(z))\,]
         = -\log h(y_\pm z),

  where h is the logistic sigmoid. Computed as `-log_sigmoid(y_pm * z)`,
  which neither overflows nor returns log(0) for |z| ~ 1e8, unlike
  `log(sigmoid(z))`.

  Relation to the multiclass loss (supp. eq. 5, shift by `delta/sigma`): for
  N = 2, `multiclass_cll_loss(f, y, K, eps, p, delta)` equals
  `binary_cll_loss(f[:, 1] - f[:, 0], y, K[0, 1], eps, p, 2 * delta)`: the
  softmax shift moves the full offset `2 delta` onto the other logit.

  Args:
    logits: `(B,)` float scalar outputs f(x).
    labels: `(B,)` integer labels in {0, 1}.
    lipschitz: scalar Lipschitz bound K of f, > 0.
    epsilon: margin half-width, scalar > 0.
    p: slack in (0, 0.5).
    delta: margin offset >= 0; `None` means `epsilon`.

  Returns:
    `(B,)` per-example losses.
  """
  _validation.check_ndim('logits', logits, 1)
  _validation.check_floating('logits', logits)
  _validation.check_finite('logits', logits)
  _check_labels(labels, jnp.shape(logits)[0], 2)
  _check_scalar('lipschitz', lipschitz)
  _validation.check_finite('lipschitz', lipschitz)
  _validation.check_positive('lipschitz', lipschitz)
  _check_epsilon_p_delta(epsilon, p, delta)
  if delta is None:
    delta = epsilon
  sigma = calibrated_scale(epsilon, p)
  y_pm = (2 * labels - 1).astype(logits.dtype)
  z = (-y_pm * delta + logits / lipschitz) / sigma
  # y * log h(z) + (1 - y) * log h(-z) == log h(y_pm * z) for y in {0, 1}.
  return -jax.nn.log_sigmoid(y_pm * z)


def lipschitz_penalty(lipschitz_constant: ArrayLike, lam: ArrayLike) -> Array:
  r"""The regulariser `lambda K^2` of CLL eq. 3.

  Args:
    lipschitz_constant: scalar Lipschitz bound K of the classifier.
    lam: scalar coefficient lambda >= 0 (the paper uses 1e-10..1e-4).

  Returns:
    The scalar `lam * K**2`.
  """
  _check_scalar('lipschitz_constant', lipschitz_constant)
  _validation.check_finite('lipschitz_constant', lipschitz_constant)
  _check_scalar('lam', lam)
  _check_nonnegative('lam', lam)
  return lam * jnp.square(lipschitz_constant)


# ---------------------------------------------------------------------------
# GloRo and TRADES.
# ---------------------------------------------------------------------------


def gloro_logits(
    logits: Array,
    pairwise_lipschitz: Array,
    epsilon: ArrayLike,
) -> Array:
  r"""Logits with GloRo's bottom class appended (Leino et al. 2021).

  With `j = argmax_i f_i` (first index on ties),

  .. math::
    f_\bot = \max_{i \ne j} \bigl(f_i + \epsilon K_{j,i}\bigr),

  and the output is `[f_1, ..., f_N, f_bot]`. `f_bot < f_j` exactly when
  every `f_j - f_i > epsilon K_{j,i}`, the certificate of CLL supp. eq. 18.
  The argmax is an integer choice, so gradients flow through `f_i` and
  `K_{j,i}` only. Unlike the reference TF code, which drops every class tied
  with the top logit, only the index j is excluded, so a tie gives
  `f_bot >= f_j` (not robust), the conservative reading.

  Args:
    logits: `(B, N)` float logits.
    pairwise_lipschitz: `(N, N)` bounds K.
    epsilon: certification radius, scalar > 0.

  Returns:
    `(B, N + 1)` logits; the last column is the bottom class.
  """
  num_classes = _check_logits_2d(logits)
  _check_pairwise_lipschitz(pairwise_lipschitz, num_classes)
  _check_scalar('epsilon', epsilon)
  _validation.check_positive('epsilon', epsilon)
  _validation.check_finite('epsilon', epsilon)
  top = jnp.argmax(logits, axis=-1)
  k_row = _gather_rows(pairwise_lipschitz, top)
  is_top = jnp.arange(num_classes)[None, :] == top[:, None]
  candidates = jnp.where(is_top, -jnp.inf, logits + epsilon * k_row)
  bottom = jnp.max(candidates, axis=-1, keepdims=True)
  return jnp.concatenate([logits, bottom.astype(logits.dtype)], axis=-1)


def _gloro_check(logits, labels, pairwise_lipschitz, epsilon,
                 head_lipschitz) -> None:
  _check_multiclass(logits, labels, pairwise_lipschitz)
  _check_scalar('epsilon', epsilon)
  _validation.check_positive('epsilon', epsilon)
  _validation.check_finite('epsilon', epsilon)
  if head_lipschitz is not None:
    _check_scalar('head_lipschitz', head_lipschitz)
    _validation.check_floating('head_lipschitz', head_lipschitz)
    _validation.check_positive('head_lipschitz', head_lipschitz)


def _official_variant_k(pairwise_lipschitz: Array,
                        head_lipschitz: ArrayLike | None) -> Array:
  r"""K, or K with the head's gradient counted once more (`gloro_loss`).

  .. math::
    K'_{ij} = K_{ij}\, h / \operatorname{sg}(h):
    \quad K' = K, \quad
    \partial K'_{ij} = \partial K_{ij} + K_{ij}\, \partial h / h,

  with sg the stop-gradient; `head_lipschitz = None` returns K unchanged.
  """
  if head_lipschitz is None:
    return pairwise_lipschitz
  return pairwise_lipschitz * (
      head_lipschitz / jax.lax.stop_gradient(head_lipschitz))


def gloro_loss(
    logits: Array,
    labels: Array,
    pairwise_lipschitz: Array,
    epsilon: ArrayLike,
    head_lipschitz: ArrayLike | None = None,
    logit_scale: ArrayLike = 1.0,
) -> Array:
  r"""GloRo cross-entropy over the N + 1 logits `[f, f_bot]`.

  .. math::
    \ell = -\log \mathrm{softmax}\bigl(s\,[f, f_\bot]\bigr)_y,

  computed stably (see `multiclass_cll_loss`). The label is never the
  bottom class. `logit_scale` s = 1 / T (default 1, GloRo's loss) is the
  fixed temperature scaling of CLL supp. D.1 (fig. D4c),
  `L_GloRo(y; h(s f(x)))`: f_bot is built from the unscaled f and K, then
  all N + 1 logits are scaled, so the robust prediction (and the
  certificate) does not depend on s; only the loss's softmax sharpens.
  The loss's own Lipschitz constant becomes `s K^(f)`.

  The default (`head_lipschitz=None`) is the loss as GloRo (Leino et al.
  2021) defines it: the gradient of K flows as K was built, e.g. for the
  naive bound `K_ij = P ||w_i - w_j||` (P the body's product bound, w_i the
  head's class vectors) into P and `||w_i - w_j||` once each.

  `head_lipschitz` selects the variant of the official CLL implementation
  (mlosch/CLL, `GloroLoss`), which exists only to reproduce CLL fig. 4 with
  that code's gradient. There the body's factor is computed as the whole
  network's bound divided by the head's stored estimate without gradient,
  `P h / sg(h)` (`h` the head's factor, max_ij ||w_i - w_j|| in that code),
  so K is used as `K' = K h / sg(h)`: the value is K, but

  .. math::
    \partial K'_{ij} = \partial K_{ij} + K_{ij}\, \partial h / h .

  For two classes `h = ||w_0 - w_1||` and `K'_01 = P ||w_0 - w_1||^2 / sg(.)`,
  so the head's share of the margin gradient is counted twice; the body's
  gradient is unchanged. On two-moons at eps = 0.15 (`experiments.moons_study`,
  seeds 0-4) this collapses the head, ||w_0 - w_1|| ~ 1e-4 with
  ||w_0||, ||w_1|| ~ 1, while the body's product grows to ~1.5e5, and leaves
  0.85-11.6% of the training points uncertified, as in CLL fig. 4; the loss
  as defined certifies 99.95-100% of them.

  Args:
    logits: `(B, N)` float logits.
    labels: `(B,)` integer labels in `[0, N)`.
    pairwise_lipschitz: `(N, N)` bounds K.
    epsilon: certification radius, scalar > 0.
    head_lipschitz: `None` (GloRo's loss), or for the official code's
      variant the head's Lipschitz factor h, a scalar > 0 carrying its
      gradient (`train.gloro_head_lipschitz` computes the official code's).
    logit_scale: the temperature factor s = 1 / T > 0, a scalar.

  Returns:
    `(B,)` per-example losses.
  """
  _gloro_check(logits, labels, pairwise_lipschitz, epsilon, head_lipschitz)
  _check_scalar('logit_scale', logit_scale)
  _validation.check_finite('logit_scale', logit_scale)
  _validation.check_positive('logit_scale', logit_scale)
  robust = gloro_logits(
      logits, _official_variant_k(pairwise_lipschitz, head_lipschitz),
      epsilon)
  if not (isinstance(logit_scale, (int, float)) and logit_scale == 1):
    # A literal 1 adds no op, so s = 1 compiles to GloRo's own program.
    robust = logit_scale * robust
  return _label_nll(robust, labels)


def gloro_trades_loss(
    logits: Array,
    labels: Array,
    pairwise_lipschitz: Array,
    epsilon: ArrayLike,
    trades_beta: ArrayLike,
    head_lipschitz: ArrayLike | None = None,
) -> Array:
  r"""GloRo's TRADES loss (`trades_kl.<beta>` of the GloRo code).

  Cross-entropy of the clean logits plus beta times the KL divergence from
  the clean prediction, padded with probability 0 for the bottom class, to
  the robust N + 1 prediction:

  .. math::
    \ell = -\log \mathrm{softmax}(f)_y
           + \beta\, \mathrm{KL}\bigl([\mathrm{softmax}(f), 0] \,\|\,
                                       \mathrm{softmax}([f, f_\bot])\bigr).

  As in the reference code, gradients flow through both arguments of the KL.
  Because the first N robust log-probabilities are the clean ones shifted by
  one constant, the KL has the closed form

  .. math::
    \mathrm{KL} = \operatorname{logsumexp}([f, f_\bot])
                  - \operatorname{logsumexp}(f)
                = \operatorname{softplus}(f_\bot - \operatorname{logsumexp}(f))
                = -\log(1 - q_\bot),

  which is evaluated (stable for any f_bot) instead of the sum over classes.
  The reference Keras code clips probabilities to [1e-7, 1] inside its KL;
  this exact form differs from it only where those clips bind.

  Args:
    logits: `(B, N)` float logits.
    labels: `(B,)` integer labels.
    pairwise_lipschitz: `(N, N)` bounds K.
    epsilon: certification radius, scalar > 0.
    trades_beta: scalar weight beta >= 0 of the robust term.
    head_lipschitz: `None`, or the official code's variant of the gradient
      of K (see `gloro_loss`).

  Returns:
    `(B,)` per-example losses.
  """
  _gloro_check(logits, labels, pairwise_lipschitz, epsilon, head_lipschitz)
  _check_scalar('trades_beta', trades_beta)
  _check_nonnegative('trades_beta', trades_beta)
  robust = gloro_logits(
      logits, _official_variant_k(pairwise_lipschitz, head_lipschitz),
      epsilon)
  clean_ce = _label_nll(logits, labels)
  kl = jax.nn.softplus(
      robust[:, -1] - jax.nn.logsumexp(logits, axis=-1))
  return clean_ce + trades_beta * kl


# ---------------------------------------------------------------------------
# CRM.
# ---------------------------------------------------------------------------


def crm_loss(
    logits: Array,
    labels: Array,
    pairwise_lipschitz: Array,
    lam: ArrayLike,
    temperature: ArrayLike,
    radius_threshold: ArrayLike,
) -> Array:
  r"""Dynamic-margin (CRM) loss of arXiv 2310.00116.

  With the certified radii to each other class
  `R_i(x) = (f_y - f_i) / K_{y,i}` (i != y),

  .. math::
    \ell(x, y) = \mathrm{CE}(f, y) + \lambda\, m(x)\, \frac{1}{t}
                 \log \sum_{i \ne y} e^{-t R_i(x)},

  where the soft-min term `(1/t) logsumexp(-t R)` is minus a smooth lower
  bound of `min_i R_i` (tight as t grows), and the gate
  `m(x) = 1[x is correct and min_i R_i(x) < R0]` is computed without
  gradient. "Correct" is strict: `f_y > f_i` for all i != y (ties count as
  wrong, as in `certify`). The batch mean equals the paper's

  .. math::
    J = \frac{1}{B}\sum_x \mathrm{CE} + \frac{\lambda}{B} \sum_{x \in S}
        \frac{1}{t} \log \sum_{i \ne y} e^{-t R_i(x)},
    \quad S = \{x : m(x) = 1\}.

  Gradients flow through the logits and through K (e.g. LipLT bounds of the
  network parameters); examples outside S get the cross-entropy gradient
  only.

  Args:
    logits: `(B, N)` float logits.
    labels: `(B,)` integer labels.
    pairwise_lipschitz: `(N, N)` bounds K.
    lam: weight lambda >= 0 of the robustness term.
    temperature: soft-min temperature t > 0.
    radius_threshold: R0 > 0; only correct points with radius below R0 are
      pushed.

  Returns:
    `(B,)` per-example losses.
  """
  _check_multiclass(logits, labels, pairwise_lipschitz)
  for name, value in (('lam', lam), ('temperature', temperature),
                      ('radius_threshold', radius_threshold)):
    _check_scalar(name, value)
  _check_nonnegative('lam', lam)
  _validation.check_positive('temperature', temperature)
  _validation.check_positive('radius_threshold', radius_threshold)

  ce = _label_nll(logits, labels)

  gap, k_row, is_label = _pairwise_differences(
      logits, pairwise_lipschitz, labels)
  radii = gap / k_row
  # -inf at i == y drops the label from the logsumexp; the finite branch
  # (divided by a safe 1) keeps the where's backward pass NaN-free.
  soft = jax.nn.logsumexp(
      jnp.where(is_label, -jnp.inf, -temperature * radii), axis=-1)
  soft = soft / temperature

  min_radius = jax.lax.stop_gradient(
      jnp.min(jnp.where(is_label, jnp.inf, radii), axis=-1))
  in_s = (min_radius > 0) & (min_radius < radius_threshold)
  # where, not multiply: the excluded examples' term gets a zero cotangent
  # and contributes no robustness gradient at all.
  return ce + lam * jnp.where(in_s, soft, 0.0)


# ---------------------------------------------------------------------------
# SOC's certificate regularisation.
# ---------------------------------------------------------------------------


def certificate_regularized_loss(
    logits: Array,
    labels: Array,
    pairwise_lipschitz: Array,
    gamma: ArrayLike,
) -> Array:
  r"""Cross-entropy with SOC's certificate regulariser (Singla et al. 2022).

  "Improved deterministic l2 robustness on CIFAR-10 and CIFAR-100" (ICLR
  2022, the CR term): for correctly classified examples the certified radius
  is rewarded,

  .. math::
    \ell(x, y) = \mathrm{CE}(f, y) - \gamma\,
      \mathrm{relu}\Bigl(\min_{i \ne y} \frac{f_y - f_i}{K_{y,i}}\Bigr)
      \cdot 1[\arg\max f = y],

  with the pairwise bounds K (for an orthogonal body and an orthonormal head
  `K_{y,i} = sqrt(2)`, SOC's margin / sqrt(2)). The indicator is computed
  without gradient; the min's gradient flows into the smallest-radius class
  (through the logits and K). gamma = 0 is plain cross-entropy.

  Args:
    logits: `(B, N)` float logits.
    labels: `(B,)` integer labels.
    pairwise_lipschitz: `(N, N)` bounds K.
    gamma: scalar weight >= 0 of the certificate term.

  Returns:
    `(B,)` per-example losses.
  """
  _check_multiclass(logits, labels, pairwise_lipschitz)
  _check_scalar('gamma', gamma)
  _check_nonnegative('gamma', gamma)
  gap, k_row, is_label = _pairwise_differences(
      logits, pairwise_lipschitz, labels)
  radius = jnp.min(jnp.where(is_label, jnp.inf, gap / k_row), axis=-1)
  correct = jax.lax.stop_gradient(jnp.all(is_label | (gap > 0), axis=-1))
  return _label_nll(logits, labels) - gamma * jnp.where(
      correct, jax.nn.relu(radius), 0.0)


# ---------------------------------------------------------------------------
# Losses of the 1-Lipschitz layer families (K = 1 by construction).
# ---------------------------------------------------------------------------


def _check_classification(logits, labels) -> int:
  num_classes = _check_logits_2d(logits)
  _check_labels(labels, jnp.shape(logits)[0], num_classes)
  return num_classes


def multi_margin_loss(
    logits: Array,
    labels: Array,
    margin: ArrayLike,
    power: int = 1,
) -> Array:
  r"""The multi-class hinge loss of CPL (Meunier et al., ICML 2022).

  .. math::
    \ell(x, y) = \frac{1}{N} \sum_{i \ne y}
      \max(0, m - (f_y - f_i))^{q},

  PyTorch's `multi_margin_loss` (its 1/N over all N classes included), which
  CPL trains with. On a 1-Lipschitz network with an orthonormal-row head the
  margin m is about sqrt(2) times the radius the loss aims at.

  Args:
    logits: `(B, N)` float logits.
    labels: `(B,)` integer labels.
    margin: scalar m >= 0.
    power: q, 1 or 2.

  Returns:
    `(B,)` per-example losses.
  """
  num_classes = _check_classification(logits, labels)
  _check_scalar('margin', margin)
  _check_nonnegative('margin', margin)
  if power not in (1, 2):
    raise ValueError(f'power must be 1 or 2, got {power}')
  z_label = jnp.take_along_axis(logits, labels[:, None], axis=1)
  is_label = jnp.arange(num_classes)[None, :] == labels[:, None]
  hinge = jax.nn.relu(margin - (z_label - logits)) ** power
  return jnp.sum(jnp.where(is_label, 0.0, hinge), axis=-1) / num_classes


def offset_cross_entropy(
    logits: Array,
    labels: Array,
    offset: ArrayLike,
    temperature: ArrayLike,
) -> Array:
  r"""The offset cross-entropy of AOL, SLL and LBDN (Prach & Lampert 2022).

  .. math::
    \ell(x, y) = t \cdot \mathrm{CE}\Bigl(\frac{f(x) - u\,e_y}{t}, y\Bigr),

  the label's logit lowered by the offset u before a cross-entropy at
  temperature t. CLL supp. A.1: it is CLL with a fixed scale t in place of
  sigma(p) K, which is why CLL changes little on K = 1 networks trained
  with it. Evaluated as `t * softplus(logsumexp_{i != y}(z_i - z_y))`
  (`_label_nll`), accurate when the loss is tiny.

  Args:
    logits: `(B, N)` float logits.
    labels: `(B,)` integer labels.
    offset: scalar u >= 0.
    temperature: scalar t > 0.

  Returns:
    `(B,)` per-example losses.
  """
  num_classes = _check_classification(logits, labels)
  _check_scalar('offset', offset)
  _check_nonnegative('offset', offset)
  _check_scalar('temperature', temperature)
  if _validation.is_concrete(temperature) and not float(temperature) > 0:
    raise ValueError(f'temperature must be > 0, got {float(temperature)}')
  onehot = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
  z = (logits - offset * onehot) / temperature
  return temperature * _label_nll(z, labels)
