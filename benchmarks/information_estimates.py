"""Every I(Z; X) estimate against a known answer, before and after the fix.

  python benchmarks/information_estimates.py [--before f2efaf6]

The cases of tests/information_test.py (N = 1024 images with known centres,
Gaussian noise of a known covariance, the truth a Monte-Carlo with the exact
mixture density), for two views. "Before" runs `information_quantities` of
the revision --before (its midpoint-of-two-views estimates), loaded from git;
"after" runs today's. Prints a Markdown table and the count of estimates
consistent with the truth under the issue's rule (lower bounds at most 0.5
nats above it, upper bounds at most 0.5 below, point estimates within
max(0.75 nats, 25%)).
"""

import argparse
import importlib.util
import math
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))


def old_information_quantities(rev):
  """information_quantities of ssl_jax/diagnostics.py at a revision (a module then)."""
  source = subprocess.run(['git', 'show', f'{rev}:ssl_jax/diagnostics.py'], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
  path = os.path.join(tempfile.mkdtemp(), 'old_diagnostics.py')
  with open(path, 'w') as f:
    f.write(source.replace('from ssl_jax import normality', 'normality = None'))
  spec = importlib.util.spec_from_file_location('old_diagnostics', path)
  module = importlib.util.module_from_spec(spec)
  sys.modules['old_diagnostics'] = module   # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module.information_quantities


def consistent(key, value, truth):
  if 'lower' in key:
    return value <= truth + 0.5
  if 'upper' in key:
    return value >= truth - 0.5
  return abs(value - truth) <= max(0.75, 0.25 * truth)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--before', default='f2efaf6')
  args = parser.parse_args()
  import information_test as cases
  from ssl_jax.diagnostics import information
  before = old_information_quantities(args.before)
  old_keys = ('mi_pairwise_lower', 'mi_pairwise_upper', 'mi_logdet', 'mi_gaussian')
  new_keys = information.MI_KEYS
  print('| case | truth | ' + ' | '.join(f'before: {k[3:]}' for k in old_keys) + ' | '
        + ' | '.join(k[3:] for k in new_keys) + ' |')
  print('|---|---|' + '---|' * (len(old_keys) + len(new_keys)))
  ok_old = ok_new = total_old = total_new = 0
  for d, k, scale, noise in cases.CASES:
    mu, sigma = cases.make_case(d, k, scale, noise)
    truth = cases.true_information(mu, sigma)
    z = cases.views_of(mu, sigma, 2)
    old = before(z[:, 0].astype('float32'), z[:, 1].astype('float32'))
    new = information.information_quantities(z[:, 0], z[:, 1])
    cells = []
    for key, value in [(key, old[key]) for key in old_keys]:
      # The old code named mi_logdet and mi_gaussian as point estimates.
      good = consistent(key, value, truth)
      ok_old, total_old = ok_old + good, total_old + 1
      cells.append(f'{value:.2f}' + ('' if good else ' ✗'))
    for key in new_keys:
      good = consistent(key, new[key], truth)
      ok_new, total_new = ok_new + good, total_new + 1
      cells.append(f'{new[key]:.2f}' + ('' if good else ' ✗'))
    signal = 'no signal' if k == 0 else f'signal {scale:g} in {k} dims'
    print(f'| D={d}, {signal}, {noise} | {truth:.2f} | ' + ' | '.join(cells) + ' |')
  print(f'\nconsistent with the truth: before {ok_old} of {total_old}, after {ok_new} of '
        f'{total_new} (log N = {math.log(cases.N):.2f})')


if __name__ == '__main__':
  main()
