"""Test set-up: 8 fake CPU devices, patient collectives, a private cache.

The XLA flags must be set before JAX initialises its backends, so they live
here, above every import of jax in the test session.

* 8 fake CPU devices for the data-parallel tests.
* XLA's CPU collectives abort the process when one participant waits more
  than 40 s at a rendezvous; with 8 fake devices on 2 busy cores a
  participant can lag that long, and the whole test session died with
  `Fatal Python error: Aborted`. The limits are raised to 20 minutes.
* LLVM optimisation level 1 for XLA's CPU code (default 2): the tests
  compile hundreds of programs and run most of them for a few steps, so
  compilation dominates their time; level 1 compiles the models' programs
  in 30-60% less time (a model's init 5.4 s -> 3.1 s, the two-moons study
  72 s -> 43 s), while the convolutions and matrix products (library
  kernels, not generated code) run as fast. It is no fast-math: results
  are IEEE float32/float64 either way, though fused loops may differ from
  level 2's in the last bits, as between any two compilers; every test
  compares with independent computations under tolerances, not with bits
  of a level-2 run. Set XLA_FLAGS to choose another level.
* Data caches and JAX's compilation cache go to a temporary folder removed
  after the session, not to `~/.cache/cll_jax` (set CLL_JAX_TEST_CACHE to
  keep one between sessions); pytest-xdist workers (`-n 2`, the README's
  command) share the controller's folder.
* `trained_image_run`: one tiny image classifier trained through the real
  loop, shared by the test files that attack and certify it.
"""

import os
import shutil
import tempfile

import pytest

_XLA_FLAGS = (
    ('--xla_force_host_platform_device_count', '8'),
    ('--xla_backend_optimization_level', '1'),
    ('--xla_cpu_collective_call_terminate_timeout_seconds', '1200'),
    ('--xla_cpu_collective_timeout_seconds', '1200'),
)
os.environ.setdefault('XLA_FLAGS', '')
for _flag, _value in _XLA_FLAGS:
  if _flag not in os.environ['XLA_FLAGS']:
    os.environ['XLA_FLAGS'] += f' {_flag}={_value}'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Keep TensorFlow (pulled in by TFDS) quiet and off any accelerator.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

_PRIVATE_CACHE = None
if os.environ.get('CLL_JAX_TEST_CACHE'):
  os.environ['CLL_JAX_CACHE'] = os.environ['CLL_JAX_TEST_CACHE']
elif (os.environ.get('PYTEST_XDIST_WORKER')
      and os.environ.get('_CLL_JAX_SESSION_CACHE')):
  # A pytest-xdist worker shares its controller's cache (inherited through
  # the environment; the controller removes it): the workers then compile
  # each program and decode each archive once between them. Both caches
  # write atomically, so concurrent workers are safe.
  os.environ['CLL_JAX_CACHE'] = os.environ['_CLL_JAX_SESSION_CACHE']
else:
  _PRIVATE_CACHE = tempfile.mkdtemp(prefix='cll_jax_test_cache_')
  os.environ['CLL_JAX_CACHE'] = _PRIVATE_CACHE
  os.environ['_CLL_JAX_SESSION_CACHE'] = _PRIVATE_CACHE
# Many tests train the same tiny configs and compile the same XLA programs
# (each `train_and_evaluate` call jits afresh); XLA's CPU compiles dominate
# their time. JAX's persistent compilation cache, private to this session
# (and inherited by the subprocesses of tests), compiles each program once.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(os.environ['CLL_JAX_CACHE'], 'jax'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _PRIVATE_CACHE is not None:
    shutil.rmtree(_PRIVATE_CACHE, ignore_errors=True)


@pytest.fixture(scope='session')
def trained_image_run(tmp_path_factory):
  """A tiny_cnn trained through `train_and_evaluate` on a generated folder.

  Shared by test_certifier.py (its workdir reproduces the run's evaluation,
  its radii survive PGD) and test_soundness.py (its sound certificates
  survive PGD and dominate lower bounds), which trained the same network
  each on its own. 4 classes, 192 training and 96 test images of 8x8x3; the
  eval batch of 40 leaves a padded last batch; one device (the
  data-parallel loop is tested in test_train.py and
  test_shipped_configs.py).
  """
  # Imported here: jax must not be imported before the flags above are set.
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cll_jax import train  # pylint: disable=g-import-not-at-top
  from experiments import cifar10_4c3f  # pylint: disable=g-import-not-at-top
  import image_fixtures  # pylint: disable=g-import-not-at-top
  root = str(tmp_path_factory.mktemp('images'))
  image_fixtures.write_image_folder(root)
  workdir = str(tmp_path_factory.mktemp('run'))
  config = cifar10_4c3f.get_config('data=offline,tiny')
  config.data.kwargs.root = root
  config.data.kwargs.cache_dir = os.path.join(root, 'cache')
  config.model.name = 'tiny_cnn'
  config.train.num_epochs = 6
  config.train.batch_size = 32
  config.eval.batch_size = 40  # 96 test images: a padded last batch
  config.train.eval_every_epochs = 6
  config.train.checkpoint_every_epochs = 6
  config.train.progress_bar = False
  config.data.num_train_examples = None
  config.data.num_test_examples = None
  config.data.augment.enabled = False
  config.loss.epsilon = 0.3
  config.eval.radii = (0.05, 0.1)
  final = train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  dataset = train.load_dataset(config)
  model, state = train.restore_state(config, workdir, 4, (8, 8, 3))
  x = jnp.asarray(dataset.test_images, jnp.float32) / 255.0
  return dict(root=root, workdir=workdir, config=config, final=final,
              model=model, state=state, x=x, y=dataset.test_labels)
