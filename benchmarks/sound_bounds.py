"""Sound Gram-iteration bounds vs converged power iteration, per layer.

For every layer of 4C3F (CIFAR-10, 32x32x3) and 8C2F (Tiny-ImageNet, 64x64x3)
with Kaiming-normal (fan-in) kernels, reports:

  * `bound`: `cll_jax.sound_bounds.operator_norm_upper_bound` (guaranteed
    upper bound, adaptive Gram iteration) and its median jitted time;
  * `power`: power iteration run to convergence (relative change <= 1e-6,
    `cll_jax.lipschitz.converge_power_iteration`), a lower estimate of
    sigma_1, and its median jitted time;
  * `ratio` = bound / power (>= 1 up to float32 rounding);
  * `f64_gap` = bound / reference - 1, with the reference computed
    independently in float64 by numpy: the exact SVD for dense layers; for
    conv layers the exact norm of the circular embedding the bound rests on
    (max over the full 2-D FFT grid of the SVD of the kernel's DFT). It is
    the iteration's slack (<= rtol) plus the float32 rounding terms the
    jitted float32 bound includes (`cll_jax.sound_bounds`, "Floating-point
    rounding"; up to a few 1e-2 for d(512) from 4096): it is >= 0.

Run: `python -m benchmarks.sound_bounds [--tiny] [--repeats N]`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np

from cll_jax import sound_bounds
from cll_jax.lipschitz import converge_power_iteration, random_unit_vector
from cll_jax.operators import LinearOperator

# ('c', channels, kernel, stride, padding) or ('d', width).
ARCHITECTURES = {
    '4C3F': ((32, 32, 3), [('c', 32, 3, 1, 1), ('c', 32, 4, 2, 1),
                           ('c', 64, 3, 1, 1), ('c', 64, 4, 2, 1),
                           ('d', 512), ('d', 512), ('d', 10)]),
    '8C2F': ((64, 64, 3), [('c', 64, 3, 1, 1), ('c', 64, 3, 1, 1),
                           ('c', 64, 4, 2, 0), ('c', 128, 3, 1, 1),
                           ('c', 128, 3, 1, 1), ('c', 128, 4, 2, 0),
                           ('c', 256, 3, 1, 1), ('c', 256, 4, 2, 0),
                           ('d', 256), ('d', 200)]),
}
TINY_ARCHITECTURES = {
    'tiny': ((8, 8, 3), [('c', 4, 3, 1, 1), ('c', 4, 4, 2, 1),
                         ('d', 16), ('d', 10)]),
}

POWER_TOL = 1e-6
POWER_MAX_ITERATIONS = 5000


def build_operators(input_shape: tuple[int, ...], layers,
                    rng: jax.Array) -> list[tuple[str, LinearOperator]]:
  """The layers' operators with Kaiming-normal (fan-in) kernels."""
  ops = []
  shape = tuple(input_shape)
  for spec in layers:
    rng, key = jax.random.split(rng)
    if spec[0] == 'c':
      _, c_out, k, s, p = spec
      fan_in = k * k * shape[-1]
      kernel = jax.random.normal(key, (k, k, shape[-1], c_out)) * np.sqrt(
          2.0 / fan_in)
      op = LinearOperator(kernel, 'conv', shape, (s, s), ((p, p), (p, p)))
      name = f'c({c_out},{k},{s},{p}) on {shape[0]}x{shape[1]}x{shape[2]}'
    else:
      _, width = spec
      d_in = int(np.prod(shape))
      kernel = jax.random.normal(key, (d_in, width)) * np.sqrt(2.0 / d_in)
      op = LinearOperator(kernel, 'dense', (d_in,))
      name = f'd({width}) from {d_in}'
    ops.append((name, op))
    shape = op.output_shape
  return ops


def _median_seconds(fn: Callable[[], jax.Array], repeats: int) -> float:
  jax.block_until_ready(fn())  # warm-up: compilation.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def float64_reference(op: LinearOperator) -> float:
  """What the bound converges to, computed independently in float64 (numpy).

  Dense: exact sigma_1. Conv: the exact norm of the circular conv that
  `sound_bounds.conv_embedding` embeds the layer in, via the full 2-D FFT of
  the zero-padded kernel and a batched SVD.
  """
  if op.kind == 'dense':
    return float(np.linalg.svd(np.asarray(op.kernel, np.float64),
                               compute_uv=False)[0])
  kernel, (m1, m2) = sound_bounds.conv_embedding(op)
  k_hat = np.fft.fft2(np.asarray(kernel, np.float64), s=(m1, m2), axes=(0, 1))
  mats = k_hat.reshape(m1 * m2, *kernel.shape[2:])
  return float(np.linalg.svd(mats, compute_uv=False)[:, 0].max())


def run(tiny: bool = False, repeats: int = 5, seed: int = 0,
        verbose: bool = True) -> list[dict]:
  """Benchmarks every layer; returns one dict per layer (and prints a table).

  Args:
    tiny: a two-conv, two-dense toy net on 8x8x3 (smoke test).
    repeats: timed repetitions after one warm-up (median reported).
    seed: PRNG seed of the kernels and power-iteration starts.
    verbose: print the table.
  """
  archs = TINY_ARCHITECTURES if tiny else ARCHITECTURES
  if tiny:
    repeats = 1
  bound_fn = jax.jit(sound_bounds.operator_norm_upper_bound)
  power_fn = jax.jit(lambda op, u: converge_power_iteration(
      op, u, tol=POWER_TOL, max_iterations=POWER_MAX_ITERATIONS)[1])
  rows = []
  rng = jax.random.PRNGKey(seed)
  for net, (input_shape, layers) in archs.items():
    rng, key = jax.random.split(rng)
    for index, (name, op) in enumerate(build_operators(input_shape, layers,
                                                       key)):
      rng, key = jax.random.split(rng)
      u = random_unit_vector(key, op.input_shape)
      bound = float(bound_fn(op))
      bound_s = _median_seconds(lambda op=op: bound_fn(op), repeats)
      power = float(power_fn(op, u))
      power_s = _median_seconds(lambda op=op, u=u: power_fn(op, u), repeats)
      reference = float64_reference(op)
      rows.append(dict(
          benchmark='sound_bounds', network=net, layer=index, name=name,
          kind=op.kind, bound=bound, bound_ms=1e3 * bound_s, power=power,
          power_ms=1e3 * power_s, ratio=bound / power,
          f64_gap=bound / reference - 1.0,
          device=jax.devices()[0].device_kind))
      if verbose:
        _print_row(rows[-1], header=len(rows) == 1)
  if verbose:
    for net in archs:
      net_rows = [r for r in rows if r['network'] == net]
      print(f'{net}: product of bounds {np.prod([r["bound"] for r in net_rows]):.6g}'
            f', of power estimates {np.prod([r["power"] for r in net_rows]):.6g}'
            f'; bound time {sum(r["bound_ms"] for r in net_rows):.1f} ms, '
            f'power time {sum(r["power_ms"] for r in net_rows):.1f} ms')
  return rows


def _print_row(row: dict, header: bool) -> None:
  if header:
    print(f'{"net":5} {"layer":32} {"bound":>10} {"bound ms":>10} '
          f'{"power":>10} {"power ms":>10} {"ratio":>10} {"f64 gap":>10}')
  print(f'{row["network"]:5} {row["name"]:32} {row["bound"]:10.6f} '
        f'{row["bound_ms"]:10.2f} {row["power"]:10.6f} {row["power_ms"]:10.2f} '
        f'{row["ratio"]:10.6f} {row["f64_gap"]:10.2e}', flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tiny', action='store_true', help='smoke test')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  run(tiny=args.tiny, repeats=args.repeats, seed=args.seed)


if __name__ == '__main__':
  main()
