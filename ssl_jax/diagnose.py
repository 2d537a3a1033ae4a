"""Information quantities and assumption checks of a training run.

  python -m ssl_jax.diagnose --workdir=runs/vicreg_it_default
  python -m ssl_jax.diagnose --workdir=DIR --checkpoints=last --num_images=1024
  python -m ssl_jax.diagnose --results=results/fmnist_compare   # label-free selection

With --workdir: reads the config saved in DIR and diagnoses its checkpoints
('all': the initialisation and every kept checkpoint; 'last'; or steps like
'100,300'). Writes DIR/diagnostics/diagnostics.json, TensorBoard scalars at
each step and PNG figures (ssl_jax/diagnostics.py says what each one is).

With --results: correlates every label-free quantity of an experiment grid's
tuning cells with their validation probe accuracy; writes
<results>_label_free.{json,md,png}.

Runs as one process on all of its local devices.
"""

import dataclasses
import os

from absl import app
from absl import flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir (with config.json).')
_RESULTS = flags.DEFINE_string('results', None,
                               "An experiment's result folder, e.g. results/fmnist_compare.")
_CHECKPOINTS = flags.DEFINE_string('checkpoints', 'all', "'all', 'last' or steps '100,300'.")
_NUM_IMAGES = flags.DEFINE_integer('num_images', None,
                                   'Evaluation images (two views each) for the information '
                                   'quantities; default 2048.')
_LOCALITY_IMAGES = flags.DEFINE_integer('locality_images', None, 'K clean images (64).')
_GAUSS_IMAGES = flags.DEFINE_integer('gauss_images', None, 'Images for the normality test (32).')
_GAUSS_VIEWS = flags.DEFINE_integer('gauss_views', None, 'Views per image (80).')
_GAUSS_DIMS = flags.DEFINE_integer('gauss_dims', None,
                                   'Principal directions tested per image (4; <= views / 10).')
_PROBE_IMAGES = flags.DEFINE_integer('probe_images', None,
                                     'Train and test images of the probe (10,000 each).')
_BATCH = flags.DEFINE_integer('batch_size', None, 'Images per forward pass (512).')


def settings_from_flags():
  from ssl_jax import diagnostics
  changes = {name: flag.value for name, flag in (
      ('num_images', _NUM_IMAGES), ('locality_images', _LOCALITY_IMAGES),
      ('gauss_images', _GAUSS_IMAGES), ('gauss_views', _GAUSS_VIEWS), ('gauss_dims', _GAUSS_DIMS),
      ('batch_size', _BATCH)) if flag.value is not None}
  if _PROBE_IMAGES.value is not None:
    changes.update(probe_train_images=_PROBE_IMAGES.value, probe_test_images=_PROBE_IMAGES.value)
  return dataclasses.replace(diagnostics.Settings(), **changes)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if (_WORKDIR.value is None) == (_RESULTS.value is None):
    raise app.UsageError('Pass exactly one of --workdir (a run) or --results (a grid).')
  from ssl_jax import diagnostics
  from ssl_jax import metrics
  metrics.quiet_library_logs()
  if _RESULTS.value is not None:
    prefix = _RESULTS.value.rstrip('/') + '_label_free'
    out = diagnostics.label_free_selection(_RESULTS.value, prefix)
    with open(prefix + '.md') as f:
      print(f.read())
    print(f'ssl_jax.diagnose: {len(out["cells"])} cells -> {prefix}.{{json,md,png}}')
    return
  record = diagnostics.diagnose_workdir(_WORKDIR.value, checkpoints=_CHECKPOINTS.value,
                                        settings=settings_from_flags())
  print(diagnostics.summary_text(record))
  print(f'ssl_jax.diagnose: -> {os.path.join(_WORKDIR.value, "diagnostics")} '
        f'(diagnostics.json, {len(record.get("figures", []))} figures, tensorboard/)')


if __name__ == '__main__':
  from ssl_jax import allocator
  allocator.reexec_with_tcmalloc('ssl_jax.diagnose')  # before JAX starts: see allocator.py
  app.run(main)
