"""BYOL (Grill et al. 2020): normalised regression of an EMA target.

Usage (variants and overrides: see configs/common.py):
  python -m ssl_jax.main --config=configs/byol.py --workdir=runs/byol
  python -m ssl_jax.main --config=configs/byol.py:cifar10 --workdir=runs/byol_cifar10
"""

from configs import common


def get_config(arg=None):
  return common.get_config('byol', arg)
