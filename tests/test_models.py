"""Tests of cll_jax.layers and cll_jax.models.

Independent references: brute-force numpy convolution matrices and their
float64 SVD, per-example Jacobians of the network (jax.jacrev, vmapped), a
sort-based MinMax, explicit numpy power iteration, and the architectures
transcribed by hand from CLL table B2 (arXiv 2309.06166) and table B1.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_ops import conv_matrix

from cll_jax import layers
from cll_jax import models

PI = layers.POWER_ITERATION


# ----------------------------------------------------------------- helpers


def top_singular_value(m):
  return np.linalg.svd(np.asarray(m, np.float64), compute_uv=False)[0]


def _unit(seed, shape):
  v = np.random.default_rng(seed).standard_normal(shape)
  return jnp.asarray(v / np.linalg.norm(v), jnp.float32)


# Hand transcription of the paper's layers: ('c', C, K, S, P) or ('d', C).
SPECS = {
    'moons_mlp': [('d', 10), ('d', 20), ('d', 40), ('d', 40), ('d', 20),
                  ('d', 10)],
    '4c3f': [('c', 32, 3, 1, 1), ('c', 32, 4, 2, 1), ('c', 64, 3, 1, 1),
             ('c', 64, 4, 2, 1), ('d', 512), ('d', 512)],
    '6c2f': [('c', 32, 3, 1, 1), ('c', 32, 3, 1, 1), ('c', 32, 4, 2, 1),
             ('c', 64, 3, 1, 1), ('c', 64, 3, 1, 1), ('c', 64, 4, 2, 1),
             ('d', 512)],
    '8c2f': [('c', 64, 3, 1, 1), ('c', 64, 3, 1, 1), ('c', 64, 4, 2, 0),
             ('c', 128, 3, 1, 1), ('c', 128, 3, 1, 1), ('c', 128, 4, 2, 0),
             ('c', 256, 3, 1, 1), ('c', 256, 4, 2, 0), ('d', 256)],
    'tiny_cnn': [('c', 8, 3, 1, 1), ('c', 8, 4, 2, 1), ('d', 32)],
}


def explicit_matrices(name, params, input_shape, num_classes):
  """Each layer's matrix, built from SPECS (not from network_operators)."""
  mats, shape = [], tuple(input_shape)
  names = models.layer_names(models.create_model(name, num_classes))
  for layer_name, spec in zip(names, SPECS[name] + [('d', num_classes)]):
    kernel = np.asarray(params[layer_name]['kernel'], np.float64)
    if spec[0] == 'c':
      m, shape = conv_matrix(kernel, shape, spec[3], spec[4])
    else:
      m, shape = kernel.T, (spec[1],)
    mats.append(m)
  return mats


def numpy_variables(model, input_shape, seed):
  """Variables shaped like model.init's, drawn with numpy.

  Kaiming-normal kernels, small random biases (so the bound is tested with
  the affine parts present), random unit power-iteration vectors. Avoids
  compiling the PRNG, which dominates the cost of a jitted `init` on CPU.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      fan_in = math.prod(leaf.shape[:-1])
      v = rng.standard_normal(leaf.shape) * math.sqrt(2.0 / fan_in)
    elif name == 'bias':
      v = 0.1 * rng.standard_normal(leaf.shape)
    else:
      v = rng.standard_normal(leaf.shape)
      v /= np.linalg.norm(v)
    return jnp.asarray(v, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache(maxsize=None)
def converged_network(name, input_shape, num_classes, activation):
  """Initialised model with its power iteration run to convergence."""
  model = models.create_model(name, num_classes, activation=activation)

  variables = numpy_variables(model, input_shape, seed=0)
  state = jax.jit(lambda v: models.converge_power_iteration(
      model, v, input_shape))(variables)
  return model, {'params': variables['params'], PI: state}


def output_and_jacobians(model, variables, x):
  """The NetworkOutput on x and the (B, N, prod(input_shape)) Jacobians."""

  def run(variables, x):
    f = lambda z: model.apply(variables, z[None]).logits[0]
    return model.apply(variables, x), jax.vmap(jax.jacrev(f))(x)

  out, jac = jax.jit(run)(variables, x)
  return out, np.asarray(jac, np.float64).reshape(x.shape[0], -1, x[0].size)


# ------------------------------------------------------ layer state & init


def _layer_case(kind):
  if kind == 'dense':
    layer = layers.LipschitzDense(6)
    shape = (9,)
  else:
    layer = layers.LipschitzConv(4, 4, stride=2, padding=1)
    shape = (6, 6, 3)
  variables = jax.jit(layer.init)(jax.random.key(1), jnp.zeros((1, *shape)))
  kernel = np.asarray(variables['params']['kernel'], np.float64)
  if kind == 'dense':
    m = kernel.T
  else:
    m, _ = conv_matrix(kernel, shape, 2, 1)
  return layer, variables, shape, m


@pytest.mark.parametrize('kind', ['dense', 'conv'])
def test_layer_iterate_advances_only_when_mutable(kind):
  layer, variables, shape, m = _layer_case(kind)
  assert layer.num_power_iterations == 5
  u_var = variables[PI]['u']
  assert u_var.shape == shape
  np.testing.assert_allclose(np.linalg.norm(u_var), 1.0, rtol=1e-5)
  # Restart from a fresh, unconverged vector so single steps are visible.
  u0 = _unit(2, shape)
  variables = {'params': variables['params'], PI: {'u': u0}}
  x = jnp.asarray(np.random.default_rng(3).uniform(size=(2, *shape)),
                  jnp.float32)

  frozen = jax.jit(layer.apply)
  mutable = jax.jit(functools.partial(layer.apply, mutable=[PI]))
  (y, sigma_frozen) = frozen(variables, x)
  (_, sigma_train), new_state = mutable(variables, x)
  u1 = np.asarray(new_state[PI]['u'], np.float64).ravel()

  # The output is the affine map M x + b.
  bias = np.asarray(variables['params']['bias'], np.float64)
  x64 = np.asarray(x, np.float64).reshape(2, -1)
  y_ref = x64 @ m.T + np.tile(bias, m.shape[0] // bias.size)
  np.testing.assert_allclose(np.asarray(y).reshape(2, -1), y_ref, atol=1e-5)

  # Frozen: sigma = ||M u0|| with the stored iterate.
  u0_64 = np.asarray(u0, np.float64).ravel()
  np.testing.assert_allclose(sigma_frozen, np.linalg.norm(m @ u0_64),
                             rtol=1e-5)

  # Mutable: exactly 5 normalised steps u <- M^T M u / ||M^T M u||.
  def numpy_steps(n):
    v = u0_64
    for _ in range(n):
      v = m.T @ (m @ v)
      v /= np.linalg.norm(v)
    return v

  np.testing.assert_allclose(u1, numpy_steps(5), atol=2e-5)
  for n in (4, 6):  # the check can tell 5 steps from 4 or 6
    assert np.max(np.abs(numpy_steps(n) - numpy_steps(5))) > 1e-3
  np.testing.assert_allclose(sigma_train, np.linalg.norm(m @ u1), rtol=1e-5)
  assert sigma_train >= sigma_frozen - 1e-6  # monotone from below

  # Frozen again with the new state: reads, does not advance, the iterate.
  _, sigma_again = frozen({**variables, **new_state}, x)
  np.testing.assert_allclose(sigma_again, sigma_train, rtol=1e-6)


@pytest.mark.parametrize('kind', ['dense', 'conv'])
def test_kaiming_normal_fan_in_init(kind):
  if kind == 'dense':
    layer, shape, fan_in = layers.LipschitzDense(256), (2048,), 2048
  else:
    layer, shape, fan_in = layers.LipschitzConv(64, 3), (5, 5, 64), 3 * 3 * 64
  variables = jax.jit(layer.init)(jax.random.key(0), jnp.zeros((1, *shape)))
  w = np.asarray(variables['params']['kernel'], np.float64).ravel()
  std = math.sqrt(2.0 / fan_in)
  n = w.size
  assert abs(w.mean()) < 5 * std / math.sqrt(n)
  assert abs(w.std() / std - 1) < 5 / math.sqrt(2 * n) + 1e-3
  # Untruncated normal: P(|z| > 2) = 4.55% (a truncated normal has none).
  tail = np.mean(np.abs(w) > 2 * std)
  assert abs(tail - 0.0455) < 5 * math.sqrt(0.0455 * 0.9545 / n)
  np.testing.assert_array_equal(variables['params']['bias'], 0.0)


# ------------------------------------------------------------------ MinMax


def minmax_reference(x):
  """Sorts each pair (x[..., k], x[..., k + C/2]): [max..., min...]."""
  x = np.asarray(x)
  half = x.shape[-1] // 2
  pairs = np.sort(np.stack([x[..., :half], x[..., half:]], -1), -1)
  return np.concatenate([pairs[..., 1], pairs[..., 0]], -1)


def test_minmax_matches_sort_reference():
  rng = np.random.default_rng(0)
  for shape in [(7, 6), (2, 3, 3, 8)]:
    x = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(layers.minmax(jnp.asarray(x)),
                                  minmax_reference(x))


def test_minmax_is_1_lipschitz():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2000, 6)).astype(np.float32)
  # Half of the pairs far apart, half close (within one linear piece or not).
  y = x + rng.standard_normal((2000, 6)).astype(np.float32) * np.where(
      np.arange(2000)[:, None] < 1000, 1.0, 1e-2).astype(np.float32)
  fx = np.asarray(layers.minmax(jnp.asarray(x)), np.float64)
  fy = np.asarray(layers.minmax(jnp.asarray(y)), np.float64)
  lhs = np.linalg.norm(fx - fy, axis=1)
  rhs = np.linalg.norm(x.astype(np.float64) - y, axis=1)
  assert np.all(lhs <= rhs * (1 + 1e-6))
  assert np.any(lhs < rhs * 0.99)  # the test is not vacuous


def test_minmax_preserves_gradient_norm():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((50, 8)), jnp.float32)
  jac = jax.vmap(jax.jacobian(layers.minmax))(x)
  # At points without ties the Jacobian is a permutation: J^T J = I.
  eye = np.broadcast_to(np.eye(8), jac.shape)
  np.testing.assert_allclose(np.einsum('bji,bjk->bik', jac, jac), eye)
  g = jnp.asarray(rng.standard_normal((50, 8)), jnp.float32)
  _, vjp = jax.vjp(layers.minmax, x)
  (gx,) = vjp(g)
  np.testing.assert_allclose(jnp.linalg.norm(gx, axis=1),
                             jnp.linalg.norm(g, axis=1), rtol=1e-6)


def test_minmax_odd_channels_raise():
  with pytest.raises(ValueError, match='5'):
    layers.minmax(jnp.ones((2, 5)))


# -------------------------------------------------------- network bounds

BOUND_CASES = [('moons_mlp', (2,), 3), ('tiny_cnn', (8, 8, 3), 5)]


def _points(input_shape, n, seed):
  rng = np.random.default_rng(seed)
  if len(input_shape) == 1:
    return jnp.asarray(rng.uniform(-2, 2, (n, *input_shape)), jnp.float32)
  return jnp.asarray(rng.uniform(0, 1, (n, *input_shape)), jnp.float32)


@pytest.mark.parametrize('activation', ['minmax', 'relu'])
@pytest.mark.parametrize('name,input_shape,num_classes', BOUND_CASES)
def test_pairwise_bound_dominates_gradients(name, input_shape, num_classes,
                                            activation):
  model, variables = converged_network(name, input_shape, num_classes,
                                       activation)
  x = _points(input_shape, 128, seed=4)
  out, jac = output_and_jacobians(model, variables, x)

  # Independent bound: float64 SVD of each explicit layer matrix.
  mats = explicit_matrices(name, variables['params'], input_shape,
                           num_classes)
  norms_ref = np.array([top_singular_value(m) for m in mats])
  np.testing.assert_allclose(out.layer_norms, norms_ref, rtol=1e-4)
  head = mats[-1]  # (N, d): rows are the head columns W_i
  dist = np.linalg.norm(head[:, None, :] - head[None, :, :], axis=-1)
  k_ref = dist * np.prod(norms_ref[:-1])
  np.testing.assert_allclose(out.pairwise_lipschitz, k_ref, rtol=1e-4)
  np.testing.assert_allclose(out.lipschitz, np.prod(norms_ref), rtol=1e-4)

  grad_diff = np.linalg.norm(jac[:, :, None, :] - jac[:, None, :, :], axis=-1)
  k_model = np.asarray(out.pairwise_lipschitz, np.float64)
  # Converged power iteration is below sigma_1 by < 1e-4 relative.
  assert np.all(grad_diff <= k_ref * (1 + 1e-6) + 1e-9)
  assert np.all(grad_diff <= k_model * (1 + 1e-4) + 1e-9)
  assert grad_diff.max() > 0  # not vacuous
  spectral = np.array([np.linalg.norm(j, 2) for j in jac])
  assert np.all(spectral <= float(out.lipschitz) * (1 + 1e-4))


def test_pairwise_bound_nan_free_and_differentiable_with_tied_columns():
  model, variables = converged_network('tiny_cnn', (8, 8, 3), 5, 'minmax')
  params = variables['params']
  head_kernel = params['head']['kernel']
  params = {**params, 'head': {**params['head'],
                               'kernel': head_kernel.at[:, 1].set(
                                   head_kernel[:, 0])}}
  x = _points((8, 8, 3), 4, seed=5)

  def loss(params, mutable):
    v = {'params': params, PI: variables[PI]}
    if mutable:
      out, _ = model.apply(v, x, mutable=[PI])
    else:
      out = model.apply(v, x)
    return (jnp.sum(out.pairwise_lipschitz) + jnp.sum(out.logits)
            + out.lipschitz), out

  for mutable in (False, True):
    (value, out), grads = jax.jit(
        jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
            params, mutable)
    k = np.asarray(out.pairwise_lipschitz)
    assert np.all(np.isfinite(k)) and np.isfinite(float(value))
    np.testing.assert_array_equal(np.diag(k), 0.0)
    assert k[0, 1] == 0.0 and k[1, 0] == 0.0
    assert np.all(k[~np.eye(5, dtype=bool) & (k != 0.0)] > 0)
    for leaf in jax.tree.leaves(grads):
      assert np.all(np.isfinite(np.asarray(leaf)))


def test_input_std_scales_bounds():
  mean, std = (0.4, 0.5, 0.6), (0.3, 0.2, 0.25)
  model, variables = converged_network('tiny_cnn', (8, 8, 3), 5, 'minmax')
  scaled = models.create_model('tiny_cnn', 5, input_mean=mean, input_std=std)
  x = _points((8, 8, 3), 32, seed=6)
  out = jax.jit(model.apply)(variables, x)
  out_s, jac = output_and_jacobians(scaled, variables, x)
  np.testing.assert_allclose(
      out_s.logits,
      jax.jit(model.apply)(variables,
                           (x - jnp.array(mean)) / jnp.array(std)).logits,
      rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out_s.pairwise_lipschitz,
                             np.asarray(out.pairwise_lipschitz) / 0.2,
                             rtol=1e-6)
  np.testing.assert_allclose(out_s.lipschitz, float(out.lipschitz) / 0.2,
                             rtol=1e-6)
  # The bound holds for the gradient with respect to the raw input.
  grad_diff = np.linalg.norm(jac[:, :, None, :] - jac[:, None, :, :], axis=-1)
  k = np.asarray(out_s.pairwise_lipschitz, np.float64)
  assert np.all(grad_diff <= k * (1 + 1e-4) + 1e-9)
  spectral = np.array([np.linalg.norm(j, 2) for j in jac])
  assert np.all(spectral <= float(out_s.lipschitz) * (1 + 1e-4))


# ------------------------------------------------------------ architectures


def expected_layers(name, input_shape, num_classes):
  """(kind, kernel shape, strides, padding, in shape, out shape) per layer."""
  rows, shape = [], tuple(input_shape)
  for spec in SPECS[name] + [('d', num_classes)]:
    if spec[0] == 'c':
      _, c, k, s, p = spec
      h, w, c_in = shape
      out = ((h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1, c)
      rows.append(('conv', (k, k, c_in, c), (s, s), ((p, p), (p, p)), shape,
                   out))
    else:
      d_in = math.prod(shape)
      out = (spec[1],)
      rows.append(('dense', (d_in, spec[1]), None, None, (d_in,), out))
    shape = out
  return rows


# The output shapes of every layer, written out for the paper's inputs.
OUTPUT_SHAPES = {
    '4c3f': [(32, 32, 32), (16, 16, 32), (16, 16, 64), (8, 8, 64), (512,),
             (512,), (10,)],
    '6c2f': [(32, 32, 32), (32, 32, 32), (16, 16, 32), (16, 16, 64),
             (16, 16, 64), (8, 8, 64), (512,), (10,)],
    '8c2f': [(64, 64, 64), (64, 64, 64), (31, 31, 64), (31, 31, 128),
             (31, 31, 128), (14, 14, 128), (14, 14, 256), (6, 6, 256),
             (256,), (200,)],
    'moons_mlp': [(10,), (20,), (40,), (40,), (20,), (10,), (2,)],
}
PARAM_COUNTS = {'4c3f': 2_466_858, '6c2f': 2_250_378, '8c2f': 4_342_984,
                'moons_mlp': 3_782}


@pytest.mark.parametrize('name,input_shape,num_classes', [
    ('4c3f', (32, 32, 3), 10), ('6c2f', (32, 32, 3), 10),
    ('8c2f', (64, 64, 3), 200), ('moons_mlp', (2,), 2)])
def test_architectures_match_table_b2(name, input_shape, num_classes):
  model = models.create_model(name, num_classes)
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  ops = models.network_operators(model, variables['params'], input_shape)
  expected = expected_layers(name, input_shape, num_classes)
  assert len(ops) == len(expected)
  for op, (kind, kshape, strides, padding, in_shape, out_shape) in zip(
      ops, expected):
    assert op.kind == kind
    assert op.kernel.shape == kshape
    assert op.input_shape == in_shape
    assert op.output_shape == out_shape
    if kind == 'conv':
      assert op.strides == strides and op.padding == padding
  assert [op.output_shape for op in ops] == OUTPUT_SHAPES[name]

  # The power-iteration vectors live on each layer's true input shape.
  for layer_name, op in zip(models.layer_names(model), ops):
    assert variables[PI][layer_name]['u'].shape == op.input_shape
  n_params = sum(math.prod(a.shape)
                 for a in jax.tree.leaves(variables['params']))
  assert n_params == PARAM_COUNTS[name]
  out = jax.eval_shape(model.apply, variables, x)
  assert out.logits.shape == (1, num_classes)
  assert out.pairwise_lipschitz.shape == (num_classes, num_classes)
  assert out.layer_norms.shape == (len(expected),)


def test_registry():
  assert {'moons_mlp', '4c3f', '6c2f', '8c2f'} <= set(models.MODELS)
  with pytest.raises(ValueError, match='resnet_1000'):
    models.create_model('resnet_1000', 10)
  with pytest.raises(ValueError, match='tanh'):
    models.create_model('tiny_cnn', 10, activation='tanh')
  with pytest.raises(ValueError, match='1'):
    models.create_model('tiny_cnn', 1)
  with pytest.raises(ValueError, match='-1'):
    models.create_model('tiny_cnn', 10, num_power_iterations=-1)
  with pytest.raises(ValueError, match=r'input_std must be finite, got '
                     r'\(0.2, nan, 0.2\)'):
    models.create_model('tiny_cnn', 10, input_std=(0.2, float('nan'), 0.2))
  with pytest.raises(ValueError, match=r'input_mean must be finite'):
    models.create_model('tiny_cnn', 10, input_mean=(0.5, float('inf'), 0.5))
  assert models.activation_slopes(
      models.create_model('tiny_cnn', 10, activation='relu')) == (0.0, 1.0)
  assert models.activation_slopes(models.create_model('tiny_cnn', 10)) is None
