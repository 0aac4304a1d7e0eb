"""Lipschitz bounds of layers and networks: power iteration and pairwise bounds.

The CLL paper (arXiv 2309.06166, eq. 1 and supplement B) bounds the Lipschitz
constant of a network f = g_L o ... o g_1 by the product of the layers'
spectral norms, each estimated by power iteration that is warm-started across
training steps (5 iterations per step) and run to convergence before
evaluation. For the multiclass loss and for certification it needs the bound of
each logit difference f_i - f_j (supplement eq. 2 and 18):

    K_ij = ||W_i - W_j||_2 * prod_{l < L} ||g_l||_2,

where W_i is the i-th column of the last (dense) layer's kernel; ||W_i - W_j||
is the exact norm of a vector, only the earlier layers need power iteration.

Power iteration converges to sigma_1 from below: an unconverged estimate can
understate the norm. For certificates that must hold, use the guaranteed upper
bounds of `cll_jax.sound_bounds`; power iteration is cheap and differentiable,
which is what training needs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cll_jax.operators import LinearOperator

# Below this norm a vector is treated as zero when normalising.
_TINY = 1e-30
# converge_power_iteration compares sigma across this many iterations.
CHECK_EVERY = 10


def _normalize(v: jax.Array) -> jax.Array:
  return v / jnp.maximum(jnp.linalg.norm(v), _TINY)


def random_unit_vector(rng: jax.Array, shape: tuple[int, ...],
                       dtype=jnp.float32) -> jax.Array:
  """A unit-norm Gaussian vector: the start of a power iteration."""
  return _normalize(jax.random.normal(rng, shape, dtype))


def power_iteration(op: LinearOperator, u: jax.Array,
                    num_iterations: int) -> tuple[jax.Array, jax.Array]:
  """Warm-started power iteration on A^T A for the layer's true operator A.

  Each iteration maps u <- A^T A u / ||A^T A u||, with the exact adjoint
  (`LinearOperator.transpose`). The estimate sigma = ||A u|| then converges to
  the largest singular value from below.

  Gradients: the iterate is a constant (stop_gradient), so d sigma / d kernel
  is the spectral-norm gradient v u^T of the converged singular pair, as in
  spectral-norm training (Miyato et al. 2018) and GloRo.

  Args:
    op: the layer's linear operator.
    u: current iterate, shape `op.input_shape`, unit norm.
    num_iterations: iterations to run (static; 0 just evaluates ||A u||).

  Returns:
    (new iterate of shape `op.input_shape`, sigma scalar).
  """
  if u.shape != tuple(op.input_shape):
    raise ValueError(
        f'power-iteration vector has shape {u.shape}, operator input shape is '
        f'{op.input_shape}')
  frozen = op.replace(kernel=jax.lax.stop_gradient(op.kernel))
  u = jax.lax.stop_gradient(u)
  if num_iterations > 0:
    # Unrolled (the count is static, 5 in the paper): on CPU the while loop
    # cost ~10-20 ms more per 4C3F training step than straight-line code.
    # Long runs unroll by blocks of 8 only, to keep compile time bounded.
    u = jax.lax.fori_loop(0, num_iterations,
                          lambda _, v: _normalize(frozen.gram(v)), u,
                          unroll=True if num_iterations <= 8 else 8)
  return u, jnp.linalg.norm(op(u))


def converge_power_iteration(
    op: LinearOperator, u: jax.Array, *, tol: float = 1e-6,
    max_iterations: int = 2000) -> tuple[jax.Array, jax.Array]:
  """Runs power iteration until sigma changes by at most `tol` relatively.

  The paper converges the iterates after every epoch (to 1e-9 in float64);
  float32 resolves about 1e-7, hence the default. The change is measured over
  blocks of `CHECK_EVERY` iterations, not one: when the top two singular
  values are close (ratio q = (s2/s1)^2 near 1, common for convolutions) the
  per-step change is only about (1 - q^2) times the remaining error, and a
  per-step test stopped 1e-4 to 3e-4 (relative) below sigma_1 on random
  kaiming-initialised conv layers; over a block the error left is about
  (1 - q^(2 * block))^-1 * tol instead. The loop stops after
  `max_iterations` iterations whatever the change, so it always terminates.

  Returns:
    (converged iterate, sigma). sigma carries no gradient.
  """
  frozen = op.replace(kernel=jax.lax.stop_gradient(op.kernel))

  def cond(state):
    _, sigma, previous, i = state
    unconverged = jnp.abs(sigma - previous) > tol * jnp.abs(sigma)
    return jnp.logical_and(i < max_iterations, unconverged)

  def body(state):
    v, sigma, _, i = state
    steps = jnp.minimum(CHECK_EVERY, max_iterations - i)
    v = jax.lax.fori_loop(0, steps, lambda _, w: _normalize(frozen.gram(w)), v)
    return v, jnp.linalg.norm(frozen(v)), sigma, i + steps

  u = jax.lax.stop_gradient(u)
  sigma0 = jnp.linalg.norm(frozen(u))
  init = (u, sigma0, jnp.full_like(sigma0, jnp.inf), jnp.array(0))
  u, sigma, _, _ = jax.lax.while_loop(cond, body, init)
  return u, sigma


def safe_norm(squared: jax.Array) -> jax.Array:
  """sqrt with a zero (not NaN) gradient where the squared norm is 0."""
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def pairwise_column_distances(kernel: jax.Array) -> jax.Array:
  """||W_:,i - W_:,j||_2 for all class pairs of a (d, N) head kernel.

  Computed from the explicit differences, not from the Gram identity
  ||a||^2 + ||b||^2 - 2 a.b, which cancels catastrophically for close columns
  and would understate a bound. The diagonal is exactly 0 with a zero
  gradient.

  Returns:
    (N, N) symmetric matrix with zero diagonal.
  """
  if kernel.ndim != 2:
    raise ValueError(f'head kernel must be (d, N), got shape {kernel.shape}')
  diff = kernel[:, :, None] - kernel[:, None, :]
  distances = safe_norm(jnp.sum(diff * diff, axis=0))
  # Exact zeros on the diagonal even when XLA computes the two operands of
  # a column's difference with itself in different fusions (e.g. the
  # normalised columns of an LLN head), which can leave an ulp.
  n = kernel.shape[1]
  return jnp.where(jnp.eye(n, dtype=bool), 0.0, distances)


def pairwise_lipschitz(head_kernel: jax.Array,
                       prefix_bound: jax.Array) -> jax.Array:
  """K_ij = ||W_i - W_j|| * prefix_bound (CLL supplement eq. 2 and 18).

  Args:
    head_kernel: (d, N) kernel of the last, dense layer.
    prefix_bound: Lipschitz bound of everything before the head (product of
      the earlier layers' norms times the input-scaling factor).

  Returns:
    (N, N) bounds of the logit differences, zero on the diagonal.
  """
  return pairwise_column_distances(head_kernel) * prefix_bound
