"""LinearOperator: the CPU conv formulations equal the plain convolution.

On CPU, `LinearOperator.__call__` computes RGB convs by im2col and strided
convs with a space-to-depth input gradient (`operators._conv_cpu`). Both must
compute exactly the map of `lax.conv_general_dilated` (`operators._conv`),
with the same gradients, and `transpose` must be the exact adjoint.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cll_jax import operators

CASES = [  # (size, c_in, c_out, kernel, stride, padding)
    (9, 8, 6, 3, 2, 1), (10, 5, 4, 4, 2, 1), (11, 6, 4, 4, 2, 0),
    (8, 3, 4, 3, 1, 1), (9, 3, 4, 4, 2, 1), (7, 6, 4, 3, 1, 1),
    (12, 6, 4, 3, 3, 2),
]


@pytest.mark.parametrize('size, c_in, c_out, kernel, stride, padding', CASES)
def test_cpu_path_matches_plain_conv(size, c_in, c_out, kernel, stride,
                                     padding):
  assert jax.default_backend() == 'cpu'
  x = jax.random.normal(jax.random.PRNGKey(0), (3, size, size, c_in))
  w = jax.random.normal(jax.random.PRNGKey(1), (kernel, kernel, c_in, c_out))
  strides, pads = (stride, stride), ((padding, padding), (padding, padding))
  op = operators.LinearOperator(w, 'conv', (size, size, c_in), strides, pads)

  def via_operator(x, w):
    return jnp.sum(jnp.sin(op.replace(kernel=w)(x)))

  def via_lax(x, w):
    y = jax.lax.conv_general_dilated(
        x, w, strides, pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.sum(jnp.sin(y))

  y_fast = jax.jit(op.__call__)(x)
  y_ref = jax.lax.conv_general_dilated(
      x, w, strides, pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(y_fast, y_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.jit(jax.grad(via_operator, (0, 1)))(x, w),
                  jax.grad(via_lax, (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

  # The adjoint against the explicit matrix.
  matrix = np.asarray(op.dense_matrix(), np.float64)
  y = jax.random.normal(jax.random.PRNGKey(2), op.output_shape)
  np.testing.assert_allclose(
      np.asarray(op.transpose(y)).ravel(),
      matrix.T @ np.asarray(y, np.float64).ravel(), rtol=1e-4, atol=1e-4)
