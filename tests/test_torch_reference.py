"""The PyTorch reference of the benchmarks computes the JAX CLL step.

Skipped when torch is absent (it is the optional `bench` extra). The two
implementations share nothing but the weights: conv layouts, the flattening
order, the adjoint (`conv_transpose2d` vs `jax.linear_transpose`), the loss
and Adam are written independently.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from benchmarks import fake_batch
from cll_jax import train
from experiments import cifar10_4c3f

torch = pytest.importorskip('torch')
from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position

INPUT_SHAPE = (8, 8, 3)


@functools.lru_cache(maxsize=1)
def _shared():
  config = cifar10_4c3f.get_config()
  config.model.name = 'tiny_cnn'  # a strided conv, a flatten, a dense layer
  config.data.augment.enabled = False
  config.train.batch_size = 8
  model = train.create_model(config, 10)
  state = train.create_train_state(config, model, jax.random.PRNGKey(0),
                                   INPUT_SHAPE, 10)
  batch = fake_batch(jax.random.PRNGKey(1), 8, INPUT_SHAPE, 10)
  return config, model, state, batch


def _setup():
  config, model, state, batch = _shared()
  reference = torch_reference.Reference.from_jax(
      model, state.variables, INPUT_SHAPE, epsilon=config.loss.epsilon,
      p=config.loss.p_start, lam=config.loss.lam)
  return config, model, state, batch, reference


def _to_jax_layout(weight: np.ndarray, kernel_shape, flatten_from=None):
  """Torch weight -> JAX kernel layout (inverse of `Reference.from_jax`)."""
  if weight.ndim == 4:
    return weight.transpose(2, 3, 1, 0)
  if flatten_from is not None:
    h, w, c = flatten_from
    return weight.reshape(c, h, w, -1).transpose(1, 2, 0, 3).reshape(
        kernel_shape)
  return weight


def test_one_step_matches_jax_train_step():
  config, model, state, batch, reference = _setup()
  jax_step = functools.partial(
      train.train_step, config=config,
      sched=train.loss_schedules(config, 10), steps_per_epoch=10,
      rng=jax.random.PRNGKey(2))
  new_state, metrics = jax.jit(jax_step)(state, batch)

  images = torch_reference.to_nchw_float(np.asarray(batch['image']))
  labels = torch.from_numpy(np.array(batch['label'])).long()
  reference.optimizer.zero_grad()
  total, values, logits, lipschitz = reference.loss(images, labels)
  total.backward()

  np.testing.assert_allclose(float(values.detach().mean()), float(metrics['loss']),
                             rtol=1e-4)
  np.testing.assert_allclose(float(lipschitz.detach()), float(metrics['lipschitz']),
                             rtol=1e-4)
  # After one Adam step the first moment is (1 - b1) g: the JAX gradient.
  mu = new_state.opt_state[0].mu
  names = train.models.layer_names(model)
  flatten_from = {'layer_2': (4, 4, 8)}
  for name, layer in zip(names, reference.layers):
    jax_grad = np.asarray(mu[name]['kernel']) / 0.1
    torch_grad = _to_jax_layout(layer.weight.grad.numpy(), jax_grad.shape,
                                flatten_from.get(name))
    scale = np.abs(jax_grad).max()
    assert scale > 0
    np.testing.assert_allclose(torch_grad, jax_grad, atol=1e-4 * scale,
                               err_msg=name)
    np.testing.assert_allclose(layer.bias.grad.numpy(),
                               np.asarray(mu[name]['bias']) / 0.1,
                               atol=1e-4 * scale, err_msg=name)
  # The advanced power-iteration vectors agree (first conv: CHW vs HWC).
  u0 = np.asarray(new_state.power_iteration['layer_0']['u'])
  np.testing.assert_allclose(reference.u[0][0].numpy().transpose(1, 2, 0), u0,
                             atol=1e-5)


def test_adjoint_is_exact_for_strided_conv():
  # <A x, y> = <x, A^T y> for the conv with stride 2 and padding 1.
  _, _, _, _, reference = _setup()
  layer = reference.layers[1]
  gen = torch.Generator().manual_seed(0)
  x = torch.randn((2, *layer.input_shape), generator=gen)
  with torch.no_grad():
    y = torch.randn(layer.apply(x).shape, generator=gen)
    lhs = (layer.apply(x) * y).sum()
    rhs = (x * layer.adjoint(y, layer.weight)).sum()
  np.testing.assert_allclose(float(lhs), float(rhs), rtol=1e-5)


def test_certified_counts_match_jax_eval():
  _, model, state, batch, reference = _setup()
  radii = (0.0, 0.01, 0.05)
  images = np.asarray(batch['image'])
  labels = np.asarray(batch['label'])
  counts = reference.certified_counts(images, labels, radii)
  bounds = train.certification_bounds(state, model, INPUT_SHAPE, 'power')
  out = model.apply(state.variables, images.astype(np.float32) / 255.0)
  logits = np.asarray(out.logits)
  assert counts['accuracy'] == np.sum(logits.argmax(-1) == labels)
  pairwise = np.asarray(bounds['pairwise'])
  for r in radii:
    gap = logits[np.arange(8), labels][:, None] - logits
    ok = np.all((gap > r * pairwise[labels]) | (np.arange(10) == labels[:,
                                                                      None]),
                axis=1) & (logits.argmax(-1) == labels)
    assert counts[f'cra_{r:.4f}'] == ok.sum(), r
