"""Host-side batching: numpy indexing of in-memory arrays.

Training batches follow a permutation seeded by (seed, epoch), so a run is
reproducible and resumable at an epoch boundary; the ragged remainder of an
epoch is dropped (every step sees a full batch, one compiled shape).
Evaluation batches never drop an example: the last one is zero-padded to the
full batch size and a mask marks the real examples.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


def _check_pair(images: np.ndarray, labels: np.ndarray) -> None:
  if len(images) != len(labels):
    raise ValueError(
        f'images and labels differ in length: {len(images)} vs {len(labels)}')


def _check_batch_size(batch_size: int) -> None:
  if int(batch_size) != batch_size or batch_size <= 0:
    raise ValueError(f'batch_size must be a positive integer, got {batch_size}')


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full training batches per epoch, floor(num_examples / batch_size).

  Raises:
    ValueError: batch_size <= 0 or larger than the data set (no step at all).
  """
  _check_batch_size(batch_size)
  if num_examples < batch_size:
    raise ValueError(
        f'batch_size {batch_size} exceeds the number of examples '
        f'{num_examples}: an epoch would have no full batch')
  return num_examples // batch_size


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The example order of `epoch`, a permutation seeded by (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
                  seed: int, epoch: int
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields the `steps_per_epoch` full batches of one shuffled epoch.

  Args:
    images: (N, ...) array.
    labels: (N,) array.
    batch_size: examples per batch.
    seed: shuffling seed (the same on every host if data is replicated).
    epoch: epoch number; each epoch has its own permutation.

  Yields:
    (images[idx], labels[idx]) with idx the next `batch_size` entries of
    `epoch_permutation(N, seed, epoch)`; the last N mod batch_size examples of
    the permutation are skipped this epoch.
  """
  _check_pair(images, labels)
  steps = steps_per_epoch(len(images), batch_size)
  perm = epoch_permutation(len(images), seed, epoch)
  for s in range(steps):
    idx = perm[s * batch_size:(s + 1) * batch_size]
    yield images[idx], labels[idx]


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
                 num_batches: int | None = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Yields every example once in order, in batches of exactly `batch_size`.

  Args:
    images: (N, ...) array.
    labels: (N,) array.
    batch_size: examples per batch.
    num_batches: yield this many batches, the ones past the data all padding
      (every host of a multi-host evaluation must run the same number of
      steps); None: ceil(N / batch_size). Must be at least that.

  Yields:
    (images, labels, mask): the last batch is zero-padded to `batch_size`;
    mask is a (batch_size,) bool array, True for real examples. Weight
    per-example metrics by mask (and divide by mask.sum()).
  """
  _check_pair(images, labels)
  _check_batch_size(batch_size)
  n = len(images)
  needed = -(-n // batch_size)
  if num_batches is None:
    num_batches = needed
  elif num_batches < needed:
    raise ValueError(
        f'num_batches={num_batches} batches of {batch_size} cannot hold {n} '
        'examples')
  for b in range(num_batches):
    start = b * batch_size
    x, y = images[start:start + batch_size], labels[start:start + batch_size]
    real = len(x)
    mask = np.arange(batch_size) < real
    if real < batch_size:
      x = np.concatenate(
          [x, np.zeros((batch_size - real,) + images.shape[1:], images.dtype)])
      y = np.concatenate([y, np.zeros((batch_size - real,), labels.dtype)])
    yield x, y, mask


def host_shard(images: np.ndarray, labels: np.ndarray, process_index: int,
               process_count: int, seed: int | None = 0
               ) -> tuple[np.ndarray, np.ndarray]:
  """This host's contiguous share of the training set.

  Every host keeps floor(N / process_count) examples, so all hosts run the
  same number of steps (unequal step counts would deadlock the collectives);
  up to process_count - 1 examples are left out. Loaders return examples
  grouped by class, so by default the split is taken from a fixed permutation
  (seeded by `seed`, identical on every host) to give each host all classes;
  seed=None shards the arrays as they are.

  Args:
    images: (N, ...) array.
    labels: (N,) array.
    process_index: this host, `jax.process_index()`.
    process_count: number of hosts, `jax.process_count()`.
    seed: seed of the shared permutation, or None for none.

  Returns:
    (images_shard, labels_shard), shard k holding positions
    [k * N // P' .. (k + 1) * N // P') of the (permuted) arrays, with
    N // P' = floor(N / process_count).
  """
  _check_pair(images, labels)
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
        f'need 0 <= process_index < process_count, got process_index='
        f'{process_index}, process_count={process_count}')
  per_host = len(images) // process_count
  if per_host == 0:
    raise ValueError(
        f'{len(images)} examples cannot be shared by {process_count} hosts')
  idx = np.arange(process_index * per_host, (process_index + 1) * per_host)
  if seed is not None:
    idx = np.sort(np.random.default_rng(seed).permutation(len(images))[idx])
  return images[idx], labels[idx]
