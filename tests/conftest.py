"""Test-session setup: 8 fake CPU devices for the multi-device tests.

XLA reads the flag when the CPU backend starts, so it must be set before
anything imports jax; conftest.py is imported before every test module.
"""

import os

_flag = '--xla_force_host_platform_device_count=8'
if _flag not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _flag).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Many tests (and their subprocesses: crash loop, multi-host) compile the same
# smoke-sized training step; JAX's persistent cache lets every run after the
# first load it instead of compiling again. Compilation is deterministic, so
# results are the same either way.
import tempfile  # pylint: disable=g-import-not-at-top
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'ssl_jax_tests_jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
import sys  # pylint: disable=g-import-not-at-top
if 'jax' in sys.modules:
  # JAX reads those variables when it is imported; mutmut's fork server
  # (setup.cfg) imports it before this file runs, and without the cache every
  # mutant compiled all its tests' programs afresh, even the ones its mutation
  # leaves unchanged.
  sys.modules['jax'].config.update('jax_compilation_cache_dir',
                                   os.environ['JAX_COMPILATION_CACHE_DIR'])
  sys.modules['jax'].config.update(
      'jax_persistent_cache_min_compile_time_secs',
      float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))
# TensorFlow is only the input pipeline here; keep it off the GPU and small.
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')


import importlib  # pylint: disable=g-import-not-at-top


def pytest_configure(config):
  """Prepares Fashion-MNIST once, before pytest-xdist starts its workers.

  Workers that found it missing would otherwise all build the same TFDS
  files at once. Runs in the controller only (workers have `workerinput`).
  """
  if hasattr(config, 'workerinput'):
    return
  if 'MUTANT_UNDER_TEST' in os.environ:
    # mutmut runs the loss tests once per mutant: they need no dataset, and
    # importing TensorFlow would add seconds to every mutant.
    return
  try:
    from ssl_jax import cli
    from ssl_jax import input_pipeline
    with cli.stderr_to_devnull():   # TensorFlow's C++ start-up lines
      importlib.import_module('tensorflow')
    input_pipeline.load_split('fashion_mnist', 'test')
  except Exception as error:  # pylint: disable=broad-except
    # The tests that need the data report the problem (and how to fix it) themselves.
    print(f'conftest: Fashion-MNIST could not be prepared: {error}')
