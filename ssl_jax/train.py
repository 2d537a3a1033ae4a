"""Pretraining and evaluation: `train_and_evaluate(config, workdir)`.

Read top to bottom: config checks -> mesh -> data -> model and objective ->
state (resumed from the newest checkpoint in workdir, if any) -> the loop
(progress bar, metrics, checkpoints, NaN guard, SIGTERM/SIGINT) -> final
evaluation (linear probe, kNN, baselines) -> summary.json and a plot.

Resume order: the newest complete checkpoint in workdir, else from scratch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from typing import Any, Callable, Optional

import jax
import ml_collections

from ssl_jax import allocator
from ssl_jax import checkpointing
from ssl_jax import diagnostics
from ssl_jax import evaluate
from ssl_jax import host
from ssl_jax import input_pipeline
from ssl_jax import lapack_threads
from ssl_jax import metrics as metrics_lib
from ssl_jax import runs
from ssl_jax import sharding
from ssl_jax import train_step as train_step_lib
from ssl_jax import workdir_lock


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


def make_step_fn(run: runs.Run, config, mesh):
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
  try:
    runs.check_config(config)
  except ValueError as error:
    raise runs.ConfigError(error) from error
  input_pipeline.hide_accelerators_from_tensorflow()
  checkpointing.check_writable(workdir)
  # One trainer per workdir (process 0 holds the lock for a multi-host run):
  # a second one fails here, before it reads or writes anything else.
  lock = (workdir_lock.hold(workdir) if jax.process_index() == 0
          else contextlib.nullcontext())
  with lock:
    return _train_and_evaluate(config, workdir, reevaluate=reevaluate, start_time=start_time)


def _train_and_evaluate(config, workdir: str, *, reevaluate: bool, start_time: float
                        ) -> dict[str, Any]:
  is_main = jax.process_index() == 0
  if not reevaluate and (done := finished_summary(workdir, config)) is not None:
    if is_main:
      print(f'ssl_jax: {workdir} holds a finished run of this config; its summary follows. '
            'Pass --reevaluate to evaluate its final checkpoint again.', flush=True)
      _print_summary(done)
    return done

  # ---- Mesh, data, objective, model, optimiser and initial state.
  mesh = sharding.make_mesh()
  # What fails here is a value of the config (a width, a rate, a loss term),
  # found before anything is written: one line from the command, no traceback.
  try:
    run = runs.build(config, mesh)
  except ValueError as error:
    raise runs.ConfigError(error) from error
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

  # The rows after the restored step are redone, and so are all of them when no
  # checkpoint was restored: a run killed before its first checkpoint left rows
  # (and TensorBoard events) that the restart from scratch writes again.
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main, resume_step=start_step)
  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    print(f'ssl_jax: {config.method} on {config.data.name}, {mesh.size} {jax.default_backend()} '
          f'device(s), malloc {"tcmalloc" if allocator.tcmalloc_loaded() else "system"}, '
          f'global batch {global_batch}, {total_steps} steps, {n_params:,} parameters, '
          f'{"resuming at step " + str(start_step) if start_step else "from scratch"}; '
          f'workdir {os.path.abspath(workdir)}', flush=True)
    if spec.note:
      print(f'ssl_jax: {spec.note}', flush=True)

  step_fn = make_step_fn(run, config, mesh)
  # One jitted feature extractor for the online test evaluation and the final one.
  feature_fn = evaluate.make_feature_fn(graphdef, run.image_size, spec.mean, spec.std,
                                        config.model.get('conv_route', 'auto'))
  # Each evaluation split decoded once for the run (the online probe's and the final passes).
  eval_splits = evaluate.SplitsInMemory(config, mesh)

  # ---- The loop. timer: where the run's time goes (summary.json 'time_breakdown_sec').
  timer = metrics_lib.Stopwatch()
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
    online_test = evaluate.make_online_test_eval(config, run, mesh, feature_fn, eval_splits)
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
        error = metrics_lib.NonFiniteLossError
        raise error(
            f'{error.MESSAGE_START} ({bad[1]}) at step {bad[0]} (checked up to step {upto_step}); '
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

    timer.add('start-up', time.time() - start_time)
    loop_start = time.perf_counter()
    # One OpenBLAS thread while steps run: jaxlib's LAPACK calls (the log-det's
    # Cholesky, the effective rank's SVD) otherwise leave OpenBLAS threads
    # spinning on the cores XLA's step runs on (ssl_jax/lapack_threads.py).
    with StopRequest().installed() as stop, bar, lapack_threads.one_thread():
      step = start_step
      while step < min(stop_at, total_steps):
        batch = next(batches)
        state, step_metrics = step_fn(state, batch)
        pending.append((step, step_metrics['loss']))
        throughput.add(global_batch)  # source images (each yields two views), as benchmarks/
        step += 1
        bar.update(1)
        if step == start_step + 1:   # the first step compiles: waited for, timed apart
          guard(step)
          timer.add('first step (compilation)', time.perf_counter() - loop_start)
        if step % config.log_every_steps == 0 or step == total_steps:
          guard(step)   # waits for the steps so far: the sections below time only themselves
          scalars = metrics_lib.to_host_scalars(jax.device_get(step_metrics))
          scalars['images_per_sec'] = throughput.rate()
          every = config.eval.online_every_steps
          if metrics_lib.periodic_due(step, every, total_steps, config.log_every_steps):
            with timer.section('online probe evaluation'):
              scalars['probe_test_acc'] = online_test(state)
            throughput.rate()  # restart the clock: evaluation is not training throughput
          if monitor is not None:
            with timer.section('training diagnostics'):
              diag = monitor(step, state)
            if diag:
              scalars.update(diag)
              throughput.rate()
          with timer.section('metrics'):
            write_metrics(lambda: writer.write_scalars(step, scalars),
                          f'Writing the metrics of step {step} to {writer.path}')
          bar.set_postfix(loss=f'{scalars["loss"]:.4g}',
                          probe=f'{scalars["probe_train_acc"]:.3f}',
                          img_s=f'{scalars["images_per_sec"]:.0f}')
        if step % config.ckpt_every_steps == 0 or stop.signal is not None:
          guard(step)
          with timer.section('checkpoints'):
            checkpointing.save(manager, state, config, force=stop.signal is not None)
          last_saved = step
        if stop.signal is not None:
          status = f'interrupted by signal {stop.signal}'
          break
    guard(step)
    loop_seconds = time.perf_counter() - loop_start
    timer.add('steps', loop_seconds - sum(
        v for k, v in timer.seconds.items() if k != 'start-up'))
    if status == 'completed' and step < total_steps:
      status = f'stopped at step {step} (stop_at_step)'
    with timer.section('checkpoints'):
      if last_saved != step:
        checkpointing.save(manager, state, config, force=True)
      write_metrics(writer.flush, f'Flushing the TensorBoard events beside {writer.path}')
  with timer.section('checkpoints'):
    checkpointing.wait(manager)
  final_step = int(jax.device_get(state.step))
  train_seconds = time.time() - start_time

  summary: dict[str, Any] = {
      'method': config.method, 'dataset': config.data.name, 'status': status,
      'steps': final_step, 'total_steps': total_steps, 'start_step': start_step,
      'wall_time_sec': None, 'train_time_sec': train_seconds, 'devices': mesh.size,
      'host': host.describe(),
      'malloc': 'tcmalloc' if allocator.tcmalloc_loaded() else 'system',
      'config': json.loads(config.to_json_best_effort()),
  }
  if status != 'completed':
    print(f'ssl_jax: {status}; checkpoint at step {final_step} in {manager.directory}. '
          'Run the same command again to resume.', flush=True)
  elif config.eval.enabled:
    summary.update(evaluate.final_evaluation(config, run, state, mesh, feature_fn,
                                             timer=timer, figure_dir=workdir,
                                             splits=eval_splits))
  summary['wall_time_sec'] = time.time() - start_time
  # Seconds since train_and_evaluate started, by section; the process's own
  # start-up (Python and library imports) comes before and is not in it.
  summary['time_breakdown_sec'] = dict(timer.seconds)
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
