"""An experiment grid's cells and result files: what the runner runs and the report reads.

An experiment config (ml_collections, like every other config) names methods,
each with its ssl_jax config file and a list of tuning trials, the overrides
shared by every cell (budget, hold-out), the tuning seed and the final seeds.
A cell is one `python -m ssl_jax.main` run; a finished cell leaves a small
result file results/<experiment>/<cell>.json (committed), which records the
metrics, the commit, a hash of the code (ssl_jax/ and configs/ as they were on
disk) and of the cell's full config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
from typing import Any, Optional, Sequence

from ssl_jax import cli
from ssl_jax import metrics

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
  """The checked-out commit ('unknown' outside a git checkout).

  Without a dirty flag: the runner itself rewrites tracked result files and
  the README after every cell, so "dirty" would say nothing about the code.
  code_sha256 says what code ran."""
  try:
    return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                          check=True, cwd=REPO_ROOT).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def code_sha256(root: str = REPO_ROOT) -> str:
  """sha256 of the code a cell runs: every .py file under ssl_jax/ and configs/, as on disk."""
  digest = hashlib.sha256()
  for folder in ('ssl_jax', 'configs'):
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
      dirnames[:] = sorted(d for d in dirnames if d != '__pycache__')
      for name in sorted(filenames):
        if name.endswith('.py'):
          path = os.path.join(dirpath, name)
          digest.update(os.path.relpath(path, root).encode() + b'\0')
          with open(path, 'rb') as f:
            digest.update(f.read() + b'\0')
  return digest.hexdigest()


def config_sha256(config: Optional[dict[str, Any]]) -> Optional[str]:
  """sha256 of a cell's full config, as its workdir's config.json holds it."""
  if config is None:
    return None
  return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def provenance(commit: str, code: str, config: Optional[dict[str, Any]]) -> dict[str, Any]:
  return {'commit': commit, 'code_sha256': code, 'config_sha256': config_sha256(config)}


def workdir_config(workdir: str) -> Optional[dict[str, Any]]:
  """The config a cell's run saved (config.json), or None if it never started."""
  try:
    with open(os.path.join(workdir, 'config.json')) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


# What ssl_jax.main prints for a metrics.NonFiniteLossError (tests/cli_test.py
# runs a diverging command and checks the match).
DIVERGED_LINE = cli.error_line('ssl_jax.main', metrics.NonFiniteLossError.MESSAGE_START)


def diverged_result(cell: Cell, log_text: str, seconds: float, commit: str, code: str,
                    config: Optional[dict[str, Any]] = None) -> Optional[dict[str, Any]]:
  """A result for a cell whose loss became non-finite (metrics.NonFiniteLossError).

  A diverged trial is an outcome of the grid, not a crash: resuming it would
  replay the same steps to the same NaN. It has no metrics and is never
  chosen; it keeps its config (from the workdir) and its provenance.
  """
  # The command's one line (`ssl_jax.main: error: Non-finite loss ...`) or, from
  # before it reported the error in one line, the traceback's last line.
  lines = [line for line in log_text.splitlines()
           if 'NonFiniteLossError' in line or line.startswith(DIVERGED_LINE)]
  if not lines:
    return None
  return {
      'cell': cell.name, 'method': cell.method, 'stage': cell.stage, 'trial': cell.trial,
      'seed': cell.seed, 'overrides': dict(cell.overrides), **provenance(commit, code, config),
      'status': 'diverged', 'error': lines[-1].strip(), 'metrics': {}, 'steps': None,
      'evaluated_on': None, 'wall_time_sec': seconds, 'config': config,
  }


def result_from_summary(cell: Cell, summary: dict[str, Any], commit: str, code: str
                        ) -> dict[str, Any]:
  return {
      'cell': cell.name, 'method': cell.method, 'stage': cell.stage, 'trial': cell.trial,
      'seed': cell.seed, 'overrides': dict(cell.overrides),
      **provenance(commit, code, summary['config']), 'status': 'completed',
      'evaluated_on': 'validation' if cell.stage == 'tune' else 'test',
      'metrics': summary['eval'], 'steps': summary['steps'],
      'wall_time_sec': summary['wall_time_sec'], 'config': summary['config'],
      'time_breakdown_sec': summary.get('time_breakdown_sec'),
      # The cost's context: the machine, and the step the last process started
      # at (a cell resumed part-way records only its last process's time).
      'host': summary.get('host'), 'start_step': summary.get('start_step'),
      'baselines': {name: summary[f'baseline_{name}'] for name in ('raw_pixels', 'random_init')
                    if f'baseline_{name}' in summary},
  }


def write_json(path: str, value: Any) -> None:
  """Writes through a temporary file, so a kill never leaves half a file."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def load_experiment(path: str):
  """An experiment config file's get_config() (as --config=path would load it)."""
  from ssl_jax import cli
  return cli.load_config(path)
