"""A random sample of a module's mutants, for a kill-rate estimate when running all is too slow.

    python tests/mutation_sample.py ssl_jax.augment 150 [--seed 0]   # prints mutant names
    python -m mutmut run --max-children 2 $(python tests/mutation_sample.py ssl_jax.augment 150)

The sample is uniform over the module's mutants (fixed seed, so it can be
resumed and reported), so the share killed estimates the module's kill rate;
tests/mutation_report.py gives it with a binomial interval.
"""

from __future__ import annotations

import argparse
import json
import os
import random

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mutant_names(module: str) -> list[str]:
  meta = os.path.join(ROOT, 'mutants', *module.split('.')) + '.py.meta'
  if not os.path.exists(meta):
    raise SystemExit(f'{meta} not found: run `python -m mutmut run` once (it generates the '
                     f'mutants, then can be stopped) or check the module name.')
  return sorted(json.load(open(meta))['exit_code_by_key'])


def sample(module: str, count: int, seed: int = 0) -> list[str]:
  names = mutant_names(module)
  return sorted(random.Random(seed).sample(names, min(count, len(names))))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('module')
  parser.add_argument('count', type=int)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  print(' '.join(sample(args.module, args.count, args.seed)))


if __name__ == '__main__':
  main()
