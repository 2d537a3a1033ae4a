"""The training loop on two processes (jax.distributed on 127.0.0.1), end to end.

Each process has two fake CPU devices; the config is the :smoke one on real
Fashion-MNIST. The run is killed mid-way (SIGKILL, both processes) and
restarted, and compared with one process holding four devices.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The im2col route: the bit-for-bit comparison of one process with two below
# fails on the Winograd route (the CPU default), whose first-step loss differs
# in the 7th digit between 2 processes x 2 devices and 1 process x 4 devices
# (25.658598 against 25.658596; cause not found). Its values are checked
# against lax.conv and across 8 devices in tests/conv_test.py.
ARGS = ['--config=configs/vicreg.py:smoke', '--config.total_steps=6',
        '--config.ckpt_every_steps=2', '--config.eval.baselines=true',
        '--config.diagnostics.every_steps=0', '--config.model.conv_route=im2col']


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def env(devices):
  return {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}


def start(workdir, process_id, port, num_processes=2, timeout=120):
  return subprocess.Popen(
      [sys.executable, '-m', 'ssl_jax.main', *ARGS, f'--workdir={workdir}',
       f'--coordinator=127.0.0.1:{port}', f'--num_processes={num_processes}',
       f'--process_id={process_id}', f'--init_timeout={timeout}'],
      cwd=ROOT, env=env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      start_new_session=True)


def rows(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith('\n')]


def params(workdir):
  """The newest checkpoint's parameters, restored onto this process's first device
  (the checkpoint may come from other devices and processes)."""
  import jax
  import ml_collections
  from ssl_jax import checkpointing, runs, sharding
  with open(os.path.join(workdir, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  mesh = sharding.make_mesh(1)
  run = runs.build(config, mesh)
  manager = checkpointing.make_manager(workdir, max_to_keep=3)
  state = checkpointing.restore_step(manager, manager.latest_step(), run.abstract_state(mesh),
                                     config)
  manager.close()
  return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_a_process_alone_fails_in_bounded_time_naming_the_coordinator():
  began = time.time()
  ports = [free_port(), free_port()]
  alone = [start('/tmp/unused', i, ports[i], timeout=4) for i in range(2)]
  outs = [p.communicate(timeout=240)[0] for p in alone]
  assert all(p.returncode != 0 for p in alone)
  for i, out in enumerate(outs):
    assert f'process {i} of 2 processes' in out and f'127.0.0.1:{ports[i]}' in out, out[-2000:]
  assert 'DEADLINE_EXCEEDED' in outs[0]                 # the coordinator, waiting for process 1
  assert 'no coordinator answered' in outs[1]           # process 1, with no process 0
  assert time.time() - began < 200


def test_two_processes_train_resume_after_sigkill_and_match_one_process(tmp_path, monkeypatch):
  monkeypatch.setenv('SSL_JAX_CACHE_DIR', str(tmp_path / 'cache'))   # the one-process run caches
  workdir = str(tmp_path / 'two_hosts')
  port = free_port()
  procs = [start(workdir, i, port) for i in range(2)]
  # Kill both once the step-2 checkpoint exists and step 3 or later was logged.
  deadline = time.time() + 400
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if os.path.isdir(os.path.join(workdir, 'checkpoints', '2')) and len(rows(workdir)) >= 3:
      break
    time.sleep(0.05)
  assert all(p.poll() is None for p in procs), [p.communicate()[0][-2000:] for p in procs]
  for p in procs:
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
  port = free_port()
  procs = [start(workdir, i, port) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), [o[-3000:] for o in outs]
  assert 'resuming at step' in outs[0]

  # One set of checkpoints; metrics and the summary written once, by process 0.
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())
  assert steps[-1] == 6
  assert [r['step'] for r in rows(workdir)] == [1, 2, 3, 4, 5, 6]
  assert 'ssl_jax: vicreg on fashion_mnist: completed' in outs[0]
  assert 'completed' not in outs[1]        # process 1 prints no summary
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['devices'] == 4 and summary['status'] == 'completed'
  # Evaluation saw every host's features: the whole capped split, not a shard.
  assert summary['eval']['train_examples'] == 64 and summary['eval']['test_examples'] == 32
  assert os.path.exists(os.path.join(workdir, 'training_curves.png'))

  # One process with four devices reading the same two input shards: the same
  # global batches, so the first step's loss is equal bit for bit and its
  # gradient norm to float32 rounding (the gradient and BatchNorm sums run in
  # another order over 2 x 2 devices than over 4). Six LARS steps of this tiny
  # model (batch 16) amplify that rounding to ~1e-4 in the parameters
  # (measured: at most 1.4e-4 absolute, gradient norms 2e-7 apart at step 1
  # and 1e-3 at step 6), hence atol 5e-4 at the end.
  single = str(tmp_path / 'one_host')
  done = subprocess.run([sys.executable, '-m', 'ssl_jax.main', *ARGS, f'--workdir={single}',
                         '--config.data.input_shards=2', '--config.eval.enabled=false'],
                        cwd=ROOT, env=env(4), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
  first_two, first_one = rows(workdir)[0], rows(single)[0]
  assert first_two['loss'] == first_one['loss']
  assert first_two['l2_grads'] == pytest.approx(first_one['l2_grads'], rel=1e-6)
  for a, b in zip(params(single), params(workdir)):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=5e-4)
  # The raw-pixel baseline saw every host's images: the probes on both processes' first
  # examples, gathered batch by batch (each process reads its half of the split).
  import ml_collections
  from ssl_jax import evaluate, input_pipeline
  with open(os.path.join(workdir, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  spec = input_pipeline.get_spec('fashion_mnist')
  train, test = (gathered_pixels(split, count, config.eval.batch_size // 2, spec)
                 for split, count in (('train', 64), ('test', 32)))
  expected = evaluate.evaluate_features(train, test, num_classes=10, config=config.eval)
  assert summary['baseline_raw_pixels'] == pytest.approx(expected, abs=1e-6)


def gathered_pixels(split, count, local_batch, spec):
  """(normalised pixels, labels) of the first count // 2 examples of each process's half of
  split, in the order process_allgather gives them: batch 1 of process 0, then of 1, ..."""
  import tensorflow_datasets as tfds
  from ssl_jax import evaluate, input_pipeline
  halves = [next(input_pipeline.load_split('fashion_mnist', part).batch(count // 2)
                 .as_numpy_iterator()) for part in tfds.even_splits(split, 2)]
  order = [{k: v[start:start + local_batch] for k, v in half.items()}
           for start in range(0, count // 2, local_batch) for half in halves]
  images = np.concatenate([h['image'] for h in order])
  labels = np.concatenate([h['label'] for h in order])
  return evaluate.normalised_pixels(images, spec.mean, spec.std), labels


def test_slurm_environment_starts_the_distributed_runtime():
  """Two local processes with the variables srun sets for a 2-task job (launch/slurm.sbatch)."""
  job = str(free_port())   # JAX derives the coordinator port from the job id
  snippet = ('from absl import flags; from ssl_jax import main; '
             'f = main.define_flags(flags.FLAGS); flags.FLAGS(["main"]); '
             'main.initialize_distributed(f); import jax; '
             'print("joined", jax.process_index(), jax.process_count(), jax.device_count())')
  procs = []
  for task in range(2):
    slurm = {'SLURM_JOB_ID': job, 'SLURM_STEP_NODELIST': '127.0.0.1', 'SLURM_NTASKS': '2',
             'SLURM_PROCID': str(task), 'SLURM_LOCALID': str(task),
             'SLURM_STEP_NUM_NODES': '1'}
    procs.append(subprocess.Popen([sys.executable, '-c', snippet], cwd=ROOT,
                                  env={**env(2), **slurm}, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=240)[0] for p in procs]
  for task, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, out[-2000:]
    assert f'joined {task} 2 4' in out
