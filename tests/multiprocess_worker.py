"""One process of tests/multiprocess_test.py: 2 processes x 4 CPU devices on 127.0.0.1.

Usage: python tests/multiprocess_worker.py PROCESS_ID PORT OUT_DIR
Each process reads its own shard, builds the global batch, and evaluates an
objective over the global (8-device) batch under jit; it writes its local
batch and the result to OUT_DIR/process_<id>.npz.
"""

import os
import sys

if __name__ == '__main__':
  # Only as its own process: multiprocess_test imports this module for `embed`,
  # and setting the flag there (before the test process's JAX backend starts)
  # left every later test in that process with 4 devices instead of 8.
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top


def embed(images):
  """A fixed linear map of the pixels: [B, 28, 28, 1] uint8 -> [B, 8] float32."""
  x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0
  w = jax.random.normal(jax.random.key(0), (x.shape[1], 8)) / 28.0
  return x @ w


def main():
  process_id, port, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=process_id)
  from ssl_jax import input_pipeline, objectives, sharding  # after initialize
  assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
  mesh = sharding.make_mesh()
  local_batch = input_pipeline.local_batch_size(32, mesh)
  ds = input_pipeline.pretrain_dataset('fashion_mnist', local_batch=local_batch, seed=0,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count())
  host = next(ds.as_numpy_iterator())
  batch = input_pipeline.to_global(host, mesh)
  objective = objectives.build_objective(objectives.method_terms('vicreg_it', 'add'))

  @jax.jit
  def loss_and_grad_norm(images):
    z = embed(images)
    z_b = z[::-1] * 0.5  # a second "view": any fixed function of the batch
    loss, grad = jax.value_and_grad(lambda z: objective({'z_a': z, 'z_b': z_b})[0])(z)
    return loss, jnp.sum(grad ** 2)

  loss, grad_sq = loss_and_grad_norm(batch['image'])
  np.savez(os.path.join(out_dir, f'process_{process_id}.npz'), image=host['image'],
           loss=np.asarray(loss), grad_sq=np.asarray(grad_sq))
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()
