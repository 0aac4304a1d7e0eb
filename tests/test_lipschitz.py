"""Tests of cll_jax.lipschitz: power iteration, convergence, pairwise bounds.

Every spectral norm is checked against the float64 SVD of an explicit matrix
that does not come from `LinearOperator.dense_matrix()`: a brute-force numpy
construction of the convolution matrix (loops over output positions and
kernel taps) and, independently, `jax.jacobian` of the Flax layer's forward
map; the two are first checked to agree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_ops import conv_matrix

from cll_jax import layers
from cll_jax import lipschitz
from cll_jax.operators import LinearOperator

RTOL_SIGMA = 1e-4  # float32 power iteration vs float64 SVD


def _randn(seed, shape):
  """Gaussian float32 array from numpy (no per-shape XLA compilation)."""
  return jnp.asarray(
      np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _unit(seed, shape):
  v = np.random.default_rng(seed).standard_normal(shape)
  return jnp.asarray(v / np.linalg.norm(v), jnp.float32)


def top_singular_value(m):
  return np.linalg.svd(np.asarray(m, np.float64), compute_uv=False)[0]


# (H=W, c_in, c_out, kernel, stride, padding)
CONV_CASES = [
    (6, 2, 3, 3, 1, 0),
    (6, 3, 4, 3, 1, 1),
    (6, 2, 3, 4, 1, 1),
    (8, 2, 3, 4, 2, 0),
    (8, 4, 2, 4, 2, 1),
    (8, 3, 4, 3, 2, 1),
    (7, 3, 2, 3, 2, 1),  # odd size: the floor rule drops a row/column
    (7, 2, 4, 4, 2, 0),
]


def _init(layer, input_shape, seed):
  """Variables shaped like layer.init's, drawn with numpy.

  Skips compiling the PRNG, the main cost of a jitted `init` on CPU; the
  init itself is tested in test_models.py.
  """
  shapes = jax.eval_shape(layer.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
  kernel_shape = shapes['params']['kernel'].shape
  fan_in = int(np.prod(kernel_shape[:-1]))
  rng = np.random.default_rng(seed)
  return {
      'params': {
          'kernel': jnp.asarray(rng.standard_normal(kernel_shape)
                                * np.sqrt(2 / fan_in), jnp.float32),
          'bias': jnp.asarray(0.1 * rng.standard_normal(kernel_shape[-1]),
                              jnp.float32)},
      layers.POWER_ITERATION: {'u': _unit(seed + 1, input_shape)},
  }


def _analyse(layer, op, variables, x, y, long_iterations=3000):
  """Everything the convergence/adjoint checks need, in one compilation.

  Returns the Jacobian of the layer's forward map at x, (u, sigma) of
  `converge_power_iteration`, the layer's own sigma after `long_iterations`
  warm-started steps through its 'power_iteration' state, A x and A^T y.
  """
  long_layer = layer.clone(num_power_iterations=long_iterations)

  def run(variables, x, y):
    forward = lambda z: layer.apply(variables, z[None])[0][0]
    jac = jax.jacobian(forward)(x)
    u, sigma = lipschitz.converge_power_iteration(
        op, variables[layers.POWER_ITERATION]['u'])
    (_, layer_sigma), _ = long_layer.apply(
        variables, x[None], mutable=[layers.POWER_ITERATION])
    return jac, u, sigma, layer_sigma, op(x), op.transpose(y)

  out = jax.device_get(jax.jit(run)(variables, x, y))
  jac = np.asarray(out[0], np.float64).reshape(-1, x.size)
  return (jac, *out[1:])


@pytest.mark.parametrize('case', CONV_CASES)
def test_conv_power_iteration_and_adjoint(case):
  size, c_in, c_out, k, s, p = case
  shape = (size, size, c_in)
  layer = layers.LipschitzConv(c_out, k, stride=s, padding=p)
  variables = _init(layer, shape, seed=sum(case))
  kernel = variables['params']['kernel']
  op = LinearOperator(kernel, 'conv', shape, (s, s), ((p, p), (p, p)))
  rng = np.random.default_rng(sum(case))
  x = rng.uniform(size=shape).astype(np.float32)
  y = rng.standard_normal(op.output_shape).astype(np.float32)
  jac, u, sigma, layer_sigma, ax, aty = _analyse(layer, op, variables, x, y)

  brute, out_shape = conv_matrix(kernel, shape, s, p)
  assert op.output_shape == out_shape
  # The layer's forward map is exactly the brute-force convolution.
  np.testing.assert_allclose(jac, brute, atol=1e-6)
  sigma_ref = top_singular_value(jac)
  np.testing.assert_allclose(sigma, sigma_ref, rtol=RTOL_SIGMA)
  np.testing.assert_allclose(np.linalg.norm(u), 1.0, rtol=1e-5)
  # The layer, run long enough through its own state, agrees.
  np.testing.assert_allclose(layer_sigma, sigma_ref, rtol=RTOL_SIGMA)

  # Adjoint: <A x, y> = <x, A^T y>, and A^T y is the explicit transpose.
  x64, y64 = x.astype(np.float64), y.astype(np.float64)
  np.testing.assert_allclose(np.vdot(ax, y64), np.vdot(x64, aty), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(ax).ravel(), brute @ x64.ravel(),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(aty).ravel(), brute.T @ y64.ravel(),
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('d_in,d_out', [(5, 7), (12, 3), (9, 9)])
def test_dense_power_iteration_and_adjoint(d_in, d_out):
  layer = layers.LipschitzDense(d_out)
  variables = _init(layer, (d_in,), seed=d_in)
  kernel = variables['params']['kernel']
  op = LinearOperator(kernel, 'dense', (d_in,))
  rng = np.random.default_rng(d_in)
  x = rng.standard_normal(d_in).astype(np.float32)
  y = rng.standard_normal(d_out).astype(np.float32)
  jac, u, sigma, layer_sigma, ax, aty = _analyse(layer, op, variables, x, y)

  np.testing.assert_allclose(jac, np.asarray(kernel, np.float64).T, atol=1e-7)
  sigma_ref = top_singular_value(jac)
  np.testing.assert_allclose(sigma, sigma_ref, rtol=RTOL_SIGMA)
  np.testing.assert_allclose(layer_sigma, sigma_ref, rtol=RTOL_SIGMA)
  x64, y64 = x.astype(np.float64), y.astype(np.float64)
  np.testing.assert_allclose(np.vdot(ax, y64), np.vdot(x64, aty), rtol=1e-5)
  np.testing.assert_allclose(aty, jac.T @ y64, rtol=1e-5, atol=1e-6)


def _finite_difference_top_sv(matrix_fn, kernel, eps=1e-6):
  """Central differences of sigma_1(matrix_fn(kernel)) in float64."""
  kernel = np.asarray(kernel, np.float64)
  grad = np.zeros_like(kernel)
  for idx in np.ndindex(kernel.shape):
    e = np.zeros_like(kernel)
    e[idx] = eps
    grad[idx] = (top_singular_value(matrix_fn(kernel + e))
                 - top_singular_value(matrix_fn(kernel - e))) / (2 * eps)
  return grad


@pytest.mark.parametrize('num_iterations', [0, 5])
def test_dense_sigma_gradient_is_spectral_gradient(num_iterations):
  kernel = _randn(4, (5, 4))
  op = LinearOperator(kernel, 'dense', (5,))
  u, _ = lipschitz.converge_power_iteration(op, _unit(5, (5,)), tol=1e-7)
  grad = jax.jit(jax.grad(lambda k: lipschitz.power_iteration(
      op.replace(kernel=k), u, num_iterations)[1]))(kernel)
  fd = _finite_difference_top_sv(lambda k: k.T, kernel)
  np.testing.assert_allclose(grad, fd, atol=2e-4)
  # Closed form: d sigma / dW = u1 v1^T of the exact SVD (kernel layout).
  left, _, right_t = np.linalg.svd(np.asarray(kernel, np.float64))
  np.testing.assert_allclose(grad, np.outer(left[:, 0], right_t[0]),
                             atol=2e-4)


def test_sigma_gradient_does_not_flow_through_iterate():
  """Unconverged: the gradient is (A u3 / ||A u3||) u3^T, u3 held constant."""
  kernel = _randn(4, (5, 4))
  u = _unit(9, (5,))
  grad = jax.jit(jax.grad(lambda k: lipschitz.power_iteration(
      LinearOperator(k, 'dense', (5,)), u, 3)[1]))(kernel)
  un, kn = np.asarray(u, np.float64), np.asarray(kernel, np.float64)
  for _ in range(3):
    un = kn @ (kn.T @ un)
    un /= np.linalg.norm(un)
  v = kn.T @ un
  np.testing.assert_allclose(grad, np.outer(un, v / np.linalg.norm(v)),
                             rtol=1e-5, atol=1e-6)


def test_conv_layer_sigma_gradient_is_spectral_gradient():
  shape, s, p = (5, 5, 2), 2, 1
  layer = layers.LipschitzConv(2, 3, stride=s, padding=p)
  variables = _init(layer, shape, seed=1)
  x = jnp.zeros((1, *shape))

  @jax.jit
  def grad_fn(variables):
    _, state = layer.clone(num_power_iterations=500).apply(
        variables, x, mutable=[layers.POWER_ITERATION])

    def sigma(kernel):
      params = {**variables['params'], 'kernel': kernel}
      return layer.apply({'params': params, **state}, x)[1]

    return jax.grad(sigma)(variables['params']['kernel'])

  grad = grad_fn(variables)
  fd = _finite_difference_top_sv(lambda kk: conv_matrix(kk, shape, s, p)[0],
                                 variables['params']['kernel'])
  np.testing.assert_allclose(grad, fd, atol=5e-4)


def test_converge_stops_at_max_iterations_and_on_zero_kernel():
  op = LinearOperator(_randn(0, (8, 8)), 'dense', (8,))
  u0 = _unit(1, (8,))
  # Exactly max_iterations steps when tol is unreachable, also when that is
  # not a multiple of the block between convergence checks.
  for n in (1, 13):
    u_n, _ = lipschitz.converge_power_iteration(op, u0, tol=0.0,
                                                max_iterations=n)
    u_ref, _ = lipschitz.power_iteration(op, u0, n)
    np.testing.assert_allclose(u_n, u_ref, rtol=1e-5, atol=1e-6)

  zero = LinearOperator(jnp.zeros((3, 3, 2, 2)), 'conv', (5, 5, 2))
  u, sigma = lipschitz.converge_power_iteration(
      zero, _unit(2, (5, 5, 2)))
  assert float(sigma) == 0.0
  assert np.all(np.isfinite(np.asarray(u)))


def test_power_iteration_rejects_wrong_vector_shape():
  op = LinearOperator(jnp.ones((4, 3)), 'dense', (4,))
  with pytest.raises(ValueError, match=r'\(3,\)'):
    lipschitz.power_iteration(op, jnp.ones((3,)), 1)


def test_random_unit_vector():
  u = lipschitz.random_unit_vector(jax.random.key(0), (4, 4, 3))
  assert u.shape == (4, 4, 3)
  np.testing.assert_allclose(jnp.linalg.norm(u), 1.0, rtol=1e-6)


def test_safe_norm_value_and_gradient():
  sq = jnp.array([0.0, 4.0, 2.25])
  np.testing.assert_allclose(lipschitz.safe_norm(sq), [0.0, 2.0, 1.5])
  grad = jax.grad(lambda s: jnp.sum(lipschitz.safe_norm(s)))(sq)
  np.testing.assert_allclose(grad, [0.0, 0.25, 1 / 3], rtol=1e-6)


def test_pairwise_column_distances_brute_force():
  kernel = np.asarray(_randn(0, (7, 5)))
  dist = lipschitz.pairwise_column_distances(jnp.asarray(kernel))
  ref = np.array([[np.linalg.norm(kernel[:, i].astype(np.float64)
                                  - kernel[:, j]) for j in range(5)]
                  for i in range(5)])
  np.testing.assert_allclose(dist, ref, rtol=1e-6, atol=1e-7)
  assert np.all(np.diag(np.asarray(dist)) == 0.0)
  np.testing.assert_array_equal(dist, dist.T)

  prefix = 2.5
  np.testing.assert_allclose(
      lipschitz.pairwise_lipschitz(jnp.asarray(kernel), jnp.asarray(prefix)),
      prefix * ref, rtol=1e-6, atol=1e-7)


def test_pairwise_distances_of_close_large_columns_do_not_cancel():
  """||a - b|| for |a| ~ 1e3, |a - b| ~ 1e-3: the Gram identity gives 0/NaN."""
  rng = np.random.default_rng(0)
  a = (1e3 * rng.standard_normal(16)).astype(np.float32)
  b = (a + 1e-3 * rng.standard_normal(16)).astype(np.float32)
  ref = np.linalg.norm(a.astype(np.float64) - b.astype(np.float64))
  dist = lipschitz.pairwise_column_distances(jnp.asarray(np.stack([a, b], 1)))
  np.testing.assert_allclose(dist[0, 1], ref, rtol=1e-5)


def test_pairwise_gradient_finite_with_identical_columns():
  kernel = _randn(3, (6, 4))
  kernel = kernel.at[:, 2].set(kernel[:, 0])
  loss = lambda k: jnp.sum(lipschitz.pairwise_lipschitz(k, 1.7))
  value, grad = jax.value_and_grad(loss)(kernel)
  assert np.isfinite(float(value))
  assert np.all(np.isfinite(np.asarray(grad)))
  # Closed form of d ||W_0 - W_1|| / d W away from ties.
  g01 = jax.grad(lambda k: lipschitz.pairwise_column_distances(k)[0, 1])(
      kernel)
  diff = np.asarray(kernel[:, 0] - kernel[:, 1], np.float64)
  unit = diff / np.linalg.norm(diff)
  np.testing.assert_allclose(g01[:, 0], unit, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g01[:, 1], -unit, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g01[:, 2:], 0.0)


def test_pairwise_rejects_non_matrix_kernel():
  with pytest.raises(ValueError, match=r'\(3, 4, 5\)'):
    lipschitz.pairwise_column_distances(jnp.ones((3, 4, 5)))
