#!/usr/bin/env bash
# Pretrain on a Cloud TPU pod slice: every worker runs the same command.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [extra flags...]
#   launch/tpu_pod.sh my-v4-64 us-central2-b configs/vicreg_it.py:imagenet gs://bucket/runs/x \
#       --config.data.data_dir=gs://bucket/tfds
#
# The repository must already be on every worker (e.g. `--worker=all --command "git clone ..."`),
# with `pip install -e . 'jax[tpu]'`. WORKDIR should be on GCS so that all hosts share it.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  sed -n '2,10p' "$0"; exit 2
fi
name=$1 zone=$2 config=$3 workdir=$4
shift 4
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command \
  "cd ~/ssl_jax && python3 -m ssl_jax.main --config=$config --workdir=$workdir $*"
