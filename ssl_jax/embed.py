"""Writes frozen features and labels of a split, for evaluation by other tools.

  python -m ssl_jax.embed --workdir runs/vicreg_it --split test --out feats.npz

Reads the config saved in the workdir and its newest checkpoint; the .npz
holds 'features' [M, F] (float32, encoder output) and 'labels' [M] (int32).
"""

import json
import os

import numpy as np
from absl import app
from absl import flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir (with config.json).',
                               required=True)
_SPLIT = flags.DEFINE_string('split', 'test', 'TFDS split, e.g. train, test, train[:10%].')
_OUT = flags.DEFINE_string('out', None, 'Output .npz path.', required=True)
_BATCH = flags.DEFINE_integer('batch_size', 1000, 'Global evaluation batch size.')


def embed(workdir: str, split: str, out: str, batch_size: int = 1000) -> dict:
  import jax
  import ml_collections
  from ssl_jax import checkpointing, evaluate, input_pipeline, sharding, train
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'{config_path} not found: --workdir must be a training workdir.')
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  input_pipeline.hide_accelerators_from_tensorflow()
  mesh = sharding.make_mesh()
  run = train.build(config, mesh)  # the same state structure as training
  manager = checkpointing.make_manager(workdir, max_to_keep=config.keep_checkpoints)
  # strict: a reading tool never moves checkpoints aside.
  state = checkpointing.restore_latest(manager, run.abstract_state(mesh), config, strict=True)
  if state is None:
    raise FileNotFoundError(f'No checkpoint in {workdir}/checkpoints to embed with.')
  spec, graphdef, image_size = run.spec, run.graphdef, run.image_size
  feature_fn = evaluate.make_feature_fn(graphdef, image_size, spec.mean, spec.std)
  dataset = input_pipeline.eval_dataset(
      config.data.name, split, local_batch=input_pipeline.local_batch_size(batch_size, mesh),
      process_index=jax.process_index(), process_count=jax.process_count(),
      data_dir=config.data.data_dir)
  features, labels = evaluate.extract_features(feature_fn, state.params, state.batch_stats,
                                               dataset, mesh)
  if jax.process_index() == 0:
    np.savez(out, features=features.astype(np.float32), labels=labels.astype(np.int32))
    print(f'ssl_jax.embed: {features.shape[0]} x {features.shape[1]} features of '
          f'{config.data.name}:{split} at step {int(state.step)} -> {out}')
  manager.close()
  return {'features': features, 'labels': labels, 'step': int(state.step)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from ssl_jax import metrics
  metrics.quiet_library_logs()
  embed(_WORKDIR.value, _SPLIT.value, _OUT.value, _BATCH.value)


if __name__ == '__main__':
  app.run(main)
