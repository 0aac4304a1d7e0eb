"""Smoke test: every benchmark runs at tiny sizes and reports sane values.

No timing assertions: only that each benchmark runs, returns the fields the
report needs, and that the quantities that are not timings are right (the
data-parallel step equals the single-device step, the report is written).
"""

import json
import math
import os

import pytest

from benchmarks import certification
from benchmarks import conv_grads
from benchmarks import data_parallel
from benchmarks import quality
from benchmarks import run as run_lib
from benchmarks import tightness
from benchmarks import train_step
from cll_jax import configs


def _positive_finite(row, *keys):
  for k in keys:
    assert math.isfinite(row[k]) and row[k] > 0, (k, row[k])


def test_plain_forward_matches_model_logits():
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from benchmarks import plain_forward  # pylint: disable=g-import-not-at-top
  from cll_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create_model('tiny_cnn', 10)
  x = jax.random.uniform(jax.random.PRNGKey(0), (3, 8, 8, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
  np.testing.assert_allclose(
      plain_forward(model, variables['params'], x),
      model.apply(variables, x).logits, rtol=1e-5, atol=1e-6)


def test_train_step_tiny():
  rows = train_step.run(tiny=True, repeats=1, verbose=False)
  assert [r['variant'] for r in rows] == ['cll', 'cll_no_aug', 'cll_pi0',
                                          'no_bound']
  for r in rows:
    _positive_finite(r, 'median_ms', 'compile_s', 'cpu_ms')


def test_conv_kernel_grads_match_loops():
  # dW[i, j, c, o] = sum_{b, h, w} x_pad[b, s h + i, s w + j, c] dy[b, h, w, o]
  # by explicit loops in float64, for a strided padded conv.
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, 6, 3)).astype(np.float32)
  kernel_shape, (sh, sw), pad = (4, 3, 3, 5), (2, 1), ((1, 2), (0, 1))
  oh = (7 + 3 - 4) // sh + 1
  ow = (6 + 1 - 3) // sw + 1
  dy = rng.normal(size=(2, oh, ow, 5)).astype(np.float32)
  xp = np.pad(x.astype(np.float64), ((0, 0), pad[0], pad[1], (0, 0)))
  want = np.zeros(kernel_shape)
  for i in range(4):
    for j in range(3):
      for h in range(oh):
        for w in range(ow):
          want[i, j] += np.einsum('bc,bo->co', xp[:, sh * h + i, sw * w + j],
                                  dy[:, h, w])
  for name, form in conv_grads.FORMS.items():
    got = form(x, dy, kernel_shape, (sh, sw), pad)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5,
                               err_msg=name)


def test_conv_grads_tiny():
  rows = conv_grads.run(tiny=True, repeats=1)
  assert {r['form'] for r in rows} == set(conv_grads.FORMS)
  assert len(rows) == len(conv_grads.TINY_CONVS) * len(conv_grads.FORMS)
  for r in rows:
    _positive_finite(r, 'median_ms')
    assert r['rel_err'] < 1e-5, r
  table = '\n'.join(run_lib._section_conv_grads(rows))  # pylint: disable=protected-access
  for conv in {r['conv'] for r in rows}:
    assert f'| {conv} |' in table


def test_certification_tiny():
  rows = certification.run(tiny=True, repeats=1, verbose=False)
  by = {r['variant']: r for r in rows}
  assert set(by) == {'bound_sound', 'bound_power', 'plain', 'certified'}
  _positive_finite(by['plain'], 'images_per_s')
  _positive_finite(by['certified'], 'images_per_s')


def test_tightness_tiny():
  rows = tightness.run(tiny=True, verbose=False)
  assert [r['pair_chunk_size'] for r in rows] == [2, None]
  for row in rows:
    assert (row['pairs'], row['steps']) == (4, 2)
    _positive_finite(row, 'median_ms', 'full_estimate_h')


def test_data_parallel_tiny_equal_results():
  (row,) = data_parallel.run(tiny=True, repeats=1, steps=2, verbose=False)
  # Same global batch on 1 and 8 devices: identical up to float32
  # reduction order.
  assert row['max_abs_param_diff'] <= 1e-4 * max(row['max_abs_param'], 1.0)
  assert row['max_abs_power_iteration_diff'] <= 1e-4
  _positive_finite(row, '1dev_median_ms', '8dev_median_ms')


def test_quality_config_scales_schedule():
  config = quality.make_config('gloro', 20, tiny=False)
  assert config.train.num_epochs == 20
  assert tuple(config.optimizer.decay_epochs) == (10, 15, 20)
  assert config.loss.epsilon_schedule_epochs == 10
  assert config.loss.epsilon == 0.15
  full = quality.make_config('cll', None, tiny=False)
  assert full.train.num_epochs == 800 and full.model.name == '4c3f'
  assert (full.loss.p_start, full.loss.epsilon) == (0.15, 0.15)


@pytest.mark.skipif(not os.path.exists(configs.SHARED_CIFAR10),
                    reason='offline CIFAR-10 copy not present')
def test_quality_tiny(tmp_path):
  rows = quality.run(tiny=True, workdir=str(tmp_path), verbose=False)
  assert [r['method'] for r in rows] == ['cll', 'gloro']
  for r in rows:
    for k in ('clean_accuracy', 'cra_36', 'cra_72', 'cra_108', 'cra_255',
              'tightness'):
      assert 0.0 <= r[k] <= 1.0, (k, r[k])
    # CRA can only fall as the radius grows.
    assert r['cra_36'] >= r['cra_72'] >= r['cra_108'] >= r['cra_255']
  assert json.load(open(tmp_path / quality.RESULTS_JSON))[0]['method'] == 'cll'
  assert 'CRA 255' in quality.markdown_table(rows)


def test_run_writes_report(tmp_path):
  out = tmp_path / 'RESULTS.md'
  run_lib.run(tiny=True, repeats=1, output=str(out),
              skip=('train_step', 'conv_grads', 'tightness', 'data_parallel',
                    'sound_bounds', 'liplt', 'constrained', 'side_by_side',
                    'profile'))
  assert (tmp_path / 'measurements' / 'certification_tiny.json').exists()
  # A second report reuses the saved measurement instead of measuring.
  again = tmp_path / 'AGAIN.md'
  run_lib.run(tiny=True, repeats=1, output=str(again),
              skip=('train_step', 'conv_grads', 'tightness', 'data_parallel',
                    'sound_bounds', 'liplt', 'constrained', 'side_by_side',
                    'profile'),
              reuse=('certification',))
  assert 'certification reused from' in again.read_text()
  text = out.read_text()
  for needle in ('git commit', 'jax', 'Certification throughput',
                 'Two-moons', 'Certified quality'):
    assert needle in text, needle


def test_constrained_step_benchmark_tiny():
  from benchmarks import constrained  # pylint: disable=g-import-not-at-top
  rows = constrained.run(tiny=True, repeats=1, networks=('4c3f', 'lipconv20'),
                         verbose=False)
  assert [r['network'] for r in rows] == ['4c3f', 'lipconv20']
  for r in rows:
    assert r['median_ms'] > 0 and r['memory_peak_bytes'] > 0
  # LipConv (5 SOC convs up to 128 channels) holds more than tiny_cnn.
  assert rows[1]['parameters'] > rows[0]['parameters']
  lines = run_lib._section_constrained(rows)  # pylint: disable=protected-access
  assert any(line.startswith('| lipconv20 |') for line in lines)


def test_studies_section_embeds_each_study_and_its_comparison(tmp_path,
                                                              monkeypatch):
  folder = tmp_path / 'slack'
  folder.mkdir()
  (folder / 'slack.md').write_text(
      '# Study `slack`: slack p\n\n* commit: abc\n\n| p | CRA |\n|---|---|\n'
      '\n![slack.png](slack.png)\n')
  (folder / 'comparison.md').write_text('Shape as in the paper.\n')
  monkeypatch.setattr(run_lib, 'STUDIES_DIR', str(tmp_path))
  text = '\n'.join(run_lib._section_studies())  # pylint: disable=protected-access
  assert '### Study `slack`: slack p' in text
  assert '# Study' not in text.replace('### Study', '')
  rel = os.path.relpath(str(folder), os.path.join(run_lib.REPO, 'benchmarks'))
  assert f'![slack.png]({rel}/slack.png)' in text
  assert text.index('| p | CRA |') < text.index('Shape as in the paper.')


def test_profile_report_places_the_gap_from_cpu_times():
  from benchmarks import profile_step  # pylint: disable=g-import-not-at-top
  jax_cpu = {'forward': 50.0, 'forward + input grads': 100.0,
             'forward + all grads': 200.0, 'power iteration': 10.0,
             'bound + grad': 5.0, 'loss': 1.0, 'adam': 4.0, 'step': 220.0}
  torch_cpu = {'conv backward': 30.0, 'conv forward': 20.0, 'matmul': 10.0,
               'optimizer': 3.0, 'elementwise + rest': 37.0}
  rows = [dict(framework='jax', part=k, median_ms=v, cpu_ms=v, load='1, 1, 1')
          for k, v in jax_cpu.items()]
  rows += [dict(framework='pytorch', part=k, median_ms=v, cpu_ms=v,
                load='1, 1, 1') for k, v in torch_cpu.items()]
  text = profile_step.format_markdown(rows)
  # 10 + 5 + 1 + 4 = 20 ms of JAX's non-network work; PyTorch's step
  # 100 ms = 60 ms of convs and matmuls + 40 ms of the rest.
  assert ("JAX's step 220 ms, of which the network's forward and all its "
          'gradients') in text
  assert 'MinMax and their gradients) 200 ms' in text
  assert 'Adam 20 ms' in text
  assert "PyTorch's step 100 ms" in text and '(oneDNN) 60 ms' in text
  assert 'autograd, Adam) 40 ms' in text
  # Without the PyTorch rows there is nothing to compare.
  assert 'Where the gap is' not in profile_step.format_markdown(
      [r for r in rows if r['framework'] == 'jax'])


def test_side_by_side_matched_eval_does_the_references_work():
  from benchmarks import side_by_side  # pylint: disable=g-import-not-at-top
  config = side_by_side._epoch_config(tiny=True, steps=2)  # pylint: disable=protected-access
  matched = side_by_side._matched_eval_config(config)  # pylint: disable=protected-access
  assert (matched.eval.bound, matched.eval.precision) == ('power', 'float32')
  # The default run keeps its sound, float64 certification.
  assert (config.eval.bound, config.eval.precision) == ('sound', 'float64')
  matched.eval.bound = 'sound'
  matched.eval.precision = 'float64'
  assert matched.to_dict() == config.to_dict()
