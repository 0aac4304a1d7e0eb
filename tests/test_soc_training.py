"""A SOC network trained through the real loop on offline CIFAR-10.

Certificates of the constrained network must hold (PGD at each point's
certified radius breaks none) and must be exactly what the contract says:
the product of the proven layer bounds times the head's pairwise factor.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cll_jax import attacks
from cll_jax import certify
from cll_jax import configs
from cll_jax import forward_error
from cll_jax import layers
from cll_jax import models
from cll_jax import sound_bounds
from cll_jax import train
from experiments import cifar10_lipconv20

pytestmark = pytest.mark.skipif(
    not os.path.exists(configs.shared_dataset('cifar10_jpeg.tar.gz')),
    reason='offline CIFAR-10 copy not present')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('lipconv'))
  config = cifar10_lipconv20.get_config('data=offline,tiny')
  config.data.num_train_examples = 256
  config.data.num_test_examples = 100
  config.train.num_epochs = 2
  config.train.eval_every_epochs = 2
  config.train.progress_bar = False
  # One device: the SOC bounds and power iterations are replicated work,
  # which 8 fake devices on 2 cores would repeat 8 times (the data-parallel
  # loop is tested in test_shipped_configs and test_train).
  final = train.train_and_evaluate(config, workdir,
                                   devices=jax.devices()[:1])
  dataset = train.load_dataset(config)
  model, state = train.restore_state(config, workdir, 10, (32, 32, 3))
  x = jnp.asarray(dataset.test_images, jnp.float32) / 255.0
  # The sound bounds as the run's own evaluation computes them (jitted, in
  # `eval.precision`, float64, from the state replicated over the run's
  # mesh: the loop's own program, from JAX's compilation cache), once for
  # both tests.
  on_mesh = jax.device_put(state, jax.sharding.NamedSharding(
      train.make_mesh(jax.devices()[:1]), jax.sharding.PartitionSpec()))
  with forward_error.precision_scope(config.eval.precision):
    bounds = jax.jit(functools.partial(
        train.certification_bounds, model=model, input_shape=(32, 32, 3),
        method='sound'))(on_mesh)
  return dict(config=config, final=final, model=model, state=state, x=x,
              labels=dataset.test_labels, bounds=bounds)


def test_certificate_is_the_product_of_proven_layer_bounds(trained):
  model, state, bounds = trained['model'], trained['state'], trained['bounds']
  layer_bounds = np.asarray(bounds['layer_norms'][:-1], np.float64)
  assert all(s.bound_kind == layers.PROVEN for s in model.architecture)
  assert np.all(layer_bounds >= 1) and np.all(layer_bounds <= 1 + 1e-5)
  head = model.head_spec.pairwise(state.params['head'])
  expected = (np.asarray(head, np.float64) * model.input_scale
              * np.prod(layer_bounds)
              * (1 + sound_bounds.DEFAULT_RELATIVE_FLOAT_ALLOWANCE))
  np.testing.assert_allclose(bounds['pairwise'], expected, rtol=1e-6)
  # The run's own evaluation used exactly these bounds.
  assert trained['final']['lipschitz_f'] == pytest.approx(
      float(np.max(bounds['pairwise'])), rel=1e-6)
  assert trained['final']['test_count'] == 100


def test_pgd_breaks_no_certified_point(trained):
  model, state, bounds = trained['model'], trained['state'], trained['bounds']
  apply_fn = lambda z: model.apply(state.variables, z).logits
  logits = jax.jit(apply_fn)(trained['x'])
  radius = np.asarray(certify.certified_radius(logits, bounds['pairwise']))
  certified = radius > 0
  assert certified.sum() >= 10, 'too few certified points to test'
  # At most 24 of them: each PGD step differentiates 5 layers x 15 terms.
  certified &= np.cumsum(certified) <= 24
  pred = jnp.argmax(logits[certified], -1)
  _, margins = jax.jit(lambda z, r: attacks.pgd_l2_attack(
      apply_fn, z, pred, r, rng=jax.random.PRNGKey(0), num_steps=20,
      num_restarts=3, clip_min=0.0, clip_max=1.0))(
          trained['x'][certified], 0.999 * jnp.asarray(radius[certified]))
  assert np.all(np.asarray(margins) > 0)
