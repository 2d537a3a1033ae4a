"""Writes frozen features and labels of a split, for evaluation by other tools.

  python -m ssl_jax.embed --workdir runs/vicreg_it --split test --out feats.npz

Reads the config saved in the workdir and its newest checkpoint; the .npz
holds 'features' [M, F] (float32, encoder output) and 'labels' [M] (int32).
It takes no lock and writes nothing into the workdir, so it can run while the
workdir is training (it refuses an --out inside a workdir that is training).
"""

import dataclasses
import functools
import os
from typing import Any

import numpy as np
from absl import app
from absl import flags

from ssl_jax import cli


@dataclasses.dataclass(frozen=True)
class Flags:
  workdir: Any
  split: Any
  out: Any
  batch_size: Any
  dry_run: Any


def define_flags(flag_values: flags.FlagValues) -> Flags:
  fv = dict(flag_values=flag_values)
  return Flags(
      workdir=flags.DEFINE_string('workdir', None, 'A training workdir (with config.json).',
                                  **fv),
      split=flags.DEFINE_string('split', 'test', 'TFDS split, e.g. train, test, train[:10%].',
                                **fv),
      out=flags.DEFINE_string('out', None, 'Output .npz path.', **fv),
      batch_size=flags.DEFINE_integer('batch_size', 1000, 'Global evaluation batch size.', **fv),
      dry_run=flags.DEFINE_bool('dry_run', False, 'Check the workdir, its newest checkpoint '
                                'and the output path; write nothing.', **fv))


def check_output(out: str, what: str) -> None:
  """The output's folder exists and is no workdir that is training."""
  from ssl_jax import workdir_lock
  folder = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'{what}: the folder of --out {out} does not exist; create it '
                            'or choose another path.')
  workdir_lock.refuse_if_training(folder, what)


def embed(workdir: str, split: str, out: str, batch_size: int = 1000) -> dict:
  import jax
  from ssl_jax import evaluate, input_pipeline, runs
  check_output(out, 'ssl_jax.embed')
  loaded = runs.load_workdir(workdir)
  config, run, mesh, state = loaded.config, loaded.run, loaded.mesh, loaded.state
  spec, graphdef, image_size = run.spec, run.graphdef, run.image_size
  feature_fn = evaluate.make_feature_fn(graphdef, image_size, spec.mean, spec.std,
                                        config.model.get('conv_route', 'auto'))
  dataset = input_pipeline.eval_dataset(
      config.data.name, split, local_batch=input_pipeline.local_batch_size(batch_size, mesh),
      process_index=jax.process_index(), process_count=jax.process_count(),
      data_dir=config.data.data_dir)
  features, labels = evaluate.extract_features(feature_fn, state.params, state.batch_stats,
                                               dataset, mesh)
  if jax.process_index() == 0:
    np.savez(out, features=features.astype(np.float32), labels=labels.astype(np.int32))
    print(f'ssl_jax.embed: {features.shape[0]} x {features.shape[1]} features of '
          f'{config.data.name}:{split} at step {loaded.step} -> {out}')
  loaded.manager.close()
  return {'features': features, 'labels': labels, 'step': loaded.step}


def dry_run(f: Flags) -> dict:
  from ssl_jax import input_pipeline, runs
  check_output(f.out.value, 'ssl_jax.embed')
  loaded = runs.load_workdir(f.workdir.value, abstract=True)
  steps = runs.checkpoint_steps(f.workdir.value)
  where = input_pipeline.check_prepared(loaded.config.data.name, loaded.config.data.data_dir)
  print(f'ssl_jax.embed dry run: {loaded.config.method} on {loaded.config.data.name}, '
        f'checkpoint of step {steps[-1]} in {f.workdir.value}; split {f.split.value!r} '
        f'({where}); features [M, {loaded.run.state.probe_params["w"].shape[0]}] -> '
        f'{f.out.value}. Nothing was run or written.', flush=True)
  return {'step': steps[-1]}


def main(argv, f: Flags):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if f.workdir.value is None or f.out.value is None:
    raise app.UsageError('--workdir and --out are required.')
  from ssl_jax import metrics
  from ssl_jax import runs
  metrics.quiet_library_logs()
  with cli.one_line_errors('ssl_jax.embed', runs.load_errors()):
    if f.dry_run.value:
      dry_run(f)
      return
    embed(f.workdir.value, f.split.value, f.out.value, f.batch_size.value)


if __name__ == '__main__':
  cli.start('ssl_jax.embed')
  app.run(functools.partial(main, f=define_flags(flags.FLAGS)), flags_parser=cli.parse_flags)
