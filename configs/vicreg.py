"""VICReg (Bardes et al. 2022): 25 invariance + 25 variance + 1 covariance.

Usage (variants and overrides: see configs/common.py):
  python -m ssl_jax.main --config=configs/vicreg.py --workdir=runs/vicreg
  python -m ssl_jax.main --config=configs/vicreg.py:cifar10 --workdir=runs/vicreg_cifar10
"""

from configs import common


def get_config(arg=None):
  return common.get_config('vicreg', arg)
