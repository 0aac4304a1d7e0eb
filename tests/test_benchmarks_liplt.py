"""Smoke test of benchmarks/liplt.py (tiny network, no timings checked)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import liplt as bench
from cll_jax import models

TINY = bench.TINY_CASES[0]


def _tiny_model_and_params(seed: int = 0):
  model = models.create_model(TINY.name, TINY.num_classes, activation='relu',
                              bound='liplt')
  # Jitted: an eager init compiles each of its operations on its own.
  params = jax.jit(model.init)(jax.random.PRNGKey(seed),
                               jnp.zeros((1, *TINY.input_shape)))['params']
  return model, params


def _exact_bounds(model, params):
  """LipLT and naive bounds in float64 from explicit matrices and SVDs.

  Independent of `cll_jax.liplt`: the product norms are the top singular
  values of explicit matrix products, the recursion is re-derived here
  (ReLU: a = b = 1/2), the class rows c^T W_K...W_s are explicit.
  """
  ops = models.network_operators(model, params, TINY.input_shape)
  mats = [np.asarray(op.dense_matrix(), np.float64) for op in ops]
  num = len(mats)

  def product(s, k):  # W_k ... W_s
    out = mats[s]
    for t in range(s + 1, k + 1):
      out = mats[t] @ out
    return out

  norm = lambda m: np.linalg.svd(m, compute_uv=False)[0]
  a = b = 0.5
  m = []
  for k in range(num):
    value = a**k * norm(product(0, k))
    for s in range(1, k + 1):
      value += b * a**(k - s) * norm(product(s, k)) * m[s - 1]
    m.append(value)
  single = [norm(w) for w in mats]
  classes = TINY.num_classes
  liplt_pairs = np.zeros((classes, classes))
  naive_pairs = np.zeros((classes, classes))
  depth = num - 1
  for i in range(classes):
    for j in range(classes):
      c = np.zeros(classes)
      c[i], c[j] = 1.0, -1.0
      if i == j:
        continue
      liplt_pairs[i, j] = a**depth * np.linalg.norm(c @ product(0, depth))
      for s in range(1, depth + 1):
        liplt_pairs[i, j] += (b * a**(depth - s) * m[s - 1]
                              * np.linalg.norm(c @ product(s, depth)))
      naive_pairs[i, j] = (np.linalg.norm(c @ mats[-1])
                           * np.prod(single[:-1]))
  return m[-1], np.prod(single), liplt_pairs, naive_pairs


def test_bound_ratios_match_explicit_matrices():
  model, params = _tiny_model_and_params()
  row = bench.bound_ratios(model, {'params': params}, TINY.input_shape,
                           max_iterations=1000)
  liplt_global, naive_global, liplt_pairs, naive_pairs = _exact_bounds(
      model, params)
  np.testing.assert_allclose(row['liplt_global'], liplt_global, rtol=1e-4)
  np.testing.assert_allclose(row['naive_global'], naive_global, rtol=1e-4)
  off = ~np.eye(TINY.num_classes, dtype=bool)
  ratios = liplt_pairs[off] / naive_pairs[off]
  np.testing.assert_allclose(row['global_ratio'], liplt_global / naive_global,
                             rtol=1e-4)
  np.testing.assert_allclose(row['pairwise_max_ratio'], ratios.max(),
                             rtol=1e-4)
  np.testing.assert_allclose(row['pairwise_median_ratio'], np.median(ratios),
                             rtol=1e-4)
  np.testing.assert_allclose(
      row['max_pair_ratio'],
      liplt_pairs[off].max() / naive_pairs[off].max(), rtol=1e-4)


def test_run_tiny_ratios_and_markdown():
  rows = bench.run(tiny=True, train_steps=2, timings=False, verbose=False)
  ratios = [r for r in rows if r['kind'] == 'ratio']
  assert [r['weights'] for r in ratios] == ['kaiming', 'crm_2_steps']
  for r in ratios:
    # LipLT is never looser than the naive product bound (exact norms;
    # converged estimates up to the iteration's slack).
    assert 0 < r['global_ratio'] <= 1 + 1e-5
    assert 0 < r['pairwise_max_ratio'] <= 1 + 1e-5
    assert r['pairwise_min_ratio'] <= r['pairwise_median_ratio']
    assert r['pairwise_median_ratio'] <= r['pairwise_max_ratio']
    assert r['max_pair_ratio'] <= 1 + 1e-5
    assert r['residual'] < 1e-3
    assert r['diag_mismatch'] < 1e-3
  text = bench.format_markdown(rows)
  assert '| tiny_cnn | 10 | kaiming |' in text
  assert 'crm_2_steps' in text


def test_timing_rows_tiny():
  timings = bench.time_bound(TINY, repeats=1)
  assert set(timings) == {'product_norms', 'pairwise_bound', 'bound_grad'}
  rows = [dict(kind='timing', model=TINY.name, what=what, batch=None,
               load_average='0.00, 0.00, 0.00', **t)
          for what, t in timings.items()]
  rows.append(dict(kind='timing', model=TINY.name, what='train_step_naive',
                   batch=8, load_average='0.00, 0.00, 0.00',
                   **timings['product_norms']))
  rows.append(dict(kind='timing', model=TINY.name, what='train_step_liplt',
                   batch=8, load_average='0.00, 0.00, 0.00',
                   **timings['bound_grad']))
  for r in rows:
    assert r['median_ms'] > 0 and r['compile_s'] > 0
  text = bench.format_markdown(rows)
  assert '| tiny_cnn | bound_grad |' in text
  assert 'the LipLT step takes' in text
  assert 'provisional' not in text
