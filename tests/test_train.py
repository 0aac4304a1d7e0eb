"""The real training loop on tiny configs: end to end, devices, resume, config errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cll_jax import certify
from cll_jax import configs
from cll_jax import losses
from cll_jax import models
from cll_jax import sound_bounds
from cll_jax import train
from cll_jax.config_validation import validate_config
from experiments import cifar10_4c3f
from experiments import moons_cll
from experiments import tinyimagenet_8c2f


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


@pytest.mark.parametrize('field, value, message', [
    ('model.name', 'resnet9000', 'model.name'),
    ('data.name', 'imagenet22k', 'data.name'),
    ('loss.p_end', 0.7, 'loss.p_end'),
    ('loss.p_start', 0.0, 'loss.p_start'),
    ('loss.epsilon', 0.0, 'loss.epsilon'),
    ('loss.epsilon', -1.0, 'loss.epsilon'),
    ('train.batch_size', 0, 'train.batch_size'),
    ('eval.batch_size', 0, 'eval.batch_size'),
    ('train.on_nonfinite', 'ignore', 'train.on_nonfinite'),
    ('loss.name', 'hinge', 'loss.name'),
    ('eval.bound', 'guess', 'eval.bound'),
    ('loss.gloro_variant', 'offical', 'loss.gloro_variant'),
    ('loss.gloro_variant', 'official', 'loss.gloro_variant'),  # with CLL
    ('eval.precision', 'float16', 'eval.precision'),
    ('model.input_std', (0.2, float('nan'), 0.2), 'model.input_std'),
    ('loss.epsilon', float('inf'), 'loss.epsilon=inf'),
    ('loss.epsilon', 1e-46, 'loss.epsilon=1e-46'),
    ('loss.p_start', 1e-39, 'loss.p_start=1e-39'),
    ('loss.delta', float('inf'), 'loss.delta=inf'),
    ('eval.radii', (0.1, float('inf')), 'eval.radii'),
    ('loss.p_convention', 'twice', 'loss.p_convention'),
    ('loss.gloro_logit_scale', 0.0, 'loss.gloro_logit_scale'),
    ('loss.gloro_logit_scale', 2.0, 'loss.gloro_logit_scale'),  # with CLL
])
def test_invalid_config_fails_before_training(tmp_path, field, value, message):
  config = tiny_moons_config()
  section, key = field.split('.')
  config[section][key] = value
  with pytest.raises(ValueError, match=message.replace('.', r'\.')):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_gloro_official_variant_in_the_training_loss():
  """`loss.gloro_variant='official'`: same loss, head gradient changed only.

  The head factor is ||w_0 - w_1|| of the head's class vectors (numpy), its
  gradient (w_0 - w_1) / d on column 0 and the negative on column 1, and none
  into the body.
  """
  config = tiny_moons_config(loss='gloro')
  config.model.bound = 'liplt'
  config.model.activation = 'relu'
  config.loss.gloro_variant = 'official'
  with pytest.raises(ValueError, match=r"loss\.gloro_variant.*'naive'"):
    validate_config(config)
  config = tiny_moons_config(loss='gloro')
  model = train.create_model(config, 2)
  state = train.create_train_state(config, model, jax.random.PRNGKey(0),
                                   (2,), 4)
  sched = train.loss_schedules(config, 4)
  x = jax.random.normal(jax.random.PRNGKey(1), (32, 2))
  y = jnp.arange(32) % 2
  official = config.copy_and_resolve_references()
  official.loss.gloro_variant = 'official'

  @jax.jit
  def values_and_grads(params):
    def forward(params):
      return model.apply({'params': params,
                          'power_iteration': state.power_iteration}, x)

    def mean_loss(params, c):
      out = forward(params)
      return jnp.mean(train.per_example_loss(
          c, sched, out, y, jnp.asarray(0), jnp.asarray(0))[0])

    def head_factor(params):
      return train.gloro_head_lipschitz(official.loss, forward(params))

    return (jax.value_and_grad(head_factor)(params),
            jax.value_and_grad(mean_loss)(params, config),
            jax.value_and_grad(mean_loss)(params, official))

  (h, h_grad), (loss_f, g_faithful), (loss_o, g_official) = values_and_grads(
      state.params)
  assert train.gloro_head_lipschitz(
      config.loss, model.apply(state.variables, x)) is None
  head = np.asarray(state.params['head']['kernel'], np.float64)
  diff = head[:, 0] - head[:, 1]
  assert float(h) == pytest.approx(np.linalg.norm(diff), rel=1e-5)
  unit = diff / np.linalg.norm(diff)
  np.testing.assert_allclose(h_grad['head']['kernel'],
                             np.stack([unit, -unit], 1), rtol=1e-4,
                             atol=1e-6)
  for name in h_grad:
    if name != 'head':
      assert np.abs(np.asarray(h_grad[name]['kernel'])).max() < 1e-5, name

  assert float(loss_o) == float(loss_f)
  assert not np.allclose(g_official['head']['kernel'],
                         g_faithful['head']['kernel'], rtol=1e-3)
  for name in g_faithful:
    if name != 'head':
      np.testing.assert_allclose(g_official[name]['kernel'],
                                 g_faithful[name]['kernel'], rtol=1e-4,
                                 atol=1e-6)


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


def test_p_convention_code_is_twice_the_p_of_eq5():
  """`loss.p_convention='code'`: p_code = 2 p (the official code's width
  logit(1 - p/2) - logit(p/2)), checked against the K^(h o f) of the paper's
  tables, which use either convention."""
  paper = cifar10_4c3f.get_config('p=0.7')
  with pytest.raises(ValueError, match=r"loss\.p_start=0\.7.*p_convention="
                                       r"'code'"):
    validate_config(paper)
  code = cifar10_4c3f.get_config('p=0.7,p_convention=code')
  validate_config(code)
  sched = train.loss_schedules(code, 10)
  assert float(sched.slack(0)) == pytest.approx(0.35)
  code.loss.p_end = 1.0
  with pytest.raises(ValueError, match=r'loss\.p_end=1\.0.*\(0, 1\)'):
    validate_config(code)

  def k_hf(config):
    return train.lipschitz_hf(config, train.loss_schedules(config, 10), 0,
                              lipschitz_f=1.0)
  # Table 2 (CIFAR-10 4C3F, p = 0.15 of eq. 5): 11.6; table 1 (Tiny-ImageNet
  # 8C2F, p_code 0.01 and 0.025): 10.6 and 4.4.
  assert k_hf(cifar10_4c3f.get_config()) == pytest.approx(11.6, abs=0.05)
  tin = tinyimagenet_8c2f.get_config('variant=eps0.5')
  assert tin.loss.p_convention == 'code'
  assert k_hf(tin) == pytest.approx(10.6, abs=0.05)
  assert k_hf(tinyimagenet_8c2f.get_config('variant=eps1.0')) == (
      pytest.approx(4.4, abs=0.05))


def test_gloro_logit_scale_in_the_training_loss():
  config = tiny_moons_config(loss='gloro')
  config.loss.gloro_logit_scale = 2.5
  validate_config(config)
  model = train.create_model(config, 2)
  state = train.create_train_state(config, model, jax.random.PRNGKey(0),
                                   (2,), 4)
  sched = train.loss_schedules(config, 4)
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 2))
  y = jnp.arange(16) % 2
  out = model.apply(state.variables, x)
  values, _ = train.per_example_loss(config, sched, out, y, jnp.asarray(0),
                                     jnp.asarray(0))
  want = losses.gloro_loss(out.logits, y, out.pairwise_lipschitz,
                           sched.epsilon(0), logit_scale=2.5)
  np.testing.assert_allclose(values, want, rtol=1e-6)
  assert train.lipschitz_hf(config, sched, 0, lipschitz_f=3.0) == 7.5
