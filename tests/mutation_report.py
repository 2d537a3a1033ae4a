"""Kill rates by module from a mutmut run, for results/mutation.md.

    python tests/mutation_report.py                 # table of every mutated module
    python tests/mutation_report.py --survivors     # and each survivor not marked equivalent
    python tests/mutation_report.py --recheck-crashed   # exit-255 mutants' tests run again

Reads mutmut's own records (mutants/**/*.py.meta; mutmut 3). A survivor listed in
tests/mutation_equivalent.txt (one `mutant-name  reason` per line) is counted as
equivalent: a change no input can observe. The kill rate is killed / (checked -
equivalent); timeouts and mutants with no covering test count as not killed.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_CORE = ('ssl_jax.losses', 'ssl_jax.estimators', 'ssl_jax.objectives')

# mutmut 3.x exit codes (mutmut/stats.py).
KILLED, SURVIVED = {1, 3}, {0}
TIMEOUT, NO_TESTS = {36, 24, -24, 152}, {5, 33}
# mutmut's stats call 255 a timeout, but its fork server also reports 255 when the test
# process ends with an uncaught error, e.g. a mutant that makes a test module fail to import
# (tests/augment_test.py builds a ViewParams at import): listed apart; --recheck-crashed runs
# their tests again.
CRASHED = {255}


def equivalent_mutants(path: str) -> dict[str, str]:
  out = {}
  if os.path.exists(path):
    for line in open(path):
      line = line.strip()
      if line and not line.startswith('#'):
        name, _, reason = line.partition(' ')
        out[name] = reason.strip()
  return out


def statuses(mutants_dir: str) -> dict[str, dict[str, int | None]]:
  """{module: {mutant name: exit code or None (not run yet)}}."""
  out = {}
  for meta in sorted(glob.glob(os.path.join(mutants_dir, '**', '*.py.meta'), recursive=True)):
    module = os.path.relpath(meta, mutants_dir)[:-len('.py.meta')].replace(os.sep, '.')
    out[module] = json.load(open(meta))['exit_code_by_key']
  return out


def recheck_crashed(mutants_dir: str, by_module: dict[str, dict[str, int | None]]) -> None:
  """Runs each exit-255 mutant's covering test files; a failing run (1 or 2) counts as killed.

  pytest exits 1 when a test fails and 2 when collection fails (both: the mutant was
  noticed). Updates by_module in place; mutmut's own records are left as they are.
  """
  import subprocess
  stats = json.load(open(os.path.join(mutants_dir, 'mutmut-stats.json')))
  tests_by_function = stats['tests_by_mangled_function_name']
  for codes in by_module.values():
    for name, code in codes.items():
      if code not in CRASHED:
        continue
      function = name.rsplit('__mutmut_', 1)[0]
      files = sorted({t.split('::')[0] for t in tests_by_function.get(function, ())})
      if not files:
        continue
      run = subprocess.run(
          [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:randomly', '-p', 'no:xdist',
           *files], cwd=mutants_dir, env=dict(os.environ, MUTANT_UNDER_TEST=name),
          capture_output=True)
      print(f'{name}: pytest exit {run.returncode} on {", ".join(files)}', file=sys.stderr)
      if run.returncode in (1, 2):
        codes[name] = 1


def tally(codes: dict[str, int | None], equivalent: dict[str, str]) -> collections.Counter:
  count = collections.Counter(mutants=len(codes))
  for name, code in codes.items():
    if code is None:
      count['not run'] += 1
    elif code in KILLED:
      count['killed'] += 1
    elif code in SURVIVED:
      count['equivalent' if name in equivalent else 'survived'] += 1
    elif code in TIMEOUT:
      count['timeout'] += 1
    elif code in CRASHED:
      count['exit 255'] += 1
    elif code in NO_TESTS:
      count['no test'] += 1
    else:
      count['other'] += 1
  return count


def non_equivalent_run(c: collections.Counter) -> int:
  return c['mutants'] - c['not run'] - c['equivalent']


def rate(c: collections.Counter) -> str:
  denominator = non_equivalent_run(c)
  return f"{100 * c['killed'] / denominator:.1f}%" if denominator else '-'


def wilson_interval(killed: int, total: int, z: float = 1.96) -> tuple[float, float]:
  """95% Wilson score interval of a binomial proportion (Wilson 1927)."""
  if total == 0:
    return 0.0, 1.0
  p = killed / total
  centre = (p + z * z / (2 * total)) / (1 + z * z / total)
  half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
  return max(0.0, centre - half), min(1.0, centre + half)


def sample_interval(c: collections.Counter) -> str:
  """The module's kill rate, if the mutants run are a uniform sample of it (mutation_sample.py)."""
  denominator = non_equivalent_run(c)
  if not c['not run'] or not denominator:
    return ''
  lo, hi = wilson_interval(c['killed'], denominator)
  return f'{100 * lo:.1f}-{100 * hi:.1f}%'


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--mutants', default=os.path.join(ROOT, 'mutants'))
  parser.add_argument('--equivalent', default=os.path.join(ROOT, 'tests',
                                                           'mutation_equivalent.txt'))
  parser.add_argument('--survivors', action='store_true')
  parser.add_argument('--recheck-crashed', action='store_true',
                      help='run the tests of each exit-255 mutant again and count a failure '
                           'as killed (mutmut reports collection errors as exit 255)')
  args = parser.parse_args(argv)
  if not os.path.isdir(args.mutants):
    print(f'No {args.mutants}: run `python -m mutmut run` first (docs/development.md).',
          file=sys.stderr)
    return 1
  equivalent = equivalent_mutants(args.equivalent)
  by_module = statuses(args.mutants)
  if args.recheck_crashed:
    recheck_crashed(args.mutants, by_module)
  columns = ('mutants', 'not run', 'killed', 'equivalent', 'survived', 'timeout', 'exit 255',
             'no test', 'other')
  print('| module | ' + ' | '.join(columns) + ' | kill rate | 95% interval if a sample |')
  print('|---' * (len(columns) + 3) + '|')
  core = collections.Counter()
  for module, codes in by_module.items():
    c = tally(codes, equivalent)
    if module in LOSS_CORE:
      core += c
    print(f'| {module} | ' + ' | '.join(str(c[k]) for k in columns)
          + f' | {rate(c)} | {sample_interval(c)} |')
  print('| **loss core** | ' + ' | '.join(str(core[k]) for k in columns)
        + f' | **{rate(core)}** | |')
  print('\nkill rate = killed / (mutants - not run - equivalent); timeouts, exit 255 (unless '
        '--recheck-crashed finds their tests failing) and mutants no test covers count as not '
        'killed.\nWhere a module\'s mutants were not all run, the '
        'interval (Wilson, 95%) is its kill rate\'s if those run are a uniform sample '
        '(tests/mutation_sample.py); mutmut\'s own order is not one.')
  if args.survivors:
    print()
    for module, codes in by_module.items():
      for name, code in codes.items():
        if code is not None and code not in KILLED and name not in equivalent:
          print(f'{name}  exit {code}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
