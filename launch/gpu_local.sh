#!/usr/bin/env bash
# Pretrain on the GPUs of this machine (all visible devices, data-parallel).
#
#   launch/gpu_local.sh CONFIG WORKDIR [extra flags...]
#   CUDA_VISIBLE_DEVICES=0,1 launch/gpu_local.sh configs/vicreg_it.py:cifar10 runs/vicreg_it_c10
#
# Needs `pip install -e . 'jax[cuda12]'`. Running it again resumes from WORKDIR.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,8p' "$0"; exit 2
fi
config=$1 workdir=$2
shift 2
# Let XLA take GPU memory as it needs it rather than 75% up front (TF is kept off the GPU).
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
exec python3 -m ssl_jax.main --config="$config" --workdir="$workdir" "$@"
