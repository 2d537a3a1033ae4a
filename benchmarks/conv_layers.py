"""Per-layer convolution times of the default step's encoder, on every CPU route.

  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
      python benchmarks/conv_layers.py [--rounds 3] [--calls 10] [--channels 32-64-128-512]

(tcmalloc as `python -m ssl_jax.main` runs the step, ssl_jax/allocator.py; the
header says which allocator the process has.)

Why: the training step's gap to PyTorch is spread over the layers, and whole-step
timings cannot say which layer a change helped. For each convolution of the
small CNN (configs/vicreg_it.py: 28x28 inputs, strides 1-2-2-1, both views of
a batch of 256 go through the encoder together, so 512 images), this times the
forward pass and the backward pass (both gradients, from the forward's
residuals) on each route of `model.conv_route`, plus two memory yardsticks:
building the layer's im2col patches, and one elementwise pass over its input
(`x * 2`: one read, one write). A layer whose time is near its patches' and
far above its matmul FLOPs at the machine's rate is bound by memory traffic.

Routes are timed alternately within each round (`--calls` calls each) and the
median over `--rounds` rounds is printed, in milliseconds, with the measured
float32 matmul rate before and after.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # pylint: disable=g-import-not-at-top  (benchmarks/: matmul_peak)

from configs import vicreg_it  # pylint: disable=g-import-not-at-top
from ssl_jax import allocator
from ssl_jax import conv

NHWC = ('NHWC', 'HWIO', 'NHWC')
ROUTES = ('lax', 'im2col', 'winograd', 'winograd7')
STRIDES = (1, 2, 2, 1)   # models.SmallCNN


def layers(channels: str, image_size: int = 28, in_channels: int = 1):
  """(input size, C in, C out, stride) of each 3x3 'SAME' convolution of the small CNN."""
  out, size, c = [], image_size, in_channels
  for o, s in zip((int(v) for v in channels.split('-')), STRIDES):
    out.append((size, c, o, s))
    size, c = -(-size // s), o
  return out


def _timer(fn, *args):
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))   # compile and warm up

  def run(calls):
    start = time.perf_counter()
    for _ in range(calls):
      result = fn(*args)
    jax.block_until_ready(result)
    return (time.perf_counter() - start) / calls * 1e3
  return run


def layer_timers(batch, size, c, o, stride):
  """{column: timer} for one layer: each route's forward and backward, and the yardsticks."""
  kx, kw, kd = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (batch, size, size, c), jnp.float32)
  w = jax.random.normal(kw, (3, 3, c, o), jnp.float32) / (9 * c) ** 0.5
  out = -(-size // stride)
  dy = jax.random.normal(kd, (batch, out, out, o), jnp.float32)
  pads = tuple(tuple(p) for p in lax.padtype_to_pads((size, size), (3, 3), (stride, stride),
                                                     'SAME'))
  timers = {}
  for route in ROUTES:
    f = lambda x, w, fn=conv.conv_function(route): fn(x, w, (stride, stride), pads,
                                                      dimension_numbers=NHWC)
    _, vjp = jax.vjp(f, x, w)
    timers[f'{route} fwd'] = _timer(f, x, w)
    timers[f'{route} bwd'] = _timer(vjp, dy)
  timers['patches'] = _timer(lambda x: conv.patches(x, (3, 3), (stride, stride), pads), x)
  timers['x * 2'] = _timer(lambda x: x * 2, x)
  return timers


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--calls', type=int, default=10)
  parser.add_argument('--channels', default=None, help="small CNN widths (default: the config's)")
  args = parser.parse_args()
  config = vicreg_it.get_config()
  channels = args.channels or config.model.encoder.channels
  batch = 2 * config.data.batch_size
  peak_before = train_step.matmul_peak() / 1e9
  malloc = 'tcmalloc' if allocator.tcmalloc_loaded() else 'glibc malloc'
  print(f'{train_step.cpu_name()}, {malloc}; float32 matmul {peak_before:.1f} GFLOP/s; small CNN '
        f'{channels}, {batch} images (two views of {config.data.batch_size}); ms, median of '
        f'{args.rounds} rounds of {args.calls} calls\n')
  columns = None
  for size, c, o, stride in layers(channels):
    timers = layer_timers(batch, size, c, o, stride)
    times = {name: [] for name in timers}
    for _ in range(args.rounds):
      for name, run in timers.items():
        times[name].append(run(args.calls))
    if columns is None:
      columns = list(timers)
      print('| layer | ' + ' | '.join(columns) + ' |')
      print('|---' * (len(columns) + 1) + '|')
    print(f'| {size}x{size} {c}->{o} /{stride} | '
          + ' | '.join(f'{statistics.median(times[n]):.1f}' for n in columns) + ' |', flush=True)
  print(f'\nfloat32 matmul after: {train_step.matmul_peak() / 1e9:.1f} GFLOP/s')


if __name__ == '__main__':
  main()
