"""The in-memory `Dataset` container shared by all loaders."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Dataset:
  """A dataset held in host memory as numpy arrays.

  Images are uint8 NHWC (converted to float [0, 1] on device, see
  `augment.to_float`); for two-moons the "images" are float32 points of shape
  (N, 2). Labels are int32 in [0, num_classes).

  Attributes:
    train_images: (N_train, *image_shape) array.
    train_labels: (N_train,) int32 array.
    test_images: (N_test, *image_shape) array.
    test_labels: (N_test,) int32 array.
    num_classes: number of classes.
    class_names: one name per label index.
  """
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  class_names: tuple[str, ...]

  def __post_init__(self):
    self.class_names = tuple(str(c) for c in self.class_names)
    if len(self.class_names) != self.num_classes:
      raise ValueError(
          f'class_names has {len(self.class_names)} entries, expected '
          f'num_classes={self.num_classes}')
    for split in ('train', 'test'):
      images = getattr(self, f'{split}_images')
      labels = getattr(self, f'{split}_labels')
      if labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f'{split}_images has shape {images.shape} but {split}_labels has '
            f'shape {labels.shape}; expected (N, ...) and (N,)')
      if labels.dtype != np.int32:
        raise ValueError(
            f'{split}_labels must be int32, got dtype {labels.dtype}')
      if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
        raise ValueError(
            f'{split}_labels must lie in [0, {self.num_classes}), got values '
            f'from {labels.min()} to {labels.max()}')
    if self.train_images.shape[1:] != self.test_images.shape[1:]:
      raise ValueError(
          f'train images have shape {self.train_images.shape[1:]} but test '
          f'images have shape {self.test_images.shape[1:]}')

  @property
  def image_shape(self) -> tuple[int, ...]:
    """Shape of one example, e.g. (32, 32, 3) or (2,) for two-moons."""
    return tuple(self.train_images.shape[1:])
