"""One trainer per workdir, and experiment cells that die with their runner."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ssl_jax import workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLDER = textwrap.dedent('''
    import sys, time
    from ssl_jax import workdir_lock
    with workdir_lock.hold(sys.argv[1], command='holder'):
      print('held', flush=True)
      time.sleep(600)
''')


def start_holder(workdir):
  process = subprocess.Popen([sys.executable, '-c', HOLDER, str(workdir)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline().strip() == 'held'
  return process


def gone(pid):
  """True once pid has exited (a zombie whose parent is gone counts as exited)."""
  try:
    with open(f'/proc/{pid}/status') as f:
      return any(line.startswith('State:') and 'Z' in line.split()[1] for line in f)
  except FileNotFoundError:
    return True


def test_a_second_holder_fails_at_once_naming_the_holder_and_the_fix(tmp_path):
  process = start_holder(tmp_path)
  try:
    assert workdir_lock.holder(str(tmp_path))['pid'] == process.pid
    start = time.monotonic()
    with pytest.raises(workdir_lock.WorkdirLockedError) as error:
      with workdir_lock.hold(str(tmp_path)):
        pass
    assert time.monotonic() - start < 10
    message = str(error.value)
    assert str(tmp_path) in message and f'pid {process.pid}' in message and 'holder' in message
    assert 'another --workdir' in message and 'Wait' in message
    with pytest.raises(workdir_lock.WorkdirLockedError, match='would write into'):
      workdir_lock.refuse_if_training(str(tmp_path), 'ssl_jax.diagnose')
  finally:
    process.kill()
    process.wait()


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_log_line(tmp_path):
  process = start_holder(tmp_path)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert workdir_lock.holder(str(tmp_path)) is None      # the kernel released the flock
  lines = []
  with workdir_lock.hold(str(tmp_path), log=lines.append) as mine:
    assert mine['pid'] == os.getpid()
    assert workdir_lock.holder(str(tmp_path))['pid'] == os.getpid()
    with workdir_lock.hold(str(tmp_path)) as again:     # re-entrant in one process
      assert again is mine
  assert len(lines) == 1 and f'pid {process.pid}' in lines[0] and 'no longer holds it' in lines[0]
  assert workdir_lock.holder(str(tmp_path)) is None
  with workdir_lock.hold(str(tmp_path), log=lines.append):   # a clean exit leaves no record
    pass
  assert len(lines) == 1


def test_the_object_store_fallback_refuses_a_live_heartbeat_and_takes_over_a_stale_one(
    tmp_path, monkeypatch):
  workdir, lines = str(tmp_path), []
  with workdir_lock._hold_object(workdir, lines.append, 'first') as first:
    path = tmp_path / workdir_lock.LOCK_OBJECT
    assert json.loads(path.read_text())['pid'] == first['pid']
    with pytest.raises(workdir_lock.WorkdirLockedError, match='first'):
      with workdir_lock._hold_object(workdir, lines.append, 'second'):
        pass
  assert not path.exists()                               # released on exit
  stale = dict(workdir_lock.record('crashed'), heartbeat=time.time() - 2 *
               workdir_lock.STALE_SECONDS)
  path.write_text(json.dumps(stale))
  with workdir_lock._hold_object(workdir, lines.append, 'third') as third:
    assert third['command'] == 'third'
  assert len(lines) == 1 and 'crashed' in lines[0] and 'heartbeat' in lines[0]
  # The heartbeat keeps a long run's lock fresh.
  monkeypatch.setattr(workdir_lock, 'HEARTBEAT_SECONDS', 0.05)
  with workdir_lock._hold_object(workdir, lines.append, 'beating'):
    written = json.loads(path.read_text())['heartbeat']
    time.sleep(0.5)
    assert json.loads(path.read_text())['heartbeat'] > written


def smoke_command(workdir, *extra):
  return [sys.executable, '-m', 'ssl_jax.main', '--config=configs/vicreg.py:smoke',
          f'--workdir={workdir}', '--config.eval.enabled=false',
          '--config.diagnostics.every_steps=0', '--config.eval.online_every_steps=0', *extra]


def test_two_trainers_on_one_workdir_the_second_fails_fast_the_first_logs_each_step_once(
    tmp_path):
  workdir = tmp_path / 'run'
  first = subprocess.Popen(smoke_command(workdir, '--config.total_steps=40'), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  while workdir_lock.holder(str(workdir)) is None and first.poll() is None:
    assert time.time() < deadline
    time.sleep(0.1)
  started = time.monotonic()
  second = subprocess.run(smoke_command(workdir, '--config.total_steps=40'), cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
  second_seconds = time.monotonic() - started
  output, _ = first.communicate(timeout=600)
  assert first.returncode == 0, output
  assert second.returncode == 1
  assert 'ssl_jax.main: error: The workdir' in second.stderr and 'is in use' in second.stderr
  assert f'pid {first.pid}' in second.stderr and 'Traceback' not in second.stderr
  assert second_seconds < 60   # imports only: it never builds a model or reads data
  steps = [json.loads(line)['step'] for line in (workdir / 'metrics.jsonl').open()]
  assert steps == list(range(1, 41))
  assert 'completed, 40 steps' in output


EXPERIMENT = '''
import ml_collections

def get_config():
  c = ml_collections.ConfigDict()
  c.name = 'lock_test'
  c.description = 'one cell'
  c.shared = ('data.holdout=1000, eval.max_train_examples=64, eval.max_test_examples=32, '
              'total_steps=60, ckpt_every_steps=2, diagnostics.every_steps=0, '
              'eval.online_every_steps=0')
  c.tune_seed = 0
  c.final_seeds = ()
  c.methods = dict(vicreg=dict(config='configs/vicreg.py', trials=['variant=smoke']))
  return c
'''


# Four process starts (runner and cell, a refused second runner, the restart):
# about 70 s of CI, which keeps the two-trainers test above; -m slow runs it.
@pytest.mark.slow
def test_cells_die_with_a_killed_runner_and_a_restarted_runner_resumes_them(tmp_path):
  config = tmp_path / 'lock_test.py'
  config.write_text(EXPERIMENT)
  root, results = tmp_path / 'root', tmp_path / 'results'
  runner_cmd = [sys.executable, '-m', 'ssl_jax.experiments', f'--config={config}',
                f'--root={root}', f'--results={results}', '--readme=']
  runner = subprocess.Popen(runner_cmd, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
  cell = root / 'vicreg__tune0__s0'
  deadline = time.time() + 300
  while not (cell / 'checkpoints' / '4').is_dir():
    assert runner.poll() is None and time.time() < deadline, runner.stdout.read()
    time.sleep(0.2)
  cell_pid = workdir_lock.holder(str(cell))['pid']
  # A second runner on the same root is refused while the first one runs.
  second = subprocess.run(runner_cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert second.returncode == 1 and 'Traceback' not in second.stderr
  assert 'ssl_jax.experiments: error: The workdir' in second.stderr
  assert 'is in use' in second.stderr and 'another --root' in second.stderr

  runner.send_signal(signal.SIGKILL)
  runner.wait()
  # The leader shows 'Z' while its other threads are still being torn down:
  # the cell is gone once its lock, released with its last file, is free too.
  deadline = time.time() + 10
  while not gone(cell_pid) or workdir_lock.holder(str(cell)) is not None:
    assert time.time() < deadline, f'cell {cell_pid} outlived its runner'
    time.sleep(0.1)
  assert not (results / 'lock_test' / 'vicreg__tune0__s0.json').exists()

  again = subprocess.run(runner_cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  log = (cell / 'log.txt').read_text()
  assert 'resuming at step' in log
  result = json.loads((results / 'lock_test' / 'vicreg__tune0__s0.json').read_text())
  assert result['steps'] == 60 and result['status'] == 'completed'
