"""Every documented command line runs: README.md, docs/ and launch/, through --dry_run.

Commands are collected from the text, so a command added to the README is
covered without touching this test:
- every `python -m ssl_jax.<module> ...` with arguments, in a code block or
  inline code, with backslash continuations joined;
- the usage examples in the headers of launch/*, run through the script
  itself with fakes of srun and gcloud, so that the command the script builds
  is what runs (with --dry_run added).

Placeholders map to temporary paths: a gs:// path or data_dir to an empty
folder (so datasets ssl_jax cannot download end in the "not prepared" error),
a workdir read by embed/diagnose/export to a small run made here, an output
to a temporary file. Commands that need data must end in that error; every
other command must exit cleanly.
"""

import glob
import os
import re
import shlex
import stat
import subprocess
import sys

import pytest

from ssl_jax import cli
from ssl_jax import input_pipeline
from ssl_jax.datasets import image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ['README.md'] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs', '**', '*.md'),
                                                recursive=True))
READERS = ('ssl_jax.embed', 'ssl_jax.diagnose', 'ssl_jax.export')
_COMMAND = re.compile(r'python3? -m (ssl_jax\.[a-z_]+)((?:[ \t]+[^\s`|&;#]+)*)')


def documented_commands(text):
  """(module, argv) of every `python -m ssl_jax.X args...` in a Markdown text."""
  text = re.sub(r'\\\n\s*', ' ', text)            # join continued lines
  out = []
  for match in _COMMAND.finditer(text):
    args = shlex.split(match.group(2))
    if args:                                     # a bare module name is prose, not a command
      out.append((match.group(1), args))
  return out


def all_documented():
  commands = []
  for name in DOCUMENTS:
    with open(os.path.join(ROOT, name)) as f:
      for module, args in documented_commands(f.read()):
        commands.append(pytest.param(module, args, id=f'{name}: {module} {" ".join(args)}'[:150]))
  return commands


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """A workdir with a config and a checkpoint (of the initial state: no training)."""
  import importlib
  from ssl_jax import checkpointing, runs, sharding
  workdir = str(tmp_path_factory.mktemp('documented_run'))
  config = importlib.import_module('configs.vicreg_it').get_config('smoke')
  run = runs.build(config, sharding.make_mesh())
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  manager = checkpointing.make_manager(workdir, max_to_keep=1, async_save=False)
  checkpointing.save(manager, run.state, config, force=True)
  manager.close()
  return workdir


def placeholders(module, args, tmp, finished_run):
  """args with every path a reader needs or a writer would write mapped into tmp."""
  out = []
  for arg in args:
    key, eq, value = arg.partition('=')
    if not eq:
      out.append(arg)
      continue
    if value.startswith('gs://') or key == '--config.data.data_dir' or value == 'DIR':
      value = os.path.join(tmp, re.sub(r'\W', '_', value))
    if key == '--workdir':
      value = finished_run if module in READERS else os.path.join(tmp, 'new_run')
    if key in ('--out', '--root'):
      value = os.path.join(tmp, os.path.basename(value))
    out.append(f'{key}={value}')
  # `--flag value` pairs (embed's documented form) are normalised to --flag=value first.
  return out


def normalise(args):
  """['--workdir', 'x'] -> ['--workdir=x'] for string flags written with a space."""
  out, i = [], 0
  while i < len(args):
    arg = args[i]
    if (arg.startswith('--') and '=' not in arg and i + 1 < len(args)
        and not args[i + 1].startswith('-')):
      out.append(f'{arg}={args[i + 1]}')
      i += 2
    else:
      out.append(arg)
      i += 1
  return out


def dry_run(module_name, argv):
  import importlib
  module = importlib.import_module(module_name)
  holders = cli.parse_command(module.define_flags, [module_name] + argv + ['--dry_run'])
  return module.dry_run(holders)


def test_the_documents_hold_commands():
  assert len(all_documented()) >= 10


@pytest.mark.parametrize('module, args', all_documented())
def test_documented_command_runs(module, args, tmp_path, finished_run):
  if module == 'ssl_jax.allocator':   # no flags: it only reports the allocator
    done = subprocess.run([sys.executable, '-m', module] + args, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return
  argv = placeholders(module, normalise(args), str(tmp_path), finished_run)
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    dry_run(module, argv)
  except input_pipeline.DatasetNotPreparedError as error:
    # Only the datasets ssl_jax cannot download may be missing.
    assert re.match(r"Dataset '(cifar10|cifar100|stl10|imagenet2012)'", str(error)), error
  except image_folder.ImageFolderError as error:
    # The user's own images: a placeholder folder, which does not exist here.
    assert 'does not exist' in str(error) and str(tmp_path) in str(error), error
  finally:
    os.chdir(cwd)
  assert not os.path.exists(os.path.join(str(tmp_path), 'new_run'))


# ---------------------------------------------------------------- launch/

FAKE_SRUN = r'''#!/usr/bin/env bash
# fake srun: runs the command as 2 tasks of one node, each with SLURM's variables
while [[ $1 == --* ]]; do shift; done
status=0
for task in 0 1; do
  SLURM_JOB_ID=4242 SLURM_NTASKS=2 SLURM_PROCID=$task SLURM_LOCALID=$task \
    SLURM_STEP_NODELIST=127.0.0.1 SLURM_STEP_NUM_NODES=1 "$@" || status=$?
done
exit $status
'''

FAKE_GCLOUD = r'''#!/usr/bin/env bash
# fake gcloud: an ACTIVE slice; `tpu-vm ssh --command C` runs C here with gs:// mapped
args="$*"
case "$args" in
  *"queued-resources describe"*) echo ACTIVE ;;
  *"tpu-vm ssh"*)
    command="${args#*--command }"
    if [[ $command == *"ssl_jax.main"* ]]; then
      command="${command#cd ssl_jax && }"
      command="${command//gs:\/\//$FAKE/gs/}"
      cd "$ROOT" && TPU_WORKER_HOSTNAMES=localhost eval "$command"
    fi ;;
esac
'''


def usage_examples(script):
  """The `#   launch/...` and `#   sbatch ...` lines of a script's header, joined."""
  with open(os.path.join(ROOT, 'launch', script)) as f:
    header = [line[1:].strip() for line in f if line.startswith('#')]
  text = re.sub(r'\\\s*\n\s*', ' ', '\n'.join(header))
  # Synopsis lines ("launch/x.sh CONFIG WORKDIR [extra flags...]") are not examples.
  return [shlex.split(line) for line in text.splitlines()
          if line.startswith(('launch/', 'sbatch ', 'CUDA_VISIBLE_DEVICES=', 'SPOT='))
          and '[' not in line and not re.search(r'\b[A-Z]{4,}\b(?!=)', line)]


def local_path(arg, tmp):
  """A gs:// or /shared/ path (alone or as a flag's value) mapped into tmp."""
  key, eq, value = arg.rpartition('=') if arg.startswith('--') else ('', '', arg)
  if value.startswith(('gs://', '/shared/')):
    value = os.path.join(tmp, re.sub(r'\W', '_', value))
  return f'{key}{eq}{value}'


def fakes(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name, text in (('srun', FAKE_SRUN), ('gcloud', FAKE_GCLOUD)):
    path = bin_dir / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', FAKE=str(tmp_path),
              ROOT=ROOT, REPO='https://example.invalid/ssl_jax.git', REF='abc123',
              MAX_ATTEMPTS='1', XLA_FLAGS='--xla_force_host_platform_device_count=2')


@pytest.mark.parametrize('script', ['slurm.sbatch', 'tpu_pod.sh', 'gpu_local.sh'])
def test_launch_usage_examples_run_their_command_through_dry_run(script, tmp_path):
  examples = usage_examples(script)
  assert examples, f'launch/{script} documents no usage example'
  env = fakes(tmp_path)
  for example in examples:
    while '=' in example[0] and not example[0].startswith('-'):   # VAR=value prefixes
      name, value = example.pop(0).split('=', 1)
      env[name] = value
    if example[0] == 'sbatch':
      example = example[1:]
      while example[0].startswith('--'):   # sbatch's own options, before the script
        example = example[1:]
    args = [local_path(a, str(tmp_path)) for a in example[1:]]
    done = subprocess.run(['bash', os.path.join(ROOT, example[0])] + args + ['--dry_run'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert 'Flags parsing error' not in output and 'Traceback' not in output, output
    runs = output.count('Nothing was run or written')
    assert runs == (2 if script == 'slurm.sbatch' else 1), output
    if ':imagenet' in ' '.join(args) or ':cifar' in ' '.join(args):
      assert 'is not prepared in the TFDS data dir' in output, output
    else:
      assert done.returncode == 0, output
    if script == 'slurm.sbatch':
      assert '2 process(es)' in output   # SLURM's two tasks are counted
