"""Tests of cll_jax.forward_error against independent float64 numpy forward passes.

The reference network is rebuilt from explicit layer matrices
(`reference_ops.conv_matrix`) and evaluated by numpy in float64; the
float32 (and float64) forward passes of the model must stay within the
bound on every margin.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cll_jax import forward_error
from cll_jax import models
from cll_jax.operators import LinearOperator
import reference_ops

INPUT_SHAPE = (8, 8, 3)
MEAN = (0.49, 0.48, 0.45)
STD = (0.25, 0.24, 0.26)


def _activation(name, z):
  if name == 'relu':
    return np.maximum(z, 0)
  a, b = np.split(z, 2, axis=-1)
  return np.concatenate([np.maximum(a, b), np.minimum(a, b)], axis=-1)


def _reference(model, params, x):
  """(logits, exact layer norms) in float64 from explicit matrices."""
  z = (np.asarray(x, np.float64) - np.asarray(MEAN)) / np.asarray(STD)
  shape = INPUT_SHAPE
  norms = []
  for spec, name in zip(model.architecture, models.layer_names(model)):
    kernel = np.asarray(params[name]['kernel'], np.float64)
    bias = np.asarray(params[name]['bias'], np.float64)
    if isinstance(spec, models.Conv):
      matrix, shape = reference_ops.conv_matrix(kernel, shape, spec.stride,
                                                spec.padding)
      z = (z.reshape(len(z), -1) @ matrix.T).reshape(len(z), *shape) + bias
    else:
      matrix = kernel.T
      z = z.reshape(len(z), -1) @ kernel + bias
    norms.append(np.linalg.svd(matrix, compute_uv=False)[0])
    z = _activation(model.activation, z)
  head = params['head']
  logits = (z.reshape(len(z), -1) @ np.asarray(head['kernel'], np.float64)
            + np.asarray(head['bias'], np.float64))
  return logits, np.asarray(norms)


def _margin_deviation(logits, reference):
  """max over pairs of |(f_c - f_j) - (ref_c - ref_j)|, per example."""
  diff = np.asarray(logits, np.float64) - reference
  return diff.max(axis=1) - diff.min(axis=1)


@pytest.fixture(scope='module', params=['minmax', 'relu'])
def network(request):
  model = models.create_model('tiny_cnn', 5, activation=request.param,
                              input_mean=MEAN, input_std=STD,
                              num_power_iterations=0)
  # Random kernels and biases (nonzero biases exercise their rounding
  # terms) in the shapes of the model's variables, without compiling init.
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, *INPUT_SHAPE)))
  rng = np.random.default_rng(1)

  def fill(path, leaf):
    scale = 0.3 if path[-1].key == 'bias' else 1 / np.sqrt(
        np.prod(leaf.shape[:-1]))
    return jnp.asarray(rng.normal(scale=scale, size=leaf.shape), leaf.dtype)

  variables = jax.tree_util.tree_map_with_path(fill, shapes)
  x = rng.uniform(0, 1, size=(24, *INPUT_SHAPE)).astype(np.float32)
  x[-4:] *= 20.0  # far outside [0, 1]: larger activations
  x[-5] = 0.0  # only the offset (biases, the normalisation's mean)
  return model, variables, x


def test_margins_within_the_bound_in_float32_and_float64(network):
  model, variables, x = network
  params = variables['params']
  reference, exact_norms = _reference(model, params, x)
  norms = exact_norms * (1 + 1e-12)
  errors, bounds = {}, {}
  for precision, dtype in (('float64', jnp.float64),
                           ('float32', jnp.float32)):
    with forward_error.precision_scope(precision):

      @jax.jit
      def forward(variables, x):
        bound = forward_error.network_logit_error(
            model, variables['params'], INPUT_SHAPE, norms)
        return bound, forward_error.certified_forward(model.apply, variables,
                                                      x, bound)

      bounds[precision], (out, margin_error) = forward(variables, x)
      assert out.logits.dtype == dtype
      errors[precision] = np.asarray(margin_error, np.float64)
      deviations = _margin_deviation(out.logits, reference)
    # The numpy reference rounds too, within the float64 bound.
    assert np.all(deviations <= errors[precision] + errors['float64']), (
        precision, deviations)
  # The bound scales with the unit roundoff (2^-29 from float32 to float64),
  # grows with ||x||, is the offset at x = 0, and is not vacuous for this
  # small network (a worst case: ~1e5 times the observed float32
  # deviations, a few % of the logits).
  ratio = errors['float64'] / errors['float32']
  assert np.all((ratio > 2.0**-30) & (ratio < 2.0**-28)), ratio
  for bound, error in zip(bounds.values(), errors.values()):
    assert float(bound.offset) > 0 and float(bound.slope) > 0
    assert error[-1] > error[0]
    assert float(bound.offset) <= error[-5] <= float(bound.offset) * (
        1 + 1e-5)
  assert np.all(errors['float32'][:-5] < 0.05 * np.abs(reference).max())


def _gamma(k, u=2.0**-24):
  return k * u / (1 - k * u)


def test_chain_matches_the_docstring_recursion():
  # One conv and one dense hidden layer, a head, normalisation: the
  # coefficients against the module docstring's formulas in numpy float64.
  rng = np.random.default_rng(2)
  conv = LinearOperator(jnp.asarray(rng.normal(size=(3, 3, 2, 4)),
                                    jnp.float32), 'conv', (5, 5, 2), (2, 2),
                        ((1, 1), (1, 1)))
  d_in = int(np.prod(conv.output_shape))
  dense = LinearOperator(jnp.asarray(rng.normal(size=(d_in, 6)), jnp.float32),
                         'dense', (d_in,))
  head = LinearOperator(jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
                        'dense', (6,))
  biases = [jnp.asarray(rng.normal(size=n), jnp.float32) for n in (4, 6, 3)]
  norms = [2.5, 1.5]
  mean_norm, std_min = 3.0, 0.25
  bound = jax.jit(lambda ops, biases: forward_error.chain_logit_error(
      ops, biases, norms, input_mean_norm=mean_norm, input_std_min=std_min,
      forward_dtype=jnp.float32, dtype=jnp.float32))([conv, dense, head],
                                                     biases)
  k, w = (np.asarray(o.kernel, np.float64) for o in (conv, dense))
  b = [np.asarray(v, np.float64) for v in biases]
  g4 = _gamma(4)
  x = np.array([(1 + 2 * g4) * mean_norm, 1 + g4]) / std_min
  e = np.array([2 * g4 * mean_norm, g4]) / std_min
  a_conv, a_dense = 3 * np.linalg.norm(k), np.linalg.norm(w)
  positions = conv.output_shape[0] * conv.output_shape[1]
  for a, bias_norm, n, s in (
      (a_conv, np.sqrt(positions) * np.linalg.norm(b[0]), 18, norms[0]),
      (a_dense, np.linalg.norm(b[1]), d_in, norms[1])):
    r = _gamma(n + 1) * (a * x + np.array([bias_norm, 0.0]))
    x = s * x + np.array([bias_norm, 0.0]) + r
    e = s * e + r
  head_kernel = np.asarray(head.kernel, np.float64)
  d_max = max(np.linalg.norm(head_kernel[:, i] - head_kernel[:, j])
              for i in range(3) for j in range(3))
  omega = np.linalg.norm(head_kernel, axis=0).max()
  g = 2 * _gamma(7)
  want = (d_max * e[0] + g * (omega * x[0] + np.abs(b[2]).max()),
          d_max * e[1] + g * omega * x[1])
  for got, value in zip((bound.offset, bound.slope), want):
    assert value <= float(got) <= value * (1 + 1e-4)


def test_precision_scopes():
  assert forward_error.certification_dtype() == jnp.float32
  with forward_error.precision_scope('float64'):
    assert forward_error.certification_dtype() == jnp.float64
  run = forward_error.in_precision(lambda: jnp.ones(()) + 1.0, 'float64')
  assert run().dtype == jnp.float64
  assert forward_error.in_precision(lambda: jnp.ones(()), 'float32')(
  ).dtype == jnp.float32
  with pytest.raises(ValueError, match=r"precision must be one of .*'float16'"):
    forward_error.precision_scope('float16')


def test_bad_arguments_raise():
  ops = [LinearOperator(jnp.ones((2, 4)), 'dense', (2,)),
         LinearOperator(jnp.ones((4, 3)), 'dense', (4,))]
  biases = [None] * len(ops)
  norms = [1.0] * len(ops)
  conv = LinearOperator(jnp.ones((3, 3, 1, 2)), 'conv', (4, 4, 1))
  with pytest.raises(ValueError, match='head must be a dense layer'):
    forward_error.chain_logit_error([conv], [None], [])
  with pytest.raises(ValueError, match='one bias per layer'):
    forward_error.chain_logit_error(ops, biases[:-1], norms)
  with pytest.raises(ValueError, match='input_std_min must be finite'):
    forward_error.chain_logit_error(ops, biases, norms,
                                    input_std_min=float('nan'))
  with pytest.raises(ValueError, match='input_mean_norm must be finite'):
    forward_error.chain_logit_error(ops, biases, norms,
                                    input_mean_norm=-1.0)
  tanh = models.create_model('moons_mlp', 2).clone(activation='tanh')
  with pytest.raises(ValueError, match="exact, 1-Lipschitz activation.*'tanh'"):
    forward_error.network_logit_error(tanh, {}, (2,), norms)


def test_soc_householder_lln_margins_within_the_bound():
  """SOC dense layers (15-term series), Householder, LLN head vs numpy."""
  from cll_jax import layers  # pylint: disable=g-import-not-at-top
  model = models.LipschitzNetwork(
      (layers.SOCDenseSpec(8), layers.SOCDenseSpec(6)), 3,
      activation='householder', head='lln', input_mean=(0.3,) * 4,
      input_std=(0.5, 0.4, 0.6, 0.5))
  variables = jax.jit(model.init)(jax.random.PRNGKey(4), jnp.zeros((1, 4)))
  rng = np.random.default_rng(5)
  # Biases and activation angles away from their initial zeros / -pi/4.
  params = jax.tree_util.tree_map_with_path(
      lambda p, a: a + jnp.asarray(rng.normal(scale=0.3, size=a.shape),
                                   a.dtype)
      if p[-1].key in ('bias', 'angle') else a, variables['params'])
  variables = {'params': params, 'power_iteration': variables[
      'power_iteration']}
  x = rng.uniform(-2, 2, size=(32, 4)).astype(np.float32)

  def reference(x):
    z = (np.asarray(x, np.float64) - 0.3) / np.asarray(model.input_std)
    for i in range(2):
      p = {k: np.asarray(v, np.float64) for k, v in
           params[f'layer_{i}'].items()}
      u = np.asarray(variables['power_iteration'][f'layer_{i}']['u'],
                     np.float64)
      skew = p['kernel'] - p['kernel'].T
      a = 1.5 / np.linalg.norm(u @ skew) * skew
      z = np.pad(z, ((0, 0), (0, skew.shape[0] - z.shape[1])))
      y = z.copy()
      for k in range(14, 0, -1):  # the layer's 15-term Horner series
        y = z + (y @ a) / k
      z = y[:, :len(p['bias'])] + p['bias']
      phi = np.asarray(params[f'activation_{i}']['angle'], np.float64)
      c, s = np.cos(phi), np.sin(phi)
      h1, h2 = np.split(z, 2, axis=-1)
      inner = c * h1 + s * h2
      keep = inner > 0
      z = np.concatenate([np.where(keep, h1, h1 - 2 * inner * c),
                          np.where(keep, h2, h2 - 2 * inner * s)], axis=-1)
    w = np.asarray(params['head']['kernel'], np.float64)
    w = w / np.linalg.norm(w, axis=0)
    return z @ w + np.asarray(params['head']['bias'], np.float64)

  ref = reference(x)
  errors = {}
  for precision in ('float64', 'float32'):
    with forward_error.precision_scope(precision):

      @jax.jit
      def forward(variables, x):
        bounds = models.certified_bounds(model, variables, (4,))
        bound = forward_error.network_logit_error(
            model, variables, (4,), bounds['layer_norms'])
        return forward_error.certified_forward(model.apply, variables, x,
                                               bound)

      out, margin_error = forward(variables, x)
      errors[precision] = np.asarray(margin_error, np.float64)
      deviations = _margin_deviation(out.logits, ref)
    assert np.all(deviations <= errors[precision] + errors['float64']), (
        precision, deviations.max(), errors[precision].min())
  # Useful in float64, not vacuous in float32 for this small network.
  assert errors['float64'].max() < 1e-9
  assert errors['float32'].max() < 0.5 * np.abs(ref).max()
