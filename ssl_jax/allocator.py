"""A caching memory allocator (tcmalloc) for training on CPUs.

Why: XLA:CPU allocates an execution's buffers anew on every call, and glibc's
malloc serves every block over 32 MiB (its largest mmap threshold) with fresh
pages from the kernel, which are zeroed and page-faulted in on first touch.
A training step therefore page-faults through all of its large activations
every time. Measured on 2 Xeon cores, default step (benchmarks/train_step.py):
118,000 minor page faults and 0.23 s of system time per step with glibc;
3 faults and 0.008 s with tcmalloc, which keeps freed memory for reuse, and
the step about 15% faster. mallopt() cannot lift glibc's 32 MiB threshold
cap, and jemalloc's default decay returns the pages just the same.

The dynamic linker picks the allocator when the process starts, so the
command-line entry points (ssl_jax.main, ssl_jax.diagnose) re-execute
themselves once with tcmalloc in LD_PRELOAD when it is installed (Debian and
Ubuntu: `apt-get install libtcmalloc-minimal4`). SSL_JAX_MALLOC=system turns
this off. Nothing changes numerically: only where memory comes from.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from typing import Optional, Sequence

ENV_SWITCH = 'SSL_JAX_MALLOC'        # 'tcmalloc' (default) or 'system'
_REEXEC_MARK = '_SSL_JAX_MALLOC_REEXEC'
_LIBRARIES = ('libtcmalloc_minimal.so.4', 'libtcmalloc.so.4')
_DIRECTORIES = ('/usr/lib/x86_64-linux-gnu', '/usr/lib/aarch64-linux-gnu', '/usr/lib64',
                '/usr/lib', '/usr/local/lib')
INSTALL_HINT = ('install tcmalloc (Debian/Ubuntu: apt-get install libtcmalloc-minimal4) for '
                'about 15% faster CPU steps; SSL_JAX_MALLOC=system silences this')


def find_tcmalloc(directories: Sequence[str] = _DIRECTORIES) -> Optional[str]:
  """The path of an installed tcmalloc shared library, or None."""
  for directory in directories:
    for name in _LIBRARIES:
      path = os.path.join(directory, name)
      if os.path.exists(path):
        return path
  name = ctypes.util.find_library('tcmalloc_minimal') or ctypes.util.find_library('tcmalloc')
  return name


def tcmalloc_loaded() -> bool:
  """Whether this process runs with tcmalloc (it appears in its memory map)."""
  try:
    with open('/proc/self/maps') as f:
      return 'tcmalloc' in f.read()
  except OSError:
    return False


def reexec_with_tcmalloc(module: str) -> None:
  """Replaces this process with `python -m module <same args>` under tcmalloc.

  Returns (doing nothing) when tcmalloc is already loaded, is not installed,
  is switched off (SSL_JAX_MALLOC=system), or a re-execution was already
  tried. Call it first thing in a command's main, before JAX starts: exec
  keeps the process id, so launchers, signals and SLURM see one process.
  """
  choice = os.environ.get(ENV_SWITCH, 'tcmalloc')
  if choice not in ('tcmalloc', 'system'):
    raise ValueError(f'{ENV_SWITCH} must be "tcmalloc" or "system", got {choice!r}.')
  if (choice == 'system' or os.environ.get(_REEXEC_MARK) or not sys.platform.startswith('linux')
      or tcmalloc_loaded()):
    return
  path = find_tcmalloc()
  if path is None:
    return
  preload = os.environ.get('LD_PRELOAD', '')
  env = dict(os.environ, LD_PRELOAD=f'{path} {preload}'.strip(), **{_REEXEC_MARK: '1'})
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, '-m', module] + sys.argv[1:], env)


def warn_if_missing() -> Optional[str]:
  """A one-line hint when training on CPU without tcmalloc (None otherwise)."""
  if os.environ.get(ENV_SWITCH) == 'system' or tcmalloc_loaded():
    return None
  return f'ssl_jax: glibc malloc page-faults through every step on CPU; {INSTALL_HINT}.'


def main() -> None:
  """`python -m ssl_jax.allocator`: says which allocator a command would run with."""
  reexec_with_tcmalloc('ssl_jax.allocator')
  if tcmalloc_loaded():
    print(f'ssl_jax: tcmalloc loaded ({find_tcmalloc()})')
  else:
    print('ssl_jax: glibc malloc' + (f' ({ENV_SWITCH}=system)' if os.environ.get(ENV_SWITCH)
                                     == 'system' else f'; {INSTALL_HINT}'))


if __name__ == '__main__':
  main()
