"""AOL layers: certified bounds against explicit Jacobians, and rounding.

For every AOL kind (dense; 'same' zero-padded convs with kernels 1, 3, 5,
channels changing both ways, inputs down to 1x1, below the kernel's
(2k-1) x (2k-1) autocorrelation), at init and after 100 Adam steps (lr 0.1)
that push the layer to expand: the largest singular value of the layer's
explicit float64 Jacobian (training and evaluation mode) stays below the
certified bound, which is within 1 + 1e-5 of 1. The float32 evaluation
layer (its computed D) is checked the same way, its D against the exact
row sums, and its forward rounding against `rounding_step`.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cll_jax.layers import aol
from cll_jax.layers import base

CASES = [
    ('dense', aol.AOLDenseSpec(6), (6,)),
    ('dense_wider', aol.AOLDenseSpec(8), (5,)),
    ('dense_narrower', aol.AOLDenseSpec(3), (7,)),
    ('conv3', aol.AOLConvSpec(4, 3), (5, 5, 4)),
    ('conv3_wider', aol.AOLConvSpec(3, 3), (6, 4, 2)),
    ('conv3_narrower', aol.AOLConvSpec(2, 3), (8, 8, 3)),
    ('conv1', aol.AOLConvSpec(5, 1), (4, 4, 3)),
    ('conv5', aol.AOLConvSpec(2, 5), (6, 4, 2)),
    ('conv3_tiny', aol.AOLConvSpec(3, 3), (2, 2, 3)),
    ('conv5_1x1', aol.AOLConvSpec(2, 5), (1, 1, 2)),
]


@functools.lru_cache(maxsize=None)
def _jacobian_fn(spec, training):
  module = spec.module('layer', num_power_iterations=1)

  def f(v, x):
    if training:
      (y, _), _ = module.apply(v, x[None], mutable=[base.POWER_ITERATION])
    else:
      y, _ = module.apply(v, x[None])
    return y[0].ravel()

  return jax.jit(lambda v, x: jax.jacfwd(lambda z: f(v, z))(x))


def _jacobian(spec, variables, shape, training):
  with jax.enable_x64(True):
    v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float64)
    jac = _jacobian_fn(spec, training)(v64, x)
    return np.asarray(jac, np.float64).reshape(-1, math.prod(shape))


def _check(spec, variables, shape):
  bound = float(spec.certified_bound(variables, shape))
  assert 1 <= bound <= 1 + 1e-5
  top = {}
  for training in (False, True):
    singular = np.linalg.svd(_jacobian(spec, variables, shape, training),
                             compute_uv=False)
    assert singular[0] <= bound, (training, singular[0], bound)
    top[training] = singular
  return top


@functools.lru_cache(maxsize=None)
def _step_fn(spec, shape):
  module = spec.module('layer', num_power_iterations=1)
  tx = optax.adam(0.1)
  rng = np.random.default_rng(1)
  x1, x2 = (jnp.asarray(rng.normal(size=(16, *shape)), jnp.float32)
            for _ in range(2))

  def loss(params):
    # Training mode, as a training step runs it; both batches in one call.
    (y, _), _ = module.apply({'params': params}, jnp.concatenate([x1, x2]),
                             mutable=[base.POWER_ITERATION])
    y1, y2 = y[:16], y[16:]
    axes = tuple(range(1, y.ndim))
    return -jnp.mean(jnp.sum((y1 - y2) ** 2, axis=axes)
                     / jnp.sum((x1 - x2) ** 2, axis=axes))

  def steps(params, opt):
    def body(carry, _):
      params, opt = carry
      updates, opt = tx.update(jax.grad(loss)(params), opt)
      return (optax.apply_updates(params, updates), opt), None
    return jax.lax.scan(body, (params, opt), None, length=100)[0]

  return tx, jax.jit(steps)


@pytest.mark.parametrize('name, spec, shape', CASES,
                         ids=[c[0] for c in CASES])
def test_certified_bound_dominates_the_jacobian(name, spec, shape):
  module = spec.module('layer', num_power_iterations=1)
  variables = jax.jit(module.init)(jax.random.PRNGKey(3),
                                   jnp.zeros((1, *shape)))
  top = _check(spec, variables, shape)
  # AOL starts orthogonal (paper's inits): an isometry where the layer
  # keeps or widens the channels (the 1x1 case sees one central tap only).
  c_in = shape[-1]
  if spec.features >= c_in:
    assert top[False][-1] >= 1 - 1e-6, (name, top[False][-1])
    assert len(top[False]) == math.prod(shape)
  tx, steps = _step_fn(spec, shape)
  params, _ = steps(variables['params'], tx.init(variables['params']))
  trained = _check(spec, {'params': params}, shape)
  print(f'AOL {name}: sigma_max {trained[False][0]:.6f} after the '
        'expanding steps')


def _exact_row_sums(p):
  """sum_{s, j} |K[s, i, j]| in float64 from the explicit autocorrelation."""
  p = np.asarray(p, np.float64)
  k = p.shape[0]
  padded = np.pad(p, ((k - 1, k - 1), (k - 1, k - 1), (0, 0), (0, 0)))
  total = np.zeros(p.shape[2])
  for s1 in range(2 * k - 1):
    for s2 in range(2 * k - 1):
      window = padded[s1:s1 + k, s2:s2 + k]
      total += np.abs(np.einsum('abio,abjo->ij', p, window)).sum(axis=1)
  return total


def test_float32_scales_respect_the_exact_row_sums():
  # The float32 eval D satisfies d_i^2 r_i <= 1 with the exact r_i (float64
  # from float32 weights: products exact, sums within ~1e-13), for
  # well-scaled, near-orthogonal and badly scaled kernels; the training D is
  # the paper's, and the allowance moves D by little.
  rng = np.random.default_rng(5)
  base_kernel = rng.normal(size=(3, 3, 6, 5))
  ortho = aol.orthogonal_center(jax.random.PRNGKey(0), (3, 3, 6, 8))
  scaled = base_kernel * np.exp(rng.uniform(-6, 6, size=(1, 1, 6, 1)))
  for kernel in (base_kernel, np.asarray(ortho) + 1e-3 * rng.normal(
      size=(3, 3, 6, 8)), scaled):
    p = jnp.asarray(kernel, jnp.float32)
    d_eval = np.asarray(jax.jit(lambda q: aol.conv_scales(q, False))(p),
                        np.float64)
    d_train = np.asarray(jax.jit(lambda q: aol.conv_scales(q, True))(p),
                         np.float64)
    r = _exact_row_sums(p)
    assert np.all(d_eval ** 2 * r <= 1 + 1e-12), d_eval ** 2 * r
    np.testing.assert_allclose(d_train, (r + aol.EPSILON) ** -0.5, rtol=1e-5)
    assert np.all(d_eval >= d_train * (1 - 1e-3))
  p = jnp.asarray(rng.normal(size=(9, 4)), jnp.float32)
  d_eval = np.asarray(jax.jit(lambda q: aol.dense_scales(q, False))(p))
  p64 = np.asarray(p, np.float64)
  r = np.abs(p64 @ p64.T).sum(axis=1)
  assert np.all(d_eval.astype(np.float64) ** 2 * r <= 1 + 1e-12)


def _exact_operator(spec, p, d, shape):
  """The explicit float64 matrix of x -> x (D P) for a computed d."""
  w = np.asarray(p, np.float64)
  if isinstance(spec, aol.AOLDenseSpec):
    return (w * np.asarray(d, np.float64)[:, None]).T
  with jax.enable_x64(True):
    kernel = jnp.asarray(w * np.asarray(d, np.float64)[None, None, :, None])
    return np.asarray(aol._conv_operator(  # pylint: disable=protected-access
        kernel, shape).dense_matrix())


@pytest.mark.parametrize('name, spec, shape', [CASES[2], CASES[3], CASES[8]],
                         ids=['dense_narrower', 'conv3', 'conv3_tiny'])
def test_float32_eval_layer_is_certified(name, spec, shape):
  # The float32 forward pass's own D (not the float64 one of the Jacobian
  # test): its map D P, formed exactly in float64, has norm <= the bound.
  del name
  rng = np.random.default_rng(7)
  size = (math.prod(shape), spec.features) if spec.flattens else (
      spec.kernel_size, spec.kernel_size, shape[-1], spec.features)
  p = jnp.asarray(rng.normal(size=size), jnp.float32)
  scales = aol.dense_scales if spec.flattens else aol.conv_scales
  d = jax.jit(lambda q: scales(q, False))(p)
  top = np.linalg.svd(_exact_operator(spec, p, d, shape), compute_uv=False)[0]
  assert top <= float(spec.certified_bound({'params': {'kernel': p}}, shape))


def _rounding_bound(spec, params, shape, forward_dtype):
  with jax.enable_x64(True):
    forms = ((jnp.zeros((), jnp.float64), jnp.ones((), jnp.float64)),
             (jnp.zeros((), jnp.float64), jnp.zeros((), jnp.float64)))
    (_, _), (ep, eq) = spec.rounding_step(
        {'params': params}, shape, forms,
        spec.certified_bound({'params': params}, shape), dtype=jnp.float64,
        forward_dtype=forward_dtype)
    return float(ep), float(eq)


@pytest.mark.parametrize('name, spec, shape', [CASES[0], CASES[5]],
                         ids=['dense', 'conv3_narrower'])
def test_float32_forward_within_the_rounding_bound(name, spec, shape):
  # ||float32 eval forward - the exact function of its own D|| <= E, E
  # from rounding_step with X = ||x||, E_0 = 0; the float64 reference
  # rounds too (its own bound is added).
  rng = np.random.default_rng(11)
  module = spec.module('layer', num_power_iterations=1)
  variables = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                             jnp.zeros((1, *shape)))
  params = {'kernel': jnp.asarray(rng.normal(
      size=variables['params']['kernel'].shape), jnp.float32),
            'bias': jnp.asarray(rng.normal(size=(spec.features,)),
                                jnp.float32)}
  x = rng.normal(size=(64, *shape)).astype(np.float32)
  x[:16] *= 100.0
  y32 = np.asarray(jax.jit(module.apply)({'params': params}, x)[0],
                   np.float64)
  scales = aol.dense_scales if spec.flattens else aol.conv_scales
  d = jax.jit(lambda q: scales(q, False))(params['kernel'])
  matrix = _exact_operator(spec, params['kernel'], d, shape)
  bias = np.asarray(params['bias'], np.float64)
  exact = (x.reshape(len(x), -1).astype(np.float64) @ matrix.T).reshape(
      y32.shape) + bias
  observed = np.linalg.norm((y32 - exact).reshape(len(x), -1), axis=1)
  norms = np.linalg.norm(x.reshape(len(x), -1).astype(np.float64), axis=1)
  p32, q32 = _rounding_bound(spec, params, shape, jnp.float32)
  p64, q64 = _rounding_bound(spec, params, shape, jnp.float64)
  bound = p32 + q32 * norms + p64 + q64 * norms
  assert np.all(observed <= bound), (observed / bound).max()
  assert np.all(bound < 1e-3 * (norms + 1.0))  # not vacuous
  print(f'AOL {name}: rounding bound / worst observed error = '
        f'{np.min(bound / observed):.1f} (median '
        f'{np.median(bound / observed):.1f})')


def test_specs_follow_the_contract_and_refuse_bad_shapes():
  for spec in (aol.AOLDenseSpec(4), aol.AOLConvSpec(4, 3)):
    assert spec.bound_kind == base.PROVEN and spec.activated
    assert spec.power_iteration_operators({}, (4,)) == {}
  assert aol.AOLDenseSpec(4).flattens and not aol.AOLConvSpec(4).flattens
  assert aol.AOLConvSpec(6, 5).output_shape((7, 3, 2)) == (7, 3, 6)
  with pytest.raises(ValueError, match='odd kernel size'):
    aol.AOLConvSpec(4, 2)
  with pytest.raises(ValueError, match='kernel of shape'):
    aol.AOLConvSpec(4, 3).certified_bound(
        {'params': {'kernel': jnp.zeros((3, 3, 2, 4))}}, (5, 5, 3))
  # A zero row of P: the paper's epsilon keeps D finite, the map stays 0.
  p = jnp.zeros((3, 2)).at[0].set(jnp.asarray([3.0, 4.0]))
  w = aol.dense_weight(p, False)
  assert np.all(np.isfinite(np.asarray(w)))
  np.testing.assert_allclose(np.asarray(w[0]), [0.6, 0.8], rtol=1e-6)
  assert float(jnp.abs(w[1:]).max()) == 0.0
  # The eval forward is at precision HIGHEST everywhere.
  module = aol.AOLConvSpec(4, 3).module('layer', 1)
  variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 2)))
  jaxpr = jax.make_jaxpr(lambda v: module.apply(v, jnp.zeros((2, 4, 4, 2))))(
      variables)
  precisions = _precisions(jaxpr.jaxpr)
  assert precisions and all(
      p == (jax.lax.Precision.HIGHEST,) * 2 for p in precisions), precisions


def _precisions(jaxpr):
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ('dot_general', 'conv_general_dilated'):
      found.append(eqn.params['precision'])
    for value in eqn.params.values():
      inner = getattr(value, 'jaxpr', value)
      if hasattr(inner, 'eqns'):
        found += _precisions(inner)
  return found


def test_rsqrt_accuracy_assumption():
  # The allowance assumes rsqrt within RSQRT_ULPS roundoffs; measured here
  # (float32 against float64, over 24 binades of arguments).
  x = np.exp(np.random.default_rng(9).uniform(-40, 40, 200_000)).astype(
      np.float32)
  got = np.asarray(jax.jit(jax.lax.rsqrt)(jnp.asarray(x)), np.float64)
  exact = 1 / np.sqrt(x.astype(np.float64))
  worst = np.max(np.abs(got - exact) / exact) / 2.0 ** -24
  assert worst <= aol.RSQRT_ULPS, worst
