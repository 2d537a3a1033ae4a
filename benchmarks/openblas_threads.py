"""The default training step with OpenBLAS's own thread count against one thread.

  LD_PRELOAD=<libtcmalloc_minimal.so.4> python benchmarks/openblas_threads.py [--rounds 6] [--steps 3]

jaxlib's CPU Cholesky, SVD and eigh call SciPy's OpenBLAS, whose worker threads
busy-wait after each call on the cores XLA's step runs on; ssl_jax.train runs
its loop inside `lapack_threads.one_thread()` (ssl_jax/lapack_threads.py). This
times one compiled step of the default config (32-64-128-512, Winograd route)
in one process, alternating rounds of `--steps` steps with the thread counts
as loaded and with one thread, and prints the median seconds per step of each
and their ratio, with the machine's float32 matmul rate.
"""

import argparse
import os
import statistics
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import train_step  # pylint: disable=g-import-not-at-top  (benchmarks/)

from ssl_jax import allocator  # pylint: disable=g-import-not-at-top
from ssl_jax import host  # pylint: disable=g-import-not-at-top
from ssl_jax import lapack_threads  # pylint: disable=g-import-not-at-top


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=6)
  parser.add_argument('--steps', type=int, default=3)
  args = parser.parse_args()
  peak = train_step.matmul_peak()
  print(f'{host.cpu_name()}; float32 matmul {peak / 1e9:.1f} GFLOP/s; '
        f'tcmalloc {allocator.tcmalloc_loaded()}')
  step = train_step.JaxStep(train_step._config('cnn512', 'winograd'))  # pylint: disable=protected-access
  step.time(2)  # compiled and warm
  print('OpenBLAS libraries and their thread counts:', lapack_threads.thread_counts())
  seconds = {'as loaded': [], 'one thread': []}
  for _ in range(args.rounds):
    seconds['as loaded'].append(step.time(args.steps))
    with lapack_threads.one_thread():
      seconds['one thread'].append(step.time(args.steps))
  for name, values in seconds.items():
    print(f'{name:>10}: median {statistics.median(values) * 1e3:.1f} ms/step  '
          f'({", ".join(f"{v * 1e3:.0f}" for v in values)})')
  ratio = statistics.median(seconds['as loaded']) / statistics.median(seconds['one thread'])
  print(f'one thread is {ratio:.2f}x the speed of the counts as loaded')


if __name__ == '__main__':
  main()
