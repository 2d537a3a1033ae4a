"""ssl_jax: information-theoretic self-supervised learning (VICReg-IT) in JAX."""

__version__ = '0.1.0'
