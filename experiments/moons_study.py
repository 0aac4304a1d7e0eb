r"""The two-moons study of the CLL paper: fig. 4 (CLL vs GloRo), D2 and D3.

  python -m experiments.moons_study [--output_dir=workdir/moons_study] \
      [--epochs=1000] [--seed=0] [--comparison_seeds=1,2,3,4]
  python -m experiments.moons_study --output_dir=results/moons \
      --soc_depths=3,7,25  # the committed copy, fig. D3 included

Trains, with the table B1 set-up (`experiments/moons_cll.py`,
`experiments/moons_gloro.py`: MLP 2-10-20-40-40-20-10-2 with MinMax, 2,000
training points with uniform disc noise of radius 0.1, 1000 epochs, batch
100, Adam 1e-3 -> 1e-4 at epoch 400):

* fig. 4: CLL (p annealed 1e-3 -> 1e-12, gamma 50, lambda 1e-6) and GloRo
  (constant eps) for eps in {0.10, 0.15, 0.20, 0.25} (2 eps = 0.2 ... 0.5),
  GloRo twice: 'gloro', the loss as its paper defines it, and
  'gloro_official', the gradient of the official CLL code's GloroLoss, whose
  body factor also carries the head's gradient (`losses.gloro_loss`,
  `config.loss.gloro_variant='official'`);
* fig. D2 (slack control): CLL at eps = 0.15 (2 eps = 0.3, the true margin)
  with a constant p. The figure quotes p_code in {0.75, 0.25, 0.01, 1e-4} in
  the official code's convention (margin width logit(1 - p/2) - logit(p/2));
  this library's p is that of CLL eq. 5 and lies in (0, 0.5), so
  p = p_code / 2 is used (see `losses.calibrated_scale`);
* seed comparison: CLL vs both GloRo variants at eps = 0.15 (the true
  margin) repeated on `--comparison_seeds` (each seed draws its own data
  noise, init and batch order);
* fig. D3: 1-Lipschitz SOC MLPs (`experiments/moons_soc.py`, dense SOC
  layers, LLN head) of depth 3, 7 and 25 (`--soc_depths=3,7,25`; off by
  default) trained with
  SOC's loss, certificate regulariser gamma in {0, 0.3, 1.0};
* head/body trajectories of the GloRo runs: per epoch the distance
  ||w_0 - w_1|| of the head's class vectors, their norms, the body's product
  of power-iteration norms and K_01.

The runs of each method train together in one jitted, vmapped sweep
(`cll_jax.sweep`): the CLL sweep holds the fig. 4 and fig. D2 runs (8), each
GloRo sweep its 4 fig. 4 runs, and every sweep also the method's seed
comparison runs (one per extra seed, on that seed's data). The runs of one
seed start from the same initial parameters and see the same batch order;
the power iteration is converged after every epoch.

Evaluation of every run uses the sound path: guaranteed layer bounds
(`train.certification_bounds(..., method='sound')`), logits in float64 with
their rounding bound subtracted from every margin, and the strict margin
rule of `certify`. Reported: clean accuracy, training-set CRA at radius eps (the
red points of the figures are the training points misclassified or not
certified at eps), validation CRA (20,000 points), K^(f) = max_ij K_ij and
K^(h o f) (CLL: 1 / sigma_eps(p_final), CLL sec. 3.3; GloRo: K^(f), its
softmax has unit scale).

Outputs in `--output_dir` (default `workdir/moons_study`, git-ignored; the
committed copy in `results/moons` is rewritten only when asked for with
`--output_dir=results/moons`): moons_fig4.png (CLL vs GloRo),
moons_fig4_official.png (CLL vs GloRo with the official gradient),
moons_slack_d2.png, moons_soc_d3.png, moons_trajectories.png, moons_results.json,
moons_results.md (both with the seed comparison), moons_params.npz (the
figure runs' final parameters and power-iteration vectors, keys
'<run>/<collection>/<layer>/<name>') and moons_trajectories.npz (per-epoch
values of the GloRo runs, keys '<run>/<quantity>').
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cll_jax import certify
from cll_jax import forward_error
from cll_jax import losses
from cll_jax import sweep
from cll_jax import train
from experiments import moons_cll
from experiments import moons_gloro
from experiments import moons_soc

FIG4_EPS = (0.10, 0.15, 0.20, 0.25)
SLACK_EPS = 0.15
# Fig. D2's p in the official code's convention; this library uses p / 2.
SLACK_P_CODE = (0.75, 0.25, 0.01, 1e-4)
# Table B1: the learning rate drops at epoch 400 of 1000.
DECAY_FRACTION = 0.4
# Plot window (the noisy moons lie in [-1.1, 2.1] x [-0.6, 1.1]).
XLIM = (-1.5, 2.5)
YLIM = (-1.0, 1.5)
# CLL and GloRo with either gradient of K (`config.loss.gloro_variant`).
METHODS = ('cll', 'gloro', 'gloro_official')
GLORO_VARIANTS = {'gloro': 'faithful', 'gloro_official': 'official'}
TITLES = {'cll': 'CLL', 'gloro': 'GloRo',
          'gloro_official': 'GloRo, official gradient', 'soc': 'SOC'}
# Fig. D3: SOC MLP depths and certificate-regulariser weights.
SOC_DEPTHS = moons_soc.DEPTHS
SOC_GAMMAS = moons_soc.GAMMAS
# Per-epoch values of `head_body_summary`, saved every this many epochs.
TRAJECTORY_KEYS = ('w0_minus_w1', 'w0_norm', 'w1_norm', 'body_product',
                   'K_01')
TRAJECTORY_EVERY = 5


def _status(message: str) -> None:
  """One line per long phase on stdout (absl's INFO log is off by default)."""
  print(message, flush=True)


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run of the study."""
  name: str  # unique, e.g. 'cll_eps0.15'
  group: str  # 'fig4', 'slack_d2' or 'seeds'
  method: str  # one of METHODS
  epsilon: float
  p_code: float | None  # fig. D2 slack in the official code's convention
  config: ml_collections.ConfigDict
  depth: int | None = None  # fig. D3 SOC runs
  gamma: float | None = None  # fig. D3 SOC runs

  @property
  def p(self) -> float | None:
    """Constant slack of CLL eq. 5 (p_code / 2), None when annealed."""
    return None if self.p_code is None else self.p_code / 2


def make_config(method: str, epsilon: float, p: float | None, *, epochs: int,
                num_train: int, num_val: int, batch_size: int,
                seed: int, depth: int = 7,
                gamma: float = 0.0) -> ml_collections.ConfigDict:
  """The table B1 config of `experiments/moons_{cll,gloro,soc}.py`, resized."""
  if method == 'soc':
    c = moons_soc.get_config(f'eps={epsilon},depth={depth},gamma={gamma}')
  elif method == 'cll':
    c = moons_cll.get_config(f'eps={epsilon}' +
                             (f',p={p}' if p is not None else ''))
  elif method in GLORO_VARIANTS:
    if p is not None:
      raise ValueError(f'GloRo has no slack p, got p={p}')
    c = moons_gloro.get_config(
        f'eps={epsilon},variant={GLORO_VARIANTS[method]}')
  else:
    raise ValueError(f'unknown method {method!r}; known: {METHODS}')
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
  """The fig. 4 runs (every method per eps) and the fig. D2 slack runs."""
  for p_code in slack_p_code:
    if not 0 < p_code < 1:
      raise ValueError(f'slack p_code must be in (0, 1), got {p_code}')
  runs = []
  for method in METHODS:
    for eps in eps_values:
      runs.append(RunSpec(f'{method}_eps{eps:g}', 'fig4', method, eps, None,
                          make_config(method, eps, None, **kwargs)))
  for p_code in slack_p_code:
    runs.append(RunSpec(
        f'cll_eps{slack_eps:g}_pcode{p_code:g}', 'slack_d2', 'cll', slack_eps,
        p_code, make_config('cll', slack_eps, p_code / 2, **kwargs)))
  return runs


# --------------------------------------------------------------------------
# Evaluation


def _logits(model, variables, x):
  return model.apply(variables, x).logits


def head_body_summary(model, input_shape: tuple[int, ...]
                      ) -> Callable[[train.TrainState], dict[str, jax.Array]]:
  """`sweep.Sweep`'s `epoch_summary`: the head/body split of K_01.

  From the state's parameters and (converged) power-iteration vectors, as
  training sees them: ||w_0 - w_1|| and ||w_0||, ||w_1|| of the head's class
  vectors (kernel columns), the body's product of power-iteration norms
  (times the input scale) and K_01, their product.
  """
  zeros = jnp.zeros((1, *input_shape), jnp.float32)

  def summary(state: train.TrainState) -> dict[str, jax.Array]:
    out = model.apply(state.variables, zeros)
    head = state.params['head']['kernel']
    return {
        'w0_minus_w1': jnp.linalg.norm(head[:, 0] - head[:, 1]),
        'w0_norm': jnp.linalg.norm(head[:, 0]),
        'w1_norm': jnp.linalg.norm(head[:, 1]),
        'body_product': model.input_scale * jnp.prod(out.layer_norms[:-1]),
        'K_01': out.pairwise_lipschitz[0, 1],
    }
  return summary


def evaluate_run(spec: RunSpec, state: train.TrainState, model, dataset,
                 steps_per_epoch: int, bounds_fn, forward_fn
                 ) -> tuple[dict[str, Any], np.ndarray]:
  """Sound-bound evaluation of one trained run, as the training loop's.

  The bounds and logits are computed in float64 and every margin gives up
  the logits' rounding bound (`cll_jax.forward_error`), as
  `train.evaluate` does with `eval.precision='float64'`.

  Returns:
    The record for the results table and the `(num_train,)` boolean mask of
    training points that are correct and certified at radius eps.
  """
  c = spec.config
  eps = spec.epsilon
  with forward_error.precision_scope('float64'):
    bounds = bounds_fn(state)
    pairwise = bounds['pairwise']
    (train_out, train_error), (val_out, val_error) = (
        forward_fn(state.variables, jnp.asarray(x), bounds['logit_error'])
        for x in (dataset.train_images, dataset.test_images))
    train_logits, val_logits = train_out.logits, val_out.logits
    train_labels = jnp.asarray(dataset.train_labels)
    val_labels = jnp.asarray(dataset.test_labels)
    train_ok = np.asarray(certify.certified_correct(
        train_logits, train_labels, pairwise, eps, train_error))
    val_counts = certify.certified_counts(val_logits, val_labels, pairwise,
                                          (eps,), margin_error=val_error)
  k_f = float(np.max(np.asarray(pairwise)))
  if spec.method == 'cll':
    sched = train.loss_schedules(c, steps_per_epoch)
    p_final = float(sched.slack(c.train.num_epochs * steps_per_epoch))
    # K^(h o f) = 1 / sigma_eps(p) (CLL sec. 3.3).
    k_hf = float(1.0 / losses.calibrated_scale(eps, p_final))
  else:
    p_final = None
    # GloRo's and SOC's softmax has unit scale: K^(h o f) = K^(f).
    k_hf = k_f
  head = np.asarray(model.head_spec.class_vectors(state.params['head']),
                    np.float64)
  head_distance = float(np.linalg.norm(head[:, 0] - head[:, 1]))
  k_01 = float(np.asarray(pairwise)[0, 1])
  record = {
      'name': spec.name,
      'group': spec.group,
      'method': spec.method,
      'loss': c.loss.name,
      'gloro_variant': GLORO_VARIANTS.get(spec.method),
      'model': c.model.name,
      'head': c.model.head,
      'soc_depth': spec.depth,
      'soc_gamma': spec.gamma,
      'seed': int(c.seed),
      'epsilon': eps,
      'two_epsilon': 2 * eps,
      'p_code': spec.p_code,
      'p': spec.p,
      'p_start': c.loss.p_start if spec.method == 'cll' else None,
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
      'K_01': k_01,
      'K_hf': k_hf,
      'layer_norms_sound': [float(x) for x in bounds['layer_norms']],
      # The body's factor of the sound K_01 (its layers' bounds, input scale
      # and float allowance): K_01 = body_product_sound * ||w_0 - w_1||.
      'body_product_sound': k_01 / head_distance,
      'head_w0_minus_w1': head_distance,
      'head_class_vector_norms': [float(x)
                                  for x in np.linalg.norm(head, axis=0)],
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
  if r['method'] == 'soc':
    return f'N/A (depth {r["soc_depth"]}, γ {r["soc_gamma"]:g})'
  if r['method'] != 'cll':
    return 'N/A'
  if r['p_code'] is None:
    return f'{r["p_start"]:g} -> {r["p_final"]:g}'
  return f'{r["p"]:g} (code {r["p_code"]:g})'


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(plt, fig, path: str, dpi: int) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)


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


def plot_fig4(path: str, records, grids, dataset, masks,
              gloro_method: str = 'gloro') -> None:
  """CLL (top row) against one GloRo method (bottom row), per eps."""
  plt = _pyplot()
  eps_values = sorted({r['epsilon'] for r in records if r['group'] == 'fig4'})
  fig, axes = plt.subplots(2, len(eps_values),
                           figsize=(3.3 * len(eps_values), 5.0),
                           squeeze=False)
  for row, method in enumerate(('cll', gloro_method)):
    for col, eps in enumerate(eps_values):
      r = next(r for r in records if r['group'] == 'fig4'
               and r['method'] == method and r['epsilon'] == eps)
      _panel(axes[row, col], r, grids[r['name']], dataset, masks[r['name']],
             f'{TITLES[method]}: 2ε = {2 * eps:.2g}')
  fig.suptitle(f'Two-moons, CLL (top, p 1e-3 → 1e-12) vs '
               f'{TITLES[gloro_method]} (bottom); training CRA at radius ε, '
               'sound bounds; red: misclassified or not certified',
               fontsize=10)
  _save(plt, fig, path, dpi=100)


def plot_slack(path: str, records, grids, dataset, masks) -> None:
  plt = _pyplot()
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
  _save(plt, fig, path, dpi=120)


def plot_soc_d3(path: str, records, grids, dataset, masks) -> None:
  """Fig. D3: SOC MLPs, rows gamma, columns depth."""
  plt = _pyplot()
  runs = [r for r in records if r['group'] == 'soc_d3']
  depths = sorted({r['soc_depth'] for r in runs})
  gammas = sorted({r['soc_gamma'] for r in runs})
  fig, axes = plt.subplots(len(gammas), len(depths),
                           figsize=(3.3 * len(depths), 2.6 * len(gammas)),
                           squeeze=False)
  for row, gamma in enumerate(gammas):
    for col, depth in enumerate(depths):
      r = next(r for r in runs
               if r['soc_depth'] == depth and r['soc_gamma'] == gamma)
      _panel(axes[row, col], r, grids[r['name']], dataset, masks[r['name']],
             f'SOC depth {depth}, γ = {gamma:g}')
  eps = runs[0]['epsilon'] if runs else SLACK_EPS
  fig.suptitle(f'1-Lipschitz SOC MLPs with LLN (CLL fig. D3), SOC loss; '
               f'training CRA at 2ε = {2 * eps:.2g}, sound (proven) bounds',
               fontsize=10)
  _save(plt, fig, path, dpi=100)


def plot_trajectories(path: str, trajectories: dict[str, dict[str, Any]],
                      records, epsilon: float) -> None:
  """Head/body trajectories of both GloRo methods at `epsilon`, all seeds."""
  plt = _pyplot()
  colours = {'gloro': '#1f5fae', 'gloro_official': '#c0392b'}
  panels = (('w0_minus_w1', '$\\|w_0 - w_1\\|$'),
            ('w0_norm', '$\\|w_0\\|$ (solid), $\\|w_1\\|$ (dotted)'),
            ('body_product', 'body product of layer norms'),
            ('K_01', '$K_{01}$'))
  fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.9))
  labelled = set()
  for r in records:
    if (r['method'] not in colours or r['epsilon'] != epsilon
        or r['name'] not in trajectories):
      continue
    t = trajectories[r['name']]
    colour = colours[r['method']]
    label = None if r['method'] in labelled else TITLES[r['method']]
    labelled.add(r['method'])
    for ax, (key, _) in zip(axes, panels):
      ax.plot(t['epochs'], t[key], color=colour, lw=0.9, alpha=0.8,
              label=label)
      if key == 'w0_norm':
        ax.plot(t['epochs'], t['w1_norm'], color=colour, lw=0.9, alpha=0.8,
                ls=':')
  for ax, (_, title) in zip(axes, panels):
    ax.set_yscale('log')
    ax.set_xlabel('epoch')
    ax.set_title(title, fontsize=9)
  axes[0].legend(fontsize=8, loc='lower left')
  seeds = sorted({r['seed'] for r in records if r['method'] in colours
                  and r['epsilon'] == epsilon})
  fig.suptitle(f'GloRo at 2ε = {2 * epsilon:.2g}, seeds {seeds}: head class '
               'vectors and body (power-iteration norms, as in training), '
               'per epoch', fontsize=10)
  _save(plt, fig, path, dpi=100)


def markdown_table(records, setup: dict) -> str:
  lines = [
      '# Two-moons study (CLL fig. 4, fig. D2 and fig. D3)',
      '',
      'Generated by `python -m experiments.moons_study'
      + (f' --soc_depths={",".join(map(str, setup["soc_depths"]))}'
         if setup.get('soc_depths') else '') + '` '
      f'({setup["epochs"]} epochs, {setup["num_train"]} training and '
      f'{setup["num_val"]} validation points, batch {setup["batch_size"]}, '
      f'seed {setup["seed"]}). Certification: sound layer bounds '
      f'(`train.certification_bounds(method="sound")`), strict margin rule. '
      f'Train CRA at radius eps on the training set; val CRA on the '
      f'validation set. p is CLL eq. 5\'s slack; fig. D2 quotes '
      f'p_code = 2 p (official code convention). K^(h o f): CLL '
      f'1/sigma_eps(p_final), GloRo K^(f). gloro: the loss as GloRo defines '
      f'it; gloro_official: the official CLL code\'s gradient of K (the '
      f'head\'s gradient counted twice, `losses.gloro_loss`); soc: SOC MLPs '
      f'with LLN and SOC\'s loss (fig. D3, proven layer bounds). Wall time: the '
      f'sweep that trained the run (its runs train together, vmapped), '
      f'compile included.',
      '',
      '| group | method | 2 eps | eps | p | clean acc (val) | train CRA '
      '| val CRA | K^(f) | K^(h o f) | sweep wall time [s] |',
      '|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in records:
    lines.append(
        f'| {r["group"]} | {r["method"]} | {r["two_epsilon"]:.2f} | '
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


def _saved_epochs(epochs: int) -> np.ndarray:
  """0-based indices of the saved trajectory epochs (every k-th and last)."""
  return np.unique(np.r_[np.arange(TRAJECTORY_EVERY - 1, epochs,
                                   TRAJECTORY_EVERY), epochs - 1])


# --------------------------------------------------------------------------
# The study


def _group_functions(config, num_classes: int, input_shape):
  """The model of a sweep, its jitted sound bounds, logits (float32, for
  the figures) and certification forward pass."""
  model = train.create_model(config, num_classes)
  bounds_fn = jax.jit(lambda st: train.certification_bounds(
      st, model, input_shape, method='sound'))
  logits_fn = jax.jit(functools.partial(_logits, model))
  forward_fn = jax.jit(functools.partial(forward_error.certified_forward,
                                         model.apply))
  return model, bounds_fn, logits_fn, forward_fn


def train_and_evaluate_runs(specs: Sequence[RunSpec], datasets, *,
                            epochs: int, converge_every: int,
                            epochs_per_call: int,
                            grid_resolution: int | None = None,
                            grid_groups: Sequence[str] = ('fig4',
                                                          'slack_d2'),
                            epoch_summary=None):
  """Trains `specs` (one vmapped sweep per method and model), evaluates all.

  Args:
    specs: the runs.
    datasets: one dataset per spec (the same object for runs on the same
      data); a sweep whose runs hold different data sets trains each run on
      its own.
    epochs, converge_every, epochs_per_call: as `sweep.Sweep`.
    grid_resolution: if set, decision grids for the figures, of the runs
      in `grid_groups`.
    epoch_summary: `model -> ` `sweep.Sweep`'s per-epoch summary
      (`head_body_summary`), or None.

  Returns:
    (records, masks, grids, params, sweep_times, trajectories): the table
    records in the order of `specs`; per run name the training-point mask of
    `evaluate_run`, the decision grid (see `grid_resolution`), the flat
    final variables and the saved epochs of the `epoch_summary` values
    (with 'epochs', 1-based); per sweep ('method' or 'method/model') its
    wall time in seconds.
  """
  records, masks, grids, params, sweep_times = [], {}, {}, {}, {}
  trajectories = {}
  saved = _saved_epochs(epochs)
  keys = dict.fromkeys((s.method, s.config.model.name) for s in specs)
  for method, model_name in keys:
    members = [i for i, s in enumerate(specs)
               if (s.method, s.config.model.name) == (method, model_name)]
    group = [specs[i] for i in members]
    data = [datasets[i] for i in members]
    if all(d is data[0] for d in data):
      images, labels = data[0].train_images, data[0].train_labels
    else:
      images = [d.train_images for d in data]
      labels = [d.train_labels for d in data]
    label = method if len({k[1] for k in keys if k[0] == method}) == 1 else (
        f'{method}/{model_name}')
    model, bounds_fn, logits_fn, forward_fn = _group_functions(
        group[0].config, data[0].num_classes, data[0].image_shape)
    summary = None if epoch_summary is None else epoch_summary(
        model, data[0].image_shape)
    _status(f'training {label} sweep ({len(group)} runs x {epochs} '
            f'epochs)...')
    start = time.time()
    sw = sweep.Sweep([s.config for s in group], model, images, labels,
                     converge_every=converge_every,
                     epochs_per_call=epochs_per_call,
                     epoch_summary=summary)
    states, history = sw.train(epochs, log=lambda m, l=label: logging.info(
        '%s sweep: %s', l, m))
    jax.block_until_ready(states)
    sweep_times[label] = time.time() - start
    _status(f'  {label} sweep: {sweep_times[label]:.1f} s; evaluating...')
    for i, (spec, dataset) in enumerate(zip(group, data)):
      state = sweep.unstack(states, i)
      record, ok = evaluate_run(spec, state, model, dataset,
                                sw.steps_per_epoch, bounds_fn, forward_fn)
      record['sweep_wall_time_s'] = sweep_times[label]
      record['sweep_runs'] = len(group)
      records.append(record)
      masks[spec.name] = ok
      if grid_resolution and spec.group in grid_groups:
        grids[spec.name] = decision_grid(model, state.variables, logits_fn,
                                         grid_resolution)
      params.update(_flat_variables(spec.name, state.variables))
      if summary is not None:
        trajectories[spec.name] = {'epochs': saved + 1, **{
            k: history[k][i][saved] for k in history
            if k not in ('loss', 'accuracy')}}
      logging.info('%s: %s', spec.name, {k: v for k, v in record.items()
                                          if not isinstance(v, list)})
  order = {s.name: i for i, s in enumerate(specs)}
  records.sort(key=lambda r: order[r['name']])
  return records, masks, grids, params, sweep_times, trajectories


def soc_runs(depths: Sequence[int], epsilon: float, **kwargs
             ) -> list[RunSpec]:
  """Fig. D3: an SOC MLP per depth and gamma (group 'soc_d3')."""
  return [RunSpec(f'soc_depth{depth}_gamma{gamma:g}', 'soc_d3', 'soc',
                  epsilon, None,
                  make_config('soc', epsilon, None, depth=depth, gamma=gamma,
                              **kwargs), depth=depth, gamma=gamma)
          for depth in depths for gamma in SOC_GAMMAS]


def seed_runs(seeds: Sequence[int], epsilon: float, **kwargs
              ) -> list[RunSpec]:
  """Every method at `epsilon` for each of `seeds` (group 'seeds')."""
  return [RunSpec(f'{method}_eps{epsilon:g}_seed{seed}', 'seeds', method,
                  epsilon, None,
                  make_config(method, epsilon, None, **dict(kwargs,
                                                            seed=seed)))
          for seed in seeds for method in METHODS]


def seed_comparison(records: Sequence[dict], epsilon: float
                    ) -> dict[str, Any]:
  """CLL vs both GloRo methods at `epsilon`, over every seed in `records`.

  Each seed draws its own data noise, init and batch order. Counts, per
  GloRo method, the seeds where its train CRA is below (equal to) CLL's and
  where CLL's K^(h o f) is above its K^(f), and the mean CRAs.

  Returns:
    {'epsilon', 'seeds', 'runs': the records at `epsilon` of the fig. 4 and
    seed groups, 'summary'}.
  """
  runs = [dict(r) for r in records if r['group'] in ('fig4', 'seeds')
          and r['epsilon'] == epsilon]
  seeds = list(dict.fromkeys(r['seed'] for r in runs))
  runs.sort(key=lambda r: (seeds.index(r['seed']),
                           METHODS.index(r['method'])))
  by = {(r['seed'], r['method']): r for r in runs}
  summary: dict[str, Any] = {'num_seeds': len(seeds)}
  for method in METHODS[1:]:
    pairs = [(by[(s, 'cll')], by[(s, method)]) for s in seeds]
    summary[f'{method}_train_cra_below_cll'] = sum(
        g['train_cra'] < c['train_cra'] for c, g in pairs)
    summary[f'{method}_train_cra_equal_cll'] = sum(
        g['train_cra'] == c['train_cra'] for c, g in pairs)
    summary[f'cll_K_hf_above_{method}'] = sum(
        c['K_hf'] > g['K_hf'] for c, g in pairs)
  for method in METHODS:
    for split in ('train', 'val'):
      summary[f'{method}_mean_{split}_cra'] = float(np.mean(
          [by[(s, method)][f'{split}_cra'] for s in seeds]))
  return {'epsilon': epsilon, 'seeds': seeds, 'runs': runs,
          'summary': summary}


def seed_table(comparison: dict[str, Any]) -> str:
  """Markdown section of `seed_comparison`'s result."""
  s = comparison['summary']
  eps = comparison['epsilon']
  n = s['num_seeds']
  lines = [
      f'## CLL vs GloRo at 2 eps = {2 * eps:.2g} over seeds',
      '',
      f'Seeds {comparison["seeds"]} (data noise, init and batch order).',
      '',
  ]
  for method in METHODS[1:]:
    lines.append(
        f'- {method}: train CRA below CLL\'s in '
        f'{s[f"{method}_train_cra_below_cll"]} of {n} seeds (equal in '
        f'{s[f"{method}_train_cra_equal_cll"]}); K^(h o f) of CLL above '
        f'{method}\'s in {s[f"cll_K_hf_above_{method}"]} of {n}.')
  lines.append(
      '- Mean train CRA: ' + ', '.join(
          f'{m} {100 * s[f"{m}_mean_train_cra"]:.3f}%' for m in METHODS) +
      '; mean val CRA: ' + ', '.join(
          f'{m} {100 * s[f"{m}_mean_val_cra"]:.3f}%' for m in METHODS) + '.')
  lines += [
      '',
      '| seed | method | train CRA | not certified (of train) | val CRA '
      '| K^(f) | K^(h o f) | ‖w_0 - w_1‖ | body product (sound) |',
      '|---|---|---|---|---|---|---|---|---|',
  ]
  for r in comparison['runs']:
    lines.append(
        f'| {r["seed"]} | {r["method"]} | {100 * r["train_cra"]:.2f}% | '
        f'{r["num_train"] - r["train_certified_count"]} | '
        f'{100 * r["val_cra"]:.2f}% | {r["K_f"]:.4g} | {r["K_hf"]:.4g} | '
        f'{r["head_w0_minus_w1"]:.3g} | {r["body_product_sound"]:.4g} |')
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
              comparison_eps: float = SLACK_EPS,
              soc_depths: Sequence[int] = SOC_DEPTHS) -> dict[str, Any]:
  """Trains and evaluates every run, writes figures and tables.

  `soc_depths` (may be empty) are the fig. D3 SOC MLPs, each trained with
  every gamma of `SOC_GAMMAS` at `comparison_eps` (the true margin).

  With `comparison_seeds`, also trains every method at `comparison_eps`
  for each of those seeds, in the same sweeps as the figure runs; the
  comparison over `seed` and these seeds (`seed_comparison`) goes into the
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
  extra_seeds = [s for s in dict.fromkeys(comparison_seeds) if s != seed]
  extra = seed_runs(extra_seeds, comparison_eps, **kwargs)
  runs += soc_runs(soc_depths, comparison_eps, **kwargs)
  base = runs[0].config
  _status(f'building the data sets (seeds {[seed, *extra_seeds]})...')
  dataset = train.load_dataset(base)
  datasets = [dataset] * len(runs)
  seed_data = {}
  for spec in extra:
    if spec.config.seed not in seed_data:
      seed_data[spec.config.seed] = train.load_dataset(spec.config)
    datasets.append(seed_data[spec.config.seed])
  records, masks, grids, params, sweep_times, trajectories = (
      train_and_evaluate_runs(
          runs + extra, datasets, epochs=epochs,
          converge_every=converge_every, epochs_per_call=epochs_per_call,
          grid_resolution=grid_resolution,
          grid_groups=('fig4', 'slack_d2', 'soc_d3'),
          epoch_summary=head_body_summary))
  figure_records = [r for r in records if r['group'] != 'seeds']

  setup = dict(kwargs, eps_values=list(eps_values), slack_eps=slack_eps,
               slack_p_code=list(slack_p_code), converge_every=converge_every,
               certification='sound', devices=str(jax.devices()),
               arc_positions=base.data.kwargs.arc_positions,
               methods=list(METHODS), soc_depths=list(soc_depths),
               soc_gammas=list(SOC_GAMMAS))
  comparison = (seed_comparison(records, comparison_eps) if extra else None)
  _status(f'writing figures and tables to {output_dir}...')
  for gloro_method, name in (('gloro', 'moons_fig4.png'),
                             ('gloro_official', 'moons_fig4_official.png')):
    plot_fig4(os.path.join(output_dir, name), figure_records, grids, dataset,
              masks, gloro_method)
  plot_slack(os.path.join(output_dir, 'moons_slack_d2.png'), figure_records,
             grids, dataset, masks)
  plot_trajectories(os.path.join(output_dir, 'moons_trajectories.png'),
                    trajectories, records, comparison_eps)
  if soc_depths:
    plot_soc_d3(os.path.join(output_dir, 'moons_soc_d3.png'), figure_records,
                grids, dataset, masks)
  figure_runs = {r['name'] for r in figure_records}
  np.savez_compressed(
      os.path.join(output_dir, 'moons_params.npz'),
      **{k: v for k, v in params.items() if k.split('/')[0] in figure_runs})
  np.savez_compressed(
      os.path.join(output_dir, 'moons_trajectories.npz'),
      **{f'{r["name"]}/{k}': v for r in records
         if r['method'] in GLORO_VARIANTS
         for k, v in trajectories[r['name']].items()})
  total = time.time() - study_start
  result = {
      'setup': setup,
      'wall_time_s': {'total': total,
                      **{f'{k}_sweep': v for k, v in sweep_times.items()}},
      'runs': figure_records,
  }
  if comparison is not None:
    result['seed_comparison'] = comparison
  with open(os.path.join(output_dir, 'moons_results.json'), 'w') as f:
    json.dump(result, f, indent=1)
  md = markdown_table(figure_records, setup)
  if comparison is not None:
    md += '\n' + seed_table(comparison)
  md += (f'\nTotal wall time {total:.1f} s (sweeps, each with its seed '
         f'comparison runs: ' + ', '.join(
             f'{m} {t:.1f} s' for m, t in sweep_times.items()) + ').\n')
  with open(os.path.join(output_dir, 'moons_results.md'), 'w') as f:
    f.write(md)
  return result


_OUTPUT_DIR = flags.DEFINE_string(
    'output_dir', os.path.join('workdir', 'moons_study'),
    'Directory for figures and tables (git-ignored by default; '
    '--output_dir=results/moons rewrites the committed copy).')
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
    'Extra seeds for every method at --comparison_eps (empty: skip).')
_COMPARISON_EPS = flags.DEFINE_float(
    'comparison_eps', SLACK_EPS, 'eps of the seed comparison (true margin).')
# Off by default: the depth-25 SOC sweep alone takes longer than the rest of
# the study, which is the README's few-minute main job.
_SOC_DEPTHS = flags.DEFINE_list(
    'soc_depths', [],
    'Fig. D3 SOC MLP depths, e.g. 3,7,25 (the committed results; default '
    'empty: skip fig. D3).')
_CONVERGE_EVERY = flags.DEFINE_integer(
    'converge_every', 1, 'Converge the power iteration every k epochs.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    # Hundreds of INFO lines (JAX, the sweeps' progress); --verbosity=0
    # brings them back.
    logging.set_verbosity(logging.WARNING)
  result = run_study(
      _OUTPUT_DIR.value, epochs=_EPOCHS.value,
      eps_values=[float(e) for e in _EPS.value], slack_eps=_SLACK_EPS.value,
      slack_p_code=[float(p) for p in _SLACK_P_CODE.value],
      num_train=_NUM_TRAIN.value, num_val=_NUM_VAL.value,
      batch_size=_BATCH_SIZE.value, seed=_SEED.value,
      converge_every=_CONVERGE_EVERY.value,
      comparison_seeds=[int(x) for x in _COMPARISON_SEEDS.value],
      comparison_eps=_COMPARISON_EPS.value,
      soc_depths=[int(d) for d in _SOC_DEPTHS.value])
  print(open(os.path.join(_OUTPUT_DIR.value, 'moons_results.md')).read())
  print(result['wall_time_s'])


if __name__ == '__main__':
  app.run(main)
