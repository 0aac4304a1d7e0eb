"""Checks a whole experiment config before anything runs.

Every error names the offending field and value, so a typo on the command
line (`--config.loss.p_end=0.7`) fails in a second, not after an epoch.
"""

from __future__ import annotations

import math
import os

import jax
import ml_collections
import numpy as np

from cll_jax import layers
from cll_jax import forward_error
from cll_jax import models
from cll_jax import objectives
from cll_jax import steps

GLORO_VARIANTS = ('faithful', 'official')
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)
_PATH_KWARGS = {'image_folder': 'root', 'tiny_imagenet': 'root'}


class InvalidConfigError(ValueError):
  """A config field holds a value the run cannot use."""


def _fail(field: str, value, why: str):
  raise InvalidConfigError(f'config.{field}={value!r}: {why}')


def validate_config(config: ml_collections.ConfigDict,
                    process_count: int | None = None) -> None:
  """Raises ValueError naming the first invalid field.

  Args:
    config: the experiment config.
    process_count: hosts of the run (default: `jax.process_count()`).
  """
  from cll_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  m, d, l, o, t, e = (config.model, config.data, config.loss,
                      config.optimizer, config.train, config.eval)
  if m.name not in models.ARCHITECTURES:
    _fail('model.name', m.name,
          f'unknown model; known: {sorted(models.ARCHITECTURES)}')
  if m.activation not in models.ACTIVATIONS:
    _fail('model.activation', m.activation,
          f'known: {sorted(models.ACTIVATIONS)}')
  if m.get('bound', 'naive') not in models.BOUNDS:
    _fail('model.bound', m.bound, f'known bounds: {models.BOUNDS}')
  if (m.get('bound', 'naive') == 'liplt'
      and models.ACTIVATIONS[m.activation][1] is None):
    _fail('model.bound', m.bound,
          f'LipLT needs an elementwise activation, model.activation is '
          f'{m.activation!r}')
  if m.get('head', 'dense') not in layers.HEADS:
    _fail('model.head', m.head, f'known heads: {sorted(layers.HEADS)}')
  soc = m.get('soc')
  if soc is not None:
    for key in ('terms_train', 'terms_eval'):
      if soc.get(key, 1) < 1:
        _fail(f'model.soc.{key}', soc[key], 'must be >= 1')
    if not soc.get('max_norm', 1.0) > 0:
      _fail('model.soc.max_norm', soc.max_norm, 'must be > 0')
  if m.get('bound', 'naive') == 'liplt' and not models.is_unconstrained(
      models.ARCHITECTURES[m.name], m.get('head', 'dense')):
    _fail('model.bound', m.bound,
          f'LipLT needs Conv/Dense layers and a dense head; {m.name} with '
          f'head {m.get("head", "dense")!r} has others')
  if m.num_power_iterations < 0:
    _fail('model.num_power_iterations', m.num_power_iterations, 'must be >= 0')
  for key in ('input_mean', 'input_std'):
    values = m.get(key)
    if values is not None and not all(math.isfinite(v) for v in values):
      _fail(f'model.{key}', values, 'must be finite')
  if (m.get('liplt_power_iterations') is not None
      and m.liplt_power_iterations < 0):
    _fail('model.liplt_power_iterations', m.liplt_power_iterations,
          'must be >= 0 or None')
  if m.get('input_std') is not None and min(m.input_std) <= 0:
    _fail('model.input_std', m.input_std, 'must be > 0')
  if d.name not in data_lib.DATASETS:
    _fail('data.name', d.name, f'unknown dataset; known: '
          f'{sorted(data_lib.DATASETS)}')
  path_key = _PATH_KWARGS.get(d.name)
  if path_key is not None:
    root = d.kwargs.get(path_key)
    if not root:
      _fail(f'data.kwargs.{path_key}', root, f'{d.name} needs a path')
    if not os.path.exists(os.path.expanduser(str(root))) and not d.kwargs.get(
        'download', False):
      why = 'path does not exist'
      if os.path.basename(str(root)) == 'cifar10_jpeg.tar.gz':
        from cll_jax import configs  # pylint: disable=g-import-not-at-top
        why += (f'; the offline copy was looked for in '
                f'{configs.shared_dataset_candidates(os.path.basename(root))}'
                f' (set ${configs.SHARED_DATASETS_ENV} to its folder)')
      _fail(f'data.kwargs.{path_key}', root, why)
  if l.name not in objectives.names():
    _fail('loss.name', l.name, f'known losses: {objectives.names()}')
  if not l.epsilon > 0:
    _fail('loss.epsilon', l.epsilon, 'must be > 0')
  if not math.isfinite(l.epsilon):
    _fail('loss.epsilon', l.epsilon, 'must be finite')
  if l.epsilon_schedule not in ('fixed', 'logarithmic'):
    _fail('loss.epsilon_schedule', l.epsilon_schedule,
          "must be 'fixed' or 'logarithmic'")
  convention = l.get('p_convention', 'paper')
  if convention not in objectives.P_CONVENTIONS:
    _fail('loss.p_convention', convention,
          f'known: {tuple(objectives.P_CONVENTIONS)}')
  p_high = 0.5 / objectives.P_CONVENTIONS[convention]
  for key in ('p_start', 'p_end'):
    if not 0 < l[key] < p_high:
      why = (f'slack p must lie in (0, {p_high:g}) with '
             f'loss.p_convention={convention!r}')
      if convention == 'paper':
        why += ("; set loss.p_convention='code' for the official code's "
                'p_code = 2 p in (0, 1)')
      _fail(f'loss.{key}', l[key], why)
  # Training runs in float32, which flushes subnormals to 0.
  for key in ('epsilon', 'p_start', 'p_end'):
    if l[key] < _FLOAT32_TINY:
      _fail(f'loss.{key}', l[key], f'below the smallest normal float32 '
            f'number {_FLOAT32_TINY}: 0 or subnormal in float32')
  if l.get('delta') is not None and not 0 <= l.delta < math.inf:
    _fail('loss.delta', l.delta, 'must be finite and >= 0')
  if l.get('offset', 'two_sided') not in ('two_sided', 'one_sided'):
    _fail('loss.offset', l.offset, "must be 'two_sided' or 'one_sided'")
  variant = l.get('gloro_variant', 'faithful')
  if variant not in GLORO_VARIANTS:
    _fail('loss.gloro_variant', variant, f'known: {GLORO_VARIANTS}')
  if variant == 'official':
    if l.name not in ('gloro', 'gloro_trades'):
      _fail('loss.gloro_variant', variant,
            f"applies to the GloRo losses only, loss.name is {l.name!r}")
    if m.get('bound', 'naive') != 'naive':
      # The head factor is read off K_ij = P ||w_i - w_j|| (naive bound).
      _fail('loss.gloro_variant', variant,
            f"needs model.bound='naive', got {m.bound!r}")
  scale = l.get('gloro_logit_scale', 1.0)
  if not (math.isfinite(scale) and scale > 0):
    _fail('loss.gloro_logit_scale', scale, 'must be finite and > 0')
  if scale != 1 and l.name != 'gloro':
    _fail('loss.gloro_logit_scale', scale,
          f"applies to loss.name='gloro' only, loss.name is {l.name!r}")
  if l.lam < 0:
    _fail('loss.lam', l.lam, 'must be >= 0')
  if not l.lipschitz_scale_start > 0:
    _fail('loss.lipschitz_scale_start', l.lipschitz_scale_start, 'must be > 0')
  if l.name == 'crm':
    if not l.crm_temperature > 0:
      _fail('loss.crm_temperature', l.crm_temperature, 'must be > 0')
    if l.crm_lambda < 0:
      _fail('loss.crm_lambda', l.crm_lambda, 'must be >= 0')
  if not l.get('soc_gamma', 0.0) >= 0:
    _fail('loss.soc_gamma', l.soc_gamma, 'must be >= 0')
  if not 0 <= l.get('margin', 0.0) < math.inf:
    _fail('loss.margin', l.margin, 'must be finite and >= 0')
  if not 0 <= l.get('offset_ce_offset', 0.0) < math.inf:
    _fail('loss.offset_ce_offset', l.offset_ce_offset,
          'must be finite and >= 0')
  if not 0 < l.get('temperature', 1.0) < math.inf:
    _fail('loss.temperature', l.temperature, 'must be finite and > 0')
  if o.get('schedule', 'step') not in steps.LR_SCHEDULES:
    _fail('optimizer.schedule', o.schedule, f'known: {steps.LR_SCHEDULES}')
  if not 0 < o.get('peak_fraction', 0.4) < 1:
    _fail('optimizer.peak_fraction', o.peak_fraction, 'must lie in (0, 1)')
  if o.get('name', 'adam') not in steps.OPTIMIZERS:
    _fail('optimizer.name', o.name, f'known: {steps.OPTIMIZERS}')
  if o.get('weight_decay', 0.0) < 0:
    _fail('optimizer.weight_decay', o.weight_decay, 'must be >= 0')
  if not o.learning_rate > 0:
    _fail('optimizer.learning_rate', o.learning_rate, 'must be > 0')
  if t.num_epochs < 1:
    _fail('train.num_epochs', t.num_epochs, 'must be >= 1')
  # Batches are padded with masked rows to a multiple of the local device
  # count, so they need not divide by it; the global training batch is split
  # evenly over the hosts.
  hosts = jax.process_count() if process_count is None else process_count
  if t.batch_size < 1 or t.batch_size % hosts:
    _fail('train.batch_size', t.batch_size,
          f'must be a positive multiple of the process count {hosts}')
  if e.batch_size < 1:
    _fail('eval.batch_size', e.batch_size, 'must be >= 1')
  if t.get('on_nonfinite', 'stop') not in steps.NONFINITE_POLICIES:
    _fail('train.on_nonfinite', t.on_nonfinite,
          f'must be one of {steps.NONFINITE_POLICIES}')
  for key in ('eval_every_epochs', 'converge_every_epochs',
              'checkpoint_every_epochs', 'log_every_steps'):
    if t[key] < 1:
      _fail(f'train.{key}', t[key], 'must be >= 1')
  if not all(0 < r < math.inf for r in e.radii):
    _fail('eval.radii', e.radii, 'radii must be finite and > 0')
  if e.bound not in ('sound', 'power'):
    _fail('eval.bound', e.bound, "must be 'sound' or 'power'")
  precision = e.get('precision', 'float64')
  if precision not in forward_error.PRECISIONS:
    _fail('eval.precision', precision, f'known: {forward_error.PRECISIONS}')
  if precision == 'float64' and jax.default_backend() == 'tpu':
    _fail('eval.precision', precision, "TPUs lack float64: use 'float32'")
