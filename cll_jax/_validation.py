"""Cheap input checks shared by the public functions.

Checks on shapes and dtypes are static and free under `jit`. Checks on values
(NaN/Inf, ranges) need concrete arrays: they run only when the value is
concrete (eager calls, config validation) and are skipped for tracers, so
jitted training loops pay nothing for them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
  """True when `x` holds a value now (not a tracer inside jit/grad/vmap)."""
  return not isinstance(x, jax.core.Tracer)


def check_floating(name: str, x) -> None:
  dtype = jnp.asarray(x).dtype if not hasattr(x, 'dtype') else x.dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f'{name} must be a floating-point array, got dtype {dtype}')


def check_integer(name: str, x) -> None:
  dtype = jnp.asarray(x).dtype if not hasattr(x, 'dtype') else x.dtype
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f'{name} must be an integer array, got dtype {dtype}')


def check_ndim(name: str, x, ndim: int) -> None:
  if jnp.ndim(x) != ndim:
    raise ValueError(
        f'{name} must have {ndim} dimensions, got shape {jnp.shape(x)}')


def check_finite(name: str, x) -> None:
  """Raises if a concrete `x` has NaN or Inf entries; no-op under tracing."""
  if is_concrete(x):
    arr = np.asarray(x)
    if not np.all(np.isfinite(arr)):
      bad = arr[~np.isfinite(arr)].ravel()[:3]
      raise ValueError(
          f'{name} must be finite, found {int((~np.isfinite(arr)).sum())} '
          f'non-finite entries (e.g. {bad.tolist()})')


def check_positive(name: str, x) -> None:
  """Raises if a concrete `x` has entries <= 0 (or NaN); no-op under tracing."""
  if is_concrete(x):
    arr = np.asarray(x)
    if not np.all(arr > 0):
      raise ValueError(f'{name} must be > 0, got {arr.ravel()[:5].tolist()}')


def check_open_interval(name: str, x, low: float, high: float) -> None:
  """Raises if a concrete `x` is outside (low, high); no-op under tracing."""
  if is_concrete(x):
    arr = np.asarray(x)
    if not np.all((arr > low) & (arr < high)):
      raise ValueError(
          f'{name} must lie in the open interval ({low}, {high}), got '
          f'{arr.ravel()[:5].tolist()}')


def check_labels(name: str, labels, num_classes: int) -> None:
  """Integer labels in [0, num_classes); the range is checked when concrete."""
  check_integer(name, labels)
  if is_concrete(labels):
    arr = np.asarray(labels)
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
      raise ValueError(
          f'{name} must lie in [0, {num_classes}), got values from '
          f'{arr.min()} to {arr.max()}')
