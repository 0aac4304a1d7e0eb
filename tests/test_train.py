"""The real training loop on tiny configs: end to end, devices, resume, config errors."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from cll_jax import certify
from cll_jax import configs
from cll_jax import models
from cll_jax import sound_bounds
from cll_jax import train
from experiments import cifar10_4c3f
from experiments import moons_cll


def tiny_moons_config(epochs=4, loss='cll'):
  c = moons_cll.get_config('tiny')
  c.loss.name = loss
  c.train.num_epochs = epochs
  c.data.kwargs.num_train = 256
  c.data.kwargs.num_test = 300  # not a multiple of the eval batch: padding
  c.train.batch_size = 64
  c.eval.batch_size = 128
  c.train.eval_every_epochs = 2
  c.train.checkpoint_every_epochs = 1
  c.train.progress_bar = False
  c.optimizer.decay_epochs = (2,)
  c.train.converge_max_iterations = 200
  return c


def test_end_to_end_moons_reports_certified_numbers_from_certify_path(tmp_path):
  config = tiny_moons_config()
  final = train.train_and_evaluate(config, str(tmp_path))

  assert final['test_count'] == 300  # every test example, none dropped
  radius_key = f'test_cra_{config.loss.epsilon:.4f}'
  for key in ('test_accuracy', radius_key, 'lipschitz_f', 'lipschitz_hf',
              'layer_norms', 'train_loss'):
    assert key in final, key
  assert os.path.exists(tmp_path / 'metrics.jsonl')
  assert os.path.exists(tmp_path / 'curves.png')
  on_disk = json.load(open(tmp_path / 'final_metrics.json'))
  assert on_disk['test_accuracy'] == pytest.approx(final['test_accuracy'])

  # Recompute CRA independently: restore the final checkpoint, bound every
  # layer with the sound bounds, certify with the strict margin rule.
  dataset = train.load_dataset(config)
  model, state = train.restore_state(config, str(tmp_path),
                                     dataset.num_classes, (2,))
  ops = models.network_operators(model, state.params, (2,))
  norms = [float(sound_bounds.operator_norm_upper_bound(op)) for op in ops]
  out = model.apply(state.variables, jnp.asarray(dataset.test_images))
  logits = np.asarray(out.logits, np.float64)
  head = np.asarray(ops[-1].kernel, np.float64)
  prefix = np.prod(norms[:-1]) * (
      1 + sound_bounds.DEFAULT_RELATIVE_FLOAT_ALLOWANCE) ** len(ops)
  labels = dataset.test_labels
  certified = 0
  for x_logits, y in zip(logits, labels):
    c = int(np.argmax(x_logits))
    if c != y:
      continue
    ok = all(x_logits[c] - x_logits[j]
             > config.loss.epsilon * prefix * np.linalg.norm(
                 head[:, c] - head[:, j])
             for j in range(len(x_logits)) if j != c)
    certified += ok
  assert final[radius_key] == pytest.approx(certified / len(labels), abs=1e-3)

  # The report says which arithmetic certified.
  assert final['certification_precision'] == 'float64'


def test_one_step_on_eight_devices_equals_one_device():
  assert jax.device_count() >= 8
  config = cifar10_4c3f.get_config('tiny')
  config.model.name = 'tiny_cnn'
  config.loss.lam = 1e-3
  input_shape = (8, 8, 3)
  model = train.create_model(config, 10)
  sched = train.loss_schedules(config, steps_per_epoch=10)
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (64, *input_shape), dtype=np.uint8),
           'label': rng.integers(0, 10, (64,)).astype(np.int32)}
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    mesh = train.make_mesh(devices)
    state = train.create_train_state(config, model, jax.random.PRNGKey(0),
                                     input_shape, steps_per_epoch=10)
    replicated = NamedSharding(mesh, PartitionSpec())
    data = NamedSharding(mesh, PartitionSpec('data'))
    step = jax.jit(
        functools.partial(train.train_step, config=config, sched=sched,
                          steps_per_epoch=10, rng=jax.random.PRNGKey(3)),
        in_shardings=(replicated, data), out_shardings=(replicated, replicated))
    state = jax.device_put(state, replicated)
    state, metrics = step(state, train._put_global(batch, data))
    results.append((state, metrics))
  (s1, m1), (s8, m8) = results
  # Adam's first update is about lr * sign(g) = 1e-3 per weight; the global
  # mean over 8 shards differs from the 1-device mean only by summation order.
  for a, b in zip(jax.tree_util.tree_leaves((s1.params, s1.power_iteration)),
                  jax.tree_util.tree_leaves((s8.params, s8.power_iteration))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(m1['loss'], m8['loss'], rtol=1e-5)
  # The step really ran on 8 devices.
  assert len(s8.params['head']['kernel'].sharding.device_set) == 8


def test_killed_run_resumes_to_the_same_parameters(tmp_path, monkeypatch):
  config = tiny_moons_config(epochs=4)
  straight = train.train_and_evaluate(config, str(tmp_path / 'straight'))

  original_save = train._save
  saves = []

  def save_then_die(manager, state, force=False):
    original_save(manager, state, force)
    saves.append(int(state.step))
    if len(saves) == 2:
      manager.wait_until_finished()
      raise KeyboardInterrupt('killed after the second checkpoint')

  monkeypatch.setattr(train, '_save', save_then_die)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / 'killed'))
  monkeypatch.setattr(train, '_save', original_save)
  resumed = train.train_and_evaluate(config, str(tmp_path / 'killed'))

  def final_params(workdir):
    return train.restore_state(config, workdir, 2, (2,))[1]

  a = final_params(str(tmp_path / 'straight'))
  b = final_params(str(tmp_path / 'killed'))
  assert int(a.step) == int(b.step) == 16
  for x, y in zip(jax.tree_util.tree_leaves(a.params),
                  jax.tree_util.tree_leaves(b.params)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  assert resumed['test_accuracy'] == pytest.approx(straight['test_accuracy'])


@pytest.mark.parametrize('field, value, message', [
    ('model.name', 'resnet9000', 'model.name'),
    ('data.name', 'imagenet22k', 'data.name'),
    ('loss.p_end', 0.7, 'loss.p_end'),
    ('loss.p_start', 0.0, 'loss.p_start'),
    ('loss.epsilon', 0.0, 'loss.epsilon'),
    ('loss.epsilon', -1.0, 'loss.epsilon'),
    ('train.batch_size', 100, 'train.batch_size'),  # 8 devices
    ('loss.name', 'hinge', 'loss.name'),
    ('eval.bound', 'guess', 'eval.bound'),
    ('eval.precision', 'float16', 'eval.precision'),
    ('model.input_std', (0.2, float('nan'), 0.2), 'model.input_std'),
    ('loss.epsilon', float('inf'), 'loss.epsilon=inf'),
    ('loss.epsilon', 1e-46, 'loss.epsilon=1e-46'),
    ('loss.p_start', 1e-39, 'loss.p_start=1e-39'),
    ('loss.delta', float('inf'), 'loss.delta=inf'),
    ('eval.radii', (0.1, float('inf')), 'eval.radii'),
])
def test_invalid_config_fails_before_training(tmp_path, field, value, message):
  config = tiny_moons_config()
  section, key = field.split('.')
  config[section][key] = value
  with pytest.raises(ValueError, match=message.replace('.', r'\.')):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_missing_data_path_names_the_field(tmp_path):
  config = cifar10_4c3f.get_config('data=offline,tiny')
  config.data.kwargs.root = str(tmp_path / 'nowhere')
  with pytest.raises(ValueError, match=r'data\.kwargs\.root'):
    train.train_and_evaluate(config, str(tmp_path))


def test_config_argument_parsing():
  c = moons_cll.get_config('eps=0.2,tiny')
  assert c.loss.epsilon == pytest.approx(0.2)
  assert c.train.num_epochs == 20
  with pytest.raises(ValueError, match='bogus'):
    moons_cll.get_config('bogus=1')
  assert configs.DEFAULT_RADII == certify.DEFAULT_RADII
