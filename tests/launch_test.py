"""launch/tpu_pod.sh through preemptions, against a fake gcloud and gsutil.

The fake `gcloud` keeps the queued resource's state in a file and logs every
call; `tpu-vm ssh` of the training command plays the next scripted outcome:
`preempt` (the slice goes SUSPENDED and ssh fails, as when a spot slice is
reclaimed mid-run), `crash` (the run dies, the slice stays ACTIVE) or
`complete` (the run writes a completed summary.json). No cloud is touched.
"""

import os
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'launch', 'tpu_pod.sh')

FAKE_GCLOUD = r'''#!/usr/bin/env bash
# fake gcloud compute tpus ...: state in $FAKE/state, calls logged to $FAKE/log
args="$*"
case "$args" in
  *"queued-resources describe"*)
    if [[ -f $FAKE/state ]]; then cat "$FAKE/state"; else exit 1; fi ;;
  *"queued-resources create"*)
    echo "create $args" >> "$FAKE/log"; echo ACTIVE > "$FAKE/state" ;;
  *"queued-resources delete"*)
    echo "delete" >> "$FAKE/log"; rm -f "$FAKE/state" ;;
  *"tpu-vm ssh"*)
    command="${args#*--command }"
    if [[ $command == *"ssl_jax.main"* ]]; then
      echo "train $command" >> "$FAKE/log"
      outcome=$(head -n 1 "$FAKE/outcomes"); sed -i 1d "$FAKE/outcomes"
      case "$outcome" in
        preempt) echo SUSPENDED > "$FAKE/state"; exit 255 ;;
        crash) exit 1 ;;
        complete) echo '{"status": "completed"}' > "$FAKE/summary.json"; exit 0 ;;
      esac
    else
      echo "install" >> "$FAKE/log"
    fi ;;
  *) echo "unexpected gcloud call: $args" >&2; exit 3 ;;
esac
'''

FAKE_GSUTIL = r'''#!/usr/bin/env bash
# fake gsutil cat gs://.../summary.json
[[ $1 == cat && -f $FAKE/summary.json ]] && cat "$FAKE/summary.json"
'''


def run_pod(tmp_path, outcomes, max_attempts=5):
  fake = tmp_path / 'fake'
  bin_dir = fake / 'bin'
  bin_dir.mkdir(parents=True)
  for name, text in (('gcloud', FAKE_GCLOUD), ('gsutil', FAKE_GSUTIL)):
    path = bin_dir / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
  (fake / 'outcomes').write_text(''.join(f'{o}\n' for o in outcomes))
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', FAKE=str(fake),
             REPO='https://example.invalid/ssl_jax.git', REF='abc123',
             MAX_ATTEMPTS=str(max_attempts))
  done = subprocess.run(
      ['bash', SCRIPT, 'pod', 'us-central2-b', 'v4-64', 'configs/vicreg_it.py:imagenet',
       'gs://bucket/run', '--config.data.data_dir=gs://bucket/tfds', '--config.seed=3'],
      env=env, capture_output=True, text=True, timeout=60)
  log = (fake / 'log').read_text().splitlines() if (fake / 'log').exists() else []
  return done, log


def test_a_preempted_slice_is_recreated_and_the_run_resumes_until_completed(tmp_path):
  done, log = run_pod(tmp_path, ['preempt', 'crash', 'complete'])
  assert done.returncode == 0, done.stdout + done.stderr
  assert 'tpu_pod: gs://bucket/run completed' in done.stdout
  assert [line.split()[0] for line in log] == [
      'create', 'install', 'train',             # first attempt: preempted mid-run
      'delete', 'create', 'install', 'train',   # the slice is recreated; the run dies
      'install', 'train']                       # slice still ACTIVE: no recreate; completes
  create = log[0]
  assert '--accelerator-type v4-64' in create and '--zone us-central2-b' in create
  # Every attempt runs the same command in the same workdir, so it resumes
  # from the newest checkpoint there; extra flags are passed on.
  trains = [line for line in log if line.startswith('train')]
  assert len(set(trains)) == 1
  assert ('python3 -m ssl_jax.main --config=configs/vicreg_it.py:imagenet '
          '--workdir=gs://bucket/run --config.data.data_dir=gs://bucket/tfds '
          '--config.seed=3') in trains[0]


def test_it_gives_up_after_max_attempts(tmp_path):
  done, log = run_pod(tmp_path, ['preempt'] * 5, max_attempts=2)
  assert done.returncode == 1
  assert 'not completed after 2 attempts' in done.stderr
  assert sum(line.startswith('train') for line in log) == 2


def test_missing_arguments_print_the_usage():
  done = subprocess.run(['bash', SCRIPT, 'pod'], capture_output=True, text=True, timeout=60)
  assert done.returncode == 2
  assert 'launch/tpu_pod.sh NAME ZONE ACCELERATOR CONFIG WORKDIR' in done.stdout


@pytest.mark.parametrize('script', ['tpu_pod.sh', 'gpu_local.sh'])
def test_launch_scripts_parse(script):
  done = subprocess.run(['bash', '-n', os.path.join(ROOT, 'launch', script)],
                        capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr
