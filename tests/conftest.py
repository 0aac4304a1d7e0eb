"""Test set-up: 8 fake CPU devices for the data-parallel tests.

The flag must be set before JAX initialises its backends, so it lives here,
above every import of jax in the test session.
"""

import os

os.environ.setdefault('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=8'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Keep TensorFlow (pulled in by TFDS) quiet and off any accelerator.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
