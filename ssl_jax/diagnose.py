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
import functools
import os
from typing import Any

from absl import app
from absl import flags

from ssl_jax import cli


@dataclasses.dataclass(frozen=True)
class Flags:
  workdir: Any
  results: Any
  checkpoints: Any
  out: Any
  num_images: Any
  locality_images: Any
  gauss_images: Any
  gauss_views: Any
  gauss_dims: Any
  probe_images: Any
  batch_size: Any
  dry_run: Any


def define_flags(flag_values: flags.FlagValues) -> Flags:
  fv = dict(flag_values=flag_values)
  integer = lambda name, help_: flags.DEFINE_integer(name, None, help_, **fv)
  return Flags(
      workdir=flags.DEFINE_string('workdir', None, 'A training workdir (with config.json).',
                                  **fv),
      results=flags.DEFINE_string('results', None, "An experiment's result folder, e.g. "
                                  'results/fmnist_compare.', **fv),
      checkpoints=flags.DEFINE_string('checkpoints', 'all', "'all', 'last' or steps '100,300'.",
                                      **fv),
      out=flags.DEFINE_string('out', None, 'Output folder (default WORKDIR/diagnostics; a '
                              'workdir that is still training needs another one).', **fv),
      num_images=integer('num_images', 'Evaluation images (two views each) for the '
                         'information quantities; default 2048.'),
      locality_images=integer('locality_images', 'K clean images (64).'),
      gauss_images=integer('gauss_images', 'Images for the normality test (32).'),
      gauss_views=integer('gauss_views', 'Views per image (80).'),
      gauss_dims=integer('gauss_dims', 'Principal directions tested per image (4; <= views '
                         '/ 10).'),
      probe_images=integer('probe_images', 'Train and test images of the probe (10,000 each).'),
      batch_size=integer('batch_size', 'Images per forward pass (512).'),
      dry_run=flags.DEFINE_bool('dry_run', False, 'Check the workdir (or result folder) and '
                                'the checkpoints it would diagnose; write nothing.', **fv))


def settings_from_flags(f: Flags):
  from ssl_jax import diagnostics
  changes = {name: getattr(f, name).value for name in (
      'num_images', 'locality_images', 'gauss_images', 'gauss_views', 'gauss_dims',
      'batch_size') if getattr(f, name).value is not None}
  if f.probe_images.value is not None:
    changes.update(probe_train_images=f.probe_images.value,
                   probe_test_images=f.probe_images.value)
  return dataclasses.replace(diagnostics.Settings(), **changes)


def dry_run(f: Flags) -> dict:
  from ssl_jax import diagnostics, runs
  if f.results.value is not None:
    files = [n for n in os.listdir(f.results.value) if n.endswith('.json')] if os.path.isdir(
        f.results.value) else []
    if not files:
      raise FileNotFoundError(f'{f.results.value} holds no result files of an experiment grid '
                              '(python -m ssl_jax.experiments writes them).')
    print(f'ssl_jax.diagnose dry run: label-free selection over {len(files)} result files in '
          f'{f.results.value}. Nothing was run or written.', flush=True)
    return {'cells': len(files)}
  loaded = runs.load_workdir(f.workdir.value, abstract=True)
  steps = diagnostics.select_steps(runs.checkpoint_steps(f.workdir.value), f.checkpoints.value)
  print(f'ssl_jax.diagnose dry run: {loaded.config.method} on {loaded.config.data.name}, '
        f'steps {steps} of {f.workdir.value} -> '
        f'{f.out.value or os.path.join(f.workdir.value, "diagnostics")}. Nothing was run or '
        'written.', flush=True)
  return {'steps': steps}


def main(argv, f: Flags):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if (f.workdir.value is None) == (f.results.value is None):
    raise app.UsageError('Pass exactly one of --workdir (a run) or --results (a grid).')
  from ssl_jax import diagnostics
  from ssl_jax import metrics
  from ssl_jax import runs
  metrics.quiet_library_logs()
  with cli.one_line_errors('ssl_jax.diagnose', runs.load_errors()):
    if f.dry_run.value:
      dry_run(f)
      return
    if f.results.value is not None:
      prefix = f.results.value.rstrip('/') + '_label_free'
      out = diagnostics.label_free_selection(f.results.value, prefix)
      with open(prefix + '.md') as fh:
        print(fh.read())
      print(f'ssl_jax.diagnose: {len(out["cells"])} cells -> {prefix}.{{json,md,png}}')
      return
    out_dir = f.out.value or os.path.join(f.workdir.value, 'diagnostics')
    record = diagnostics.diagnose_workdir(f.workdir.value, checkpoints=f.checkpoints.value,
                                          settings=settings_from_flags(f), out_dir=out_dir)
    print(diagnostics.summary_text(record))
    print(f'ssl_jax.diagnose: -> {out_dir} (diagnostics.json, '
          f'{len(record.get("figures", []))} figures, tensorboard/)')


if __name__ == '__main__':
  cli.start('ssl_jax.diagnose', tcmalloc=True)   # before JAX starts: see allocator.py
  app.run(functools.partial(main, f=define_flags(flags.FLAGS)), flags_parser=cli.parse_flags)
