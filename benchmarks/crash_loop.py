"""Kills a training run with SIGKILL at random moments; checks that it recovers exactly.

  python benchmarks/crash_loop.py --kills 20            # about 4 minutes on 2 CPU cores

A small run (configs/vicreg.py:smoke, a checkpoint after every step, saved
asynchronously) is started, killed with SIGKILL, and started again, `kills`
times; then it runs to the end. Half of the kills land at a random moment
after the run has made progress, half as soon as an asynchronous save has
begun writing (a `*.orbax-checkpoint-tmp*` folder exists). At the end:

- the final parameters equal an uninterrupted run's, bit for bit;
- metrics.jsonl and the TensorBoard events hold every step exactly once.

tests/crash_test.py runs it with 2 kills in CI and 5 under -m slow. Exit status 0 on success.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OVERRIDES = ('--config.ckpt_every_steps=1', '--config.log_every_steps=1',
             '--config.keep_checkpoints=2', '--config.keep_checkpoint_period=0',
             '--config.eval.enabled=false', '--config.eval.online_every_steps=0',
             '--config.diagnostics.every_steps=0')


def command(workdir: str, total_steps: int) -> list[str]:
  return [sys.executable, '-m', 'ssl_jax.main', '--config=configs/vicreg.py:smoke',
          f'--workdir={workdir}', f'--config.total_steps={total_steps}', *OVERRIDES]


def logged_steps(workdir: str) -> int:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(1 for line in f if line.endswith('\n'))


def saving(workdir: str) -> bool:
  return bool(glob.glob(os.path.join(workdir, 'checkpoints', '*orbax-checkpoint-tmp*')))


def kill_once(workdir: str, total_steps: int, mode: str, rng: random.Random, log,
              timeout: float = 300) -> bool:
  """Starts the run and SIGKILLs it in `mode`; False if it finished first."""
  before = logged_steps(workdir)
  process = subprocess.Popen(command(workdir, total_steps), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
  start = time.time()
  while process.poll() is None and time.time() - start < timeout:
    if mode == 'during_save' and logged_steps(workdir) > before and saving(workdir):
      break
    if mode == 'random' and logged_steps(workdir) > before:
      time.sleep(rng.uniform(0.0, 0.5))
      break
    time.sleep(0.005)
  if process.poll() is not None:
    return False
  in_save = saving(workdir)
  os.killpg(process.pid, signal.SIGKILL)
  process.wait()
  log(f'  killed ({mode}) after {time.time() - start:.1f} s at logged step '
      f'{logged_steps(workdir)}{", inside an asynchronous save" if in_save else ""}')
  return True


def final_params(workdir: str) -> list[np.ndarray]:
  import jax
  from absl import logging
  from ssl_jax import checkpointing
  logging.set_verbosity(logging.ERROR)   # Orbax warns that the items come back as raw trees
  manager = checkpointing.make_manager(workdir, max_to_keep=2)
  restored = manager.restore(manager.latest_step())
  manager.close()
  return [np.asarray(x) for x in jax.tree.leaves(restored['state']['params'])]


def tensorboard_steps(workdir: str, tag: str = 'loss') -> list[int]:
  import tensorflow as tf
  tb = os.path.join(workdir, 'tensorboard')
  steps = []
  for name in sorted(os.listdir(tb)):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(tb, name)):
      steps += [event.step for v in event.summary.value if v.tag == tag]
  return sorted(steps)


def crash_loop(root: str, kills: int, seed: int = 0, log=print) -> dict:
  """Runs the loop in root/{reference,killed}; returns what it found (raises on failure)."""
  rng = random.Random(seed)
  total_steps = 10 * kills + 20
  reference, killed = os.path.join(root, 'reference'), os.path.join(root, 'killed')
  for d in (reference, killed):
    shutil.rmtree(d, ignore_errors=True)
  log(f'crash_loop: {kills} kills, {total_steps} steps; uninterrupted reference first')
  subprocess.run(command(reference, total_steps), cwd=ROOT, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  done, inside_save = 0, 0
  while done < kills:
    mode = 'during_save' if done % 2 else 'random'
    if not kill_once(killed, total_steps, mode, rng, log):
      raise RuntimeError(f'The run finished after {done} kills; raise total_steps.')
    done += 1
    inside_save += mode == 'during_save'
  log('  final restart, to the end')
  subprocess.run(command(killed, total_steps), cwd=ROOT, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  a, b = final_params(reference), final_params(killed)
  identical = len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
  with open(os.path.join(killed, 'metrics.jsonl')) as f:
    rows = [json.loads(line)['step'] for line in f]
  events = tensorboard_steps(killed)
  expected = list(range(1, total_steps + 1))
  result = {'kills': done, 'kills_targeting_saves': inside_save, 'total_steps': total_steps,
            'params_bit_identical': identical, 'metrics_steps_ok': rows == expected,
            'tensorboard_steps_ok': events == expected}
  log(f'crash_loop: {json.dumps(result)}')
  if not (identical and rows == expected and events == expected):
    raise AssertionError(f'crash_loop failed: {result}; metrics steps {rows}, events {events}')
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--kills', type=int, default=20)
  parser.add_argument('--root', default='/tmp/ssl_jax_crash_loop')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  start = time.time()
  crash_loop(args.root, args.kills, args.seed)
  print(f'crash_loop: passed in {time.time() - start:.0f} s')


if __name__ == '__main__':
  main()
