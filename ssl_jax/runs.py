"""What a config builds before training, and a finished run read back from its workdir.

Below both `train` (which trains a Run) and the readers (`embed`,
`diagnose`, `export`, the dry run), so that none of them imports another:

- `build(config, mesh)`: dataset spec, step counts, views, objective, model,
  optimisers and the initial state (or, abstract=True, its shapes only).
- `describe(config, workdir)`: what `ssl_jax.main --dry_run` checks and prints.
- `load_workdir(workdir)`: the config a run saved, its Run, and its newest
  (or a given) checkpoint, read without writing anything into the workdir.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ssl_jax import augment
from ssl_jax import evaluate
from ssl_jax import input_pipeline
from ssl_jax import models
from ssl_jax import objectives
from ssl_jax import optim
from ssl_jax import sharding
from ssl_jax import train_step as train_step_lib


def steps_from(config, name: str, examples_per_epoch: int, batch_size: int) -> int:
  """`<name>_steps` if set (> 0), else ceil(`<name>_epochs` * examples / batch)."""
  steps = config.get(f'{name}_steps', 0) or 0
  if steps > 0:
    return int(steps)
  epochs = config.get(f'{name}_epochs', 0) or 0
  if epochs < 0 or steps < 0:
    raise ValueError(f'{name}_steps and {name}_epochs must be >= 0.')
  return int(math.ceil(epochs * examples_per_epoch / batch_size))


class ConfigError(ValueError):
  """A config value the run cannot use, found while building the run: before
  anything is trained or written, so the command reports it in one line."""


def check_config(config) -> None:
  """Value checks that the config's types cannot express."""
  if config.data.batch_size <= 0:
    raise ValueError(f'data.batch_size must be > 0, got {config.data.batch_size}.')
  if config.log_every_steps <= 0:
    raise ValueError(f'log_every_steps must be > 0, got {config.log_every_steps}.')
  if config.ckpt_every_steps <= 0:
    raise ValueError(f'ckpt_every_steps must be > 0, got {config.ckpt_every_steps}.')
  if config.keep_checkpoints <= 0:
    raise ValueError(f'keep_checkpoints must be > 0, got {config.keep_checkpoints}.')
  if config.byol.tau_base is not None and not 0 <= config.byol.tau_base < 1:
    raise ValueError(f'byol.tau_base must be in [0, 1), got {config.byol.tau_base}.')


@dataclasses.dataclass
class Run:
  """What a config builds before training: shared by training, embedding, benchmarks."""
  spec: input_pipeline.DatasetSpec
  global_batch: int
  total_steps: int
  warmup_steps: int
  image_size: int
  views: tuple[augment.ViewParams, augment.ViewParams]
  objective: Any
  with_predictor: bool
  with_target: bool
  schedule: Any
  tx: optax.GradientTransformation
  probe_tx: optax.GradientTransformation
  graphdef: Any
  state: train_step_lib.TrainState   # initial state, replicated over the mesh

  def abstract_state(self, mesh):
    replicated = sharding.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        self.state)


def build(config, mesh, *, abstract: bool = False) -> Run:
  """Dataset spec, step counts, views, objective, model, optimisers, initial state.

  abstract: the state holds jax.ShapeDtypeStructs from jax.eval_shape, so no
  parameter is allocated or initialised (`--dry_run` checks a pod-sized
  config on a laptop this way).
  """
  spec = input_pipeline.spec_for(config.data, config.aug.preset)
  global_batch = config.data.batch_size
  input_pipeline.local_batch_size(global_batch, mesh)  # divisibility, with a clear error
  total_steps = steps_from(config, 'total', spec.num_pretrain_examples, global_batch)
  warmup_steps = steps_from(config, 'warmup', spec.num_pretrain_examples, global_batch)
  if total_steps <= 0:
    raise ValueError('Nothing to train: set total_epochs or total_steps > 0.')
  # Before any training: a final evaluation that cannot fit fails now, not after the run.
  evaluate.check_baselines_fit(config, spec, config.data.get('image_size') or spec.image_size)
  views = augment.views_from_config(config.aug.preset, config.aug.view_a, config.aug.view_b)
  # The objective's terms decide which networks exist (predictor, EMA target).
  objective = objectives.build_objective(config.loss.terms)
  needed = objectives.needed_outputs(config.loss.terms)
  # Trace the objective on abstract embeddings now: its parameter checks
  # (beta > 0, a known bound, ...) run at trace time, and should fail before
  # any dataset is prepared or model compiled.
  width = models.parse_mlp_spec(config.model.projector)[-1]
  jax.eval_shape(objective, {name: jax.ShapeDtypeStruct((8, width), jnp.float32)
                             for name in needed})
  with_predictor = bool(needed & {'p_a', 'p_b'})
  with_target = bool(needed & {'t_a', 't_b'})
  schedule = optim.make_schedule(config.optim, global_batch, total_steps, warmup_steps)
  tx = optim.make_optimizer(config.optim, schedule)
  probe_tx = optax.sgd(optax.cosine_decay_schedule(config.probe.lr, total_steps),
                       momentum=config.probe.momentum)
  graphdefs = []

  def initial_state():
    model = models.create_model(config.model, spec.channels, with_predictor=with_predictor,
                                seed=config.seed)
    graphdef, state = train_step_lib.create_train_state(
        model, tx, probe_tx, num_classes=spec.num_classes, seed=config.seed,
        with_target=with_target)
    graphdefs.append(graphdef)   # static structure: no arrays, safe to keep from a trace
    return state

  if abstract:
    state = jax.eval_shape(initial_state)
  else:
    state = jax.device_put(initial_state(), sharding.replicated(mesh))
  graphdef = graphdefs[0]
  return Run(spec=spec, global_batch=global_batch, total_steps=total_steps,
             warmup_steps=warmup_steps,
             image_size=config.data.get('image_size') or spec.image_size, views=views,
             objective=objective, with_predictor=with_predictor, with_target=with_target,
             schedule=schedule, tx=tx, probe_tx=probe_tx, graphdef=graphdef, state=state)


def describe(config, workdir: str, *, processes: Optional[int] = 1) -> dict[str, Any]:
  """What `python -m ssl_jax.main ... --dry_run` checks and reports; runs and writes nothing.

  Validates the config (value checks, the objective traced, the model and its
  optimiser state built with jax.eval_shape), checks that the global batch
  splits over this process's devices times `processes` (None: unknown until
  the distributed runtime starts), and finds the dataset from TFDS's metadata.
  Returns a summary dict whose 'data_error' holds a not-prepared dataset's
  error (describe_text prints it; the command then fails with it).
  """
  from ssl_jax import conv
  check_config(config)
  mesh = sharding.make_mesh()
  if processes:
    sharding.check_batch_divisible(config.data.batch_size, None,
                                   device_count=mesh.size * processes)
  run = build(config, mesh, abstract=True)
  try:
    data, data_error = input_pipeline.check_prepared(config.data.name,
                                                     config.data.data_dir), None
  except FileNotFoundError as error:
    data, data_error = 'NOT PREPARED', error
  steps = checkpoint_steps(workdir) if '://' not in workdir else []
  route = config.model.get('conv_route', 'auto')
  return {
      'method': config.method, 'dataset': config.data.name, 'data': data,
      'data_error': data_error, 'pretrain_split': run.spec.pretrain_split,
      'eval_split': run.spec.test_split, 'pretrain_examples': run.spec.num_pretrain_examples,
      'image_size': run.image_size, 'channels': run.spec.channels,
      'global_batch': run.global_batch, 'devices_here': mesh.size,
      'backend': jax.default_backend(), 'processes': processes,
      'total_steps': run.total_steps, 'warmup_steps': run.warmup_steps,
      'epochs': run.total_steps * run.global_batch / run.spec.num_pretrain_examples,
      'objective': {name: dict(term) for name, term in config.loss.terms.to_dict().items()},
      'encoder': config.model.encoder.name, 'projector': config.model.projector,
      'predictor': config.model.predictor if run.with_predictor else None,
      'ema_target': run.with_target,
      'parameters': int(sum(x.size for x in jax.tree.leaves(run.state.params))),
      'dtype': config.model.dtype, 'conv_route': route,
      'conv_route_here': conv.resolve_route(route),
      'workdir': workdir, 'resume_step': steps[-1] if steps else None,
  }


def describe_text(d: dict[str, Any]) -> str:
  """The dry run's summary, one fact per line."""
  processes = d['processes'] or 'the detected number of'
  per_device = (f', {d["global_batch"] // (d["devices_here"] * d["processes"])} per device'
                if d['processes'] else '')
  terms = ' + '.join(f'{t.get("weight", 1)} x {name}' for name, t in d['objective'].items())
  route = d['conv_route_here'] + (f' (conv_route={d["conv_route"]} on this {d["backend"]}; '
                                  "'lax' on GPU/TPU)" if d['conv_route'] == 'auto' else '')
  resume = (f'resumes from its checkpoint at step {d["resume_step"]}'
            if d['resume_step'] is not None else 'new run (no checkpoint there)')
  lines = [
      f'ssl_jax dry run: {d["method"]} on {d["dataset"]}',
      f'  objective   {terms}',
      f'  data        {d["dataset"]} {d["pretrain_split"]}: {d["pretrain_examples"]:,} images '
      f'of {d["image_size"]}x{d["image_size"]}x{d["channels"]}, evaluated on '
      f'{d["eval_split"]}; {d["data"]}',
      f'  batch       {d["global_batch"]} global over {d["devices_here"]} {d["backend"]} '
      f'device(s) per process x {processes} process(es){per_device}',
      f'  steps       {d["total_steps"]:,} ({d["epochs"]:.1f} epochs), {d["warmup_steps"]:,} '
      'warm-up',
      f'  model       {d["encoder"]}, projector {d["projector"]}'
      + (f', predictor {d["predictor"]}' if d['predictor'] else '')
      + (', EMA target' if d['ema_target'] else '')
      + f'; {d["parameters"]:,} parameters, {d["dtype"]}, conv route {route}',
      f'  workdir     {d["workdir"]}: {resume}',
  ]
  if d['data_error'] is not None:
    lines.append(f'  error       {d["data_error"]}')
  lines.append('Nothing was run or written.')
  return '\n'.join(lines)


class NoRunError(FileNotFoundError):
  """A folder that holds no training run (no config.json, or no checkpoint)."""


def load_errors() -> tuple[type[Exception], ...]:
  """What `load_run` raises on a bad --workdir or --step: no run or no such
  checkpoint there, or a checkpoint that cannot be restored for its config."""
  from ssl_jax import checkpointing
  return (NoRunError, checkpointing.CorruptCheckpointError,
          checkpointing.IncompatibleCheckpointError)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run saved in workdir/config.json."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise NoRunError(f'{path} not found: --workdir must be a training workdir '
                     '(python -m ssl_jax.main --workdir=DIR writes it).')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of workdir's complete checkpoints, read from the folder names alone."""
  folder = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(folder):
    return []
  return sorted(int(d) for d in os.listdir(folder) if d.isdigit())


@dataclasses.dataclass
class LoadedRun:
  config: ml_collections.ConfigDict
  run: Run
  mesh: Any
  manager: Any          # an Orbax CheckpointManager that never creates folders
  step: Optional[int]   # the checkpoint restored (None: abstract, nothing restored)
  state: Any


def load_workdir(workdir: str, *, step: Optional[int] = None, abstract: bool = False
                 ) -> LoadedRun:
  """A training run read back: its config, Run and checkpoint (default: the newest).

  Writes nothing into workdir (no folder is created, and an unreadable
  checkpoint raises instead of being moved aside), so it is safe on a
  workdir that is still training. abstract: only check that a checkpoint
  exists and the config builds; state is the abstract state.
  """
  from ssl_jax import checkpointing
  config = read_config(workdir)
  steps = checkpoint_steps(workdir)
  if not steps:
    raise NoRunError(f'No checkpoint in {os.path.join(workdir, "checkpoints")}: the run has '
                     'not saved one yet (the first is written after ckpt_every_steps steps).')
  if step is not None and step not in steps:
    raise NoRunError(f'No checkpoint of step {step} in {workdir}; it has steps {steps}.')
  input_pipeline.hide_accelerators_from_tensorflow()
  mesh = sharding.make_mesh()
  run = build(config, mesh, abstract=abstract)
  if abstract:
    return LoadedRun(config, run, mesh, None, None, run.state)
  manager = checkpointing.make_manager(workdir, max_to_keep=config.keep_checkpoints,
                                       create=False)
  step = steps[-1] if step is None else step
  state = checkpointing.restore_step(manager, step, run.abstract_state(mesh), config)
  return LoadedRun(config, run, mesh, manager, step, state)
