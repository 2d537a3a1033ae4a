"""ssl_jax.lapack_threads: one OpenBLAS thread inside, the previous counts after, same numbers."""

import jax
import numpy as np
import pytest

from ssl_jax import estimators
from ssl_jax import lapack_threads


def _needs_openblas():
  if not lapack_threads.thread_counts():
    pytest.skip('no OpenBLAS with a thread control is loaded in this process')


def test_one_thread_sets_every_loaded_openblas_to_one_and_gives_the_counts_back():
  _needs_openblas()
  before = lapack_threads.thread_counts()
  # SciPy's copy, the LAPACK that jaxlib's CPU linear algebra calls, is among them.
  assert any('scipy' in path for path in before), before
  with lapack_threads.one_thread() as previous:
    assert previous == before
    assert set(lapack_threads.thread_counts().values()) == {1}
  assert lapack_threads.thread_counts() == before
  # Given back on an error too.
  with pytest.raises(RuntimeError):
    with lapack_threads.one_thread():
      raise RuntimeError('inside')
  assert lapack_threads.thread_counts() == before


def test_the_log_det_term_and_its_gradient_change_by_float32_round_off_only_with_one_thread():
  # The default step's LAPACK work: a 256 x 256 Cholesky factorisation (the Gram
  # route of a 256 x 1024 view) and its gradient. A threaded OpenBLAS splits the
  # factorisation into blocks differently from a single thread, so the float32
  # sums run in another order and the last bits may differ (seen: 3.8e-7 of the
  # largest gradient entry on a 2-core EPYC); a wrong factorisation would be off
  # by far more. The bound is 64 float32 epsilons of the largest entry, well under
  # the n * eps = 3e-5 that the textbook error bound of a 256-row Cholesky allows.
  _needs_openblas()
  z = jax.random.normal(jax.random.key(0), (256, 1024))
  value_and_grad = jax.jit(jax.value_and_grad(lambda z: estimators.logdet_entropy(z)[0]))
  value, grad = jax.device_get(value_and_grad(z))
  with lapack_threads.one_thread():
    value_one, grad_one = jax.device_get(value_and_grad(z))
  eps = np.finfo(np.float32).eps
  np.testing.assert_allclose(value_one, value, rtol=64 * eps)
  np.testing.assert_allclose(grad_one, grad, rtol=0, atol=64 * eps * np.abs(grad).max())
  # The test is not vacuous: the gradient is far from zero.
  assert np.abs(grad).max() > 1e-4


def test_without_openblas_it_changes_nothing(monkeypatch):
  monkeypatch.setattr(lapack_threads, 'loaded_openblas', lambda: [])
  with lapack_threads.one_thread() as previous:
    assert previous == {}
