"""The two-moons study (CLL fig. 4 / D2) and the vmapped sweep trainer.

* The vmapped sweep equals the library's `train.train_step` run one step at a
  time, per run, with that run's own schedules (eps and p differ).
* A shortened study writes its figures and tables, and its reported numbers
  are recomputed independently from the saved parameters: a numpy forward
  pass (dense + MinMax), layer norms from a float64 SVD, the strict margin
  rule, and K^(h o f) from the closed form of CLL eq. 5.
"""

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cll_jax import models
from cll_jax import sweep
from cll_jax import train
from cll_jax.data import moons as moons_data
from experiments import moons_study


def _tiny_configs(runs, *, epochs=2, num_train=64, batch_size=16):
  return [moons_study.make_config(loss, eps, p, epochs=epochs,
                                  num_train=num_train, num_val=32,
                                  batch_size=batch_size, seed=3)
          for loss, eps, p in runs]


def test_sweep_equals_train_step_run_by_run():
  configs = _tiny_configs([('cll', 0.1, None), ('cll', 0.25, 0.3)])
  for c in configs:
    c.train.converge_max_iterations = 50
  points, labels = moons_data.make_moons(64, seed=5)
  model = train.create_model(configs[0], 2)
  sw = sweep.Sweep(configs, model, points, labels, epochs_per_call=1)
  states, history = sw.train(2)
  assert history['loss'].shape == (2, 2)

  # Reference: the plain jitted train_step, one run at a time, on the same
  # batches, with that run's own (unstacked) schedules.
  spe = sw.steps_per_epoch
  for i, c in enumerate(configs):
    rng = jax.random.PRNGKey(c.seed)
    init_rng, aug_rng = jax.random.split(rng)
    state = train.create_train_state(c, model, init_rng, (2,), spe)
    step = jax.jit(functools.partial(
        train.train_step, config=c, sched=train.loss_schedules(c, spe),
        steps_per_epoch=spe, rng=aug_rng))
    for epoch in range(2):
      idx = np.asarray(sweep.epoch_batches(jax.random.fold_in(rng, 1), epoch,
                                           64, c.train.batch_size))
      for b in idx:
        state, metrics = step(state, {'image': jnp.asarray(points[b]),
                                      'label': jnp.asarray(labels[b])})
      state = state.replace(power_iteration=models.converge_power_iteration(
          model, state.variables, (2,), tol=c.train.converge_tol,
          max_iterations=50))
    got = sweep.unstack(states, i)
    np.testing.assert_allclose(float(metrics['epsilon']),
                               c.loss.epsilon, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(state.params)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(got.power_iteration),
                    jax.tree.leaves(state.power_iteration)):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
  # The runs really differ (different eps and p).
  a, b = (jax.tree.leaves(sweep.unstack(states, i).params)[0] for i in (0, 1))
  assert not np.allclose(a, b)


def test_sweep_rejects_configs_differing_outside_the_loss_fields():
  configs = _tiny_configs([('cll', 0.1, None), ('cll', 0.1, None)])
  configs[1].loss.lam = 1e-3
  with pytest.raises(ValueError, match='loss.lam'):
    sweep.check_sweep_configs(configs)
  cll, gloro = _tiny_configs([('cll', 0.1, None), ('gloro', 0.1, None)])
  with pytest.raises(ValueError, match='loss.name'):
    sweep.check_sweep_configs([cll, gloro])


def _numpy_logits(flat, run, x):
  """Independent forward pass: dense layers, MinMax on channel halves."""
  h = np.asarray(x, np.float64)
  names = [f'layer_{i}' for i in range(6)] + ['head']
  for name in names:
    w = flat[f'{run}/params/{name}/kernel'].astype(np.float64)
    h = h @ w + flat[f'{run}/params/{name}/bias']
    if name != 'head':
      a, b = np.split(h, 2, axis=-1)
      h = np.concatenate([np.maximum(a, b), np.minimum(a, b)], axis=-1)
  return h


def _svd_k01(flat, run):
  prefix = 1.0
  for i in range(6):
    w = flat[f'{run}/params/layer_{i}/kernel'].astype(np.float64)
    prefix *= np.linalg.svd(w, compute_uv=False)[0]
  head = flat[f'{run}/params/head/kernel'].astype(np.float64)
  return prefix * np.linalg.norm(head[:, 1] - head[:, 0])


def test_short_study_writes_outputs_with_independently_checked_numbers(
    tmp_path):
  out = str(tmp_path)
  result = moons_study.run_study(
      out, epochs=3, eps_values=(0.15, 0.25), slack_p_code=(0.75, 1e-4),
      num_train=200, num_val=400, batch_size=50, grid_resolution=40,
      comparison_seeds=(1,), comparison_eps=0.15)
  for name in ('moons_fig4.png', 'moons_slack_d2.png', 'moons_results.json',
               'moons_results.md', 'moons_params.npz'):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  on_disk = json.load(open(os.path.join(out, 'moons_results.json')))
  assert on_disk == json.loads(json.dumps(result))
  runs = on_disk['runs']
  assert [r['name'] for r in runs] == [
      'cll_eps0.15', 'cll_eps0.25', 'gloro_eps0.15', 'gloro_eps0.25',
      'cll_eps0.15_pcode0.75', 'cll_eps0.15_pcode0.0001']

  dataset = moons_data.load_moons(num_train=200, num_test=400)
  flat = dict(np.load(os.path.join(out, 'moons_params.npz')))
  md = open(os.path.join(out, 'moons_results.md')).read()
  rows = [line for line in md.splitlines()
          if line.startswith('| fig4') or line.startswith('| slack_d2')]
  assert len(rows) == len(runs)
  for r, row in zip(runs, rows):
    for key in ('train_clean_accuracy', 'val_clean_accuracy', 'train_cra',
                'val_cra'):
      assert 0.0 <= r[key] <= 1.0, (r['name'], key)
    assert r['train_cra'] <= r['train_clean_accuracy']
    eps = r['epsilon']

    # The sound K_01 is above the exact (SVD) product bound, and close.
    k_svd = _svd_k01(flat, r['name'])
    assert k_svd <= r['K_01'] <= k_svd * (1 + 5e-3), r['name']
    assert r['K_f'] == pytest.approx(r['K_01'])

    # CRA from the saved parameters with the strict rule and the JSON's K_01.
    for x, y, key, count in (
        (dataset.train_images, dataset.train_labels, 'train_cra',
         'train_certified_count'),
        (dataset.test_images, dataset.test_labels, 'val_cra',
         'val_certified_count')):
      f = _numpy_logits(flat, r['name'], x)
      gap = f[:, 1] - f[:, 0]
      correct = np.where(y == 1, gap > 0, gap < 0)
      certified = correct & (np.abs(gap) > eps * r['K_01'])
      # float32 (run) vs float64 (here) logits: a point exactly at the
      # margin may flip.
      assert abs(int(certified.sum()) - r[count]) <= 1, (r['name'], key)
      assert r[key] == pytest.approx(r[count] / len(y))

    # K^(h o f): CLL 1/sigma_eps(p) = (log(1-p) - log p) / eps (eq. 5).
    if r['loss'] == 'cll':
      p = r['p_final']
      if r['p_code'] is not None:
        assert p == pytest.approx(r['p_code'] / 2, rel=1e-6)
      assert r['K_hf'] == pytest.approx(
          (np.log1p(-p) - np.log(p)) / eps, rel=1e-5)
    else:
      assert r['K_hf'] == r['K_f']

    # The markdown row shows the JSON's numbers.
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert cells[1] == r['loss']
    assert float(cells[3]) == pytest.approx(eps)
    assert cells[6] == f'{100 * r["train_cra"]:.2f}%'
    assert cells[7] == f'{100 * r["val_cra"]:.2f}%'
    assert float(cells[8]) == pytest.approx(r['K_f'], rel=1e-3)
    assert float(cells[9]) == pytest.approx(r['K_hf'], rel=1e-3)
    if r['p_code'] is not None:
      assert re.search(r'code 0?\.?\d', cells[4]), cells[4]

  # Seed comparison: seed 0 is the main study's pair (not retrained), seed 1
  # a new pair on its own data; the counts match the records.
  comp = on_disk['seed_comparison']
  assert comp['seeds'] == [0, 1]
  by = {(r['seed'], r['loss']): r for r in comp['runs']}
  assert set(by) == {(0, 'cll'), (0, 'gloro'), (1, 'cll'), (1, 'gloro')}
  main = {r['name']: r for r in runs}
  for loss in ('cll', 'gloro'):
    assert {k: v for k, v in by[(0, loss)].items() if k != 'seed'} == (
        main[f'{loss}_eps0.15'])
    assert by[(1, loss)]['num_train'] == 200
  # Seed 1 draws other points, so the same loss gives another K.
  assert by[(1, 'cll')]['K_f'] != by[(0, 'cll')]['K_f']
  summary = comp['summary']
  pairs = [(by[(s, 'cll')], by[(s, 'gloro')]) for s in (0, 1)]
  assert summary['gloro_train_cra_below_cll'] == sum(
      g['train_cra'] < c['train_cra'] for c, g in pairs)
  assert summary['cll_K_hf_above_gloro'] == sum(
      c['K_hf'] > g['K_hf'] for c, g in pairs)
  assert summary['cll_mean_val_cra'] == pytest.approx(
      np.mean([c['val_cra'] for c, _ in pairs]))
  section = md[md.index('over seeds'):]
  seed_rows = [line for line in section.splitlines()
               if re.match(r'\| \d+ \| (cll|gloro) \|', line)]
  assert len(seed_rows) == 4
  for line, r in zip(seed_rows, comp['runs']):
    cells = [c.strip() for c in line.strip('|').split('|')]
    assert cells[:2] == [str(r['seed']), r['loss']]
    assert cells[2] == f'{100 * r["train_cra"]:.2f}%'
    assert int(cells[3]) == r['num_train'] - r['train_certified_count']
