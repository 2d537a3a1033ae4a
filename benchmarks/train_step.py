"""Training-step speed: lax.conv, im2col, Winograd, the allocator, and PyTorch side by side.

  python benchmarks/train_step.py [--rounds 5] [--steps 3] [--cnn512] [--resnet] [--torch]

Settings: the default config (configs/vicreg_it.py: Fashion-MNIST, batch 256,
two views) with the small CNN the speed targets were set on (32-64-128-256; the
default's last conv is now 512 wide) and, with --resnet, a CIFAR-stem ResNet-18
(configs/vicreg_it.py:cifar10, batch 256, 32x32x3). Batches are random uint8
images, so the input pipeline is not measured (benchmarks/input_pipeline.py).

Contenders: `lax/glibc` is the step as it was before the CPU work
(nnx.Conv's lax.conv, glibc malloc); `im2col/glibc` adds the im2col route;
`im2col/tcmalloc` adds tcmalloc (ssl_jax/allocator.py); `winograd/tcmalloc`
computes the 3x3 stride-1 layers by Winograd F(4x4, 3x3) and the others by
im2col (ssl_jax/winograd.py): what `python -m ssl_jax.main` runs on a CPU
with tcmalloc installed; `winograd7/tcmalloc` takes F(7x7, 3x3) on 7x7 and
14x14 outputs (opt-in). --cnn512 adds the default config's own encoder, whose
last layer is 512 wide. The allocator is fixed when a
process starts, so every contender runs in its own worker process.

Speeds are compared only within one run on one machine: the contenders are
timed in alternating rounds (`--steps` steps each, one worker at a time,
the others idle) and the median seconds per step of each is reported, so a
machine that slows down or speeds up during the run affects all alike. The
step's FLOPs come from XLA's cost analysis of the lax route's lowered step
(the model FLOPs; im2col does the same arithmetic, Winograd fewer
multiplies for the same result, so its utilisation is an effective one, as
for every fast convolution algorithm); the peak is a measured
float32 matmul (4096^3). Utilisation = model FLOP/s / peak.

--torch adds the same encoder, projector and VICReg-IT step in PyTorch
(benchmarks/torch_step.py: channels_last, the same batch and shapes, eager),
under both allocators. `pip install -e '.[bench]'` installs torch (the CPU
wheel is enough).
"""

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax import allocator
from ssl_jax import host
from ssl_jax import input_pipeline
from ssl_jax import lapack_threads
from ssl_jax import runs
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


def _random_batch(run, mesh):
  """One fixed batch of random uint8 images and labels of the run's dataset shape."""
  spec, rng = run.spec, np.random.default_rng(0)
  size = spec.image_size
  return input_pipeline.to_global(
      {'image': rng.integers(0, 256, (run.global_batch, size, size, spec.channels),
                             dtype=np.uint8),
       'label': rng.integers(0, spec.num_classes, run.global_batch).astype(np.int32)}, mesh)


def _built_step(config):
  mesh = sharding.make_mesh()
  config.log_every_steps = 10 ** 9  # no effective-rank SVD in the timed steps
  run = runs.build(config, mesh)
  return run, train.make_step_fn(run, config, mesh), _random_batch(run, mesh)


def model_flops(setting: str) -> float:
  """FLOPs of one step of `setting` by XLA's cost analysis of the lax.conv route.

  Lowered only, not compiled or run, so it is cheap and every contender's
  utilisation counts the same model FLOPs: a Winograd step's own count is
  smaller (fewer multiplies for the same result).
  """
  run, step, batch = _built_step(_config(setting, 'lax'))
  cost = step.lower(run.state, batch).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', float('nan')))


class JaxStep:
  """A jitted training step of `config` on one fixed random batch."""

  def __init__(self, config):
    run, self.step, self.batch = _built_step(config)
    self.batch_size = run.global_batch
    self.state = run.state
    self.time(1)  # compile and warm up

  def time(self, steps: int) -> float:
    """Seconds per step over `steps` steps."""
    start = time.perf_counter()
    for _ in range(steps):
      self.state, metrics = self.step(self.state, self.batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps


# (label, config variant, overrides). The default setting keeps the small CNN the
# speed targets were set on, 32-64-128-256; the default's last conv is now 512 wide.
SETTINGS = {'default': ('small CNN 32-64-128-256, Fashion-MNIST, b256', None,
                        {'model.encoder.channels': '32-64-128-256'}),
            'cnn512': ('small CNN 32-64-128-512 (default config), b256', None, {}),
            'resnet18': ('ResNet-18 CIFAR stem, 32x32x3, b256', 'cifar10', {})}
_MESSAGE = '@@ '   # worker -> parent lines; anything else a worker prints is passed through


def _config(setting: str, route: str):
  config = importlib.import_module('configs.vicreg_it').get_config(SETTINGS[setting][1])
  config.model.conv_route = route
  config.update_from_flattened_dict(SETTINGS[setting][2])
  return config


def worker(setting: str, route: str) -> None:
  """Builds one contender, then times `N` steps for every line `N` on stdin."""
  if route == 'torch':
    import torch_step  # pylint: disable=g-import-not-at-top  (benchmarks/, optional torch)
    _serve(torch_step.TorchStep(_config(setting, 'lax')))
  else:
    # As in ssl_jax.train's loop: one OpenBLAS thread for the step's LAPACK calls.
    with lapack_threads.one_thread():
      _serve(JaxStep(_config(setting, route)))


def _serve(contender) -> None:
  print(_MESSAGE + json.dumps({'batch_size': contender.batch_size,
                               'tcmalloc': allocator.tcmalloc_loaded()}), flush=True)
  for line in sys.stdin:
    print(_MESSAGE + json.dumps({'seconds': contender.time(int(line))}), flush=True)


class Worker:
  """A contender in its own process: `route` in {lax, im2col, winograd, torch}, `malloc` in
  {glibc, tcmalloc}."""

  def __init__(self, setting: str, route: str, malloc: str):
    env = {k: v for k, v in os.environ.items() if k != 'LD_PRELOAD'}
    if malloc == 'tcmalloc':
      path = allocator.find_tcmalloc()
      if path is None:
        raise SystemExit(f'--malloc tcmalloc: not installed; {allocator.INSTALL_HINT}.')
      env['LD_PRELOAD'] = path
    here = os.path.dirname(os.path.abspath(__file__))
    env['PYTHONPATH'] = os.pathsep.join([here, os.path.dirname(here), env.get('PYTHONPATH', '')])
    self.name = f'{route}/{malloc}'
    self.process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), '--worker', setting, route],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    ready = self._read()
    if ready['tcmalloc'] != (malloc == 'tcmalloc'):
      raise SystemExit(f'{self.name}: the worker did not start with {malloc}.')
    self.batch_size = ready['batch_size']

  def _read(self) -> dict:
    for line in self.process.stdout:
      if line.startswith(_MESSAGE):
        return json.loads(line[len(_MESSAGE):])
      print(line, end='')
    raise SystemExit(f'{self.name}: the worker stopped (exit {self.process.wait()}).')

  def time(self, steps: int) -> float:
    self.process.stdin.write(f'{steps}\n')
    self.process.stdin.flush()
    return self._read()['seconds']

  def close(self):
    self.process.stdin.close()
    self.process.wait()


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
  parser.add_argument('--cnn512', action='store_true',
                      help="also the default config's own encoder (last conv 512 wide)")
  parser.add_argument('--resnet', action='store_true', help='also the ResNet-18 CIFAR step')
  parser.add_argument('--torch', action='store_true', help='also PyTorch (needs torch)')
  parser.add_argument('--contenders',
                      default='lax/glibc,im2col/glibc,im2col/tcmalloc,winograd/tcmalloc',
                      help='comma-separated route/allocator pairs; the first is the baseline')
  parser.add_argument('--worker', nargs=2, metavar=('SETTING', 'ROUTE'), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return worker(*args.worker)
  peak = matmul_peak()
  print(f'{host.cpu_name()}; backend {jax.default_backend()}, {jax.device_count()} device(s); '
        f'measured float32 matmul peak {peak / 1e9:.1f} GFLOP/s', flush=True)
  names = args.contenders.split(',')
  if args.torch:
    names += ['torch/glibc', 'torch/tcmalloc']
  rows, flops_of = [], {}
  for setting in (['default'] + (['cnn512'] if args.cnn512 else [])
                  + (['resnet18'] if args.resnet else [])):
    # Once per setting, here: every contender's utilisation counts these FLOPs.
    flops = flops_of[setting] = model_flops(setting)
    contenders = {}
    try:
      for name in names:
        route, malloc = name.split('/')
        contenders[name] = Worker(setting, route, malloc)
        contenders[name].time(1)   # warm up
      seconds = alternate(contenders, args.rounds, args.steps)
    finally:
      for contender in contenders.values():
        contender.close()
    base = seconds[names[0]]
    for name, s in seconds.items():
      rows.append((SETTINGS[setting][0], name, s, contenders[name].batch_size / s,
                   flops / s / peak, base / s))
  print(f'\n| {"setting":<40} | {"contender":<15} | {"s/step":>7} | {"images/s":>9} | '
        f'{"util.":>6} | {"speed-up vs " + names[0]:>22} |')
  print(f'|{"-" * 42}|{"-" * 17}|{"-" * 9}|{"-" * 11}|{"-" * 8}|{"-" * 24}|')
  for name, contender, s, ips, util, speedup in rows:
    print(f'| {name:<40} | {contender:<15} | {s:>7.3f} | {ips:>9.1f} | {util:>6.1%} | '
          f'{speedup:>21.2f}x |')
  for setting, flops in flops_of.items():
    print(f'{SETTINGS[setting][0]}: {flops / 1e9:.1f} model GFLOP/step (XLA cost analysis)')
  print('images/s counts source images; each step processes two views of each. '
        'Utilisation = model FLOP/s over the measured matmul peak.')


if __name__ == '__main__':
  main()
