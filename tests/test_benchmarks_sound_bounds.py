"""Smoke test of benchmarks/sound_bounds.py (tiny network, no timings checked)."""

from __future__ import annotations

from benchmarks import sound_bounds as bench
from cll_jax import sound_bounds


def test_run_tiny_rows():
  rows = bench.run(tiny=True, verbose=False)
  assert len(rows) == 4
  for row in rows:
    # The sound bound sits above the converged power estimate (up to the
    # float allowance) and within rtol of its float64 reference.
    assert row['ratio'] >= 1 - sound_bounds.DEFAULT_RELATIVE_FLOAT_ALLOWANCE
    assert (-sound_bounds.DEFAULT_RELATIVE_FLOAT_ALLOWANCE <= row['f64_gap']
            <= sound_bounds.DEFAULT_RTOL)
    assert row['bound_ms'] > 0 and row['power_ms'] > 0
