"""VICReg + PairDist: invariance - w * pairwise-distance entropy of the mixture.

KL upper bound by default; `:lower` for the Bhattacharyya lower bound.

Usage (variants and overrides: see configs/common.py):
  python -m ssl_jax.main --config=configs/vicreg_pairdist.py --workdir=runs/vicreg_pairdist
  python -m ssl_jax.main --config=configs/vicreg_pairdist.py:cifar10 --workdir=runs/vicreg_pairdist_cifar10
"""

from configs import common


def get_config(arg=None):
  return common.get_config('vicreg_pairdist', arg)
