"""CRM + LipLT through the normal entry point, and the bound choice."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cll_jax import models
from cll_jax import train
from experiments import cifar10_crm
import image_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_crm_liplt_run_certifies_points(tmp_path):
  root = str(tmp_path / 'images')
  image_fixtures.write_image_folder(root)
  config = cifar10_crm.get_config('data=offline,tiny')
  config.data.kwargs.root = root
  config.data.kwargs.cache_dir = str(tmp_path / 'cache')
  config.model.name = 'tiny_cnn'
  config.data.augment.enabled = False
  config.data.num_train_examples = None
  config.data.num_test_examples = None
  config.train.num_epochs = 10
  config.train.batch_size = 32
  config.eval.batch_size = 96
  config.train.eval_every_epochs = 10
  config.optimizer.learning_rate = 5e-3
  config.train.progress_bar = False
  config.loss.crm_warmup_epochs = 1
  config.eval.radii = (0.05, 0.1)
  config.eval.bound = 'power'  # the LipLT bound the model trained with
  # One device: the LipLT products are replicated work, 8 times over on 8
  # fake devices (the data-parallel loop is tested elsewhere).
  final = train.train_and_evaluate(config, str(tmp_path / 'run'),
                                   devices=jax.devices()[:1])
  assert final['test_accuracy'] > 0.5
  assert final['test_cra_0.0500'] > 0.2

  # The LipLT bound the model trained with is no looser than the naive
  # product of the same converged layer norms.
  model, state = train.restore_state(config, str(tmp_path / 'run'), 4,
                                     (8, 8, 3))
  # Jitted: eagerly, each operation of the bounds compiles on its own.
  liplt_bounds = jax.jit(lambda state: train.certification_bounds(
      state, model, (8, 8, 3), 'power'))(state)
  naive_model = model.clone(bound='naive')
  naive_state = {k: v for k, v in state.power_iteration.items()
                 if k != 'liplt_products'}
  naive_out = jax.jit(naive_model.apply)(
      {'params': state.params, 'power_iteration': naive_state},
      jnp.zeros((1, 8, 8, 3)))
  assert float(liplt_bounds['lipschitz']) <= float(naive_out.lipschitz) * (
      1 + 1e-5)
  off = ~np.eye(4, dtype=bool)
  assert np.all(np.asarray(liplt_bounds['pairwise'])[off]
                <= np.asarray(naive_out.pairwise_lipschitz)[off] * (1 + 1e-5))


def test_liplt_with_minmax_is_a_clear_error(tmp_path):
  config = cifar10_crm.get_config('tiny')
  config.model.activation = 'minmax'
  with pytest.raises(ValueError, match=r'model\.bound.*elementwise'):
    train.train_and_evaluate(config, str(tmp_path))
  with pytest.raises(ValueError, match='elementwise'):
    models.create_model('tiny_cnn', 4, activation='minmax', bound='liplt')


def test_main_entry_point_runs_a_config(tmp_path):
  """`python -m experiments.main --config=...` with overrides, as a user types it."""
  workdir = tmp_path / 'moons'
  cmd = [sys.executable, '-m', 'experiments.main',
         '--config=experiments/moons_cll.py:tiny',
         f'--workdir={workdir}', '--config.train.num_epochs=2',
         '--config.data.kwargs.num_train=200',
         '--config.data.kwargs.num_test=200', '--config.train.batch_size=40',
         '--config.eval.batch_size=200', '--config.train.eval_every_epochs=2']
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (workdir / 'final_metrics.json').exists()
  bad = subprocess.run(cmd[:3] + [f'--workdir={workdir}_bad',
                                  '--config.loss.p_end=0.7'],
                       cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode != 0
  assert 'loss.p_end' in bad.stderr
