"""Value-plus-gradient time of every objective, and Gram vs D x D routes.

Usage:
  python benchmarks/objectives.py                 # (256, 2048) and (2048, 8192)
  python benchmarks/objectives.py --sizes 256x2048 --repeats 5

Times are wall-clock medians of jitted `jax.value_and_grad` over the outputs
(after one compile-and-run warm-up), in float32, on the default JAX backend.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from ssl_jax import estimators
from ssl_jax import losses
from ssl_jax import objectives


def time_fn(fn, args, repeats: int) -> float:
  """Median seconds of fn(*args) after a warm-up call; blocks on the result."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def make_outputs(n: int, d: int) -> dict[str, jax.Array]:
  keys = jax.random.split(jax.random.key(0), 6)
  names = ('z_a', 'z_b', 'p_a', 'p_b', 't_a', 't_b')
  return {k: jax.random.normal(key, (n, d), jnp.float32) for k, key in zip(names, keys)}


def bench_methods(n: int, d: int, repeats: int) -> list[tuple[str, float]]:
  out = make_outputs(n, d)
  rows = []
  for method in sorted(objectives.METHODS):
    objective = objectives.build_objective(objectives.method_terms(method))
    step = jax.jit(jax.value_and_grad(lambda o: objective(o)[0]))
    rows.append((method, time_fn(step, (out,), repeats)))
  return rows


ROUTED = {
    'covariance': lambda z, route: losses.covariance(z, route=route)[0],
    'logdet_entropy': lambda z, route: estimators.logdet_entropy(z, route=route)[0],
    'barlow_twins': lambda z, route: losses.barlow_twins(z, z[::-1], route=route)[0],
}


def bench_routes(n: int, d: int, repeats: int) -> list[tuple[str, float, float]]:
  z = make_outputs(n, d)['z_a']
  rows = []
  for name, fn in ROUTED.items():
    t = {}
    for route in ('gram', 'cov'):
      step = jax.jit(jax.value_and_grad(lambda z, route=route: fn(z, route)))
      t[route] = time_fn(step, (z,), repeats)
    rows.append((name, t['gram'], t['cov']))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', nargs='+', default=['256x2048', '2048x8192'],
                      help='NxD pairs')
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  print(f'backend: {jax.default_backend()}, devices: {jax.device_count()}, '
        f'jax {jax.__version__}')
  for size in args.sizes:
    n, d = (int(v) for v in size.split('x'))
    print(f'\n## N={n}, D={d}: value + gradient, median of {args.repeats} (ms)')
    print(f'| {"method":<16} | {"ms":>10} |')
    print(f'|{"-" * 18}|{"-" * 12}|')
    for method, sec in bench_methods(n, d, args.repeats):
      print(f'| {method:<16} | {1e3 * sec:>10.1f} |', flush=True)
    print(f'\n## N={n}, D={d}: Gram (N x N) route vs covariance (D x D) route (ms)')
    print(f'| {"term":<16} | {"gram":>10} | {"DxD":>10} | {"DxD/gram":>9} |')
    print(f'|{"-" * 18}|{"-" * 12}|{"-" * 12}|{"-" * 11}|')
    for name, gram, cov in bench_routes(n, d, args.repeats):
      print(f'| {name:<16} | {1e3 * gram:>10.1f} | {1e3 * cov:>10.1f} | {cov / gram:>9.2f} |',
            flush=True)


if __name__ == '__main__':
  main()
