r"""The two-moons study of the CLL paper: fig. 4 (CLL vs GloRo) and fig. D2.

  python -m experiments.moons_study [--output_dir=results/moons] \
      [--epochs=1000] [--seed=0] [--comparison_seeds=1,2,3,4]

Trains, with the table B1 set-up (`experiments/moons_cll.py`,
`experiments/moons_gloro.py`: MLP 2-10-20-40-40-20-10-2 with MinMax, 2,000
training points with uniform disc noise of radius 0.1, 1000 epochs, batch
100, Adam 1e-3 -> 1e-4 at epoch 400):

* fig. 4: CLL (p annealed 1e-3 -> 1e-12, gamma 50, lambda 1e-6) and GloRo
  (constant eps) for eps in {0.10, 0.15, 0.20, 0.25} (2 eps = 0.2 ... 0.5);
* fig. D2 (slack control): CLL at eps = 0.15 (2 eps = 0.3, the true margin)
  with a constant p. The figure quotes p_code in {0.75, 0.25, 0.01, 1e-4} in
  the official code's convention (margin width logit(1 - p/2) - logit(p/2));
  this library's p is that of CLL eq. 5 and lies in (0, 0.5), so
  p = p_code / 2 is used (see `losses.calibrated_scale`);
* seed comparison: CLL vs GloRo at eps = 0.15 (the true margin) repeated on
  `--comparison_seeds` (each seed draws its own data noise, init and batch
  order), because on one seed the two differ by a point of 2,000 at most.

The runs of each loss train together in one jitted, vmapped sweep
(`cll_jax.sweep`): the CLL sweep holds the fig. 4 and fig. D2 runs (8), the
GloRo sweep 4. All runs start from the same initial parameters and see the
same batch order; the power iteration is converged after every epoch.

Evaluation of every run uses the sound path: guaranteed layer bounds
(`train.certification_bounds(..., method='sound')`) and the strict margin rule
of `certify`. Reported: clean accuracy, training-set CRA at radius eps (the
red points of the figures are the training points misclassified or not
certified at eps), validation CRA (20,000 points), K^(f) = max_ij K_ij and
K^(h o f) (CLL: 1 / sigma_eps(p_final), CLL sec. 3.3; GloRo: K^(f), its
softmax has unit scale).

Outputs in `--output_dir`: moons_fig4.png, moons_slack_d2.png,
moons_results.json, moons_results.md (both with the seed comparison) and
moons_params.npz (the figure runs' final parameters and power-iteration
vectors, keys '<run>/<collection>/<layer>/<name>').
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cll_jax import certify
from cll_jax import losses
from cll_jax import sweep
from cll_jax import train
from experiments import moons_cll
from experiments import moons_gloro

FIG4_EPS = (0.10, 0.15, 0.20, 0.25)
SLACK_EPS = 0.15
# Fig. D2's p in the official code's convention; this library uses p / 2.
SLACK_P_CODE = (0.75, 0.25, 0.01, 1e-4)
# Table B1: the learning rate drops at epoch 400 of 1000.
DECAY_FRACTION = 0.4
# Plot window (the noisy moons lie in [-1.1, 2.1] x [-0.6, 1.1]).
XLIM = (-1.5, 2.5)
YLIM = (-1.0, 1.5)


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run of the study."""
  name: str  # unique, e.g. 'cll_eps0.15'
  group: str  # 'fig4' or 'slack_d2'
  loss: str  # 'cll' or 'gloro'
  epsilon: float
  p_code: float | None  # fig. D2 slack in the official code's convention
  config: ml_collections.ConfigDict

  @property
  def p(self) -> float | None:
    """Constant slack of CLL eq. 5 (p_code / 2), None when annealed."""
    return None if self.p_code is None else self.p_code / 2


def make_config(loss: str, epsilon: float, p: float | None, *, epochs: int,
                num_train: int, num_val: int, batch_size: int,
                seed: int) -> ml_collections.ConfigDict:
  """The table B1 config of `experiments/moons_{cll,gloro}.py`, resized."""
  arg = f'eps={epsilon}' + (f',p={p}' if p is not None else '')
  module = {'cll': moons_cll, 'gloro': moons_gloro}[loss]
  c = module.get_config(arg)
  c.seed = seed
  c.data.kwargs.seed = seed
  c.train.num_epochs = epochs
  # 400 of 1000 epochs in B1; the same fraction for shortened runs.
  c.optimizer.decay_epochs = (max(1, round(DECAY_FRACTION * epochs)),)
  c.data.kwargs.num_train = num_train
  c.data.kwargs.num_test = num_val
  c.train.batch_size = batch_size
  c.train.progress_bar = False
  return c


def study_runs(*, eps_values: Sequence[float], slack_eps: float,
               slack_p_code: Sequence[float], **kwargs) -> list[RunSpec]:
  """The fig. 4 runs (CLL and GloRo per eps) and the fig. D2 slack runs."""
  for p_code in slack_p_code:
    if not 0 < p_code < 1:
      raise ValueError(f'slack p_code must be in (0, 1), got {p_code}')
  runs = []
  for loss in ('cll', 'gloro'):
    for eps in eps_values:
      runs.append(RunSpec(f'{loss}_eps{eps:g}', 'fig4', loss, eps, None,
                          make_config(loss, eps, None, **kwargs)))
  for p_code in slack_p_code:
    runs.append(RunSpec(
        f'cll_eps{slack_eps:g}_pcode{p_code:g}', 'slack_d2', 'cll', slack_eps,
        p_code, make_config('cll', slack_eps, p_code / 2, **kwargs)))
  return runs


# --------------------------------------------------------------------------
# Evaluation


def _logits(model, variables, x):
  return model.apply(variables, x).logits


def evaluate_run(spec: RunSpec, state: train.TrainState, model, dataset,
                 steps_per_epoch: int, bounds_fn, logits_fn
                 ) -> tuple[dict[str, Any], np.ndarray]:
  """Sound-bound evaluation of one trained run.

  Returns:
    The record for the results table and the `(num_train,)` boolean mask of
    training points that are correct and certified at radius eps.
  """
  c = spec.config
  eps = spec.epsilon
  bounds = bounds_fn(state)
  pairwise = bounds['pairwise']
  train_logits = logits_fn(state.variables, jnp.asarray(dataset.train_images))
  val_logits = logits_fn(state.variables, jnp.asarray(dataset.test_images))
  train_labels = jnp.asarray(dataset.train_labels)
  val_labels = jnp.asarray(dataset.test_labels)
  train_ok = np.asarray(certify.certified_correct(
      train_logits, train_labels, pairwise, eps))
  val_counts = certify.certified_counts(val_logits, val_labels, pairwise,
                                        (eps,))
  k_f = float(np.max(np.asarray(pairwise)))
  if spec.loss == 'cll':
    sched = train.loss_schedules(c, steps_per_epoch)
    p_final = float(sched.slack(c.train.num_epochs * steps_per_epoch))
    # K^(h o f) = 1 / sigma_eps(p) (CLL sec. 3.3).
    k_hf = float(1.0 / losses.calibrated_scale(eps, p_final))
  else:
    p_final = None
    k_hf = k_f  # GloRo's softmax has unit scale: K^(h o f) = K^(f).
  record = {
      'name': spec.name,
      'group': spec.group,
      'loss': spec.loss,
      'epsilon': eps,
      'two_epsilon': 2 * eps,
      'p_code': spec.p_code,
      'p': spec.p,
      'p_start': c.loss.p_start if spec.loss == 'cll' else None,
      'p_final': p_final,
      'train_clean_accuracy': float(np.mean(
          np.argmax(np.asarray(train_logits), -1) == dataset.train_labels)),
      'val_clean_accuracy': float(val_counts.clean_accuracy()),
      'train_cra': float(np.mean(train_ok)),
      'val_cra': float(val_counts.certified_accuracy()[0]),
      'num_train': int(len(dataset.train_labels)),
      'num_val': int(val_counts.total),
      'train_certified_count': int(np.sum(train_ok)),
      'val_certified_count': int(val_counts.certified[0]),
      'K_f': k_f,
      'K_01': float(np.asarray(pairwise)[0, 1]),
      'K_hf': k_hf,
      'layer_norms_sound': [float(x) for x in bounds['layer_norms']],
  }
  return record, train_ok


def decision_grid(model, variables, logits_fn, resolution: int):
  """`(xx, yy, f_1 - f_0)` on a `resolution`^2 grid over the plot window."""
  xs = np.linspace(*XLIM, resolution)
  ys = np.linspace(*YLIM, resolution)
  xx, yy = np.meshgrid(xs, ys)
  points = np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float32)
  logits = np.asarray(logits_fn(variables, jnp.asarray(points)))
  return xx, yy, (logits[:, 1] - logits[:, 0]).reshape(xx.shape)


# --------------------------------------------------------------------------
# Figures and tables


def _fmt_p(r: dict) -> str:
  if r['loss'] != 'cll':
    return 'N/A'
  if r['p_code'] is None:
    return f'{r["p_start"]:g} -> {r["p_final"]:g}'
  return f'{r["p"]:g} (code {r["p_code"]:g})'


def _panel(ax, r: dict, grid, dataset, train_ok, title: str) -> None:
  xx, yy, diff = grid
  # Light class shading, decision boundary f_1 = f_0 (black) and the
  # certified margin |f_1 - f_0| / K_01 = eps (grey).
  ax.contourf(xx, yy, diff, levels=[-np.inf, 0, np.inf],
              colors=['#dbe8f6', '#fbe3cf'])
  level = r['epsilon'] * r['K_01']
  ax.contour(xx, yy, diff, levels=[-level, level], colors='0.45',
             linewidths=1.0, linestyles='-')
  ax.contour(xx, yy, diff, levels=[0.0], colors='k', linewidths=1.6)
  x, y = dataset.train_images, dataset.train_labels
  for cls, colour in ((0, '#1f5fae'), (1, '#d9730d')):
    keep = (y == cls) & train_ok
    ax.scatter(x[keep, 0], x[keep, 1], s=3, c=colour, linewidths=0)
  bad = ~train_ok
  ax.scatter(x[bad, 0], x[bad, 1], s=7, c='red', linewidths=0)
  ax.set_xlim(*XLIM)
  ax.set_ylim(*YLIM)
  ax.set_aspect('equal')
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_title(title, fontsize=10)
  ax.text(0.02, 0.02,
          f'CRA {100 * r["train_cra"]:.1f}%\n'
          f'$K^{{(h\\circ f)}}$ = {r["K_hf"]:.3g}',
          transform=ax.transAxes, fontsize=9, va='bottom', ha='left',
          bbox=dict(facecolor='white', alpha=0.8, edgecolor='none', pad=2))


def plot_fig4(path: str, records, grids, dataset, masks) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  eps_values = sorted({r['epsilon'] for r in records if r['group'] == 'fig4'})
  fig, axes = plt.subplots(2, len(eps_values),
                           figsize=(3.3 * len(eps_values), 5.0),
                           squeeze=False)
  for row, loss in enumerate(('cll', 'gloro')):
    for col, eps in enumerate(eps_values):
      r = next(r for r in records if r['group'] == 'fig4'
               and r['loss'] == loss and r['epsilon'] == eps)
      _panel(axes[row, col], r, grids[r['name']], dataset, masks[r['name']],
             f'{"CLL" if loss == "cll" else "GloRo"}: 2ε = {2 * eps:.2g}')
  fig.suptitle('Two-moons, CLL (top, p 1e-3 → 1e-12) vs GloRo (bottom); '
               'training CRA at radius ε, sound bounds; red: misclassified '
               'or not certified', fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_slack(path: str, records, grids, dataset, masks) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  runs = sorted((r for r in records if r['group'] == 'slack_d2'),
                key=lambda r: -r['p'])
  fig, axes = plt.subplots(1, len(runs), figsize=(3.3 * len(runs), 3.0),
                           squeeze=False)
  for col, r in enumerate(runs):
    _panel(axes[0, col], r, grids[r['name']], dataset, masks[r['name']],
           f'p_code = {r["p_code"]:g}  (p = {r["p"]:g})')
  eps = runs[0]['epsilon'] if runs else SLACK_EPS
  fig.suptitle(f'Slack control (CLL fig. D2), CLL at 2ε = {2 * eps:.2g}, '
               'constant p; p_code in the official code\'s convention, '
               'p = p_code / 2 of CLL eq. 5', fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def markdown_table(records, setup: dict) -> str:
  lines = [
      '# Two-moons study (CLL fig. 4 and fig. D2)',
      '',
      f'Generated by `python -m experiments.moons_study` '
      f'({setup["epochs"]} epochs, {setup["num_train"]} training and '
      f'{setup["num_val"]} validation points, batch {setup["batch_size"]}, '
      f'seed {setup["seed"]}). Certification: sound layer bounds '
      f'(`train.certification_bounds(method="sound")`), strict margin rule. '
      f'Train CRA at radius eps on the training set; val CRA on the '
      f'validation set. p is CLL eq. 5\'s slack; fig. D2 quotes '
      f'p_code = 2 p (official code convention). K^(h o f): CLL '
      f'1/sigma_eps(p_final), GloRo K^(f). Wall time: the sweep that trained '
      f'the run (its runs train together, vmapped), compile included.',
      '',
      '| group | loss | 2 eps | eps | p | clean acc (val) | train CRA '
      '| val CRA | K^(f) | K^(h o f) | sweep wall time [s] |',
      '|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in records:
    lines.append(
        f'| {r["group"]} | {r["loss"]} | {r["two_epsilon"]:.2f} | '
        f'{r["epsilon"]:.2f} | {_fmt_p(r)} | '
        f'{100 * r["val_clean_accuracy"]:.2f}% | '
        f'{100 * r["train_cra"]:.2f}% | {100 * r["val_cra"]:.2f}% | '
        f'{r["K_f"]:.4g} | {r["K_hf"]:.4g} | {r["sweep_wall_time_s"]:.1f} |')
  lines.append('')
  return '\n'.join(lines)


def _flat_variables(prefix: str, variables) -> dict[str, np.ndarray]:
  flat = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
    keys = '/'.join(str(getattr(k, 'key', k)) for k in path)
    flat[f'{prefix}/{keys}'] = np.asarray(leaf)
  return flat


# --------------------------------------------------------------------------
# The study


def train_and_evaluate_runs(specs: Sequence[RunSpec], model, dataset, *,
                            epochs: int, converge_every: int,
                            epochs_per_call: int, bounds_fn, logits_fn,
                            grid_resolution: int | None = None):
  """Trains `specs` (one vmapped sweep per loss) and evaluates every run.

  Returns:
    (records, masks, grids, params, sweep_times): the table records in the
    order of `specs`; per run name the training-point mask of
    `evaluate_run`, the decision grid (only if `grid_resolution`) and the
    flat final variables; per loss the sweep's wall time in seconds.
  """
  records, masks, grids, params, sweep_times = [], {}, {}, {}, {}
  for loss in dict.fromkeys(s.loss for s in specs):
    group = [s for s in specs if s.loss == loss]
    start = time.time()
    sw = sweep.Sweep([s.config for s in group], model, dataset.train_images,
                     dataset.train_labels, converge_every=converge_every,
                     epochs_per_call=epochs_per_call)
    states, _ = sw.train(epochs, log=lambda m, l=loss: logging.info(
        '%s sweep: %s', l, m))
    jax.block_until_ready(states)
    sweep_times[loss] = time.time() - start
    logging.info('%s sweep (%d runs): %.1f s', loss, len(group),
                 sweep_times[loss])
    for i, spec in enumerate(group):
      state = sweep.unstack(states, i)
      record, ok = evaluate_run(spec, state, model, dataset,
                                sw.steps_per_epoch, bounds_fn, logits_fn)
      record['sweep_wall_time_s'] = sweep_times[loss]
      record['sweep_runs'] = len(group)
      records.append(record)
      masks[spec.name] = ok
      if grid_resolution:
        grids[spec.name] = decision_grid(model, state.variables, logits_fn,
                                         grid_resolution)
      params.update(_flat_variables(spec.name, state.variables))
      logging.info('%s: %s', spec.name, {k: v for k, v in record.items()
                                          if not isinstance(v, list)})
  order = {s.name: i for i, s in enumerate(specs)}
  records.sort(key=lambda r: order[r['name']])
  return records, masks, grids, params, sweep_times


def seed_comparison(seeds: Sequence[int], epsilon: float, model, *,
                    epochs: int, converge_every: int, epochs_per_call: int,
                    bounds_fn, logits_fn, known_records: Sequence[dict] = (),
                    **config_kwargs) -> dict[str, Any]:
  """CLL vs GloRo at one eps over several seeds (data, init, batch order).

  One seed decides the fig. 4 comparison at the true margin by a point or
  two of 2,000, so the study repeats that pair over `seeds` and counts.
  `known_records`: records of already trained pairs (with their 'seed'),
  e.g. the main study's, counted without retraining.

  Returns:
    {'epsilon', 'seeds', 'runs': records (with 'seed'), 'summary'}.
  """
  records = [dict(r) for r in known_records]
  known_seeds = list(dict.fromkeys(r['seed'] for r in records))
  new_seeds = [s for s in seeds if s not in known_seeds]
  seeds = known_seeds + new_seeds
  for seed in new_seeds:
    specs = [RunSpec(f'{loss}_eps{epsilon:g}_seed{seed}', 'seeds', loss,
                     epsilon, None, make_config(loss, epsilon, None,
                                                epochs=epochs, seed=seed,
                                                **config_kwargs))
             for loss in ('cll', 'gloro')]
    dataset = train.load_dataset(specs[0].config)
    recs, *_ = train_and_evaluate_runs(
        specs, model, dataset, epochs=epochs, converge_every=converge_every,
        epochs_per_call=epochs_per_call, bounds_fn=bounds_fn,
        logits_fn=logits_fn)
    for r in recs:
      r['seed'] = seed
    records.extend(recs)
  by = {(r['seed'], r['loss']): r for r in records}
  pairs = [(by[(s, 'cll')], by[(s, 'gloro')]) for s in seeds]
  summary = {
      'num_seeds': len(seeds),
      'gloro_train_cra_below_cll': sum(
          g['train_cra'] < c['train_cra'] for c, g in pairs),
      'gloro_train_cra_equal_cll': sum(
          g['train_cra'] == c['train_cra'] for c, g in pairs),
      'cll_K_hf_above_gloro': sum(c['K_hf'] > g['K_hf'] for c, g in pairs),
      **{f'{loss}_mean_train_cra': float(np.mean(
          [by[(s, loss)]['train_cra'] for s in seeds]))
         for loss in ('cll', 'gloro')},
      **{f'{loss}_mean_val_cra': float(np.mean(
          [by[(s, loss)]['val_cra'] for s in seeds]))
         for loss in ('cll', 'gloro')},
  }
  return {'epsilon': epsilon, 'seeds': list(seeds), 'runs': records,
          'summary': summary}


def seed_table(comparison: dict[str, Any]) -> str:
  """Markdown section of `seed_comparison`'s result."""
  s = comparison['summary']
  eps = comparison['epsilon']
  lines = [
      f'## CLL vs GloRo at 2 eps = {2 * eps:.2g} over seeds',
      '',
      f'Seeds {comparison["seeds"]} (data noise, init and batch order). '
      f'GloRo\'s train CRA is below CLL\'s in '
      f'{s["gloro_train_cra_below_cll"]} of {s["num_seeds"]} seeds (equal in '
      f'{s["gloro_train_cra_equal_cll"]}); K^(h o f) of CLL is above '
      f'GloRo\'s in {s["cll_K_hf_above_gloro"]} of {s["num_seeds"]}. Mean '
      f'train CRA: CLL {100 * s["cll_mean_train_cra"]:.3f}%, GloRo '
      f'{100 * s["gloro_mean_train_cra"]:.3f}%; mean val CRA: CLL '
      f'{100 * s["cll_mean_val_cra"]:.3f}%, GloRo '
      f'{100 * s["gloro_mean_val_cra"]:.3f}%.',
      '',
      '| seed | loss | train CRA | not certified (of train) | val CRA '
      '| K^(f) | K^(h o f) |',
      '|---|---|---|---|---|---|---|',
  ]
  for r in comparison['runs']:
    lines.append(
        f'| {r["seed"]} | {r["loss"]} | {100 * r["train_cra"]:.2f}% | '
        f'{r["num_train"] - r["train_certified_count"]} | '
        f'{100 * r["val_cra"]:.2f}% | {r["K_f"]:.4g} | {r["K_hf"]:.4g} |')
  lines.append('')
  return '\n'.join(lines)


def run_study(output_dir: str, *, epochs: int = 1000,
              eps_values: Sequence[float] = FIG4_EPS,
              slack_eps: float = SLACK_EPS,
              slack_p_code: Sequence[float] = SLACK_P_CODE,
              num_train: int = 2000, num_val: int = 20000,
              batch_size: int = 100, seed: int = 0, converge_every: int = 1,
              epochs_per_call: int = 50, grid_resolution: int = 300,
              comparison_seeds: Sequence[int] = (),
              comparison_eps: float = SLACK_EPS) -> dict[str, Any]:
  """Trains and evaluates every run, writes figures and tables.

  With `comparison_seeds`, also repeats CLL vs GloRo at `comparison_eps`
  for each of those seeds (`seed_comparison`); the result goes into the
  JSON ('seed_comparison') and a section of the markdown table.

  Returns:
    The content of moons_results.json.
  """
  study_start = time.time()
  os.makedirs(output_dir, exist_ok=True)
  kwargs = dict(epochs=epochs, num_train=num_train, num_val=num_val,
                batch_size=batch_size, seed=seed)
  runs = study_runs(eps_values=eps_values, slack_eps=slack_eps,
                    slack_p_code=slack_p_code, **kwargs)
  base = runs[0].config
  dataset = train.load_dataset(base)
  model = train.create_model(base, dataset.num_classes)
  input_shape = tuple(dataset.train_images.shape[1:])
  bounds_fn = jax.jit(lambda st: train.certification_bounds(
      st, model, input_shape, method='sound'))
  logits_fn = jax.jit(functools.partial(_logits, model))
  train_kwargs = dict(epochs=epochs, converge_every=converge_every,
                      epochs_per_call=epochs_per_call, bounds_fn=bounds_fn,
                      logits_fn=logits_fn)

  records, masks, grids, params, sweep_times = train_and_evaluate_runs(
      runs, model, dataset, grid_resolution=grid_resolution, **train_kwargs)

  setup = dict(kwargs, eps_values=list(eps_values), slack_eps=slack_eps,
               slack_p_code=list(slack_p_code), converge_every=converge_every,
               certification='sound', devices=str(jax.devices()),
               arc_positions=base.data.kwargs.arc_positions)
  plot_fig4(os.path.join(output_dir, 'moons_fig4.png'), records, grids,
            dataset, masks)
  plot_slack(os.path.join(output_dir, 'moons_slack_d2.png'), records, grids,
             dataset, masks)
  np.savez_compressed(os.path.join(output_dir, 'moons_params.npz'), **params)
  comparison = None
  if comparison_seeds:
    start = time.time()
    known = [dict(r, seed=seed) for r in records if r['group'] == 'fig4'
             and r['epsilon'] == comparison_eps]
    comparison = seed_comparison(
        comparison_seeds, comparison_eps, model, num_train=num_train,
        num_val=num_val, batch_size=batch_size, known_records=known,
        **train_kwargs)
    sweep_times['seed_comparison'] = time.time() - start
  total = time.time() - study_start
  result = {
      'setup': setup,
      'wall_time_s': {'total': total,
                      **{f'{k}_sweep' if k in ('cll', 'gloro') else k: v
                         for k, v in sweep_times.items()}},
      'runs': records,
  }
  if comparison is not None:
    result['seed_comparison'] = comparison
  with open(os.path.join(output_dir, 'moons_results.json'), 'w') as f:
    json.dump(result, f, indent=1)
  md = markdown_table(records, setup)
  if comparison is not None:
    md += '\n' + seed_table(comparison)
  md += (f'\nTotal wall time {total:.1f} s (CLL sweep '
         f'{sweep_times["cll"]:.1f} s, GloRo sweep '
         f'{sweep_times["gloro"]:.1f} s' + (
             f', seed comparison {sweep_times["seed_comparison"]:.1f} s'
             if comparison is not None else '') + ').\n')
  with open(os.path.join(output_dir, 'moons_results.md'), 'w') as f:
    f.write(md)
  return result


_OUTPUT_DIR = flags.DEFINE_string('output_dir', 'results/moons',
                                  'Directory for figures and tables.')
_EPOCHS = flags.DEFINE_integer('epochs', 1000, 'Training epochs (B1: 1000).')
_EPS = flags.DEFINE_list('eps', [str(e) for e in FIG4_EPS],
                         'Fig. 4 training radii eps (2 eps is the margin).')
_SLACK_P_CODE = flags.DEFINE_list(
    'slack_p_code', [str(p) for p in SLACK_P_CODE],
    'Fig. D2 slack values in the official code convention (p = p_code / 2).')
_SLACK_EPS = flags.DEFINE_float('slack_eps', SLACK_EPS, 'Fig. D2 eps.')
_NUM_TRAIN = flags.DEFINE_integer('num_train', 2000, 'Training points.')
_NUM_VAL = flags.DEFINE_integer('num_val', 20000, 'Validation points.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 100, 'Batch size.')
_SEED = flags.DEFINE_integer(
    'seed', 0, 'Seed of the data (noise), init and batch order.')
_COMPARISON_SEEDS = flags.DEFINE_list(
    'comparison_seeds', ['1', '2', '3', '4'],
    'Extra seeds for CLL vs GloRo at --comparison_eps (empty: skip).')
_COMPARISON_EPS = flags.DEFINE_float(
    'comparison_eps', SLACK_EPS, 'eps of the seed comparison (true margin).')
_CONVERGE_EVERY = flags.DEFINE_integer(
    'converge_every', 1, 'Converge the power iteration every k epochs.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  result = run_study(
      _OUTPUT_DIR.value, epochs=_EPOCHS.value,
      eps_values=[float(e) for e in _EPS.value], slack_eps=_SLACK_EPS.value,
      slack_p_code=[float(p) for p in _SLACK_P_CODE.value],
      num_train=_NUM_TRAIN.value, num_val=_NUM_VAL.value,
      batch_size=_BATCH_SIZE.value, seed=_SEED.value,
      converge_every=_CONVERGE_EVERY.value,
      comparison_seeds=[int(x) for x in _COMPARISON_SEEDS.value],
      comparison_eps=_COMPARISON_EPS.value)
  print(open(os.path.join(_OUTPUT_DIR.value, 'moons_results.md')).read())
  print(result['wall_time_s'])


if __name__ == '__main__':
  app.run(main)
