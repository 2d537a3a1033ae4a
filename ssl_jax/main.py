"""Command line: pretrain, checkpoint, resume and evaluate.

  python -m ssl_jax.main --config=configs/vicreg_it.py --workdir=runs/vicreg_it
  python -m ssl_jax.main --config=configs/vicreg_it.py:cifar10 --config.optim.base_lr=0.2

Running the same command again resumes from the newest checkpoint in
--workdir; on a finished run it prints the summary and stops (--reevaluate
evaluates the final checkpoint again). Library INFO logs stay off the console
unless --verbosity=0 (or -v 0) asks for them. On a multi-host TPU/GPU pod
every host runs the same command; JAX's distributed runtime is initialised first (set SSL_JAX_DISTRIBUTED=1, or
run on a Cloud TPU pod where it is detected).
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/vicreg_it.py[:variant].',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Checkpoints, metrics and summary go here (default runs/<method>).')
_REEVALUATE = flags.DEFINE_bool('reevaluate', False,
                                'On a finished run, evaluate the final checkpoint again instead '
                                'of printing its summary.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from ssl_jax import metrics
  metrics.quiet_library_logs()   # keep the progress bar readable
  import jax
  if os.environ.get('SSL_JAX_DISTRIBUTED') == '1' or os.environ.get('TPU_WORKER_HOSTNAMES'):
    jax.distributed.initialize()
  from ssl_jax import train
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/vicreg_it.py')
  workdir = _WORKDIR.value or os.path.join('runs', config.method)
  train.train_and_evaluate(config, workdir, reevaluate=_REEVALUATE.value)


def run():
  app.run(main)


if __name__ == '__main__':
  run()
