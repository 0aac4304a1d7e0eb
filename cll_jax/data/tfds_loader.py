"""TFDS image classification data sets (cifar10, cifar100, mnist) without TF.

Reading goes through `tfds.data_source`, which serves the prepared
`array_record` files with random access and decodes images with PIL/NumPy: it
needs the `array_record` package but not TensorFlow. *Preparing* a data set
(download=True when it is not yet in `data_dir`) runs the TFDS builder, whose
CIFAR/MNIST generators use `tf.io.gfile`, so that one step needs TensorFlow
(`pip install tensorflow-cpu`), or a `data_dir` prepared elsewhere.

The decoded splits are cached as `.npz` keyed by the data set's full name,
data folder and split sizes.
"""

from __future__ import annotations

import numpy as np

from cll_jax.data import cache
from cll_jax.data.dataset import Dataset


def _read_split(source) -> tuple[np.ndarray, np.ndarray]:
  n = len(source)
  if n == 0:
    raise ValueError('empty TFDS split')
  first = source[0]
  image = np.asarray(first['image'])
  images = np.empty((n,) + image.shape, np.uint8)
  labels = np.empty((n,), np.int32)
  for i in range(n):
    example = first if i == 0 else source[i]
    images[i] = example['image']
    labels[i] = example['label']
  return images, labels


_OFFLINE_HINT = {
    'cifar10': " For CIFAR-10 the offline JPEG copy needs no TFDS: "
               "'experiments/cifar10_4c3f.py:data=offline'.",
}


def _explain_failure(name: str, data_dir, download: bool,
                     error: Exception) -> Exception:
  """A readable error for TFDS's own (an unprepared or unreachable set)."""
  where = data_dir or '~/tensorflow_datasets'
  hint = _OFFLINE_HINT.get(name, '')
  if not download:
    return FileNotFoundError(
        f'TFDS data set {name!r} is not prepared in {where} ({error!r}). '
        'Prepare it once with --config.data.kwargs.download=True (needs '
        "internet and TensorFlow: pip install '.[prepare]'), or point "
        '--config.data.kwargs.data_dir at a prepared copy.' + hint)
  if isinstance(error, ImportError):
    return ImportError(
        f'preparing TFDS data set {name!r} runs its TensorFlow builder: '
        f"pip install '.[prepare]' ({error}).{hint}")
  return ConnectionError(
      f'preparing TFDS data set {name!r} in {where} failed: {error!r}. '
      'Without access to the dataset hosts, prepare it on another machine '
      'and copy the folder, then set --config.data.kwargs.data_dir.' + hint)


def load_tfds(name: str, data_dir: cache.PathLike | None = None,
              download: bool = False, cache_dir: cache.PathLike | None = None,
              train_split: str = 'train', test_split: str = 'test'
              ) -> Dataset:
  """Loads a TFDS image classification data set into memory (uint8 NHWC).

  Args:
    name: TFDS name, e.g. 'cifar10', 'cifar100' (fine labels), 'mnist'.
    data_dir: TFDS data folder (default: TFDS's, `~/tensorflow_datasets`).
    download: prepare the data set if missing (the normal TFDS download;
      needs TensorFlow for generation, see the module docstring).
    cache_dir: cache for the decoded arrays.
    train_split: TFDS split used for training.
    test_split: TFDS split used for testing.

  Returns:
    A `Dataset`; images keep their TFDS shape (MNIST: (28, 28, 1)).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    sources = {
        split: tfds.data_source(name, split=split, data_dir=data_dir,
                                download=download)
        for split in (train_split, test_split)
    }
  except Exception as e:  # pylint: disable=broad-except
    raise _explain_failure(name, data_dir, download, e) from e
  info = sources[train_split].dataset_info
  label = info.features['label']
  key = cache.hash_key(
      'tfds', info.full_name, str(info.data_dir), train_split, test_split,
      len(sources[train_split]), len(sources[test_split]))
  npz = cache.resolve_cache_dir(cache_dir) / (
      f'tfds-{name.replace("/", "_")}-{key}.npz')
  arrays = cache.load_npz(npz)
  if arrays is None:
    train_images, train_labels = _read_split(sources[train_split])
    test_images, test_labels = _read_split(sources[test_split])
    arrays = dict(train_images=train_images, train_labels=train_labels,
                  test_images=test_images, test_labels=test_labels)
    cache.save_npz(npz, arrays)
  return Dataset(arrays['train_images'], arrays['train_labels'],
                 arrays['test_images'], arrays['test_labels'],
                 num_classes=label.num_classes,
                 class_names=tuple(label.names))
