"""The paper's analysis studies (`experiments.studies`, `cll_jax.study`).

Every study runs end to end on tiny members (tiny_cnn on a generated image
folder, 1-2 epochs, one device, tightness 4 pairs x 2 steps) and the files it
writes are checked. The reported numbers are recomputed independently from
the members' own run files (`final_metrics.json`, `metrics.jsonl`,
`config.json`), K^(h o f) from the closed form of CLL eq. 5 in float64 and
from the paper's tables, relative gains and mean +- std with numpy.

The members are chosen to share compiled programs: a CLL member with the
base config's values recurs in several studies (JAX's persistent
compilation cache, set in conftest.py, compiles it once).
"""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cll_jax import configs
from cll_jax import study
from cll_jax import tightness as tightness_lib
from cll_jax import train
from experiments import cifar10_4c3f_gloro
from experiments.studies import STUDIES
from experiments.studies import convergence
from experiments.studies import margin_width
from experiments.studies import seeds
from image_fixtures import write_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R36 = 36 / 255


@pytest.fixture(scope='module')
def image_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('study_images'))
  write_image_folder(root)
  return root


def _options(image_root, **kwargs):
  return study.StudyOptions(
      tiny=True, tightness_pairs=4, tightness_steps=2,
      overrides=(('data.name', 'image_folder'),
                 ('data.kwargs', {'root': image_root})), **kwargs)


def _run(name, members, workdir, image_root, collect_only=False, **kwargs):
  return study.run_study(
      STUDIES[name], str(workdir), _options(image_root, **kwargs),
      members=members, collect_only=collect_only, devices=jax.devices()[:1],
      log=lambda _: None)


def _member_files(workdir, name):
  folder = os.path.join(str(workdir), name)
  with open(os.path.join(folder, 'final_metrics.json')) as f:
    final = json.load(f)
  with open(os.path.join(folder, 'config.json')) as f:
    config = json.load(f)
  return final, config


def _check_outputs(workdir, name, figures, members):
  """The JSON, markdown and figures exist and agree on the members."""
  with open(os.path.join(str(workdir), f'{name}.json')) as f:
    results = json.load(f)
  assert results['study'] == name
  assert sorted(r['name'] for r in results['members']) == sorted(members)
  assert results['figures'] == figures
  assert results['tightness_budget'] == [4, 2]
  assert results['schedule']['train.num_epochs'] >= 1
  assert results['commit'] is None or len(results['commit']) == 40
  for figure in figures:
    with open(os.path.join(str(workdir), figure), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with open(os.path.join(str(workdir), f'{name}.md')) as f:
    markdown = f.read()
  assert markdown.startswith(f'# Study `{name}`')
  assert f'finished members: {len(members)} of ' in markdown
  assert 'tightness: K_lobo over 4 training pairs x 2 Adam steps' in markdown
  for figure in figures:
    assert f'({figure})' in markdown
  # Every member's numbers are those of its own run files.
  for record in results['members']:
    final, _ = _member_files(workdir, record['name'])
    assert record['clean_accuracy'] == final['test_accuracy']
    assert record['lipschitz_f'] == final['lipschitz_f']
    assert record['cra_train_eps'] == final[
        f"test_cra_{record['epsilon']:.4f}"]
    tight = record['tightness']
    assert tight['tightness_pairs'] == 4 and tight['tightness_steps'] == 2
    # K_lobo <= K_ij <= K^(f) for the sound bound of the evaluation.
    assert 0 < tight['lipschitz_lower'] <= final['lipschitz_f']
    assert tight['tightness_percent'] == pytest.approx(
        100 * tight['lipschitz_lower'] / final['lipschitz_f'])
  return results, markdown


def _cll_k_hf(epsilon, p):
  """1 / sigma_eps(p), CLL eq. 5, float64: (logit(1-p) - logit(p)) / 2eps."""
  return (math.log((1 - p) / p) - math.log(p / (1 - p))) / (2 * epsilon)


def test_slack_study_code_convention_and_noop_rerun(tmp_path, image_root,
                                                    monkeypatch):
  members = ['p_code0.3', 'p_code0.7']
  _run('slack', members, tmp_path, image_root)
  results, markdown = _check_outputs(tmp_path, 'slack', ['slack.png'],
                                     members)
  for record in results['members']:
    p_code = record['params']['p_code']
    _, config = _member_files(tmp_path, record['name'])
    assert config['loss']['p_convention'] == 'code'
    assert config['loss']['p_end'] == p_code
    # p_code = 2 p: the loss used p = p_code / 2 of eq. 5.
    assert record['lipschitz_hf'] == pytest.approx(
        _cll_k_hf(0.15, p_code / 2), rel=1e-5)
    assert f"| {p_code:g} | {p_code / 2:g} |" in markdown
  cra = {r['params']['p_code']: study.cra_at(r, R36)
         for r in results['members']}
  assert results['summary']['peak_cra_36'] == max(cra.values())

  # A rerun trains and measures nothing: both members are finished.
  def refuse(*args, **kwargs):
    raise AssertionError('a finished member was run again')
  monkeypatch.setattr(train, 'train_and_evaluate', refuse)
  monkeypatch.setattr(tightness_lib, 'measure_tightness', refuse)
  again = _run('slack', ['p_code0.3', 'p_code0.7'], tmp_path, image_root)
  assert results['trained_now'] == ['p_code0.3', 'p_code0.7']
  assert again['trained_now'] == []
  assert [r['clean_accuracy'] for r in again['members']] == [
      r['clean_accuracy'] for r in results['members']]


def test_margin_width_study_relative_gain(tmp_path, image_root):
  members = ['cll_eps0.15', 'gloro_eps0.15']
  _run('margin_width', members, tmp_path, image_root)
  results, markdown = _check_outputs(tmp_path, 'margin_width',
                                     ['margin_width.png'], members)
  # The image folder's 4 classes, read back from each run's dataset.json.
  assert [m['num_classes'] for m in results['members']] == [4, 4]
  cll, _ = _member_files(tmp_path, 'cll_eps0.15')
  gloro, gloro_config = _member_files(tmp_path, 'gloro_eps0.15')
  # eps_test = eps_train: CRA at 0.15 (not only at 36/255 = 0.1412).
  key = f'test_cra_{0.15:.4f}'
  want = (cll[key] - gloro[key]) / gloro[key] if gloro[key] else None
  gain = results['summary']['relative_gain']['0.15']
  assert gain == (None if want is None else pytest.approx(want))
  assert f"| 0.15 | {100 * cll[key]:.1f} | {100 * gloro[key]:.1f} |" in (
      markdown)
  # GloRo keeps its logarithmic eps ramp, scaled to the 1-epoch schedule.
  assert gloro_config['loss']['epsilon_schedule'] == 'logarithmic'
  assert gloro_config['loss']['epsilon_schedule_epochs'] == 1
  assert gloro['lipschitz_hf'] == gloro['lipschitz_f']


def test_margin_width_flags_a_trivial_classifier(tmp_path):
  # Numbers of results/studies/margin_width at eps 0.75 and 1.25: GloRo at
  # 1.25 is at chance (10.01% on 10 classes) and certifies 99.6% of its
  # correct points: (near) constant logits.
  def record(method, eps, clean, cra, classes=10):
    return {'params': {'method': method, 'epsilon': eps},
            'num_classes': classes, 'clean_accuracy': clean,
            'cra_train_eps': cra, 'lipschitz_f': 1.0, 'lipschitz_hf': 1.0,
            'tightness': None}
  records = [record('cll', 0.75, 0.427, 0.080),
             record('gloro', 0.75, 0.210, 0.077),
             record('cll', 1.25, 0.379, 0.034),
             record('gloro', 1.25, 0.1001, 0.0997)]
  assert [margin_width.is_trivial_classifier(r) for r in records] == [
      False, False, False, True]
  # Robust and accurate (two-moons-like) is not trivial; at chance with few
  # certified points is not either; without a class count nothing is said.
  assert not margin_width.is_trivial_classifier(
      record('cll', 0.15, 1.0, 0.9999, classes=2))
  assert not margin_width.is_trivial_classifier(
      record('gloro', 1.25, 0.1, 0.05))
  assert not margin_width.is_trivial_classifier(
      record('gloro', 1.25, 0.1001, 0.0997, classes=None))
  report = margin_width.report({'members': records}, str(tmp_path))
  summary = report.summary
  assert summary['trivial_classifiers'] == {'1.25': ['gloro']}
  assert summary['min_relative_gain'] == pytest.approx(
      (0.034 - 0.0997) / 0.0997)
  assert summary['min_relative_gain_without_trivial'] == pytest.approx(
      (0.080 - 0.077) / 0.077)
  assert '| 1.25 | 3.4 | 10.0 * |' in report.markdown
  assert 'Smallest gain without those radii: +3.9%' in report.markdown


def test_lambda_study(tmp_path, image_root):
  members = ['lambda1e-04', 'lambda1e-01']
  _run('lambda', members, tmp_path, image_root)
  results, markdown = _check_outputs(tmp_path, 'lambda', ['lambda.png'],
                                     members)
  for record in results['members']:
    _, config = _member_files(tmp_path, record['name'])
    assert config['loss']['lam'] == record['params']['lambda']
  assert '| 1e-01 |' in markdown and '| 1e-04 |' in markdown


def test_delta_study(tmp_path, image_root):
  _run('delta', ['delta0.30'], tmp_path, image_root)
  results, markdown = _check_outputs(tmp_path, 'delta', ['delta.png'],
                                     ['delta0.30'])
  _, config = _member_files(tmp_path, 'delta0.30')
  assert config['loss']['delta'] == 0.3 and config['loss']['epsilon'] == 0.15
  assert results['summary']['cra_36']['0.30'] == study.cra_at(
      results['members'][0], R36)
  assert '| 0.30 |' in markdown


def test_gloro_temperature_study(tmp_path, image_root):
  _run('gloro_temperature', ['s1', 's4'], tmp_path, image_root)
  results, _ = _check_outputs(tmp_path, 'gloro_temperature',
                              ['gloro_temperature.png'], ['s1', 's4'])
  for record in results['members']:
    final, config = _member_files(tmp_path, record['name'])
    scale = record['params']['s']
    assert config['loss']['gloro_logit_scale'] == scale
    # h(s f) is s times as steep as h(f): K^(h o f) = s K^(f).
    assert final['lipschitz_hf'] == pytest.approx(scale * final['lipschitz_f'])
  hf = [r['lipschitz_hf'] for r in results['members']]
  assert results['summary']['lipschitz_hf_ratio_max_min'] == pytest.approx(
      max(hf) / min(hf))


def test_convergence_study_reads_the_metric_logs(tmp_path, image_root):
  _run('convergence', None, tmp_path, image_root, epochs=2)
  results, markdown = _check_outputs(tmp_path, 'convergence',
                                     ['convergence.png'],
                                     ['cll', 'gloro_fixed_eps'])
  _, config = _member_files(tmp_path, 'gloro_fixed_eps')
  assert config['loss']['epsilon_schedule'] == 'fixed'
  assert config['train']['eval_every_epochs'] == 1
  curves = results['summary']['curves']
  for name, method in (('cll', 'cll'), ('gloro_fixed_eps', 'gloro')):
    with open(tmp_path / name / 'metrics.jsonl') as f:
      log = [json.loads(line) for line in f]
    assert curves[method]['epochs'] == [1, 2]
    assert curves[method]['cra_36'] == [r[f'test_cra_{R36:.4f}'] for r in log]
    reach = results['summary']['epochs_to_reach_fraction_of_final'][method]
    final_cra = log[-1][f'test_cra_{R36:.4f}']
    first = next(r['epoch'] for r in log
                 if r[f'test_cra_{R36:.4f}'] >= 0.9 * final_cra)
    assert reach['0.9'] == first
  assert '| 2 |' in markdown


def test_eps_p_grid_study_matches_table_d5_lipschitz(tmp_path, image_root):
  _run('eps_p_grid', ['eps0.5_p0.01'], tmp_path, image_root)
  results, markdown = _check_outputs(tmp_path, 'eps_p_grid',
                                     ['eps_p_grid.png'], ['eps0.5_p0.01'])
  grids = results['summary']['grids']
  row = results['summary']['p_code'].index(0.01)
  col = results['summary']['epsilons'].index(0.5)
  # Table D5: K^(h o f) = 10.6 at eps 0.5, p 0.01 (p_code = 2 p).
  assert grids['lipschitz_hf'][row][col] == pytest.approx(10.6, abs=0.05)
  final, config = _member_files(tmp_path, 'eps0.5_p0.01')
  assert grids['clean'][row][col] == final['test_accuracy']
  assert grids['cra_108'][row][col] == final[f'test_cra_{108 / 255:.4f}']
  filled = sum(v is not None for r in grids['clean'] for v in r)
  assert filled == 1  # the other 24 cells are missing
  assert config['model']['name'] == 'tiny_cnn'  # tiny mode over 8C2F's base
  assert config['loss']['lam'] == 1e-5  # the 8C2F base (table B4)
  assert '**K^(h o f)**' in markdown


def test_seeds_study_mean_and_std(tmp_path, image_root):
  _run('seeds', ['seed0', 'seed1'], tmp_path, image_root)
  results, markdown = _check_outputs(tmp_path, 'seeds', ['seeds.png'],
                                     ['seed0', 'seed1'])
  clean = [_member_files(tmp_path, n)[0]['test_accuracy']
           for n in ('seed0', 'seed1')]
  entry = results['summary']['clean accuracy %']
  assert entry['mean'] == pytest.approx(100 * np.mean(clean))
  assert entry['std'] == pytest.approx(100 * np.std(clean, ddof=1))
  for name, seed in (('seed0', 0), ('seed1', 1)):
    assert _member_files(tmp_path, name)[1]['seed'] == seed
  assert 'mean +- std' in markdown


def test_collect_only_gathers_finished_members_and_lists_missing(
    tmp_path, image_root):
  _run('lambda', ['lambda1e-04'], tmp_path, image_root)
  os.remove(tmp_path / 'lambda1e-04' / 'tightness.json')
  results = _run('lambda', None, tmp_path, image_root, collect_only=True)
  assert [r['name'] for r in results['members']] == ['lambda1e-04']
  assert len(results['missing']) == len(STUDIES['lambda'].members) - 1
  assert results['trained_now'] == []
  # The missing tightness was measured again at this budget.
  assert results['members'][0]['tightness']['tightness_pairs'] == 4


def test_member_selection_and_overrides_are_checked(tmp_path, image_root):
  with pytest.raises(ValueError, match="no member 'p_code9'"):
    _run('slack', ['p_code9'], tmp_path, image_root)
  config = configs.default_config()
  with pytest.raises(ValueError, match="unknown config field 'loss.pp'"):
    study.apply_overrides(config, {'loss.pp': 1.0})
  with pytest.raises(ValueError, match="'train.batch_size' cannot take"):
    study.apply_overrides(config, {'train.batch_size': 'many'})
  study.apply_overrides(config, [study.parse_override('data.kwargs.root=/x'),
                                 study.parse_override('eval.radii=(0.5,)')])
  assert config.data.kwargs.root == '/x' and config.eval.radii == (0.5,)
  with pytest.raises(ValueError, match='field=value'):
    study.parse_override('train.batch_size')
  assert not os.listdir(tmp_path)  # nothing ran


def test_member_config_order_epochs_then_caller_overrides():
  options = study.StudyOptions(epochs=20, overrides=(
      ('optimizer.decay_epochs', ()),))
  config = study.member_config(STUDIES['margin_width'],
                               STUDIES['margin_width'].member('gloro_eps0.5'),
                               options)
  assert config.loss.epsilon == 0.5 and config.loss.name == 'gloro'
  assert config.train.num_epochs == 20
  assert config.loss.epsilon_schedule_epochs == 10  # 400 of 800, scaled
  assert tuple(config.optimizer.decay_epochs) == ()  # the caller's, last
  paper = study.member_config(STUDIES['slack'],
                              STUDIES['slack'].member('p_code0.8'),
                              study.StudyOptions())
  assert paper.train.num_epochs == 800  # default: the paper's schedule
  assert tuple(paper.optimizer.decay_epochs) == (400, 600, 780)


def test_shorten_schedule_scales_every_epoch_based_schedule():
  c = cifar10_4c3f_gloro.get_config()
  c.loss.name = 'gloro_trades'
  c.loss.p_anneal_epochs = 200
  configs.shorten_schedule(c, 8)
  assert tuple(c.optimizer.decay_epochs) == (4, 6, 8)
  assert c.loss.epsilon_schedule_epochs == 4
  assert c.loss.p_anneal_epochs == 2
  assert c.loss.trades_beta_epochs == 4
  with pytest.raises(ValueError, match='epochs must be an integer >= 1'):
    configs.shorten_schedule(c, 0)


def test_report_helpers_against_hand_values():
  assert margin_width.relative_gain(0.62, 0.60) == pytest.approx(1 / 30)
  assert margin_width.relative_gain(0.5, 0.0) is None
  mean, std = seeds.mean_std([0.2, 0.4, None, 0.6])
  assert (mean, std) == (pytest.approx(0.4), pytest.approx(0.2))
  assert convergence.epochs_to_reach([1, 2, 3], [0.1, 0.5, 0.52], 0.95) == 2


def test_cli_lists_studies_and_collects_an_empty_workdir(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO)
  listing = subprocess.run(
      [sys.executable, '-m', 'experiments.study', '--list'], cwd=REPO,
      env=env, capture_output=True, text=True, check=True).stdout
  for name in STUDIES:
    assert f'{name}: ' in listing
  subprocess.run(
      [sys.executable, '-m', 'experiments.study', '--study=delta',
       '--collect_only', f'--workdir={tmp_path}'], cwd=REPO, env=env,
      capture_output=True, text=True, check=True)
  with open(tmp_path / 'delta.md') as f:
    assert 'No member has finished yet.' in f.read()


def test_cli_base_flag():
  # The rule lives in the library: importing the CLI module would define its
  # absl flags (--workdir) a second time beside experiments.certify's.
  assert study.parse_bases(STUDIES['seeds'], ['x.py']) == {'cll': 'x.py'}
  assert study.parse_bases(STUDIES['margin_width'], ['gloro=y.py']) == {
      'gloro': 'y.py'}
  with pytest.raises(ValueError, match='ROLE=PATH'):
    study.parse_bases(STUDIES['margin_width'], ['x.py'])
  with pytest.raises(ValueError, match="unknown role 'crm'"):
    study.parse_bases(STUDIES['margin_width'], ['crm=x.py'])
