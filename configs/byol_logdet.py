"""BYOL + LogDet: BYOL loss - w * log-det entropy of the online projection.

Set loss.terms.logdet_entropy.inputs=p for the predictor output instead.

Usage (variants and overrides: see configs/common.py):
  python -m ssl_jax.main --config=configs/byol_logdet.py --workdir=runs/byol_logdet
  python -m ssl_jax.main --config=configs/byol_logdet.py:cifar10 --workdir=runs/byol_logdet_cifar10
"""

from configs import common


def get_config(arg=None):
  return common.get_config('byol_logdet', arg)
