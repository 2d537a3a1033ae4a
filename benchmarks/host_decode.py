"""ImageNet-style host decoding at pod scale: images/s per core, and what a TPU host needs.

  python benchmarks/host_decode.py [--images 400] [--threads 1 2]

Builds synthetic JPEGs with ImageNet's size distribution (the common shapes of
the ILSVRC-2012 train set, mean about 400 x 350, quality 90, smooth content
plus noise: about 100-150 KB each, like the real files), then runs the host
path that ssl_jax uses for variable-size datasets: per image, two Inception
crops decoded with decode_and_crop_jpeg and resized to 224 x 224
(input_pipeline._host_random_crop). It reports images/s with tf.data limited to
1, 2, ... threads, and compares them, on paper, with the rate one TPU v4 or
v5e host must feed for VICReg with ResNet-50 (the assumptions are printed).
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ssl_jax import host  # pylint: disable=g-import-not-at-top  (after the path)

# Common ILSVRC-2012 train shapes (w, h) and rough shares; mean about 400 x 350.
SHAPES = ((500, 375, 0.45), (375, 500, 0.12), (500, 333, 0.13), (333, 500, 0.04),
          (500, 500, 0.05), (640, 480, 0.06), (800, 600, 0.05), (300, 225, 0.10))

# Paper comparison. FLOPs per source image of a VICReg step with ResNet-50 and the
# 8192-8192-8192 projector: 2 views x (4.1 GFLOPs ResNet-50 forward at 224 +
# 0.15 G projector MACs x 2) x 3 (forward + backward).
STEP_GFLOP_PER_IMAGE = 2 * (4.1 + 2 * 0.151) * 3
HOSTS = (  # name, chips per host, bf16 peak TFLOP/s per chip, host vCPUs
    ('TPU v4 host', 4, 275.0, 240),
    ('TPU v5e host, 4 chips', 4, 197.0, 112),
    ('TPU v5e host, 8 chips', 8, 197.0, 224),
)
ASSUMED_MFU = 0.5


def synthetic_jpegs(n, seed=0):
  import numpy as np
  import tensorflow as tf
  rng = np.random.default_rng(seed)
  shares = np.array([s for *_, s in SHAPES])
  picks = rng.choice(len(SHAPES), n, p=shares / shares.sum())
  out = []
  for i in picks:
    w, h, _ = SHAPES[i]
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / rng.uniform(8, 60) + c) * np.cos(yy / rng.uniform(8, 60))
                     for c in range(3)], -1)
    image = np.clip(127 + 90 * base + rng.normal(0, 18, (h, w, 3)), 0, 255).astype(np.uint8)
    out.append(tf.io.encode_jpeg(image, quality=90).numpy())
  return out


def rate(jpegs, threads, repeats, size=224):
  import tensorflow as tf
  from ssl_jax import input_pipeline
  ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat(repeats).enumerate()

  def two_crops(index, image):
    s = tf.stack([tf.constant(0, tf.int64), index])
    a = input_pipeline._host_random_crop(image, size, (0.08, 1.0), (3 / 4, 4 / 3), s)
    b = input_pipeline._host_random_crop(image, size, (0.08, 1.0), (3 / 4, 4 / 3), s + 7)
    return a, b

  ds = ds.map(two_crops, num_parallel_calls=threads).batch(64)
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  options.threading.max_intra_op_parallelism = 1
  ds = ds.with_options(options)
  count = 0
  it = iter(ds)
  next(it)  # warm-up
  start = time.perf_counter()
  for a, _ in it:
    count += int(a.shape[0])
  return count / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--images', type=int, default=400)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--threads', type=int, nargs='+', default=[1, 2])
  args = parser.parse_args()
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')
  jpegs = synthetic_jpegs(args.images)
  kb = sum(len(j) for j in jpegs) / len(jpegs) / 1024
  print(f'{len(jpegs)} synthetic JPEGs, mean {kb:.0f} KB; {host.describe()}')
  per_core = None
  print('| tf.data threads | images/s (2 crops of 224 each) | per thread |')
  print('|---|---|---|')
  for threads in args.threads:
    r = rate(jpegs, threads, args.repeats)
    per_core = r / threads if per_core is None else per_core
    print(f'| {threads} | {r:.0f} | {r / threads:.0f} |')
  print(f'\nOn paper (assumed MFU {ASSUMED_MFU:.0%}, {STEP_GFLOP_PER_IMAGE:.1f} GFLOP per source '
        f'image of a VICReg ResNet-50 step; host vCPUs as Google lists them; {per_core:.0f} '
        'images/s per core measured above, 2 vCPUs per core):')
  print('| host | images/s it consumes | images/s its CPUs decode | ratio |')
  print('|---|---|---|---|')
  for name, chips, peak, vcpus in HOSTS:
    need = chips * peak * 1e3 * ASSUMED_MFU / STEP_GFLOP_PER_IMAGE
    have = per_core * vcpus / 2
    print(f'| {name} | {need:,.0f} | {have:,.0f} | {have / need:.2f} |')


if __name__ == '__main__':
  main()
