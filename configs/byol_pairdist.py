"""BYOL + PairDist: BYOL loss - w * pairwise-distance entropy.

Set loss.terms.pairwise_entropy.inputs=p for the predictor output instead.

Usage (variants and overrides: see configs/common.py):
  python -m ssl_jax.main --config=configs/byol_pairdist.py --workdir=runs/byol_pairdist
  python -m ssl_jax.main --config=configs/byol_pairdist.py:cifar10 --workdir=runs/byol_pairdist_cifar10
"""

from configs import common


def get_config(arg=None):
  return common.get_config('byol_pairdist', arg)
