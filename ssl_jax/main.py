"""Command line: pretrain, checkpoint, resume and evaluate.

  python -m ssl_jax.main --config=configs/vicreg_it.py --workdir=runs/vicreg_it
  python -m ssl_jax.main --config=configs/vicreg_it.py:cifar10 --config.optim.base_lr=0.2

Running the same command again resumes from the newest checkpoint in
--workdir. On a multi-host TPU/GPU pod every host runs the same command;
JAX's distributed runtime is initialised first (set SSL_JAX_DISTRIBUTED=1, or
run on a Cloud TPU pod where it is detected).
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/vicreg_it.py[:variant].',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Checkpoints, metrics and summary go here (default runs/<method>).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Orbax and TFDS log every save and read at INFO; keep the progress bar readable.
  logging.set_verbosity(logging.WARNING)
  import jax
  if os.environ.get('SSL_JAX_DISTRIBUTED') == '1' or os.environ.get('TPU_WORKER_HOSTNAMES'):
    jax.distributed.initialize()
  from ssl_jax import train
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/vicreg_it.py')
  workdir = _WORKDIR.value or os.path.join('runs', config.method)
  train.train_and_evaluate(config, workdir)


def run():
  app.run(main)


if __name__ == '__main__':
  run()
