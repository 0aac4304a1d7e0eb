"""Many small trainings at once: data on device, epochs in one jit, runs vmapped.

For small problems (two-moons: 2,000 points, a 7-layer MLP) the Python loop
of `train.train_and_evaluate` costs far more than the arithmetic. Here

* the whole training set lives on the device; an epoch is one permutation
  (`epoch_batches`) and a `jax.lax.scan` of the library's own
  `train.train_step` over its batches;
* many epochs run inside one jitted call (`jax.lax.scan` over epochs), with
  the power iteration converged (`models.converge_power_iteration`) after
  every `converge_every` epochs and after the last one, as the paper does
  after every epoch (CLL supp. B);
* the R runs of a sweep, whose configs differ only in `SWEEP_FIELDS` (the
  loss hyper-parameters eps and the slack schedule, and the seeds), train
  together under `jax.vmap`: they share the model and the optimizer; runs
  with the same seed also share the initial parameters and the batch order,
  so their differences come from the hyper-parameters alone. Runs whose
  data seeds differ get one data set each (same size).

The loss schedules of every run are the library's (`train.loss_schedules` of
that run's config); inside the vmapped step the run's own values are picked
by its index (`stacked_schedules`), so epsilon and p enter the loss as traced
scalars and `train.train_step` is used unchanged.

One caveat: `train_step`'s logged metric 'certified_accuracy_train_eps' reads
`config.loss.epsilon` of the shared config, i.e. the first run's eps; this
module does not report it (evaluate with `certify` instead).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cll_jax import data as data_lib
from cll_jax import models
from cll_jax import train

# Config fields (dotted paths) in which the runs of one sweep may differ.
SWEEP_FIELDS = ('loss.epsilon', 'loss.p_start', 'loss.p_end', 'loss.p_gamma',
                'loss.soc_gamma', 'loss.p_convention', 'eval.radii', 'seed',
                'data.kwargs.seed')


def _flatten(d: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def check_sweep_configs(configs: Sequence[ml_collections.ConfigDict]
                        ) -> ml_collections.ConfigDict:
  """Checks the configs differ only in `SWEEP_FIELDS`; returns the first.

  Raises:
    ValueError: no config, or a field outside `SWEEP_FIELDS` differs (named).
  """
  if not configs:
    raise ValueError('configs must hold at least one config, got none')
  ref = _flatten(configs[0].to_dict())
  for i, c in enumerate(configs[1:], start=1):
    other = _flatten(c.to_dict())
    differ = sorted(k for k in set(ref) | set(other)
                    if k not in SWEEP_FIELDS and ref.get(k) != other.get(k))
    if differ:
      raise ValueError(
          f'configs of one sweep may differ only in {SWEEP_FIELDS}; config {i} '
          f'differs from config 0 in {differ}')
  return configs[0]


def stacked_schedules(configs: Sequence[ml_collections.ConfigDict],
                      steps_per_epoch: int,
                      run_index: jax.Array) -> train.LossSchedules:
  """`train.LossSchedules` whose values are those of run `run_index`.

  Every schedule of every run is evaluated (scalars, negligible cost) and the
  run's own value is selected by a gather, so `run_index` may be traced or
  vmapped.
  """
  per_run = [train.loss_schedules(c, steps_per_epoch) for c in configs]

  def pick(field: str) -> Callable[[jax.Array], jax.Array]:
    fns = [getattr(s, field) for s in per_run]

    def schedule(step):
      values = jnp.stack([jnp.asarray(f(step), jnp.float32) for f in fns])
      return values[run_index]
    return schedule

  return train.LossSchedules(**{
      field.name: pick(field.name)
      for field in dataclasses.fields(train.LossSchedules)})


def epoch_batches(key: jax.Array, epoch: jax.Array, num_examples: int,
                  batch_size: int) -> jax.Array:
  """Example indices of one epoch's batches, `(steps, batch_size)` int32.

  A permutation drawn from `fold_in(key, epoch)`; as `data.train_batches`,
  only full batches are used and the last `num_examples mod batch_size`
  examples of the permutation are skipped this epoch.
  """
  steps = data_lib.steps_per_epoch(num_examples, batch_size)
  perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
  return perm[:steps * batch_size].reshape(steps, batch_size)


def _stack(trees: Sequence[Any]):
  """Stacks the leaves of same-shaped pytrees into the first one's structure.

  Leaf-wise, not `jax.tree.map`: the train states of different seeds hold
  distinct (equal) optimizer objects in their static metadata.
  """
  leaves = [jax.tree.leaves(t) for t in trees]
  return jax.tree.unflatten(jax.tree.structure(trees[0]),
                            [jnp.stack(xs) for xs in zip(*leaves)])


def unstack(tree, index: int):
  """Run `index` of a stacked pytree."""
  return jax.tree.map(lambda x: x[index], tree)


class Sweep:
  """Trains R runs of one model/optimizer, differing in `SWEEP_FIELDS`.

  Usage:
    sweep = Sweep(configs, model, images, labels)
    states, losses = sweep.train(num_epochs)       # stacked TrainStates

  Run r draws its initial parameters and batch order from `configs[r].seed`
  (as `train.train_and_evaluate`: init from `split(PRNGKey(seed))[0]`, the
  batch order from `fold_in(PRNGKey(seed), 1)`). The data are the caller's:
  one `images`, `labels` pair for every run, or a list of pairs (one per
  run), needed when the runs' `data.kwargs.seed` differ.

  `epoch_summary(state) -> {name: array}`, if given, is evaluated on each
  run's state after every epoch (after the power iteration is converged, if
  due); `train` returns its values per epoch.

  Attributes:
    configs: the R run configs.
    config: the shared config (the first run's).
    model: the `LipschitzNetwork`.
    steps_per_epoch: full batches per epoch.
    state: the stacked `train.TrainState` of the R runs (leading axis R).
    epochs_done: epochs trained so far.
  """

  def __init__(self, configs: Sequence[ml_collections.ConfigDict],
               model: models.LipschitzNetwork,
               images: np.ndarray | Sequence[np.ndarray],
               labels: np.ndarray | Sequence[np.ndarray], *,
               converge_every: int = 1, epochs_per_call: int = 50,
               epoch_summary: Callable[[train.TrainState],
                                       dict[str, jax.Array]] | None = None):
    if converge_every < 1:
      raise ValueError(f'converge_every must be >= 1, got {converge_every}')
    if epochs_per_call < 1:
      raise ValueError(f'epochs_per_call must be >= 1, got {epochs_per_call}')
    self.configs = list(configs)
    self.config = check_sweep_configs(self.configs)
    self.model = model
    self.num_runs = len(self.configs)
    self.per_run_data = isinstance(images, (list, tuple))
    if self.per_run_data:
      if not len(images) == len(labels) == self.num_runs:
        raise ValueError(
            f'per-run data need one images and labels array per config '
            f'({self.num_runs}), got {len(images)} and {len(labels)}')
      shapes = {np.shape(x) for x in images}
      if len(shapes) != 1:
        raise ValueError(f'per-run images must have one shape, got {shapes}')
      self.images = jnp.stack([jnp.asarray(x) for x in images])
      self.labels = jnp.stack([jnp.asarray(y) for y in labels])
      example_images = images[0]
    else:
      data_seeds = {c.data.kwargs.get('seed') for c in self.configs}
      if len(data_seeds) > 1:
        raise ValueError(
            f'the configs differ in data.kwargs.seed {sorted(data_seeds)}; '
            f'pass one images and labels array per run')
      self.images = jnp.asarray(images)
      self.labels = jnp.asarray(labels)
      example_images = images
    self.input_shape = tuple(example_images.shape[1:])
    self.batch_size = self.config.train.batch_size
    self.steps_per_epoch = data_lib.steps_per_epoch(len(example_images),
                                                    self.batch_size)
    self.converge_every = converge_every
    self.epochs_per_call = epochs_per_call
    self.epoch_summary = epoch_summary
    rngs = [jax.random.PRNGKey(c.seed) for c in self.configs]
    init_rngs, aug_rngs = zip(*(jax.random.split(rng) for rng in rngs))
    self._aug_rngs = jnp.stack(aug_rngs)
    self._data_keys = jnp.stack([jax.random.fold_in(rng, 1) for rng in rngs])
    states = {}
    for c, init_rng in zip(self.configs, init_rngs):
      if c.seed not in states:
        states[c.seed] = train.create_train_state(
            self.config, model, init_rng, self.input_shape,
            self.steps_per_epoch)
    self.state = _stack([states[c.seed] for c in self.configs])
    self.epochs_done = 0
    self._compiled: dict[int, Callable] = {}

  def _run_chunk(self, state, run_index, first_epoch, images, labels,
                 aug_rng, data_key, *, num_epochs: int, total_epochs: int):
    """`num_epochs` epochs of one run (vmapped over `state`, `run_index`)."""
    c = self.config
    sched = stacked_schedules(self.configs, self.steps_per_epoch, run_index)
    step_fn = functools.partial(
        train.train_step, config=c, sched=sched,
        steps_per_epoch=self.steps_per_epoch, rng=aug_rng)
    converge = functools.partial(
        models.converge_power_iteration, self.model,
        input_shape=self.input_shape, tol=c.train.converge_tol,
        max_iterations=c.train.converge_max_iterations)

    def one_step(st, idx):
      st, metrics = step_fn(st, {'image': images[idx], 'label': labels[idx]})
      return st, (metrics['loss'], metrics['accuracy'])

    def one_epoch(st, epoch):
      idx = epoch_batches(data_key, epoch, images.shape[0], self.batch_size)
      st, (loss, acc) = jax.lax.scan(one_step, st, idx)
      # `epoch` is not vmapped, so this stays a real branch under vmap.
      due = ((epoch + 1) % self.converge_every == 0) | (
          epoch + 1 == total_epochs)
      pi = jax.lax.cond(due, lambda: converge(st.variables),
                        lambda: st.power_iteration)
      st = st.replace(power_iteration=pi)
      summary = self.epoch_summary(st) if self.epoch_summary else {}
      return st, {'loss': jnp.mean(loss), 'accuracy': jnp.mean(acc),
                  **summary}

    epochs = first_epoch + jnp.arange(num_epochs)
    return jax.lax.scan(one_epoch, state, epochs)

  def _compiled_chunk(self, num_epochs: int, total_epochs: int):
    key = (num_epochs, total_epochs)
    if key not in self._compiled:
      fn = functools.partial(self._run_chunk, num_epochs=num_epochs,
                             total_epochs=total_epochs)
      data_axis = 0 if self.per_run_data else None
      self._compiled[key] = jax.jit(
          jax.vmap(fn, in_axes=(0, 0, None, data_axis, data_axis, 0, 0)),
          donate_argnums=0)
    return self._compiled[key]

  def train(self, num_epochs: int, log: Callable[[str], None] | None = None
            ) -> tuple[train.TrainState, dict[str, np.ndarray]]:
    """Trains all runs for `num_epochs` epochs (the configs' total).

    Returns:
      The stacked final states and the per-epoch history: means
      `{'loss', 'accuracy'}` over the training batches (before each step's
      update), each `(R, num_epochs)`, and the `epoch_summary` values, each
      `(R, num_epochs, ...)`.
    """
    chunks = []
    run_index = jnp.arange(self.num_runs)
    while self.epochs_done < num_epochs:
      n = min(self.epochs_per_call, num_epochs - self.epochs_done)
      fn = self._compiled_chunk(n, num_epochs)
      start = time.time()
      self.state, history = fn(self.state, run_index,
                               jnp.asarray(self.epochs_done), self.images,
                               self.labels, self._aug_rngs, self._data_keys)
      history = jax.tree.map(np.asarray, history)
      self.epochs_done += n
      chunks.append(history)
      if log is not None:
        log(f'epoch {self.epochs_done}/{num_epochs} ({time.time() - start:.1f}'
            f' s): loss {np.array2string(history["loss"][:, -1], precision=4)}'
            f', train acc '
            f'{np.array2string(history["accuracy"][:, -1], precision=3)}')
    history = ({k: np.concatenate([h[k] for h in chunks], axis=1)
                for k in chunks[0]} if chunks else {})
    return self.state, history
