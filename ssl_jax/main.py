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

import os
import socket
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/vicreg_it.py[:variant].',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Checkpoints, metrics and summary go here (default runs/<method>).')
_COORDINATOR = flags.DEFINE_string('coordinator', None,
                                   'HOST:PORT of process 0, for several processes without a '
                                   'cluster manager (with --num_processes, --process_id).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')
_INIT_TIMEOUT = flags.DEFINE_integer('init_timeout', 300,
                                     'Seconds to wait for every process to join.')
_REEVALUATE = flags.DEFINE_bool('reevaluate', False,
                                'On a finished run, evaluate the final checkpoint again instead '
                                'of printing its summary.')


def _slurm_tasks() -> int:
  return int(os.environ.get('SLURM_NTASKS', '1')) if 'SLURM_JOB_ID' in os.environ else 1


def initialize_distributed() -> None:
  """Starts jax.distributed when the run has several processes; a clear error
  (never a hang) when they do not all join within --init_timeout seconds."""
  import jax
  explicit = _COORDINATOR.value is not None
  detected = (os.environ.get('SSL_JAX_DISTRIBUTED') == '1'
              or bool(os.environ.get('TPU_WORKER_HOSTNAMES')) or _slurm_tasks() > 1)
  if not explicit and not detected:
    return
  if explicit and (_NUM_PROCESSES.value is None or _PROCESS_ID.value is None):
    raise app.UsageError('--coordinator needs --num_processes and --process_id.')
  if explicit and not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
    raise app.UsageError(f'--process_id must be in [0, {_NUM_PROCESSES.value}), '
                         f'got {_PROCESS_ID.value}.')
  where = (_COORDINATOR.value if explicit
           else os.environ.get('JAX_COORDINATOR_ADDRESS', 'the detected coordinator'))
  expected = (_NUM_PROCESSES.value if explicit else
              (_slurm_tasks() if _slurm_tasks() > 1 else 'the detected number of'))
  me = (_PROCESS_ID.value if explicit else os.environ.get('SLURM_PROCID', '?'))
  explain = (f'this is process {me} of {expected} processes, coordinator {where}, and not every '
             'process joined (the missing ones were never started, crashed, or use another '
             'coordinator or port). Start all of them with the same --coordinator and '
             '--num_processes and distinct --process_id.')
  if explicit and _PROCESS_ID.value != 0:
    _wait_for_coordinator(_COORDINATOR.value, _INIT_TIMEOUT.value, explain)
  # JAX aborts the process from C++ when peers do not join in time, so the
  # context is printed first: the abort's DEADLINE_EXCEEDED then explains itself.
  print(f'ssl_jax: process {me} of {expected} processes joining the distributed runtime at '
        f'{where}; if it stops with DEADLINE_EXCEEDED within {_INIT_TIMEOUT.value} s, {explain}',
        file=sys.stderr, flush=True)
  try:
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value, initialization_timeout=_INIT_TIMEOUT.value)
  except Exception as error:  # pylint: disable=broad-except
    raise RuntimeError(
        f'ssl_jax: the distributed runtime did not start within {_INIT_TIMEOUT.value} s: '
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from ssl_jax import metrics
  metrics.quiet_library_logs()   # keep the progress bar readable
  initialize_distributed()
  import jax
  from ssl_jax import allocator
  from ssl_jax import train
  if jax.default_backend() == 'cpu' and (hint := allocator.warn_if_missing()):
    print(hint, file=sys.stderr, flush=True)
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/vicreg_it.py')
  workdir = _WORKDIR.value or os.path.join('runs', config.method)
  train.train_and_evaluate(config, workdir, reevaluate=_REEVALUATE.value)


def run():
  from ssl_jax import allocator
  allocator.reexec_with_tcmalloc('ssl_jax.main')  # before JAX starts: see allocator.py
  app.run(main)


if __name__ == '__main__':
  run()
