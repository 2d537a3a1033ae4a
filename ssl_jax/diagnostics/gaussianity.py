"""Gaussianity of Z given X': normality tests of one image's views (docs/method.md sec. 5).

Host-side statistics on small samples (numpy, scipy):

- `henze_zirkler`: the Henze-Zirkler (1990) multivariate test, the
  statistic's log-normal null approximation (as R's MVN and pingouin).
- `mardia`: Mardia's (1970) multivariate skewness and kurtosis tests.
- `within_image_normality`: for K images with M views each, projects each
  image's views onto the leading D' principal directions of its within-image
  covariance and tests them. The directions are estimated on one half of the
  views and the test runs on the other half: directions fitted to the tested
  sample itself would make the test anti-conservative. Also Shapiro-Wilk on
  random directions of the full space and the within-image spectrum.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats as sp_stats


def _standardised_products(x: np.ndarray) -> np.ndarray:
  """[n, p] -> [n, n] matrix of (x_i - mean)^T S^-1 (x_j - mean), S with 1/n.

  Uses the pseudo-inverse, so a sample spanning fewer than p dimensions
  gives finite values (and is rejected by the tests, as it should be).
  """
  xc = x - x.mean(0)
  cov = xc.T @ xc / x.shape[0]
  return xc @ np.linalg.pinv(cov, hermitian=True) @ xc.T


def _check_sample(x: np.ndarray, name: str) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or x.shape[0] < 3 or x.shape[1] < 1:
    raise ValueError(f'{name} needs an [n, p] sample with n >= 3, got shape {x.shape}.')
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{name} got non-finite values.')
  return x


def henze_zirkler(x: np.ndarray) -> tuple[float, float]:
  """Henze-Zirkler test of multivariate normality: (statistic, p-value).

  Henze & Zirkler (1990), with the smoothing parameter
  beta = ((2p + 1) / 4)^(1 / (p + 4)) n^(1 / (p + 4)) / sqrt(2) and the
  log-normal approximation of the statistic's null distribution (its mean
  and variance from the paper). A rank-deficient sample gets p-value 0.
  """
  x = _check_sample(x, 'henze_zirkler')
  n, p = x.shape
  prod = _standardised_products(x)
  diag = np.diag(prod)
  d_ij = diag[:, None] + diag[None, :] - 2.0 * prod    # squared Mahalanobis distances
  b2 = (((2 * p + 1) / 4) ** (1 / (p + 4)) * n ** (1 / (p + 4)) / math.sqrt(2)) ** 2
  if np.linalg.matrix_rank(x - x.mean(0)) < p:
    return 4.0 * n, 0.0
  hz = n * (np.exp(-b2 / 2 * d_ij).sum() / n ** 2
            - 2 * (1 + b2) ** (-p / 2) * np.exp(-b2 / (2 * (1 + b2)) * diag).sum() / n
            + (1 + 2 * b2) ** (-p / 2))
  a = 1 + 2 * b2
  w = (1 + b2) * (1 + 3 * b2)
  mean = 1 - a ** (-p / 2) * (1 + p * b2 / a + p * (p + 2) * b2 ** 2 / (2 * a ** 2))
  var = (2 * (1 + 4 * b2) ** (-p / 2)
         + 2 * a ** (-p) * (1 + 2 * p * b2 ** 2 / a ** 2
                            + 3 * p * (p + 2) * b2 ** 4 / (4 * a ** 4))
         - 4 * w ** (-p / 2) * (1 + 3 * p * b2 ** 2 / (2 * w)
                                + p * (p + 2) * b2 ** 4 / (2 * w ** 2)))
  log_mu = math.log(math.sqrt(mean ** 4 / (var + mean ** 2)))
  log_sigma = math.sqrt(math.log((var + mean ** 2) / mean ** 2))
  p_value = float(sp_stats.lognorm.sf(hz, log_sigma, scale=math.exp(log_mu)))
  return float(hz), p_value


def mardia(x: np.ndarray) -> dict[str, float]:
  """Mardia's tests: skewness n b1 / 6 ~ chi2(p(p+1)(p+2)/6), kurtosis ~ N(0, 1).

  b1 = mean_ij m_ij^3 and b2 = mean_i m_ii^2 with m = the standardised
  products (1/n covariance). Returns both statistics and p-values.
  """
  x = _check_sample(x, 'mardia')
  n, p = x.shape
  m = _standardised_products(x)
  b1 = float(np.mean(m ** 3))
  b2 = float(np.mean(np.diag(m) ** 2))
  skew_stat = n * b1 / 6
  dof = p * (p + 1) * (p + 2) / 6
  kurt_z = (b2 - p * (p + 2)) / math.sqrt(8 * p * (p + 2) / n)
  return {'skewness': b1, 'skewness_p': float(sp_stats.chi2.sf(skew_stat, dof)),
          'kurtosis': b2, 'kurtosis_p': float(2 * sp_stats.norm.sf(abs(kurt_z)))}


def within_image_normality(views: np.ndarray, *, dims: int, directions_1d: int = 8,
                           level: float = 0.05, seed: int = 0) -> dict[str, Any]:
  """Gaussianity of each image's views: [K, M, D] embeddings -> pass rates.

  For each image, the first M // 2 views give the leading `dims` principal
  directions of the within-image covariance; the other views, projected on
  them, are tested (Henze-Zirkler, Mardia skewness and kurtosis). The
  Shapiro-Wilk test runs on `directions_1d` random unit directions of the
  full D-dimensional space per image. A Gaussian sample passes each test at
  rate 1 - level in expectation.

  Returns pass rates (the share of images with p >= level), the median
  p-values, and the within-image covariance spectrum (eigenvalues over their
  sum, averaged over images, first min(M, D) of them).
  """
  views = np.asarray(views, np.float64)
  if views.ndim != 3:
    raise ValueError(f'views must be [K images, M views, D], got shape {views.shape}.')
  k, m, d = views.shape
  half = m // 2
  tested = m - half
  if dims < 1 or dims > d:
    raise ValueError(f'dims must be in [1, D={d}], got {dims}.')
  if tested < 5 * dims:
    raise ValueError(
        f'{tested} tested views per image for a {dims}-dimensional normality test: the test '
        f'needs about 5 x dims samples. Use at least {2 * 5 * dims} views per image, or fewer '
        'dims.')
  rng = np.random.default_rng(seed)
  hz_p, skew_p, kurt_p, sw_p, spectra = [], [], [], [], []
  for image in views:
    fit, test = image[:half], image[half:]
    _, _, vt = np.linalg.svd(fit - fit.mean(0), full_matrices=False)
    projected = test @ vt[:dims].T                                   # [tested, dims]
    hz_p.append(henze_zirkler(projected)[1] if dims > 1 else
                float(sp_stats.shapiro(projected[:, 0]).pvalue))
    mt = mardia(projected)
    skew_p.append(mt['skewness_p'])
    kurt_p.append(mt['kurtosis_p'])
    directions = rng.standard_normal((directions_1d, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    for line in (test @ directions.T).T:
      sw_p.append(float(sp_stats.shapiro(line).pvalue) if np.ptp(line) > 0 else 0.0)
    eig = np.linalg.svd(image - image.mean(0), compute_uv=False) ** 2
    spectra.append(eig / max(eig.sum(), 1e-30))
  rate = lambda ps: float(np.mean(np.asarray(ps) >= level))
  return {
      'images': k, 'views_per_image': m, 'tested_views': tested, 'dims': dims, 'level': level,
      'nominal_pass_rate': 1.0 - level,
      'henze_zirkler_pass_rate': rate(hz_p), 'henze_zirkler_median_p': float(np.median(hz_p)),
      'mardia_skewness_pass_rate': rate(skew_p), 'mardia_kurtosis_pass_rate': rate(kurt_p),
      'shapiro_wilk_pass_rate': rate(sw_p), 'shapiro_wilk_median_p': float(np.median(sw_p)),
      'within_image_spectrum': np.mean(spectra, axis=0).tolist(),
  }
