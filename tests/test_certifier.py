"""Certifying new images from a workdir: `cll_jax.certifier`, experiments.certify.

A tiny image classifier is trained through the real loop on a generated
image folder; its workdir alone must then reproduce the run's own
evaluation, and every radius it reports must survive a PGD attack.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cll_jax import attacks
from cll_jax import certifier as certifier_lib
from cll_jax import certify
from cll_jax import forward_error
from cll_jax import train
from experiments import certify as certify_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def run(trained_image_run):
  """The tiny_cnn of conftest.py (6 epochs, eval batch 40, radii 0.05, 0.1)."""
  return trained_image_run


def test_certify_cli_reproduces_the_runs_own_evaluation(run, tmp_path):
  summary = certify_cli.run(run['workdir'], 'test',
                            output=str(tmp_path / 'test'), show=0)
  assert summary['count'] == run['final']['test_count'] == 96
  assert summary['bound'] == 'sound'
  assert summary['accuracy'] == pytest.approx(run['final']['test_accuracy'])
  for radius, value in summary['cra'].items():
    assert value == pytest.approx(run['final'][f'test_cra_{radius}'],
                                  abs=1e-6), radius
  rows = list(open(tmp_path / 'test.csv'))
  assert len(rows) == 97 and rows[0].startswith('input,predicted,class_name')


def test_radii_equal_the_training_path_and_survive_pgd(run):
  c = certifier_lib.Certifier.from_workdir(run['workdir'])
  x, labels, _ = certifier_lib.load_inputs('test', c)
  result = c.certify(x, labels)
  # The training loop's own certification path, from the checkpoint.
  model, state = run['model'], run['state']
  # As the loop evaluates: jitted, from the state, in `eval.precision`
  # (float64), every margin giving up the logits' rounding bound.
  with forward_error.precision_scope('float64'):
    bounds = jax.jit(functools.partial(
        train.certification_bounds, model=model, input_shape=(8, 8, 3),
        method='sound'))(state)
    out, error = jax.jit(lambda v, z, e: forward_error.certified_forward(
        model.apply, v, z, e))(state.variables, jnp.asarray(x),
                               bounds['logit_error'])
    radius = np.asarray(certify.certified_radius(out.logits,
                                                 bounds['pairwise'], error))
    pairwise = np.asarray(bounds['pairwise'])
  # Equal up to the float64 rounding of differently fused forward passes.
  np.testing.assert_allclose(result.radius, radius, rtol=1e-12, atol=1e-14)
  np.testing.assert_array_equal(np.asarray(c.pairwise_lipschitz), pairwise)
  certified = result.radius > 0
  assert certified.sum() >= 10
  apply_fn = lambda z: c.model.apply(c.variables, z).logits
  pred = jnp.asarray(result.predictions[certified])
  _, margins = jax.jit(lambda z, r: attacks.pgd_l2_attack(
      apply_fn, z, pred, r, rng=jax.random.PRNGKey(0), num_steps=50,
      num_restarts=8, clip_min=0.0, clip_max=1.0))(
          jnp.asarray(x[certified]), 0.999 * jnp.asarray(
              result.radius[certified]))
  assert np.all(np.asarray(margins) > 0)


def test_image_files_folders_and_npz(run, tmp_path):
  c = certifier_lib.Certifier.from_workdir(run['workdir'])
  folder = os.path.join(run['root'], 'test')
  x, labels, names = certifier_lib.load_inputs(folder, c)
  assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
  assert len(x) == 96 and sorted(set(labels.tolist())) == [0, 1, 2, 3]
  by_folder = c.certify(x, labels)
  one_file = names[5]
  single, no_labels, _ = certifier_lib.load_inputs(one_file, c)
  assert no_labels is None
  alone = c.certify(single)
  # A batch of one rounds differently from a batch of 96 (ulps).
  assert alone.radius[0] == pytest.approx(by_folder.radius[5], rel=1e-6)
  assert alone.class_names[0] == by_folder.class_names[5]
  np.savez(tmp_path / 'batch.npz', images=(x[:7] * 255).round().astype(
      np.uint8), labels=labels[:7])
  xz, lz, _ = certifier_lib.load_inputs(str(tmp_path / 'batch.npz'), c)
  np.testing.assert_allclose(xz, x[:7], atol=1e-6)
  np.testing.assert_array_equal(lz, labels[:7])


def test_wrong_inputs_are_refused(run, tmp_path):
  c = certifier_lib.Certifier.from_workdir(run['workdir'])
  x, _, _ = certifier_lib.load_inputs('test', c)
  with pytest.raises(ValueError, match='uint8.*to_float'):
    c.certify((x * 255).astype(np.uint8))
  with pytest.raises(ValueError, match=r'\[0, 1\]'):
    c.certify(x * 255.0)
  with pytest.raises(ValueError, match=r'shape \(B, 8, 8, 3\)'):
    c.certify(x[:, :4])
  big = tmp_path / 'big.png'
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(big)
  with pytest.raises(ValueError, match='big.png.*trained on'):
    certifier_lib.load_inputs(str(big), c)
  with pytest.raises(FileNotFoundError, match='config.json'):
    certifier_lib.Certifier.from_workdir(str(tmp_path))


def test_command_line(run, tmp_path):
  image = os.path.join(run['root'], 'test', 'class_2', '3.png')
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.certify',
       f'--workdir={run["workdir"]}', f'--images={image}',
       f'--output={tmp_path / "one"}'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'radius' in result.stdout
  summary = json.load(open(tmp_path / 'one.json'))
  assert summary['count'] == 1 and 'cra' not in summary
