"""SIGKILL at random moments, inside asynchronous saves too: the run recovers exactly."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_five_sigkills_resume_to_the_uninterrupted_parameters_bit_for_bit(tmp_path):
  spec = importlib.util.spec_from_file_location(
      'crash_loop', os.path.join(ROOT, 'benchmarks', 'crash_loop.py'))
  crash_loop = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(crash_loop)
  result = crash_loop.crash_loop(str(tmp_path), kills=5, seed=0)
  assert result['kills'] == 5 and result['kills_targeting_saves'] == 2
  assert result['params_bit_identical']
  assert result['metrics_steps_ok'] and result['tensorboard_steps_ok']
