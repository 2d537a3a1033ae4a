"""The CLI's re-execution under tcmalloc (ssl_jax/allocator.py)."""

import os
import subprocess
import sys

import pytest

from ssl_jax import allocator


def _run(**env):
  env = {k: v for k, v in dict(os.environ, **env).items() if k != 'LD_PRELOAD'}
  return subprocess.run([sys.executable, '-m', 'ssl_jax.allocator'], env=env,
                        capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(allocator.find_tcmalloc() is None,
                    reason='tcmalloc is not installed (apt-get install libtcmalloc-minimal4)')
def test_a_command_reexecutes_itself_under_tcmalloc():
  out = _run()
  assert out.returncode == 0, out.stderr
  assert 'tcmalloc loaded' in out.stdout


def test_system_malloc_on_request_and_a_clear_error_for_a_typo():
  out = _run(SSL_JAX_MALLOC='system')
  assert out.returncode == 0 and 'glibc malloc' in out.stdout
  out = _run(SSL_JAX_MALLOC='tcmaloc')
  assert out.returncode != 0
  assert 'SSL_JAX_MALLOC must be "tcmalloc" or "system"' in out.stderr


def test_no_tcmalloc_installed_leaves_the_process_alone(monkeypatch):
  monkeypatch.setattr(allocator, 'find_tcmalloc', lambda: None)
  monkeypatch.setattr(allocator, 'tcmalloc_loaded', lambda: False)
  monkeypatch.delenv(allocator._REEXEC_MARK, raising=False)
  monkeypatch.delenv(allocator.ENV_SWITCH, raising=False)
  allocator.reexec_with_tcmalloc('ssl_jax.allocator')   # returns instead of exec
  assert 'libtcmalloc-minimal4' in allocator.warn_if_missing()
