"""SimCLR (Chen et al. 2020): NT-Xent, temperature 0.2.

Usage (variants and overrides: see configs/common.py):
  python -m ssl_jax.main --config=configs/simclr.py --workdir=runs/simclr
  python -m ssl_jax.main --config=configs/simclr.py:cifar10 --workdir=runs/simclr_cifar10
"""

from configs import common


def get_config(arg=None):
  return common.get_config('simclr', arg)
