"""SOC layers: proven bounds against the SVD of the explicit Jacobian.

For every SOC layer kind, in training and evaluation mode, at init and after
100 Adam steps (lr 0.1) that push the layer to expand: the largest singular
value of the layer's explicit Jacobian, in float64, never exceeds the bound
the layer reports, that bound is within 1 + 1e-5 of 1 with the evaluation
terms, and orthogonal kinds have every singular value >= 1 - 1e-5.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cll_jax import lipschitz
from cll_jax import models
from cll_jax.layers import soc
from cll_jax.layers import base

# (name, spec, input shape, orthogonal in evaluation mode)
CASES = [
    ('dense', soc.SOCDenseSpec(6), (6,), True),
    ('dense_wider', soc.SOCDenseSpec(8), (5,), True),
    ('dense_narrower', soc.SOCDenseSpec(4), (7,), False),
    ('conv3', soc.SOCConvSpec(4, 3), (5, 5, 4), True),
    ('conv5', soc.SOCConvSpec(2, 5), (6, 5, 2), True),
    ('conv_wider', soc.SOCConvSpec(5, 3), (4, 4, 3), True),
    ('conv_narrower', soc.SOCConvSpec(2, 3), (5, 4, 4), False),
    ('down', soc.SOCConvSpec(8, 3, 2), (4, 6, 2), True),
    ('down_odd', soc.SOCConvSpec(12, 3, 2), (5, 3, 2), True),
    ('down_narrower', soc.SOCConvSpec(4, 5, 2), (6, 6, 2), False),
]


@functools.lru_cache(maxsize=None)
def _jacobian_fn(spec, shape, training):
  """Jitted (variables, x) -> (flat Jacobian, state the forward used)."""
  module = spec.module('layer', num_power_iterations=1)

  def f(v, x):
    if training:
      y, state = module.apply(v, x[None], mutable=[base.POWER_ITERATION])
      return y[0][0].ravel(), state
    return module.apply(v, x[None])[0][0].ravel(), v

  return jax.jit(lambda v, x: (jax.jacfwd(lambda z: f(v, z)[0])(x),
                               f(v, x)[1]))


@functools.lru_cache(maxsize=None)
def _bound_fn(spec, shape, training):
  return jax.jit(lambda v: spec.proven_bound(v, shape, training))


def _jacobian(spec, variables, shape, training):
  """(outputs, inputs) float64 Jacobian of the layer, and its new state."""
  with jax.enable_x64(True):
    v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float64)
    jac, state = _jacobian_fn(spec, shape, training)(v64, x)
    return np.asarray(jac, np.float64).reshape(-1, math.prod(shape)), state


def _check(spec, variables, shape, orthogonal):
  for training in (True, False):
    jac, used = _jacobian(spec, variables, shape, training)
    bound_variables = {'params': variables['params'],
                       base.POWER_ITERATION: jax.tree.map(
                           lambda a: jnp.asarray(a, jnp.float32),
                           used[base.POWER_ITERATION])}
    bound = float(_bound_fn(spec, shape, training)(bound_variables))
    singular = np.linalg.svd(jac, compute_uv=False)
    assert singular[0] <= bound, (training, singular[0], bound)
    if not training:
      assert bound <= 1 + 1e-5, bound
      if orthogonal:
        assert singular[-1] >= 1 - 1e-5, singular[-1]
        assert len(singular) == math.prod(shape)


def _expanding_steps(spec, variables, shape, steps=100):
  """Adam (lr 0.1) on -||f(x1) - f(x2)||^2 / ||x1 - x2||^2: push expansion."""
  module = spec.module('layer', num_power_iterations=1)
  rng = np.random.default_rng(1)
  x1, x2 = (jnp.asarray(rng.normal(size=(16, *shape)), jnp.float32)
            for _ in range(2))
  tx = optax.adam(0.1)

  def loss(params, state):
    (y1, _), new = module.apply({'params': params, **state}, x1,
                                mutable=[base.POWER_ITERATION])
    (y2, _), _ = module.apply({'params': params, **state}, x2,
                              mutable=[base.POWER_ITERATION])
    ratio = (jnp.sum((y1 - y2) ** 2, axis=tuple(range(1, y1.ndim)))
             / jnp.sum((x1 - x2) ** 2, axis=tuple(range(1, x1.ndim))))
    return -jnp.mean(ratio), new

  @jax.jit
  def step(params, state, opt):
    (_, new), grads = jax.value_and_grad(loss, has_aux=True)(params, state)
    updates, opt = tx.update(grads, opt)
    return optax.apply_updates(params, updates), new, opt

  params = variables['params']
  state = {base.POWER_ITERATION: variables[base.POWER_ITERATION]}
  opt = tx.init(params)
  for _ in range(steps):
    params, state, opt = step(params, state, opt)
  return {'params': params, **state}


def _converged(spec, variables, shape):
  ops = spec.power_iteration_operators(variables['params'], shape)
  return {'params': variables['params'], base.POWER_ITERATION: {
      name: lipschitz.converge_power_iteration(
          op, variables[base.POWER_ITERATION][name], tol=1e-7,
          max_iterations=2000)[0] for name, op in ops.items()}}


@pytest.mark.parametrize('name, spec, shape, orthogonal', CASES,
                         ids=[c[0] for c in CASES])
def test_proven_bound_dominates_the_jacobian(name, spec, shape, orthogonal):
  del name
  module = spec.module('layer', num_power_iterations=1)
  variables = jax.jit(module.init)(jax.random.PRNGKey(3),
                                   jnp.zeros((1, *shape)))
  _check(spec, variables, shape, orthogonal)
  trained = _expanding_steps(spec, variables, shape)
  _check(spec, trained, shape, orthogonal)
  # Evaluation after the loop's end-of-epoch convergence.
  _check(spec, _converged(spec, trained, shape), shape, orthogonal)


def test_series_bound_against_the_exact_series_peak():
  for terms in (1, 2, 6, 12, 15):
    for a in (0.0, 0.3, 1.0, 2.0, 3.0, 7.0, 20.0):
      bound = float(soc.series_norm_bound(a, terms))
      # The exact peak on a fine grid, in float64 (an estimate from below).
      peak = soc.series_peak(a, terms, points=20001)
      assert bound >= peak, (terms, a, bound, peak)
      if a <= 1 and terms >= 6:  # tight where the layers use it
        assert bound <= peak * (1 + 2e-3) + 1e-6, (terms, a, bound, peak)
  # The docstring's numbers: T = 15, a = 1 -> remainder 8e-13.
  assert float(soc.series_norm_bound(1.0, 15)) < 1 + 1e-6


def test_truncated_series_above_one_is_reported_above_one():
  # A skew matrix with ||A|| = 2 and 4 terms: p_4(2i) has modulus
  # |1 - 2 + i(2 - 8/6)| = 1.20..., the layer expands and says so.
  a = np.zeros((2, 2))
  a[0, 1], a[1, 0] = 2.0, -2.0
  series = sum(np.linalg.matrix_power(a, k) / math.factorial(k)
               for k in range(4))
  exact = np.linalg.norm(series, 2)
  assert exact > 1.2
  assert float(soc.series_norm_bound(2.0, 4)) >= exact


def test_skew_conv_is_skew_adjoint():
  kernel = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 2, 2))
  op = soc._skew_conv_operator(kernel, (4, 5, 2))  # pylint: disable=protected-access
  matrix = np.asarray(op.dense_matrix(), np.float64)
  np.testing.assert_allclose(matrix, -matrix.T, atol=1e-6)


def test_lipconv_blocks_follow_the_soc_paper():
  specs = models.lipconv(20)
  assert len(specs) == 20
  strided = [i for i, s in enumerate(specs) if s.stride == 2]
  assert strided == [3, 7, 11, 15, 19]
  assert [specs[i].features for i in strided] == [64, 128, 256, 512, 1024]
  assert specs[-1].kernel_size == 1 and specs[0].features == 32
  model = models.create_model('lipconv20', 10)
  shapes = models.layer_input_shapes(model, (32, 32, 3))
  assert shapes[-1] == (1024,)
  with pytest.raises(ValueError, match='multiple of 5'):
    models.lipconv(12)
