"""Input-pipeline throughput on the Fashion-MNIST default.

  python benchmarks/input_pipeline.py [--batch 256] [--batches 200]

Measures, after a warm-up, on this machine:
  1. host: tf.data pretraining batches (decode, shuffle, batch), no augmentation;
  2. host + device transfer (DeviceIterator): global jax.Arrays;
  3. + two-view augmentation on device (augment.two_views, jitted): what the
     training step consumes.
Reports batches/s and images/s (an image = one source image; each yields two views).
"""

import argparse
import time

import jax

from ssl_jax import augment
from ssl_jax import input_pipeline
from ssl_jax import sharding


def rate(iterator, n, batch, consume=lambda b: b):
  for _ in range(5):  # warm-up: fill buffers, compile
    jax.block_until_ready(consume(next(iterator)))
  start = time.perf_counter()
  for _ in range(n):
    jax.block_until_ready(consume(next(iterator)))
  seconds = time.perf_counter() - start
  return n / seconds, n * batch / seconds


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--batches', type=int, default=200)
  parser.add_argument('--preset', default='fashion_mnist')
  args = parser.parse_args()
  input_pipeline.hide_accelerators_from_tensorflow()
  spec = input_pipeline.get_spec('fashion_mnist')
  mesh = sharding.make_mesh()

  def dataset():
    return input_pipeline.pretrain_dataset('fashion_mnist', local_batch=args.batch, seed=0)

  rows = []
  host = dataset().as_numpy_iterator()
  rows.append(('tf.data host batches (no augmentation)', *rate(host, args.batches, args.batch)))
  device = input_pipeline.DeviceIterator(dataset(), mesh)
  rows.append(('+ transfer to device arrays', *rate(device, args.batches, args.batch)))
  view_a, view_b = augment.views_from_config(args.preset)
  two_views = jax.jit(lambda b, k: augment.two_views(
      b, k, view_a, view_b, out_size=spec.image_size, mean=spec.mean, std=spec.std))
  key = jax.random.key(0)
  device = input_pipeline.DeviceIterator(dataset(), mesh)
  rows.append((f'+ two-view augmentation ({args.preset})',
               *rate(device, args.batches, args.batch, lambda b: two_views(b, key))))
  print(f'backend {jax.default_backend()}, {jax.device_count()} device(s), batch {args.batch}, '
        f'{args.batches} batches')
  print(f'| {"stage":<42} | {"batches/s":>10} | {"images/s":>10} |')
  print(f'|{"-" * 44}|{"-" * 12}|{"-" * 12}|')
  for name, bps, ips in rows:
    print(f'| {name:<42} | {bps:>10.1f} | {ips:>10.0f} |')


if __name__ == '__main__':
  main()
