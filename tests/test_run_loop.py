"""The run loop never wastes a run: non-finite steps, resumes, kills, reruns."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cll_jax import checkpoints
from cll_jax import metrics_log
from cll_jax import run_records
from cll_jax import train
from experiments import moons_cll

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def moons_config(epochs=4, **train_fields):
  c = moons_cll.get_config('tiny')
  c.train.num_epochs = epochs
  c.data.kwargs.num_train = 256
  c.data.kwargs.num_test = 300
  c.train.batch_size = 64
  c.eval.batch_size = 128
  c.train.eval_every_epochs = 2
  c.train.checkpoint_every_epochs = 1
  c.train.progress_bar = False
  c.optimizer.decay_epochs = ()
  c.train.converge_max_iterations = 200
  for k, v in train_fields.items():
    c.train[k] = v
  return c


def _params(workdir, config):
  return train.restore_state(config, workdir, 2, (2,))[1]


def _assert_same_params(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a.params),
                  jax.tree_util.tree_leaves(b.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- non-finite steps --------------------------------------------------------


def test_divergent_learning_rate_stops_and_keeps_the_good_checkpoints(
    tmp_path):
  workdir = str(tmp_path)
  good = moons_config(epochs=2)
  train.train_and_evaluate(good, workdir)
  saved = sorted(os.listdir(tmp_path / 'checkpoints'))
  finished = _params(workdir, good)

  # More epochs at lr 1e6: the loss becomes non-finite within a few steps.
  bad = moons_config(epochs=6)
  bad.optimizer.learning_rate = 1e6
  with pytest.raises(train.NonFiniteError,
                     match=r'non-finite training step \d+ .*learning rate 1e\+06'):
    train.train_and_evaluate(bad, workdir, allow_config_changes=True)
  # Both good checkpoints survive, nothing newer was written.
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == saved
  assert checkpoints.latest_step(workdir) == 2 * 4
  restored = _params(workdir, good)
  _assert_same_params(restored, finished)
  assert all(np.all(np.isfinite(x))
             for x in jax.tree_util.tree_leaves(restored.params))


def test_divergent_run_exits_nonzero_naming_step_and_value(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.main',
       '--config=experiments/moons_cll.py:tiny',
       f'--workdir={tmp_path}', '--config.optimizer.learning_rate=1e6',
       '--config.data.kwargs.num_train=400', '--config.train.num_epochs=3',
       '--config.train.progress_bar=False'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 1, result.stderr[-2000:]
  message = result.stderr.strip().splitlines()[-1]
  assert message.startswith('error: non-finite training step'), message
  assert 'nan' in message or 'inf' in message
  # No checkpoint holds a non-finite state.
  step = checkpoints.latest_step(str(tmp_path))
  if step is not None:
    config = moons_cll.get_config('tiny')
    state = _params(str(tmp_path), config)
    assert all(np.all(np.isfinite(x))
               for x in jax.tree_util.tree_leaves(state.params))


def test_skip_policy_drops_the_bad_step_and_counts_it():
  config = moons_config()
  config.train.on_nonfinite = 'skip'
  mesh = train.make_mesh(jax.devices()[:1])
  model = train.create_model(config, 2)
  state = train.create_train_state(config, model, jax.random.PRNGKey(0),
                                   (2,), steps_per_epoch=4)
  step = train.make_train_step(config, 4, mesh, jax.random.PRNGKey(1))
  rng = np.random.default_rng(0)
  images = rng.normal(size=(64, 2)).astype(np.float32)
  labels = rng.integers(0, 2, 64).astype(np.int32)
  poisoned = images.copy()
  poisoned[3, 0] = np.nan
  before = jax.tree_util.tree_map(np.asarray, state.params)
  state, metrics = step(state, train.device_batch(poisoned, labels, mesh))
  assert float(metrics['finite']) == 0.0
  assert int(state.step) == 1  # the step counter moves on ...
  for a, b in zip(jax.tree_util.tree_leaves(before),
                  jax.tree_util.tree_leaves(state.params)):
    np.testing.assert_array_equal(a, b)  # ... the parameters do not.
  assert int(state.nonfinite['count']) == 1
  assert int(state.nonfinite['first_step']) == 0
  state, metrics = step(state, train.device_batch(images, labels, mesh))
  assert float(metrics['finite']) == 1.0 and int(state.step) == 2
  assert not np.array_equal(before['head']['kernel'],
                            np.asarray(state.params['head']['kernel']))


def test_stop_policy_freezes_the_state_at_the_last_finite_step():
  config = moons_config()
  mesh = train.make_mesh(jax.devices()[:1])
  model = train.create_model(config, 2)
  state = train.create_train_state(config, model, jax.random.PRNGKey(0),
                                   (2,), steps_per_epoch=4)
  step = train.make_train_step(config, 4, mesh, jax.random.PRNGKey(1))
  rng = np.random.default_rng(0)
  images = rng.normal(size=(64, 2)).astype(np.float32)
  labels = rng.integers(0, 2, 64).astype(np.int32)
  state, _ = step(state, train.device_batch(images, labels, mesh))
  good = jax.tree_util.tree_map(np.asarray, state.params)
  poisoned = images.copy()
  poisoned[0, 1] = np.inf
  state, _ = step(state, train.device_batch(poisoned, labels, mesh))
  # Later finite batches change nothing either: the run is to stop here.
  state, _ = step(state, train.device_batch(images, labels, mesh))
  assert int(state.step) == 1 and int(state.nonfinite['first_step']) == 1
  for a, b in zip(jax.tree_util.tree_leaves(good),
                  jax.tree_util.tree_leaves(state.params)):
    np.testing.assert_array_equal(a, b)


# --- resuming ----------------------------------------------------------------


def test_resume_refuses_a_changed_model_before_training(tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(moons_config(epochs=2), workdir)
  before = (tmp_path / 'metrics.jsonl').read_text()
  changed = moons_config(epochs=4)
  changed.model.num_power_iterations = 3
  changed.loss.lam = 1e-3
  with pytest.raises(run_records.ConfigChangeError) as error:
    train.train_and_evaluate(changed, workdir)
  message = str(error.value)
  assert 'model.num_power_iterations: 5 -> 3' in message
  assert 'loss.lam' in message and 'train.num_epochs' not in message
  assert (tmp_path / 'metrics.jsonl').read_text() == before
  assert checkpoints.latest_step(workdir) == 8


def test_resume_of_a_run_that_predates_a_config_field(tmp_path):
  """Fields added to the library later are no change at their defaults."""
  workdir = str(tmp_path)
  train.train_and_evaluate(moons_config(epochs=2), workdir)
  stored = run_records.read_json(workdir, run_records.CONFIG_FILE)
  del stored['loss']['p_convention'], stored['loss']['gloro_logit_scale']
  run_records.write_json(workdir, run_records.CONFIG_FILE, stored)
  assert run_records.check_resume(workdir, moons_config(epochs=4)) == {
      'train.num_epochs': (2, 4)}
  other = moons_config(epochs=4)
  other.loss.p_convention = 'code'  # not what the run was trained with
  with pytest.raises(run_records.ConfigChangeError,
                     match="loss.p_convention: '<absent>' -> 'code'"):
    run_records.check_resume(workdir, other)


def test_resume_with_new_radii_completes_and_plots(tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(moons_config(epochs=2), workdir)
  more = moons_config(epochs=4)
  more.eval.radii = (0.05, 0.5)  # a free change: no flag needed
  final = train.train_and_evaluate(more, workdir)
  assert 'test_cra_0.5000' in final and 'test_cra_0.0500' in final
  records = metrics_log.read_records(workdir)
  assert [r['step'] for r in records] == [4, 8, 12, 16]
  assert os.path.exists(tmp_path / 'curves.png')
  # A deliberate change of the training radius (which joins the eval radii)
  # with the flag: the plot copes with the metric set changing again.
  again = moons_config(epochs=6)
  again.loss.epsilon = 0.2
  final = train.train_and_evaluate(again, workdir, allow_config_changes=True)
  assert 'test_cra_0.2000' in final
  changes = [json.loads(line) for line in
             open(tmp_path / run_records.CHANGES_FILE)]
  assert 'loss.epsilon' in changes[-1]['changes']
  assert run_records.load_config(workdir).loss.epsilon == 0.2


def test_finished_run_reruns_as_a_noop_keeping_its_results(tmp_path):
  workdir = str(tmp_path)
  config = moons_config(epochs=2)
  first = train.train_and_evaluate(config, workdir)
  stored = (tmp_path / train.FINAL_METRICS_FILE).read_text()
  records = metrics_log.read_records(workdir)
  again = train.train_and_evaluate(config, workdir)
  assert (tmp_path / train.FINAL_METRICS_FILE).read_text() == stored
  assert metrics_log.read_records(workdir) == records
  assert again['test_accuracy'] == pytest.approx(first['test_accuracy'])
  # Other eval radii: the final state is evaluated again, nothing trained.
  config.eval.radii = (0.3,)
  redone = train.train_and_evaluate(config, workdir)
  assert 'test_cra_0.3000' in redone
  assert redone['test_accuracy'] == pytest.approx(first['test_accuracy'])
  assert [r['step'] for r in metrics_log.read_records(workdir)] == [4, 8]


_KILLER = textwrap.dedent('''
    import os, signal, sys, time
    sys.path.insert(0, {repo!r})
    import tests.test_run_loop as t
    from cll_jax import checkpoints
    from cll_jax import train
    config = t.moons_config(epochs=6, checkpoint_every_epochs=2,
                            eval_every_epochs=1)
    original = train.data_lib.train_batches

    def dying_batches(*args, epoch, **kwargs):
      for i, batch in enumerate(original(*args, epoch=epoch, **kwargs)):
        if epoch == 3 and i == 2:
          # Checkpoint at epoch 2, records of epochs 1-3 written: die in
          # the middle of epoch 4, once the (asynchronous) save of epoch 2
          # is complete.
          deadline = time.time() + 120
          while (checkpoints.latest_step(sys.argv[1]) != 8
                 and time.time() < deadline):
            time.sleep(0.1)
          os.kill(os.getpid(), signal.SIGKILL)
        yield batch

    train.data_lib.train_batches = dying_batches
    train.train_and_evaluate(config, sys.argv[1])
''')


def test_sigkill_mid_epoch_then_restart_equals_an_uninterrupted_run(tmp_path):
  straight = str(tmp_path / 'straight')
  config = moons_config(epochs=6, checkpoint_every_epochs=2,
                        eval_every_epochs=1)
  train.train_and_evaluate(config, straight)

  killed = str(tmp_path / 'killed')
  script = tmp_path / 'killer.py'
  script.write_text(_KILLER.format(repo=REPO))
  result = subprocess.run([sys.executable, str(script), killed], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
  # The kill left a record (epoch 3) past the last checkpoint (epoch 2).
  assert checkpoints.latest_step(killed) == 2 * 4
  assert max(r['step'] for r in metrics_log.read_records(killed)) == 3 * 4

  train.train_and_evaluate(config, killed)
  _assert_same_params(_params(killed, config), _params(straight, config))
  steps = [r['step'] for r in metrics_log.read_records(killed)]
  assert steps == sorted(set(steps)) == [4, 8, 12, 16, 20, 24]
  a = metrics_log.read_records(killed)[-1]
  b = metrics_log.read_records(straight)[-1]
  assert a['test_accuracy'] == b['test_accuracy']


# --- the metric log ------------------------------------------------------------


def test_metric_log_drops_records_past_the_resume_step_and_cut_lines(
    tmp_path):
  workdir = str(tmp_path)
  with open(tmp_path / metrics_log.METRICS_FILE, 'w') as f:
    for step in (10, 20, 30):
      f.write(json.dumps({'step': step, 'epoch': step // 10}) + '\n')
    f.write('{"step": 40, "ep')  # cut short by a kill
  assert metrics_log.truncate_after(workdir, 20) == 1
  assert [r['step'] for r in metrics_log.read_records(workdir)] == [10, 20]
  assert (tmp_path / metrics_log.METRICS_FILE).read_text().count('\n') == 2


def test_curves_plot_metric_sets_that_change_between_records(tmp_path):
  workdir = str(tmp_path)
  metrics_log.write_records(workdir, [
      {'step': 1, 'epoch': 1, 'train_loss': 1.0, 'train_accuracy': 0.5,
       'test_accuracy': 0.4, 'test_cra_0.1000': 0.2},
      {'step': 2, 'epoch': 2, 'train_loss': 0.5, 'train_accuracy': 0.6},
      {'step': 3, 'epoch': 3, 'train_loss': 0.4, 'train_accuracy': 0.7,
       'test_accuracy': 0.5, 'test_cra_0.5000': 0.1},
  ])
  metrics_log.plot_curves(workdir)
  assert os.path.getsize(tmp_path / 'curves.png') > 1000


def test_model_refuses_integer_images():
  config = moons_config()
  config.model.name = 'tiny_cnn'
  model = train.create_model(config, 4)
  # Jitted: an eager init compiles each of its operations on its own.
  variables = jax.jit(model.init)(jax.random.PRNGKey(0),
                                  jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match='uint8.*to_float'):
    model.apply(variables, jnp.zeros((1, 8, 8, 3), jnp.uint8))
