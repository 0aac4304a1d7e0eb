"""The layer contract: activations, heads, precision, and network certificates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cll_jax import layers
from cll_jax import models
from cll_jax import sound_bounds


def test_householder_starts_as_minmax_and_stays_orthogonal():
  act = layers.Householder()
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 6))
  params = act.init(jax.random.PRNGKey(1), x)
  # MinMax, up to the rounding of cos/sin(-pi/4) in the reflection.
  np.testing.assert_allclose(act.apply(params, x), layers.minmax(x),
                             atol=1e-6)
  # Any angles: a piecewise orthogonal map (Jacobian orthogonal a.e.).
  rng = np.random.default_rng(0)
  angles = {'params': {'angle': jnp.asarray(rng.uniform(-3, 3, 3),
                                            jnp.float32)}}
  for point in np.asarray(x[:8]):
    jac = np.asarray(jax.jacfwd(lambda z: act.apply(angles, z))(point),
                     np.float64)
    np.testing.assert_allclose(jac @ jac.T, np.eye(6), atol=1e-5)
  # Continuous across the reflecting hyperplane: 1-Lipschitz on pairs of
  # points on either side.
  a, b = (jnp.asarray(rng.normal(size=(500, 6)), jnp.float32)
          for _ in range(2))
  ratio = (jnp.linalg.norm(act.apply(angles, a) - act.apply(angles, b),
                           axis=-1) / jnp.linalg.norm(a - b, axis=-1))
  assert float(ratio.max()) <= 1 + 1e-5


def test_lln_head_pairwise_is_exact_and_not_one_lipschitz():
  head = layers.HEADS['lln']
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(5, 4)).astype(np.float32)
  unit = kernel / np.linalg.norm(kernel, axis=0)
  pairwise = np.asarray(head.pairwise({'kernel': jnp.asarray(kernel)}))
  for i in range(4):
    for j in range(4):
      assert pairwise[i, j] == pytest.approx(
          np.linalg.norm(unit[:, i] - unit[:, j]), rel=1e-6, abs=1e-7)
  # Equal class vectors: every row has norm 1, the head has norm sqrt(N).
  same = np.tile(kernel[:, :1], (1, 4))
  op = head.operator({'kernel': jnp.asarray(same)})
  assert float(sound_bounds.operator_norm_upper_bound(op)) == pytest.approx(
      2.0, rel=1e-3)


# A small SOC body (stride 1, two invertible downsamplings, a 1x1 conv)
# with Householder activations and an LLN head, on 4x4 RGB inputs.
SOC_BODY = (layers.SOCConvSpec(4, 3, 1), layers.SOCConvSpec(8, 3, 2),
            layers.SOCConvSpec(8, 1, 2))
SHAPE = (4, 4, 3)


@pytest.fixture(scope='module')
def soc_network():
  model = models.LipschitzNetwork(SOC_BODY, 4, activation='householder',
                                  head='lln', input_std=(0.5, 0.25, 0.5))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0),
                                  jnp.zeros((1, *SHAPE)))
  state = jax.jit(lambda v: models.converge_power_iteration(
      model, v, SHAPE))(variables)
  return model, {'params': variables['params'], 'power_iteration': state}


def test_network_certificate_is_the_product_of_layer_bounds(soc_network):
  model, variables = soc_network
  bounds = jax.jit(lambda v: models.certified_bounds(model, v, SHAPE))(
      variables)
  layer_bounds = np.asarray(bounds['layer_norms'][:-1], np.float64)
  # Every SOC layer is proven within 1 + 1e-5 of 1 after convergence.
  assert np.all(layer_bounds >= 1) and np.all(layer_bounds <= 1 + 1e-5)
  head = np.asarray(layers.HEADS['lln'].pairwise(variables['params']['head']),
                    np.float64)
  expected = (head * 4.0 * np.prod(layer_bounds)
              * (1 + sound_bounds.DEFAULT_RELATIVE_FLOAT_ALLOWANCE))
  np.testing.assert_allclose(np.asarray(bounds['pairwise']), expected,
                             rtol=1e-6)


def test_network_certificate_dominates_jacobians(soc_network):
  model, variables = soc_network
  bounds = jax.jit(lambda v: models.certified_bounds(model, v, SHAPE))(
      variables)
  points = jax.random.uniform(jax.random.PRNGKey(1), (16, *SHAPE))

  def logits(x):
    return model.apply(variables, x[None]).logits[0]

  jac = np.asarray(jax.jit(jax.vmap(jax.jacfwd(logits)))(points),
                   np.float64).reshape(16, 4, -1)
  pairwise = np.asarray(bounds['pairwise'])
  for i in range(4):
    for j in range(i + 1, 4):
      grad = np.linalg.norm(jac[:, i] - jac[:, j], axis=-1)
      assert np.all(grad <= pairwise[i, j])
      # Tight: an orthogonal body, the only slack is the input scale and
      # the activations' pattern.
      assert grad.max() >= 0.05 * pairwise[i, j]


def _precisions(jaxpr):
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ('dot_general', 'conv_general_dilated'):
      found.append(eqn.params['precision'])
    for sub in _subjaxprs(eqn.params.values()):
      found += _precisions(sub)
  return found


def _subjaxprs(values):
  for v in values:
    if hasattr(v, 'eqns'):
      yield v
    elif hasattr(getattr(v, 'jaxpr', None), 'eqns'):  # a ClosedJaxpr
      yield v.jaxpr
    elif isinstance(v, (tuple, list)):
      yield from _subjaxprs(v)


def test_evaluation_runs_at_highest_precision():
  # GPU/TPU defaults (TF32/bf16) can break a 1-Lipschitz guarantee; what is
  # certified (the frozen, evaluation-mode network) multiplies at HIGHEST.
  for model, shape in (
      (models.LipschitzNetwork(SOC_BODY, 4), SHAPE),
      (models.create_model('tiny_cnn', 4), (8, 8, 3)),
      (models.create_model('soc_mlp3', 4), (2,))):
    variables = jax.jit(model.init)(jax.random.PRNGKey(0),
                                    jnp.zeros((1, *shape)))
    x = jnp.zeros((2, *shape))
    evaluation = _precisions(jax.make_jaxpr(
        lambda v: model.apply(v, x))(variables).jaxpr)
    assert evaluation and all(
        p == (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
        for p in evaluation), evaluation
    training = _precisions(jax.make_jaxpr(lambda v: model.apply(
        v, x, mutable=[layers.POWER_ITERATION]))(variables).jaxpr)
    assert any(p is None for p in training)


def test_every_layer_family_states_its_bound_kind():
  for name, specs in models.ARCHITECTURES.items():
    for spec in specs:
      assert spec.bound_kind in (layers.PROVEN, layers.ESTIMATED), name
  assert layers.Conv(8, 3).bound_kind == layers.ESTIMATED
  assert layers.SOCConvSpec(8).bound_kind == layers.PROVEN
  assert layers.SOCDenseSpec(8).bound_kind == layers.PROVEN


def test_lipschitz_of_a_layer_chain_equals_network_operators_product():
  # Unconstrained networks keep their LinearOperators (LipLT, benchmarks).
  model = models.create_model('tiny_cnn', 10)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0),
                                  jnp.zeros((1, 8, 8, 3)))
  ops = models.network_operators(model, variables['params'], (8, 8, 3))
  assert [op.input_shape for op in ops] == [
      tuple(s) for s in models.layer_input_shapes(model, (8, 8, 3))]
  with pytest.raises(ValueError, match='constrained'):
    soc_model = models.LipschitzNetwork(SOC_BODY, 4)
    models.network_operators(soc_model, None, SHAPE)
