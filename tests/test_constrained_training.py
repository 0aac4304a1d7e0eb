"""Each 1-Lipschitz family, trained through the real loop on offline CIFAR-10.

A tiny network of every family (CPL, SLL, AOL, Sandwich) trains on 256
images with its own loss, is certified by the run's own evaluation (sound
bounds, float64 with the rounding bound), and PGD with restarts at 0.999 x
each certified radius breaks none of the certified test points. The layer
bounds are the specs' proven ones, each within 1 + 1e-2 of 1 after the
evaluation's power-iteration convergence (CPL's bound is about 1 + 4x the
estimate's shortfall below the true norm: 1 + 1e-3 here after the loop's
500 convergence iterations; the other families are 1 to rounding).
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
from cll_jax import train
from experiments import cifar10_cpl_xl
from experiments import cifar10_sll_xl

pytestmark = pytest.mark.skipif(
    not os.path.exists(configs.shared_dataset('cifar10_jpeg.tar.gz')),
    reason='offline CIFAR-10 copy not present')

# family -> (config module, its own loss's argument)
FAMILIES = {
    'cpl': (cifar10_cpl_xl, 'loss=cpl'),
    'sll': (cifar10_sll_xl, 'loss=sll'),
    'aol': (cifar10_sll_xl, 'loss=sll'),
    'sandwich': (cifar10_sll_xl, 'loss=sll'),
}


def _train(family, workdir):
  module, arg = FAMILIES[family]
  config = module.get_config(f'data=offline,tiny,{arg}')
  config.model.name = f'{family}_tiny'
  config.data.num_train_examples = 256
  config.data.num_test_examples = 64
  config.eval.batch_size = 64
  config.train.num_epochs = 2
  config.train.eval_every_epochs = 2
  config.train.progress_bar = False
  config.optimizer.learning_rate = 1e-2
  final = train.train_and_evaluate(config, workdir)
  dataset = train.load_dataset(config)
  model, state = train.restore_state(config, workdir, 10, (32, 32, 3))
  x = jnp.asarray(dataset.test_images, jnp.float32) / 255.0
  return final, model, state, x


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_trained_family_certificates_survive_pgd(family, tmp_path):
  final, model, state, x = _train(family, str(tmp_path))
  assert final['test_count'] == 64
  # As the run's evaluation: sound bounds computed in float64.
  with forward_error.precision_scope('float64'):
    bounds = jax.tree.map(np.asarray, train.certification_bounds(
        state, model, (32, 32, 3), 'sound'))
  layer_bounds = np.asarray(bounds['layer_norms'][:-1], np.float64)
  assert all(s.bound_kind == layers.PROVEN for s in model.architecture)
  assert np.all(layer_bounds <= 1 + 1e-2), layer_bounds
  if family != 'cpl':
    assert np.all(layer_bounds <= 1 + 1e-5), layer_bounds
  # The run's own evaluation certified with these bounds.
  assert final['lipschitz_f'] == pytest.approx(
      float(np.max(bounds['pairwise'])), rel=1e-5)
  apply_fn = lambda z: model.apply(state.variables, z).logits
  logits = jax.jit(apply_fn)(x)
  radius = np.asarray(certify.certified_radius(logits, bounds['pairwise']))
  certified = radius > 0
  assert certified.sum() >= 5, f'{family}: too few certified points to test'
  pred = jnp.argmax(logits[certified], -1)
  attack = jax.jit(functools.partial(
      attacks.pgd_l2_attack, apply_fn, num_steps=20, num_restarts=3,
      clip_min=0.0, clip_max=1.0))
  _, margins = attack(x[certified], pred,
                      0.999 * jnp.asarray(radius[certified]),
                      rng=jax.random.PRNGKey(0))
  assert np.all(np.asarray(margins) > 0)
