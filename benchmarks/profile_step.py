"""Where the milliseconds of the 4C3F CLL step go (CPU, batch 128).

Each part of `train.train_step` (no augmentation) is jitted and timed alone
on the same weights and batch, all parts alternating in one process
(`benchmarks.time_alternating`, so they share the load):

  * `forward`: the network's logits (`benchmarks.plain_forward`: convs,
    MinMax, dense layers; no norms);
  * `forward + input grads`: the gradient of the loss with respect to the
    images: forward and the backward through activations and convs' input
    gradients, without any kernel gradient;
  * `forward + all grads`: the gradient with respect to every parameter at
    a constant K (the step without the bound and the optimizer); minus the
    previous row it is the cost of the kernel gradients;
  * `power iteration`: 5 warm-started iterations of every layer (no
    gradient);
  * `bound + grad`: sigma_l = ||A_l u_l|| of every layer, K_ij, lambda K^2
    and their gradient with the iterates fixed;
  * `loss`: the CLL loss of given logits and its gradient;
  * `adam`: the optimizer update;
  * `step`: the whole `train.train_step`.

The parts overlap (XLA fuses across them in the whole step), so they do not
add up exactly to `step`; they say which part to work on. With torch
installed, the PyTorch reference's step is profiled by `torch.profiler`,
grouped the same way (conv forward, conv backward, matmuls, elementwise,
optimizer).

Run: `python -m benchmarks.profile_step [--tiny] [--repeats N]`.
"""

from __future__ import annotations

import argparse
import collections

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import fake_batch, load_average, plain_forward
from benchmarks import time_alternating
from benchmarks import torch_reference
from benchmarks import train_step as train_step_benchmark
from cll_jax import lipschitz
from cll_jax import losses
from cll_jax import models
from cll_jax import train


def _parts(tiny: bool, seed: int = 0):
  input_shape = (8, 8, 3) if tiny else (32, 32, 3)
  config = train_step_benchmark.make_config(tiny, False, 5)
  model = train.create_model(config, 10)
  state = train.create_train_state(config, model, jax.random.PRNGKey(seed),
                                   input_shape, 390)
  batch = fake_batch(jax.random.PRNGKey(seed + 1), config.train.batch_size,
                     input_shape, 10)
  images = batch['image'].astype(jnp.float32) / 255.0
  labels = batch['label']
  eps, p, lam = config.loss.epsilon, config.loss.p_start, config.loss.lam
  k_const = jnp.ones((10, 10))
  names = models.layer_names(model)

  def data_loss(params, x):
    logits = plain_forward(model, params, x)
    return jnp.mean(losses.multiclass_cll_loss(logits, labels, k_const, eps,
                                               p))

  def power_iterations(params, pi_state):
    ops = models.network_operators(model, params, input_shape)
    return [lipschitz.power_iteration(op, pi_state[name]['u'], 5)[0]
            for name, op in zip(names, ops)]

  def bound_penalty(params, pi_state):
    ops = models.network_operators(model, params, input_shape)
    sigmas = jnp.stack([jnp.linalg.norm(op(pi_state[name]['u']))
                        for name, op in zip(names, ops)])
    prefix = jnp.prod(sigmas[:-1])
    pairwise = lipschitz.pairwise_lipschitz(params['head']['kernel'], prefix)
    return losses.lipschitz_penalty(prefix * sigmas[-1], lam) + 1e-9 * jnp.sum(
        pairwise)

  logits = plain_forward(model, state.params, images)

  def loss_only(z):
    return jnp.mean(losses.multiclass_cll_loss(z, labels, k_const, eps, p))

  grads = jax.grad(data_loss)(state.params, images)
  tx = state.tx
  step = train_step_benchmark.train_step_fn(config)
  # The step donates its state: it gets a copy, the parts keep the original.
  holder = {'state': jax.tree.map(jnp.copy, state)}

  def whole_step():
    holder['state'], metrics = step(holder['state'], batch)
    return metrics

  fns = {
      'forward': (jax.jit(lambda p: plain_forward(model, p, images)),
                  (state.params,)),
      'forward + input grads': (jax.jit(jax.grad(data_loss, argnums=1)),
                                (state.params, images)),
      'forward + all grads': (jax.jit(jax.grad(data_loss)),
                              (state.params, images)),
      'power iteration': (jax.jit(power_iterations),
                          (state.params, state.power_iteration)),
      'bound + grad': (jax.jit(jax.grad(bound_penalty)),
                       (state.params, state.power_iteration)),
      'loss': (jax.jit(jax.value_and_grad(loss_only)), (logits,)),
      'adam': (jax.jit(tx.update), (grads, state.opt_state, state.params)),
  }
  calls = [(name, (lambda f=f, a=a: f(*a))) for name, (f, a) in fns.items()]
  calls.append(('step', whole_step))
  return calls, model, state, batch, config, input_shape


def run(tiny: bool = False, repeats: int = 10, verbose: bool = True
        ) -> list[dict]:
  calls, model, state, batch, config, input_shape = _parts(tiny)
  load = load_average()
  # time_alternating's ratio compares the first two calls; here every call
  # is reported on its own.
  timings = time_alternating(calls, repeats)
  rows = [dict(benchmark='profile_step', framework='jax', part=name,
               median_ms=timings[name]['median_ms'],
               cpu_ms=timings[name]['cpu_ms'], load=load,
               model=config.model.name, batch=config.train.batch_size)
          for name, _ in calls]
  if verbose:
    for r in rows:
      print(f"jax {r['part']:>24}: {r['median_ms']:7.1f} ms", flush=True)
  if torch_reference.AVAILABLE:
    rows += _torch_profile(model, state, batch, config, input_shape, load)
    if verbose:
      for r in rows:
        if r['framework'] == 'pytorch':
          print(f"pytorch {r['part']:>20}: {r['median_ms']:7.1f} ms",
                flush=True)
  return rows


# torch.profiler op names -> the parts of the table.
_TORCH_GROUPS = (
    ('conv backward', ('convolution_backward',)),
    ('conv forward', ('mkldnn_convolution', '_slow_conv2d', 'convolution',
                      'conv_transpose')),
    ('matmul', ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::matmul')),
    ('optimizer', ('addcdiv', 'lerp', 'addcmul', '_foreach', 'sqrt_')),
)


def _torch_profile(model, state, batch, config, input_shape, load,
                   steps: int = 3) -> list[dict]:
  import torch  # pylint: disable=g-import-not-at-top
  from torch import profiler  # pylint: disable=g-import-not-at-top
  reference = torch_reference.Reference.from_jax(
      model, jax.device_get(state.variables), input_shape,
      epsilon=config.loss.epsilon, p=config.loss.p_start, lam=config.loss.lam)
  x = torch_reference.to_nchw_float(np.asarray(batch['image']))
  y = torch.from_numpy(np.array(batch['label'])).long()
  for _ in range(2):
    reference.step(x, y)
  with profiler.profile(activities=[profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      reference.step(x, y)
  totals = collections.Counter()
  for event in prof.key_averages():
    group = next((g for g, keys in _TORCH_GROUPS
                  if any(k in event.key for k in keys)), 'elementwise + rest')
    totals[group] += event.self_cpu_time_total / 1e3 / steps
  return [dict(benchmark='profile_step', framework='pytorch', part=g,
               median_ms=totals[g], cpu_ms=totals[g], load=load)
          for g in [g for g, _ in _TORCH_GROUPS] + ['elementwise + rest']]


def _gap_to_torch(rows: list[dict]) -> list[str]:
  """Where the step's gap to PyTorch lies, in CPU time (both sides summed
  over threads, so comparable)."""
  jax_cpu = {r['part']: r['cpu_ms'] for r in rows if r['framework'] == 'jax'}
  torch_cpu = {r['part']: r['cpu_ms'] for r in rows
               if r['framework'] == 'pytorch'}
  needed = {'forward + all grads', 'power iteration', 'bound + grad', 'loss',
            'adam', 'step'}
  if not needed <= set(jax_cpu) or not torch_cpu:
    return []
  network_parts = ('conv forward', 'conv backward', 'matmul')
  jax_net = jax_cpu['forward + all grads']
  torch_net = sum(torch_cpu.get(k, 0.0) for k in network_parts)
  jax_rest = sum(jax_cpu[k] for k in ('power iteration', 'bound + grad',
                                      'loss', 'adam'))
  torch_rest = sum(v for k, v in torch_cpu.items() if k not in network_parts)
  return ['', f"* Where the gap is, in CPU time: JAX's step "
          f"{jax_cpu['step']:.0f} ms, of which the network's forward and all "
          f"its gradients (convolutions, MinMax and their gradients) "
          f"{jax_net:.0f} ms and the power iteration, bound, loss and Adam "
          f"{jax_rest:.0f} ms; PyTorch's step {torch_net + torch_rest:.0f} "
          f"ms, of which its convolutions and matmuls (oneDNN) "
          f"{torch_net:.0f} ms and everything else (MinMax, bound, loss, "
          f"autograd, Adam) {torch_rest:.0f} ms. XLA's network alone takes "
          f"more than PyTorch's whole step: the remaining gap is XLA's CPU "
          'convolution kernels (section 1b: the formulations tried), not '
          'the Lipschitz machinery.']


def format_markdown(rows: list[dict]) -> str:
  out = ['## 1d. Profile of the 4C3F CLL step (`benchmarks.profile_step`)',
         '', __doc__.split('\n\n')[1].replace('\n', ' '), '',
         '| part (JAX) | median ms | cpu ms |', '|---|---|---|']
  for r in (r for r in rows if r['framework'] == 'jax'):
    out.append(f"| {r['part']} | {r['median_ms']:.1f} | {r['cpu_ms']:.1f} |")
  by = {r['part']: r['median_ms'] for r in rows if r['framework'] == 'jax'}
  if {'forward + all grads', 'forward + input grads'} <= set(by):
    out += ['', f"* Kernel gradients (all grads - input grads): "
            f"{by['forward + all grads'] - by['forward + input grads']:.1f} "
            f"ms; input gradients (input grads - forward): "
            f"{by['forward + input grads'] - by['forward']:.1f} ms; forward "
            f"{by['forward']:.1f} ms; the bound (power iteration + bound "
            f"grad) {by['power iteration'] + by['bound + grad']:.1f} ms; "
            f"loss {by['loss']:.1f} ms; Adam {by['adam']:.1f} ms. Load "
            f"{rows[0]['load']}."]
  torch_rows = [r for r in rows if r['framework'] == 'pytorch']
  if torch_rows:
    out += ['', 'PyTorch reference, `torch.profiler` self CPU time per step '
            '(both threads summed, so above the wall time):', '',
            '| part (PyTorch) | cpu ms |', '|---|---|']
    out += [f"| {r['part']} | {r['cpu_ms']:.1f} |" for r in torch_rows]
    out += _gap_to_torch(rows)
  else:
    out += ['', f'* {torch_reference.SKIP_MESSAGE}.']
  return '\n'.join(out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tiny', action='store_true')
  parser.add_argument('--repeats', type=int, default=10)
  args = parser.parse_args()
  print(format_markdown(run(args.tiny, args.repeats)))


if __name__ == '__main__':
  main()
