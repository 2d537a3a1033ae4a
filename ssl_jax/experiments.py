"""Experiment grids, the runner: tune every method on a validation split, then seeds on test.

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
again. `--shard=i/k` runs every k-th cell, so machines can split the grid
(a root holds one runner's lock, so each shard needs its own --root; what
shards share is the committed result files); final cells of a method wait
until all of its tuning results exist.

Cells and result files are ssl_jax/grid.py; the report (after every cell,
or alone with --aggregate_only) is ssl_jax/experiment_report.py: it reads
every result file and writes results/<experiment>.json (all cells), .md
(tables: tuning, final with 95% Student-t intervals, baselines, the claims'
Holm-corrected verdicts) and .png.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import time
from typing import Any, Optional

from absl import app
from absl import flags
from ml_collections import config_flags

from ssl_jax import cli
from ssl_jax import experiment_report
from ssl_jax import grid
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
          'readme', 'README.md,docs/results.md', 'Files (comma-separated) whose '
          '<!-- results:NAME:start/end --> blocks are replaced by the tables (a file without '
          'such a block is left alone; empty: none).', **fv),
      dry_run=flags.DEFINE_bool(
          'dry_run', False, "Check the grid without running it: every cell's command is "
          'parsed and validated as `ssl_jax.main --dry_run` would; prints the plan. Writes '
          'nothing.', **fv))


# ----------------------------------------------------------------------------
# Running.
# ----------------------------------------------------------------------------

REUSE_MARKER = 'pretraining_from.json'


def reusable_pretraining(experiment, root: str, results: str, cell: grid.Cell) -> Optional[str]:
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
  tune = grid.Cell(cell.method, 'tune', cell.trial, cell.seed, cell.config_file,
              grid.cell_overrides(experiment, cell.method, cell.trial, 'tune'))
  source = os.path.join(root, tune.name)
  result_file = grid.result_path(results, experiment, tune)
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
  grid.write_json(os.path.join(workdir, REUSE_MARKER),
             {'cell': os.path.basename(source), 'wall_time_sec': summary['wall_time_sec']})

def finished_summary(workdir: str) -> Optional[dict[str, Any]]:
  """The summary of a completed, evaluated cell in workdir, else None."""
  summary = metrics.completed_summary(workdir)
  return summary if summary is not None and 'eval' in summary else None


def cost_text(summary: dict[str, Any]) -> str:
  """A finished cell's cost by part, from its summary's time breakdown."""
  parts = summary.get('time_breakdown_sec') or {}
  evaluation = sum(v for k, v in parts.items() if k.startswith('evaluation'))
  periodic = sum(parts.get(k, 0.0) for k in ('online probe evaluation', 'training diagnostics',
                                             'metrics', 'checkpoints'))
  return (f'start-up {parts.get("start-up", 0):.0f} s, compilation '
          f'{parts.get("first step (compilation)", 0):.0f} s, steps {parts.get("steps", 0):.0f} s, '
          f'periodic {periodic:.0f} s, evaluation {evaluation:.0f} s')


def process_stopped(pid: int) -> bool:
  """Whether process pid is stopped (SIGSTOP, a debugger): its /proc state is T or t.

  False where /proc does not exist (not Linux) or the process has gone.
  """
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] in ('T', 't')
  except (OSError, IndexError):
    return False


class PauseClock:
  """Seconds each running cell spent stopped, sampled at every poll.

  A grid paused for a timing (its cells SIGSTOPped) would otherwise count the
  pause as cell time, and the time-left estimate grew by hours.
  """

  def __init__(self, now: float):
    self.last = now
    self.paused: dict[str, float] = {}

  def update(self, pids: dict[str, int], now: float) -> None:
    """pids: name -> pid of each running cell; the interval since the last
    update counts as paused for each cell stopped now."""
    for name, pid in pids.items():
      if process_stopped(pid):
        self.paused[name] = self.paused.get(name, 0.0) + (now - self.last)
    self.last = now

  def pop(self, name: str) -> float:
    return self.paused.pop(name, 0.0)


class Runner:
  """Runs cells as subprocesses (at most `parallel` at once), with a progress line."""

  def __init__(self, experiment, root: str, results: str, parallel: int, total: int,
               done: int, max_cells: int = 0, readme: Optional[str] = None):
    self.experiment, self.root, self.results, self.readme = experiment, root, results, readme
    self.parallel = max(1, parallel)
    # name -> (cell, process, start time, log file, (commit, code sha256) at its start)
    self.running: dict[str, tuple[grid.Cell, subprocess.Popen, float, Any,
                                  tuple[str, str]]] = {}
    self.total, self.done, self.started_here = total, done, 0
    self.max_cells = max_cells
    self.cell_seconds: list[float] = []   # wall time of each finished cell, pauses left out
    self.t0 = time.time()
    self.pauses = PauseClock(self.t0)
    self.stopping = False
    self.commit = grid.git_commit()

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

  def start(self, cell: grid.Cell) -> None:
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
    self.running[cell.name] = (cell, process, time.time(), log,
                               (grid.git_commit(), grid.code_sha256()))
    self.started_here += 1
    self.progress(f'started {cell.name}')

  def record(self, cell: grid.Cell, summary: dict[str, Any], code: tuple[str, str],
             stopped_sec: float = 0.0) -> None:
    result = grid.result_from_summary(cell, summary, *code)
    # Seconds its process was stopped (PauseClock), which wall_time_sec includes.
    result['stopped_sec'] = stopped_sec
    marker = os.path.join(self.root, cell.name, REUSE_MARKER)
    if os.path.exists(marker):
      with open(marker) as f:
        source = json.load(f)
      # This cell only evaluated; its wall time is the evaluation's. The final
      # table's wall time averages the cells that pretrained (wall_time_sec).
      result.update(pretraining_from=source, wall_time_sec=None,
                    eval_wall_time_sec=summary['wall_time_sec'])
    grid.write_json(grid.result_path(self.results, self.experiment, cell), result)
    self.done += 1

  def poll(self) -> None:
    self.pauses.update({name: entry[1].pid for name, entry in self.running.items()},
                       time.time())
    for name, (cell, process, started, log, at_start) in list(self.running.items()):
      code = process.poll()
      if code is None:
        continue
      log.close()
      del self.running[name]
      paused = self.pauses.pop(name)
      workdir = os.path.join(self.root, name)
      summary = finished_summary(workdir)
      if summary is not None:
        self.record(cell, summary, at_start, paused)
        self.cell_seconds.append(time.time() - started - paused)
        pause_note = f', of which {paused / 60:.1f} min stopped' if paused >= 30 else ''
        self.progress(f'finished {name} in {(time.time() - started) / 60:.1f} min{pause_note} '
                      f'({cost_text(summary)}): {grid.SELECTION_METRIC}='
                      f'{summary["eval"][grid.SELECTION_METRIC]:.4f}')
        experiment_report.aggregate(self.experiment, self.results, self.readme)
        continue
      with open(os.path.join(workdir, 'log.txt')) as f:
        diverged = grid.diverged_result(cell, f.read(), time.time() - started, *at_start,
                                        config=grid.workdir_config(workdir))
      if diverged is not None:
        grid.write_json(grid.result_path(self.results, self.experiment, cell), diverged)
        self.done += 1
        self.progress(f'{name} diverged (non-finite loss): recorded, not retried')
        experiment_report.aggregate(self.experiment, self.results, self.readme)
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
    recorded = grid.load_results(results, experiment)
    cells = grid.tuning_cells(experiment) + grid.final_cells(
        experiment, grid.choose_trials(experiment, recorded),
        skip=grid.all_trials_diverged(experiment, recorded))
    return recorded, grid.in_shard(cells, shard)

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
          # Finished under an earlier runner whose record was lost: the code
          # on disk now is the best evidence of what ran, and is marked so.
          runner.record(cell, summary, (grid.git_commit() + ' (recorded after a restart)',
                                        grid.code_sha256()))
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
  experiment_report.aggregate(experiment, results, readme)
  runner.progress('stopped' if runner.stopping else 'nothing left to run in this shard')


class ExperimentError(ValueError):
  """An experiment config that cannot run: a method's config file missing, a bad trial."""


def check_experiment(experiment) -> None:
  """Clear errors before anything runs: config files exist, trials parse."""
  if experiment is None:
    raise app.UsageError('Pass --config=configs/experiments/<name>.py')
  for method, spec in experiment.methods.items():
    if not os.path.exists(spec.config):
      raise ExperimentError(
          f'Method {method!r}: config file {spec.config!r} does not exist in {os.getcwd()}; '
          "an experiment's config paths are relative to the working directory: run from the "
          'repository root.')
    for trial in spec.trials:
      try:
        grid.parse_overrides(trial)
      except ValueError as error:
        raise ExperimentError(f'Method {method!r}: {error}') from None


def dry_run(f: Flags) -> dict[str, Any]:
  """Validates every tuning and (where chosen) final cell's command; prints the plan."""
  from ssl_jax import main as main_lib
  from ssl_jax import runs
  experiment = f.config.value
  check_experiment(experiment)
  shard = grid.parse_shard(f.shard.value)
  recorded = grid.load_results(f.results.value, experiment)
  cells = grid.in_shard(grid.tuning_cells(experiment) + grid.final_cells(
      experiment, grid.choose_trials(experiment, recorded),
      skip=grid.all_trials_diverged(experiment, recorded)), shard)
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
        f'{len(cells)} cells ({done} with results in {grid.results_dir(f.results.value, experiment)}, '
        f'{sum(c.trial < 0 for c in cells)} final cells waiting for tuning); the commands of '
        f'{checked} cells parse and validate. Nothing was run or written.', flush=True)
  return {'cells': len(cells), 'checked': checked, 'done': done}


def main(argv, f: Flags):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  metrics.quiet_library_logs()
  experiment = f.config.value
  with cli.one_line_errors('ssl_jax.experiments', (ValueError,), status=2):   # a bad flag
    shard = grid.parse_shard(f.shard.value)
  with cli.one_line_errors('ssl_jax.experiments', (ExperimentError,)):
    check_experiment(experiment)
  if f.dry_run.value:
    dry_run(f)
    return
  if f.aggregate_only.value:
    experiment_report.aggregate(experiment, f.results.value, f.readme.value)
    print(f'experiments: wrote {os.path.join(f.results.value, experiment.name)}.md/.json/.png')
    return
  # A second runner on a root: the message names the holder and the fix.
  with cli.one_line_errors('ssl_jax.experiments', (workdir_lock.WorkdirLockedError,)):
    run(experiment, f.root.value, f.results.value, shard, f.parallel.value,
        f.max_cells.value, f.readme.value)


if __name__ == '__main__':
  cli.start('ssl_jax.experiments', tensorflow=False)   # the cells import it, quietly
  app.run(functools.partial(main, f=define_flags(flags.FLAGS)), flags_parser=cli.parse_flags)
