"""Training-step speed: the lax.conv and im2col routes side by side, and PyTorch.

  python benchmarks/train_step.py [--rounds 5] [--steps 3] [--resnet] [--torch]

Settings: the default config (configs/vicreg_it.py: Fashion-MNIST, small CNN,
batch 256, two views) and, with --resnet, a CIFAR-stem ResNet-18
(configs/vicreg_it.py:cifar10, batch 256, 32x32x3). Batches are random uint8
images, so the input pipeline is not measured (benchmarks/input_pipeline.py).

Speeds are compared only within one run on one machine: the routes are timed
in alternating rounds (lax, im2col, lax, im2col, ...; `--steps` steps each)
and the median seconds per step of each route are reported, so a machine that
slows down or speeds up during the run affects both alike. The step's FLOPs
come from XLA's cost analysis of the lax route's compiled step (the model
FLOPs; im2col does the same arithmetic); the peak is a measured float32
matmul (4096^3). Utilisation = model FLOPs per second / peak.

--torch builds the same encoder, projector and VICReg-IT step in PyTorch
(benchmarks/torch_step.py: channels_last, the same batch and shapes, eager)
and times it in the same alternating rounds; the last column is then
"speed-up vs lax" for every contender, so im2col/torch is their ratio.
`pip install -e '.[bench]'` installs torch (the CPU wheel is enough).
"""

import argparse
import importlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax import input_pipeline
from ssl_jax import sharding
from ssl_jax import train


def matmul_peak(n=4096, repeats=5):
  """Measured float32 matmul FLOP/s of the default backend (best of `repeats`)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(a))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(f(a))
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best


def cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown CPU'


class JaxStep:
  """A jitted training step of `config` on one fixed random batch."""

  def __init__(self, config):
    mesh = sharding.make_mesh()
    config.log_every_steps = 10 ** 9  # no effective-rank SVD in the timed steps
    run = train.build(config, mesh)
    self.step = train.make_step_fn(run, config, mesh)
    spec, self.batch_size = run.spec, run.global_batch
    rng = np.random.default_rng(0)
    size = spec.image_size
    self.batch = input_pipeline.to_global(
        {'image': rng.integers(0, 256, (self.batch_size, size, size, spec.channels),
                               dtype=np.uint8),
         'label': rng.integers(0, spec.num_classes, self.batch_size).astype(np.int32)}, mesh)
    cost = self.step.lower(run.state, self.batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.flops = float(cost.get('flops', float('nan')))
    self.state = run.state
    self.time(1)  # compile and warm up

  def time(self, steps: int) -> float:
    """Seconds per step over `steps` steps."""
    start = time.perf_counter()
    for _ in range(steps):
      self.state, metrics = self.step(self.state, self.batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps


def alternate(contenders: dict, rounds: int, steps: int) -> dict[str, float]:
  """Median seconds/step of each contender, timed in alternating rounds."""
  times = {name: [] for name in contenders}
  for _ in range(rounds):
    for name, contender in contenders.items():
      times[name].append(contender.time(steps))
  return {name: statistics.median(t) for name, t in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=3, help='steps per timed round')
  parser.add_argument('--resnet', action='store_true', help='also the ResNet-18 CIFAR step')
  parser.add_argument('--torch', action='store_true', help='also PyTorch (needs torch)')
  args = parser.parse_args()
  peak = matmul_peak()
  print(f'{cpu_name()}; backend {jax.default_backend()}, {jax.device_count()} device(s); '
        f'measured float32 matmul peak {peak / 1e9:.1f} GFLOP/s')
  settings = [('default: small CNN, Fashion-MNIST, b256', None)]
  if args.resnet:
    settings.append(('ResNet-18 CIFAR stem, 32x32x3, b256', 'cifar10'))
  vicreg_it = importlib.import_module('configs.vicreg_it')
  rows, flops_of = [], {}
  for name, arg in settings:
    contenders = {}
    for route in ('lax', 'im2col'):
      config = vicreg_it.get_config(arg)
      config.model.conv_route = route
      contenders[route] = JaxStep(config)
    flops = flops_of[name] = contenders['lax'].flops
    if args.torch:
      import torch_step  # pylint: disable=g-import-not-at-top  (benchmarks/, optional torch)
      contenders['torch'] = torch_step.TorchStep(vicreg_it.get_config(arg))
    seconds = alternate(contenders, args.rounds, args.steps)
    for route, s in seconds.items():
      rows.append((name, route, s, contenders[route].batch_size / s, flops / s / peak,
                   seconds['lax'] / s))
  print(f'\n| {"setting":<40} | {"route":<7} | {"s/step":>7} | {"images/s":>9} | '
        f'{"util.":>6} | {"speed-up vs lax":>15} |')
  print(f'|{"-" * 42}|{"-" * 9}|{"-" * 9}|{"-" * 11}|{"-" * 8}|{"-" * 17}|')
  for name, route, s, ips, util, speedup in rows:
    print(f'| {name:<40} | {route:<7} | {s:>7.3f} | {ips:>9.1f} | {util:>6.1%} | '
          f'{speedup:>14.2f}x |')
  for name, flops in flops_of.items():
    print(f'{name}: {flops / 1e9:.1f} model GFLOP/step (XLA cost analysis of the lax step)')
  print('images/s counts source images; each step processes two views of each. '
        'Utilisation = model FLOPs/s over the measured matmul peak.')


if __name__ == '__main__':
  main()
