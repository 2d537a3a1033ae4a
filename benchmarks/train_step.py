"""Training-step throughput and model FLOP utilisation on this machine.

  python benchmarks/train_step.py [--steps 5]

Two settings: the default config (configs/vicreg_it.py, Fashion-MNIST,
small CNN, batch 256) and a CIFAR-style ResNet-18 (configs/vicreg_it.py:cifar10,
batch 256, 32x32x3). Batches are random uint8 images, so the input pipeline
is not measured here (see benchmarks/input_pipeline.py). The step's FLOPs come
from XLA's cost analysis of the compiled step; the peak is a measured float32
matmul (4096^3) on the same backend. Utilisation = achieved / peak FLOP/s.
"""

import argparse
import importlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax import input_pipeline
from ssl_jax import sharding
from ssl_jax import train


def matmul_peak(n=4096, repeats=5):
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(a))
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(f(a))
  return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def bench(config, steps):
  mesh = sharding.make_mesh()
  config.log_every_steps = 10 ** 9  # no effective-rank SVD in the timed steps
  run = train.build(config, mesh)
  step = train.make_step_fn(run, config, mesh)
  spec, batch_size, state = run.spec, run.global_batch, run.state
  rng = np.random.default_rng(0)
  size = spec.image_size
  batch = input_pipeline.to_global(
      {'image': rng.integers(0, 256, (batch_size, size, size, spec.channels), dtype=np.uint8),
       'label': rng.integers(0, spec.num_classes, batch_size).astype(np.int32)}, mesh)
  compiled = step.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', float('nan')))
  state, m = step(state, batch)  # warm-up
  jax.block_until_ready(m)
  start = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  seconds = (time.perf_counter() - start) / steps
  return batch_size / seconds, seconds, flops


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--steps', type=int, default=5)
  args = parser.parse_args()
  peak = matmul_peak()
  print(f'backend {jax.default_backend()}, {jax.device_count()} device(s); measured float32 '
        f'matmul peak {peak / 1e9:.1f} GFLOP/s')
  print(f'| {"setting":<40} | {"s/step":>7} | {"images/s":>9} | {"GFLOP/step":>10} | '
        f'{"GFLOP/s":>8} | {"util.":>6} |')
  print(f'|{"-" * 42}|{"-" * 9}|{"-" * 11}|{"-" * 12}|{"-" * 10}|{"-" * 8}|')
  vicreg_it = importlib.import_module('configs.vicreg_it')
  for name, arg in (('default: small CNN, Fashion-MNIST, b256', None),
                    ('ResNet-18 CIFAR stem, 32x32x3, b256', 'cifar10')):
    images_per_sec, seconds, flops = bench(vicreg_it.get_config(arg), args.steps)
    achieved = flops / seconds
    print(f'| {name:<40} | {seconds:>7.2f} | {images_per_sec:>9.1f} | {flops / 1e9:>10.1f} | '
          f'{achieved / 1e9:>8.1f} | {achieved / peak:>6.1%} |', flush=True)
  print('images/s counts source images; each step processes two views of each.')


if __name__ == '__main__':
  main()
