"""Tests of cll_jax.liplt against explicit matrices, SVDs and Jacobians."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cll_jax import liplt
from cll_jax.operators import LinearOperator

ACTIVATIONS = {
    'relu': (jax.nn.relu, 0.0, 1.0),
    'leaky_relu': (lambda x: jax.nn.leaky_relu(x, 0.1), 0.1, 1.0),
    'tanh': (jnp.tanh, 0.0, 1.0),
}


def _mlp(seed: int, widths: tuple[int, ...]) -> list[LinearOperator]:
  rng = np.random.default_rng(seed)
  return [
      LinearOperator(
          jnp.asarray(rng.normal(size=(d_in, d_out)) / np.sqrt(d_in),
                      jnp.float32), 'dense', (d_in,))
      for d_in, d_out in zip(widths[:-1], widths[1:])
  ]


def _conv_net(seed: int) -> list[LinearOperator]:
  """conv 3x3 (pad 1) -> conv 3x3 stride 2 (pad 1) -> flatten -> dense 5."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(0.3 * rng.normal(size=shape),
                                      jnp.float32)
  return [
      LinearOperator(normal(3, 3, 2, 4), 'conv', (5, 5, 2), (1, 1),
                     ((1, 1), (1, 1))),
      LinearOperator(normal(3, 3, 4, 3), 'conv', (5, 5, 4), (2, 2),
                     ((1, 1), (1, 1))),
      LinearOperator(normal(27, 5), 'dense', (27,)),
  ]


def _matrices(ops) -> list[np.ndarray]:
  return [np.asarray(op.dense_matrix(), np.float64) for op in ops]


def _svd_product_norms(mats) -> np.ndarray:
  """[s, k] = ||M_k ... M_s||_2 from numpy float64 SVDs."""
  num = len(mats)
  out = np.zeros((num, num))
  for s in range(num):
    prod = np.eye(mats[s].shape[1])
    for k in range(s, num):
      prod = mats[k] @ prod
      out[s, k] = np.linalg.norm(prod, 2)
  return out


def _reference_liplt(mats, alpha, beta):
  """The paper's recursion, its index j, on explicit matrices (float64).

  Returns (global bound, (N, N) pairwise bounds).
  """
  a, b = (alpha + beta) / 2, (beta - alpha) / 2

  def chain(k, start):  # M_k ... M_start
    prod = np.eye(mats[start].shape[1])
    for l in range(start, k + 1):
      prod = mats[l] @ prod
    return prod

  depth = len(mats) - 1
  m = [np.linalg.norm(mats[0], 2)]
  for k in range(1, depth + 1):
    m.append(a**k * np.linalg.norm(chain(k, 0), 2) + b * sum(
        a**(j - 1) * np.linalg.norm(chain(k, k - j + 1), 2) * m[k - j]
        for j in range(1, depth + 1) if j <= k))
  num_classes = mats[-1].shape[0]
  pair = np.zeros((num_classes, num_classes))
  for i, j in itertools.permutations(range(num_classes), 2):
    c = np.zeros(num_classes)
    c[i], c[j] = 1.0, -1.0
    pair[i, j] = a**depth * np.linalg.norm(c @ chain(depth, 0)) + b * sum(
        a**(t - 1) * np.linalg.norm(c @ chain(depth, depth - t + 1)) *
        m[depth - t] for t in range(1, depth + 1))
  return m[-1], pair


# Jitted once per network shape (eager loops would recompile on every call).
_converge = jax.jit(liplt.converge_product_norms,
                    static_argnames=('tol', 'max_iterations'))
_pairwise = jax.jit(liplt.liplt_pairwise_bound, static_argnums=(2, 3),
                    static_argnames=('class_chunk_size',))


def _converged(ops, seed=0, iterations=400):
  states = liplt.init_product_states(ops, jax.random.PRNGKey(seed))
  # tol=0: a fixed number of iterations, independent of how lucky the start is.
  norms, _ = _converge(ops, states, tol=0.0, max_iterations=iterations)
  return norms


@functools.lru_cache(maxsize=None)
def _net_and_norms(name):
  ops = NETS[name]()
  return ops, _converged(ops)


@functools.lru_cache(maxsize=None)
def _mlp_and_norms(seed, widths, iterations=300):
  ops = _mlp(seed, widths)
  return ops, _converged(ops, iterations=iterations)


def _network(ops, biases, act):
  def f(x):
    h = x
    for op, bias in zip(ops[:-1], biases):
      h = act(op(h.reshape(op.input_shape)) + bias)
    return ops[-1](h.reshape(ops[-1].input_shape))
  return f


def _random_biases(ops, seed):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(0.5 * rng.normal(size=op.output_shape), jnp.float32)
          for op in ops[:-1]]


NETS = {
    'mlp': lambda: _mlp(1, (6, 8, 7, 9, 5)),
    'conv': lambda: _conv_net(2),
}


@pytest.mark.parametrize('net', sorted(NETS))
def test_product_norms_match_svd(net):
  ops = NETS[net]()
  expected = _svd_product_norms(_matrices(ops))
  states = liplt.init_product_states(ops, jax.random.PRNGKey(0))
  norms, states = _converge(ops, states, tol=0.0, max_iterations=400)
  np.testing.assert_allclose(np.asarray(norms), expected, rtol=1e-3, atol=0)
  # Warm start: a few more training-style steps keep the converged values.
  again, _ = jax.jit(liplt.product_norms, static_argnums=2)(ops, states, 2)
  np.testing.assert_allclose(np.asarray(again), expected, rtol=1e-3, atol=0)


def test_converge_with_default_tolerance():
  ops = NETS['mlp']()
  states = liplt.init_product_states(ops, jax.random.PRNGKey(3))
  norms, new_states = _converge(ops, states)
  np.testing.assert_allclose(np.asarray(norms),
                             _svd_product_norms(_matrices(ops)), rtol=1e-3)
  for s, u in enumerate(new_states):
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(u).reshape(u.shape[0], -1), axis=1), 1.0,
        rtol=1e-5)


@pytest.mark.parametrize('net', sorted(NETS))
@pytest.mark.parametrize('activation', sorted(ACTIVATIONS))
def test_liplt_matches_dense_reference(net, activation):
  ops, norms = _net_and_norms(net)
  _, alpha, beta = ACTIVATIONS[activation]
  expected, expected_pair = _reference_liplt(_matrices(ops), alpha, beta)
  np.testing.assert_allclose(float(liplt.liplt_bound(norms, alpha, beta)),
                             expected, rtol=1e-3)
  pair = _pairwise(ops, norms, alpha, beta, class_chunk_size=2)
  np.testing.assert_allclose(np.asarray(pair), expected_pair, rtol=1e-3,
                             atol=1e-6)


@pytest.mark.parametrize('net', sorted(NETS))
def test_linear_network_is_exact(net):
  ops, norms = _net_and_norms(net)
  mats = _matrices(ops)
  full = np.eye(mats[0].shape[1])
  for mat in mats:
    full = mat @ full
  np.testing.assert_allclose(float(liplt.liplt_bound(norms, 1.0, 1.0)),
                             np.linalg.norm(full, 2), rtol=1e-3)
  pair = np.asarray(_pairwise(ops, norms, 1.0, 1.0))
  diff = full[:, None, :] - full[None, :, :]
  np.testing.assert_allclose(pair, np.linalg.norm(diff, axis=-1), rtol=1e-4,
                             atol=1e-6)


def _jacobians(f, input_shape, seed, count):
  xs = jnp.asarray(np.random.default_rng(seed).normal(
      size=(count, *input_shape)), jnp.float32)
  jac = jax.jit(jax.vmap(jax.jacobian(f)))(xs)
  return np.asarray(jac, np.float64).reshape(count, jac.shape[1], -1)


@pytest.mark.parametrize('seed,widths', [
    (10, (5, 9, 9, 4)),
    (11, (7, 6, 12, 8, 3)),
    (12, (4, 16, 3)),
])
@pytest.mark.parametrize('activation', sorted(ACTIVATIONS))
def test_bounds_between_jacobian_and_naive(seed, widths, activation):
  ops, norms = _mlp_and_norms(seed, widths)
  act, alpha, beta = ACTIVATIONS[activation]
  bound = float(liplt.liplt_bound(norms, alpha, beta))
  layer_norms = jnp.diag(norms)
  naive = float(liplt.naive_product_bound(layer_norms, beta))
  assert bound <= naive * (1 + 1e-5)

  pair = np.asarray(_pairwise(ops, norms, alpha, beta))
  naive_pair = np.asarray(liplt.naive_pairwise_bound(ops[-1], layer_norms,
                                                     beta))
  assert np.all(pair <= naive_pair * (1 + 1e-5) + 1e-6)

  f = _network(ops, _random_biases(ops, seed + 100), act)
  jac = _jacobians(f, ops[0].input_shape, seed + 200, 64)
  assert np.linalg.norm(jac, 2, axis=(1, 2)).max() <= bound * (1 + 1e-4)
  # ||grad (z_i - z_j)|| for every pair and every point.
  grad_diff = jac[:, :, None, :] - jac[:, None, :, :]
  assert np.all(np.linalg.norm(grad_diff, axis=-1).max(axis=0)
                <= pair * (1 + 1e-4) + 1e-6)


def test_liplt_is_tighter_than_naive_for_relu():
  _, norms = _mlp_and_norms(20, (8, 16, 16, 16, 4))
  bound = float(liplt.liplt_bound(norms, 0.0, 1.0))
  naive = float(liplt.naive_product_bound(jnp.diag(norms), 1.0))
  assert bound < 0.9 * naive


def test_conv_net_bounds_hold_at_jacobians():
  ops = _conv_net(5)
  act, alpha, beta = ACTIVATIONS['leaky_relu']
  norms = _converged(ops)
  bound = float(liplt.liplt_bound(norms, alpha, beta))
  pair = np.asarray(_pairwise(ops, norms, alpha, beta))
  f = _network(ops, _random_biases(ops, 6), act)
  jac = _jacobians(f, ops[0].input_shape, 7, 32)
  assert np.linalg.norm(jac, 2, axis=(1, 2)).max() <= bound * (1 + 1e-4)
  grad_diff = jac[:, :, None, :] - jac[:, None, :, :]
  assert np.all(np.linalg.norm(grad_diff, axis=-1).max(axis=0)
                <= pair * (1 + 1e-4) + 1e-6)


def test_pairwise_many_classes_chunked_matches_unchunked():
  ops = _mlp(30, (4, 6, 5, 200))
  norms = _converged(ops, iterations=200)
  chunked = _pairwise(ops, norms, 0.0, 1.0, class_chunk_size=16)
  whole = _pairwise(ops, norms, 0.0, 1.0, class_chunk_size=200)
  chunked, whole = np.asarray(chunked), np.asarray(whole)
  assert chunked.shape == (200, 200)
  np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(chunked, chunked.T)
  np.testing.assert_array_equal(np.diag(chunked), 0.0)
  # Spot-check entries across chunk boundaries against explicit matrices.
  mats = _matrices(ops)
  a = b = 0.5
  m0 = np.linalg.norm(mats[0], 2)
  m1 = a * np.linalg.norm(mats[1] @ mats[0], 2) + b * np.linalg.norm(
      mats[1], 2) * m0
  for i, j in [(0, 199), (15, 16), (37, 150), (190, 3)]:
    c = np.zeros(200)
    c[i], c[j] = 1.0, -1.0
    expected = (a**2 * np.linalg.norm(c @ mats[2] @ mats[1] @ mats[0]) +
                b * a * np.linalg.norm(c @ mats[2] @ mats[1]) * m0 +
                b * np.linalg.norm(c @ mats[2]) * m1)
    np.testing.assert_allclose(chunked[i, j], expected, rtol=1e-3)


def test_pairwise_gradient_is_finite():
  ops = _mlp(31, (4, 6, 40))
  states = liplt.init_product_states(ops, jax.random.PRNGKey(0))

  def loss(ops):
    norms, _ = liplt.product_norms(ops, states, 3)
    return jnp.sum(liplt.liplt_pairwise_bound(ops, norms, 0.0, 1.0,
                                              class_chunk_size=16))

  grads = jax.jit(jax.grad(loss))(ops)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g.kernel)))
    assert np.any(np.asarray(g.kernel) != 0)


def test_chunked_pairwise_gradient_equals_one_chunk_on_conv_net():
  # What a many-class CRM step differentiates (Tiny-ImageNet's 200 classes
  # take 13 chunks of 16): through product norms and pairwise bounds, the
  # kernel gradients of a weighted sum of the chunked pairwise bounds (7
  # classes in chunks of 3, the last one padded) equal the single chunk's.
  rng = np.random.default_rng(8)
  ops = _conv_net(8)[:-1] + [LinearOperator(
      jnp.asarray(0.3 * rng.normal(size=(27, 7)), jnp.float32), 'dense',
      (27,))]
  states = liplt.init_product_states(ops, jax.random.PRNGKey(0))
  weights = jnp.asarray(rng.uniform(size=(7, 7)), jnp.float32)

  def loss(ops, chunk):
    norms, _ = liplt.product_norms(ops, states, 2)
    return jnp.sum(weights * liplt.liplt_pairwise_bound(
        ops, norms, 0.0, 1.0, class_chunk_size=chunk))

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  chunked_value, chunked = grad(ops, 3)
  whole_value, whole = grad(ops, 7)
  np.testing.assert_allclose(float(chunked_value), float(whole_value),
                             rtol=1e-6)
  for c, w in zip(chunked, whole):
    scale = np.abs(np.asarray(w.kernel)).max()
    assert scale > 0
    np.testing.assert_allclose(np.asarray(c.kernel), np.asarray(w.kernel),
                               rtol=1e-5, atol=1e-6 * scale)


def test_product_norm_gradient_matches_svd_gradient():
  ops = _mlp(40, (5, 7, 4))
  states = liplt.init_product_states(ops, jax.random.PRNGKey(1))
  _, states = _converge(ops, states, tol=0.0, max_iterations=400)

  def estimate(k0, k1):
    pair = [ops[0].replace(kernel=k0), ops[1].replace(kernel=k1)]
    norms, _ = liplt.product_norms(pair, states, 0)
    return norms[0, 1]

  def exact(k0, k1):  # x @ k0 @ k1: the product's matrix is (k0 k1)^T
    return jnp.linalg.norm(k0 @ k1, 2)

  got = jax.grad(estimate, argnums=(0, 1))(ops[0].kernel, ops[1].kernel)
  want = jax.grad(exact, argnums=(0, 1))(ops[0].kernel, ops[1].kernel)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-3)


def test_minmax_raises_clear_error():
  ops = _mlp(50, (3, 4, 2))
  norms, _ = liplt.product_norms(
      ops, liplt.init_product_states(ops, jax.random.PRNGKey(0)), 1)
  with pytest.raises(ValueError, match='elementwise'):
    liplt.liplt_bound(norms, None, None)
  with pytest.raises(ValueError, match='elementwise'):
    liplt.liplt_pairwise_bound(ops, norms, None, None)


def test_invalid_inputs_raise():
  ops = _mlp(51, (3, 4, 2))
  states = liplt.init_product_states(ops, jax.random.PRNGKey(0))
  bad_chain = [ops[0], LinearOperator(jnp.ones((5, 2)), 'dense', (5,))]
  with pytest.raises(ValueError, match='compose'):
    liplt.init_product_states(bad_chain, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r'states\[1\]'):
    liplt.product_norms(ops, (states[0], states[0]), 1)
  norms, _ = liplt.product_norms(ops, states, 1)
  with pytest.raises(ValueError, match='alpha'):
    liplt.liplt_bound(norms, 1.0, 0.5)
  with pytest.raises(ValueError, match='class_chunk_size'):
    liplt.liplt_pairwise_bound(ops, norms, 0.0, 1.0, class_chunk_size=0)


def test_trained_network_liplt_bound_holds_at_gradient_witness():
  # CRM training with the LipLT bound and one product-norm iteration per
  # step (the cheap setting of the benchmarks); afterwards the converged
  # LipLT bound of every class pair must be >= ||grad_x (z_i - z_j)(x)||,
  # a lower bound of the true Lipschitz constant of z_i - z_j, at random
  # inputs.
  from benchmarks import fake_batch  # pylint: disable=g-import-not-at-top
  from cll_jax import models  # pylint: disable=g-import-not-at-top
  from cll_jax import train  # pylint: disable=g-import-not-at-top
  from experiments import cifar10_crm  # pylint: disable=g-import-not-at-top
  config = cifar10_crm.get_config('bound=liplt')
  config.model.name = 'tiny_cnn'
  config.model.liplt_power_iterations = 1
  config.data.augment.enabled = False
  config.loss.crm_warmup_epochs = 0
  config.optimizer.learning_rate = 1e-2  # move the weights far in few steps
  shape = (8, 8, 3)
  model = train.create_model(config, 10)
  assert model.liplt_power_iterations == 1
  state = train.create_train_state(config, model, jax.random.PRNGKey(0),
                                   shape, 10)
  step = jax.jit(functools.partial(
      train.train_step, config=config, sched=train.loss_schedules(config, 10),
      steps_per_epoch=10, rng=jax.random.PRNGKey(1)))
  for i in range(12):
    state, _ = step(state, fake_batch(jax.random.PRNGKey(10 + i), 32, shape,
                                      10))

  @jax.jit
  def converged_bounds(variables):
    variables = dict(variables)
    variables['power_iteration'] = models.converge_power_iteration(
        model, variables, shape)
    out = model.apply(variables, jnp.zeros((1, *shape)))
    sound = train.certification_bounds(variables, model, shape, 'sound')
    return variables, out.pairwise_lipschitz, sound['pairwise']

  variables, pairwise, naive = converged_bounds(state.variables)
  pairwise = np.asarray(pairwise, np.float64)
  naive = np.asarray(naive, np.float64)

  def logits(x):
    return model.apply(variables, x[None]).logits[0]

  jac_fn = jax.jit(jax.vmap(jax.jacrev(logits)))
  xs = jax.random.uniform(jax.random.PRNGKey(2), (64, *shape))
  jac = np.asarray(jac_fn(xs), np.float64).reshape(64, 10, -1)
  grad_diff = np.linalg.norm(jac[:, :, None, :] - jac[:, None, :, :],
                             axis=-1).max(axis=0)
  off = ~np.eye(10, dtype=bool)
  assert grad_diff[off].min() > 0
  assert np.all(grad_diff[off] <= pairwise[off] * (1 + 1e-4))
  assert np.all(grad_diff[off] <= naive[off])
  # LipLT gains over the naive product on the trained network too.
  assert np.all(pairwise[off] <= naive[off])
