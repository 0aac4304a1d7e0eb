"""Parameter-free layers (reshapes, pads, crops, scaled sum-pooling).

Each one's explicit Jacobian is built column by column (one basis vector at
a time) and its singular values compared with the bound 1 the spec claims;
the scaled sum-pool's float rounding is compared with its rounding step;
a network applies no activation after them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cll_jax import forward_error
from cll_jax import models
from cll_jax.layers import orthogonal

CASES = [
    (orthogonal.SpaceToDepth(2), (4, 6, 3), 'orthogonal'),
    (orthogonal.SpaceToDepth(2), (5, 3, 2), 'isometry'),  # odd: zero-padded
    (orthogonal.PadChannels(5), (3, 3, 2), 'isometry'),
    (orthogonal.KeepChannels(2), (3, 3, 5), 'projection'),
    (orthogonal.ScaledSumPool(2), (4, 6, 3), 'coisometry'),
    (orthogonal.ScaledSumPool(3), (6, 3, 2), 'coisometry'),
]


def _jacobian(spec, shape):
  module = spec.module('layer', 1)
  variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)))
  n = int(np.prod(shape))
  basis = np.eye(n).reshape(n, *shape)
  with jax.enable_x64(True):
    columns = module.apply(variables, jnp.asarray(basis, jnp.float64))[0]
    return np.asarray(columns).reshape(n, -1).T


@pytest.mark.parametrize('spec,shape,kind', CASES)
def test_fixed_layers_have_norm_one(spec, shape, kind):
  jac = _jacobian(spec, shape)
  assert jac.shape[0] == int(np.prod(spec.output_shape(shape)))
  s = np.linalg.svd(jac, compute_uv=False)
  assert float(spec.certified_bound({}, shape)) == 1.0
  np.testing.assert_allclose(s.max(), 1.0, rtol=1e-12)
  if kind in ('orthogonal', 'isometry'):  # every singular value is 1
    assert s.min() == pytest.approx(1.0, rel=1e-12)
    assert jac.shape[0] >= jac.shape[1]
  if kind == 'coisometry':  # orthonormal rows: one singular value per row
    np.testing.assert_allclose(jac @ jac.T, np.eye(jac.shape[0]), atol=1e-12)
  if kind == 'projection':
    assert np.sum(s > 0.5) == jac.shape[0] < jac.shape[1]


def test_sum_pool_refuses_partial_windows():
  with pytest.raises(ValueError, match='multiple of the window'):
    orthogonal.ScaledSumPool(2).output_shape((5, 4, 3))
  with pytest.raises(ValueError, match='PadChannels'):
    orthogonal.PadChannels(2).output_shape((3, 3, 4))


def test_sum_pool_rounding_step_covers_float32():
  spec, shape = orthogonal.ScaledSumPool(3), (9, 6, 4)
  x = np.random.default_rng(0).normal(size=(64, *shape)) * 3
  x32 = x.astype(np.float32)
  with jax.enable_x64(True):
    exact32 = np.asarray(orthogonal.scaled_sum_pool(
        jnp.asarray(x32.astype(np.float64)), 3))
    dtype = jnp.float64
    one, zero = jnp.ones((), dtype), jnp.zeros((), dtype)
    (_, _), (ep, eq) = spec.rounding_step(
        {}, shape, ((zero, one), (zero, zero)), one, dtype=dtype,
        forward_dtype=jnp.float32)
  computed = np.asarray(orthogonal.scaled_sum_pool(jnp.asarray(x32), 3),
                        np.float64)
  errors = np.linalg.norm((computed - exact32).reshape(64, -1), axis=1)
  norms = np.linalg.norm(x32.reshape(64, -1).astype(np.float64), axis=1)
  bounds = float(ep) + float(eq) * norms
  assert np.all(errors <= bounds)
  assert errors.max() > 0  # float32 does round here (1/3)


def test_no_activation_after_fixed_layers():
  # relu after PadChannels would zero the negative inputs.
  body = (orthogonal.PadChannels(4), orthogonal.ScaledSumPool(2))
  model = models.LipschitzNetwork(body, 3, activation='relu')
  x = -jnp.ones((1, 4, 4, 2))
  variables = model.init(jax.random.PRNGKey(0), x)
  head = variables['params']['head']
  pooled = orthogonal.scaled_sum_pool(orthogonal.pad_channels(x, 4), 2)
  want = pooled.reshape(1, -1) @ head['kernel'] + head['bias']
  np.testing.assert_allclose(model.apply(variables, x).logits, want,
                             rtol=1e-6)
  bounds = models.certified_bounds(model, variables, (4, 4, 2))
  np.testing.assert_allclose(bounds['layer_norms'][:-1], [1.0, 1.0])
  error = forward_error.network_logit_error(model, variables, (4, 4, 2),
                                            bounds['layer_norms'])
  assert float(error.slope) > 0 and np.isfinite(float(error.slope))
