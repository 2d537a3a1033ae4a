"""VICReg + LogDet (VICReg-IT): invariance - w * 0.5 log det(I + beta C).

The entropy term replaces variance + covariance; `:add` keeps them.

Usage (variants and overrides: see configs/common.py):
  python -m ssl_jax.main --config=configs/vicreg_it.py --workdir=runs/vicreg_it
  python -m ssl_jax.main --config=configs/vicreg_it.py:cifar10 --workdir=runs/vicreg_it_cifar10
"""

from configs import common


def get_config(arg=None):
  return common.get_config('vicreg_it', arg)
