"""Certify new inputs with a trained model: predictions and certified radii.

  certifier = Certifier.from_workdir('/tmp/cifar10_4c3f')
  result = certifier.certify(images)            # float32 in [0, 1], NHWC
  result.class_names, result.radius              # per image
  result = certifier.certify(images, labels)    # + CRA at the run's radii

The bound is the one training evaluated with (`config.eval.bound`,
'sound' by default: guaranteed layer bounds from the weights, never
power-iteration estimates), computed once when the certifier is built; the
radius of a prediction c is `min_{j != c} (f_c - f_j - delta) / K_cj`
(`cll_jax.certify.certified_radius`), delta the logits' rounding bound of
the forward pass, which runs in the run's `eval.precision` (float64 by
default) as its evaluation did. Inputs must be what the model was
trained on after preprocessing: images as floats in [0, 1] (uint8 files are
converted by `load_inputs`, `cll_jax.data.to_float`), two-moons points as
float pairs; anything else is refused with a ValueError.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cll_jax import certify
from cll_jax import checkpoints
from cll_jax import forward_error
from cll_jax import models
from cll_jax import run_records
from cll_jax import steps
from cll_jax.data import image_folder

IMAGE_EXTENSIONS = image_folder.IMAGE_EXTENSIONS


@dataclasses.dataclass(frozen=True)
class CertificationResult:
  """Per-input predictions and certificates.

  Attributes:
    predictions: (B,) predicted class indices.
    class_names: (B,) names of the predicted classes.
    radius: (B,) certified L2 radii (0: not certified, e.g. a tied argmax).
    labels: (B,) labels, or None when unknown.
    radii: the radii of `certified` (and of `cra`).
    certified: (R, B) booleans, prediction certified at radii[r].
    cra: {radius: certified robust accuracy} when labels are known.
    accuracy: clean accuracy when labels are known.
  """
  predictions: np.ndarray
  class_names: tuple[str, ...]
  radius: np.ndarray
  labels: np.ndarray | None
  radii: tuple[float, ...]
  certified: np.ndarray
  cra: dict[float, float] | None
  accuracy: float | None


class Certifier:
  """A trained network, its certification bound and its input domain.

  Args:
    config: the run's config.
    variables: `{'params', 'power_iteration'}` of the trained network.
    class_names: one name per class index.
    image_shape: shape of one input.
    image_dtype: dtype the data set stores inputs in ('uint8' images are
      fed to the model as floats in [0, 1]).
    bound: 'sound' (guaranteed) or 'power' (the papers' estimate); default
      the config's `eval.bound`.
  """

  def __init__(self, config: ml_collections.ConfigDict, variables,
               class_names: Sequence[str], image_shape: Sequence[int],
               image_dtype: str = 'uint8', bound: str | None = None):
    self.config = config
    self.class_names = tuple(class_names)
    self.image_shape = tuple(int(d) for d in image_shape)
    self.image_dtype = str(image_dtype)
    self.bound = bound or config.eval.get('bound', 'sound')
    self.model = steps.create_model(config, len(self.class_names))
    self.variables = variables
    # As the run's evaluation: bounds and logits in `eval.precision`, every
    # margin giving up the logits' rounding bound (`cll_jax.forward_error`).
    self.precision = config.eval.get('precision', 'float64')
    with forward_error.precision_scope(self.precision):
      self.bounds = jax.jit(lambda v: steps.certification_bounds(
          v, self.model, self.image_shape, self.bound))(variables)
    self.pairwise_lipschitz = self.bounds['pairwise']
    self.lipschitz = float(self.bounds['lipschitz'])
    self.radii = tuple(float(r) for r in config.eval.radii) + (
        float(config.loss.epsilon),)
    self._forward = jax.jit(lambda v, x, error: forward_error.certified_forward(
        self.model.apply, v, x, error))

  @classmethod
  def from_workdir(cls, workdir: str, bound: str | None = None,
                   step: int | None = None) -> Certifier:
    """Loads the latest (or `step`'s) checkpoint of a training run."""
    config = run_records.load_config(workdir)
    info = run_records.read_json(workdir, run_records.DATASET_FILE)
    if info is None:
      raise FileNotFoundError(
          f'{os.path.join(workdir, run_records.DATASET_FILE)} does not exist')
    model = steps.create_model(config, info['num_classes'])
    template = steps.create_train_state(
        config, model, jax.random.PRNGKey(0), tuple(info['image_shape']),
        steps_per_epoch=1)
    manager = checkpoints.manager(workdir, create=False)
    try:
      state = checkpoints.restore(manager, template, step)
    finally:
      manager.close()
    return cls(config, state.variables, info['class_names'],
               info['image_shape'], info['image_dtype'], bound)

  @property
  def images_are_unit_range(self) -> bool:
    """Image data: the model's inputs are floats in [0, 1]."""
    return np.dtype(self.image_dtype) == np.uint8

  def check_inputs(self, inputs) -> jax.Array:
    """The inputs as float32, or a ValueError saying what is wrong."""
    dtype = np.asarray(inputs).dtype if not hasattr(inputs, 'dtype') else (
        inputs.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
      hint = (' (convert uint8 images with cll_jax.data.to_float, i.e. '
              'x / 255, as training does)' if self.images_are_unit_range
              else '')
      raise ValueError(f'inputs must be floating point, got dtype {dtype}'
                       f'{hint}')
    shape = tuple(np.shape(inputs))
    if shape[1:] != self.image_shape:
      raise ValueError(
          f'inputs must have shape (B, {", ".join(map(str, self.image_shape))})'
          f' as in training, got {shape}')
    x = np.asarray(inputs, np.float32)
    if not np.all(np.isfinite(x)):
      raise ValueError(f'inputs hold {int((~np.isfinite(x)).sum())} '
                       'non-finite values')
    if self.images_are_unit_range and (x.min() < 0 or x.max() > 1):
      raise ValueError(
          f'images must lie in [0, 1] as in training, got values from '
          f'{x.min()} to {x.max()}')
    return jnp.asarray(x)

  def _logits_and_errors(self, x: jax.Array, batch_size: int):
    with forward_error.precision_scope(self.precision):
      parts = [self._forward(self.variables, x[i:i + batch_size],
                             self.bounds['logit_error'])
               for i in range(0, len(x), batch_size)]
      # Inside the scope: outside it jnp would cast float64 to float32.
      logits = jnp.concatenate([out.logits for out, _ in parts])
      errors = jnp.concatenate([error for _, error in parts])
    return logits, errors

  def logits(self, inputs, batch_size: int = 500) -> jax.Array:
    """The certification forward pass's logits (in `eval.precision`)."""
    return self._logits_and_errors(self.check_inputs(inputs), batch_size)[0]

  def certify(self, inputs, labels=None, radii: Sequence[float] | None = None,
              batch_size: int = 500) -> CertificationResult:
    """Predictions, certified radii and (with labels) CRA for `inputs`."""
    x = self.check_inputs(inputs)
    if not len(x):
      raise ValueError('no inputs to certify')
    radii = self.radii if radii is None else tuple(float(r) for r in radii)
    logits, errors = self._logits_and_errors(x, batch_size)
    k = self.pairwise_lipschitz
    with forward_error.precision_scope(self.precision):
      radius = np.asarray(certify.certified_radius(logits, k, errors))
      certified = np.stack([np.asarray(
          certify.is_certified(logits, k, r, errors)) for r in radii])
    predictions = np.argmax(np.asarray(logits), -1)
    names = tuple(self.class_names[int(p)] for p in predictions)
    cra = accuracy = None
    if labels is not None:
      labels = np.asarray(labels)
      if labels.shape != (len(x),):
        raise ValueError(f'labels must have shape ({len(x)},), got '
                         f'{labels.shape}')
      with forward_error.precision_scope(self.precision):
        counts = certify.certified_counts(logits, jnp.asarray(labels), k,
                                          radii, margin_error=errors)
      cra = dict(zip(radii, map(float, counts.certified_accuracy())))
      accuracy = float(counts.clean_accuracy())
    return CertificationResult(predictions, names, radius, labels, radii,
                               certified, cra, accuracy)


# --------------------------------------------------------------------------
# Reading inputs from files


def _to_model_domain(array: np.ndarray, image_dtype: str) -> np.ndarray:
  if np.dtype(image_dtype) == np.uint8 and array.dtype == np.uint8:
    return array.astype(np.float32) / 255.0  # `data.to_float`, as training.
  return array


def load_inputs(path: str, certifier: Certifier
                ) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
  """Inputs, labels (or None) and names from a file, folder or 'test'.

  Args:
    path: an image file; a folder of images (its class subfolders, named as
      the run's classes, give labels); a `.npy` array or an `.npz` with
      `images` (or `x`) and optional `labels` (or `y`); or 'test' for the
      run's own test split (`config.data`).
    certifier: the model the inputs are for (shape, class names, domain).

  Returns:
    (inputs in the model's domain, labels or None, one name per input).
  """
  if path == 'test':
    from cll_jax import train  # pylint: disable=g-import-not-at-top
    dataset = train.load_dataset(certifier.config)
    x = _to_model_domain(dataset.test_images, certifier.image_dtype)
    return x, dataset.test_labels, [f'test/{i}' for i in range(len(x))]
  if not os.path.exists(path):
    raise FileNotFoundError(f'--images={path!r} does not exist')
  if path.endswith('.npy'):
    x = np.load(path, allow_pickle=False)
    return (_to_model_domain(x, certifier.image_dtype), None,
            [f'{os.path.basename(path)}[{i}]' for i in range(len(x))])
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as f:
      key = next((k for k in ('images', 'image', 'x') if k in f.files), None)
      if key is None:
        raise ValueError(f'{path!r} holds {f.files}; expected an array '
                         "'images' (or 'x') and optionally 'labels'")
      x = f[key]
      label_key = next((k for k in ('labels', 'label', 'y') if k in f.files),
                       None)
      labels = None if label_key is None else f[label_key].astype(np.int32)
    return (_to_model_domain(x, certifier.image_dtype), labels,
            [f'{os.path.basename(path)}[{i}]' for i in range(len(x))])
  if os.path.isfile(path):
    files, labels = [path], None
  else:
    files, labels = _folder_images(path, certifier.class_names)
  channels = 1 if certifier.image_shape[-1:] == (1,) else 3
  images = [image_folder.read_image(f, channels) for f in files]
  for f, image in zip(files, images):
    if image.shape != certifier.image_shape:
      raise ValueError(f'image {f!r} has shape {image.shape}; the model was '
                       f'trained on {certifier.image_shape}')
  x = np.stack(images).astype(np.float32) / 255.0
  return x, labels, files


def _folder_images(folder: str, class_names: Sequence[str]
                   ) -> tuple[list[str], np.ndarray | None]:
  def images_in(d):
    return sorted(os.path.join(d, f) for f in os.listdir(d)
                  if f.lower().endswith(IMAGE_EXTENSIONS)
                  and not f.startswith('.'))

  subdirs = sorted(d for d in os.listdir(folder)
                   if os.path.isdir(os.path.join(folder, d))
                   and not d.startswith('.'))
  if subdirs:
    unknown = [d for d in subdirs if d not in class_names]
    if unknown:
      raise ValueError(
          f'{folder!r} has class folders {unknown[:5]} that are not classes '
          f'of the trained model ({list(class_names)[:10]}...)')
    files, labels = [], []
    for name in subdirs:
      found = images_in(os.path.join(folder, name))
      files += found
      labels += [class_names.index(name)] * len(found)
    if files:
      return files, np.asarray(labels, np.int32)
  files = images_in(folder)
  if not files:
    raise ValueError(f'no {IMAGE_EXTENSIONS} images in {folder!r}')
  return files, None


def result_rows(result: CertificationResult,
                names: Sequence[str]) -> list[dict[str, Any]]:
  """One dict per input: name, prediction, radius, label, certificates."""
  rows = []
  for i, name in enumerate(names):
    row = {'input': name, 'predicted': int(result.predictions[i]),
           'class_name': result.class_names[i],
           'certified_radius': float(result.radius[i])}
    if result.labels is not None:
      row['label'] = int(result.labels[i])
      row['correct'] = bool(result.predictions[i] == result.labels[i])
    for r, ok in zip(result.radii, result.certified[:, i]):
      row[f'certified_{r:.4f}'] = bool(ok)
    rows.append(row)
  return rows
