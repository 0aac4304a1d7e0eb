"""On-disk caches: decoded arrays (`.npz`) and extracted archives.

Decoding 50k-100k JPEG/PNG files takes tens of seconds on two cores, so every
loader decodes once and stores the arrays as an uncompressed `.npz` in a cache
directory (default `$CLL_JAX_CACHE` or `~/.cache/cll_jax`). The cache is
bounded: after every write, the least recently used entries are removed
until it holds at most `$CLL_JAX_CACHE_MAX_GB` gigabytes (default 10; CIFAR-10
takes about 0.3 GB, Tiny-ImageNet about 2 GB). Every write goes to
a temporary name in the same directory first and is then moved into place with
`os.replace` (files) or `os.rename` (directories), so a crash or a concurrent
loader never leaves a half-written entry behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import shutil
import tarfile
import tempfile
import zipfile
from typing import Mapping

import numpy as np

PathLike = str | os.PathLike

# Bump when the layout of cached arrays changes, to invalidate old entries.
CACHE_VERSION = 1
ARCHIVE_SUFFIXES = ('.tar.gz', '.tgz', '.tar', '.zip')


DEFAULT_MAX_GB = 10.0


def max_cache_bytes() -> int:
  value = os.environ.get('CLL_JAX_CACHE_MAX_GB', '')
  try:
    gigabytes = float(value) if value else DEFAULT_MAX_GB
  except ValueError:
    raise ValueError(
        f'CLL_JAX_CACHE_MAX_GB must be a number, got {value!r}') from None
  return int(gigabytes * 2**30)


def _size(path: pathlib.Path) -> int:
  if path.is_file():
    return path.stat().st_size
  return sum(f.stat().st_size for f in path.rglob('*') if f.is_file())


def touch(path: pathlib.Path) -> None:
  """Marks an entry as used now (the pruning order)."""
  with contextlib.suppress(OSError):
    os.utime(path)


def prune(cache_dir: PathLike, keep: PathLike | None = None,
          max_bytes: int | None = None) -> list[pathlib.Path]:
  """Removes least recently used entries beyond `max_bytes` (never `keep`).

  Entries are the `.npz` files at the top of the cache and the folders in
  `extracted/`; temporary files of writes in progress are left alone.

  Returns:
    The removed entries.
  """
  root = pathlib.Path(cache_dir)
  max_bytes = max_cache_bytes() if max_bytes is None else max_bytes
  entries = [p for p in root.glob('*.npz')]
  if (root / 'extracted').is_dir():
    entries += [p for p in (root / 'extracted').iterdir()
                if p.is_dir() and not p.name.startswith('.')]
  sized = sorted(((p.stat().st_mtime, _size(p), p) for p in entries),
                 key=lambda t: t[0])
  total = sum(size for _, size, _ in sized)
  keep = None if keep is None else pathlib.Path(keep).resolve()
  removed = []
  for _, size, path in sized:
    if total <= max_bytes:
      break
    if keep is not None and path.resolve() == keep:
      continue
    if path.is_dir():
      shutil.rmtree(path, ignore_errors=True)
    else:
      with contextlib.suppress(OSError):
        path.unlink()
    total -= size
    removed.append(path)
  return removed


def default_cache_dir() -> pathlib.Path:
  return pathlib.Path(
      os.environ.get('CLL_JAX_CACHE', '~/.cache/cll_jax')).expanduser()


def resolve_cache_dir(cache_dir: PathLike | None) -> pathlib.Path:
  path = default_cache_dir() if cache_dir is None else pathlib.Path(
      cache_dir).expanduser()
  path.mkdir(parents=True, exist_ok=True)
  return path


def is_archive(path: PathLike) -> bool:
  return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def _archive_stem(path: pathlib.Path) -> str:
  name = path.name
  for suffix in ARCHIVE_SUFFIXES:
    if name.lower().endswith(suffix):
      return name[:-len(suffix)]
  return name


def source_key(path: PathLike, *extra) -> str:
  """A short hash identifying a source file/folder and its current content.

  Files are keyed by absolute path, size and modification time; folders by
  absolute path and the (relative path, size) of every file below them, so
  adding, removing or replacing an image invalidates the cache.

  Args:
    path: file or directory.
    *extra: further values that change the decoded result (split names...).

  Returns:
    16 hex digits.
  """
  path = pathlib.Path(path).resolve()
  h = hashlib.sha256()
  h.update(f'v{CACHE_VERSION}|{path}|{extra!r}'.encode())
  if path.is_dir():
    for dirpath, dirnames, filenames in os.walk(path):
      dirnames.sort()
      for name in sorted(filenames):
        full = os.path.join(dirpath, name)
        h.update(f'{os.path.relpath(full, path)}:'
                 f'{os.path.getsize(full)};'.encode())
  else:
    st = path.stat()
    h.update(f'{st.st_size}|{st.st_mtime_ns}'.encode())
  return h.hexdigest()[:16]


def hash_key(*parts) -> str:
  """16 hex digits identifying `parts` (for sources that are not paths)."""
  return hashlib.sha256(
      f'v{CACHE_VERSION}|{parts!r}'.encode()).hexdigest()[:16]


def load_npz(path: pathlib.Path) -> dict[str, np.ndarray] | None:
  """The arrays of a cache entry, or None when there is none (or it's bad)."""
  if not path.exists():
    return None
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except (OSError, ValueError, zipfile.BadZipFile):
    return None  # A corrupt entry is rebuilt rather than trusted.
  touch(path)
  return arrays


def save_npz(path: pathlib.Path, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes `arrays` to `path` atomically (temp file + os.replace)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.',
                             suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **arrays)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache may be shared.
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  prune(path.parent, keep=path)


def _safe_members(tar: tarfile.TarFile, dest: str):
  """Regular files and folders only, none escaping `dest` (old Pythons)."""
  dest = os.path.realpath(dest)
  for member in tar.getmembers():
    target = os.path.realpath(os.path.join(dest, member.name))
    if not (member.isfile() or member.isdir()):
      continue
    if os.path.commonpath([dest, target]) != dest:
      raise ValueError(f'archive member {member.name!r} escapes the '
                       'extraction folder')
    yield member


def extract_archive(archive: PathLike,
                    cache_dir: PathLike | None) -> pathlib.Path:
  """Extracts a .tar.gz/.tgz/.tar/.zip archive into the cache, once.

  The archive is unpacked into a temporary folder beside the target and then
  renamed into place, so the extracted folder is either complete or absent.

  Args:
    archive: path of the archive.
    cache_dir: cache root (None: the default).

  Returns:
    The folder holding the archive's content,
    `<cache_dir>/extracted/<stem>-<key>`.

  Raises:
    FileNotFoundError: `archive` does not exist.
    ValueError: unknown archive type.
  """
  archive = pathlib.Path(archive).expanduser()
  if not archive.is_file():
    raise FileNotFoundError(f'archive {str(archive)!r} does not exist')
  if not is_archive(archive):
    raise ValueError(f'{str(archive)!r} is not a .tar.gz/.tgz/.tar/.zip file')
  root = resolve_cache_dir(cache_dir) / 'extracted'
  target = root / f'{_archive_stem(archive)}-{source_key(archive)}'
  if target.is_dir():
    touch(target)
    return target
  root.mkdir(parents=True, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=root, prefix=f'.{target.name}.')
  try:
    if archive.name.lower().endswith('.zip'):
      with zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp)  # zipfile strips absolute and '..' components.
    else:
      with tarfile.open(archive) as tar:
        if hasattr(tarfile, 'data_filter'):
          tar.extractall(tmp, filter='data')
        else:
          tar.extractall(tmp, members=_safe_members(tar, tmp))
    try:
      os.rename(tmp, target)
    except OSError:
      if not target.is_dir():  # Someone else won the race: use theirs.
        raise
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  prune(root.parent, keep=target)
  return target
