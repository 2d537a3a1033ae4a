"""Command lines: every config field overridable, one-line errors, --dry_run."""

import importlib
import os
import subprocess
import sys

import pytest
from ml_collections import config_dict

from configs import common
from ssl_jax import cli
from ssl_jax import grid
from ssl_jax import input_pipeline
from ssl_jax import main as main_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def every_config():
  """(config file argument, ConfigDict) for every method and every variant it accepts."""
  out = []
  for method in sorted(common.RECIPES):
    for variant in (None,) + common.VARIANTS + ('cifar10,smoke', 'imagenet,add'):
      try:
        config = common.get_config(method, variant)
      except ValueError:
        continue   # e.g. 'lower' on a method without the pairwise entropy
      out.append((f'configs/{method}.py' + (f':{variant}' if variant else ''), config))
  return out


def leaves(config, prefix=''):
  for key in config.keys():
    value = config[key]
    if isinstance(value, config_dict.ConfigDict):
      yield from leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', config.get_type(key), value


def other_value(kind, value):
  """A value of the leaf's type that differs from its default."""
  if kind is bool:
    return not value
  if kind is int:
    return 7 if value is None else value + 3
  if kind is float:
    return 0.25 if value is None else value + 0.5
  if kind is str:
    return 'elsewhere' if value is None else value + '_x'
  if kind is tuple:
    if value is None:
      return (0.3, 0.9)
    return tuple(v + 1 for v in value)
  raise AssertionError(f'a config leaf of type {kind} that the command line cannot set')


def flag_text(value):
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if isinstance(value, tuple):
    return '(' + ', '.join(repr(v) for v in value) + ')'
  return str(value)


def test_every_config_leaf_is_overridable_from_the_command_line():
  """Through config_flags itself, as `python -m ssl_jax.main` parses it."""
  configs = every_config()
  assert len(configs) >= 50
  none_leaves = 0
  for argument, config in configs:
    expected, argv = {}, ['ssl_jax.main', f'--config={argument}']
    for path, kind, value in leaves(config):
      none_leaves += value is None
      expected[path] = other_value(kind, value)
      argv.append(f'--config.{path}={flag_text(expected[path])}')
    parsed = cli.parse_command(main_lib.define_flags, argv).config.value
    for path, value in expected.items():
      got = parsed
      for part in path.split('.'):
        got = got[part]
      assert got == value, f'{argument}: --config.{path} gave {got!r}, expected {value!r}'
  assert none_leaves > 0   # the typed placeholders (data_dir, image_size, aug.*) are covered


@pytest.mark.parametrize('override, key, suggestion', [
    ('--config.optim.lr=1', 'optim.lr', 'optim.base_lr'),
    ('--config.nonexistent=3', 'nonexistent', None),
    ('--config.model.encoder.chanels=8', 'model.encoder.channels', None),
])
def test_a_mistyped_override_is_one_line_naming_the_key_and_the_closest_ones(
    override, key, suggestion):
  with pytest.raises(cli.CommandLineError) as error:
    cli.parse_command(main_lib.define_flags,
                      ['ssl_jax.main', '--config=configs/vicreg_it.py', override])
  message = str(error.value)
  assert '\n' not in message and override.split('=')[0] in message
  if suggestion:
    assert f'closest valid keys: {suggestion}' in message
  if key == 'model.encoder.channels':
    assert "'model.encoder.chanels'" in message and 'model.encoder.channels' in message


def test_the_command_line_prints_one_line_and_exits_2_on_a_bad_override():
  done = subprocess.run([sys.executable, '-m', 'ssl_jax.main', '--config=configs/vicreg_it.py',
                         '--config.optim.lr=1'], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 2
  lines = [line for line in done.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and 'optim.base_lr' in lines[0], done.stderr
  assert 'oneDNN' not in done.stderr and 'Traceback' not in done.stderr


def test_dry_run_validates_prints_and_writes_nothing(tmp_path, capsys):
  workdir = tmp_path / 'never_created'
  argv = ['ssl_jax.main', '--config=configs/byol.py', f'--workdir={workdir}', '--dry_run',
          '--config.aug.view_a.blur_prob=0.5', '--config.data.image_size=28']
  summary = main_lib.dry_run(cli.parse_command(main_lib.define_flags, argv))
  assert not workdir.exists()
  assert summary['method'] == 'byol' and summary['ema_target'] and summary['predictor']
  assert summary['parameters'] > 1_000_000 and summary['total_steps'] == 305
  out = capsys.readouterr().out
  assert 'ssl_jax dry run: byol on fashion_mnist' in out and 'Nothing was run or written' in out


def test_dry_run_of_a_pod_config_needs_no_dataset_and_ends_in_not_prepared(tmp_path, capsys):
  data_dir = tmp_path / 'tfds'
  argv = ['ssl_jax.main', '--config=configs/vicreg_it.py:imagenet', '--dry_run',
          f'--workdir={tmp_path / "run"}', f'--config.data.data_dir={data_dir}']
  with pytest.raises(input_pipeline.DatasetNotPreparedError, match=f'not prepared.*{data_dir}'):
    main_lib.dry_run(cli.parse_command(main_lib.define_flags, argv))
  out = capsys.readouterr().out
  assert 'resnet50' in out and '174,552,128 parameters' in out and 'bfloat16' in out
  assert not data_dir.exists() and not (tmp_path / 'run').exists()


def test_dry_run_counts_the_processes_of_the_command_line(capsys):
  argv = ['ssl_jax.main', '--config=configs/vicreg_it.py', '--dry_run', '--num_processes=2',
          '--process_id=1', '--coordinator=10.0.0.1:1234']
  summary = main_lib.dry_run(cli.parse_command(main_lib.define_flags, argv))
  assert summary['processes'] == 2
  bad = argv + ['--config.data.batch_size=255']
  with pytest.raises(ValueError, match='multiple of the device count'):
    main_lib.dry_run(cli.parse_command(main_lib.define_flags, bad))


def test_a_dataset_that_is_not_prepared_is_one_line_and_the_workdir_stays_empty(tmp_path):
  workdir = tmp_path / 'run'
  done = subprocess.run([sys.executable, '-m', 'ssl_jax.main',
                         '--config=configs/vicreg_it.py:cifar10,smoke',
                         f'--config.data.data_dir={tmp_path / "tfds"}', f'--workdir={workdir}'],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1, done.stderr
  lines = [line for line in done.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and 'is not prepared' in lines[0] and str(tmp_path / 'tfds') in lines[0]
  assert 'Traceback' not in done.stderr
  # Nothing but the lock file: no config.json, checkpoints or events of a run that never ran.
  assert sorted(p.name for p in workdir.iterdir()) == ['.lock']


@pytest.mark.parametrize('override, message', [
    ('--config.optim.base_lr=-1', 'optim.base_lr must be > 0, got -1.0.'),
    ('--config.model.encoder.channels=32-64', 'channels needs 4 widths, got (32, 64).')])
def test_a_bad_config_value_is_one_line_and_the_workdir_stays_empty(tmp_path, override, message):
  # Values that only building the run can check (the optimiser, the encoder):
  # before, each ended in a traceback after the message.
  workdir = tmp_path / 'run'
  done = subprocess.run([sys.executable, '-m', 'ssl_jax.main', '--config=configs/vicreg_it.py:smoke',
                         override, f'--workdir={workdir}'],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1, done.stderr
  lines = [line for line in done.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith('ssl_jax.main: error: '), done.stderr
  assert message in lines[0] and '--dry_run' in lines[0]
  assert sorted(p.name for p in workdir.iterdir()) == ['.lock']


def test_a_diverged_run_and_a_restart_with_another_config_are_one_line_each(tmp_path):
  workdir = tmp_path / 'run'
  done = subprocess.run([sys.executable, '-m', 'ssl_jax.main', '--config=configs/vicreg_it.py:smoke',
                         '--config.optim.base_lr=1e30', f'--workdir={workdir}'],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1, done.stderr
  # stderr also carries the progress bar; the error is its last line, with no traceback.
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith(grid.DIVERGED_LINE) and 'Traceback' not in done.stderr, done.stderr
  assert 'Lower optim.base_lr' in last
  cell = grid.Cell(method='vicreg_it', stage='tune', trial=0, seed=0,
                   config_file='configs/vicreg_it.py', overrides=())
  result = grid.diverged_result(cell, done.stdout + done.stderr, 1.0, 'abc', 'def')
  assert result is not None and result['status'] == 'diverged'
  assert result['error'] == last
  # The workdir keeps the last good checkpoint; another config must not resume from it.
  again = subprocess.run([sys.executable, '-m', 'ssl_jax.main', '--config=configs/vicreg_it.py:smoke',
                          '--config.model.projector=64-64', f'--workdir={workdir}'],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert again.returncode == 1, again.stderr
  last = again.stderr.strip().splitlines()[-1]
  assert 'Traceback' not in again.stderr, again.stderr
  assert last.startswith('ssl_jax.main: error: The checkpoint in') and 'incompatible config' in last
  assert "'projector': '64-64'" in last and 'Use a new --workdir' in last


@pytest.mark.parametrize('program, extra', [('export', ['--out=features.safetensors']),
                                             ('embed', ['--out=features.npz']), ('diagnose', [])])
def test_a_command_on_a_folder_without_a_run_ends_in_one_line(tmp_path, capsys, program, extra):
  module = importlib.import_module(f'ssl_jax.{program}')
  argv = [program, f'--workdir={tmp_path / "nothing"}'] + extra
  with pytest.raises(SystemExit) as stopped:
    module.main([program], cli.parse_command(module.define_flags, argv))
  assert stopped.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith(f'ssl_jax.{program}: error: ') and err.count('\n') == 1, err
  assert 'config.json not found: --workdir must be a training workdir' in err


@pytest.mark.parametrize('flag, status, message', [
    ('--shard=0/1', 1, 'does not exist in'), ('--shard=3/2', 2, '--shard=3/2: need 0 <= i < k.')])
def test_an_experiment_that_cannot_run_here_ends_in_one_line(tmp_path, monkeypatch, capsys,
                                                              flag, status, message):
  from ssl_jax import experiments
  monkeypatch.chdir(tmp_path)   # its method configs are relative to the repository root
  argv = ['experiments', f'--config={ROOT}/configs/experiments/fmnist_compare_long.py',
          f'--root={tmp_path / "runs"}', flag]
  with pytest.raises(SystemExit) as stopped:
    experiments.main(['experiments'], cli.parse_command(experiments.define_flags, argv))
  assert stopped.value.code == status
  err = capsys.readouterr().err
  assert err.startswith('ssl_jax.experiments: error: ') and err.count('\n') == 1, err
  assert message in err
  if status == 1:
    assert "'configs/" in err and 'run from the repository root' in err
  assert not (tmp_path / 'runs').exists()


def test_a_command_ends_on_bad_input_with_one_line_and_the_status_asked(capsys):
  with pytest.raises(SystemExit) as stopped:
    cli.exit_with_error('ssl_jax.main', FileNotFoundError('no dataset in /data'))
  assert stopped.value.code == 1
  assert capsys.readouterr().err == 'ssl_jax.main: error: no dataset in /data\n'
  with pytest.raises(SystemExit) as stopped:
    cli.exit_with_error('ssl_jax.experiments', 'bad flag', 2)
  assert stopped.value.code == 2


@pytest.mark.parametrize('threshold, stored', [(None, True), ('3600', False)])
def test_the_compilation_cache_stores_small_programs_unless_a_threshold_is_set(
    tmp_path, threshold, stored):
  # A program compiling in milliseconds is stored (a second run reads it back);
  # the user's JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS still wins.
  env = {k: v for k, v in os.environ.items()
         if k not in ('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', 'SSL_JAX_CACHE_DIR')}
  env['JAX_COMPILATION_CACHE_DIR'] = str(tmp_path / 'jax')
  if threshold is not None:
    env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = threshold
  code = ('from ssl_jax import main; main.enable_compilation_cache(); import jax; '
          'jax.block_until_ready(jax.jit(lambda x: x * 3 + 1)(2.0))')
  subprocess.run([sys.executable, '-c', code], env=env, check=True, timeout=120)
  entries = os.listdir(tmp_path / 'jax') if (tmp_path / 'jax').exists() else []
  assert bool([e for e in entries if 'lambda' in e]) == stored, entries
