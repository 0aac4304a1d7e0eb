"""CPL layers: the certified bound against the SVD of the explicit Jacobian.

For every CPL kind (dense; conv 3x3 and 5x5, hidden width above and below
the channels, both norm estimates), in training and evaluation mode, at
init and after 100 Adam steps (lr 0.1) that push the layer to expand: the
largest singular value of the layer's float64 Jacobian at a few points
never exceeds `certified_bound`, and once the power iteration is converged
(h sound) the bound is within 1 + 1e-5 of 1. A poor norm estimate makes the
layer expansive and the certificate says so. The rounding bound of the
forward pass dominates the float32 - float64 difference.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cll_jax import lipschitz
from cll_jax.layers import _residual
from cll_jax.layers import base
from cll_jax.layers import cpl

CASES = [
    ('dense', cpl.CPLDenseSpec(8), (6,)),
    ('conv3', cpl.CPLConvSpec(6, 3), (5, 5, 4)),
    ('conv5_padded_narrow', cpl.CPLConvSpec(2, 5, 'padded'), (6, 4, 3)),
]
# The float64 Jacobian and its SVD carry their own rounding (~1e-15): a
# layer of norm exactly 1 (hidden units off, or directions outside the
# range of W^T) shows singular values of 1 + a few ulps.
JACOBIAN_RTOL = 1e-12
POINTS = 3


def _module(spec):
  return spec.module('layer', num_power_iterations=1)


@functools.lru_cache(maxsize=None)
def _advance_fn(spec, shape):
  """One training call in float32: the power-iteration state it leaves."""
  module = _module(spec)

  def advance(v, x):
    _, state = module.apply(v, x, mutable=[base.POWER_ITERATION])
    return {'params': v['params'], **state}

  return jax.jit(advance)


@functools.lru_cache(maxsize=None)
def _jacobian_fn(spec, shape):
  """Jitted (variables, xs) -> float64 Jacobians of the eval layer at xs."""
  module = _module(spec)

  def jac(v, xs):
    return jax.vmap(jax.jacfwd(
        lambda z: module.apply(v, z[None])[0][0].ravel()))(xs)

  return jax.jit(jac)


@functools.lru_cache(maxsize=None)
def _bound_fn(spec, shape):
  return jax.jit(lambda v: spec.certified_bound(v, shape))


def _bound(spec, variables, shape, x64=True):
  with jax.enable_x64(x64):
    return float(_bound_fn(spec, shape)(variables))


def _jacobian_norm(spec, variables, shape, scale=1.0):
  """Largest singular value of the float64 Jacobian at random points."""
  with jax.enable_x64(True):
    v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    xs = jnp.asarray(
        np.random.default_rng(0).normal(size=(POINTS, *shape)) * scale,
        jnp.float64)
    jacs = np.asarray(_jacobian_fn(spec, shape)(v64, xs), np.float64)
  jacs = jacs.reshape(POINTS, -1, math.prod(shape))
  return max(np.linalg.svd(j, compute_uv=False)[0] for j in jacs)


def _check(spec, variables, shape, *, sound):
  """Jacobian <= bound, for the vector as stored (evaluation) and after one
  more training call (training: h from the advanced vector); bound <=
  1 + 1e-5 when h is sound."""
  advanced = _advance_fn(spec, shape)(
      variables, jnp.zeros((1, *shape), jnp.float32))
  results = []
  for v in (advanced, variables):
    sigma, bound = _jacobian_norm(spec, v, shape), _bound(spec, v, shape)
    assert sigma <= bound * (1 + JACOBIAN_RTOL), (sigma, bound)
    results.append((sigma, bound))
  if sound:
    assert results[1][1] <= 1 + 1e-5, results
  return results


@functools.lru_cache(maxsize=None)
def _step_fn(spec, shape):
  module = _module(spec)
  rng = np.random.default_rng(1)
  x1, x2 = (jnp.asarray(rng.normal(size=(16, *shape)), jnp.float32)
            for _ in range(2))
  tx = optax.adam(0.1)

  def loss(params, state):
    (y1, _), new = module.apply({'params': params, **state}, x1,
                                mutable=[base.POWER_ITERATION])
    (y2, _), _ = module.apply({'params': params, **state}, x2,
                              mutable=[base.POWER_ITERATION])
    axes = tuple(range(1, y1.ndim))
    ratio = (jnp.sum((y1 - y2) ** 2, axis=axes)
             / jnp.sum((x1 - x2) ** 2, axis=axes))
    return -jnp.mean(ratio), new

  def steps(params, state, opt):
    def body(_, carry):
      params, state, opt = carry
      (_, new), grads = jax.value_and_grad(loss, has_aux=True)(params, state)
      updates, opt = tx.update(grads, opt)
      return optax.apply_updates(params, updates), new, opt
    return jax.lax.fori_loop(0, 100, body, (params, state, opt))

  return jax.jit(steps), tx


def _expanding_steps(spec, variables, shape):
  """100 Adam steps (lr 0.1) on -||f(x1) - f(x2)||^2 / ||x1 - x2||^2."""
  steps, tx = _step_fn(spec, shape)
  params = variables['params']
  state = {base.POWER_ITERATION: variables[base.POWER_ITERATION]}
  params, state, _ = steps(params, state, tx.init(params))
  return {'params': params, **state}


def _explicit_matrix(op) -> np.ndarray:
  """The `(outputs, inputs)` float64 matrix of a power-iteration operator."""
  size = math.prod(op.input_shape)
  with jax.enable_x64(True):
    kernel = jnp.asarray(op.kernel, jnp.float64)
    basis = jnp.eye(size, dtype=jnp.float64).reshape(size, *op.input_shape)
    return np.asarray(op.replace(kernel=kernel)(basis)).reshape(size, -1).T


def _right_singular_vector(op, median: bool = False) -> np.ndarray:
  """The unit right singular vector of the largest (or the median nonzero)
  singular value."""
  matrix = _explicit_matrix(op)
  _, _, vt = np.linalg.svd(matrix)
  return vt[min(matrix.shape) // 2 if median else 0].reshape(op.input_shape)


def _converged(spec, variables, shape):
  """The power-iteration vectors set to the top right singular vectors (of
  the explicit float64 matrices): what a converged iteration approaches,
  without the float32 iteration's stall (its tolerance test stops ~1e-5
  below the norm when the top two singular values are 0.08% apart, as on
  a 5x5x2 padded init, and CPL's bound shows that four times)."""
  ops = spec.power_iteration_operators(variables['params'], shape)
  return {'params': variables['params'], base.POWER_ITERATION: {
      name: jnp.asarray(_right_singular_vector(op), jnp.float32)
      for name, op in ops.items()}}


@functools.lru_cache(maxsize=None)
def _initial(spec, shape):
  return jax.jit(_module(spec).init)(jax.random.PRNGKey(3),
                                     jnp.zeros((1, *shape)))


@functools.lru_cache(maxsize=None)
def _trained(spec, shape):
  return _expanding_steps(spec, _initial(spec, shape), shape)


@pytest.mark.parametrize('name, spec, shape', CASES, ids=[c[0] for c in CASES])
def test_certified_bound_dominates_the_jacobian(name, spec, shape):
  initial = _initial(spec, shape)
  # At init the vector is random: h is too large and the bound says so.
  report = {'init': _check(spec, initial, shape, sound=False)[1]}
  report['init, converged'] = _check(spec, _converged(spec, initial, shape),
                                     shape, sound=True)[1]
  trained = _trained(spec, shape)
  report['trained'] = _check(spec, trained, shape, sound=False)[1]
  if name == 'dense':
    # Sound in float32 too (looser: float32 Gram iteration and roundings).
    assert report['trained'][0] <= _bound(spec, trained, shape, x64=False) * (
        1 + JACOBIAN_RTOL)
  report['trained, converged'] = _check(
      spec, _converged(spec, trained, shape), shape, sound=True)[1]
  print(f'{name}: ' + '; '.join(f'{k}: jacobian {j:.7f} bound {b:.7f}'
                               for k, (j, b) in report.items()))


def _set(variables, path, value):
  params = jax.tree.map(lambda a: a, variables)
  node = params
  for key in path[:-1]:
    node = node[key]
  node[path[-1]] = jnp.asarray(value, jnp.float32)
  return params


@pytest.mark.parametrize('name, spec, shape', [CASES[0], CASES[1], CASES[2]],
                         ids=['dense', 'conv_circular', 'conv_padded'])
def test_too_small_norm_estimate_is_reported_above_one(name, spec, shape):
  """h from an underestimate makes the layer expand; the bound shows it."""
  del name
  variables = _converged(spec, _initial(spec, shape), shape)
  op = spec.power_iteration_operators(variables['params'], shape)['u']
  # All hidden units on (a large bias, small inputs: relu' = 1), so the
  # Jacobian is I - h W^T W, of norm h ||W||^2 - 1 when that exceeds 1.
  variables = _set(variables, ('params', 'bias'),
                   np.full(variables['params']['bias'].shape, 50.0))
  u = np.asarray(variables[base.POWER_ITERATION]['u'], np.float64)
  rng = np.random.default_rng(0)
  # The circular estimate exceeds the padded conv's norm by a few percent
  # at these sizes, so only a large underestimate of it makes h too large.
  small = (() if getattr(spec, 'estimate', None) == 'circular'
           else (1e-1, 1.0))
  for perturbation in small + ('poor',):
    if perturbation == 'poor':  # the median singular direction
      v = _right_singular_vector(op, median=True)
    else:  # the converged vector, perturbed: the estimate a little low
      v = u + perturbation * rng.normal(size=u.shape) / math.sqrt(u.size)
      v /= np.linalg.norm(v)
    bad = _set(variables, (base.POWER_ITERATION, 'u'), v)
    sigma = float(jnp.linalg.norm(op(jnp.asarray(v, jnp.float32))))
    bound = _bound(spec, bad, shape)
    jac_norm = _jacobian_norm(spec, bad, shape, scale=1e-3)
    assert jac_norm > 1 + 1e-4, (perturbation, sigma, jac_norm)
    assert bound >= jac_norm * (1 - JACOBIAN_RTOL), (jac_norm, bound)
    # Tight here: the all-on Jacobian attains h ||W||^2 - 1 up to the
    # power-iteration slack of the bound's norm (circular > padded).
    assert bound <= jac_norm * 1.1, (jac_norm, bound)


def test_adjoint_and_estimate_operators():
  kernel = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 2, 3))
  inner, outer = _residual.conv_operators(kernel, (4, 5, 2), base.HIGHEST)
  np.testing.assert_allclose(_explicit_matrix(outer),
                             _explicit_matrix(inner).T, atol=1e-6)
  # The circular conv on the padded grid: its transpose is the adjoint,
  # and its norm dominates the zero-padded conv's.
  circ = cpl.CircularConv(kernel, (6, 7, 2), base.HIGHEST)
  mat = _explicit_matrix(circ)
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 7, 2))
  np.testing.assert_allclose(np.asarray(circ.gram(x)).ravel(),
                             mat.T @ (mat @ np.asarray(x).ravel()),
                             rtol=1e-4, atol=1e-4)
  assert (np.linalg.norm(mat, 2) + 1e-6
          >= np.linalg.norm(_explicit_matrix(inner), 2))
  with pytest.raises(ValueError, match='odd kernel size'):
    cpl.CPLConvSpec(4, 2).module('l', 1).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 2)))
  with pytest.raises(ValueError, match='estimate'):
    cpl.CPLConvSpec(4, 3, 'fft').module('l', 1).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 2)))
  assert cpl.CPLConvSpec(4).activated is False
  assert cpl.CPLDenseSpec(4).flattens and not cpl.CPLConvSpec(4).flattens
  assert cpl.CPLConvSpec(4).output_shape((5, 6, 3)) == (5, 6, 3)


@functools.lru_cache(maxsize=None)
def _forward(spec):
  module = _module(spec)
  return jax.jit(lambda v, x: module.apply(v, x)[0])


@functools.lru_cache(maxsize=None)
def _rounding_fn(spec, shape):
  def step(v, e0):
    dtype = jnp.float64
    zero = jnp.zeros((), dtype)
    forms = ((e0, jnp.ones((), dtype)), (e0, zero))
    return spec.rounding_step(v, shape, forms, None, dtype=dtype,
                              forward_dtype=jnp.float32)
  return jax.jit(step)


@pytest.mark.parametrize('name, spec, shape', [CASES[0], CASES[1], CASES[2]],
                         ids=['dense', 'conv3', 'conv5_padded_narrow'])
def test_rounding_step_dominates_float32_error(name, spec, shape):
  variables = _converged(spec, _trained(spec, shape), shape)
  rng = np.random.default_rng(2)
  scales = np.array([1e-2, 1.0, 30.0])[:, None] * np.ones((1, 4))
  x = rng.normal(size=(scales.size, *shape)) * scales.reshape(
      -1, *([1] * len(shape)))
  ratios = []
  for e0 in (0.0, 1e-3):
    noise = rng.normal(size=x.shape)
    noise *= e0 / np.linalg.norm(noise.reshape(len(x), -1), axis=1).reshape(
        -1, *([1] * len(shape)))
    x_hat = jnp.asarray(x + noise, jnp.float32)
    y32 = np.asarray(_forward(spec)(variables, x_hat), np.float64)
    # The exact input: x rounded to float32; x_hat - x32 is the input's
    # error, of norm E0.
    x32 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    axes = tuple(range(1, y32.ndim))
    e_in = float(np.max(np.sqrt(np.sum(
        (np.asarray(x_hat, np.float64) - x32) ** 2, axis=axes))))
    with jax.enable_x64(True):
      # The exact layer (h = 2 / ||W u||^2 from the stored u) in float64.
      v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
      y64 = np.asarray(_forward(spec)(v64, jnp.asarray(x32)))
      (_, _), (ep, eq) = _rounding_fn(spec, shape)(
          variables, jnp.asarray(e_in * (1 + 1e-9), jnp.float64))
    observed = np.sqrt(np.sum((y32 - y64) ** 2, axis=axes))
    norms = np.sqrt(np.sum(x32 ** 2, axis=axes))
    bound = float(ep) + float(eq) * norms
    assert np.all(observed <= bound), (observed, bound)
    ratios.append(float(np.min(bound / np.maximum(observed, 1e-300))))
  print(f'{name}: rounding bound / observed >= {ratios}')
  assert all(r >= 1 for r in ratios), ratios


def test_sigma_bounds_bracket_the_float64_norm():
  """sigma_lo <= ||W u|| (exact, here float64) <= a_up, tight."""
  for _, spec, shape in CASES[:2]:
    variables = _trained(spec, shape)
    op = spec.power_iteration_operators(variables['params'], shape)['u']
    u = variables[base.POWER_ITERATION]['u']
    exact = np.linalg.norm(_explicit_matrix(op) @ np.asarray(
        u, np.float64).ravel())
    for x64 in (False, True):
      with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        bounds = cpl._sigma_bounds  # pylint: disable=protected-access
        lo, a_up, _ = jax.jit(lambda o, v, d=dtype: bounds(o, v, d))(op, u)
      slack = 1e-12 if x64 else 1e-4
      assert float(lo) <= exact <= float(lo) * (1 + slack), (lo, exact)
      assert float(a_up) >= exact
