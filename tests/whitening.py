"""Samples whose covariance is known exactly: the closed-form cases of the estimator tests."""

import math

import numpy as np


def whitened(n: int, d: int, std: float = 1.0, seed: int = 0) -> np.ndarray:
  """[n, d] float64 with zero column means and unbiased sample covariance std^2 I exactly.

  QR of a centred Gaussian sample gives orthonormal columns, each orthogonal to
  the ones vector; scaled by sqrt(n - 1) std they have covariance (N - 1
  normaliser) std^2 I. For the biased (1 / N) covariance I pass
  std = sqrt(n / (n - 1)).
  """
  x = np.random.default_rng(seed).normal(size=(n, d))
  q, _ = np.linalg.qr(x - x.mean(0))
  return q * math.sqrt(n - 1) * std
