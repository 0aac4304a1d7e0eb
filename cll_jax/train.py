"""Certified training: state, jitted data-parallel steps, the training loop.

The shape follows flax's `examples/imagenet`: `create_train_state`,
`train_step(state, batch) -> (state, metrics)`, `eval_step` and
`train_and_evaluate(config, workdir)`. Data parallelism uses `jax.jit` with a
`NamedSharding` over a 1-D 'data' mesh of all devices: the global batch is
split along its leading axis, the state is replicated, and XLA inserts the
gradient all-reduce. Means are taken over the *global* batch inside the jitted
function, so results do not depend on the device count (no pmean of
already-averaged gradients).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state as flax_train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cll_jax import certify
from cll_jax import data as data_lib
from cll_jax import forward_error
from cll_jax import layers
from cll_jax import losses
from cll_jax import models
from cll_jax import schedules
from cll_jax.config_validation import validate_config

Batch = dict[str, jax.Array]


class TrainState(flax_train_state.TrainState):
  """Optimizer state plus the power-iteration vectors of every layer."""
  power_iteration: Any = None

  @property
  def variables(self):
    return {'params': self.params,
            layers.POWER_ITERATION: self.power_iteration}


# --------------------------------------------------------------------------
# Set-up


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named 'data' over `devices` (default: all, every host)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), ('data',))


def create_model(config: ml_collections.ConfigDict,
                 num_classes: int) -> models.LipschitzNetwork:
  m = config.model
  return models.create_model(
      m.name, num_classes, activation=m.activation,
      input_mean=m.get('input_mean'), input_std=m.get('input_std'),
      num_power_iterations=m.num_power_iterations, bound=m.bound)


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  o = config.optimizer
  return schedules.learning_rate(o.learning_rate, steps_per_epoch,
                                 o.decay_epochs, o.decay_factor)


def create_train_state(config: ml_collections.ConfigDict,
                       model: models.LipschitzNetwork, rng: jax.Array,
                       input_shape: tuple[int, ...],
                       steps_per_epoch: int) -> TrainState:
  """Initialises parameters, power-iteration vectors and the optimizer."""
  variables = model.init(rng, jnp.zeros((1, *input_shape), jnp.float32))
  tx = optax.adam(learning_rate_schedule(config, steps_per_epoch))
  if config.optimizer.get('weight_decay', 0.0):
    tx = optax.adamw(learning_rate_schedule(config, steps_per_epoch),
                     weight_decay=config.optimizer.weight_decay)
  return TrainState.create(
      apply_fn=model.apply, params=variables['params'], tx=tx,
      power_iteration=variables[layers.POWER_ITERATION])


# --------------------------------------------------------------------------
# Loss


@flax.struct.dataclass
class LossSchedules:
  """Step -> value functions for the loss hyperparameters that anneal."""
  slack: Any = flax.struct.field(pytree_node=False)
  lipschitz_scale: Any = flax.struct.field(pytree_node=False)
  epsilon: Any = flax.struct.field(pytree_node=False)
  trades_beta: Any = flax.struct.field(pytree_node=False)


def loss_schedules(config, steps_per_epoch: int) -> LossSchedules:
  loss = config.loss
  total = config.train.num_epochs * steps_per_epoch
  return LossSchedules(
      slack=schedules.polynomial_anneal(
          loss.p_start, loss.p_end, loss.p_gamma,
          loss.get('p_anneal_epochs', config.train.num_epochs)
          * steps_per_epoch),
      lipschitz_scale=schedules.polynomial_anneal(
          loss.lipschitz_scale_start, 1.0, loss.lipschitz_scale_gamma,
          total),
      epsilon=schedules.gloro_epsilon(
          loss.epsilon, loss.epsilon_schedule,
          loss.get('epsilon_schedule_epochs', config.train.num_epochs)
          * steps_per_epoch),
      trades_beta=schedules.linear(
          loss.trades_beta_start, loss.trades_beta_end,
          loss.trades_beta_epochs * steps_per_epoch))


def per_example_loss(config, sched: LossSchedules, out: models.NetworkOutput,
                     labels: jax.Array, step: jax.Array, epoch: jax.Array):
  """The configured loss for every example, and the values it used."""
  loss = config.loss
  pairwise = out.pairwise_lipschitz
  if loss.name == 'cll' and loss.detach_lipschitz:
    # CLL normalises by K but does not optimise it through the loss; K is
    # pushed down only by the lambda K^2 term (CLL sec. 3.3). GloRo and CRM
    # lower K through the loss itself, so their K keeps its gradient.
    pairwise = jax.lax.stop_gradient(pairwise)
  pairwise = pairwise * sched.lipschitz_scale(step)
  epsilon = sched.epsilon(step)
  used = {'epsilon': epsilon}
  if loss.name == 'cll':
    p = sched.slack(step)
    used['p'] = p
    delta = epsilon if loss.get('delta') is None else loss.delta
    if loss.offset == 'one_sided':
      # Offset delta on the other logits only (g_y = 0), as the official
      # two-moons config (`add_epsilon_one_sided`); by the softmax's shift
      # invariance that is the two-sided eq. 2 with delta / 2, and for N = 2
      # it is exactly binary CLL (eq. 4): probability 1/2 at distance delta.
      delta = delta / 2
    values = losses.multiclass_cll_loss(
        out.logits, labels, pairwise, epsilon, p, delta=delta)
  elif loss.name == 'gloro':
    values = losses.gloro_loss(out.logits, labels, pairwise, epsilon)
  elif loss.name == 'gloro_trades':
    beta = sched.trades_beta(step)
    used['trades_beta'] = beta
    values = losses.gloro_trades_loss(out.logits, labels, pairwise, epsilon,
                                      beta)
  elif loss.name == 'crm':
    robust = losses.crm_loss(out.logits, labels, pairwise, loss.crm_lambda,
                             loss.crm_temperature, loss.crm_radius_threshold)
    plain = optax.softmax_cross_entropy_with_integer_labels(out.logits, labels)
    # Plain cross-entropy for the first epochs (arXiv 2310.00116).
    values = jnp.where(epoch < loss.crm_warmup_epochs, plain, robust)
  elif loss.name == 'ce':
    values = optax.softmax_cross_entropy_with_integer_labels(out.logits, labels)
  else:
    raise ValueError(f'unknown loss {loss.name!r}')
  return values, used


# --------------------------------------------------------------------------
# Steps


def prepare_images(config, images: jax.Array, rng: jax.Array | None):
  """uint8 images -> float [0, 1], augmented on device when `rng` is given."""
  if jnp.issubdtype(images.dtype, jnp.integer):
    images = images.astype(jnp.float32) / 255.0
  aug = config.data.augment
  if rng is not None and aug.enabled:
    images = data_lib.augment_batch(
        rng, images, crop_padding=aug.crop_padding, flip=aug.flip,
        color_jitter=aug.color_jitter,
        max_rotation_degrees=aug.max_rotation_degrees)
  return images


def train_step(state: TrainState, batch: Batch, *, config,
               sched: LossSchedules, steps_per_epoch: int,
               rng: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a (globally sharded) batch.

  The power-iteration vectors advance `num_power_iterations` steps inside the
  forward pass (the collection is mutable here).
  """
  step = state.step
  epoch = step // steps_per_epoch
  images = prepare_images(config, batch['image'],
                          jax.random.fold_in(rng, step))
  labels = batch['label']

  def loss_fn(params):
    out, updates = state.apply_fn(
        {'params': params, layers.POWER_ITERATION: state.power_iteration},
        images, mutable=[layers.POWER_ITERATION])
    values, used = per_example_loss(config, sched, out, labels, step, epoch)
    penalty = losses.lipschitz_penalty(out.lipschitz, config.loss.lam)
    total = jnp.mean(values) + penalty
    return total, (out, updates[layers.POWER_ITERATION], values, used,
                   penalty)

  grads, (out, new_pi, values, used, penalty) = jax.grad(
      loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads, power_iteration=new_pi)
  certified = certify.certified_correct(
      out.logits, labels, jax.lax.stop_gradient(out.pairwise_lipschitz),
      config.loss.epsilon)
  metrics = {
      'loss': jnp.mean(values),
      'lipschitz_penalty': penalty,
      'accuracy': jnp.mean(jnp.argmax(out.logits, -1) == labels),
      'certified_accuracy_train_eps': jnp.mean(certified),
      'lipschitz': out.lipschitz,
      'learning_rate': learning_rate_schedule(
          config, steps_per_epoch)(step),
      **used,
  }
  return new_state, metrics


def eval_step(state: TrainState, batch: Batch, bounds: dict[str, Any],
              *, config, radii: tuple[float, ...]) -> dict[str, jax.Array]:
  """Counts over one padded batch: correct, and certified-correct per radius.

  `batch['mask']` marks real examples; padded ones count nowhere. `bounds`
  (pairwise K and the logits' error bound) is computed once per evaluation
  by `certification_bounds`, not per batch. The logits are computed in
  `forward_error.certification_dtype()` and every margin gives up their
  rounding allowance (`cll_jax.forward_error`).
  """
  images = prepare_images(config, batch['image'], None)
  out, margin_error = forward_error.certified_forward(
      state.apply_fn, state.variables, images, bounds['logit_error'])
  mask = batch['mask']
  labels = batch['label']
  counts = {
      'count': jnp.sum(mask),
      'correct': jnp.sum(mask * (jnp.argmax(out.logits, -1) == labels)),
  }
  for name, radius in zip(radius_names(radii), radii):
    ok = certify.certified_correct(out.logits, labels, bounds['pairwise'],
                                   radius, margin_error)
    counts[name] = jnp.sum(mask * ok)
  return counts


def radius_names(radii) -> list[str]:
  return [f'cra_{r:.4f}' for r in radii]


def certification_bounds(state: TrainState, model: models.LipschitzNetwork,
                         input_shape, method: str) -> dict[str, jax.Array]:
  """Pairwise bounds K_ij for certification and the layer norms behind them.

  'sound': guaranteed upper bounds of every layer (Gram iteration, with a
  float-error allowance; `cll_jax.sound_bounds`), multiplied as the naive
  product bound. 'power': the model's own bound (naive product or LipLT)
  from the converged power-iteration state, as in the papers; each norm is
  then an estimate from below, so the certificate is not guaranteed.
  'logit_error': the forward pass's rounding bound from these norms
  (`forward_error.network_logit_error`, in `certification_dtype()`).
  """
  from cll_jax import lipschitz  # pylint: disable=g-import-not-at-top
  ops = models.network_operators(model, state.params, input_shape)
  if method == 'sound':
    from cll_jax import sound_bounds  # pylint: disable=g-import-not-at-top
    norms = jnp.stack([sound_bounds.operator_norm_upper_bound(op)
                       for op in ops])
    # Float32 rounding allowance per layer (the head's column differences
    # included), as in `sound_bounds.network_upper_bound`.
    rounding = (1.0 + sound_bounds.DEFAULT_RELATIVE_FLOAT_ALLOWANCE) ** len(ops)
  elif method == 'power':
    out = state.apply_fn(state.variables,
                         jnp.zeros((1, *input_shape), jnp.float32))
    return {'pairwise': out.pairwise_lipschitz,
            'layer_norms': out.layer_norms, 'lipschitz': out.lipschitz,
            'logit_error': forward_error.network_logit_error(
                model, state.params, input_shape, out.layer_norms)}
  else:
    raise ValueError(f"bound method must be 'sound' or 'power', got {method!r}")
  prefix = model.input_scale * jnp.prod(norms[:-1]) * rounding
  return {
      'pairwise': lipschitz.pairwise_lipschitz(ops[-1].kernel, prefix),
      'layer_norms': norms,
      'lipschitz': prefix * norms[-1],
      'logit_error': forward_error.network_logit_error(
          model, state.params, input_shape, norms),
  }


# --------------------------------------------------------------------------
# Loop


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


def _put_global(batch: dict[str, np.ndarray], sharding) -> Batch:
  """Host-local numpy batch -> one global array sharded over 'data'."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in batch.items()}


def evaluate(state: TrainState, dataset, config, mesh, jitted_eval,
             jitted_bounds) -> dict[str, Any]:
  """Clean accuracy and CRA over *every* test example (last batch padded).

  `jitted_bounds(state)` gives the certification bounds, once per call.
  Both run in `config.eval.precision` (`forward_error.precision_scope`).
  """
  precision = config.eval.get('precision', 'float64')
  jitted_eval = forward_error.in_precision(jitted_eval, precision)
  jitted_bounds = forward_error.in_precision(jitted_bounds, precision)
  bounds = jitted_bounds(state)
  sharding = NamedSharding(mesh, PartitionSpec('data'))
  totals: dict[str, float] = {}
  for images, labels, mask in data_lib.eval_batches(
      dataset.test_images, dataset.test_labels,
      config.eval.batch_size // jax.process_count()):
    batch = _put_global({'image': images, 'label': labels,
                         'mask': mask.astype(np.float32)}, sharding)
    counts = jitted_eval(state, batch, bounds)
    for k, v in counts.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  n = totals.pop('count')
  metrics = {'test_accuracy': totals.pop('correct') / n, 'test_count': n,
             'certification_precision': precision}
  for k, v in totals.items():
    metrics[f'test_{k}'] = v / n
  pairwise = np.asarray(bounds['pairwise'])
  metrics['lipschitz_f'] = float(pairwise.max())
  metrics['lipschitz_global'] = float(bounds['lipschitz'])
  metrics['layer_norms'] = [float(x) for x in bounds['layer_norms']]
  return metrics


class MetricWriter:
  """JSON lines plus TensorBoard events, written by process 0 only."""

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if self._active:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      except ImportError:  # TensorBoard events are optional.
        self._tb = None

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self._active:
      return
    record = {'step': int(step), **{k: _to_python(v)
                                    for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in record.items():
        if isinstance(v, (int, float)) and k != 'step':
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _to_python(v):
  if isinstance(v, (list, tuple)):
    return [_to_python(x) for x in v]
  if isinstance(v, (np.ndarray, jax.Array)):
    return v.tolist() if np.ndim(v) else float(v)
  return v


def _checkpoint_manager(workdir: str, config):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.train.checkpoints_to_keep, create=True)
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'checkpoints')), options=options)


def _restore_or_keep(manager, state: TrainState) -> TrainState:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  latest = manager.latest_step()
  if latest is None:
    return state
  logging.info('resuming from checkpoint at step %d', latest)
  return manager.restore(latest, args=ocp.args.StandardRestore(state))


def restore_state(config, workdir: str, num_classes: int,
                  input_shape) -> tuple[models.LipschitzNetwork, TrainState]:
  """The model and the state of `workdir`'s latest checkpoint.

  The optimizer state's structure does not depend on the schedules, so the
  template is built with a nominal one step per epoch.

  Raises:
    FileNotFoundError: `workdir` holds no checkpoint.
  """
  model = create_model(config, num_classes)
  template = create_train_state(config, model, jax.random.PRNGKey(0),
                                tuple(input_shape), steps_per_epoch=1)
  manager = _checkpoint_manager(workdir, config)
  try:
    if manager.latest_step() is None:
      raise FileNotFoundError(f'no checkpoint in {workdir}')
    state = _restore_or_keep(manager, template)
  finally:
    manager.close()
  return model, state


def _save(manager, state: TrainState, force: bool = False) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager.save(int(state.step), args=ocp.args.StandardSave(state),
               force=force)


def _progress(total: int, initial: int, enabled: bool):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True,
              mininterval=2.0, disable=not enabled)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains, evaluates and checkpoints; resumes from `workdir` if possible.

  Returns:
    The final evaluation metrics (also written to `workdir/metrics.jsonl` and
    `workdir/final_metrics.json`).
  """
  validate_config(config)
  if config.get('distributed', False):
    jax.distributed.initialize()
  mesh = make_mesh()
  dataset = load_dataset(config)
  train_images, train_labels = data_lib.host_shard(
      dataset.train_images, dataset.train_labels, jax.process_index(),
      jax.process_count())
  local_batch = config.train.batch_size // jax.process_count()
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

  jitted_train = jax.jit(
      functools.partial(train_step, config=config, sched=sched,
                        steps_per_epoch=steps_per_epoch, rng=aug_rng),
      in_shardings=(replicated, data_sharding),
      out_shardings=(replicated, replicated), donate_argnums=0)
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

  manager = _checkpoint_manager(workdir, config)
  state = _restore_or_keep(manager, state)
  state = jax.device_put(state, replicated)
  step = int(state.step)
  start_epoch = step // steps_per_epoch
  num_epochs = config.train.num_epochs
  writer = MetricWriter(workdir)
  bar = _progress(num_epochs * steps_per_epoch,
                  start_epoch * steps_per_epoch,
                  config.train.progress_bar and jax.process_index() == 0)
  final: dict[str, Any] = {}
  try:
    for epoch in range(start_epoch, num_epochs):
      epoch_start = time.time()
      sums: dict[str, float] = {}
      for images, labels in data_lib.train_batches(
          train_images, train_labels, local_batch,
          seed=config.seed + jax.process_index(), epoch=epoch):
        batch = _put_global({'image': images, 'label': labels},
                            data_sharding)
        state, metrics = jitted_train(state, batch)
        for k, v in metrics.items():
          sums[k] = sums.get(k, 0.0) + v
        bar.update(1)
        step += 1
        if step % config.train.log_every_steps == 0:
          bar.set_postfix(loss=f'{float(metrics["loss"]):.4f}',
                          acc=f'{float(metrics["accuracy"]):.3f}')
      record = {f'train_{k}': float(v) / steps_per_epoch
                for k, v in sums.items()}
      record['epoch'] = epoch + 1
      record['epoch_seconds'] = time.time() - epoch_start
      last = epoch + 1 == num_epochs
      if last or (epoch + 1) % config.train.converge_every_epochs == 0:
        state = state.replace(power_iteration=jitted_converge(
            state.variables))
      if last or (epoch + 1) % config.train.eval_every_epochs == 0:
        record.update(evaluate(state, dataset, config, mesh, jitted_eval,
                               jitted_bounds))
        if config.loss.name == 'cll':
          # K^(h o f) = 1 / sigma_eps(p) at the current slack (CLL sec. 3.3).
          p_now = float(sched.slack(state.step))
          record['lipschitz_hf'] = float(
              1.0 / losses.calibrated_scale(config.loss.epsilon, p_now))
        else:
          # Other losses apply a fixed-scale softmax to f: K^(h o f) = K^(f).
          record['lipschitz_hf'] = record['lipschitz_f']
        final = record
      writer.write(step, record)
      if last or (epoch + 1) % config.train.checkpoint_every_epochs == 0:
        _save(manager, state, force=last)
  finally:
    bar.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'final_metrics.json'), 'w') as f:
      json.dump({k: _to_python(v) for k, v in final.items()}, f, indent=1)
    _plot_curves(workdir)
  return final


def _plot_curves(workdir: str) -> None:
  """Saves training curves (loss, accuracy, CRA) from metrics.jsonl."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return
  rows = [json.loads(line) for line in open(path) if line.strip()]
  rows = [r for r in rows if 'epoch' in r]
  if not rows:
    return
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
  epochs = [r['epoch'] for r in rows]
  axes[0].plot(epochs, [r.get('train_loss') for r in rows])
  axes[0].set_title('train loss')
  axes[0].set_yscale('log')
  axes[1].plot(epochs, [r.get('train_accuracy') for r in rows], label='train')
  evals = [r for r in rows if 'test_accuracy' in r]
  if evals:
    axes[1].plot([r['epoch'] for r in evals],
                 [r['test_accuracy'] for r in evals], 'o-', label='test')
    for key in sorted(k for k in evals[-1] if k.startswith('test_cra_')):
      axes[2].plot([r['epoch'] for r in evals], [r[key] for r in evals],
                   'o-', label=key[len('test_cra_'):])
  axes[1].set_title('clean accuracy')
  axes[1].legend()
  axes[2].set_title('certified robust accuracy (radius)')
  if evals:
    axes[2].legend()
  for ax in axes:
    ax.set_xlabel('epoch')
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'curves.png'), dpi=100)
  plt.close(fig)
