"""Pretraining and evaluation: `train_and_evaluate(config, workdir)`.

Read top to bottom: config checks -> mesh -> data -> model and objective ->
state (resumed from the newest checkpoint in workdir, if any) -> the loop
(progress bar, metrics, checkpoints, NaN guard, SIGTERM/SIGINT) -> final
evaluation (linear probe, kNN, baselines) -> summary.json and a plot.

Resume order: the newest complete checkpoint in workdir, else from scratch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ssl_jax import allocator
from ssl_jax import augment
from ssl_jax import checkpointing
from ssl_jax import diagnostics
from ssl_jax import evaluate
from ssl_jax import input_pipeline
from ssl_jax import metrics as metrics_lib
from ssl_jax import models
from ssl_jax import objectives
from ssl_jax import optim
from ssl_jax import sharding
from ssl_jax import train_step as train_step_lib


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the message names the step and checkpoint."""


def steps_from(config, name: str, examples_per_epoch: int, batch_size: int) -> int:
  """`<name>_steps` if set (> 0), else ceil(`<name>_epochs` * examples / batch)."""
  steps = config.get(f'{name}_steps', 0) or 0
  if steps > 0:
    return int(steps)
  epochs = config.get(f'{name}_epochs', 0) or 0
  if epochs < 0 or steps < 0:
    raise ValueError(f'{name}_steps and {name}_epochs must be >= 0.')
  return int(math.ceil(epochs * examples_per_epoch / batch_size))


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


class StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""

  def __init__(self):
    self.signal: Optional[int] = None

  def __call__(self, signum, frame):
    del frame
    self.signal = signum

  @contextlib.contextmanager
  def installed(self):
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        previous[sig] = signal.signal(sig, self)
      except ValueError:  # not the main thread: leave signals alone
        pass
    try:
      yield self
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)


def _first_non_finite(pending: list[tuple[int, Any]]) -> Optional[tuple[int, float]]:
  for step, loss in pending:
    value = float(jax.device_get(loss))
    if not math.isfinite(value):
      return step, value
  return None


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


def build(config, mesh) -> Run:
  """Dataset spec, step counts, views, objective, model, optimisers, initial state."""
  spec = input_pipeline.spec_for(config.data)
  global_batch = config.data.batch_size
  input_pipeline.local_batch_size(global_batch, mesh)  # divisibility, with a clear error
  total_steps = steps_from(config, 'total', spec.num_pretrain_examples, global_batch)
  warmup_steps = steps_from(config, 'warmup', spec.num_pretrain_examples, global_batch)
  if total_steps <= 0:
    raise ValueError('Nothing to train: set total_epochs or total_steps > 0.')
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
  model = models.create_model(config.model, spec.channels, with_predictor=with_predictor,
                              seed=config.seed)
  schedule = optim.make_schedule(config.optim, global_batch, total_steps, warmup_steps)
  tx = optim.make_optimizer(config.optim, schedule)
  probe_tx = optax.sgd(optax.cosine_decay_schedule(config.probe.lr, total_steps),
                       momentum=config.probe.momentum)
  graphdef, state = train_step_lib.create_train_state(
      model, tx, probe_tx, num_classes=spec.num_classes, seed=config.seed,
      with_target=with_target)
  return Run(spec=spec, global_batch=global_batch, total_steps=total_steps,
             warmup_steps=warmup_steps,
             image_size=config.data.get('image_size') or spec.image_size, views=views,
             objective=objective, with_predictor=with_predictor, with_target=with_target,
             schedule=schedule, tx=tx, probe_tx=probe_tx, graphdef=graphdef,
             state=jax.device_put(state, sharding.replicated(mesh)))


def make_step_fn(run: Run, config, mesh):
  """The jitted training step: state replicated, batch sharded over 'data'."""
  replicated = sharding.replicated(mesh)
  return jax.jit(
      train_step_lib.make_train_step(
          graphdef=run.graphdef, objective=run.objective, tx=run.tx, probe_tx=run.probe_tx,
          views=run.views, image_size=run.image_size, mean=run.spec.mean, std=run.spec.std,
          crop_on_device=not run.spec.variable_size, schedule=run.schedule,
          total_steps=run.total_steps,
          tau_base=config.byol.tau_base if run.with_target else None,
          log_every=config.log_every_steps),
      out_shardings=(replicated, replicated), donate_argnums=(0,))


def finished_summary(workdir: str, config) -> Optional[dict[str, Any]]:
  """The summary.json of a completed, evaluated run of this config in workdir, else None."""
  summary = metrics_lib.completed_summary(workdir)
  if summary is None or summary.get('config') != json.loads(config.to_json_best_effort()):
    return None
  return summary if 'eval' in summary or not config.eval.enabled else None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       reevaluate: bool = False) -> dict[str, Any]:
  """Pretrains as configured, checkpoints into workdir, evaluates; returns the summary.

  A workdir whose run of the same config has finished and been evaluated is
  not evaluated again (its summary is printed and returned) unless reevaluate.
  """
  start_time = time.time()
  check_config(config)
  input_pipeline.hide_accelerators_from_tensorflow()
  is_main = jax.process_index() == 0
  checkpointing.check_writable(workdir)
  if not reevaluate and (done := finished_summary(workdir, config)) is not None:
    if is_main:
      print(f'ssl_jax: {workdir} holds a finished run of this config; its summary follows. '
            'Pass --reevaluate to evaluate its final checkpoint again.', flush=True)
      _print_summary(done)
    return done

  # ---- Mesh, data, objective, model, optimiser and initial state.
  mesh = sharding.make_mesh()
  run = build(config, mesh)
  spec, global_batch, total_steps = run.spec, run.global_batch, run.total_steps
  graphdef, state = run.graphdef, run.state
  local_batch = input_pipeline.local_batch_size(global_batch, mesh)

  # ---- Resume from the newest complete checkpoint in workdir.
  manager = checkpointing.make_manager(workdir, max_to_keep=config.keep_checkpoints,
                                       async_save=config.async_checkpoints,
                                       keep_period=config.keep_checkpoint_period)
  restored = checkpointing.restore_latest(manager, run.abstract_state(mesh), config,
                                          strict=config.checkpoint_strict)
  if restored is not None:
    state = restored
  start_step = int(jax.device_get(state.step))

  writer = metrics_lib.MetricWriter(workdir, enabled=is_main,
                                   resume_step=start_step if restored is not None else None)
  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    print(f'ssl_jax: {config.method} on {config.data.name}, {mesh.size} {jax.default_backend()} '
          f'device(s), malloc {"tcmalloc" if allocator.tcmalloc_loaded() else "system"}, '
          f'global batch {global_batch}, {total_steps} steps, {n_params:,} parameters, '
          f'{"resuming at step " + str(start_step) if start_step else "from scratch"}; '
          f'workdir {os.path.abspath(workdir)}', flush=True)

  step_fn = make_step_fn(run, config, mesh)
  # One jitted feature extractor for the online test evaluation and the final one.
  feature_fn = evaluate.make_feature_fn(graphdef, run.image_size, spec.mean, spec.std)

  # ---- The loop.
  status = 'completed'
  stop_at = config.stop_at_step if config.stop_at_step > 0 else total_steps
  if start_step < min(stop_at, total_steps):
    dataset = input_pipeline.pretrain_dataset(
        config.data.name, local_batch=local_batch, seed=config.seed, start_step=start_step,
        split=spec.pretrain_split, process_index=jax.process_index(),
        process_count=jax.process_count(), input_shards=config.data.input_shards,
        data_dir=config.data.data_dir, shuffle_buffer=config.data.shuffle_buffer)
    batches = input_pipeline.DeviceIterator(dataset, mesh, prefetch=config.data.prefetch)
    throughput = metrics_lib.Throughput()
    online_test = evaluate.make_online_test_eval(config, run, mesh, feature_fn)
    monitor = diagnostics.make_training_monitor(config, run, mesh)
    pending: list[tuple[int, Any]] = []   # (step, loss) not yet checked on the host
    bar = metrics_lib.progress_bar(total_steps, start_step, enabled=is_main)
    last_saved = start_step if restored is not None else None

    def guard(upto_step: int) -> None:
      bad = _first_non_finite(pending)
      pending.clear()
      if bad is not None:
        checkpointing.wait(manager)
        good = manager.latest_step()
        where = (f'the last good checkpoint is step {good} in {manager.directory}'
                 if good is not None else 'no checkpoint was saved before it')
        raise NonFiniteLossError(
            f'Non-finite loss ({bad[1]}) at step {bad[0]} (checked up to step {upto_step}); '
            f'{where}. The bad state was not saved. Lower optim.base_lr, raise the warm-up, '
            'or check the loss weights; resuming restarts from that checkpoint.')

    def write_metrics(write: Callable[[], None], what: str) -> None:
      try:
        write()
      except OSError as error:
        # A full disk may hit metrics.jsonl or the TensorBoard events before the
        # background checkpoint save reports it: name the failed save first if any.
        checkpointing.wait(manager)
        raise checkpointing.write_error(manager, error, what) from error

    with StopRequest().installed() as stop, bar:
      step = start_step
      while step < min(stop_at, total_steps):
        batch = next(batches)
        state, step_metrics = step_fn(state, batch)
        pending.append((step, step_metrics['loss']))
        throughput.add(global_batch)  # source images (each yields two views), as benchmarks/
        step += 1
        bar.update(1)
        if step % config.log_every_steps == 0 or step == total_steps:
          guard(step)
          scalars = metrics_lib.to_host_scalars(jax.device_get(step_metrics))
          scalars['images_per_sec'] = throughput.rate()
          every = config.eval.online_every_steps
          if every > 0 and (step % every == 0 or step == total_steps):
            scalars['probe_test_acc'] = online_test(state)
            throughput.rate()  # restart the clock: evaluation is not training throughput
          if monitor is not None and (diag := monitor(step, state)):
            scalars.update(diag)
            throughput.rate()
          write_metrics(lambda: writer.write_scalars(step, scalars),
                        f'Writing the metrics of step {step} to {writer.path}')
          bar.set_postfix(loss=f'{scalars["loss"]:.4g}',
                          probe=f'{scalars["probe_train_acc"]:.3f}',
                          img_s=f'{scalars["images_per_sec"]:.0f}')
        if step % config.ckpt_every_steps == 0 or stop.signal is not None:
          guard(step)
          checkpointing.save(manager, state, config, force=stop.signal is not None)
          last_saved = step
        if stop.signal is not None:
          status = f'interrupted by signal {stop.signal}'
          break
    guard(step)
    if status == 'completed' and step < total_steps:
      status = f'stopped at step {step} (stop_at_step)'
    if last_saved != step:
      checkpointing.save(manager, state, config, force=True)
    write_metrics(writer.flush, f'Flushing the TensorBoard events beside {writer.path}')
  checkpointing.wait(manager)
  final_step = int(jax.device_get(state.step))
  train_seconds = time.time() - start_time

  summary: dict[str, Any] = {
      'method': config.method, 'dataset': config.data.name, 'status': status,
      'steps': final_step, 'total_steps': total_steps, 'wall_time_sec': None,
      'train_time_sec': train_seconds, 'devices': mesh.size,
      'malloc': 'tcmalloc' if allocator.tcmalloc_loaded() else 'system',
      'config': json.loads(config.to_json_best_effort()),
  }
  if status != 'completed':
    print(f'ssl_jax: {status}; checkpoint at step {final_step} in {manager.directory}. '
          'Run the same command again to resume.', flush=True)
  elif config.eval.enabled:
    summary.update(evaluate.final_evaluation(config, run, state, mesh, feature_fn))
  summary['wall_time_sec'] = time.time() - start_time
  if is_main:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2)
    summary['plot'] = metrics_lib.plot_history(
        writer.history, os.path.join(workdir, 'training_curves.png'),
        title=f'{config.method} on {config.data.name}')
    _print_summary(summary)
  manager.close()
  return summary


def _print_summary(summary: dict[str, Any]) -> None:
  lines = [f'ssl_jax: {summary["method"]} on {summary["dataset"]}: {summary["status"]}, '
           f'{summary["steps"]} steps, {summary["wall_time_sec"]:.0f} s']
  for name in ('eval', 'baseline_random_init', 'baseline_raw_pixels'):
    if name in summary:
      accs = ', '.join(f'{k}={v:.4f}' for k, v in summary[name].items())
      lines.append(f'  {name}: {accs}')
  print('\n'.join(lines), flush=True)
