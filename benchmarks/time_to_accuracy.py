"""Time to accuracy: the default recipe's linear-probe accuracy at wall-clock budgets.

  python benchmarks/time_to_accuracy.py [--budgets 5,10,20,30] \
      [--contenders lax/glibc/cnn512-b256,winograd/tcmalloc/cnn512-b256] \
      [--root runs/time_to_accuracy]

A contender is conv route / allocator / recipe. Route and allocator are as in
benchmarks/train_step.py: `lax/glibc` is the step before the CPU work,
`winograd/tcmalloc` what `python -m ssl_jax.main` runs today on a CPU with
tcmalloc. The recipe names a set of config overrides (RECIPES below) on top of
configs/vicreg_it.py, spelled out in full so that a later change of the
default cannot change what a recipe's finished runs mean. For every contender
and budget B minutes, it runs the default command with the number of steps
that fits in B minutes, schedule and all, and reports the final linear-probe
and kNN test accuracy. The budget is the pretraining command's
wall clock: start-up, compilation, training and checkpoints, everything but
the final evaluation, which is reported beside it.

The steps that fit are found by two calibration runs per contender (60 and
160 steps, no final evaluation): pretraining time = fixed cost (start-up and
compilation) + steps * seconds per step, fitted to the two, so that the
periodic work every 50-100 steps (online probe, diagnostics, checkpoints) is
in the seconds per step. From the first budget on, every finished run of the
contender joins the fit. A run more than 3% over or 10% under its budget is
run again with the steps refitted; every row's actual pretraining time is in
the table. Each run is an ordinary workdir under --root; finished runs are
skipped when the command is repeated. Results: results/time_to_accuracy.
{json,md}, with the machine's CPU and measured float32 matmul rate.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Optional

import train_step as step_bench   # benchmarks/: matmul_peak
from ssl_jax import host  # (on the path train_step sets)

# Two lengths, so that a line through them prices the periodic work: fitted on
# one 60-step run's logged throughput alone, the first 10-minute runs took 11.9
# and 12.2 min and had to be run again.
CALIBRATION_STEPS = {'calibration': 60, 'calibration_long': 160}
# A run more than 3% over its budget, or more than 10% under it, is refitted
# and run again: over, it broke the budget; far under, it wasted a share of it
# that another contender may have used (the two-run calibration can err either
# way: a lax/glibc 10-minute run fitted on it took 7.8 min).
OVER_TOLERANCE = 0.03
UNDER_TOLERANCE = 0.10
TRAIN_IMAGES = 60_000   # Fashion-MNIST's training split, the default's pretraining set

# Recipes: what differs between them, as --config overrides of configs/vicreg_it.py.
RECIPES = {
    # The default recipe until 2026-11-22: small CNN 32-64-128-256, batch 256.
    'cnn256-b256': dict(channels='32-64-128-256', batch_size=256),
    # Twice the last conv's width: 512 features for the probe. At about 1.4x the
    # step time it reached 89.47% on the validation hold-out in 628 steps, against
    # 87.98% for cnn256-b256 in 810 (one seed each; runs/screen in the 2026-11-22
    # session notes).
    'cnn512-b256': dict(channels='32-64-128-512', batch_size=256),
}


def recipe_overrides(recipe: str) -> list[str]:
  if recipe not in RECIPES:
    raise SystemExit(f'Unknown recipe {recipe!r}; known: {sorted(RECIPES)} (benchmarks/'
                     'time_to_accuracy.py RECIPES).')
  r = RECIPES[recipe]
  return [f'--config.model.encoder.channels={r["channels"]}',
          f'--config.data.batch_size={r["batch_size"]}']


def run_cell(root: str, name: str, route: str, malloc: str, recipe: str, steps: int,
             evaluate: bool = True, report_only: bool = False) -> Optional[dict]:
  """Runs (or reuses) one ssl_jax.main run; returns its summary with 'pretrain_sec'.

  With report_only, a run that has not finished is not started: None.
  """
  workdir = os.path.join(root, name)
  record = os.path.join(workdir, 'time_to_accuracy.json')
  if os.path.exists(record):
    with open(record) as f:
      return json.load(f)
  if report_only:
    return None
  if os.path.exists(workdir):
    # A partial run would resume and so mis-time itself: start it again.
    subprocess.run(['rm', '-rf', workdir], check=True)
  env = dict(os.environ, SSL_JAX_MALLOC='system' if malloc == 'glibc' else 'tcmalloc')
  env.pop('LD_PRELOAD', None)
  command = [sys.executable, '-m', 'ssl_jax.main', '--config=configs/vicreg_it.py',
             f'--workdir={workdir}', f'--config.total_steps={steps}',
             f'--config.model.conv_route={route}', f'--config.eval.enabled={evaluate}'
             ] + recipe_overrides(recipe)
  # The matmul rate right before the run: runs reused across sessions may come
  # from machines of different speed, and each row says which.
  gflops = step_bench.matmul_peak() / 1e9
  print(f'  {name}: {steps} steps (matmul {gflops:.1f} GFLOP/s) ...', flush=True)
  start = time.time()
  subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  wall = time.time() - start
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  if summary.get('malloc') != ('system' if malloc == 'glibc' else 'tcmalloc'):
    raise SystemExit(f'{name}: ran with malloc {summary.get("malloc")}, not {malloc}; '
                     'is tcmalloc installed (apt-get install libtcmalloc-minimal4)?')
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rates = [json.loads(line).get('images_per_sec') for line in f if line.strip()]
  rates = [r for r in rates[1:] if r]   # the first interval includes compilation
  batch = summary['config']['data']['batch_size']
  summary = {k: v for k, v in summary.items() if k != 'config'}
  summary.update(name=name, route=route, malloc=malloc, recipe=recipe, wall_sec=wall,
                 batch_size=batch, matmul_gflops=gflops,
                 pretrain_sec=wall - (summary.get('eval_time_sec') or 0.0),
                 sec_per_step=batch / statistics.median(rates) if rates else None)
  with open(record, 'w') as f:
    json.dump(summary, f, indent=1)
  return summary


def over_budget(cell: dict, budget_min: float) -> bool:
  return cell['pretrain_sec'] > budget_min * 60 * (1 + OVER_TOLERANCE)


def under_budget(cell: dict, budget_min: float) -> bool:
  return cell['pretrain_sec'] < budget_min * 60 * (1 - UNDER_TOLERANCE)


def finished_runs(root: str, tag: str, exclude: list[str]) -> list[dict]:
  """The records of the finished runs of contender `tag` under `root`."""
  runs = []
  for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    record = os.path.join(root, name, 'time_to_accuracy.json')
    if name.startswith(tag + '__') and name not in exclude and os.path.exists(record):
      with open(record) as f:
        runs.append(json.load(f))
  return runs


def steps_within(seconds: float, runs: list[dict]) -> int:
  """Steps whose pretraining should take `seconds`, from the runs so far.

  From two runs on, time = fixed + steps * per_step is fitted to the runs'
  steps and pretraining times. One run alone (a root whose contender has only
  the 60-step calibration, from before the second one existed): its logged
  seconds per step and the rest of its wall time as a fixed cost, which misses
  the periodic work (online probe, diagnostics, checkpoints every 50-100 steps).
  """
  if len(runs) == 1:
    per_step = runs[0]['sec_per_step']
    fixed = runs[0]['pretrain_sec'] - runs[0]['steps'] * per_step
  else:
    n = [r['steps'] for r in runs]
    t = [r['pretrain_sec'] for r in runs]
    per_step, fixed = statistics.linear_regression(n, t)
  return int((seconds - fixed) / per_step)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--budgets', default='5,10,20,30', help='minutes, comma-separated')
  parser.add_argument('--contenders',
                      default='lax/glibc/cnn512-b256,winograd/tcmalloc/cnn512-b256')
  parser.add_argument('--root', default='runs/time_to_accuracy')
  parser.add_argument('--results', default='results/time_to_accuracy')
  parser.add_argument('--report_only', action='store_true',
                      help='tabulate the finished runs; start none (an off-budget run '
                           'without its refit is shown as such)')
  args = parser.parse_args()
  budgets = [float(b) for b in args.budgets.split(',')]
  peak = step_bench.matmul_peak()
  machine = f'{host.describe()}, float32 matmul {peak / 1e9:.1f} GFLOP/s'
  print(machine, flush=True)
  rows = []
  for contender in args.contenders.split(','):
    try:
      route, malloc, recipe = contender.split('/')
    except ValueError:
      raise SystemExit(f'A contender is route/allocator/recipe, e.g. '
                       f'im2col/tcmalloc/cnn256-b256; got {contender!r}.') from None
    recipe_overrides(recipe)   # fail before any run on an unknown recipe
    tag = contender.replace('/', '_')
    done = []
    for name, steps in CALIBRATION_STEPS.items():
      calibration = run_cell(args.root, f'{tag}__{name}', route, malloc, recipe, steps,
                             evaluate=False, report_only=args.report_only)
      if calibration is not None:
        done.append(calibration)
    if not done:
      print(f'  {contender}: not run')
      continue
    # Every finished run of this contender joins the fit, also those of budgets
    # not asked for this time: the longer the runs, the better the line.
    done += finished_runs(args.root, tag,
                          exclude=[f'{tag}__{name}' for name in CALIBRATION_STEPS])
    for budget in budgets:
      steps = steps_within(budget * 60, done)
      if steps < 10:
        print(f'  {budget:g} min: too short for {contender} ({steps} steps)')
        continue
      cell = run_cell(args.root, f'{tag}__{budget:g}min', route, malloc, recipe, steps,
                      report_only=args.report_only)
      if cell is None:
        print(f'  {budget:g} min: not run for {contender}')
        continue
      if cell not in done:
        done.append(cell)
      if over_budget(cell, budget) or under_budget(cell, budget):
        # Off budget: run it again with the steps refitted on this run too.
        refit = run_cell(args.root, f'{tag}__{budget:g}min_refit', route, malloc, recipe,
                         steps_within(budget * 60, done), report_only=args.report_only)
        if refit is not None:
          cell = refit
          if cell not in done:
            done.append(cell)
      rows.append(dict(contender=contender, budget_min=budget, steps=cell['steps'],
                       pretrain_min=cell['pretrain_sec'] / 60,
                       epochs=cell['steps'] * cell['batch_size'] / TRAIN_IMAGES,
                       linear=cell['eval']['linear_test_acc'],
                       knn20=cell['eval'].get('knn20_test_acc'),
                       raw_pixels=cell.get('baseline_raw_pixels', {}).get('linear_test_acc'),
                       random_init=cell.get('baseline_random_init', {}).get('linear_test_acc'),
                       eval_min=(cell.get('eval_time_sec') or 0) / 60,
                       sec_per_step=cell['sec_per_step'],
                       over_budget=over_budget(cell, budget),
                       under_budget=under_budget(cell, budget),
                       matmul_gflops=cell.get('matmul_gflops')))
      print(f'  {budget:g} min: {rows[-1]}', flush=True)
  os.makedirs(os.path.dirname(args.results) or '.', exist_ok=True)
  with open(args.results + '.json', 'w') as f:
    json.dump({'machine': machine, 'matmul_gflops': peak / 1e9, 'rows': rows}, f, indent=1)
  lines = [f'Time to accuracy of configs/vicreg_it.py with the recipes of '
           f'benchmarks/time_to_accuracy.py, on {machine} (now; each row gives the rate '
           'measured right before its run).', '',
           '| route/allocator/recipe | budget | steps (epochs) | pretraining time | linear probe '
           '| kNN-20 | matmul GFLOP/s |', '|---|---|---|---|---|---|---|']
  for r in rows:
    rate = f'{r["matmul_gflops"]:.1f}' if r.get('matmul_gflops') else 'not recorded'
    lines.append(f'| {r["contender"]} | {r["budget_min"]:g} min | {r["steps"]} '
                 f'({r["epochs"]:.1f}) | {r["pretrain_min"]:.1f} min'
                 f'{" (over budget, not refitted)" if r.get("over_budget") else ""}'
                 f'{" (under budget, not refitted)" if r.get("under_budget") else ""} | '
                 f'{r["linear"]:.2%} | '
                 f'{r["knn20"]:.2%} | {rate} |')
  if rows:
    lines.append('')
    for recipe in dict.fromkeys(r['contender'].split('/')[2] for r in rows):
      first = next(r for r in rows if r['contender'].endswith('/' + recipe))
      lines.append(f'- {recipe} ({", ".join(recipe_overrides(recipe))}): baselines raw pixels '
                   f'{first["raw_pixels"]:.2%}, random init {first["random_init"]:.2%} '
                   '(linear probe).')
    lines += ['', 'The final evaluation (not in the budget) took about '
              f'{statistics.median(r["eval_min"] for r in rows):.1f} min.']
  with open(args.results + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
