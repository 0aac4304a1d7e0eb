"""The two-moons study (CLL fig. 4 / D2) and the vmapped sweep trainer.

* The vmapped sweep equals the library's `train.train_step` run one step at a
  time, per run, with that run's own schedules (eps and p differ).
* A shortened study writes its figures and tables, and its reported numbers
  are recomputed independently from the saved parameters: a numpy forward
  pass (dense + MinMax), layer norms from a float64 SVD, the strict margin
  rule, K^(h o f) from the closed form of CLL eq. 5, and the head/body
  trajectories' last values.
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


def _tiny_configs(runs, *, epochs=2, num_train=64, batch_size=16, seed=3):
  return [moons_study.make_config(method, eps, p, epochs=epochs,
                                  num_train=num_train, num_val=32,
                                  batch_size=batch_size, seed=seed)
          for method, eps, p in runs]


def test_sweep_equals_train_step_run_by_run():
  # Runs 0 and 1 differ in eps and p (same seed and data), run 2 in its
  # seed (init, batch order) and data.
  configs = _tiny_configs([('cll', 0.1, None), ('cll', 0.25, 0.3)])
  configs += _tiny_configs([('cll', 0.1, None)], seed=4)
  for c in configs:
    c.train.converge_max_iterations = 50
  data = [moons_data.make_moons(64, seed=5)] * 2 + [
      moons_data.make_moons(64, seed=6)]
  model = train.create_model(configs[0], 2)

  def summary(state):  # Any function of the state after each epoch.
    return {'head_sum': jnp.sum(state.params['head']['kernel']),
            'u_head': state.power_iteration['head']['u']}

  sw = sweep.Sweep(configs, model, [x for x, _ in data],
                   [y for _, y in data], epochs_per_call=1,
                   epoch_summary=summary)
  states, history = sw.train(2)
  assert history['loss'].shape == (3, 2)
  assert history['u_head'].shape == (3, 2, 10)

  # Reference: the plain jitted train_step, one run at a time, on the same
  # batches, with that run's own (unstacked) schedules and seed.
  spe = sw.steps_per_epoch
  converge = jax.jit(functools.partial(
      models.converge_power_iteration, model, input_shape=(2,),
      tol=configs[0].train.converge_tol, max_iterations=50))
  for i, (c, (points, labels)) in enumerate(zip(configs, data)):
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
      state = state.replace(power_iteration=converge(state.variables))
      np.testing.assert_allclose(
          history['head_sum'][i, epoch],
          float(jnp.sum(state.params['head']['kernel'])), rtol=1e-4,
          atol=1e-5)
      np.testing.assert_allclose(history['u_head'][i, epoch],
                                 state.power_iteration['head']['u'],
                                 rtol=1e-3, atol=1e-4)
    got = sweep.unstack(states, i)
    np.testing.assert_allclose(float(metrics['epsilon']),
                               c.loss.epsilon, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(state.params)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(got.power_iteration),
                    jax.tree.leaves(state.power_iteration)):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
  # The runs really differ (eps and p; seed and data).
  kernels = [jax.tree.leaves(sweep.unstack(states, i).params)[0]
             for i in range(3)]
  assert not np.allclose(kernels[0], kernels[1])
  assert not np.allclose(kernels[0], kernels[2])


def test_sweep_rejects_configs_differing_outside_the_loss_fields():
  configs = _tiny_configs([('cll', 0.1, None), ('cll', 0.1, None)])
  configs[1].loss.lam = 1e-3
  with pytest.raises(ValueError, match='loss.lam'):
    sweep.check_sweep_configs(configs)
  cll, gloro = _tiny_configs([('cll', 0.1, None), ('gloro', 0.1, None)])
  with pytest.raises(ValueError, match='loss.name'):
    sweep.check_sweep_configs([cll, gloro])
  faithful, official = _tiny_configs([('gloro', 0.1, None),
                                      ('gloro_official', 0.1, None)])
  with pytest.raises(ValueError, match='loss.gloro_variant'):
    sweep.check_sweep_configs([faithful, official])
  # Runs on other data seeds need their own data.
  configs = _tiny_configs([('cll', 0.1, None)]) + _tiny_configs(
      [('cll', 0.1, None)], seed=4)
  points, labels = moons_data.make_moons(64, seed=5)
  model = train.create_model(configs[0], 2)
  with pytest.raises(ValueError, match='data.kwargs.seed'):
    sweep.Sweep(configs, model, points, labels)
  with pytest.raises(ValueError, match='one images and labels array per'):
    sweep.Sweep(configs, model, [points], [labels])


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


def _numpy_soc_logits(flat, run, x, depth, max_norm=1.5):
  """Independent SOC MLP: exp(scale (W - W^T)) (scipy), MinMax, LLN head.

  The layers compute a 15-term series of the exponential; with ||A|| = 1.5
  it differs from expm by ~1e-10 relative.
  """
  from scipy.linalg import expm  # pylint: disable=g-import-not-at-top
  h = np.asarray(x, np.float64)
  for i in range(depth):
    w = flat[f'{run}/params/layer_{i}/kernel'].astype(np.float64)
    u = flat[f'{run}/power_iteration/layer_{i}/u'].astype(np.float64)
    skew = w - w.T
    scale = max_norm / np.linalg.norm(u @ skew)
    h = np.pad(h, ((0, 0), (0, w.shape[0] - h.shape[1])))
    h = h @ expm(scale * skew) + flat[f'{run}/params/layer_{i}/bias']
    a, b = np.split(h, 2, axis=-1)
    h = np.concatenate([np.maximum(a, b), np.minimum(a, b)], axis=-1)
  head = flat[f'{run}/params/head/kernel'].astype(np.float64)
  return h @ (head / np.linalg.norm(head, axis=0)) + flat[
      f'{run}/params/head/bias']


def _svd_body_product(flat, run):
  prefix = 1.0
  for i in range(6):
    w = flat[f'{run}/params/layer_{i}/kernel'].astype(np.float64)
    prefix *= np.linalg.svd(w, compute_uv=False)[0]
  return prefix


def _head_distance(flat, run):
  head = flat[f'{run}/params/head/kernel'].astype(np.float64)
  return np.linalg.norm(head[:, 1] - head[:, 0])


def test_short_study_writes_outputs_with_independently_checked_numbers(
    tmp_path):
  out = str(tmp_path)
  result = moons_study.run_study(
      out, epochs=3, eps_values=(0.15, 0.25), slack_p_code=(0.75, 1e-4),
      num_train=200, num_val=400, batch_size=50, grid_resolution=40,
      comparison_seeds=(1,), comparison_eps=0.15, soc_depths=(3,))
  for name in ('moons_fig4.png', 'moons_fig4_official.png',
               'moons_slack_d2.png', 'moons_soc_d3.png',
               'moons_trajectories.png',
               'moons_results.json', 'moons_results.md', 'moons_params.npz',
               'moons_trajectories.npz'):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  on_disk = json.load(open(os.path.join(out, 'moons_results.json')))
  assert on_disk == json.loads(json.dumps(result))
  runs = on_disk['runs']
  assert [r['name'] for r in runs] == [
      'cll_eps0.15', 'cll_eps0.25', 'gloro_eps0.15', 'gloro_eps0.25',
      'gloro_official_eps0.15', 'gloro_official_eps0.25',
      'cll_eps0.15_pcode0.75', 'cll_eps0.15_pcode0.0001',
      'soc_depth3_gamma0', 'soc_depth3_gamma0.3', 'soc_depth3_gamma1']
  assert {r['name']: r['gloro_variant'] for r in runs if r['loss'] == 'gloro'
          } == {'gloro_eps0.15': 'faithful', 'gloro_eps0.25': 'faithful',
                'gloro_official_eps0.15': 'official',
                'gloro_official_eps0.25': 'official'}

  dataset = moons_data.load_moons(num_train=200, num_test=400)
  flat = dict(np.load(os.path.join(out, 'moons_params.npz')))
  trajectories = dict(np.load(os.path.join(out, 'moons_trajectories.npz')))
  md = open(os.path.join(out, 'moons_results.md')).read()
  rows = [line for line in md.splitlines()
          if line.startswith(('| fig4', '| slack_d2', '| soc_d3'))]
  assert len(rows) == len(runs)
  for r, row in zip(runs, rows):
    for key in ('train_clean_accuracy', 'val_clean_accuracy', 'train_cra',
                'val_cra'):
      assert 0.0 <= r[key] <= 1.0, (r['name'], key)
    assert r['train_cra'] <= r['train_clean_accuracy']
    eps = r['epsilon']

    if r['method'] == 'soc':
      # Orthogonal body: the proven K_01 is the LLN head's exact
      # ||w_0/|w_0| - w_1/|w_1||| times a product of layer bounds that is
      # 1 + O(1e-5) (the float allowances).
      head = flat[f'{r["name"]}/params/head/kernel'].astype(np.float64)
      unit = head / np.linalg.norm(head, axis=0)
      distance = np.linalg.norm(unit[:, 0] - unit[:, 1])
      assert distance <= r['K_01'] <= distance * (1 + 2e-3), r['name']
      assert r['head_w0_minus_w1'] == pytest.approx(distance, rel=1e-6)
      assert r['K_hf'] == r['K_f'] <= 2.0 * (1 + 2e-3)
    else:
      # The sound K_01 is above the exact (SVD) product bound, and close.
      body = _svd_body_product(flat, r['name'])
      distance = _head_distance(flat, r['name'])
      k_svd = body * distance
      assert k_svd <= r['K_01'] <= k_svd * (1 + 5e-3), r['name']
      assert body <= r['body_product_sound'] <= body * (1 + 5e-3)
      assert r['head_w0_minus_w1'] == pytest.approx(distance, rel=1e-6)
      head = flat[f'{r["name"]}/params/head/kernel'].astype(np.float64)
      np.testing.assert_allclose(r['head_class_vector_norms'],
                                 np.linalg.norm(head, axis=0), rtol=1e-6)
    assert r['K_f'] == pytest.approx(r['K_01'])

    # GloRo runs: the last saved epoch of the trajectories is the final
    # state (power iteration converged: estimates of the SVD values).
    if r['loss'] == 'gloro':
      t = {k.split('/')[1]: v for k, v in trajectories.items()
           if k.split('/')[0] == r['name']}
      np.testing.assert_array_equal(t['epochs'], [3])
      assert t['w0_minus_w1'][-1] == pytest.approx(distance, rel=1e-5)
      assert t['w0_norm'][-1] == pytest.approx(np.linalg.norm(head[:, 0]),
                                               rel=1e-5)
      assert t['w1_norm'][-1] == pytest.approx(np.linalg.norm(head[:, 1]),
                                               rel=1e-5)
      assert body * (1 - 1e-3) <= t['body_product'][-1] <= body * (1 + 1e-5)
      assert t['K_01'][-1] == pytest.approx(
          t['body_product'][-1] * t['w0_minus_w1'][-1], rel=1e-5)

    # CRA from the saved parameters with the strict rule and the JSON's K_01.
    for x, y, key, count in (
        (dataset.train_images, dataset.train_labels, 'train_cra',
         'train_certified_count'),
        (dataset.test_images, dataset.test_labels, 'val_cra',
         'val_certified_count')):
      f = (_numpy_soc_logits(flat, r['name'], x, r['soc_depth'])
           if r['method'] == 'soc' else _numpy_logits(flat, r['name'], x))
      gap = f[:, 1] - f[:, 0]
      correct = np.where(y == 1, gap > 0, gap < 0)
      certified = correct & (np.abs(gap) > eps * r['K_01'])
      # float32 (run) vs float64 (here) logits: a point exactly at the
      # margin may flip.
      assert abs(int(certified.sum()) - r[count]) <= 1, (r['name'], key)
      assert r[key] == pytest.approx(r[count] / len(y))

    # K^(h o f): CLL 1/sigma_eps(p) = (log(1-p) - log p) / eps (eq. 5).
    if r['method'] == 'cll':
      p = r['p_final']
      if r['p_code'] is not None:
        assert p == pytest.approx(r['p_code'] / 2, rel=1e-6)
      assert r['K_hf'] == pytest.approx(
          (np.log1p(-p) - np.log(p)) / eps, rel=1e-5)
    else:
      assert r['K_hf'] == r['K_f']

    # The markdown row shows the JSON's numbers.
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert cells[1] == r['method']
    assert float(cells[3]) == pytest.approx(eps)
    assert cells[6] == f'{100 * r["train_cra"]:.2f}%'
    assert cells[7] == f'{100 * r["val_cra"]:.2f}%'
    assert float(cells[8]) == pytest.approx(r['K_f'], rel=1e-3)
    assert float(cells[9]) == pytest.approx(r['K_hf'], rel=1e-3)
    if r['p_code'] is not None:
      assert re.search(r'code 0?\.?\d', cells[4]), cells[4]

  # Seed comparison: seed 0 is the main study's runs (not retrained), seed 1
  # new runs on their own data; the counts match the records.
  methods = ('cll', 'gloro', 'gloro_official')
  comp = on_disk['seed_comparison']
  assert comp['seeds'] == [0, 1]
  by = {(r['seed'], r['method']): r for r in comp['runs']}
  assert set(by) == {(s, m) for s in (0, 1) for m in methods}
  main = {r['name']: r for r in runs}
  for method in methods:
    assert by[(0, method)] == main[f'{method}_eps0.15']
    assert by[(1, method)]['num_train'] == 200
    assert by[(1, method)]['group'] == 'seeds'
  # Seed 1 draws other points, so the same loss gives another K.
  assert by[(1, 'cll')]['K_f'] != by[(0, 'cll')]['K_f']
  summary = comp['summary']
  for method in methods[1:]:
    pairs = [(by[(s, 'cll')], by[(s, method)]) for s in (0, 1)]
    assert summary[f'{method}_train_cra_below_cll'] == sum(
        g['train_cra'] < c['train_cra'] for c, g in pairs)
    assert summary[f'{method}_train_cra_equal_cll'] == sum(
        g['train_cra'] == c['train_cra'] for c, g in pairs)
    assert summary[f'cll_K_hf_above_{method}'] == sum(
        c['K_hf'] > g['K_hf'] for c, g in pairs)
    assert summary[f'{method}_mean_val_cra'] == pytest.approx(
        np.mean([g['val_cra'] for _, g in pairs]))
    # The seed runs' trajectories are saved too.
    assert f'{method}_eps0.15_seed1/K_01' in trajectories
  section = md[md.index('over seeds'):]
  seed_rows = [line for line in section.splitlines()
               if re.match(r'\| \d+ \| (cll|gloro|gloro_official) \|', line)]
  assert len(seed_rows) == 6
  for line, r in zip(seed_rows, comp['runs']):
    cells = [c.strip() for c in line.strip('|').split('|')]
    assert cells[:2] == [str(r['seed']), r['method']]
    assert cells[2] == f'{100 * r["train_cra"]:.2f}%'
    assert int(cells[3]) == r['num_train'] - r['train_certified_count']
    assert float(cells[7]) == pytest.approx(r['head_w0_minus_w1'], rel=1e-2)
