"""The README's main command, timed end to end, with where the time goes.

  python benchmarks/default_run.py --contenders f2efaf6,HEAD --rounds 2
  python benchmarks/default_run.py --contenders 'HEAD,HEAD:--config.eval.online_every_steps=0'
  python benchmarks/default_run.py --contenders f210957,HEAD --rounds 3 --evaluation_only

Each contender is a git revision of this repository, optionally followed by
':' and extra command-line flags (';'-separated). Every revision is checked
out once into its own git worktree (under --worktrees), and rounds alternate
the contenders, so that a drifting machine affects them alike. One run is

  python -m ssl_jax.main --config=configs/vicreg_it.py --workdir=<fresh folder>

in that worktree, timed from outside (wall clock, the process's start-up and
imports included), with the float32 matmul rate measured right before it.
Caches start empty in every run (a fresh JAX compilation cache and baseline
cache), as on a new machine. --warm keeps one cache per contender across its
rounds instead: emptied before its first round, which is timed as a first run,
then kept, so that the later rounds time a second run or a resume (a revision
without caches runs as on a first run every time). The table then has a row
for each: the first run, and the median of the later ones.

--evaluation_only times the final evaluation alone, with less noise than a
whole run: each contender pretrains once (under --root, kept for later
calls), then every round re-evaluates that run (`--reevaluate`) with empty
caches, so the baselines are computed as on a first run.

The breakdown comes from the run's summary.json ('time_breakdown_sec', written
since this benchmark exists): start-up (imports, building, dataset), the first
step (compilation), the steps, the periodic work (online probe, diagnostics,
metrics, checkpoints) and the final evaluation (features, linear probe, kNN,
baselines). A revision without it is split into pretraining and evaluation
only. Results: --results.{json,md}.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import train_step as step_bench   # benchmarks/: matmul_peak
from ssl_jax import host  # (on the path train_step sets)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = ['-m', 'ssl_jax.main', '--config=configs/vicreg_it.py']
PERIODIC = ('online probe evaluation', 'training diagnostics', 'metrics', 'checkpoints')


def parse_contender(text):
  rev, _, flags = text.partition(':')
  return rev, [f for f in flags.split(';') if f]


def worktree(rev, folder):
  """A detached worktree of rev (resolved to its commit) under folder; its path."""
  commit = subprocess.run(['git', 'rev-parse', rev], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
  path = os.path.join(folder, commit[:12])
  if not os.path.isdir(path):
    subprocess.run(['git', 'worktree', 'add', '--detach', '-f', path, commit], cwd=ROOT,
                   check=True, capture_output=True)
  return commit, path


def breakdown(summary):
  """Seconds by part: start-up, compilation, steps, periodic, evaluation parts."""
  parts = summary.get('time_breakdown_sec')
  if not parts:
    return {'pretraining': summary['train_time_sec'],
            'evaluation': summary.get('eval_time_sec', 0.0)}
  out = {'start-up': parts.get('start-up', 0.0),
         'first step (compilation)': parts.get('first step (compilation)', 0.0),
         'steps': parts.get('steps', 0.0),
         'periodic work': sum(parts.get(k, 0.0) for k in PERIODIC)}
  out.update({k: v for k, v in parts.items() if k.startswith('evaluation')})
  return out


def run_once(path, flags, workdir, caches):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(caches, 'jax'),
             SSL_JAX_CACHE_DIR=os.path.join(caches, 'ssl_jax'))
  start = time.perf_counter()
  done = subprocess.run([sys.executable] + COMMAND + [f'--workdir={workdir}'] + flags,
                        cwd=path, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - start
  if done.returncode != 0:
    raise RuntimeError(f'run in {path} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}')
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  parts = breakdown(summary)
  parts['imports and process start'] = max(0.0, wall - summary['wall_time_sec'])
  return {'wall_sec': wall, 'breakdown_sec': parts,
          'linear_test_acc': summary['eval']['linear_test_acc'],
          'knn20_test_acc': summary['eval'].get('knn20_test_acc'),
          'raw_pixels_linear': summary.get('baseline_raw_pixels', {}).get('linear_test_acc'),
          'random_init_linear': summary.get('baseline_random_init', {}).get('linear_test_acc'),
          'steps': summary['steps']}


def pretrained_run(entry, root):
  """The workdir of one finished default run of the contender, pretrained here if absent."""
  workdir = os.path.abspath(os.path.join(root, f'{entry["commit"][:10]}_pretrained'))
  try:
    with open(os.path.join(workdir, 'summary.json')) as f:
      if json.load(f).get('status') == 'completed':
        return workdir
  except (OSError, ValueError):
    pass
  print(f'pretraining {entry["commit"][:10]} once for --evaluation_only', flush=True)
  caches = os.path.join(root, 'caches', entry['commit'][:10] + '_pretrained')
  shutil.rmtree(workdir, ignore_errors=True)
  shutil.rmtree(caches, ignore_errors=True)
  run_once(entry['path'], entry['flags'], workdir, caches)
  return workdir


def run_groups(result):
  """(contender, entry, kind, runs): all runs, or with --warm the first run and the later ones."""
  for name, entry in result['contenders'].items():
    if not result['warm']:
      if entry['runs']:
        yield name, entry, '', entry['runs']
      continue
    for kind, caches in ((' (first run)', 'empty'), (' (later runs)', 'kept')):
      runs = [r for r in entry['runs'] if r.get('caches', 'kept') == caches]
      if runs:
        yield name, entry, kind, runs


def markdown(result):
  if result.get('evaluation_only'):
    what = ('The final evaluation alone', '`python -m ssl_jax.main --config=configs/vicreg_it.py '
            '--reevaluate` on one finished run of the revision, in its worktree')
  else:
    what = ('Default run, end to end',
            '`python -m ssl_jax.main --config=configs/vicreg_it.py` in a worktree of the revision')
  lines = [f'# {what[0]} ({result["cpu"]})', '',
           f'`python benchmarks/default_run.py {" ".join(result["argv"])}`; each run is '
           f'{what[1]}, caches ' + ('emptied before each contender\'s first run and kept for its '
                                    'later runs (--warm)' if result['warm']
                                    else 'empty at every run') + '. Medians over rounds.', '',
           '| contender | commit | runs | wall (s) | vs first | linear | kNN-20 | matmul '
           'GFLOP/s |', '|---|---|---|---|---|---|---|---|']
  groups = list(run_groups(result))
  first = {}
  for name, entry, kind, runs in groups:
    wall = statistics.median(r['wall_sec'] for r in runs)
    first.setdefault(kind, wall)   # "vs first": against the first contender's runs of this kind
    rates = ', '.join(f'{r["gflops"]:.0f}' for r in runs)
    lines.append(
        f'| {name}{kind} | {entry["commit"][:10]} | {len(runs)} | {wall:.0f} '
        f'| {first[kind] / wall:.2f}x '
        f'| {100 * statistics.median(r["linear_test_acc"] for r in runs):.2f}% '
        f'| {100 * statistics.median(r["knn20_test_acc"] or 0 for r in runs):.2f}% '
        f'| {rates} |')
  lines += ['', '## Where the time goes (seconds, median over rounds)', '']
  for name, entry, kind, runs in groups:
    parts = sorted({k for r in runs for k in r['breakdown_sec']})
    lines += [f'**{name}{kind}**', '', '| part | seconds | share |', '|---|---|---|']
    wall = statistics.median(r['wall_sec'] for r in runs)
    for part in parts:
      seconds = statistics.median(r['breakdown_sec'].get(part, 0.0) for r in runs)
      if result.get('evaluation_only') and seconds < 0.05:
        continue   # the steps and periodic parts of a re-evaluation
      lines.append(f'| {part} | {seconds:.1f} | {100 * seconds / wall:.0f}% |')
    lines.append('')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--contenders', default='f2efaf6,HEAD')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--warm', action='store_true')
  parser.add_argument('--worktrees', default=os.path.join(tempfile.gettempdir(),
                                                          'ssl_jax_default_run'))
  parser.add_argument('--root', default='runs/default_run')
  parser.add_argument('--results', default='results/default_run')
  parser.add_argument('--resume', action='store_true',
                      help='keep the runs already in --results.json and add the missing ones')
  parser.add_argument('--evaluation_only', action='store_true',
                      help='time the final evaluation alone (--reevaluate on one pretrained run '
                           'per contender)')
  args = parser.parse_args()
  if args.evaluation_only and args.warm:
    parser.error('--evaluation_only times a first run\'s evaluation: drop --warm')
  previous = {}
  if args.resume and os.path.exists(args.results + '.json'):
    with open(args.results + '.json') as f:
      previous = json.load(f)['contenders']
  contenders = {}
  for text in args.contenders.split(','):
    rev, flags = parse_contender(text)
    commit, path = worktree(rev, args.worktrees)
    runs = previous.get(text, {}).get('runs', []) if previous.get(text, {}).get(
        'commit') == commit else []
    contenders[text] = {'commit': commit, 'path': path, 'flags': flags, 'runs': runs}
  result = {'cpu': host.cpu_name(), 'argv': sys.argv[1:], 'warm': args.warm,
            'evaluation_only': args.evaluation_only, 'contenders': contenders}
  if args.evaluation_only:
    for entry in contenders.values():
      entry['pretrained'] = pretrained_run(entry, args.root)
  for round_ in range(args.rounds):
    for name, entry in contenders.items():
      if len(entry['runs']) > round_:
        continue   # --resume: this round of this contender is done
      workdir = entry.get('pretrained') or os.path.abspath(
          os.path.join(args.root, f'{entry["commit"][:10]}_{round_}'))
      if not args.evaluation_only:
        shutil.rmtree(workdir, ignore_errors=True)
      caches = os.path.abspath(os.path.join(args.root, 'caches', entry['commit'][:10]
                                            + (f'_{round_}' if not args.warm else '')))
      first_run = not args.warm or round_ == 0
      if first_run:
        shutil.rmtree(caches, ignore_errors=True)
      gflops = step_bench.matmul_peak() / 1e9
      print(f'round {round_ + 1}/{args.rounds}: {name} ({gflops:.0f} GFLOP/s)', flush=True)
      run = run_once(entry['path'], entry['flags'] + (['--reevaluate'] if args.evaluation_only
                                                      else []), workdir, caches)
      run['gflops'] = gflops
      run['caches'] = 'empty' if first_run else 'kept'
      entry['runs'].append(run)
      print(f'  {run["wall_sec"]:.0f} s, linear {100 * run["linear_test_acc"]:.2f}%: '
            + ', '.join(f'{k} {v:.0f}' for k, v in run['breakdown_sec'].items()), flush=True)
      os.makedirs(os.path.dirname(args.results) or '.', exist_ok=True)
      with open(args.results + '.json', 'w') as f:
        json.dump(result, f, indent=1)
      with open(args.results + '.md', 'w') as f:
        f.write(markdown(result) + '\n')
  print(markdown(result))


if __name__ == '__main__':
  main()
