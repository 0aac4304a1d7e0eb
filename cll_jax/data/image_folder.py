"""Image-folder data sets: `root/<split>/<class>/*.jpg|jpeg|png`.

Class folders sorted by name give the label indices (as torchvision's
`ImageFolder`); for the shared CIFAR-10 copy (`cifar10_jpeg.tar.gz`) the
sorted order airplane, automobile, bird, cat, deer, dog, frog, horse, ship,
truck is the official CIFAR-10 label order. `root` may be a folder or a
.tar.gz/.tgz/.tar/.zip archive of one (extracted into the cache once).
Decoded arrays are cached as `.npz` (see `cll_jax.data.cache`), so only the
first load pays for decoding.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
from typing import Sequence

import numpy as np
import tqdm
from PIL import Image

from cll_jax.data import cache
from cll_jax.data.dataset import Dataset

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')


def default_num_workers() -> int:
  return max(1, min(2, os.cpu_count() or 1))


def read_image(path: str, channels: int = 3) -> np.ndarray:
  """One image file as uint8 (H, W, channels), channels 3 (RGB) or 1.

  Raises:
    ValueError: naming the file, when it is truncated or not an image.
  """
  # PIL releases the GIL while decoding, so threads decode in parallel.
  # Grayscale/palette/CMYK files (Tiny-ImageNet has some) become RGB.
  try:
    with Image.open(path) as image:
      if channels == 1:
        return np.asarray(image.convert('L'), dtype=np.uint8)[..., None]
      return np.asarray(image.convert('RGB'), dtype=np.uint8)
  except (OSError, ValueError) as e:  # truncated or not an image
    raise ValueError(f'cannot decode image file {path!r}: {e}') from e


def decode_images(paths: Sequence[str], num_workers: int | None = None
                  ) -> np.ndarray:
  """Decodes image files into one uint8 (N, H, W, 3) array.

  Args:
    paths: image files, all of the same height and width.
    num_workers: decoding threads (default: min(2, cpu count)).

  Returns:
    (len(paths), H, W, 3) uint8 array in the order of `paths`.

  Raises:
    ValueError: the images differ in size (naming the first odd file), or
      `paths` is empty.
  """
  if not paths:
    raise ValueError('no image files to decode')
  first = read_image(paths[0])
  out = np.empty((len(paths),) + first.shape, np.uint8)
  out[0] = first

  def work(chunk: range) -> None:
    for i in chunk:
      image = read_image(paths[i])
      if image.shape != first.shape:
        raise ValueError(
            f'image {paths[i]!r} has shape {image.shape}, but {paths[0]!r} '
            f'has shape {first.shape}; all images must have the same size')
      out[i] = image

  num_workers = num_workers or default_num_workers()
  chunk = 256
  chunks = [range(s, min(s + chunk, len(paths)))
            for s in range(1, len(paths), chunk)]
  # A first decode of a whole data set takes tens of seconds: show it
  # (tqdm turns itself off when stderr is not a terminal).
  bar = tqdm.tqdm(total=len(paths), initial=1, unit='image',
                  desc='decoding images (once; cached afterwards)',
                  disable=None if len(paths) > 5000 else True, leave=False)
  with bar:
    if num_workers == 1:
      for c in chunks:
        work(c)
        bar.update(len(c))
    else:
      with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
        for c, f in [(c, pool.submit(work, c)) for c in chunks]:
          f.result()  # Re-raises the first decoding error.
          bar.update(len(c))
  return out


def _list_split(split_dir: pathlib.Path) -> tuple[list[str], list[str]]:
  """(class names sorted, image paths per class in sorted order)."""
  if not split_dir.is_dir():
    raise FileNotFoundError(f'split folder {str(split_dir)!r} does not exist')
  classes = sorted(d.name for d in split_dir.iterdir()
                   if d.is_dir() and not d.name.startswith('.'))
  if not classes:
    raise ValueError(f'split folder {str(split_dir)!r} has no class folders')
  return classes, [str(split_dir / c) for c in classes]


def _images_in(folder: str) -> list[str]:
  return sorted(
      os.path.join(folder, f) for f in os.listdir(folder)
      if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.'))


def _find_root(folder: pathlib.Path, train_split: str) -> pathlib.Path:
  """`folder`, or its single subfolder when the archive wraps the splits."""
  if (folder / train_split).is_dir():
    return folder
  subdirs = [d for d in folder.iterdir()
             if d.is_dir() and not d.name.startswith(('.', '__MACOSX'))]
  if len(subdirs) == 1 and (subdirs[0] / train_split).is_dir():
    return subdirs[0]
  raise FileNotFoundError(
      f'no {train_split!r} split folder in {str(folder)!r}')


def _decode_split(split_dir: pathlib.Path, classes: Sequence[str],
                  num_workers: int | None) -> tuple[np.ndarray, np.ndarray]:
  split_classes, _ = _list_split(split_dir)
  unknown = sorted(set(split_classes) - set(classes))
  if unknown:
    raise ValueError(
        f'{str(split_dir)!r} has classes {unknown[:5]} not in the train split')
  paths, labels = [], []
  for label, name in enumerate(classes):
    folder = split_dir / name
    if folder.is_dir():
      files = _images_in(str(folder))
      paths += files
      labels += [label] * len(files)
  if not paths:
    raise ValueError(f'no {IMAGE_EXTENSIONS} images under {str(split_dir)!r}')
  return decode_images(paths, num_workers), np.asarray(labels, np.int32)


def load_image_folder(root: cache.PathLike, train_split: str = 'train',
                      test_split: str = 'test',
                      cache_dir: cache.PathLike | None = None,
                      num_workers: int | None = None) -> Dataset:
  """Loads `root/<split>/<class>/*.jpg|jpeg|png` into memory (uint8 NHWC).

  Args:
    root: the folder, or a .tar.gz/.tgz/.tar/.zip archive of it (the splits
      may also sit inside one top-level folder of the archive).
    train_split: name of the training split folder.
    test_split: name of the test split folder.
    cache_dir: where extracted archives and decoded arrays are cached
      (default `$CLL_JAX_CACHE` or `~/.cache/cll_jax`).
    num_workers: decoding threads for the first load.

  Returns:
    A `Dataset`; labels are indices into the sorted class folder names of the
    train split.

  Raises:
    FileNotFoundError: `root` or a split folder does not exist.
    ValueError: empty splits, test classes unknown to train, mixed sizes.
  """
  root = pathlib.Path(root).expanduser()
  if not root.exists():
    raise FileNotFoundError(f'image folder root {str(root)!r} does not exist')
  cache_root = cache.resolve_cache_dir(cache_dir)
  key = cache.source_key(root, 'image_folder', train_split, test_split)
  npz = cache_root / f'image_folder-{root.name}-{key}.npz'
  arrays = cache.load_npz(npz)
  if arrays is None:
    folder = (cache.extract_archive(root, cache_root)
              if root.is_file() else root)
    folder = _find_root(folder, train_split)
    classes, _ = _list_split(folder / train_split)
    train_images, train_labels = _decode_split(folder / train_split, classes,
                                               num_workers)
    test_images, test_labels = _decode_split(folder / test_split, classes,
                                             num_workers)
    arrays = dict(train_images=train_images, train_labels=train_labels,
                  test_images=test_images, test_labels=test_labels,
                  class_names=np.asarray(classes, dtype=str))
    cache.save_npz(npz, arrays)
  names = tuple(str(c) for c in arrays['class_names'])
  return Dataset(arrays['train_images'], arrays['train_labels'],
                 arrays['test_images'], arrays['test_labels'],
                 num_classes=len(names), class_names=names)
