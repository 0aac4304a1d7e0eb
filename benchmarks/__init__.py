"""Speed and quality benchmarks of cll_jax; `python -m benchmarks.run`.

Shared helpers: a jitted-call timer that reports compile time separately from
the median steady-state time, a description of the machine, and a plain
(bound-free) forward pass of a `LipschitzNetwork` used as the reference that
the certified computations are compared against.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from cll_jax import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def block(tree: Any) -> Any:
  return jax.block_until_ready(tree)


def time_calls(call: Callable[[], Any], repeats: int,
               warmup: int = 1) -> dict[str, float]:
  """Compile time of the first call and the median of `repeats` later calls.

  `call` takes no arguments (a closure that may carry state, e.g. a donated
  train state) and returns something to block on. The first call includes
  tracing and XLA compilation; `warmup - 1` further untimed calls follow.

  Returns:
    {'compile_s', 'median_ms', 'min_ms', 'max_ms', 'cpu_ms', 'repeats'}:
    wall-clock statistics in ms, and `cpu_ms` the median CPU time of the
    process (all threads) per call, which a loaded machine distorts less.
  """
  start = time.perf_counter()
  block(call())
  compile_s = time.perf_counter() - start
  for _ in range(max(warmup - 1, 0)):
    block(call())
  times, cpu_times = [], []
  for _ in range(repeats):
    start, cpu_start = time.perf_counter(), time.process_time()
    block(call())
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
  return {'compile_s': compile_s,
          'median_ms': 1e3 * statistics.median(times),
          'min_ms': 1e3 * min(times), 'max_ms': 1e3 * max(times),
          'cpu_ms': 1e3 * statistics.median(cpu_times),
          'repeats': repeats}


def time_alternating(calls: Sequence[tuple[str, Callable[[], Any]]],
                     repeats: int, warmup: int = 2) -> dict[str, Any]:
  """Times two or more calls in turn (A B A B ...) in this process.

  On a shared machine the load moves between measurements; calls measured
  alternately see the same load, so the ratio of each round's pair is far
  steadier than the ratio of two separate medians. `warmup` untimed calls of
  each come first (the first one compiles).

  Returns:
    {name: {'median_ms', 'min_ms', 'max_ms', 'cpu_ms', 'compile_s'}} for every
    call (and 'rounds_ms', every round's wall time), and 'ratio': {'min',
    'median', 'max'} of the per-round wall-time ratios of the first call
    over the second.
  """
  stats: dict[str, Any] = {}
  walls: dict[str, list[float]] = {name: [] for name, _ in calls}
  cpus: dict[str, list[float]] = {name: [] for name, _ in calls}
  for name, call in calls:
    start = time.perf_counter()
    block(call())
    stats[name] = {'compile_s': time.perf_counter() - start}
    for _ in range(max(warmup - 1, 0)):
      block(call())
  for _ in range(repeats):
    for name, call in calls:
      start, cpu_start = time.perf_counter(), time.process_time()
      block(call())
      walls[name].append(time.perf_counter() - start)
      cpus[name].append(time.process_time() - cpu_start)
  for name, _ in calls:
    stats[name].update(
        median_ms=1e3 * statistics.median(walls[name]),
        min_ms=1e3 * min(walls[name]), max_ms=1e3 * max(walls[name]),
        cpu_ms=1e3 * statistics.median(cpus[name]), repeats=repeats,
        rounds_ms=[1e3 * t for t in walls[name]])
  (first, _), (second, _) = calls[0], calls[1]
  stats['ratio'] = round_ratios(stats[first], stats[second])
  return stats


def round_ratios(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
  """min / median / max over the rounds of `time_alternating` of a / b."""
  ratios = [x / y for x, y in zip(a['rounds_ms'], b['rounds_ms'])]
  return {'min': min(ratios), 'median': statistics.median(ratios),
          'max': max(ratios)}


def load_average() -> str:
  try:
    return ', '.join(f'{x:.2f}' for x in os.getloadavg())
  except OSError:
    return 'unknown'


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def git_commit() -> str:
  try:
    out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    dirty = subprocess.run(['git', 'status', '--porcelain'], cwd=REPO,
                           capture_output=True, text=True,
                           check=True).stdout.strip()
    return out.strip() + (' (+ uncommitted changes)' if dirty else '')
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def machine_info() -> dict[str, str]:
  return {
      'cores': str(os.cpu_count()),
      'cpu': cpu_model(),
      'jax': jax.__version__,
      'backend': jax.default_backend(),
      'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
      'xla_flags': os.environ.get('XLA_FLAGS', '').strip() or '(none)',
  }


def plain_forward(model: models.LipschitzNetwork, params,
                  images: jax.Array) -> jax.Array:
  """Logits of `model` without any norm estimate or pairwise bound.

  The same layers (`LinearOperator` + bias + activation) as the model's
  forward pass, minus the power iteration, the per-layer norm and K_ij: what
  an ordinary (uncertified) network of this architecture computes.
  """
  act, _ = models.ACTIVATIONS[model.activation]
  x = images
  if model.input_mean is not None:
    x = x - jnp.asarray(model.input_mean, x.dtype)
  if model.input_std is not None:
    x = x / jnp.asarray(model.input_std, x.dtype)
  ops = models.network_operators(model, params, images.shape[1:])
  for i, (name, op) in enumerate(zip(models.layer_names(model), ops)):
    x = x.reshape((x.shape[0], *op.input_shape))
    x = op(x) + params[name]['bias']
    if i + 1 < len(ops):
      x = act(x)
  return x


def fake_batch(rng: jax.Array, batch_size: int, input_shape, num_classes: int,
               uint8: bool = True) -> dict[str, jax.Array]:
  """A random batch: uint8 images (as the loaders give) and int labels."""
  k1, k2 = jax.random.split(rng)
  images = jax.random.randint(k1, (batch_size, *input_shape), 0, 256)
  images = images.astype(jnp.uint8) if uint8 else images / 255.0
  return {'image': images,
          'label': jax.random.randint(k2, (batch_size,), 0, num_classes)}


