"""Batching, evaluation padding, host sharding and the Dataset container."""

import numpy as np
import pytest

from cll_jax import data


def _toy(n):
  images = np.arange(n, dtype=np.int64).reshape(n, 1, 1, 1) * np.ones(
      (1, 2, 2, 3), np.int64)
  return images.astype(np.uint8), np.arange(n, dtype=np.int32)


def test_steps_per_epoch():
  assert data.steps_per_epoch(10, 3) == 3
  assert data.steps_per_epoch(9, 3) == 3
  for bad in (0, -1, 11):
    with pytest.raises(ValueError, match=str(bad)):
      data.steps_per_epoch(10, bad)


def test_train_batches_are_a_seeded_permutation():
  x, y = _toy(10)
  batches = list(data.train_batches(x, y, 3, seed=0, epoch=0))
  assert len(batches) == 3
  seen = []
  for bx, by in batches:
    assert bx.shape == (3, 2, 2, 3) and by.shape == (3,)
    np.testing.assert_array_equal(bx[:, 0, 0, 0], by)  # Pairs stay together.
    seen += by.tolist()
  assert len(set(seen)) == 9  # Disjoint; one example dropped this epoch.
  perm = data.epoch_permutation(10, 0, 0)
  np.testing.assert_array_equal(seen, perm[:9])
  again = [b[1] for b in data.train_batches(x, y, 3, seed=0, epoch=0)]
  np.testing.assert_array_equal(np.concatenate(again), seen)
  other_epoch = np.concatenate(
      [b[1] for b in data.train_batches(x, y, 3, seed=0, epoch=1)])
  other_seed = np.concatenate(
      [b[1] for b in data.train_batches(x, y, 3, seed=1, epoch=0)])
  assert not np.array_equal(other_epoch, seen)
  assert not np.array_equal(other_seed, seen)
  # Over many epochs every example is visited.
  visited = set()
  for epoch in range(20):
    for _, by in data.train_batches(x, y, 3, seed=0, epoch=epoch):
      visited |= set(by.tolist())
  assert visited == set(range(10))


def test_eval_batches_pad_and_mask():
  x, y = _toy(10)
  batches = list(data.eval_batches(x, y, 4))
  assert len(batches) == 3
  for bx, by, m in batches:
    assert bx.shape == (4, 2, 2, 3) and by.shape == (4,) and m.shape == (4,)
    assert m.dtype == bool
  np.testing.assert_array_equal(batches[-1][2], [True, True, False, False])
  assert not batches[-1][0][2:].any()
  real = np.concatenate([by[m] for _, by, m in batches])
  np.testing.assert_array_equal(real, y)  # Every example once, in order.
  # Exact multiple: no padding batch.
  assert len(list(data.eval_batches(x[:8], y[:8], 4))) == 2
  with pytest.raises(ValueError, match='length'):
    next(data.eval_batches(x, y[:5], 4))


def test_host_shard():
  x, y = _toy(10)
  shards = [data.host_shard(x, y, k, 3, seed=None) for k in range(3)]
  for k, (sx, sy) in enumerate(shards):
    np.testing.assert_array_equal(sy, np.arange(3 * k, 3 * k + 3))
    np.testing.assert_array_equal(sx[:, 0, 0, 0], sy)
  shards = [data.host_shard(x, y, k, 3) for k in range(3)]
  all_y = np.concatenate([s[1] for s in shards])
  assert len(set(all_y.tolist())) == 9  # Disjoint, equal sizes.
  for sx, sy in shards:
    np.testing.assert_array_equal(sx[:, 0, 0, 0], sy)
  # Class-sorted labels (as loaders return them): each host gets all classes.
  labels = np.repeat(np.arange(4, dtype=np.int32), 100)
  for k in range(4):
    _, sy = data.host_shard(np.zeros((400, 1)), labels, k, 4)
    assert len(sy) == 100 and set(sy.tolist()) == {0, 1, 2, 3}
  for bad in [(3, 3), (-1, 3), (0, 0)]:
    with pytest.raises(ValueError, match='process_index'):
      data.host_shard(x, y, *bad)


def test_dataset_checks():
  x, y = _toy(4)
  ds = data.Dataset(x, y, x, y, num_classes=4, class_names=list('abcd'))
  assert ds.image_shape == (2, 2, 3)
  assert ds.class_names == ('a', 'b', 'c', 'd')
  with pytest.raises(ValueError, match='train_labels'):
    data.Dataset(x, y[:3], x, y, num_classes=4, class_names='abcd')
  with pytest.raises(ValueError, match=r'\[0, 3\)'):
    data.Dataset(x, y, x, y, num_classes=3, class_names='abc')
  with pytest.raises(ValueError, match='int32'):
    data.Dataset(x, y.astype(np.int64), x, y, num_classes=4,
                 class_names='abcd')
