"""Sandwich layers: certified bounds against explicit Jacobians, and rounding.

For every Sandwich kind (dense; circular convs with kernels 1, 3, 5,
channels changing both ways, stride 2 by space-to-depth, odd sizes), at init
and after 100 Adam steps (lr 0.1) that push the layer to expand: the largest
singular value of the layer's explicit float64 Jacobian (training and
evaluation mode) stays below the certified bound, which is within 1 + 1e-5
of 1. The float32 evaluation layer (its own computed matrices) is checked
the same way, the in-forward bound kappa against the exact norm, the conv
against an explicit circular cross-correlation, the FFT rounding assumption
against float64 FFTs, and the float32 forward pass against `rounding_step`.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cll_jax.layers import base
from cll_jax.layers import orthogonal
from cll_jax.layers import sandwich

CASES = [
    ('dense_wider', sandwich.SandwichDenseSpec(8), (5,)),
    ('dense_narrower', sandwich.SandwichDenseSpec(3), (7,)),
    ('conv3_narrower', sandwich.SandwichConvSpec(2, 3), (5, 5, 4)),
    ('conv3_wider', sandwich.SandwichConvSpec(3, 3), (8, 8, 1)),
    # Stride 2: space-to-depth, then kernel 3 // 2 = 1 (and 5 // 2 = 2 on an
    # odd, zero-padded size).
    ('down_k1', sandwich.SandwichConvSpec(6, 3, 2), (6, 4, 2)),
    ('down_odd_k5', sandwich.SandwichConvSpec(3, 5, 2), (5, 6, 1)),
]


@functools.lru_cache(maxsize=None)
def _jacobians_fn(spec):
  """Jitted (variables, x) -> (eval Jacobian, training Jacobian)."""
  module = spec.module('layer', num_power_iterations=1)

  def evaluation(v, x):
    return module.apply(v, x[None])[0][0].ravel()

  def training(v, x):
    (y, _), _ = module.apply(v, x[None], mutable=[base.POWER_ITERATION])
    return y[0].ravel()

  return jax.jit(lambda v, x: (jax.jacfwd(lambda z: evaluation(v, z))(x),
                               jax.jacfwd(lambda z: training(v, z))(x)))


def _check(spec, variables, shape):
  """The certified bound against both modes' float64 Jacobians."""
  bound = float(spec.certified_bound(variables, shape))
  assert 1 <= bound <= 1 + 1e-5
  top = 0.0
  with jax.enable_x64(True):
    v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    for seed in (0, 1):  # two ReLU patterns
      x = jnp.asarray(np.random.default_rng(seed).normal(size=shape),
                      jnp.float64)
      for jac in _jacobians_fn(spec)(v64, x):
        jac = np.asarray(jac, np.float64).reshape(-1, math.prod(shape))
        singular = np.linalg.svd(jac, compute_uv=False)
        assert singular[0] <= bound, (singular[0], bound)
        top = max(top, singular[0])
  return top


@functools.lru_cache(maxsize=None)
def _variables(spec, shape):
  """(init variables, params after 100 expanding Adam steps), one jit.

  Adam (lr 0.1) on -||f(x1) - f(x2)||^2 / ||x1 - x2||^2 in training mode,
  as a training step runs the layer: pushes it to expand.
  """
  module = spec.module('layer', num_power_iterations=1)
  tx = optax.adam(0.1)
  rng = np.random.default_rng(1)
  x1, x2 = (jnp.asarray(rng.normal(size=(16, *shape)), jnp.float32)
            for _ in range(2))

  def loss(params):
    (y, _), _ = module.apply({'params': params}, jnp.concatenate([x1, x2]),
                             mutable=[base.POWER_ITERATION])
    y1, y2 = y[:16], y[16:]
    axes = tuple(range(1, y.ndim))
    return -jnp.mean(jnp.sum((y1 - y2) ** 2, axis=axes)
                     / jnp.sum((x1 - x2) ** 2, axis=axes))

  @jax.jit
  def run(key):
    variables = module.init(key, jnp.zeros((1, *shape)))

    def body(carry, _):
      params, opt = carry
      updates, opt = tx.update(jax.grad(loss)(params), opt)
      return (optax.apply_updates(params, updates), opt), None

    params = variables['params']
    (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), None,
                                  length=100)
    return variables, params

  return run(jax.random.PRNGKey(3))


def _init(spec, shape):
  return _variables(spec, shape)[0]


@pytest.mark.parametrize('name, spec, shape', CASES,
                         ids=[c[0] for c in CASES])
def test_certified_bound_dominates_the_jacobian(name, spec, shape):
  variables, params = _variables(spec, shape)
  _check(spec, variables, shape)
  # alpha is a real parameter: the optimizer moved it.
  assert float(params['alpha']) != float(variables['params']['alpha'])
  top = _check(spec, {'params': params}, shape)
  print(f'Sandwich {name}: sigma_max {top:.6f} after the expanding steps')


def test_alpha_is_a_parameter_with_the_initial_norm():
  # (That the optimizer moves it is checked with the expanding steps.)
  _, spec, shape = CASES[0]
  v = _init(spec, shape)['params']
  np.testing.assert_allclose(float(v['alpha']),
                             np.linalg.norm(np.asarray(v['kernel'])),
                             rtol=1e-6)
  for _, spec, shape in CASES[2], CASES[4]:  # on the (space-to-depth) grid
    v = _init(spec, shape)['params']
    grid = spec.output_shape(shape)[:2]
    spectrum = np.asarray(sandwich.kernel_spectrum(v['kernel'], grid))
    np.testing.assert_allclose(float(v['alpha']), np.linalg.norm(spectrum),
                               rtol=1e-5)


def test_zero_padding_is_refused():
  for padding in ('zero', 'same', 'SAME'):
    with pytest.raises(ValueError, match='circular only'):
      sandwich.SandwichConvSpec(4, 3, padding=padding)
    module = sandwich.SandwichConv(4, 3, padding=padding)
    with pytest.raises(ValueError, match='no certificate'):
      module.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 2)))
  with pytest.raises(ValueError, match='stride must be 1 or 2'):
    sandwich.SandwichConvSpec(4, 3, stride=3)
  spec = sandwich.SandwichConvSpec(4, 3)
  assert spec.bound_kind == base.PROVEN and not spec.activated
  assert not spec.flattens and sandwich.SandwichDenseSpec(3).flattens
  assert not sandwich.SandwichDenseSpec(3).activated
  assert spec.power_iteration_operators({}, (4, 4, 2)) == {}
  assert sandwich.SandwichConvSpec(4, 3, 2).output_shape((5, 6, 3)) == (
      3, 3, 4)


def test_circular_conv_semantics():
  # The spectrum's transfer matrices are the circular cross-correlation
  # y[i] = sum_a k[a] x[(i + a - s) mod n], s = (k - 1) // 2, also when the
  # kernel is larger than the grid (taps alias).
  rng = np.random.default_rng(2)
  for k, grid in ((3, (5, 4)), (5, (6, 3)), (2, (3, 3)), (3, (1, 2))):
    kernel = rng.normal(size=(k, k, 3, 2))
    x = rng.normal(size=(grid[0], grid[1], 3))
    with jax.enable_x64(True):
      spectrum = sandwich.kernel_spectrum(jnp.asarray(kernel), grid)
      y = np.asarray(jnp.fft.irfft2(jnp.einsum(
          'ijc,ijco->ijo', jnp.fft.rfft2(jnp.asarray(x), axes=(0, 1)),
          spectrum), s=grid, axes=(0, 1)))
    s = (k - 1) // 2
    expected = np.zeros((*grid, 2))
    for i in range(grid[0]):
      for j in range(grid[1]):
        for a in range(k):
          for b in range(k):
            expected[i, j] += x[(i + a - s) % grid[0],
                                (j + b - s) % grid[1]] @ kernel[a, b]
    np.testing.assert_allclose(y, expected, atol=1e-10)


def _exact_factors(factors):
  return sandwich.Factors(*(np.asarray(f).astype(
      np.complex128 if np.iscomplexobj(f) else np.float64) for f in factors))


def test_in_forward_kappa_bounds_the_computed_matrices():
  # kappa >= ||[A^ B^]||^2 of the float32 matrices (exact float64 SVDs per
  # frequency), and close to it; the eval layer's pre * post <= 2 / kappa.
  rng = np.random.default_rng(3)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 7, 4)), jnp.float32)
  for alpha in (1.0, 30.0):
    grid = (6, 4)
    f32 = jax.jit(lambda k, a: sandwich.conv_factors(
        k, a, jnp.zeros(4), grid, False))(kernel, jnp.float32(alpha))
    exact = _exact_factors(f32)
    q = np.concatenate([exact.a_t, exact.b_t], axis=-2)
    norms = np.linalg.svd(q, compute_uv=False)[..., 0] ** 2
    kappa = jax.jit(lambda q: jnp.max(sandwich.norm_squared_bound(q)))(
        jnp.concatenate([f32.a_t, f32.b_t], axis=-2))
    assert float(kappa) >= norms.max()
    assert float(kappa) <= 1 + 1e-4
    assert np.max(exact.pre * exact.post) <= 2 / norms.max()
  with jax.enable_x64(True):

    @jax.jit
    def kappa64(k):
      f64 = sandwich.conv_factors(k, jnp.float64(5.0), jnp.zeros(4), grid,
                                  False)
      return jnp.max(sandwich.norm_squared_bound(
          jnp.concatenate([f64.a_t, f64.b_t], axis=-2)))

    assert float(kappa64(kernel.astype(jnp.float64))) <= 1 + 1e-12


def _exact_operator_matrix(apply, factors, bias, shape):
  """The float64 Jacobian of x -> f(x) with the given (float32) factors."""
  with jax.enable_x64(True):
    exact = sandwich.Factors(*map(jnp.asarray, _exact_factors(factors)))

    def f(z):
      return apply(exact, jnp.asarray(bias, jnp.float64), z[None],
                   base.HIGHEST)[0].ravel()

    x = jnp.asarray(np.random.default_rng(4).normal(size=shape))
    return np.asarray(jax.jacfwd(f)(x)).reshape(-1, math.prod(shape))


def _factors32(spec, params, shape):
  if spec.flattens:
    return jax.jit(lambda p: sandwich.dense_factors(
        p['kernel'], p['alpha'], p['psi'], False))(params)
  grid = spec.output_shape(shape)[:2]
  return jax.jit(lambda p: sandwich.conv_factors(
      p['kernel'], p['alpha'], p['psi'], grid, False))(params)


@pytest.mark.parametrize('name, spec, shape', [CASES[0], CASES[2]],
                         ids=['dense_wider', 'conv3_narrower'])
def test_float32_eval_layer_is_certified(name, spec, shape):
  # The float32 forward pass's own matrices (not the float64 ones of the
  # Jacobian test), with d pushed against its clip range.
  del name
  params = dict(_init(spec, shape)['params'])
  params['psi'] = jnp.asarray(np.random.default_rng(6).choice(
      [-1e4, 0.0, 1e4], size=params['psi'].shape), jnp.float32)
  params['bias'] = jnp.zeros_like(params['bias'])
  factors = _factors32(spec, params, shape)
  assert np.all(np.isfinite(np.asarray(factors.pre)))
  apply = sandwich.dense_apply if spec.flattens else sandwich.conv_apply
  jac = _exact_operator_matrix(apply, factors, params['bias'], shape)
  top = np.linalg.svd(jac, compute_uv=False)[0]
  assert top <= float(spec.certified_bound({'params': params}, shape))


def test_fft_rounding_assumption_against_float64():
  # float32 rfft2 / irfft2 against float64 ones on random data: the
  # assumption's relative bound eta holds with room (ratio reported).
  rng = np.random.default_rng(8)
  ratios = []
  for grid in ((5, 5), (6, 4), (8, 8), (7, 3), (32, 32), (13, 9)):
    eta = sandwich.fft_relative_error(grid, jnp.float32)
    x = rng.normal(size=(64, *grid, 2)) * np.exp(rng.normal(size=(64, 1, 1,
                                                                   1)))
    x32 = jnp.asarray(x, jnp.float32)
    with jax.enable_x64(True):
      x64 = jnp.asarray(np.asarray(x32, np.float64))
      ref = np.asarray(jnp.fft.rfft2(x64, axes=(1, 2)))
      back = np.asarray(jnp.fft.irfft2(jnp.asarray(ref.astype(np.complex64)
                                                   .astype(np.complex128)),
                                       s=grid, axes=(1, 2)))
    got = np.asarray(jax.jit(lambda z: jnp.fft.rfft2(z, axes=(1, 2)))(x32))
    weights = np.ones(ref.shape[2])
    weights[1:(grid[1] + 1) // 2] = 2  # bins standing for w and -w

    def norm(z, weights=weights):
      return np.sqrt(np.sum(np.abs(z) ** 2 * weights[:, None],
                            axis=(1, 2, 3)))

    forward = norm(got - ref) / norm(ref)
    inverse_in = jnp.asarray(ref.astype(np.complex64))
    got_back = np.asarray(jax.jit(lambda z, g=grid: jnp.fft.irfft2(
        z, s=g, axes=(1, 2)))(inverse_in))
    inverse = (np.linalg.norm((got_back - back).reshape(64, -1), axis=1)
               / np.linalg.norm(back.reshape(64, -1), axis=1))
    worst = max(forward.max(), inverse.max())
    assert worst <= eta, (grid, worst, eta)
    ratios.append(eta / worst)
  print(f'FFT assumption: bound / worst observed relative error = '
        f'{min(ratios):.1f} .. {max(ratios):.1f}')
  with pytest.raises(NotImplementedError, match='prime factors'):
    sandwich.fft_relative_error((17, 4), jnp.float32)


def _rounding_bound(spec, params, shape, forward_dtype):
  """(p, q) of E after the layer for X = ||x||, E_0 = 0, in float64."""
  def bound(params):
    forms = ((jnp.zeros((), jnp.float64), jnp.ones((), jnp.float64)),
             (jnp.zeros((), jnp.float64), jnp.zeros((), jnp.float64)))
    _, e_form = spec.rounding_step(
        {'params': params}, shape, forms,
        spec.certified_bound({'params': params}, shape), dtype=jnp.float64,
        forward_dtype=forward_dtype)
    return e_form

  with jax.enable_x64(True):
    ep, eq = jax.jit(bound)(params)
    return float(ep), float(eq)


@pytest.mark.parametrize('name, spec, shape', [CASES[1], CASES[2]],
                         ids=['dense_narrower', 'conv3_narrower'])
def test_float32_forward_within_the_rounding_bound(name, spec, shape):
  # ||float32 eval forward - the exact function of its own factors|| <= E
  # (rounding_step with X = ||x||, E_0 = 0; the float64 reference's own
  # rounding bound is added).
  rng = np.random.default_rng(11)
  module = spec.module('layer', 1)
  params = dict(_init(spec, shape)['params'])
  params['psi'] = jnp.asarray(rng.normal(size=params['psi'].shape),
                              jnp.float32)
  params['bias'] = jnp.asarray(rng.normal(size=params['bias'].shape),
                               jnp.float32)
  x = rng.normal(size=(64, *shape)).astype(np.float32)
  x[:16] *= 100.0
  y32 = np.asarray(jax.jit(module.apply)({'params': params}, x)[0],
                   np.float64)
  factors = _factors32(spec, params, shape)
  apply = sandwich.dense_apply if spec.flattens else sandwich.conv_apply
  with jax.enable_x64(True):
    exact = sandwich.Factors(*map(jnp.asarray, _exact_factors(factors)))
    inputs = jnp.asarray(x, jnp.float64)
    if not spec.flattens:
      inputs = orthogonal.space_to_depth(inputs, spec.stride)
    reference = np.asarray(jax.jit(functools.partial(
        apply, precision=base.HIGHEST))(
            exact, jnp.asarray(params['bias'], jnp.float64), inputs))
  observed = np.linalg.norm((y32 - reference).reshape(len(x), -1), axis=1)
  norms = np.linalg.norm(x.reshape(len(x), -1).astype(np.float64), axis=1)
  p32, q32 = _rounding_bound(spec, params, shape, jnp.float32)
  p64, q64 = _rounding_bound(spec, params, shape, jnp.float64)
  bound = p32 + q32 * norms + p64 + q64 * norms
  assert np.all(observed <= bound), (observed / bound).max()
  assert np.all(bound < 1e-2 * (norms + 1.0))  # not vacuous
  ratio = bound / np.maximum(observed, 1e-300)  # some are exact (ReLU)
  print(f'Sandwich {name}: rounding bound / worst observed error = '
        f'{np.min(ratio):.1f} (median {np.median(ratio):.1f})')


def test_exp_and_rsqrt_accuracy_assumptions():
  # KAPPA_ULPS and the bias term assume exp and rsqrt within 4 roundoffs;
  # measured in float32 against float64.
  rng = np.random.default_rng(9)
  d = rng.uniform(-sandwich.PSI_RANGE, sandwich.PSI_RANGE,
                  200_000).astype(np.float32)
  x = np.exp(rng.uniform(-5, 5, 200_000)).astype(np.float32)
  for fn, arg, exact in ((jnp.exp, d, np.exp(d.astype(np.float64))),
                         (jax.lax.rsqrt, x,
                          1 / np.sqrt(x.astype(np.float64)))):
    got = np.asarray(jax.jit(fn)(jnp.asarray(arg)), np.float64)
    assert np.max(np.abs(got - exact) / exact) <= 4 * 2.0 ** -24
