"""The training loop: `train_and_evaluate(config, workdir)`.

The shape follows flax's `examples/imagenet`; the state and the jitted steps
live in `cll_jax.steps` (re-exported here), checkpoints in
`cll_jax.checkpoints`, the metric log in `cll_jax.metrics_log` and the run's
own records (config, class names) in `cll_jax.run_records`.

Data parallelism uses `jax.jit` with a `NamedSharding` over a 1-D 'data'
mesh of all devices: the global batch is split along its leading axis, the
state is replicated, and XLA inserts the gradient all-reduce. Batches that do
not divide by the device count are padded with masked rows (weight 0), so any
batch size runs on any number of devices with the same result.

No run loses work, and none is wasted:
* checkpoints are atomic (orbax) and a killed run resumes from the latest;
  metric records written after that checkpoint are dropped on resume;
* a step with a non-finite loss or gradient is never applied and never
  saved; by default the run stops with `NonFiniteError`
  (`config.train.on_nonfinite='skip'` skips such steps and counts them);
* a rerun checks its config against the one the workdir was trained with
  (`run_records.check_resume`), and a finished run reruns as a no-op (or
  only re-evaluates, when the evaluation settings changed).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cll_jax import checkpoints
from cll_jax import data as data_lib
from cll_jax import forward_error
from cll_jax import losses
from cll_jax import metrics_log
from cll_jax import models
from cll_jax import run_records
from cll_jax.config_validation import validate_config
# The state and steps, re-exported: `train.train_step` etc. as in flax's
# examples.
from cll_jax.objectives import (  # pylint: disable=unused-import
    LossSchedules, gloro_head_lipschitz, loss_schedules, per_example_loss)
from cll_jax.steps import (  # pylint: disable=unused-import
    Batch, TrainState, certification_bounds, create_model,
    create_train_state, eval_step, learning_rate_schedule, prepare_images,
    radius_names, train_step)

FINAL_METRICS_FILE = 'final_metrics.json'


class NonFiniteError(RuntimeError):
  """A training step produced a non-finite loss or gradient."""


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named 'data' over `devices` (default: all, every host)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), ('data',))


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


# --------------------------------------------------------------------------
# Data


def load_dataset(config):
  """Loads the configured dataset, cut to a random subset if asked.

  Loaders may return examples grouped by class, so a subset is drawn with a
  fixed permutation (seed 0), never as the first n examples.
  """
  dataset = data_lib.load_dataset(config.data.name,
                                  **config.data.kwargs.to_dict())
  n_train = config.data.get('num_train_examples')
  n_test = config.data.get('num_test_examples')
  rng = np.random.default_rng(0)
  if n_train:
    keep = np.sort(rng.permutation(len(dataset.train_labels))[:n_train])
    dataset.train_images = dataset.train_images[keep]
    dataset.train_labels = dataset.train_labels[keep]
  if n_test:
    keep = np.sort(rng.permutation(len(dataset.test_labels))[:n_test])
    dataset.test_images = dataset.test_images[keep]
    dataset.test_labels = dataset.test_labels[keep]
  return dataset


def dataset_info(config, dataset) -> dict[str, Any]:
  """What `dataset.json` records: enough to certify new inputs later."""
  return {'name': config.data.name, 'num_classes': dataset.num_classes,
          'class_names': list(dataset.class_names),
          'image_shape': list(dataset.image_shape),
          'image_dtype': str(dataset.train_images.dtype)}


def _put_global(batch: dict[str, np.ndarray], sharding) -> Batch:
  """Host-local numpy batch -> one global array sharded over 'data'."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in batch.items()}


def _pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Zero rows up to `size`, and a mask that is 1 on the real rows."""
  n = len(batch['label'])
  out = {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)])
         if size > n else v for k, v in batch.items()}
  out['mask'] = (np.arange(size) < n).astype(np.float32)
  return out


def local_batch_size(global_batch: int, mesh: Mesh) -> tuple[int, int]:
  """(examples per host, padded to a multiple of its devices)."""
  local = global_batch // jax.process_count()
  return local, round_up(local, len(mesh.local_devices))


def device_batch(images: np.ndarray, labels: np.ndarray, mesh: Mesh) -> Batch:
  """A host's training batch as one global batch sharded over 'data'.

  The rows are padded to a multiple of the local device count and a `mask`
  gives the padding weight 0, so the step's means are those of the real
  examples on any number of devices.
  """
  _, padded = local_batch_size(len(labels) * jax.process_count(), mesh)
  return _put_global(_pad_batch({'image': images, 'label': labels}, padded),
                     NamedSharding(mesh, PartitionSpec('data')))


def make_train_step(config, steps_per_epoch: int, mesh: Mesh,
                    rng: jax.Array):
  """`train_step` jitted over `mesh`: batch sharded, state replicated.

  Args:
    config: the experiment config.
    steps_per_epoch: training steps per epoch (for the schedules).
    mesh: the 1-D 'data' mesh.
    rng: the augmentation key (step s uses `fold_in(rng, s)`).

  Returns:
    `step(state, batch) -> (state, metrics)`; the state argument is
    donated.
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(
      functools.partial(train_step, config=config,
                        sched=loss_schedules(config, steps_per_epoch),
                        steps_per_epoch=steps_per_epoch, rng=rng),
      in_shardings=(replicated, NamedSharding(mesh, PartitionSpec('data'))),
      out_shardings=(replicated, replicated), donate_argnums=0)


# --------------------------------------------------------------------------
# Evaluation


def evaluate(state: TrainState, dataset, config, mesh, jitted_eval,
             jitted_bounds) -> dict[str, Any]:
  """Clean accuracy and CRA over *every* test example (last batch padded).

  Each host evaluates its own contiguous share of the test set, padded with
  masked rows to the same number of batches on every host; the batch is
  rounded up to a multiple of the local device count, so any
  `config.eval.batch_size` runs on any number of devices.
  `jitted_bounds(state)` gives the certification bounds, once per call.
  Both run in `config.eval.precision` (`forward_error.precision_scope`).
  """
  precision = config.eval.get('precision', 'float64')
  jitted_eval = forward_error.in_precision(jitted_eval, precision)
  jitted_bounds = forward_error.in_precision(jitted_bounds, precision)
  bounds = jitted_bounds(state)
  sharding = NamedSharding(mesh, PartitionSpec('data'))
  hosts, host = jax.process_count(), jax.process_index()
  local_batch = round_up(-(-config.eval.batch_size // hosts),
                         len(mesh.local_devices))
  n = len(dataset.test_labels)
  per_host = -(-n // hosts)
  start, stop = min(n, host * per_host), min(n, (host + 1) * per_host)
  num_batches = max(1, -(-per_host // local_batch))
  totals: dict[str, float] = {}
  for images, labels, mask in data_lib.eval_batches(
      dataset.test_images[start:stop], dataset.test_labels[start:stop],
      local_batch, num_batches=num_batches):
    batch = _put_global({'image': images, 'label': labels,
                         'mask': mask.astype(np.float32)}, sharding)
    counts = jitted_eval(state, batch, bounds)
    for k, v in counts.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  count = totals.pop('count')
  metrics = {'test_accuracy': totals.pop('correct') / count,
             'test_count': count, 'certification_precision': precision}
  for k, v in totals.items():
    metrics[f'test_{k}'] = v / count
  pairwise = np.asarray(bounds['pairwise'])
  metrics['lipschitz_f'] = float(pairwise.max())
  metrics['lipschitz_global'] = float(bounds['lipschitz'])
  metrics['layer_norms'] = [float(x) for x in bounds['layer_norms']]
  metrics['certification_bound'] = config.eval.bound
  return metrics


def lipschitz_hf(config, sched, step, lipschitz_f: float) -> float:
  """K^(h o f), the Lipschitz constant of the loss's softmax input.

  CLL: 1 / sigma_eps(p) at the current slack (sec. 3.3), whatever K^(f).
  GloRo with logit scale s (supp. D.1): s K^(f). Other losses apply a
  unit-scale softmax to f: K^(f).
  """
  if config.loss.name == 'cll':
    p_now = float(sched.slack(step))
    return float(1.0 / losses.calibrated_scale(config.loss.epsilon, p_now))
  if config.loss.name == 'gloro':
    return config.loss.get('gloro_logit_scale', 1.0) * lipschitz_f
  return lipschitz_f


# --------------------------------------------------------------------------
# Checkpoints


def restore_state(config, workdir: str, num_classes: int,
                  input_shape) -> tuple[models.LipschitzNetwork, TrainState]:
  """The model and the state of `workdir`'s latest checkpoint.

  The optimizer state's structure does not depend on the schedules, so the
  template is built with a nominal one step per epoch.

  Raises:
    FileNotFoundError: `workdir` holds no checkpoint.
    ValueError: the checkpoint does not fit `config`'s model.
  """
  model = create_model(config, num_classes)
  template = create_train_state(config, model, jax.random.PRNGKey(0),
                                tuple(input_shape), steps_per_epoch=1)
  manager = checkpoints.manager(workdir, create=False)
  try:
    state = checkpoints.restore(manager, template)
  finally:
    manager.close()
  return model, state


# --------------------------------------------------------------------------
# Loop


class _Reporter:
  """Status lines and the progress bar, on process 0 only."""

  def __init__(self, enabled: bool):
    self.enabled = enabled and jax.process_index() == 0
    self.bar = None

  def say(self, message: str) -> None:
    if self.enabled:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      tqdm.write(message, file=sys.stderr)

  def phase(self, name: str) -> None:
    """Names what runs now in the bar (a line of its own without a bar)."""
    if self.bar is not None:
      self.bar.set_description_str(name, refresh=True)
    else:
      self.say(name)

  def start_bar(self, total: int, initial: int) -> None:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    self.bar = tqdm(total=total, initial=initial, unit='step',
                    dynamic_ncols=True, mininterval=2.0, file=sys.stderr,
                    disable=not self.enabled)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def _nonfinite_message(state: TrainState, config, steps_per_epoch: int,
                       last_checkpoint: int | None) -> str:
  step = int(state.nonfinite['first_step'])
  loss = float(state.nonfinite['first_loss'])
  lr = float(learning_rate_schedule(config, steps_per_epoch)(step))
  what = (f'loss {loss}' if not math.isfinite(loss)
          else f'finite loss {loss:.6g} but non-finite gradients or '
               'power-iteration vectors')
  kept = ('no checkpoint was written yet' if last_checkpoint is None else
          f'the latest checkpoint (step {last_checkpoint}) is the last good '
          'one and was kept')
  return (f'non-finite training step {step} (epoch {step // steps_per_epoch + 1}):'
          f' {what} at learning rate {lr:.6g}. The step was not applied and '
          f'nothing after it was saved; {kept}. Lower '
          '--config.optimizer.learning_rate, or set '
          "--config.train.on_nonfinite=skip to drop such steps.")


def _check_finite(state: TrainState, config, steps_per_epoch: int,
                  last_checkpoint: int | None) -> None:
  if (config.train.get('on_nonfinite', 'stop') == 'stop'
      and int(state.nonfinite['first_step']) >= 0):
    raise NonFiniteError(_nonfinite_message(state, config, steps_per_epoch,
                                            last_checkpoint))


def _write_final(workdir: str, final: dict[str, Any]) -> None:
  if jax.process_index() == 0:
    run_records.write_json(
        workdir, FINAL_METRICS_FILE,
        {k: metrics_log.to_python(v) for k, v in final.items()})
    metrics_log.plot_curves(workdir)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_changes: bool = False,
                       devices=None) -> dict[str, Any]:
  """Trains, evaluates and checkpoints; resumes from `workdir` if possible.

  Args:
    config: the experiment config (`cll_jax.configs`).
    workdir: run folder: checkpoints, metrics, figures, `config.json`.
    allow_config_changes: resume even though fields outside
      `run_records.FREE_FIELDS` differ from the stored config.
    devices: devices of the data-parallel mesh (default: all).

  Returns:
    The final evaluation metrics (also in `workdir/metrics.jsonl` and
    `workdir/final_metrics.json`).

  Raises:
    ValueError: an invalid config (naming the field), or a resume whose
      config changes what was trained (`run_records.ConfigChangeError`).
    NonFiniteError: a non-finite step with `train.on_nonfinite='stop'`, or an
      epoch in which every step was non-finite.
  """
  validate_config(config)
  if config.get('distributed', False):
    jax.distributed.initialize()
  report = _Reporter(config.train.progress_bar)
  mesh = make_mesh(devices)
  resume_step = checkpoints.latest_step(workdir)
  changes = {}
  if resume_step is not None:
    changes = run_records.check_resume(
        workdir, config, allow_changes=allow_config_changes)
  report.say(f'loading data set {config.data.name!r} (a first load decodes '
             'and caches it)')
  dataset = load_dataset(config)
  info = dataset_info(config, dataset)
  if resume_step is not None:
    run_records.check_dataset(workdir, info)
  if jax.process_index() == 0:
    run_records.record_run(workdir, config, info, changes, resume_step or 0)
  for field, (old, new) in changes.items():
    report.say(f'config change on resume: {field}: {old!r} -> {new!r}')

  train_images, train_labels = data_lib.host_shard(
      dataset.train_images, dataset.train_labels, jax.process_index(),
      jax.process_count())
  local_batch, padded_batch = local_batch_size(config.train.batch_size, mesh)
  steps_per_epoch = data_lib.steps_per_epoch(len(train_images), local_batch)
  input_shape = tuple(dataset.train_images.shape[1:])
  model = create_model(config, dataset.num_classes)
  rng = jax.random.PRNGKey(config.seed)
  init_rng, aug_rng = jax.random.split(rng)
  state = create_train_state(config, model, init_rng, input_shape,
                             steps_per_epoch)
  replicated = NamedSharding(mesh, PartitionSpec())
  data_sharding = NamedSharding(mesh, PartitionSpec('data'))
  sched = loss_schedules(config, steps_per_epoch)
  radii = tuple(config.eval.radii) + (config.loss.epsilon,)

  jitted_train = make_train_step(config, steps_per_epoch, mesh, aug_rng)
  jitted_eval = jax.jit(
      functools.partial(eval_step, config=config, radii=radii),
      in_shardings=(replicated, data_sharding, replicated),
      out_shardings=replicated)
  jitted_bounds = jax.jit(functools.partial(
      certification_bounds, model=model, input_shape=input_shape,
      method=config.eval.bound))
  jitted_converge = jax.jit(functools.partial(
      models.converge_power_iteration, model, input_shape=input_shape,
      tol=config.train.converge_tol,
      max_iterations=config.train.converge_max_iterations))

  def evaluate_now(state):
    report.phase(f'certifying {len(dataset.test_labels)} test examples '
                 f'({config.eval.bound} bounds)')
    record = evaluate(state, dataset, config, mesh, jitted_eval,
                      jitted_bounds)
    record['lipschitz_hf'] = lipschitz_hf(config, sched, state.step,
                                          record['lipschitz_f'])
    return record

  manager = checkpoints.manager(workdir, config.train.checkpoints_to_keep)
  last_checkpoint = resume_step
  if resume_step is not None:
    state = checkpoints.restore(manager, state)
  state = jax.device_put(state, replicated)
  step = int(state.step)
  start_epoch = step // steps_per_epoch
  num_epochs = config.train.num_epochs
  if resume_step is not None:
    report.say(f'resuming from step {step} (epoch {start_epoch} of '
               f'{num_epochs}) in {workdir}')
  if start_epoch >= num_epochs:
    manager.close()
    return _finished_run(workdir, state, changes, evaluate_now, report)

  writer = metrics_log.MetricWriter(workdir, resume_step=step)
  final: dict[str, Any] = {}
  try:
    report.say('compiling the training step')
    batch_spec = {
        'image': jax.ShapeDtypeStruct(
            (padded_batch * jax.process_count(), *input_shape),
            train_images.dtype, sharding=data_sharding),
        'label': jax.ShapeDtypeStruct(
            (padded_batch * jax.process_count(),), train_labels.dtype,
            sharding=data_sharding),
        'mask': jax.ShapeDtypeStruct(
            (padded_batch * jax.process_count(),), np.float32,
            sharding=data_sharding)}
    compiled_train = jitted_train.lower(state, batch_spec).compile()
    report.start_bar(num_epochs * steps_per_epoch,
                     start_epoch * steps_per_epoch)
    report.phase('train')
    for epoch in range(start_epoch, num_epochs):
      epoch_start = time.time()
      skipped_before = int(state.nonfinite['count'])
      sums: dict[str, Any] = {}
      for images, labels in data_lib.train_batches(
          train_images, train_labels, local_batch,
          seed=config.seed + jax.process_index(), epoch=epoch):
        state, metrics = compiled_train(
            state, device_batch(images, labels, mesh))
        for k, v in metrics.items():
          sums[k] = sums.get(k, 0.0) + v
        report.bar.update(1)
        step += 1
        if step % config.train.log_every_steps == 0:
          _check_finite(state, config, steps_per_epoch, last_checkpoint)
          report.bar.set_postfix(loss=f'{float(metrics["loss"]):.4f}',
                                 acc=f'{float(metrics["accuracy"]):.3f}')
      _check_finite(state, config, steps_per_epoch, last_checkpoint)
      skipped = int(state.nonfinite['count']) - skipped_before
      if skipped == steps_per_epoch:
        raise NonFiniteError(
            f'every step of epoch {epoch + 1} was non-finite and skipped; '
            + _nonfinite_message(state, config, steps_per_epoch,
                                 last_checkpoint))
      # Means over the applied steps (skipped ones report zeros).
      finite_steps = float(sums.pop('finite'))
      record = {f'train_{k}': float(v) / max(finite_steps, 1.0)
                for k, v in sums.items()}
      record['train_nonfinite_steps'] = skipped
      record['epoch'] = epoch + 1
      record['epoch_seconds'] = time.time() - epoch_start
      last = epoch + 1 == num_epochs
      eval_start = time.time()
      if last or (epoch + 1) % config.train.converge_every_epochs == 0:
        report.phase('converging power iteration')
        state = state.replace(power_iteration=jitted_converge(
            state.variables))
      if last or (epoch + 1) % config.train.eval_every_epochs == 0:
        record.update(evaluate_now(state))
        final = record
      # Convergence and certified evaluation (compilation included the first
      # time), apart from the training steps of `epoch_seconds`.
      record['eval_seconds'] = time.time() - eval_start
      writer.write(step, record)
      if last or (epoch + 1) % config.train.checkpoint_every_epochs == 0:
        report.phase('checkpoint')
        checkpoints.save(manager, state, force=last)
        last_checkpoint = step
      report.phase('train')
  finally:
    report.close()
    report.say('waiting for the last checkpoint to be written')
    manager.wait_until_finished()
    manager.close()
    writer.close()
  _write_final(workdir, final)
  return final


def _finished_run(workdir: str, state: TrainState, changes, evaluate_now,
                  report: _Reporter) -> dict[str, Any]:
  """A rerun of a finished workdir: keep its results, re-evaluate if asked.

  With unchanged evaluation settings the stored `final_metrics.json` is
  returned as it is. When the evaluation settings changed (other radii,
  bound, ...) or the final metrics are missing (a kill after the last
  checkpoint), the final state is evaluated again and the evaluation part of
  the last record is replaced.
  """
  stored = run_records.read_json(workdir, FINAL_METRICS_FILE)
  eval_changed = any(f.startswith('eval.') for f in changes)
  if stored is not None and not eval_changed:
    report.say(f'{workdir} already finished at step {int(state.step)}; '
               f'keeping its results ({FINAL_METRICS_FILE})')
    return stored
  step = int(state.step)
  records = metrics_log.read_records(workdir)
  last = next((r for r in reversed(records) if r.get('step') == step), {})
  record = {k: v for k, v in last.items()
            if k != 'step' and not k.startswith('test_')}
  record.update(evaluate_now(state))
  if jax.process_index() == 0:
    metrics_log.replace_record(workdir, {'step': step, **record})
  _write_final(workdir, record)
  return record
