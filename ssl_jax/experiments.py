"""Experiment grids: tune every method on a validation split, then seeds on the test split.

  python -m ssl_jax.experiments --config=configs/experiments/fmnist_compare.py \
      --root=runs/compare [--shard=0/2] [--parallel=1] [--aggregate_only]

An experiment config (ml_collections, like every other config) names methods,
each with its ssl_jax config file and a list of tuning trials, the overrides
shared by every cell (budget, hold-out), the tuning seed and the final seeds.

Two stages, one protocol (README, "The comparison"):
  tune:  every trial of every method at one seed, evaluated on the held-out
         validation images (data.eval_on='validation'); the test split is
         never read.
  final: each method at its best trial (validation linear probe), at every
         final seed, evaluated on the test split. At the tuning seed the
         pretraining is the chosen trial's own: its checkpoint is restored
         (when ROOT still has it) and only evaluated on the test split.
         A method whose every trial diverged has no final cells.

Each cell is an ordinary `python -m ssl_jax.main` run in ROOT/<cell>, with
its full config saved there. A finished cell writes a small result file
results/<experiment>/<cell>.json (committed to git): a cell with a result
file is done, so the grid survives a move to a machine where ROOT is gone.
An interrupted cell resumes from its checkpoint when the command is run
again. `--shard=i/k` runs every k-th cell, so machines can split the grid;
final cells of a method wait until all of its tuning results exist.

Aggregation (after every cell, or alone with --aggregate_only) reads every
result file and writes results/<experiment>.json (all cells), .md (tables:
tuning, final with 95% Student-t intervals, paired differences) and .png.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from ssl_jax import cli
from ssl_jax import metrics
from ssl_jax import workdir_lock


@dataclasses.dataclass(frozen=True)
class Flags:
  """The flag holders of one command line (`define_flags`)."""
  config: Any
  root: Any
  results: Any
  shard: Any
  parallel: Any
  aggregate_only: Any
  max_cells: Any
  readme: Any
  dry_run: Any


def define_flags(flag_values: flags.FlagValues) -> Flags:
  """Defines this command's flags in flag_values (absl's FLAGS, or fresh ones in tests)."""
  fv = dict(flag_values=flag_values)
  return Flags(
      config=config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                             lock_config=True, **fv),
      root=flags.DEFINE_string('root', 'runs/experiments', "Folder of the cells' workdirs.",
                               **fv),
      results=flags.DEFINE_string('results', 'results', 'Folder of the committed result files.',
                                  **fv),
      shard=flags.DEFINE_string('shard', '0/1', 'i/k: run only cells whose index is i mod k.',
                                **fv),
      parallel=flags.DEFINE_integer('parallel', 1, 'Cells run at once.', **fv),
      aggregate_only=flags.DEFINE_bool('aggregate_only', False, 'Only rebuild the tables.',
                                       **fv),
      max_cells=flags.DEFINE_integer('max_cells', 0, 'Stop after this many cells (0: all).',
                                     **fv),
      readme=flags.DEFINE_string(
          'readme', 'README.md', 'A file whose <!-- results:NAME:start/end --> block is '
          'replaced by the tables (skipped when it has no such block).', **fv),
      dry_run=flags.DEFINE_bool(
          'dry_run', False, "Check the grid without running it: every cell's command is "
          'parsed and validated as `ssl_jax.main --dry_run` would; prints the plan. Writes '
          'nothing.', **fv))


# Paired comparisons the paper claims: (entropy variant, its base method).
# A method whose test features' effective rank is below a quarter of this
# method's counts as dimensionally collapsed (the grid's acceptance criterion).
COLLAPSE_REFERENCE = 'vicreg'
CLAIMS = (('vicreg_it', 'vicreg'), ('vicreg_pairdist', 'vicreg'),
          ('byol_logdet', 'byol'), ('byol_pairdist', 'byol'))
SELECTION_METRIC = 'linear_test_acc'   # in tuning cells, accuracy on the validation split


# ----------------------------------------------------------------------------
# Cells.
# ----------------------------------------------------------------------------

def parse_overrides(text: str) -> dict[str, str]:
  """'optim.base_lr=0.3, variant=add' -> {'optim.base_lr': '0.3', 'variant': 'add'}."""
  out = {}
  for item in (part.strip() for part in (text or '').split(',')):
    if not item:
      continue
    if '=' not in item:
      raise ValueError(f"Trial override {item!r} must look like 'key=value' "
                       "(e.g. 'optim.base_lr=0.3').")
    key, value = (s.strip() for s in item.split('=', 1))
    out[key] = value
  return out


@dataclasses.dataclass(frozen=True)
class Cell:
  """One ssl_jax.main run of the grid."""
  method: str
  stage: str              # 'tune' or 'final'
  trial: int              # index into the method's trials
  seed: int
  config_file: str
  overrides: tuple[tuple[str, str], ...]

  @property
  def name(self) -> str:
    if self.stage == 'tune':
      return f'{self.method}__tune{self.trial}__s{self.seed}'
    return f'{self.method}__final__s{self.seed}'

  def command(self, workdir: str) -> list[str]:
    overrides = dict(self.overrides)
    variant = overrides.pop('variant', '')
    config = self.config_file + (f':{variant}' if variant else '')
    return ([sys.executable, '-m', 'ssl_jax.main', f'--config={config}', f'--workdir={workdir}',
             f'--config.seed={self.seed}']
            + [f'--config.{k}={v}' for k, v in overrides.items()])


def trials_of(experiment, method: str) -> list[dict[str, str]]:
  spec = experiment.methods[method]
  return [parse_overrides(t) for t in (spec.trials or [''])]


def cell_overrides(experiment, method: str, trial: int, stage: str) -> tuple:
  merged = dict(parse_overrides(experiment.shared))
  merged.update(trials_of(experiment, method)[trial])
  merged['data.eval_on'] = 'validation' if stage == 'tune' else 'test'
  return tuple(sorted(merged.items()))


def tuning_cells(experiment) -> list[Cell]:
  """Trial-major order, so a partial grid covers every method early."""
  cells = []
  most = max(len(trials_of(experiment, m)) for m in experiment.methods)
  for trial in range(most):
    for method in experiment.methods:
      if trial < len(trials_of(experiment, method)):
        cells.append(Cell(method, 'tune', trial, experiment.tune_seed,
                          experiment.methods[method].config,
                          cell_overrides(experiment, method, trial, 'tune')))
  return cells


def final_cells(experiment, chosen: dict[str, Optional[int]],
                skip: frozenset[str] = frozenset()) -> list[Cell]:
  """Seed-major; a method whose tuning is unfinished has trial -1 (not ready).

  Methods in `skip` (every tuning trial diverged) have no final cells.
  """
  cells = []
  for seed in experiment.final_seeds:
    for method in experiment.methods:
      if method in skip:
        continue
      trial = chosen.get(method)
      overrides = cell_overrides(experiment, method, trial, 'final') if trial is not None else ()
      cells.append(Cell(method, 'final', -1 if trial is None else trial, seed,
                        experiment.methods[method].config, overrides))
  return cells


def parse_shard(text: str) -> tuple[int, int]:
  try:
    index, count = (int(v) for v in text.split('/'))
  except ValueError as error:
    raise ValueError(f"--shard must look like 'i/k' (e.g. 0/2), got {text!r}.") from error
  if count < 1 or not 0 <= index < count:
    raise ValueError(f'--shard={text}: need 0 <= i < k.')
  return index, count


def in_shard(cells: Sequence[Cell], shard: tuple[int, int]) -> list[Cell]:
  """Cells are numbered tuning first, then final, in a fixed order; shard i takes i mod k."""
  index, count = shard
  return [cell for j, cell in enumerate(cells) if j % count == index]


# ----------------------------------------------------------------------------
# Result files.
# ----------------------------------------------------------------------------

def results_dir(results: str, experiment) -> str:
  return os.path.join(results, experiment.name)


def result_path(results: str, experiment, cell: Cell) -> str:
  return os.path.join(results_dir(results, experiment), cell.name + '.json')


def load_results(results: str, experiment) -> dict[str, dict[str, Any]]:
  folder = results_dir(results, experiment)
  out = {}
  if os.path.isdir(folder):
    for filename in sorted(os.listdir(folder)):
      if filename.endswith('.json'):
        with open(os.path.join(folder, filename)) as f:
          out[filename[:-5]] = json.load(f)
  return out


def choose_trials(experiment, results: dict[str, dict]) -> dict[str, Optional[int]]:
  """Per method, the tuning trial with the best validation linear probe (None: unfinished)."""
  chosen = {}
  for method in experiment.methods:
    scores = []
    for cell in tuning_cells(experiment):
      if cell.method == method:
        result = results.get(cell.name)
        if result is None:
          break
        # A diverged trial (no metrics) ranks below every completed one.
        scores.append((result['metrics'].get(SELECTION_METRIC, -math.inf), -cell.trial,
                       cell.trial))
    else:
      chosen[method] = max(scores)[2] if scores else None
      continue
    chosen[method] = None
  return chosen


def all_trials_diverged(experiment, results: dict[str, dict]) -> frozenset[str]:
  """Methods whose every tuning trial has a result and none trained (all diverged).

  Such a method has no setting to run at the final seeds: its final cells are
  not run, and its claims are reported as not reproduced at this budget.
  """
  out = set()
  for method in experiment.methods:
    names = [c.name for c in tuning_cells(experiment) if c.method == method]
    if names and all(results.get(n, {}).get('status') == 'diverged' for n in names):
      out.add(method)
  return frozenset(out)


def git_commit() -> str:
  try:
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                            check=True).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                           capture_output=True, text=True, check=True).stdout.strip()
    return commit + ('-dirty' if dirty else '')
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def diverged_result(cell: Cell, log_text: str, seconds: float, commit: str
                    ) -> Optional[dict[str, Any]]:
  """A result for a cell whose loss became non-finite (ssl_jax.train.NonFiniteLossError).

  A diverged trial is an outcome of the grid, not a crash: resuming it would
  replay the same steps to the same NaN. It has no metrics and is never chosen.
  """
  lines = [line for line in log_text.splitlines() if 'NonFiniteLossError' in line]
  if not lines:
    return None
  return {
      'cell': cell.name, 'method': cell.method, 'stage': cell.stage, 'trial': cell.trial,
      'seed': cell.seed, 'overrides': dict(cell.overrides), 'commit': commit,
      'status': 'diverged', 'error': lines[-1].strip(), 'metrics': {}, 'steps': None,
      'evaluated_on': None, 'wall_time_sec': seconds, 'config': None,
  }


def result_from_summary(cell: Cell, summary: dict[str, Any], commit: str) -> dict[str, Any]:
  return {
      'cell': cell.name, 'method': cell.method, 'stage': cell.stage, 'trial': cell.trial,
      'seed': cell.seed, 'overrides': dict(cell.overrides), 'commit': commit,
      'status': 'completed',
      'evaluated_on': 'validation' if cell.stage == 'tune' else 'test',
      'metrics': summary['eval'], 'steps': summary['steps'],
      'wall_time_sec': summary['wall_time_sec'], 'config': summary['config'],
  }


def write_json(path: str, value: Any) -> None:
  """Writes through a temporary file, so a kill never leaves half a file."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------
# Running.
# ----------------------------------------------------------------------------

REUSE_MARKER = 'pretraining_from.json'


def reusable_pretraining(experiment, root: str, results: str, cell: Cell) -> Optional[str]:
  """The workdir of the tuning run this final cell would repeat, if it can be reused.

  The final cell at the tuning seed pretrains exactly as its chosen tuning
  trial did (same config, seed and 50,000 images; only data.eval_on differs),
  so it restores that run's final checkpoint and only evaluates, on the test
  split. Reused only when the tuning run completed with the overrides this
  cell has now (a trial redefined since it ran is not reused) and its folder
  still holds the checkpoints; otherwise the cell pretrains from scratch.
  """
  if cell.stage != 'final' or cell.seed != experiment.tune_seed or cell.trial < 0:
    return None
  tune = Cell(cell.method, 'tune', cell.trial, cell.seed, cell.config_file,
              cell_overrides(experiment, cell.method, cell.trial, 'tune'))
  source = os.path.join(root, tune.name)
  result_file = result_path(results, experiment, tune)
  if (os.path.exists(os.path.join(root, cell.name, 'checkpoints'))
      or not os.path.isdir(os.path.join(source, 'checkpoints'))
      or not os.path.exists(result_file)):
    return None
  with open(result_file) as f:
    result = json.load(f)
  summary = finished_summary(source)
  # (Result files of the grid's first cells have no 'status'; a completed one has metrics.)
  if (result.get('status', 'completed') != 'completed' or not result.get('metrics')
      or result.get('overrides') != dict(tune.overrides)
      or summary is None or summary.get('steps') != summary.get('total_steps')):
    return None
  return source


def reuse_pretraining(source: str, workdir: str) -> None:
  """Copies a finished tuning run's checkpoints and metrics into a final cell's workdir."""
  shutil.copytree(os.path.join(source, 'checkpoints'), os.path.join(workdir, 'checkpoints'))
  for name in ('metrics.jsonl',):
    if os.path.exists(os.path.join(source, name)):
      shutil.copy2(os.path.join(source, name), os.path.join(workdir, name))
  with open(os.path.join(source, 'summary.json')) as f:
    summary = json.load(f)
  write_json(os.path.join(workdir, REUSE_MARKER),
             {'cell': os.path.basename(source), 'wall_time_sec': summary['wall_time_sec']})

def finished_summary(workdir: str) -> Optional[dict[str, Any]]:
  """The summary of a completed, evaluated cell in workdir, else None."""
  summary = metrics.completed_summary(workdir)
  return summary if summary is not None and 'eval' in summary else None


class Runner:
  """Runs cells as subprocesses (at most `parallel` at once), with a progress line."""

  def __init__(self, experiment, root: str, results: str, parallel: int, total: int,
               done: int, max_cells: int = 0, readme: Optional[str] = None):
    self.experiment, self.root, self.results, self.readme = experiment, root, results, readme
    self.parallel = max(1, parallel)
    # name -> (cell, process, start time, log file, commit the cell started at)
    self.running: dict[str, tuple[Cell, subprocess.Popen, float, Any, str]] = {}
    self.total, self.done, self.started_here = total, done, 0
    self.max_cells = max_cells
    self.cell_seconds: list[float] = []
    self.t0 = time.time()
    self.stopping = False
    self.commit = git_commit()

  def progress(self, note: str = '') -> None:
    left = self.total - self.done - len(self.running)
    elapsed = time.time() - self.t0
    eta = ''
    if self.cell_seconds:
      mean = sum(self.cell_seconds) / len(self.cell_seconds)
      eta = f', about {(left + len(self.running)) * mean / self.parallel / 3600:.1f} h left'
    print(f'[{time.strftime("%H:%M:%S")}] cells: {self.done} done, {len(self.running)} running, '
          f'{left} left of {self.total}; {elapsed / 60:.0f} min elapsed{eta}'
          + (f' | {note}' if note else ''), flush=True)

  def start(self, cell: Cell) -> None:
    workdir = os.path.join(self.root, cell.name)
    os.makedirs(workdir, exist_ok=True)
    if (source := reusable_pretraining(self.experiment, self.root, self.results, cell)):
      reuse_pretraining(source, workdir)
    log = open(os.path.join(workdir, 'log.txt'), 'a')
    log.write(f'\n$ {" ".join(cell.command(workdir))}\n')
    log.flush()
    # Its own session (a Ctrl-C reaches the runner, which stops cells cleanly),
    # and it dies with the runner even by SIGKILL: an orphaned cell would keep
    # training while a restarted runner starts the same cell again.
    env = dict(os.environ, **{cli.PARENT_PID_ENV: str(os.getpid())})
    process = subprocess.Popen(cell.command(workdir), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True, env=env,
                               preexec_fn=cli.die_with_parent(os.getpid()))
    self.running[cell.name] = (cell, process, time.time(), log, git_commit())
    self.started_here += 1
    self.progress(f'started {cell.name}')

  def record(self, cell: Cell, summary: dict[str, Any], commit: str) -> None:
    result = result_from_summary(cell, summary, commit)
    marker = os.path.join(self.root, cell.name, REUSE_MARKER)
    if os.path.exists(marker):
      with open(marker) as f:
        source = json.load(f)
      # This cell only evaluated; its wall time is the evaluation's. The final
      # table's wall time averages the cells that pretrained (wall_time_sec).
      result.update(pretraining_from=source, wall_time_sec=None,
                    eval_wall_time_sec=summary['wall_time_sec'])
    write_json(result_path(self.results, self.experiment, cell), result)
    self.done += 1

  def poll(self) -> None:
    for name, (cell, process, started, log, commit) in list(self.running.items()):
      code = process.poll()
      if code is None:
        continue
      log.close()
      del self.running[name]
      workdir = os.path.join(self.root, name)
      summary = finished_summary(workdir)
      if summary is not None:
        self.record(cell, summary, commit)
        self.cell_seconds.append(time.time() - started)
        self.progress(f'finished {name}: {SELECTION_METRIC}='
                      f'{summary["eval"][SELECTION_METRIC]:.4f}')
        aggregate(self.experiment, self.results, self.readme)
        continue
      with open(os.path.join(workdir, 'log.txt')) as f:
        diverged = diverged_result(cell, f.read(), time.time() - started, commit)
      if diverged is not None:
        write_json(result_path(self.results, self.experiment, cell), diverged)
        self.done += 1
        self.progress(f'{name} diverged (non-finite loss): recorded, not retried')
        aggregate(self.experiment, self.results, self.readme)
      elif not self.stopping:
        raise RuntimeError(f'Cell {name} exited with code {code} without a summary; see '
                           f'{os.path.join(workdir, "log.txt")}. Fix the cause and run the '
                           'same command again: finished cells are kept, this one resumes.')

  def stop(self, signum, frame) -> None:
    del frame
    self.stopping = True
    print(f'experiments: signal {signum}: asking running cells to checkpoint and stop...',
          flush=True)
    for _, process, _, _, _ in self.running.values():
      process.send_signal(signal.SIGTERM)

  def budget_left(self) -> bool:
    return not self.max_cells or self.started_here < self.max_cells


def run(experiment, root: str, results: str, shard: tuple[int, int], parallel: int,
        max_cells: int = 0, readme: Optional[str] = None) -> None:
  """Runs this shard's unfinished cells, tuning before final; resumable."""
  # One runner per root: a second one (or a restart while the first still
  # runs) would start the same cells again.
  with workdir_lock.hold(root, command=f'ssl_jax.experiments {experiment.name} shard '
                                       f'{shard[0]}/{shard[1]}'):
    _run_locked(experiment, root, results, shard, parallel, max_cells, readme)


def _run_locked(experiment, root: str, results: str, shard: tuple[int, int], parallel: int,
                max_cells: int, readme: Optional[str]) -> None:
  def plan():
    recorded = load_results(results, experiment)
    cells = tuning_cells(experiment) + final_cells(
        experiment, choose_trials(experiment, recorded),
        skip=all_trials_diverged(experiment, recorded))
    return recorded, in_shard(cells, shard)

  recorded, mine = plan()
  done = sum(cell.name in recorded for cell in mine)
  runner = Runner(experiment, root, results, parallel, len(mine), done, max_cells, readme)
  previous = {sig: signal.signal(sig, runner.stop) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    runner.progress(f'experiment {experiment.name}, shard {shard[0]}/{shard[1]}, '
                    f'commit {runner.commit}')
    while True:
      recorded, mine = plan()
      waiting, busy = [], []
      for cell in mine:
        if runner.stopping or len(runner.running) >= runner.parallel or not runner.budget_left():
          break
        if cell.name in recorded or cell.name in runner.running:
          continue
        if cell.trial < 0:
          waiting.append(cell.name)
          continue
        if workdir_lock.holder(os.path.join(root, cell.name)) is not None:
          busy.append(cell.name)   # a process outside this runner still trains it
          continue
        summary = finished_summary(os.path.join(root, cell.name))
        if summary is not None:   # finished earlier, result file lost: record, don't rerun
          runner.record(cell, summary, 'unknown (finished before this runner started)')
          runner.progress(f'recorded finished {cell.name}')
          continue
        runner.start(cell)
      if not runner.running:
        if busy and not runner.stopping:
          runner.progress(f'{busy[0]} is still held by another process (see its log.txt); '
                          'waiting for it to exit')
          time.sleep(5)
          continue
        if waiting and not runner.stopping and runner.budget_left():
          runner.progress(f'{len(waiting)} final cells wait for other shards\' tuning; '
                          'checking again in 60 s')
          time.sleep(60)
          continue
        break
      time.sleep(2)
      runner.poll()
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  aggregate(experiment, results, readme)
  runner.progress('stopped' if runner.stopping else 'nothing left to run in this shard')


# ----------------------------------------------------------------------------
# Aggregation.
# ----------------------------------------------------------------------------

# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t_quantile_975(df: int) -> float:
  """t_{0.975, df}: a table to 30, then the Cornish-Fisher expansion (error < 1e-4)."""
  if df < 1:
    raise ValueError(f'Degrees of freedom must be >= 1, got {df}.')
  if df <= len(_T975):
    return _T975[df - 1]
  z = 1.959964
  return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
          + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def mean_ci(values: Sequence[float]) -> tuple[float, float, int]:
  """(mean, half-width of the 95% Student-t interval, n); half-width nan for n < 2."""
  n = len(values)
  if n == 0:
    return math.nan, math.nan, 0
  mean = sum(values) / n
  if n < 2:
    return mean, math.nan, n
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
  return mean, t_quantile_975(n - 1) * sd / math.sqrt(n), n


def paired(variant: dict[int, float], base: dict[int, float]) -> tuple[float, float, int]:
  """Mean and 95% interval of variant - base over the seeds both have."""
  seeds = sorted(set(variant) & set(base))
  return mean_ci([variant[s] - base[s] for s in seeds])


def verdict(mean: float, half: float, n: int) -> str:
  if n < 2 or math.isnan(half):
    return 'inconclusive: fewer than 2 paired seeds so far'
  if mean - half > 0:
    return 'reproduced: the entropy variant is better (95% interval above 0)'
  if mean + half < 0:
    return 'not reproduced: the base method is better (95% interval below 0)'
  return 'inconclusive at this budget (95% interval contains 0)'


FINAL_METRICS = ('linear_test_acc', 'knn_test_acc', 'effective_rank', 'entropy_logdet',
                 'entropy_pairwise_upper', 'entropy_pairwise_lower', 'entropy_gaussian')


def knn_k(metrics: dict[str, float]) -> Optional[int]:
  """The smallest k of the run's kNN accuracies (20 in the default config)."""
  ks = [int(k[3:-9]) for k in metrics if k.startswith('knn') and k.endswith('_test_acc')]
  return min(ks) if ks else None


def metric(result: dict[str, Any], name: str) -> float:
  """A result's metric; 'knn_test_acc' is the kNN accuracy at the smallest k."""
  metrics = result['metrics']
  if name == 'knn_test_acc':
    k = knn_k(metrics)
    return metrics[f'knn{k}_test_acc'] if k is not None else math.nan
  return metrics.get(name, math.nan)


def summarise(experiment, results: dict[str, dict]) -> dict[str, Any]:
  """Tuning choices, final means with intervals, and paired differences."""
  chosen = choose_trials(experiment, results)
  diverged = all_trials_diverged(experiment, results)
  for method in diverged:
    chosen[method] = None
  final: dict[str, dict[str, Any]] = {}
  for method in experiment.methods:
    rows = [r for r in results.values() if r['method'] == method and r['stage'] == 'final'
            and r.get('status', 'completed') == 'completed']
    stats = {m: mean_ci([metric(r, m) for r in rows]) for m in FINAL_METRICS}
    # Cells that reused their tuning run's pretraining only evaluated: not counted.
    stats['wall_time_sec'] = mean_ci([r['wall_time_sec'] for r in rows
                                      if r.get('wall_time_sec') is not None])
    final[method] = {'seeds': sorted(r['seed'] for r in rows), 'stats': stats,
                     'all_trials_diverged': method in diverged}
  claims = []
  for variant, base in CLAIMS:
    if variant not in experiment.methods or base not in experiment.methods:
      continue
    by_seed = lambda m, name: {r['seed']: metric(r, name) for r in results.values()
                               if r['method'] == m and r['stage'] == 'final'}
    entry = {'variant': variant, 'base': base}
    for name in ('linear_test_acc', 'knn_test_acc'):
      mean, half, n = paired(by_seed(variant, name), by_seed(base, name))
      entry[name] = {'mean_diff': mean, 'ci95_half': half, 'n': n,
                       'verdict': verdict(mean, half, n)}
      if variant in diverged:
        entry[name]['verdict'] = ('not reproduced: every tuning trial of the variant diverged '
                                  '(non-finite loss) at this budget')
    claims.append(entry)
  ks = {knn_k(r['metrics']) for r in results.values()} - {None}
  return {'chosen_trial': chosen, 'final': final, 'claims': claims,
          'knn_k': min(ks) if ks else None}


def _pct(mean: float, half: float) -> str:
  if math.isnan(mean):
    return '-'
  return f'{100 * mean:.2f}' + ('' if math.isnan(half) else f' ± {100 * half:.2f}')


def _num(mean: float, half: float, digits: int = 1) -> str:
  if math.isnan(mean):
    return '-'
  return f'{mean:.{digits}f}' + ('' if math.isnan(half) else f' ± {half:.{digits}f}')


def markdown(experiment, results: dict[str, dict], summary: dict[str, Any]) -> str:
  lines = [f'# {experiment.name}', '',
           f'{experiment.get("description", "")}'.strip(), '',
           f'Generated by `python -m ssl_jax.experiments` from {len(results)} result files in '
           f'`results/{experiment.name}/`; do not edit by hand.', '',
           '## Tuning (one seed, validation split)', '',
           f'| method | trial | overrides | val. linear (%) | val. kNN-{summary["knn_k"]} (%) '
           '| eff. rank | chosen |',
           '|---|---|---|---|---|---|---|']
  for cell in tuning_cells(experiment):
    r = results.get(cell.name)
    trial = trials_of(experiment, cell.method)[cell.trial]
    text = ', '.join(f'{k}={v}' for k, v in trial.items()) or '(defaults)'
    if r is None or r.get('status') == 'diverged':
      state = 'pending' if r is None else 'diverged (non-finite loss)'
      lines.append(f'| {cell.method} | {cell.trial} | {text} | {state} | | | |')
      continue
    m = r['metrics']
    mark = 'yes' if summary['chosen_trial'].get(cell.method) == cell.trial else ''
    lines.append(f'| {cell.method} | {cell.trial} | {text} | {100 * m["linear_test_acc"]:.2f} '
                 f'| {100 * metric(r, "knn_test_acc"):.2f} | {m["effective_rank"]:.1f} | {mark} |')
  lines += ['', '## Final (chosen settings, test split; mean ± 95% Student-t interval)', '',
            f'| method | seeds | linear (%) | kNN-{summary["knn_k"]} (%) | eff. rank | H log-det | '
            'H pairwise upper | H pairwise lower | H Gaussian | wall time (min) |',
            '|---|---|---|---|---|---|---|---|---|---|']
  for method, entry in summary['final'].items():
    if entry.get('all_trials_diverged'):
      lines.append(f'| {method} | 0 | every tuning trial diverged: no setting to run at the '
                   'final seeds | | | | | | | |')
      continue
    s = entry['stats']
    wall = s['wall_time_sec']
    lines.append(
        f'| {method} | {len(entry["seeds"])} | {_pct(*s["linear_test_acc"][:2])} '
        f'| {_pct(*s["knn_test_acc"][:2])} | {_num(*s["effective_rank"][:2])} '
        f'| {_num(*s["entropy_logdet"][:2])} | {_num(*s["entropy_pairwise_upper"][:2])} '
        f'| {_num(*s["entropy_pairwise_lower"][:2])} | {_num(*s["entropy_gaussian"][:2])} '
        f'| {_num(wall[0] / 60, wall[1] / 60)} |')
  base_rank = summary['final'].get(COLLAPSE_REFERENCE, {}).get('stats', {}).get(
      'effective_rank', (math.nan,))[0]
  shares = [(m, e['stats']['effective_rank'][0] / base_rank)
            for m, e in summary['final'].items()
            if m != COLLAPSE_REFERENCE and e['seeds'] and not math.isnan(base_rank)]
  if shares:
    lines += ['', f'Dimensional collapse check, mean effective rank as a share of '
              f'{COLLAPSE_REFERENCE}\'s: ' + ', '.join(f'{m} {v:.2f}' for m, v in shares)
              + '. Below 0.25 counts as collapsed: '
              + (', '.join(m for m, v in shares if v < 0.25) or 'none') + '.']
  if any(r.get('pretraining_from') for r in results.values()):
    lines += ['', f'At seed {experiment.tune_seed}, a final cell restores its chosen tuning '
              'run\'s checkpoint (the same pretraining) and only evaluates it on the test split; '
              'wall time averages the cells that pretrained.']
  lines += ['', '## The paper\'s claims: entropy variant minus its base method (same seeds)', '',
            f'| comparison | seeds | linear (points) | kNN-{summary["knn_k"]} (points) '
            '| linear-probe verdict |',
            '|---|---|---|---|---|']
  for claim in summary['claims']:
    lin, knn = claim['linear_test_acc'], claim['knn_test_acc']
    lines.append(f'| {claim["variant"]} - {claim["base"]} | {lin["n"]} '
                 f'| {_pct(lin["mean_diff"], lin["ci95_half"])} '
                 f'| {_pct(knn["mean_diff"], knn["ci95_half"])} | {lin["verdict"]} |')
  return '\n'.join(lines) + '\n'


def plot(experiment, summary: dict[str, Any], path: str) -> Optional[str]:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  methods = [m for m, e in summary['final'].items() if e['seeds']]
  if not methods:
    return None
  fig, ax = plt.subplots(figsize=(1.2 * len(methods) + 2, 4))
  for offset, (name, label) in enumerate((('linear_test_acc', 'linear probe'),
                                          ('knn_test_acc', f'kNN k={summary["knn_k"]}'))):
    means = [100 * summary['final'][m]['stats'][name][0] for m in methods]
    halves = [100 * summary['final'][m]['stats'][name][1] for m in methods]
    halves = [0 if math.isnan(h) else h for h in halves]
    xs = [i + 0.15 * (2 * offset - 1) for i in range(len(methods))]
    ax.errorbar(xs, means, yerr=halves, fmt='o', capsize=4, label=label)
  ax.set_xticks(range(len(methods)))
  ax.set_xticklabels(methods, rotation=30, ha='right')
  ax.set_ylabel('test accuracy (%), mean ± 95% CI')
  ax.set_title(f'{experiment.name}: frozen-feature accuracy per method')
  ax.grid(axis='y', alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def update_readme(path: str, name: str, tables: str) -> bool:
  """Replaces the <!-- results:NAME:start --> ... end block of `path`; False if absent."""
  start, end = f'<!-- results:{name}:start -->', f'<!-- results:{name}:end -->'
  if not path or not os.path.exists(path):
    return False
  with open(path) as f:
    text = f.read()
  if start not in text or end not in text:
    return False
  body = '\n'.join(('#' + line) if line.startswith('#') else line   # nest the headings
                   for line in tables.splitlines()[1:])                # drop the title
  head, rest = text.split(start, 1)
  _, tail = rest.split(end, 1)
  with open(path + '.tmp', 'w') as f:
    f.write(f'{head}{start}\n{body.strip()}\n{end}{tail}')
  os.replace(path + '.tmp', path)
  return True


def aggregate(experiment, results_root: str, readme: Optional[str] = None) -> dict[str, Any]:
  """Rebuilds results/<experiment>.json, .md and .png (and README's block) from the files."""
  results = load_results(results_root, experiment)
  summary = summarise(experiment, results)
  base = os.path.join(results_root, experiment.name)
  write_json(base + '.json', {'experiment': experiment.to_dict(), 'summary': summary,
                              'cells': results})
  tables = markdown(experiment, results, summary)
  with open(base + '.md', 'w') as f:
    f.write(tables)
  plot(experiment, summary, base + '.png')
  update_readme(readme, experiment.name, tables)
  return summary


def check_experiment(experiment) -> None:
  """Clear errors before anything runs: config files exist, trials parse."""
  if experiment is None:
    raise app.UsageError('Pass --config=configs/experiments/<name>.py')
  for method, spec in experiment.methods.items():
    if not os.path.exists(spec.config):
      raise ValueError(f'Method {method!r}: config file {spec.config!r} does not exist.')
    for trial in spec.trials:
      parse_overrides(trial)


def dry_run(f: Flags) -> dict[str, Any]:
  """Validates every tuning and (where chosen) final cell's command; prints the plan."""
  from ssl_jax import main as main_lib
  from ssl_jax import runs
  experiment = f.config.value
  check_experiment(experiment)
  shard = parse_shard(f.shard.value)
  recorded = load_results(f.results.value, experiment)
  cells = in_shard(tuning_cells(experiment) + final_cells(
      experiment, choose_trials(experiment, recorded),
      skip=all_trials_diverged(experiment, recorded)), shard)
  checked = 0
  for cell in cells:
    if cell.trial < 0:
      continue   # its trial is chosen once tuning is done
    argv = cell.command(os.path.join(f.root.value, cell.name))[3:]
    holders = cli.parse_command(main_lib.define_flags, ['ssl_jax.main'] + argv)
    runs.describe(holders.config.value, holders.workdir.value)
    checked += 1
  done = sum(c.name in recorded for c in cells)
  print(f'ssl_jax.experiments dry run: {experiment.name}, shard {shard[0]}/{shard[1]}: '
        f'{len(cells)} cells ({done} with results in {results_dir(f.results.value, experiment)}, '
        f'{sum(c.trial < 0 for c in cells)} final cells waiting for tuning); the commands of '
        f'{checked} cells parse and validate. Nothing was run or written.', flush=True)
  return {'cells': len(cells), 'checked': checked, 'done': done}


def main(argv, f: Flags):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  metrics.quiet_library_logs()
  experiment = f.config.value
  check_experiment(experiment)
  if f.dry_run.value:
    dry_run(f)
    return
  if f.aggregate_only.value:
    aggregate(experiment, f.results.value, f.readme.value)
    print(f'experiments: wrote {os.path.join(f.results.value, experiment.name)}.md/.json/.png')
    return
  run(experiment, f.root.value, f.results.value, parse_shard(f.shard.value), f.parallel.value,
      f.max_cells.value, f.readme.value)


if __name__ == '__main__':
  cli.start('ssl_jax.experiments', tensorflow=False)   # the cells import it, quietly
  app.run(functools.partial(main, f=define_flags(flags.FLAGS)), flags_parser=cli.parse_flags)
