"""SLL layers: 1-Lipschitz by the SDP argument, checked independently.

For every SLL kind (dense; conv 3x3 and 5x5, hidden width above and below
the channels, 5x5 and 6x4 inputs), at init and after 100 Adam steps (lr 0.1)
that push the layer to expand: the largest singular value of the layer's
float64 Jacobian at a few points never exceeds the certified bound 1, and
the forward pass's T satisfies the SDP condition C C^T <= T on the explicit
zero-padded operator (hence every ReLU pattern is 1-Lipschitz). The rounded
T dominates the exact T from a float64 reference, and the rounding bound of
the forward pass dominates the float32 - float64 difference.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cll_jax.layers import _residual
from cll_jax.layers import base
from cll_jax.layers import sll

CASES = [
    ('dense', sll.SLLDenseSpec(8), (6,)),
    ('dense_narrow', sll.SLLDenseSpec(3), (7,)),
    ('conv3', sll.SLLConvSpec(6, 3), (5, 5, 4)),
    ('conv5_narrow', sll.SLLConvSpec(2, 5), (6, 4, 3)),
]
# The float64 Jacobian and its SVD carry their own rounding (~1e-15): a
# layer of norm exactly 1 (hidden units off, or directions outside the
# range of W) shows singular values of 1 + a few ulps.
JACOBIAN_RTOL = 1e-12
POINTS = 3


def _module(spec):
  return spec.module('layer', num_power_iterations=1)


@functools.lru_cache(maxsize=None)
def _jacobian_fn(spec, shape):
  """Jitted (variables, xs) -> float64 Jacobians of the eval layer at xs.

  (SLL has no power iteration: its training mode differs only in the
  matmul precision, the default instead of HIGHEST, equal on CPU.)
  """
  module = _module(spec)
  return jax.jit(lambda v, xs: jax.vmap(jax.jacfwd(
      lambda z: module.apply(v, z[None])[0][0].ravel()))(xs))


def _jacobian_norm(spec, variables, shape):
  with jax.enable_x64(True):
    v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    xs = jnp.asarray(np.random.default_rng(0).normal(size=(POINTS, *shape)),
                     jnp.float64)
    jacs = np.asarray(_jacobian_fn(spec, shape)(v64, xs))
  jacs = jacs.reshape(POINTS, -1, math.prod(shape))
  return max(np.linalg.svd(j, compute_uv=False)[0] for j in jacs)


@functools.lru_cache(maxsize=None)
def _scale_fn(spec, dtype_name):
  """The scale s = 2 / t_up the forward pass uses (sown), in a dtype."""
  module = _module(spec)

  def scale(v, x):
    _, state = module.apply(v, x, mutable=['intermediates'])
    return state['intermediates']['scale'][0]

  return jax.jit(scale)


def _forward_scale(spec, variables, shape, x64=False):
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    v = jax.tree.map(lambda a: jnp.asarray(a, dtype), variables)
    return np.asarray(_scale_fn(spec, jnp.dtype(dtype).name)(
        v, jnp.zeros((1, *shape), dtype)), np.float64)


def _explicit_inner(spec, variables, shape) -> np.ndarray:
  """C = W^T, the inner map, as a float64 `(hidden, inputs)` matrix."""
  with jax.enable_x64(True):
    kernel = jnp.asarray(variables['params']['kernel'], jnp.float64)
    inner, _ = spec.operators(kernel, shape)
    return np.asarray(inner.dense_matrix(), np.float64)


def _sdp_margin(spec, variables, shape, x64=False) -> float:
  """lambda_max(S^1/2 C C^T S^1/2) / 2 for the forward pass's s: <= 1 iff
  C C^T <= 2 S^-1 = T (on the units with s > 0), which makes every ReLU
  pattern's Jacobian I - C^T S D C of norm <= 1."""
  c = _explicit_inner(spec, variables, shape)
  s = _forward_scale(spec, variables, shape, x64)
  features = s.shape[0]
  s_full = np.tile(s, c.shape[0] // features)  # channels last: position-major
  root = np.sqrt(s_full)
  gram = (root[:, None] * c) @ (c.T * root[None, :])
  return float(np.linalg.eigvalsh(gram)[-1]) / 2


def _check(spec, variables, shape):
  assert float(spec.certified_bound(variables, shape)) == 1.0
  sigma = _jacobian_norm(spec, variables, shape)
  assert sigma <= 1 + JACOBIAN_RTOL, sigma
  # The float32 forward pass's T (its float64 T: test_rounded_t_...).
  margin = _sdp_margin(spec, variables, shape)
  assert margin <= 1 + JACOBIAN_RTOL, margin
  return sigma, margin


@functools.lru_cache(maxsize=None)
def _step_fn(spec, shape):
  module = _module(spec)
  rng = np.random.default_rng(1)
  x1, x2 = (jnp.asarray(rng.normal(size=(16, *shape)), jnp.float32)
            for _ in range(2))
  tx = optax.adam(0.1)

  def loss(params):
    # In training mode (the power-iteration collection mutable, as
    # `train_step` applies the network): default matmul precision.
    (y1, _), _ = module.apply({'params': params}, x1,
                              mutable=[base.POWER_ITERATION])
    (y2, _), _ = module.apply({'params': params}, x2,
                              mutable=[base.POWER_ITERATION])
    axes = tuple(range(1, y1.ndim))
    return -jnp.mean(jnp.sum((y1 - y2) ** 2, axis=axes)
                     / jnp.sum((x1 - x2) ** 2, axis=axes))

  def steps(params, opt):
    def body(_, carry):
      params, opt = carry
      grads = jax.grad(loss)(params)
      updates, opt = tx.update(grads, opt)
      return optax.apply_updates(params, updates), opt
    return jax.lax.fori_loop(0, 100, body, (params, opt))

  return jax.jit(steps), tx


@functools.lru_cache(maxsize=None)
def _initial(spec, shape):
  return jax.jit(_module(spec).init)(jax.random.PRNGKey(3),
                                     jnp.zeros((1, *shape)))


@functools.lru_cache(maxsize=None)
def _trained(spec, shape):
  """100 Adam steps (lr 0.1) on -||f(x1) - f(x2)||^2 / ||x1 - x2||^2."""
  steps, tx = _step_fn(spec, shape)
  params = _initial(spec, shape)['params']
  params, _ = steps(params, tx.init(params))
  return {'params': params}


@pytest.mark.parametrize('name, spec, shape', CASES, ids=[c[0] for c in CASES])
def test_layer_is_one_lipschitz(name, spec, shape):
  _check(spec, _initial(spec, shape), shape)
  sigma, margin = _check(spec, _trained(spec, shape), shape)
  print(f'{name}: trained jacobian {sigma:.9f}, SDP margin {margin:.9f}')


def _reference_t(kernel: np.ndarray, q: np.ndarray) -> np.ndarray:
  """t_i = sum_{delta, j} |M_ij(delta)| q_j / q_i in float64, by loops."""
  kernel = np.asarray(kernel, np.float64)
  if kernel.ndim == 2:
    m = np.abs(kernel.T @ kernel)[None]
  else:
    k = kernel.shape[0]
    terms = []
    for d1 in range(-(k - 1), k):
      for d2 in range(-(k - 1), k):
        acc = 0
        for a1 in range(k):
          for a2 in range(k):
            b1, b2 = a1 + d1, a2 + d2
            if 0 <= b1 < k and 0 <= b2 < k:
              acc = acc + kernel[b1, b2].T @ kernel[a1, a2]
        terms.append(np.abs(acc))
    m = np.stack(terms)
  return (m.sum(0) @ q) / q


@jax.jit
def _t_and_scale(kernel, q_tilde):
  q = sll._positive_q(q_tilde)  # pylint: disable=protected-access
  return (q, sll.t_upper(kernel, q), sll.sll_scale(kernel, q_tilde),
          sll.sll_scale(kernel, q_tilde, rigorous=False))


def test_rounded_t_dominates_the_exact_t():
  rng = np.random.default_rng(0)
  kernels = [rng.normal(size=(7, 5)), rng.normal(size=(3, 3, 4, 6)),
             # entries over 30 orders of magnitude, and a zero unit
             rng.normal(size=(3, 3, 2, 4)) * 10.0 ** rng.integers(
                 -15, 15, size=(3, 3, 2, 4))]
  kernels[-1][..., 1] = 0
  for number, kernel in enumerate(kernels):
    tight = number < 2  # the extreme kernel: soundness only (t may be inf)
    kernel = kernel.astype(np.float32)
    f = kernel.shape[-1]
    for spread in (1.0, 20.0):
      q_tilde = (rng.normal(size=f) * spread).astype(np.float32)
      for x64 in (False, True):
        with jax.enable_x64(x64):
          dtype = jnp.float64 if x64 else jnp.float32
          q, t_up, scale, plain = (
              np.asarray(a, np.float64) for a in _t_and_scale(
                  jnp.asarray(kernel, dtype), jnp.asarray(q_tilde, dtype)))
        # t for the q the forward pass computed (any q > 0 proves it).
        exact = _reference_t(kernel, q)
        assert np.all(t_up >= exact), (t_up, exact)
        rtol = 1e-12 if x64 else 1e-4
        live = (exact > 1e-30) & np.isfinite(t_up)
        if tight:
          assert np.all(live)
          assert np.all(t_up <= exact * (1 + rtol)), (t_up, exact)
        zero = np.all(kernel.reshape(-1, f) == 0, axis=0)
        np.testing.assert_array_equal(scale[zero], 0)
        assert np.all(np.isfinite(scale))
        # The layer's own scale fl(2 / t_up), its t_up compiled with the
        # rest (equal up to an ulp or so), is <= 2 / t up to that
        # division's rounding.
        ulp = 2.0 ** -52 if x64 else 2.0 ** -23
        live = live & ~zero
        assert np.all(scale[live] <= 2 / exact[live] * (1 + ulp))
        if tight:
          assert np.all(scale >= 2 / exact * (1 - 2 * rtol))
          # Training's scale: the plain float formula, close to 2 / t.
          np.testing.assert_allclose(plain, 2 / exact,
                                     rtol=1e-12 if x64 else 1e-5)


def test_zero_unit_keeps_the_layer_finite_and_one_lipschitz():
  spec, shape = CASES[2][1], CASES[2][2]
  variables = jax.tree.map(lambda a: a, _initial(spec, shape))
  kernel = np.asarray(variables['params']['kernel']).copy()
  kernel[..., 2] = 0
  variables['params']['kernel'] = jnp.asarray(kernel)
  variables['params']['bias'] = jnp.full((6,), 100.0)  # a large offset
  module = _module(spec)
  x = jnp.ones((2, *shape))

  @jax.jit
  def output_and_grad(params):
    def total(p):
      (y, _), _ = module.apply({'params': p}, x,
                               mutable=[base.POWER_ITERATION])
      return jnp.sum(y), y
    return jax.grad(total, has_aux=True)(params)

  grad, y = output_and_grad(variables['params'])
  assert np.all(np.isfinite(np.asarray(y)))
  # The gradient is finite too (training through a dead unit).
  assert all(np.all(np.isfinite(np.asarray(g)))
             for g in jax.tree.leaves(grad))
  _check(spec, variables, shape)


def test_spec_contract():
  spec = sll.SLLConvSpec(4)
  assert spec.activated is False and spec.flattens is False
  assert sll.SLLDenseSpec(4).flattens
  assert spec.bound_kind == base.PROVEN
  assert spec.output_shape((5, 6, 3)) == (5, 6, 3)
  assert spec.power_iteration_operators({}, (5, 6, 3)) == {}
  with pytest.raises(ValueError, match='odd kernel size'):
    sll.SLLConvSpec(4, 4).module('l', 1).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 2)))
  with pytest.raises(ValueError, match='features'):
    sll.SLLDenseSpec(0).module('l', 1).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 4)))
  # The paper's initialisation: Glorot normal kernel, standard normal q,
  # bias uniform in +-1 / sqrt(fan_in).
  v = jax.jit(sll.SLLDenseSpec(64).module('l', 1).init)(
      jax.random.PRNGKey(0), jnp.zeros((1, 32)))['params']
  std = math.sqrt(2.0 / (32 + 64))
  assert abs(float(jnp.std(v['kernel'])) / std - 1) < 0.06
  assert abs(float(jnp.std(v['q'])) - 1) < 0.3
  bound = 1 / math.sqrt(32)
  assert float(jnp.max(jnp.abs(v['bias']))) <= bound
  assert float(jnp.max(jnp.abs(v['bias']))) >= 0.8 * bound


@functools.lru_cache(maxsize=None)
def _forward32(spec):
  module = _module(spec)

  def forward(v, x):
    (y, _), state = module.apply(v, x, mutable=['intermediates'])
    return y, state['intermediates']['scale'][0]

  return jax.jit(forward)


@functools.lru_cache(maxsize=None)
def _reference_fn(spec, shape):
  """The exact layer with a given scale, evaluated in float64."""
  def reference(v, s, x):
    inner, outer = spec.operators(v['params']['kernel'], shape)
    return _residual.residual_apply(inner, outer, v['params']['bias'], s, x)
  return jax.jit(reference)


@functools.lru_cache(maxsize=None)
def _rounding_fn(spec, shape):
  def step(v, e0):
    dtype = jnp.float64
    forms = ((e0, jnp.ones((), dtype)), (e0, jnp.zeros((), dtype)))
    return spec.rounding_step(v, shape, forms, None, dtype=dtype,
                              forward_dtype=jnp.float32)
  return jax.jit(step)


@pytest.mark.parametrize('name, spec, shape', [CASES[0], CASES[2], CASES[3]],
                         ids=['dense', 'conv3', 'conv5_narrow'])
def test_rounding_step_dominates_float32_error(name, spec, shape):
  variables = _trained(spec, shape)
  rng = np.random.default_rng(2)
  scales = np.repeat([1e-2, 1.0, 30.0], 4).reshape(-1, *([1] * len(shape)))
  x = rng.normal(size=(scales.size, *shape)) * scales
  x32 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  axes = tuple(range(1, x.ndim))
  ratios = []
  for e0 in (0.0, 1e-3):
    noise = rng.normal(size=x.shape)
    noise *= e0 / np.sqrt(np.sum(noise ** 2, axis=axes, keepdims=True))
    x_hat = jnp.asarray(x32 + noise, jnp.float32)
    y32, s32 = _forward32(spec)(variables, x_hat)
    y32 = np.asarray(y32, np.float64)
    e_in = float(np.max(np.sqrt(np.sum(
        (np.asarray(x_hat, np.float64) - x32) ** 2, axis=axes))))
    with jax.enable_x64(True):
      v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
      # The exact function is the one with the forward pass's own t_up.
      y64 = np.asarray(_reference_fn(spec, shape)(
          v64, jnp.asarray(s32, jnp.float64), jnp.asarray(x32)))
      (_, _), (ep, eq) = _rounding_fn(spec, shape)(
          variables, jnp.asarray(e_in * (1 + 1e-9), jnp.float64))
    observed = np.sqrt(np.sum((y32 - y64) ** 2, axis=axes))
    bound = float(ep) + float(eq) * np.sqrt(np.sum(x32 ** 2, axis=axes))
    assert np.all(observed <= bound), (observed, bound)
    ratios.append(float(np.min(bound / np.maximum(observed, 1e-300))))
  print(f'{name}: rounding bound / observed >= {ratios}')
  assert all(r >= 1 for r in ratios), ratios
