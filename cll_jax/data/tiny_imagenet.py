"""Tiny-ImageNet-200 (64x64, 200 classes) from its release zip or folder.

Release layout (top folder `tiny-imagenet-200/` inside the zip):

  wnids.txt                        the 200 WordNet ids
  words.txt                        "<wnid>\\t<comma separated names>"
  train/<wnid>/images/*.JPEG       500 per class (100,000)
  val/images/*.JPEG                50 per class (10,000)
  val/val_annotations.txt          "<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>"

The official val split serves as the test split (the test split of the
release has no labels). Label indices follow the sorted wnids (as an
`ImageFolder` over `train/` would), class names are the words.txt entries.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sys
import tempfile
import urllib.request

import numpy as np

from cll_jax.data import cache
from cll_jax.data.dataset import Dataset
from cll_jax.data.image_folder import IMAGE_EXTENSIONS, decode_images

TINY_IMAGENET_URL = 'http://cs231n.stanford.edu/tiny-imagenet-200.zip'


def _open_url(url: str):
  try:
    return urllib.request.urlopen(url)
  except OSError as e:  # URLError, HTTPError, socket errors
    raise ConnectionError(
        f'cannot download {url}: {e}. Machines without access to dataset '
        'hosts must fetch tiny-imagenet-200.zip elsewhere and pass its path '
        'as --config.data.kwargs.root (zip or extracted folder).') from e


def download_tiny_imagenet(dest_dir: cache.PathLike,
                           url: str = TINY_IMAGENET_URL, *,
                           sha256: str | None = None,
                           size: int | None = None,
                           progress: bool = True) -> pathlib.Path:
  """Downloads `url` into `dest_dir/<basename of url>` (once).

  The download streams into a temporary file in `dest_dir` that is moved into
  place with `os.replace` only after it is complete and verified, so an
  interrupted download never leaves a truncated zip under the final name.

  Args:
    dest_dir: target folder (created if missing).
    url: source URL (any scheme urllib opens, e.g. http(s), file).
    sha256: expected hex sha256 of the file, or None to skip the check.
    size: expected size in bytes, or None to skip the check.
    progress: print a progress line to stderr.

  Returns:
    Path of the downloaded (or already present) file.

  Raises:
    ValueError: size or checksum mismatch (the bad file is not kept).
  """
  dest_dir = pathlib.Path(dest_dir).expanduser()
  dest_dir.mkdir(parents=True, exist_ok=True)
  name = os.path.basename(urllib.request.urlparse(url).path) or 'download'
  target = dest_dir / name
  if target.exists():
    _verify(target, sha256, size)
    return target
  fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f'.{name}.', suffix='.part')
  try:
    digest = hashlib.sha256()
    done = 0
    with os.fdopen(fd, 'wb') as out, _open_url(url) as response:
      total = int(response.headers.get('Content-Length') or 0)
      shown = -1
      while chunk := response.read(1 << 20):
        out.write(chunk)
        digest.update(chunk)
        done += len(chunk)
        if progress:
          pct = int(100 * done / total) if total else -1
          if pct != shown or not total:
            shown = pct
            msg = f'{pct:3d}% ' if total else ''
            print(f'\rdownloading {url}: {msg}{done / 2**20:.1f} MiB',
                  end='', file=sys.stderr, flush=True)
    if progress:
      print(file=sys.stderr)
    _check(url, done, digest.hexdigest(), sha256, size)
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return target


def _check(what, got_size: int, got_sha: str | None, sha256, size) -> None:
  if size is not None and got_size != size:
    raise ValueError(f'{what} has {got_size} bytes, expected {size}')
  if sha256 is not None and got_sha != sha256.lower():
    raise ValueError(f'{what} has sha256 {got_sha}, expected {sha256}')


def _verify(path: pathlib.Path, sha256, size) -> None:
  got_sha = None
  if sha256 is not None:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
      while chunk := f.read(1 << 20):
        digest.update(chunk)
    got_sha = digest.hexdigest()
  _check(str(path), path.stat().st_size, got_sha, sha256, size)


def _find_release_root(folder: pathlib.Path) -> pathlib.Path:
  if (folder / 'wnids.txt').is_file():
    return folder
  for sub in sorted(folder.iterdir()):
    if sub.is_dir() and (sub / 'wnids.txt').is_file():
      return sub
  raise FileNotFoundError(
      f'no wnids.txt in {str(folder)!r} or its subfolders: not a '
      'Tiny-ImageNet release')


def _images(folder: pathlib.Path) -> list[str]:
  if not folder.is_dir():
    raise FileNotFoundError(f'folder {str(folder)!r} does not exist')
  return sorted(str(p) for p in folder.iterdir()
                if p.name.lower().endswith(IMAGE_EXTENSIONS))


def _decode_release(root: pathlib.Path, num_workers: int | None
                    ) -> dict[str, np.ndarray]:
  wnids = sorted({w.strip() for w in (root / 'wnids.txt').read_text().split()})
  index = {w: i for i, w in enumerate(wnids)}
  words = {}
  if (root / 'words.txt').is_file():
    for line in (root / 'words.txt').read_text().splitlines():
      wnid, _, name = line.partition('\t')
      words[wnid.strip()] = name.strip()
  train_paths, train_labels = [], []
  for wnid in wnids:
    files = _images(root / 'train' / wnid / 'images')
    train_paths += files
    train_labels += [index[wnid]] * len(files)
  val_labels_by_file = {}
  for line in (root / 'val' / 'val_annotations.txt').read_text().splitlines():
    if line.strip():
      fields = line.split('\t')
      if fields[1] not in index:
        raise ValueError(
            f'val_annotations.txt names wnid {fields[1]!r} not in wnids.txt')
      val_labels_by_file[fields[0]] = index[fields[1]]
  val_paths = _images(root / 'val' / 'images')
  missing = [p for p in val_paths if os.path.basename(p) not in
             val_labels_by_file]
  if missing:
    raise ValueError(f'no annotation for val image {missing[0]!r}')
  return dict(
      train_images=decode_images(train_paths, num_workers),
      train_labels=np.asarray(train_labels, np.int32),
      test_images=decode_images(val_paths, num_workers),
      test_labels=np.asarray(
          [val_labels_by_file[os.path.basename(p)] for p in val_paths],
          np.int32),
      class_names=np.asarray([words.get(w, w) for w in wnids], dtype=str),
      wnids=np.asarray(wnids, dtype=str))


def load_tiny_imagenet(root: cache.PathLike | None = None,
                       download: bool = False,
                       cache_dir: cache.PathLike | None = None,
                       num_workers: int | None = None,
                       url: str = TINY_IMAGENET_URL) -> Dataset:
  """Loads Tiny-ImageNet-200 (uint8 (N, 64, 64, 3); test = official val).

  Args:
    root: the release folder (holding wnids.txt, or a folder holding
      `tiny-imagenet-200/`) or `tiny-imagenet-200.zip`. Default:
      `<cache_dir>/tiny-imagenet-200.zip`.
    download: when `root` is missing, download the zip from `url` (into the
      folder of `root` if it names a .zip, else into `root`).
    cache_dir: cache for the extracted zip and the decoded arrays.
    num_workers: decoding threads for the first load.
    url: download source.

  Returns:
    A `Dataset` with 200 classes, labels indexing the sorted wnids.

  Raises:
    FileNotFoundError: `root` missing (and download=False) or not a release.
  """
  cache_root = cache.resolve_cache_dir(cache_dir)
  root = pathlib.Path(root).expanduser() if root is not None else (
      cache_root / os.path.basename(urllib.request.urlparse(url).path))
  if not root.exists():
    if not download:
      raise FileNotFoundError(
          f'Tiny-ImageNet not found at {str(root)!r} (pass download=True to '
          f'fetch {url})')
    dest = root.parent if root.name.lower().endswith('.zip') else root
    root = download_tiny_imagenet(dest, url)
  key = cache.source_key(root, 'tiny_imagenet')
  npz = cache_root / f'tiny_imagenet-{root.name}-{key}.npz'
  arrays = cache.load_npz(npz)
  if arrays is None:
    folder = cache.extract_archive(root, cache_root) if root.is_file() else root
    arrays = _decode_release(_find_release_root(folder), num_workers)
    cache.save_npz(npz, arrays)
  names = tuple(str(c) for c in arrays['class_names'])
  return Dataset(arrays['train_images'], arrays['train_labels'],
                 arrays['test_images'], arrays['test_labels'],
                 num_classes=len(names), class_names=names)
