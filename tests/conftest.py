"""Test set-up: 8 fake CPU devices, patient collectives, a private cache.

The XLA flags must be set before JAX initialises its backends, so they live
here, above every import of jax in the test session.

* 8 fake CPU devices for the data-parallel tests.
* XLA's CPU collectives abort the process when one participant waits more
  than 40 s at a rendezvous; with 8 fake devices on 2 busy cores a
  participant can lag that long, and the whole test session died with
  `Fatal Python error: Aborted`. The limits are raised to 20 minutes.
* Data caches and JAX's compilation cache go to a temporary folder removed
  after the session, not to `~/.cache/cll_jax` (set CLL_JAX_TEST_CACHE to
  keep one between sessions).
"""

import os
import shutil
import tempfile

_XLA_FLAGS = (
    ('--xla_force_host_platform_device_count', '8'),
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
else:
  _PRIVATE_CACHE = tempfile.mkdtemp(prefix='cll_jax_test_cache_')
  os.environ['CLL_JAX_CACHE'] = _PRIVATE_CACHE
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
