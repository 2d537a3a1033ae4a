"""One OpenBLAS thread for the LAPACK calls inside a CPU training step.

Why: jaxlib computes Cholesky, SVD, eigh and triangular solves on the CPU by
calling SciPy's LAPACK, which on PyPI wheels is OpenBLAS with its own pool of
worker threads. Those threads busy-wait for more work for a while after each
call. Inside a training step XLA's own thread pool already has every core, so
the two 256x256 Cholesky factorisations of the default log-det term left a
spinning thread that took one of the cores from the convolutions: in the
default step's trace (2-core EPYC, tcmalloc) the two factorisations took 12.3
and 7.1 ms, against 0.26 ms for one alone, and the step, timed in alternating
rounds in one process, took 361 ms against 297 ms with one OpenBLAS thread
(docs/speed.md).
LAPACK on matrices of a few hundred rows gains nothing from a second thread.
The numbers change by float32 round-off at most: the default step's parameters
after four steps were bitwise equal either way, and the log-det term's gradient
alone (256 x 1024, Gram route) differed by 3.8e-7 of its largest entry, because a
threaded OpenBLAS blocks the factorisation, and so orders its sums, differently.

`one_thread()` sets every OpenBLAS loaded in the process to one thread while
it is active and gives each back its previous count afterwards, so a notebook
that trains and then uses NumPy keeps its threads. Where no OpenBLAS is
loaded (MKL, Apple's Accelerate, a non-Linux system), it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
from typing import Iterator

# The setter and getter names of OpenBLAS builds: SciPy's and NumPy's wheels
# prefix them (scipy_openblas, and a 64 suffix for the ILP64 build); a system
# OpenBLAS has the plain names.
_SYMBOLS = (('scipy_openblas_set_num_threads64_', 'scipy_openblas_get_num_threads64_'),
            ('scipy_openblas_set_num_threads', 'scipy_openblas_get_num_threads'),
            ('openblas_set_num_threads64_', 'openblas_get_num_threads64_'),
            ('openblas_set_num_threads', 'openblas_get_num_threads'))


def _load_lapack() -> None:
  """Loads the LAPACK that jaxlib calls (SciPy's), as jaxlib's first linalg op would."""
  try:
    importlib.import_module('scipy.linalg.cython_lapack')
  except ImportError:
    pass


def loaded_openblas() -> list[str]:
  """Paths of the OpenBLAS libraries mapped into this process (Linux; else [])."""
  try:
    with open('/proc/self/maps') as f:
      paths = {line.split()[-1] for line in f if 'openblas' in line.lower()}
  except OSError:
    return []
  return sorted(p for p in paths if p.startswith('/'))


def _controls(path: str):
  """(set_num_threads, get_num_threads) of the library at path, or None."""
  try:
    library = ctypes.CDLL(path)
  except OSError:
    return None
  for set_name, get_name in _SYMBOLS:
    setter, getter = getattr(library, set_name, None), getattr(library, get_name, None)
    if setter is not None and getter is not None:
      setter.argtypes, setter.restype, getter.restype = [ctypes.c_int], None, ctypes.c_int
      return setter, getter
  return None


def _controlled() -> dict[str, tuple]:
  """{path: (set_num_threads, get_num_threads)} of every OpenBLAS loaded in this
  process, after loading the one jaxlib's linear algebra will call."""
  _load_lapack()
  return {path: controls for path in loaded_openblas()
          if (controls := _controls(path)) is not None}


def thread_counts() -> dict[str, int]:
  """{path: threads} of every OpenBLAS loaded in this process (SciPy's included)."""
  return {path: get() for path, (_, get) in _controlled().items()}


@contextlib.contextmanager
def one_thread() -> Iterator[dict[str, int]]:
  """Every loaded OpenBLAS at one thread inside; the previous counts after.

  Yields {path: previous thread count} of the libraries it changed.
  """
  controlled = _controlled()
  previous = {path: get() for path, (_, get) in controlled.items()}
  for set_threads, _ in controlled.values():
    set_threads(1)
  try:
    yield previous
  finally:
    for path, (set_threads, _) in controlled.items():
      set_threads(previous[path])
