"""Two processes with jax.distributed on 127.0.0.1 equal one process on the whole batch."""

import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import objectives

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import multiprocess_worker  # pylint: disable=g-import-not-at-top,wrong-import-position


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_read_disjoint_shards_and_compute_global_statistics(tmp_path):
  port = str(free_port())
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, 'multiprocess_worker.py'),
                             str(i), port, str(tmp_path)], env=env, cwd=os.path.dirname(HERE),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  results = [np.load(tmp_path / f'process_{i}.npz') for i in range(2)]
  # Disjoint shards: no image is in both processes' batches.
  hashes = [{img.tobytes() for img in r['image']} for r in results]
  assert not hashes[0] & hashes[1]
  # Both processes computed the same global value...
  assert float(results[0]['loss']) == pytest.approx(float(results[1]['loss']), rel=1e-6)
  # ...which equals one process on the concatenated global batch (process 0's
  # devices come first in the mesh).
  images = np.concatenate([r['image'] for r in results])
  objective = objectives.build_objective(objectives.method_terms('vicreg_it', 'add'))
  z = multiprocess_worker.embed(jnp.asarray(images))
  z_b = z[::-1] * 0.5
  loss, grad = jax.value_and_grad(lambda z: objective({'z_a': z, 'z_b': z_b})[0])(z)
  assert float(results[0]['loss']) == pytest.approx(float(loss), rel=1e-5)
  assert float(results[0]['grad_sq']) == pytest.approx(float(jnp.sum(grad ** 2)), rel=1e-4)
