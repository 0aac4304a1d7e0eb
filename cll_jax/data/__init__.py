"""Data sets, batching and augmentation for cll_jax.

A data set is loaded once into host memory as numpy arrays (images uint8
NHWC, labels int32; two-moons: float32 points (N, 2)); batches are numpy
indexing (`train_batches`, `eval_batches`); conversion to float and
augmentation run on device inside jit (`to_float`, `augment_batch`).

  ds = load_dataset('image_folder',
                    root='/work/shared/datasets/cifar10_jpeg.tar.gz')
  for x, y in train_batches(ds.train_images, ds.train_labels, 128, seed, ep):
    x = augment_batch(rng, to_float(x))    # inside the jitted step

Registered names (`DATASETS`): 'moons', 'cifar10', 'cifar100', 'mnist',
'image_folder', 'tiny_imagenet'.
"""

from __future__ import annotations

import functools
from typing import Callable

from cll_jax.data.augment import augment_batch
from cll_jax.data.augment import augment_image
from cll_jax.data.augment import to_float
from cll_jax.data.dataset import Dataset
from cll_jax.data.image_folder import load_image_folder
from cll_jax.data.moons import load_moons
from cll_jax.data.moons import make_moons
from cll_jax.data.pipeline import epoch_permutation
from cll_jax.data.pipeline import eval_batches
from cll_jax.data.pipeline import host_shard
from cll_jax.data.pipeline import steps_per_epoch
from cll_jax.data.pipeline import train_batches
from cll_jax.data.tfds_loader import load_tfds
from cll_jax.data.tiny_imagenet import download_tiny_imagenet
from cll_jax.data.tiny_imagenet import load_tiny_imagenet
from cll_jax.data.tiny_imagenet import TINY_IMAGENET_URL

DATASETS: dict[str, Callable[..., Dataset]] = {
    'moons': load_moons,
    'cifar10': functools.partial(load_tfds, 'cifar10'),
    'cifar100': functools.partial(load_tfds, 'cifar100'),
    'mnist': functools.partial(load_tfds, 'mnist'),
    'image_folder': load_image_folder,
    'tiny_imagenet': load_tiny_imagenet,
}


def load_dataset(name: str, **kwargs) -> Dataset:
  """Loads the registered data set `name` with the loader's keyword arguments.

  Raises:
    ValueError: unknown `name` (the message lists the known ones).
  """
  if name not in DATASETS:
    raise ValueError(
        f'unknown dataset {name!r}; known: {", ".join(sorted(DATASETS))}')
  return DATASETS[name](**kwargs)


__all__ = [
    'DATASETS', 'Dataset', 'TINY_IMAGENET_URL', 'augment_batch',
    'augment_image', 'download_tiny_imagenet', 'epoch_permutation',
    'eval_batches', 'host_shard', 'load_dataset', 'load_image_folder',
    'load_moons', 'load_tfds', 'load_tiny_imagenet', 'make_moons',
    'steps_per_epoch', 'to_float', 'train_batches',
]
