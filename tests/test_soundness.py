"""Certificates of trained models survive attacks and dominate lower bounds.

Two small models are trained through the real loop (`train_and_evaluate`):
two-moons and a tiny image classifier on a generated image folder (conftest's
`trained_image_run`, shared with test_certifier.py). Their certificates
(sound layer bounds, strict margin rule) are then attacked with multi-restart
PGD at the certified radius, and the bounds are compared with empirical lower
bounds (eq. 19) and exact Jacobian norms.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cll_jax import attacks
from cll_jax import certify
from cll_jax import forward_error
from cll_jax import train
from experiments import moons_cll


@pytest.fixture(scope='module')
def trained_moons(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('moons'))
  config = moons_cll.get_config('tiny')
  config.train.num_epochs = 30
  config.data.kwargs.num_train = 512
  config.data.kwargs.num_test = 256
  config.train.batch_size = 64
  config.eval.batch_size = 128
  config.train.eval_every_epochs = 30
  config.train.checkpoint_every_epochs = 30
  config.train.progress_bar = False
  config.optimizer.decay_epochs = ()
  config.loss.p_start = config.loss.p_end = 0.01
  train.train_and_evaluate(config, workdir)
  dataset = train.load_dataset(config)
  model, state = train.restore_state(config, workdir, 2, (2,))
  return _with_bounds(dict(config=config, model=model, state=state,
                           x=jnp.asarray(dataset.test_images),
                           input_shape=(2,), clip=(None, None)))


@pytest.fixture(scope='module')
def trained_images(trained_image_run):
  """The tiny_cnn of conftest.py (6 epochs, shared with test_certifier)."""
  return _with_bounds(dict(trained_image_run, input_shape=(8, 8, 3),
                           clip=(0.0, 1.0)))


def _with_bounds(trained):
  """Adds the sound bounds (jitted, once per model: every test reads them)."""
  trained['bounds'] = jax.jit(lambda state: train.certification_bounds(
      state, trained['model'], trained['input_shape'], 'sound'))(
          trained['state'])
  return trained


@pytest.fixture(params=['trained_moons', 'trained_images'])
def trained(request):
  return request.getfixturevalue(request.param)


def _apply(trained):
  model, variables = trained['model'], trained['state'].variables
  return lambda x: model.apply(variables, x).logits


def test_pgd_breaks_no_certified_point(trained):
  apply_fn = _apply(trained)
  bounds = trained['bounds']
  x = trained['x']
  logits = jax.jit(apply_fn)(x)
  radius = certify.certified_radius(logits, bounds['pairwise'])
  certified = np.asarray(radius > 0)
  assert certified.sum() >= 10, 'too few certified points to test'
  x, radius = x[certified], radius[certified]
  pred = jnp.argmax(logits[certified], -1)
  clip_min, clip_max = trained['clip']
  # One compiled attack for both radii (the key is an argument).
  attack = jax.jit(lambda x, r, key: attacks.pgd_l2_attack(
      apply_fn, x, pred, r, rng=key, num_steps=60, num_restarts=16,
      clip_min=clip_min, clip_max=clip_max)[1])
  # Just inside each point's own certified radius, many restarts.
  margins = attack(x, 0.999 * radius, jax.random.PRNGKey(0))
  assert np.all(np.asarray(margins) > 0)
  # Not vacuous: the same attack at 20x the radius flips some of them.
  far = attack(x, 20.0 * radius, jax.random.PRNGKey(1))
  assert np.mean(np.asarray(far) <= 0) > 0.2


def test_empirical_lower_bound_never_exceeds_sound_bound(trained):
  apply_fn = _apply(trained)
  bounds = trained['bounds']
  x1, x2 = attacks.sample_pairs(trained['x'], 64, jax.random.PRNGKey(2))
  clip_min, clip_max = trained['clip']
  best, per_pair = jax.jit(lambda a, b: attacks.empirical_lipschitz_lower_bound(
      apply_fn, a, b, num_steps=100, learning_rate=3e-3,
      clip_min=clip_min, clip_max=clip_max))(x1, x2)
  upper = float(jnp.max(bounds['pairwise']))
  assert float(best) <= upper
  assert float(best) > 0
  assert np.all(np.asarray(per_pair) <= upper)


def test_network_bound_dominates_jacobian_norms(trained):
  model, variables = trained['model'], trained['state'].variables
  bounds = trained['bounds']
  shape = trained['input_shape']
  points = jax.random.uniform(jax.random.PRNGKey(3), (32, *shape),
                              minval=-1.0, maxval=2.0)

  def logits_one(x):
    return model.apply(variables, x[None]).logits[0]

  jac = jax.jit(jax.vmap(jax.jacobian(logits_one)))(points)
  jac = np.asarray(jac, np.float64).reshape(32, jac.shape[1], -1)
  spectral = np.linalg.svd(jac, compute_uv=False)[:, 0]
  assert np.all(spectral <= float(bounds['lipschitz']))
  pairwise = np.asarray(bounds['pairwise'])
  n = jac.shape[1]
  for i in range(n):
    for j in range(i + 1, n):
      grad_norm = np.linalg.norm(jac[:, i] - jac[:, j], axis=-1)
      assert np.all(grad_norm <= pairwise[i, j])


def _certify_in(trained, precision, radii):
  """What `train.evaluate` computes, in `precision`, per point and radius."""
  model = trained['model']

  @jax.jit
  def run(state, x, y):
    bounds = train.certification_bounds(state, model, trained['input_shape'],
                                        'sound')
    out, margin_error = forward_error.certified_forward(
        state.apply_fn, state.variables, x, bounds['logit_error'])
    certified = jnp.stack([certify.certified_correct(
        out.logits, y, bounds['pairwise'], r, margin_error) for r in radii])
    return out.logits, margin_error, bounds['pairwise'], certified

  with forward_error.precision_scope(precision):
    logits, margin_error, pairwise, certified = run(
        trained['state'], trained['x'], jnp.asarray(trained['y']))
  return dict(logits=np.asarray(logits, np.float64),
              margin_error=np.asarray(margin_error, np.float64),
              pairwise=np.asarray(pairwise, np.float64),
              certified=np.asarray(certified))


def test_float64_and_float32_certification_agree_within_allowance(
    trained_images):
  # The conv net (the moons MLP adds compile time and nothing new).
  trained = trained_images
  eps = trained['config'].loss.epsilon
  radii = (0.25 * eps, 0.5 * eps, eps)
  f64 = _certify_in(trained, 'float64', radii)
  f32 = _certify_in(trained, 'float32', radii)
  # The float32 margins are within the float32 bound of the float64 ones
  # (which are within theirs of the exact margins).
  diff = f32['logits'] - f64['logits']
  deviation = diff.max(axis=1) - diff.min(axis=1)
  assert np.all(deviation <= f32['margin_error'] + f64['margin_error'])
  # A point may change only where its float64 margin is within the
  # allowances (and the gap of the two K bounds) of eps * K; the CRAs then
  # differ by at most the fraction of such points.
  top = np.argmax(f64['logits'], axis=1)
  rows = np.arange(len(top))
  margins = f64['logits'][rows, top][:, None] - f64['logits']
  not_top = np.arange(margins.shape[1])[None, :] != top[:, None]
  k64, k32 = f64['pairwise'][top], f32['pairwise'][top]
  for i, r in enumerate(radii):
    slack = np.min(np.where(not_top, margins - r * k64, np.inf), axis=1)
    band = (f32['margin_error'] + f64['margin_error'] + deviation
            + r * np.max(np.abs(k32 - k64), axis=1)
            + 1e-6 * (np.abs(margins).max(axis=1) + r * k64.max(axis=1)))
    changed = f64['certified'][i] != f32['certified'][i]
    assert np.all(np.abs(slack[changed]) <= band[changed])
    near = np.abs(slack) <= band
    assert abs(int(f64['certified'][i].sum())
               - int(f32['certified'][i].sum())) <= int(near.sum())
  assert f64['certified'][0].sum() >= 10  # not vacuous
