"""LipLT vs the naive product bound: tightness and cost (arXiv 2310.00116).

Two measurements on the ReLU networks of the CRM/LipLT paper, 4C3F and 6C2F
(CIFAR-10, 32x32x3, 10 classes) and 8C2F (Tiny-ImageNet, 64x64x3, 200
classes):

1. Tightness. With the network's linear maps W_0..W_K (`models.
   network_operators`), the product norms ||W_k...W_s|| are run to
   convergence (`liplt.converge_product_norms`, then one more block of
   `CHECK_BLOCK` iterations whose largest relative change is reported as
   `residual`) and every single-layer norm independently
   (`lipschitz.converge_power_iteration`). From these:

     global   = liplt_bound / naive_product_bound
                (m_K  vs  prod_l ||W_l||, ReLU: beta = 1);
     pairwise = L_ij^LipLT / L_ij^naive over the pairs i != j, reported as
                max and median over pairs, where
                L_ij^naive = ||W_K^T (e_i - e_j)|| prod_{l<K} ||W_l||.

   With exact norms every ratio is <= 1 (see `cll_jax.liplt`); the ratios
   say how much certified radius LipLT gains (radius ~ 1 / bound). They are
   measured on Kaiming-normal initial weights and, where `train_steps > 0`,
   after that many CRM training steps with the LipLT bound on offline
   CIFAR-10 (4C3F/6C2F only; random images where the data set is missing,
   and always in `tiny` mode). The input-normalisation factor is 1 here and
   cancels in the ratios anyway.

2. Cost. Median time of the jitted `train.train_step` (CRM loss, no
   augmentation, 5 power iterations, batch `TRAIN_BATCH`, state donated) with
   `bound='liplt'` and `bound='naive'`, the rest of the model identical; and
   of the LipLT bound alone at Kaiming weights: `product_norms` with 5
   iterations (`product_norms`), `liplt_pairwise_bound` + `liplt_bound` from
   those norms (`pairwise_bound`; the sum of the two is one bound
   evaluation), and both with the gradient with respect to every kernel
   (`bound_grad`, what a training step pays on top of the forward pass).
   8C2F (200 classes) is too slow for whole training steps on a 2-core CPU:
   only the two forward parts of its bound are timed, with one repeat.

Run: `python -m benchmarks.liplt [--tiny] [--train-steps N]`; prints the
markdown section that `benchmarks.run` includes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import fake_batch, load_average, round_ratios
from benchmarks import time_alternating, time_calls
from benchmarks import train_step as train_step_benchmark
from cll_jax import liplt
from cll_jax import lipschitz
from cll_jax import models
from cll_jax import train
from experiments import cifar10_crm

# ReLU slopes [alpha, beta].
ALPHA, BETA = models.ACTIVATIONS['relu'][1]
# Iterations after convergence whose largest relative change is reported.
CHECK_BLOCK = 10
TRAIN_BATCH = 128
POWER_ITERATIONS = 5
# Issue 16: the LipLT step at most this many times the naive step.
TARGET_RATIO = 1.5


@dataclasses.dataclass(frozen=True)
class Case:
  name: str  # architecture in models.ARCHITECTURES
  input_shape: tuple[int, int, int]
  num_classes: int
  max_iterations: int  # cap of the convergence runs
  time_train_step: bool  # else only the bound is timed
  trainable: bool  # CIFAR-shaped: may be trained for the trained ratios
  batch: int = TRAIN_BATCH


FULL_CASES = (
    Case('4c3f', (32, 32, 3), 10, 500, True, True),
    Case('6c2f', (32, 32, 3), 10, 500, True, True),
    # ~2.5 s per product iteration on 2 loaded cores: capped, see residual.
    Case('8c2f', (64, 64, 3), 200, 60, False, False),
)
TINY_CASES = (
    Case('tiny_cnn', (8, 8, 3), 10, 300, True, True, batch=8),
)


def _config(case: Case, bound: str):
  """The CIFAR-10 CRM experiment's config for `case`, without augmentation."""
  config = cifar10_crm.get_config(f'data=offline,bound={bound}')
  config.model.name = case.name
  config.model.num_power_iterations = POWER_ITERATIONS
  config.data.augment.enabled = False
  config.train.batch_size = case.batch
  # CRM from the first step (the paper starts with plain cross-entropy):
  # the robust term is what shapes the bound.
  config.loss.crm_warmup_epochs = 0
  return config


def _new_state(case: Case, bound: str, seed: int):
  config = _config(case, bound)
  model = train.create_model(config, case.num_classes)
  state = train.create_train_state(config, model, jax.random.PRNGKey(seed),
                                   case.input_shape, 390)
  return config, model, state


# --------------------------------------------------------------------------
# Tightness


@functools.partial(jax.jit, static_argnames=('max_iterations',))
def _converged_norms(ops, product_states, layer_states, *,
                     max_iterations: int):
  """Converged product norms (plus a check block) and single-layer norms."""
  norms, product_states = liplt.converge_product_norms(
      ops, product_states, tol=1e-6, max_iterations=max_iterations)
  # converge_product_norms tests the change per step, which can stop early
  # when the top singular values are close; one more block shows the slack.
  checked, _ = liplt.product_norms(ops, product_states, CHECK_BLOCK)
  upper = jnp.triu(jnp.ones_like(norms, bool))
  residual = jnp.max(jnp.where(
      upper, jnp.abs(checked - norms) / jnp.maximum(checked, 1e-30), 0.0))
  layer_norms = jnp.stack([
      lipschitz.converge_power_iteration(
          op, u, tol=1e-6, max_iterations=max_iterations)[1]
      for op, u in zip(ops, layer_states)])
  return checked, layer_norms, residual


def bound_ratios(model: models.LipschitzNetwork, variables, input_shape,
                 max_iterations: int, seed: int = 0) -> dict:
  """LipLT / naive ratios from converged norms of `variables`' weights.

  Power iteration starts from the model's own iterates where it has them
  (a trained state: warm start) and from random unit vectors otherwise.
  """
  ops = models.network_operators(model, variables['params'], input_shape)
  state = variables.get('power_iteration', {})
  rng = jax.random.PRNGKey(seed)
  if 'liplt_products' in state:
    product_states = state['liplt_products']
  else:
    product_states = liplt.init_product_states(ops, rng)
  layer_states = []
  for i, (name, op) in enumerate(zip(models.layer_names(model), ops)):
    if name in state:
      layer_states.append(state[name]['u'])
    else:
      layer_states.append(lipschitz.random_unit_vector(
          jax.random.fold_in(rng, i + 1), op.input_shape))
  start = time.perf_counter()
  norms, layer_norms, residual = jax.block_until_ready(_converged_norms(
      ops, tuple(product_states), tuple(layer_states),
      max_iterations=max_iterations))
  converge_s = time.perf_counter() - start
  liplt_global = liplt.liplt_bound(norms, ALPHA, BETA)
  naive_global = liplt.naive_product_bound(layer_norms, BETA)
  pair_liplt = np.asarray(liplt.liplt_pairwise_bound(ops, norms, ALPHA, BETA))
  pair_naive = np.asarray(liplt.naive_pairwise_bound(ops[-1], layer_norms,
                                                     BETA))
  off = ~np.eye(pair_liplt.shape[0], dtype=bool)
  pair_ratio = pair_liplt[off] / pair_naive[off]
  diag = np.asarray(jnp.diag(norms))
  return {
      'liplt_global': float(liplt_global),
      'naive_global': float(naive_global),
      'global_ratio': float(liplt_global / naive_global),
      'pairwise_max_ratio': float(pair_ratio.max()),
      'pairwise_median_ratio': float(np.median(pair_ratio)),
      'pairwise_min_ratio': float(pair_ratio.min()),
      # max_ij L_ij: the bound a certificate of the worst pair uses.
      'max_pair_ratio': float(pair_liplt[off].max() / pair_naive[off].max()),
      'residual': float(residual),
      # Same single-layer norms from the two independent iterations?
      'diag_mismatch': float(np.max(np.abs(diag - np.asarray(layer_norms))
                                    / np.asarray(layer_norms))),
      'converge_s': converge_s,
  }


def _train_batches(case: Case, tiny: bool, seed: int):
  """Endless batches of CIFAR-10 (offline copy), or random ones."""
  rng = np.random.default_rng(seed)
  images = labels = None
  if not tiny:
    try:
      dataset = train.load_dataset(_config(case, 'liplt'))
      images, labels = dataset.train_images, dataset.train_labels
    except Exception as e:  # pylint: disable=broad-except
      print(f'offline CIFAR-10 unavailable ({e!r}); training on noise')
  key = jax.random.PRNGKey(seed)
  while True:
    if images is None:
      key, sub = jax.random.split(key)
      yield fake_batch(sub, case.batch, case.input_shape, case.num_classes)
    else:
      idx = rng.integers(0, len(images), case.batch)
      yield {'image': jnp.asarray(images[idx]),
             'label': jnp.asarray(labels[idx])}


def trained_variables(case: Case, steps: int, tiny: bool, seed: int = 0):
  """Variables after `steps` CRM steps with the LipLT bound; and the loss."""
  config, model, state = _new_state(case, 'liplt', seed)
  step = train_step_benchmark.train_step_fn(config)
  batches = _train_batches(case, tiny, seed)
  metrics = {}
  for _ in range(steps):
    state, metrics = step(state, next(batches))
  return model, state.variables, {k: float(v) for k, v in metrics.items()}


# --------------------------------------------------------------------------
# Cost


# The LipLT training steps timed beside the naive one: (name, bound,
# product-norm iterations per step; None = POWER_ITERATIONS).
TRAIN_STEP_VARIANTS = (('train_step_naive', 'naive', None),
                       ('train_step_liplt', 'liplt', None),
                       ('train_step_liplt_1it', 'liplt', 1))


def _step_call(case: Case, bound: str, liplt_iterations: int | None,
               seed: int):
  config = _config(case, bound)
  config.model.liplt_power_iterations = liplt_iterations
  model = train.create_model(config, case.num_classes)
  state = train.create_train_state(config, model, jax.random.PRNGKey(seed),
                                   case.input_shape, 390)
  step = train_step_benchmark.train_step_fn(config)
  batch = fake_batch(jax.random.PRNGKey(seed + 1), case.batch,
                     case.input_shape, case.num_classes)
  holder = {'state': state}

  def call():
    holder['state'], metrics = step(holder['state'], batch)
    return metrics

  return call


def time_train_steps(case: Case, repeats: int, seed: int = 0
                     ) -> dict[str, dict]:
  """`TRAIN_STEP_VARIANTS` timed alternately; LipLT rows get
  'ratio_to_naive' (min / median / max over the rounds)."""
  calls = [(name, _step_call(case, bound, iterations, seed))
           for name, bound, iterations in TRAIN_STEP_VARIANTS]
  timings = time_alternating(calls, repeats)
  naive = timings['train_step_naive']
  out = {}
  for name, _ in calls:
    out[name] = dict(timings[name])
    if name != 'train_step_naive':
      out[name]['ratio_to_naive'] = round_ratios(timings[name], naive)
  return out


def time_bound(case: Case, repeats: int, seed: int = 0,
               gradient: bool = True) -> dict[str, dict]:
  """The LipLT bound alone at Kaiming weights, in two parts and with grad.

  Returns timings (`benchmarks.time_calls`) of `product_norms` with
  `POWER_ITERATIONS` iterations, of `liplt_pairwise_bound` + `liplt_bound`
  from its norms, and (if `gradient`) of both together with the gradient
  with respect to every kernel, which a training step pays.
  """
  model = models.create_model(case.name, case.num_classes, activation='relu',
                              bound='naive')
  params = model.init(jax.random.PRNGKey(seed),
                      jnp.zeros((1, *case.input_shape)))['params']
  ops0 = models.network_operators(model, params, case.input_shape)
  states = liplt.init_product_states(ops0, jax.random.PRNGKey(seed + 1))

  def norms_of(p, st):
    ops = models.network_operators(model, p, case.input_shape)
    return liplt.product_norms(ops, st, POWER_ITERATIONS)[0]

  def bounds_of(p, norms):
    ops = models.network_operators(model, p, case.input_shape)
    pairwise = liplt.liplt_pairwise_bound(ops, norms, ALPHA, BETA)
    return pairwise, liplt.liplt_bound(norms, ALPHA, BETA)

  def scalar(p, st):
    pairwise, bound = bounds_of(p, norms_of(p, st))
    return jnp.sum(pairwise) + bound

  norms_fn = jax.jit(norms_of)
  bounds_fn = jax.jit(bounds_of)
  norms = norms_fn(params, states)
  out = {
      'product_norms': time_calls(lambda: norms_fn(params, states), repeats),
      'pairwise_bound': time_calls(lambda: bounds_fn(params, norms), repeats),
  }
  if gradient:
    grad_fn = jax.jit(jax.value_and_grad(scalar))
    out['bound_grad'] = time_calls(lambda: grad_fn(params, states), repeats)
  return out


# --------------------------------------------------------------------------
# Driver


def run(tiny: bool = False, train_steps: int | None = None,
        repeats: int | None = None, seed: int = 0, verbose: bool = True,
        timings: bool = True, models_to_run=None) -> list[dict]:
  """All measurements; one row per (model, weights) ratio and per timing.

  Args:
    tiny: tiny_cnn on 8x8x3 with few iterations (seconds), for smoke tests.
    train_steps: CRM steps before the trained ratios (0: Kaiming only);
      default 200 (3 when tiny).
    repeats: timed calls per timing (default 5, 2 when tiny; 8C2F's bound
      uses 1).
    seed: PRNG seed of the weights, iterates and batches.
    verbose: print each row as it is measured.
    timings: measure the costs (False: ratios only).
    models_to_run: names of the cases to run (default: all).
  """
  cases = TINY_CASES if tiny else FULL_CASES
  if models_to_run is not None:
    unknown = set(models_to_run) - {c.name for c in cases}
    if unknown:
      raise ValueError(f'unknown models {sorted(unknown)}; known: '
                       f'{[c.name for c in cases]}')
    cases = tuple(c for c in cases if c.name in models_to_run)
  if train_steps is None:
    train_steps = 3 if tiny else 200
  if repeats is None:
    repeats = 2 if tiny else 5
  rows = []

  def emit(row):
    row = {'benchmark': 'liplt', 'load_average': load_average(), **row}
    rows.append(row)
    if verbose:
      print(_short(row), flush=True)

  for case in cases:
    model = models.create_model(case.name, case.num_classes,
                                activation='relu', bound='liplt')
    # Params only: the products' and layers' iterates start from fresh,
    # independent random vectors in `bound_ratios`.
    variables = {'params': model.init(
        jax.random.PRNGKey(seed), jnp.zeros((1, *case.input_shape)))['params']}
    emit(dict(kind='ratio', model=case.name, weights='kaiming',
              num_classes=case.num_classes, input_shape=case.input_shape,
              max_iterations=case.max_iterations,
              **bound_ratios(model, variables, case.input_shape,
                             case.max_iterations, seed)))
    if timings:
      if case.time_train_step:
        for what, timing in time_train_steps(case, repeats, seed).items():
          emit(dict(kind='timing', model=case.name, what=what,
                    batch=case.batch, **timing))
      bound_timings = time_bound(case, repeats if case.time_train_step else 1,
                                 seed, gradient=case.time_train_step)
      for what, timing in bound_timings.items():
        emit(dict(kind='timing', model=case.name, what=what, batch=None,
                  **timing))
    if train_steps and case.trainable:
      start = time.perf_counter()
      model, variables, metrics = trained_variables(case, train_steps, tiny,
                                                    seed)
      train_s = time.perf_counter() - start
      emit(dict(kind='ratio', model=case.name,
                weights=f'crm_{train_steps}_steps',
                num_classes=case.num_classes, input_shape=case.input_shape,
                max_iterations=case.max_iterations, train_s=train_s,
                train_loss=metrics.get('loss'),
                train_accuracy=metrics.get('accuracy'),
                **bound_ratios(model, variables, case.input_shape,
                               case.max_iterations, seed)))
  return rows


def _short(row: dict) -> str:
  if row['kind'] == 'ratio':
    return (f"{row['model']:8s} {row['weights']:16s} global "
            f"{row['global_ratio']:.4f}  pairwise max "
            f"{row['pairwise_max_ratio']:.4f} median "
            f"{row['pairwise_median_ratio']:.4f}  residual "
            f"{row['residual']:.1e}  ({row['converge_s']:.0f} s)")
  return (f"{row['model']:8s} {row['what']:18s} median "
          f"{row['median_ms']:9.1f} ms (min {row['min_ms']:.1f}, compile "
          f"{row['compile_s']:.1f} s, load {row['load_average']})")


def format_markdown(rows: list[dict]) -> str:
  """The markdown section (heading, explanation, two tables)."""
  ratios = [r for r in rows if r['kind'] == 'ratio']
  timings = [r for r in rows if r['kind'] == 'timing']
  out = [
      '## LipLT vs the naive product bound (ReLU, arXiv 2310.00116)', '',
      'Ratio LipLT / naive of the global bound (m_K vs prod ||W_l||) and of '
      'the pairwise bounds L_ij of z_i - z_j (LipLT vs '
      '||W_K^T (e_i - e_j)|| prod_{l<K} ||W_l||), max and median over the '
      'pairs i != j; `max-pair` compares max_ij L_ij. All from converged '
      'norms: product norms by `liplt.converge_product_norms` (tol 1e-6, at '
      'most `max it.` iterations) plus a block of '
      f'{CHECK_BLOCK} more iterations whose largest relative change is '
      '`residual`; single-layer norms by '
      '`lipschitz.converge_power_iteration`; `layer mismatch` is their largest '
      'relative difference from the diagonal of the product norms (the same '
      'single-layer norms, iterated separately): it bounds how far the '
      'ratios are from converged. LipLT is never looser with exact '
      'norms (ratio <= 1); a smaller ratio is a proportionally larger '
      'certified radius. `kaiming`: initial weights; `crm_N_steps`: after N '
      'CRM training steps with the LipLT bound (Adam 1e-3, batch 128, '
      'offline CIFAR-10, no augmentation, no cross-entropy warm-up).', '',
      '| model | classes | weights | global | pairwise max | pairwise '
      'median | max-pair | residual | layer mismatch | max it. |',
      '|---|---|---|---|---|---|---|---|---|---|']
  for r in ratios:
    out.append(
        f"| {r['model']} | {r['num_classes']} | {r['weights']} | "
        f"{r['global_ratio']:.4f} | {r['pairwise_max_ratio']:.4f} | "
        f"{r['pairwise_median_ratio']:.4f} | {r['max_pair_ratio']:.4f} | "
        f"{r['residual']:.1e} | {r['diag_mismatch']:.1e} | "
        f"{r['max_iterations']} |")
  out += [
      '', 'Cost (median of the timed calls after compilation; CPU, '
      'load average at the time in the last column). `train_step_*`: the '
      'jitted `train.train_step` with the CRM loss, no augmentation, '
      f'{POWER_ITERATIONS} power iterations, state donated, with '
      "`bound='naive'` or `'liplt'` (`_1it`: one product-norm iteration per "
      'step), the three timed alternately. The LipLT bound alone at Kaiming '
      f"weights: `product_norms` ({POWER_ITERATIONS} iterations) and "
      '`pairwise_bound` (`liplt_pairwise_bound` + `liplt_bound` from those '
      'norms); their sum is one bound evaluation. `bound_grad`: both with '
      'the gradient with respect to every kernel. 8C2F: the forward parts '
      'only, one timed call (a training step of the 200-class network is '
      'too slow on this machine).', '',
      '| model | what | batch | median ms | min ms | compile s | load |',
      '|---|---|---|---|---|---|---|']
  for r in timings:
    out.append(
        f"| {r['model']} | {r['what']} | {r['batch'] or '-'} | "
        f"{r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['compile_s']:.1f} | "
        f"{r['load_average']} |")
  by = {(r['model'], r['what']): r['median_ms'] for r in timings}
  rows_by = {(r['model'], r['what']): r for r in timings}
  notes = []
  for model in dict.fromkeys(r['model'] for r in timings):
    naive = by.get((model, 'train_step_naive'))
    for what, label in (('train_step_liplt', f'{POWER_ITERATIONS} product '
                         'iterations per step'),
                        ('train_step_liplt_1it', '1 product iteration per '
                         'step (`model.liplt_power_iterations = 1`)')):
      row = rows_by.get((model, what))
      if naive and row:
        # Rows measured apart (older caches) have no per-round ratios.
        single = row['median_ms'] / naive
        ratio = row.get('ratio_to_naive', {'median': single, 'min': single,
                                           'max': single})
        notes.append(
            f"* {model}, {label}: the LipLT step takes "
            f"{ratio['median']:.2f}x the naive one (alternating rounds: min "
            f"{ratio['min']:.2f}, max {ratio['max']:.2f}; "
            f"{row['median_ms'] - naive:+.0f} ms per step); target <= "
            f"{TARGET_RATIO}: "
            + ('**met**' if ratio['median'] <= TARGET_RATIO else '**missed**')
            + '.')
        products = by.get((model, 'product_norms'))
        if ratio['median'] > TARGET_RATIO and products:
          notes.append(
              f"  What is left: the {POWER_ITERATIONS} warm-started "
              f"product-norm iterations, {products:.0f} ms at Kaiming "
              f"weights (`product_norms`, forward only) beside the naive "
              f"step's {naive:.0f} ms; the pairwise chain is "
              f"{by.get((model, 'pairwise_bound'), float('nan')):.0f} ms. "
              'Fewer iterations per step (the vectors carry over between '
              'steps) is the measured remedy, in the next line.')
  if notes:
    out += [''] + notes + [
        '* What moved the 4C3F LipLT step (measured 2026-12-02, load 2-5, '
        'the LipLT bound with its gradient at 5 iterations, jitted alone): '
        'adjoints of the whole batch of iterates / class vectors in the CPU '
        'forms (`LinearOperator.transpose_batch`: im2col transpose, '
        'space-to-depth with matmuls for strided convs; XLA\'s kernel '
        'gradient of its own transposed strided conv took ~100 ms for 10 '
        'vectors) 1032 -> 381 ms; the 45 class pairs i < j in one pass '
        'instead of chunk blocks under `lax.map` + remat -> 136 ms. Whole '
        'step, LipLT / naive, alternating: 4.36x before, 1.70x after; with '
        '2 product iterations per step 1.41x, with 1 1.34x. The default '
        'stays at `num_power_iterations` (training unchanged); evaluation '
        'converges the products and certification uses sound bounds either '
        'way (`tests/test_liplt.py::'
        'test_trained_network_liplt_bound_holds_at_gradient_witness`).']
  busy = [r for r in timings if _busy(r['load_average'])]
  if busy:
    out += ['', '* The machine was shared (1-minute load average above 2.5 '
            'on 2 cores during some timings): the times are provisional.']
  return '\n'.join(out)


def _busy(load: str) -> bool:
  """1-minute load average above 1.25 per core (or unknown)."""
  try:
    return float(load.split(',')[0]) > 1.25 * (os.cpu_count() or 1)
  except ValueError:
    return True


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tiny', action='store_true')
  parser.add_argument('--train-steps', type=int, default=None)
  parser.add_argument('--repeats', type=int, default=None)
  parser.add_argument('--models', default=None,
                      help='comma-separated subset, e.g. 4c3f,6c2f')
  parser.add_argument('--no-timings', action='store_true')
  parser.add_argument('--json', default=None, help='also write rows here')
  args = parser.parse_args()
  rows = run(tiny=args.tiny, train_steps=args.train_steps,
             repeats=args.repeats, timings=not args.no_timings,
             models_to_run=None if args.models is None
             else args.models.split(','))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)
  print()
  print(format_markdown(rows))


if __name__ == '__main__':
  main()
