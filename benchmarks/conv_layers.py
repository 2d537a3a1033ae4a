"""Per-layer convolution times of the default step's encoder, on every CPU route.

  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
      python benchmarks/conv_layers.py [--rounds 3] [--calls 10] [--channels 32-64-128-512] [--parts]

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

--parts splits each layer's default CPU route ('winograd': im2col for the stem
and the stride-2 layers, F(4x4, 3x3) for the 3x3 stride-1 ones) into its
matmuls and its data movement, forward and backward, each part jitted on its
own: the matmuls with their GFLOP/s, the rest (building patches, col2im,
Winograd's tile transforms) with the bytes it reads and writes at least and
the GB/s that makes, next to `x * 2`'s. It says what bounds the step: parts
near the matmul rate have little left to take; data movement far below the
elementwise pass's rate is XLA's code for that gather, not the memory.
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
from ssl_jax import host
from ssl_jax import winograd

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


def _gb(*arrays) -> float:
  return sum(a.size * a.dtype.itemsize for a in arrays) / 1e9


def part_timers(batch, size, c, o, stride):
  """[(part, timer, GFLOP or None, GB moved or None)] of one layer on the default CPU route.

  The parts are the route's own functions (ssl_jax/conv.py, ssl_jax/winograd.py),
  each jitted alone, so their sum exceeds the layer's time by what XLA fuses
  across them; GB counts each part's inputs and outputs once (a lower bound).
  """
  kx, kw, kd = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (batch, size, size, c), jnp.float32)
  w = jax.random.normal(kw, (3, 3, c, o), jnp.float32) / (9 * c) ** 0.5
  pads = tuple(tuple(p) for p in lax.padtype_to_pads((size, size), (3, 3), (stride, stride),
                                                     'SAME'))
  out_hw = (-(-size // stride),) * 2
  dy = jax.random.normal(kd, (batch,) + out_hw + (o,), jnp.float32)
  rows = []

  def add(name, fn, args, flops=None, moved=None):
    result = jax.jit(fn)(*args)
    gb = _gb(*args, *jax.tree.leaves(result)) if moved is None else moved
    rows.append((name, _timer(fn, *args), flops, None if flops else gb))
    return result

  if winograd.supports(x.shape, w.shape, (stride, stride), pads, x.dtype):
    t = winograd.TRANSFORMS[winograd.TILE]
    v = add('fwd: input transform', lambda x: winograd._input_transform(x, pads, out_hw, t),
            [x])
    u = winograd._filter_transform(w, t)
    positions, tiles = v.shape[:2]
    bmm_flops = 2 * positions * tiles * c * o / 1e9
    m = add('fwd: batched matmul V U', lambda v, u: winograd._batched_matmul(v, u, 2, 1),
            [v, u], bmm_flops)
    add('fwd: output transform', lambda m: winograd._output_transform(m, batch, out_hw, t), [m])
    dm = add('bwd: output transform^T', lambda dy: winograd._output_transform_t(dy, t), [dy])
    dv = add('bwd: batched matmul dM U^T', lambda dm, u: winograd._batched_matmul(dm, u, 2, 2),
             [dm, u], bmm_flops)
    add('bwd: batched matmul V^T dM', lambda v, dm: winograd._batched_matmul(v, dm, 1, 1),
        [v, dm], bmm_flops)
    add('bwd: input transform^T',
        lambda dv: winograd._input_transform_t(dv, x.shape, pads, out_hw, t), [dv])
    return rows
  mm_flops = 2 * batch * out_hw[0] * out_hw[1] * 9 * c * o / 1e9
  w_mat = w.reshape(9 * c, o)
  cols = add('fwd: patches', lambda x: conv.patches(x, (3, 3), (stride, stride), pads), [x])
  add('fwd: matmul patches W', conv._matmul, [cols, w_mat], mm_flops)
  add('bwd: matmul patches^T dy',
      lambda cols, dy: lax.dot_general(cols.reshape(-1, 9 * c), dy.reshape(-1, o),
                                       (((0,), (0,)), ((), ()))), [cols, dy], mm_flops)
  dcols = add('bwd: matmul dy W^T', lambda dy, w_mat: conv._matmul(dy, w_mat.T),
              [dy, w_mat], mm_flops)
  add('bwd: col2im', lambda d: conv.col2im(d.reshape(d.shape[:3] + (3, 3, c)), (size, size),
                                           (stride, stride), pads), [dcols])
  return rows


def print_parts(batch, channels, rounds, calls, peak):
  """The --parts table: every layer's parts, median ms over rounds."""
  print('| layer | part | ms | GFLOP/s (matmul peak %.0f) | GB/s (x * 2) |' % peak)
  print('|---|---|---|---|---|')
  for size, c, o, stride in layers(channels):
    rows = part_timers(batch, size, c, o, stride)
    x = jnp.zeros((batch, size, size, c), jnp.float32)
    yard = _timer(lambda x: x * 2, x)
    times = [[] for _ in rows] + [[]]
    for _ in range(rounds):
      for i, (_, run, _, _) in enumerate(rows):
        times[i].append(run(calls))
      times[-1].append(yard(calls))
    yard_gbs = 2 * _gb(x) / (statistics.median(times[-1]) / 1e3)
    layer = f'{size}x{size} {c}->{o} /{stride}'
    total = 0.0
    for (name, _, flops, gb), t in zip(rows, times):
      ms = statistics.median(t)
      total += ms
      rate = (f'{flops / ms * 1e3:.0f}', '') if flops else ('', f'{gb / ms * 1e3:.1f} ({yard_gbs:.1f})')
      print(f'| {layer} | {name} | {ms:.1f} | {rate[0]} | {rate[1]} |', flush=True)
    print(f'| {layer} | sum of parts | {total:.1f} | | |', flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--calls', type=int, default=10)
  parser.add_argument('--channels', default=None, help="small CNN widths (default: the config's)")
  parser.add_argument('--parts', action='store_true',
                      help="the default route's matmuls and data movement per layer, instead")
  args = parser.parse_args()
  config = vicreg_it.get_config()
  channels = args.channels or config.model.encoder.channels
  batch = 2 * config.data.batch_size
  peak_before = train_step.matmul_peak() / 1e9
  malloc = 'tcmalloc' if allocator.tcmalloc_loaded() else 'glibc malloc'
  print(f'{host.cpu_name()}, {malloc}; float32 matmul {peak_before:.1f} GFLOP/s; small CNN '
        f'{channels}, {batch} images (two views of {config.data.batch_size}); ms, median of '
        f'{args.rounds} rounds of {args.calls} calls\n')
  if args.parts:
    print_parts(batch, channels, args.rounds, args.calls, peak_before)
    print(f'\nfloat32 matmul after: {train_step.matmul_peak() / 1e9:.1f} GFLOP/s')
    return
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
