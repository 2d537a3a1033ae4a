"""SIGKILL at random moments, inside asynchronous saves too: the run recovers exactly."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def crash_loop(tmp_path, kills):
  spec = importlib.util.spec_from_file_location(
      'crash_loop', os.path.join(ROOT, 'benchmarks', 'crash_loop.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  result = module.crash_loop(str(tmp_path), kills=kills, seed=0)
  assert result['kills'] == kills and result['kills_targeting_saves'] == kills // 2
  assert result['params_bit_identical']
  assert result['metrics_steps_ok'] and result['tensorboard_steps_ok']


# CI kills twice, once at a random moment and once inside an asynchronous
# save (each kill is a process start, about 15 s); -m slow kills five times.
def test_two_sigkills_resume_to_the_uninterrupted_parameters_bit_for_bit(tmp_path):
  crash_loop(tmp_path, kills=2)


@pytest.mark.slow
def test_five_sigkills_resume_to_the_uninterrupted_parameters_bit_for_bit(tmp_path):
  crash_loop(tmp_path, kills=5)
