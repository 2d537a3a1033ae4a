"""End to end: configs train, checkpoint, resume, stop cleanly, fail loudly."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from ssl_jax import augment
from ssl_jax import checkpointing
from ssl_jax import embed
from ssl_jax import metrics as metrics_lib
from ssl_jax import models
from ssl_jax import objectives
from ssl_jax import optim
from ssl_jax import sharding
from ssl_jax import train
from ssl_jax import train_step as train_step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = sorted(objectives.METHODS)


def smoke_config(method, **overrides):
  config = importlib.import_module(f'configs.{method}').get_config('smoke')
  config.eval.baselines = False
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


def params_of(workdir, config, step=None):
  """A checkpoint's (default: the newest) online params as flat numpy arrays."""
  manager = checkpointing.make_manager(workdir, max_to_keep=3)
  step = manager.latest_step() if step is None else step
  restored = manager.restore(step)
  manager.close()
  return step, jax.tree.leaves(jax.tree.map(np.asarray, restored['state']['params']))


@pytest.mark.parametrize('method', METHODS)
def test_every_smoke_config_trains_checkpoints_and_summarises(method, tmp_path):
  # mock_data swaps the process-wide etils.epath filesystem for a mock while
  # as_dataset runs; Orbax writes through epath, so an asynchronous save still
  # writing when the online evaluation builds its dataset would be redirected.
  # Save synchronously here; async saves are tested on real data (resume test).
  config = smoke_config(method, async_checkpoints=False)
  with tfds.testing.mock_data(num_examples=64):
    summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary['status'] == 'completed' and summary['steps'] == 3
  with open(tmp_path / 'summary.json') as f:
    saved = json.load(f)
  assert saved['method'] == method
  for key in ('linear_test_acc', 'knn2_test_acc', 'knn5_test_acc', 'online_probe_test_acc'):
    assert 0.0 <= saved['eval'][key] <= 1.0
  assert checkpointing.make_manager(str(tmp_path), max_to_keep=3).latest_step() == 3
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [1, 2, 3]
  assert all(np.isfinite(r['loss']) for r in rows)
  # The online probe's test accuracy is reported during the run (every 2 steps, and at the end).
  assert ['probe_test_acc' in r for r in rows] == [False, True, True]
  assert all(0.0 <= r['probe_test_acc'] <= 1.0 for r in rows if 'probe_test_acc' in r)
  # Every method logs the entropy diagnostics on a fixed batch (every 2 steps, and at the end).
  diag = ['diag/z_logdet_entropy', 'diag/z_pairwise_entropy', 'diag/features_effective_rank',
          'diag/z_invariance']
  assert [all(k in r for k in diag) for r in rows] == [False, True, True]
  assert all(np.isfinite(r[k]) for r in rows[1:] for k in diag)
  assert os.path.getsize(tmp_path / 'training_curves.png') > 10_000
  assert any(name.startswith('events') for name in os.listdir(tmp_path / 'tensorboard'))


def test_bfloat16_compute_trains_with_finite_float32_statistics(tmp_path):
  config = smoke_config('vicreg_it', **{'model.dtype': 'bfloat16', 'eval.enabled': False})
  summary = train.train_and_evaluate(config, str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert summary['steps'] == 3
  assert all(np.isfinite(r['loss']) and np.isfinite(r['logdet_entropy']) for r in rows)
  # Parameters stay float32 (param_dtype); only the computation is bfloat16.
  _, params = params_of(str(tmp_path), None)
  assert all(p.dtype == np.float32 for p in params)


def test_summary_has_baselines_and_embed_writes_features(tmp_path, monkeypatch):
  config = smoke_config('vicreg', **{'eval.baselines': True})
  monkeypatch.setenv('SSL_JAX_CACHE_DIR', str(tmp_path / 'cache'))
  summary = train.train_and_evaluate(config, str(tmp_path))  # real Fashion-MNIST
  assert set(summary) >= {'eval', 'baseline_random_init', 'baseline_raw_pixels'}
  assert summary['baselines_cache'].startswith(str(tmp_path / 'cache'))
  assert summary['embedding_map'] == str(tmp_path / 'embedding_map.png')
  assert os.path.getsize(tmp_path / 'embedding_map.png') > 10_000
  parts = summary['time_breakdown_sec']
  assert {'start-up', 'first step (compilation)', 'steps', 'evaluation: features',
          'evaluation: linear probe', 'evaluation: kNN', 'evaluation: baselines'} <= set(parts)
  assert sum(parts.values()) <= summary['wall_time_sec'] + 1e-6
  # The same command again prints the finished run's summary, evaluating nothing.
  with monkeypatch.context() as m:
    m.setattr(train.evaluate, 'final_evaluation', lambda *a, **k: pytest.fail('evaluated again'))
    again = train.train_and_evaluate(smoke_config('vicreg', **{'eval.baselines': True}),
                                     str(tmp_path))
  assert again['eval'] == summary['eval']
  out = tmp_path / 'feats.npz'
  embed.embed(str(tmp_path), 'test[:100]', str(out), batch_size=32)
  data = np.load(out)
  assert data['features'].shape == (100, 64) and data['labels'].shape == (100,)
  assert data['features'].dtype == np.float32 and np.all(np.isfinite(data['features']))


def test_resume_follows_the_same_trajectory(tmp_path):
  kw = {'total_steps': 6, 'ckpt_every_steps': 2, 'eval.enabled': False}
  straight = tmp_path / 'straight'
  train.train_and_evaluate(smoke_config('byol', **kw), str(straight))
  resumed = tmp_path / 'resumed'
  first = train.train_and_evaluate(smoke_config('byol', stop_at_step=4, **kw), str(resumed))
  assert first['status'].startswith('stopped at step 4')
  second = train.train_and_evaluate(smoke_config('byol', **kw), str(resumed))
  assert second['status'] == 'completed' and second['steps'] == 6
  step_a, params_a = params_of(str(straight), None)
  step_b, params_b = params_of(str(resumed), None)
  assert step_a == step_b == 6
  for a, b in zip(params_a, params_b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The straight run's step-4 checkpoint was saved asynchronously while step 5
  # already ran on donated buffers; it must equal the resumed run's step 4.
  for a, b in zip(params_of(str(straight), None, 4)[1], params_of(str(resumed), None, 4)[1]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  rows_a = [json.loads(line) for line in open(straight / 'metrics.jsonl')]
  rows_b = [json.loads(line) for line in open(resumed / 'metrics.jsonl')]
  assert [r['step'] for r in rows_a] == [r['step'] for r in rows_b] == [1, 2, 3, 4, 5, 6]
  rows_a = {r['step']: r for r in rows_a}
  rows_b = {r['step']: r for r in rows_b}
  for step in (5, 6):
    for key in ('loss', 'byol', 'probe_loss', 'tau', 'lr'):
      assert rows_a[step][key] == pytest.approx(rows_b[step][key], rel=1e-4), (step, key)


@pytest.mark.slow   # five training runs; CI's time goes to the multi-host and crash tests
def test_elastic_resume_on_another_device_count_follows_the_same_trajectory(
    tmp_path, monkeypatch):
  """1 -> 4 and 4 -> 2 devices (fake CPU devices) continue the 1-device run.

  The state is replicated and the data order a function of the seed and step
  over the global batch, so only the order of float32 reductions differs
  between device counts (BatchNorm and loss statistics, the gradient sum):
  the tolerance is float32 rounding grown over a few steps.
  """
  kw = {'total_steps': 6, 'ckpt_every_steps': 2, 'eval.enabled': False}

  make_mesh = sharding.make_mesh

  def run(workdir, devices, **extra):
    monkeypatch.setattr(train.sharding, 'make_mesh', lambda: make_mesh(devices))
    return train.train_and_evaluate(smoke_config('vicreg', **kw, **extra), str(workdir))

  run(tmp_path / 'straight', 1)
  run(tmp_path / 'grow', 1, stop_at_step=4)
  assert run(tmp_path / 'grow', 4)['devices'] == 4
  run(tmp_path / 'shrink', 4, stop_at_step=4)
  assert run(tmp_path / 'shrink', 2)['devices'] == 2
  _, straight = params_of(str(tmp_path / 'straight'), None)
  for name in ('grow', 'shrink'):
    step, params = params_of(str(tmp_path / name), None)
    assert step == 6
    for a, b in zip(straight, params):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=name)


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'ssl_jax.main', '--config=configs/vicreg.py:smoke',
         f'--workdir={workdir}', '--config.total_steps=100000', '--config.ckpt_every_steps=100000',
         '--config.eval.enabled=False',
         # A hold-out reads TFDS with record ids, whose reader calls deprecated tf.data code.
         '--config.data.holdout=1000']
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  metrics_file = workdir / 'metrics.jsonl'
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 3:
      break
    time.sleep(0.5)
  assert proc.poll() is None, proc.stdout.read()
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, output
  assert 'interrupted by signal' in output and 'Run the same command again to resume' in output
  # Quiet: no TensorFlow start-up banner, no deprecation warnings from TFDS's reader.
  assert 'oneDNN' not in output and 'deprecated' not in output, output
  saved_step = checkpointing.make_manager(str(workdir), max_to_keep=3).latest_step()
  assert saved_step is not None and saved_step >= 3
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['status'].startswith('interrupted') and summary['steps'] == saved_step
  config = smoke_config('vicreg', total_steps=100000, ckpt_every_steps=100000,
                        stop_at_step=saved_step + 2, **{'eval.enabled': False})
  again = train.train_and_evaluate(config, str(workdir))
  assert again['steps'] == saved_step + 2


def _step_on(mesh, config, state_host, batch_host, log_every=1):
  spec_mean, spec_std = (0.286,), (0.353,)
  objective = objectives.build_objective(config.loss.terms)
  model = models.create_model(config.model, 1, with_predictor=False, seed=0)
  graphdef = nnx.graphdef(model)
  schedule = optim.make_schedule(config.optim, 16, 10, 1)
  tx = optim.make_optimizer(config.optim, schedule)
  probe_tx = optax.sgd(0.1, momentum=0.9)
  step = train_step_lib.make_train_step(
      graphdef=graphdef, objective=objective, tx=tx, probe_tx=probe_tx,
      views=augment.views_from_config('fashion_mnist'), image_size=28, mean=spec_mean,
      std=spec_std, crop_on_device=True, schedule=schedule, total_steps=10, tau_base=None,
      log_every=log_every)
  state = jax.device_put(state_host, sharding.replicated(mesh))
  batch = jax.device_put(batch_host, sharding.batch_sharding(mesh))
  new_state, metrics = jax.jit(step)(state, batch)
  return jax.device_get(new_state), jax.device_get(metrics)


def test_data_parallel_step_equals_single_device_step():
  config = smoke_config('vicreg')
  model = models.create_model(config.model, 1, with_predictor=False, seed=0)
  schedule = optim.make_schedule(config.optim, 16, 10, 1)
  _, state = train_step_lib.create_train_state(
      model, optim.make_optimizer(config.optim, schedule), optax.sgd(0.1, momentum=0.9),
      num_classes=10, seed=0, with_target=False)
  state = jax.device_get(state)
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (16, 28, 28, 1), dtype=np.uint8),
           'label': rng.integers(0, 10, 16).astype(np.int32)}
  one, metrics_one = _step_on(sharding.make_mesh(1), config, state, batch)
  eight, metrics_eight = _step_on(sharding.make_mesh(8), config, state, batch)
  assert jax.device_count() == 8
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(one.batch_stats), jax.tree.leaves(eight.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert float(metrics_one['loss']) == pytest.approx(float(metrics_eight['loss']), rel=1e-5)


def test_unlogged_steps_produce_no_nan_so_jax_debug_nans_stays_usable():
  """JAX_DEBUG_NANS=1 is how one finds where a diverging run first makes a NaN."""
  config = smoke_config('vicreg')
  model = models.create_model(config.model, 1, with_predictor=False, seed=0)
  _, state = train_step_lib.create_train_state(
      model, optim.make_optimizer(config.optim, optim.make_schedule(config.optim, 16, 10, 1)),
      optax.sgd(0.1, momentum=0.9), num_classes=10, seed=0, with_target=False)
  state = jax.device_get(state)
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (16, 28, 28, 1), dtype=np.uint8),
           'label': rng.integers(0, 10, 16).astype(np.int32)}
  mesh = sharding.make_mesh(1)
  with jax.debug_nans(True):
    _, unlogged = _step_on(mesh, config, state, batch, log_every=2)   # step 0 is not logged
    _, logged = _step_on(mesh, config, state, batch, log_every=1)
  assert float(unlogged['effective_rank']) == 0.0   # not computed: 0, which no rank can be
  assert 1.0 <= float(logged['effective_rank']) <= 16.0


def test_byol_target_is_an_ema_and_gets_no_gradient(tmp_path):
  config = smoke_config('byol', total_steps=2, **{'eval.enabled': False})
  train.train_and_evaluate(config, str(tmp_path / 'a'))
  manager = checkpointing.make_manager(str(tmp_path / 'a'), max_to_keep=3)
  state_2 = manager.restore(2)['state']
  # Rebuild step 1's state by stopping there.
  config_1 = smoke_config('byol', total_steps=2, stop_at_step=1, **{'eval.enabled': False})
  train.train_and_evaluate(config_1, str(tmp_path / 'b'))
  state_1 = checkpointing.make_manager(str(tmp_path / 'b'), max_to_keep=3).restore(1)['state']
  tau = float(optim.byol_tau(1, 2, config.byol.tau_base))
  expected = jax.tree.map(lambda t, o: tau * np.asarray(t) + (1 - tau) * np.asarray(o),
                          state_1['target_params'], state_2['params'])
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(state_2['target_params'])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # The objective's gradient with respect to the target outputs is zero.
  objective = objectives.build_objective(config.loss.terms)
  outs = {k: jax.random.normal(jax.random.key(i), (8, 4)) for i, k in
          enumerate(('z_a', 'z_b', 'p_a', 'p_b', 't_a', 't_b'))}
  grads = jax.grad(lambda o: objective(o)[0])(outs)
  assert not np.any(grads['t_a']) and not np.any(grads['t_b'])


def test_nan_loss_stops_with_step_and_last_good_checkpoint(tmp_path, monkeypatch):
  kw = {'total_steps': 6, 'ckpt_every_steps': 2, 'eval.enabled': False}
  train.train_and_evaluate(smoke_config('vicreg', stop_at_step=2, **kw), str(tmp_path))
  real_build = objectives.build_objective

  def poisoned(terms):
    objective = real_build(terms)
    return lambda outputs, axis_name=None: jax.tree.map(
        lambda x: x * jnp.nan, objective(outputs, axis_name))

  monkeypatch.setattr(objectives, 'build_objective', poisoned)
  with pytest.raises(metrics_lib.NonFiniteLossError,
                     match=r'Non-finite loss \(nan\) at step 2 .*last good checkpoint is step 2'):
    train.train_and_evaluate(smoke_config('vicreg', **kw), str(tmp_path))
  # The bad state was not saved.
  assert checkpointing.make_manager(str(tmp_path), max_to_keep=3).latest_step() == 2


def test_incompatible_checkpoint_is_rejected(tmp_path):
  kw = {'total_steps': 2, 'eval.enabled': False}
  train.train_and_evaluate(smoke_config('vicreg', **kw), str(tmp_path))
  with pytest.raises(ValueError, match='incompatible config.*loss.terms'):
    train.train_and_evaluate(smoke_config('byol', **kw), str(tmp_path))
  with pytest.raises(ValueError, match='incompatible config.*model'):
    train.train_and_evaluate(smoke_config('vicreg', **{**kw, 'model.projector': '64-64'}),
                             str(tmp_path))


def corrupt(step_dir):
  """Overwrites a checkpoint's array data, leaving its JSON metadata readable."""
  for path in step_dir.rglob('*'):
    if path.is_file() and path.suffix != '.json' and 'meta' not in str(path):
      path.write_bytes(b'garbage')


def test_corrupt_newest_checkpoint_is_moved_aside_and_the_run_resumes(tmp_path, capsys):
  # Stopped at step 4 of 6 with checkpoints at 2 and 4; step 4 then goes bad.
  kw = {'total_steps': 6, 'stop_at_step': 4, 'eval.enabled': False}
  train.train_and_evaluate(smoke_config('vicreg', **kw), str(tmp_path))
  _, reference = params_of(str(tmp_path), None, step=2)
  step_dir = tmp_path / 'checkpoints' / '4'
  corrupt(step_dir)
  config = smoke_config('vicreg', **{**kw, 'stop_at_step': 0})
  # checkpoint_strict refuses, and leaves the folder where it is.
  strict = smoke_config('vicreg', **{**kw, 'stop_at_step': 0}, checkpoint_strict=True)
  with pytest.raises(checkpointing.CorruptCheckpointError, match='could not be restored'):
    train.train_and_evaluate(strict, str(tmp_path))
  assert step_dir.exists() and not (tmp_path / 'checkpoints' / 'corrupt').exists()
  # By default it is moved aside and the run goes on from step 2.
  capsys.readouterr()
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary['status'] == 'completed' and summary['steps'] == 6
  out = capsys.readouterr().out
  assert 'could not be restored' in out and 'moved to' in out and 'resuming at step 2' in out
  # Nothing deleted: the bad step sits under checkpoints/corrupt/, and the run
  # resumed from step 2 (whose parameters are untouched) to the end.
  assert (tmp_path / 'checkpoints' / 'corrupt' / '4').is_dir()
  assert checkpointing.make_manager(str(tmp_path), max_to_keep=3).all_steps() == [2, 4, 6]
  _, again = params_of(str(tmp_path), None, step=2)
  assert all(np.array_equal(a, b) for a, b in zip(reference, again))


def test_unwritable_workdir_fails_before_training(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  with pytest.raises(checkpointing.CheckpointWriteError, match='cannot be written'):
    train.train_and_evaluate(smoke_config('vicreg'), str(blocker / 'workdir'))


def test_disk_filling_during_a_save_gives_a_clear_error_and_keeps_earlier_checkpoints(
    tmp_path):
  mount = tmp_path / 'small_disk'
  mount.mkdir()
  done = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(mount)],
                        capture_output=True)
  if done.returncode != 0:
    pytest.skip(f'cannot mount a small tmpfs here: {done.stderr.decode().strip()}')
  try:
    workdir = mount / 'run'
    config = smoke_config('vicreg', total_steps=40, keep_checkpoints=100,
                          **{'eval.enabled': False})
    with pytest.raises(checkpointing.CheckpointWriteError,
                       match='disk is full.*are intact.*resume from step'):
      train.train_and_evaluate(config, str(workdir))
    steps = checkpointing.make_manager(str(workdir), max_to_keep=100).all_steps()
    assert steps and steps == list(range(2, 2 * len(steps) + 1, 2))
    # Every complete checkpoint left behind restores.
    for step in steps:
      assert params_of(str(workdir), None, step=step)[0] == step
  finally:
    # Lazy: Orbax's writer threads may still hold the (now full) files open.
    subprocess.run(['umount', '-l', str(mount)], check=False)


@pytest.mark.parametrize('writer', ['metrics.jsonl', 'tensorboard'])
def test_full_disk_hitting_a_metrics_writer_first_gives_the_same_clear_error(
    writer, tmp_path, monkeypatch):
  # On a full disk the metrics writers can fail before the background checkpoint
  # save reports its own failure (both seen in CI): the run must stop with the
  # same error, naming the intact checkpoints, not a bare OSError or, from
  # TensorBoard's writer, a tf.errors.ResourceExhaustedError.
  import tensorflow as tf
  from ssl_jax import metrics
  if writer == 'metrics.jsonl':
    original_write = metrics.MetricWriter.write_scalars

    def write_scalars(self, step, scalars):
      if step >= 6:
        raise OSError(28, 'No space left on device')
      return original_write(self, step, scalars)

    monkeypatch.setattr(metrics.MetricWriter, 'write_scalars', write_scalars)
  else:
    original_scalar = tf.summary.scalar

    def scalar(name, data, step=None, description=None):
      if tf.summary.experimental.get_step() >= 6:
        raise tf.errors.ResourceExhaustedError(
            None, None, 'events.out.tfevents.x; No space left on device')
      return original_scalar(name, data, step=step, description=description)

    monkeypatch.setattr(tf.summary, 'scalar', scalar)
  config = smoke_config('vicreg', total_steps=40, keep_checkpoints=100,
                        **{'eval.enabled': False})
  workdir = str(tmp_path / 'run')
  named = '' if writer == 'metrics.jsonl' else '.*TensorBoard event file'
  with pytest.raises(checkpointing.CheckpointWriteError,
                     match=r'metrics of step 6 .*disk is full' + named +
                           r'.*steps \[2, 4\]\) are intact.*resume from step 4'):
    train.train_and_evaluate(config, workdir)
  assert params_of(workdir, None, step=4)[0] == 4


@pytest.mark.parametrize('override,message', [
    ('--config.data.nme=3', 'nme'),
    ('--config.data.batch_size=12', 'multiple of the device count'),
    ('--config.optim.name=adam', "Unknown optimiser 'adam'"),
    ('--config.loss.terms.invariance.weight=-1', 'weight >= 0'),
    ('--config.model.encoder.name=vgg', "Unknown encoder 'vgg'"),
    ('--config.data.name=mnist', "Unknown dataset 'mnist'"),
])
def test_bad_config_is_rejected_with_a_clear_error(override, message, tmp_path):
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  result = subprocess.run(
      [sys.executable, '-m', 'ssl_jax.main', '--config=configs/vicreg.py:smoke',
       f'--workdir={tmp_path}', override], cwd=ROOT, capture_output=True, text=True, env=env,
      timeout=300)
  assert result.returncode != 0
  assert message in result.stderr + result.stdout


def test_bad_objective_parameter_is_rejected_before_any_data_is_read(tmp_path, monkeypatch):
  from ssl_jax import input_pipeline
  monkeypatch.setattr(input_pipeline, 'load_split',
                      lambda *a, **k: pytest.fail('data was read before the config was checked'))
  config = smoke_config('vicreg_it', **{'loss.terms.logdet_entropy.beta': -1.0})
  with pytest.raises(ValueError, match='beta must be > 0, got -1.0'):
    train.train_and_evaluate(config, str(tmp_path))


def test_unknown_config_variant():
  with pytest.raises(ValueError, match="Unknown config variant"):
    importlib.import_module('configs.vicreg').get_config('cifar11')


def test_probe_loss_ignores_unlabelled_images():
  probe = {'w': jnp.eye(3), 'b': jnp.zeros(3)}
  features = jnp.array([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
  labels = jnp.array([0, 1, 0])
  mask = jnp.array([True, True, False])      # the third is unlabelled
  loss, acc = train_step_lib.probe_loss(probe, features, labels, mask)
  full_loss, _ = train_step_lib.probe_loss(probe, features[:2], labels[:2])
  assert float(acc) == 1.0 and float(loss) == pytest.approx(float(full_loss))
