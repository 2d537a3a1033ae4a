"""Command line: pretrain, checkpoint, resume and evaluate.

  python -m ssl_jax.main --config=configs/vicreg_it.py --workdir=runs/vicreg_it
  python -m ssl_jax.main --config=configs/vicreg_it.py:cifar10 --config.optim.base_lr=0.2

Running the same command again resumes from the newest checkpoint in
--workdir; on a finished run it prints the summary and stops (--reevaluate
evaluates the final checkpoint again). Library INFO logs stay off the console
unless --verbosity=0 (or -v 0) asks for them.

Several processes (hosts of a pod, or GPUs): every process runs the same
command, and JAX's distributed runtime starts first. It is detected on Cloud
TPU pods and under SLURM (srun with more than one task); elsewhere pass
--coordinator=HOST:PORT --num_processes=N --process_id=I (process 0 listens on
PORT). A process whose peers do not all join within --init_timeout seconds
stops with an error naming the coordinator and the process count.
"""

import contextlib
import dataclasses
import functools
import os
import socket
import sys
import time
from typing import Any, Optional

from absl import app
from absl import flags
from ml_collections import config_flags

from ssl_jax import cli


@dataclasses.dataclass(frozen=True)
class Flags:
  """The flag holders of one command line (`define_flags`)."""
  config: Any
  workdir: Any
  coordinator: Any
  num_processes: Any
  process_id: Any
  init_timeout: Any
  reevaluate: Any
  dry_run: Any


def define_flags(flag_values: flags.FlagValues) -> Flags:
  """Defines this command's flags in flag_values (absl's FLAGS, or fresh ones in tests)."""
  fv = dict(flag_values=flag_values)
  return Flags(
      config=config_flags.DEFINE_config_file(
          'config', None, 'Experiment config file, e.g. configs/vicreg_it.py[:variant].',
          lock_config=True, **fv),
      workdir=flags.DEFINE_string(
          'workdir', None, 'Checkpoints, metrics and summary go here (default runs/<method>).',
          **fv),
      coordinator=flags.DEFINE_string(
          'coordinator', None, 'HOST:PORT of process 0, for several processes without a '
          'cluster manager (with --num_processes, --process_id).', **fv),
      num_processes=flags.DEFINE_integer('num_processes', None, 'Processes in the run.', **fv),
      process_id=flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.',
                                      **fv),
      init_timeout=flags.DEFINE_integer('init_timeout', 300,
                                        'Seconds to wait for every process to join.', **fv),
      reevaluate=flags.DEFINE_bool(
          'reevaluate', False, 'On a finished run, evaluate the final checkpoint again instead '
          'of printing its summary.', **fv),
      dry_run=flags.DEFINE_bool(
          'dry_run', False, 'Check the command without running it: parse and validate the '
          'config, trace the objective, initialise the model abstractly, find the dataset '
          "from TFDS's metadata, print a summary and exit. Writes nothing.", **fv))


def _slurm_tasks() -> int:
  return int(os.environ.get('SLURM_NTASKS', '1')) if 'SLURM_JOB_ID' in os.environ else 1


def _tpu_hosts() -> int:
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return len([h for h in hosts.split(',') if h.strip()]) if hosts else 1


def process_count(f: Flags) -> Optional[int]:
  """The processes this command would run with: 1, N, or None (detected at start-up)."""
  if f.coordinator.value is not None:
    return f.num_processes.value
  if _slurm_tasks() > 1:
    return _slurm_tasks()
  if os.environ.get('TPU_WORKER_HOSTNAMES'):
    return _tpu_hosts()
  if os.environ.get('SSL_JAX_DISTRIBUTED') == '1':
    return None
  return 1


def check_process_flags(f: Flags) -> None:
  if f.coordinator.value is not None and (f.num_processes.value is None
                                          or f.process_id.value is None):
    raise app.UsageError('--coordinator needs --num_processes and --process_id.')
  if f.coordinator.value is not None and not 0 <= f.process_id.value < f.num_processes.value:
    raise app.UsageError(f'--process_id must be in [0, {f.num_processes.value}), '
                         f'got {f.process_id.value}.')


def initialize_distributed(f: Flags) -> None:
  """Starts jax.distributed when the run has several processes; a clear error
  (never a hang) when they do not all join within --init_timeout seconds."""
  import jax
  explicit = f.coordinator.value is not None
  detected = (os.environ.get('SSL_JAX_DISTRIBUTED') == '1'
              or bool(os.environ.get('TPU_WORKER_HOSTNAMES')) or _slurm_tasks() > 1)
  if not explicit and not detected:
    return
  check_process_flags(f)
  where = (f.coordinator.value if explicit
           else os.environ.get('JAX_COORDINATOR_ADDRESS', 'the detected coordinator'))
  expected = (f.num_processes.value if explicit else
              (_slurm_tasks() if _slurm_tasks() > 1 else 'the detected number of'))
  me = (f.process_id.value if explicit else os.environ.get('SLURM_PROCID', '?'))
  explain = (f'this is process {me} of {expected} processes, coordinator {where}, and not every '
             'process joined (the missing ones were never started, crashed, or use another '
             'coordinator or port). Start all of them with the same --coordinator and '
             '--num_processes and distinct --process_id.')
  if explicit and f.process_id.value != 0:
    _wait_for_coordinator(f.coordinator.value, f.init_timeout.value, explain)
  # JAX aborts the process from C++ when peers do not join in time, so the
  # context is printed first: the abort's DEADLINE_EXCEEDED then explains itself.
  print(f'ssl_jax: process {me} of {expected} processes joining the distributed runtime at '
        f'{where}; if it stops with DEADLINE_EXCEEDED within {f.init_timeout.value} s, '
        f'{explain}', file=sys.stderr, flush=True)
  try:
    jax.distributed.initialize(
        coordinator_address=f.coordinator.value, num_processes=f.num_processes.value,
        process_id=f.process_id.value, initialization_timeout=f.init_timeout.value)
  except Exception as error:  # pylint: disable=broad-except
    raise RuntimeError(
        f'ssl_jax: the distributed runtime did not start within {f.init_timeout.value} s: '
        f'{explain} ({type(error).__name__}: {str(error).splitlines()[0][:300]})') from error


def _wait_for_coordinator(address: str, timeout: float, explain: str) -> None:
  """Waits until process 0's coordinator accepts connections, or raises in time."""
  host, _, port = address.rpartition(':')
  deadline = time.time() + timeout
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=2):
        return
    except OSError as error:
      if time.time() >= deadline:
        raise RuntimeError(f'ssl_jax: no coordinator answered at {address} within {timeout} s: '
                           f'{explain} ({error})') from None
      time.sleep(0.5)


def enable_compilation_cache() -> None:
  """JAX's persistent compilation cache, so that a second run or a resume does not
  compile again: JAX_COMPILATION_CACHE_DIR if set, else $SSL_JAX_CACHE_DIR/jax
  (default ~/.cache/ssl_jax/jax).

  Every program is stored, not only those compiling in over a second (JAX's
  default threshold; JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS still sets
  it): a run compiles about 60 small ones (initialisers, the diagnostics, the
  probes), and reading them back cut a second run's start-up from 5.3 to
  2.1 s and a 12-step run's by 3.8 s, with the first run no slower (2-core
  Xeon, three alternating pairs).
  """
  import jax
  if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    root = os.environ.get('SSL_JAX_CACHE_DIR') or os.path.join(
        os.path.expanduser('~'), '.cache', 'ssl_jax')
    jax.config.update('jax_compilation_cache_dir', os.path.join(root, 'jax'))
  if not os.environ.get('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'):
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


def workdir_of(f: Flags, config) -> str:
  return f.workdir.value or os.path.join('runs', config.method)


def dry_run(f: Flags) -> dict[str, Any]:
  """Checks the command without running it; prints and returns what it would run.

  Parses and validates the config (value checks, the objective traced, the
  model and optimiser state initialised abstractly with jax.eval_shape) and
  finds the dataset from TFDS's metadata. The distributed runtime is not
  started and nothing is written, to the workdir or anywhere else.
  """
  check_process_flags(f)
  config = f.config.value
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/vicreg_it.py')
  from ssl_jax import runs
  summary = runs.describe(config, workdir_of(f, config), processes=process_count(f))
  print(runs.describe_text(summary), flush=True)
  if summary['data_error'] is not None:
    raise summary['data_error']
  return summary


def main(argv, f: Flags):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from ssl_jax import metrics
  metrics.quiet_library_logs()   # keep the progress bar readable
  cli.watch_parent()             # an experiment cell dies with its runner
  if f.dry_run.value:
    # A missing dataset, a bad value.
    with cli.one_line_errors('ssl_jax.main', (FileNotFoundError, ValueError)):
      dry_run(f)
    return
  config = f.config.value
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/vicreg_it.py')
  initialize_distributed(f)
  import jax
  enable_compilation_cache()
  from ssl_jax import checkpointing
  from ssl_jax import workdir_lock
  workdir = workdir_of(f, config)
  checkpointing.check_writable(workdir)
  # The lock first, before the slow imports below: a second trainer on the
  # same workdir fails within seconds. train_and_evaluate holds it again.
  with cli.one_line_errors('ssl_jax.main', (workdir_lock.WorkdirLockedError, DataError)), \
       (workdir_lock.hold(workdir) if jax.process_index() == 0 else contextlib.nullcontext()):
    from ssl_jax import allocator
    from ssl_jax import input_pipeline
    from ssl_jax import runs
    from ssl_jax import train
    from ssl_jax.datasets import image_folder
    if jax.default_backend() == 'cpu' and (hint := allocator.warn_if_missing()):
      print(hint, file=sys.stderr, flush=True)
    # The data is found before anything is written to the workdir: a dataset
    # that is not prepared is one line naming the folder and the fix, not a
    # traceback after a half-made workdir.
    try:
      input_pipeline.check_prepared(config.data.name, config.data.data_dir)
    except (FileNotFoundError, image_folder.ImageFolderError) as error:
      raise DataError(error) from None
    # What the run reports as the user's to fix, each in one line: a config
    # value (found before anything was trained or written), a checkpoint of
    # another config or unreadable, a full disk, a loss gone non-finite (the
    # message says where the last good state is).
    run_errors = (checkpointing.IncompatibleCheckpointError,
                  checkpointing.CorruptCheckpointError,
                  checkpointing.CheckpointWriteError, metrics.NonFiniteLossError)
    with cli.one_line_errors('ssl_jax.main', run_errors), \
         cli.one_line_errors('ssl_jax.main', (runs.ConfigError,),
                             hint='--dry_run checks a config without training'):
      train.train_and_evaluate(config, workdir, reevaluate=f.reevaluate.value)


class DataError(Exception):
  """The config's dataset cannot be read (not prepared, or an unusable image folder)."""


def run():
  # tcmalloc before JAX starts (see allocator.py); a dry run runs no step.
  cli.start('ssl_jax.main', tcmalloc=not any(a.startswith('--dry_run') for a in sys.argv))
  f = define_flags(flags.FLAGS)
  app.run(functools.partial(main, f=f), flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
