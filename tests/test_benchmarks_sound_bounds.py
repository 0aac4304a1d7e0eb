"""Smoke test of benchmarks/sound_bounds.py (tiny network, no timings checked)."""

from __future__ import annotations

from benchmarks import sound_bounds as bench
from cll_jax import sound_bounds


def test_run_tiny_rows():
  rows = bench.run(tiny=True, verbose=False)
  assert len(rows) == 4
  for row in rows:
    # The sound bound sits above the converged power estimate and its
    # float64 reference, within rtol of it for these small layers.
    assert row['ratio'] >= 1
    assert 0 <= row['f64_gap'] <= sound_bounds.DEFAULT_RTOL
    assert row['bound_ms'] > 0 and row['power_ms'] > 0
