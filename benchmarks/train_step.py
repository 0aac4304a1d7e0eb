"""Time of one CLL training step of 4C3F (CIFAR-10 shapes, batch 128).

Variants, all the real `cll_jax.train.train_step` jitted with the train state
donated, except the last:

  * `cll`: the paper's step: CLL loss, 5 power iterations per layer, the
    lambda K^2 term, on-device augmentation;
  * `cll_no_aug`: the same without augmentation;
  * `cll_pi0`: no augmentation, `num_power_iterations = 0` (each layer still
    evaluates ||A u|| at its frozen iterate and K_ij);
  * `no_bound`: no augmentation, no power iteration, no layer norms, no K_ij
    and no lambda K^2: the same network (`benchmarks.plain_forward`) and the
    CLL loss with a constant K, Adam. The difference `cll_no_aug - no_bound`
    is the cost of the Lipschitz bound.

Run: `python -m benchmarks.train_step [--tiny] [--repeats N]`.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from benchmarks import fake_batch, plain_forward, time_calls
from cll_jax import losses
from cll_jax import train
from experiments import cifar10_4c3f

def make_config(tiny: bool, augment: bool, power_iterations: int):
  config = cifar10_4c3f.get_config()
  config.model.num_power_iterations = power_iterations
  config.data.augment.enabled = augment
  if tiny:
    config.model.name = 'tiny_cnn'
    config.train.batch_size = 8
  return config


def _input_shape(tiny: bool):
  return (8, 8, 3) if tiny else (32, 32, 3)


def train_step_fn(config, steps_per_epoch: int = 390):
  """The jitted `train.train_step` exactly as `train_and_evaluate` builds it."""
  sched = train.loss_schedules(config, steps_per_epoch)
  return jax.jit(functools.partial(
      train.train_step, config=config, sched=sched,
      steps_per_epoch=steps_per_epoch, rng=jax.random.PRNGKey(1)),
      donate_argnums=0)


def no_bound_step_fn(config, model, steps_per_epoch: int = 390):
  """The same step with the bound removed (constant K_ij = 1, no penalty)."""
  sched = train.loss_schedules(config, steps_per_epoch)

  def step(state, batch):
    images = train.prepare_images(config, batch['image'], None)
    labels = batch['label']
    k = jnp.ones((model.num_classes, model.num_classes), images.dtype)

    def loss_fn(params):
      logits = plain_forward(model, params, images)
      values = losses.multiclass_cll_loss(
          logits, labels, k, sched.epsilon(state.step),
          sched.slack(state.step))
      return jnp.mean(values), logits

    grads, logits = jax.grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads), {
        'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels)}

  return jax.jit(step, donate_argnums=0)


def _time_step(step, state, batch, repeats: int) -> dict:
  holder = {'state': state}

  def call():
    holder['state'], metrics = step(holder['state'], batch)
    return metrics

  return time_calls(call, repeats, warmup=2)


def run(tiny: bool = False, repeats: int = 10, seed: int = 0,
        verbose: bool = True) -> list[dict]:
  """Times every variant; returns one row per variant."""
  input_shape = _input_shape(tiny)
  rows = []
  for name, augment, pi in (('cll', True, 5), ('cll_no_aug', False, 5),
                            ('cll_pi0', False, 0), ('no_bound', False, 0)):
    config = make_config(tiny, augment, pi)
    model = train.create_model(config, 10)
    state = train.create_train_state(config, model, jax.random.PRNGKey(seed),
                                     input_shape, 390)
    batch = fake_batch(jax.random.PRNGKey(seed + 1),
                       config.train.batch_size, input_shape, 10)
    if name == 'no_bound':
      step = no_bound_step_fn(config, model)
    else:
      step = train_step_fn(config)
    timing = _time_step(step, state, batch, repeats)
    row = dict(benchmark='train_step', variant=name,
               model=config.model.name, batch=config.train.batch_size,
               augment=augment, power_iterations=pi, **timing)
    rows.append(row)
    if verbose:
      print(f"{name:12s} median {row['median_ms']:8.1f} ms  "
            f"(min {row['min_ms']:.1f}, compile {row['compile_s']:.1f} s)",
            flush=True)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tiny', action='store_true')
  parser.add_argument('--repeats', type=int, default=10)
  args = parser.parse_args()
  run(tiny=args.tiny, repeats=args.repeats)


if __name__ == '__main__':
  main()
