#!/usr/bin/env bash
# Pretrain on a Cloud TPU pod slice, start to finish, through preemptions.
#
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR CONFIG WORKDIR [extra flags...]
#   launch/tpu_pod.sh vicreg-v4 us-central2-b v4-64 configs/vicreg_it.py:imagenet \
#       gs://bucket/runs/vicreg_it --config.data.data_dir=gs://bucket/tfds
#
# 1. Creates the slice as a queued resource NAME (or reuses it if it exists),
#    waits until it is ACTIVE. SPOT=1 asks for spot capacity.
# 2. Installs the project on every worker: clones REPO (default: this checkout's
#    origin) at REF (default: this checkout's commit) and runs pip install.
# 3. Runs `python3 -m ssl_jax.main` on every worker (jax.distributed is detected
#    on TPU VMs). WORKDIR must be on GCS so that all hosts share it.
# 4. If the slice is preempted (state SUSPENDED/FAILED, or the run dies), deletes
#    and recreates the queued resource and goes back to 2: the run resumes from
#    its newest checkpoint in WORKDIR. Stops when WORKDIR/summary.json says
#    "completed", or after MAX_ATTEMPTS (default 20).
# Needs gcloud, authenticated, with the TPU API enabled.
set -euo pipefail
if [[ $# -lt 5 ]]; then
  sed -n '2,19p' "$0"; exit 2
fi
name=$1 zone=$2 accelerator=$3 config=$4 workdir=$5
shift 5
extra=$(printf ' %q' "$@")
runtime=${RUNTIME:-tpu-ubuntu2204-base}
repo=${REPO:-$(git config --get remote.origin.url)}
ref=${REF:-$(git rev-parse HEAD)}
max_attempts=${MAX_ATTEMPTS:-20}
tpu=(gcloud compute tpus)

state() {
  "${tpu[@]}" queued-resources describe "$name" --zone "$zone" --format='value(state.state)' \
    2>/dev/null || echo MISSING
}

create() {
  echo "tpu_pod: creating queued resource $name ($accelerator, $zone)"
  "${tpu[@]}" queued-resources create "$name" --node-id "$name" --zone "$zone" \
    --accelerator-type "$accelerator" --runtime-version "$runtime" \
    ${SPOT:+--spot}
}

wait_active() {
  while true; do
    s=$(state)
    case "$s" in
      ACTIVE) return 0 ;;
      FAILED|SUSPENDED|MISSING) return 1 ;;
      *) echo "tpu_pod: $name is $s; waiting"; sleep 60 ;;
    esac
  done
}

recreate() {
  "${tpu[@]}" queued-resources delete "$name" --zone "$zone" --force --quiet || true
  create
}

on_all() {
  "${tpu[@]}" tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"
}

completed() {
  gsutil cat "$workdir/summary.json" 2>/dev/null | grep -q '"status": "completed"'
}

[[ $(state) == MISSING ]] && create
for attempt in $(seq 1 "$max_attempts"); do
  if ! wait_active; then
    echo "tpu_pod: $name is $(state): recreating it (attempt $attempt)"
    recreate
    continue
  fi
  on_all "set -e; if [ -d ssl_jax ]; then cd ssl_jax && git fetch -q origin; \
    else git clone -q $repo ssl_jax && cd ssl_jax; fi; git checkout -q $ref; \
    pip install -q -e . 'jax[tpu]'" || { echo 'tpu_pod: install failed'; continue; }
  if on_all "cd ssl_jax && python3 -m ssl_jax.main --config=$config --workdir=$workdir$extra"; then
    completed && { echo "tpu_pod: $workdir completed"; exit 0; }
  fi
  if completed; then echo "tpu_pod: $workdir completed"; exit 0; fi
  echo "tpu_pod: the run stopped before the end (slice state $(state)); resuming (attempt $attempt)"
  [[ $(state) != ACTIVE ]] && recreate
done
echo "tpu_pod: not completed after $max_attempts attempts" >&2
exit 1
