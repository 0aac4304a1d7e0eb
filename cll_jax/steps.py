"""Training state and the jitted steps: train, evaluate, certification bounds.

`train_step(state, batch) -> (state, metrics)` and `eval_step` follow flax's
`examples/imagenet`. They run under `jax.jit` with the batch sharded along a
'data' mesh axis and the state replicated (see `cll_jax.train`); means are
taken over the *global* batch inside the step, so results do not depend on
the device count.

Batches may carry a `mask` (1 for real examples, 0 for padding rows that make
the batch divisible by the device count): means are weighted by it, so a
padded batch gives the same loss and gradients as the unpadded one.

A step whose loss, gradients or power-iteration vectors are not all finite is
never applied (`on_nonfinite`): the state stays as it was, and
`state.nonfinite` records how many such steps occurred and the first one.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state as flax_train_state

from cll_jax import certify
from cll_jax import data as data_lib
from cll_jax import forward_error
from cll_jax import layers
from cll_jax import losses
from cll_jax import models
from cll_jax import objectives
from cll_jax import schedules

Batch = dict[str, jax.Array]
# What a non-finite step does: 'stop' freezes the state at the last finite
# step (the loop then stops with an error), 'skip' drops that step's update
# and goes on.
NONFINITE_POLICIES = ('stop', 'skip')


def initial_nonfinite() -> dict[str, jax.Array]:
  """No non-finite step yet: count 0, first step -1."""
  return {'count': jnp.zeros((), jnp.int32),
          'first_step': jnp.full((), -1, jnp.int32),
          'first_loss': jnp.zeros((), jnp.float32)}


class TrainState(flax_train_state.TrainState):
  """Optimizer state, power-iteration vectors and the non-finite record.

  Attributes:
    power_iteration: the `power_iteration` collection of the model.
    nonfinite: `{'count', 'first_step', 'first_loss'}`: how many steps had a
      non-finite loss/gradient (never applied), the first such step (-1:
      none) and its loss value.
  """
  power_iteration: Any = None
  nonfinite: Any = None

  @property
  def variables(self):
    return {'params': self.params,
            layers.POWER_ITERATION: self.power_iteration}


def create_model(config: ml_collections.ConfigDict,
                 num_classes: int) -> models.LipschitzNetwork:
  m = config.model
  soc = m.get('soc')
  return models.create_model(
      m.name, num_classes, activation=m.activation,
      input_mean=m.get('input_mean'), input_std=m.get('input_std'),
      num_power_iterations=m.num_power_iterations, bound=m.bound,
      head=m.get('head', 'dense'), soc=None if soc is None else soc.to_dict(),
      liplt_power_iterations=m.get('liplt_power_iterations'))


# `config.optimizer.schedule`: 'step' (decay by a factor at epochs: CLL,
# SOC) or 'triangular' (CPL, SLL, LBDN: up to the rate, then down to 0).
LR_SCHEDULES = ('step', 'triangular')


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  o = config.optimizer
  kind = o.get('schedule', 'step')
  if kind == 'triangular':
    return schedules.triangular(
        o.learning_rate, config.train.num_epochs * steps_per_epoch,
        o.get('peak_fraction', 0.4))
  if kind != 'step':
    raise ValueError(f'optimizer.schedule must be one of {LR_SCHEDULES}, got '
                     f'{kind!r}')
  return schedules.learning_rate(o.learning_rate, steps_per_epoch,
                                 o.decay_epochs, o.decay_factor)


OPTIMIZERS = ('adam', 'sgd')


def _decay_mask(params):
  # Weight decay on kernels only, not on biases or activation angles.
  return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def make_optimizer(config, steps_per_epoch: int
                   ) -> optax.GradientTransformation:
  """The configured optimizer with its learning-rate schedule.

  'adam' (the CLL paper; AdamW when `weight_decay` > 0) or 'sgd' with
  `momentum` (the SOC paper's recipe); weight decay acts on kernels only.
  """
  o = config.optimizer
  schedule = learning_rate_schedule(config, steps_per_epoch)
  decay = o.get('weight_decay', 0.0)
  name = o.get('name', 'adam')
  if name == 'adam':
    if decay:
      return optax.adamw(schedule, weight_decay=decay, mask=_decay_mask)
    return optax.adam(schedule)
  if name == 'sgd':
    chain = [optax.add_decayed_weights(decay, mask=_decay_mask)] if decay else []
    return optax.chain(*chain, optax.sgd(schedule, momentum=o.get(
        'momentum', 0.9) or None, nesterov=o.get('nesterov', False)))
  raise ValueError(f'optimizer.name must be one of {OPTIMIZERS}, got '
                   f'{name!r}')


@functools.lru_cache(maxsize=32)
def _jitted_init(model: models.LipschitzNetwork,
                 input_shape: tuple[int, ...]):
  """`rng -> model.init(rng, zeros)`, compiled once per model and shape.

  One compiled program instead of hundreds of eagerly dispatched ops (an
  eager init compiles every layer's power-iteration loop anew: seconds).
  """
  return jax.jit(lambda rng: model.init(
      rng, jnp.zeros((1, *input_shape), jnp.float32)))


def create_train_state(config: ml_collections.ConfigDict,
                       model: models.LipschitzNetwork, rng: jax.Array,
                       input_shape: tuple[int, ...],
                       steps_per_epoch: int) -> TrainState:
  """Initialises parameters, power-iteration vectors and the optimizer."""
  variables = _jitted_init(model, tuple(input_shape))(rng)
  tx = make_optimizer(config, steps_per_epoch)
  return TrainState.create(
      apply_fn=model.apply, params=variables['params'], tx=tx,
      power_iteration=variables[layers.POWER_ITERATION],
      nonfinite=initial_nonfinite())


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


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _all_finite(tree) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def train_step(state: TrainState, batch: Batch, *, config,
               sched: objectives.LossSchedules, steps_per_epoch: int,
               rng: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a (globally sharded) batch.

  The power-iteration vectors advance `num_power_iterations` steps inside the
  forward pass (the collection is mutable here). The update is applied only
  when the loss, every gradient and every new power-iteration vector are
  finite; `config.train.on_nonfinite` says what happens otherwise ('stop':
  this and all later steps leave the state unchanged, step counter
  included, so the state stays the last finite one; 'skip': the step counter
  advances, nothing else changes).
  """
  step = state.step
  epoch = step // steps_per_epoch
  images = prepare_images(config, batch['image'],
                          jax.random.fold_in(rng, step))
  labels = batch['label']
  mask = batch.get('mask')
  mask = (jnp.ones(labels.shape, jnp.float32) if mask is None
          else mask.astype(jnp.float32))

  def loss_fn(params):
    out, updates = state.apply_fn(
        {'params': params, layers.POWER_ITERATION: state.power_iteration},
        images, mutable=[layers.POWER_ITERATION])
    values, used = objectives.per_example_loss(config, sched, out, labels,
                                               step, epoch)
    penalty = losses.lipschitz_penalty(out.lipschitz, config.loss.lam)
    total = _masked_mean(values, mask) + penalty
    return total, (out, updates[layers.POWER_ITERATION], values, used,
                   penalty)

  grads, (out, new_pi, values, used, penalty) = jax.grad(
      loss_fn, has_aux=True)(state.params)
  loss = _masked_mean(values, mask)
  finite = _all_finite((loss, penalty, grads, new_pi))
  candidate = state.apply_gradients(grads=grads, power_iteration=new_pi)
  policy = config.train.get('on_nonfinite', 'stop')
  if policy == 'stop':
    apply = finite & (state.nonfinite['first_step'] < 0)
    new_state = jax.tree.map(lambda a, b: jnp.where(apply, a, b),
                             candidate, state)
  else:
    apply = finite
    new_state = jax.tree.map(lambda a, b: jnp.where(apply, a, b),
                             candidate, state).replace(step=state.step + 1)
  first = (~finite) & (state.nonfinite['first_step'] < 0)
  new_state = new_state.replace(nonfinite={
      'count': state.nonfinite['count'] + (~finite).astype(jnp.int32),
      'first_step': jnp.where(first, step.astype(jnp.int32),
                              state.nonfinite['first_step']),
      'first_loss': jnp.where(first, loss.astype(jnp.float32),
                              state.nonfinite['first_loss']),
  })
  certified = certify.certified_correct(
      out.logits, labels, jax.lax.stop_gradient(out.pairwise_lipschitz),
      config.loss.epsilon)
  metrics = {
      'loss': loss,
      'lipschitz_penalty': penalty,
      'accuracy': _masked_mean(jnp.argmax(out.logits, -1) == labels, mask),
      'certified_accuracy_train_eps': _masked_mean(certified, mask),
      'lipschitz': out.lipschitz,
      'learning_rate': learning_rate_schedule(
          config, steps_per_epoch)(step),
      **used,
  }
  # A skipped step contributes nothing to the epoch means; 'finite' counts
  # the steps that do.
  metrics = jax.tree.map(lambda v: jnp.where(finite, v, 0.0), metrics)
  metrics['finite'] = finite.astype(jnp.float32)
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


def certification_bounds(state: TrainState | dict[str, Any],
                         model: models.LipschitzNetwork, input_shape,
                         method: str) -> dict[str, jax.Array]:
  """Pairwise bounds K_ij for certification and the layer norms behind them.

  `state` is a `TrainState` or the network's variables
  (`{'params', 'power_iteration'}`).

  'sound': every layer's proven bound (`models.certified_bounds`: Gram
  iteration for unconstrained layers, the construction's bound for
  constrained ones, with float-rounding allowances), multiplied as the naive
  product bound. 'power': the model's own bound (naive product or LipLT)
  from the converged power-iteration state, as in the papers; each norm is
  then an estimate from below, so the certificate is not guaranteed.
  'logit_error': the forward pass's rounding bound from these norms
  (`forward_error.network_logit_error`, in `certification_dtype()`).
  """
  variables = getattr(state, 'variables', state)
  if method == 'sound':
    bounds = models.certified_bounds(model, variables, input_shape)
  elif method == 'power':
    out = model.apply(variables, jnp.zeros((1, *input_shape), jnp.float32))
    bounds = {'pairwise': out.pairwise_lipschitz,
              'layer_norms': out.layer_norms, 'lipschitz': out.lipschitz}
  else:
    raise ValueError(
        f"bound method must be 'sound' or 'power', got {method!r}")
  bounds['logit_error'] = forward_error.network_logit_error(
      model, variables, input_shape, bounds['layer_norms'])
  return bounds
