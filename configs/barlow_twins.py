"""Barlow Twins (Zbontar et al. 2021): lambda 0.0051, scale 0.1.

Usage (variants and overrides: see configs/common.py):
  python -m ssl_jax.main --config=configs/barlow_twins.py --workdir=runs/barlow_twins
  python -m ssl_jax.main --config=configs/barlow_twins.py:cifar10 --workdir=runs/barlow_twins_cifar10
"""

from configs import common


def get_config(arg=None):
  return common.get_config('barlow_twins', arg)
