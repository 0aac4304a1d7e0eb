"""The 1-Lipschitz families' losses and schedule against direct computations.

CPL's multi-margin hinge is checked against an explicit loop over classes
(PyTorch's `multi_margin_loss` definition, 1/N included), the offset
cross-entropy against log-softmax written out in float64, the triangular
schedule against `np.interp` of CPL's scheduler.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cll_jax import losses
from cll_jax import schedules


def _batch(seed=0, b=7, n=5):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(b, n)).astype(np.float32) * 2,
          rng.integers(0, n, b).astype(np.int32))


@pytest.mark.parametrize('power', [1, 2])
def test_multi_margin_matches_the_class_loop(power):
  logits, labels = _batch()
  margin = 0.7
  got = np.asarray(losses.multi_margin_loss(logits, labels, margin, power))
  want = []
  for z, y in zip(logits.astype(np.float64), labels):
    total = sum(max(0.0, margin - z[y] + z[i]) ** power
                for i in range(len(z)) if i != y)
    want.append(total / len(z))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_multi_margin_is_zero_beyond_the_margin():
  logits = jnp.array([[3.0, 0.0, 1.0]])
  assert float(losses.multi_margin_loss(logits, jnp.array([0]), 2.0)[0]) == 0
  # One class inside the margin by 0.5: (2 - 1.5) / 3.
  np.testing.assert_allclose(
      losses.multi_margin_loss(logits, jnp.array([0]), 2.5)[0], 0.5 / 3,
      rtol=1e-6)


def test_offset_cross_entropy_matches_log_softmax():
  logits, labels = _batch(1)
  u, t = 1.5, 0.25
  got = np.asarray(losses.offset_cross_entropy(logits, labels, u, t))
  z = logits.astype(np.float64).copy()
  z[np.arange(len(labels)), labels] -= u
  z /= t
  log_softmax = z - np.log(np.sum(np.exp(z - z.max(1, keepdims=True)), 1,
                                  keepdims=True)) - z.max(1, keepdims=True)
  want = -t * log_softmax[np.arange(len(labels)), labels]
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_offset_cross_entropy_without_offset_is_tempered_ce():
  logits, labels = _batch(2)
  got = losses.offset_cross_entropy(logits, labels, 0.0, 1.0)
  want = -jax.nn.log_softmax(logits)[np.arange(len(labels)), labels]
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_family_losses_reject_bad_arguments():
  logits, labels = _batch()
  with pytest.raises(ValueError, match='temperature'):
    losses.offset_cross_entropy(logits, labels, 1.0, 0.0)
  with pytest.raises(ValueError, match='margin'):
    losses.multi_margin_loss(logits, labels, -1.0)
  with pytest.raises(ValueError, match='labels'):
    losses.multi_margin_loss(logits, labels[:3], 1.0)
  with pytest.raises(ValueError, match='power'):
    losses.multi_margin_loss(logits, labels, 1.0, power=3)


def test_triangular_schedule_is_cpls_interpolation():
  total, peak = 1000, 0.01
  sched = schedules.triangular(peak, total)
  steps = np.arange(0, total + 1, 37)
  want = np.interp(steps, [0, 400, total], [0, peak, 0])
  got = np.array([float(sched(s)) for s in steps])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
  assert math.isclose(float(sched(400)), peak, rel_tol=1e-6)
  with pytest.raises(ValueError, match='peak_fraction'):
    schedules.triangular(peak, total, 1.5)
