"""Information quantities of an embedding: entropy of Z and I(Z; X) from views.

The model (the paper's, with a full noise covariance): X is uniform over N
images, and the views of image n are Z = mu_n + eps, eps ~ N(0, Sigma) with one
within-image covariance Sigma for all images. Then Z is the mixture
(1/N) sum_n N(mu_n, Sigma), H(Z | X) = 1/2 log det(2 pi e Sigma), and
I(Z; X) = H(Z) - H(Z | X) lies in [0, log N].

Nothing here takes the midpoint of two views for mu_n: that midpoint still
carries noise Sigma / 2 in every dimension, which read pure noise as log N
(tests/information_test.py has the known-answer cases). Instead `fit_mixture`:
- Sigma from the within-image scatter of V >= 2 views per image;
- the centres' covariance without the views' noise: the covariance of the view
  means minus Sigma / V, in Sigma-whitened coordinates (S, "signal to noise");
- S's eigenvalues are compared with the noise-only bulk, Wachter's law for
  the ratio of the two sample covariances (upper edge ((1 + h) / (1 - y2))^2,
  h^2 = y1 + y2 - y1 y2, y1 = D / (N - 1), y2 = D / (N (V - 1))): eigenvalues
  above it are signal directions; below it, only the bulk's total signal
  (its mean eigenvalue less the noise-only mean 1 / (1 - y2)) is estimable,
  and it is spread over the bulk directions in proportion to their excess;
- centres mu_n estimated in those coordinates by shrinking each view mean to
  the fitted signal variance (covariance-matched shrinkage).

From the fitted mixture (all in nats):
- mi_estimate: I(Z; X) of the fitted mixture, by Monte-Carlo with its exact
  density (a point estimate);
- mi_pairwise_lower: Kolchinsky & Tracey's Bhattacharyya lower bound of the
  fitted mixture, log N - mean_i log sum_j exp(-D_B(i, j));
- mi_gaussian_upper: the Gaussian channel 1/2 log det(I + S), the most
  information Gaussian centres of covariance S could carry (maximum
  entropy), capped at log N;
- mi_infonce_lower: InfoNCE between two views with the fitted model's
  Gaussian log density ratio as critic, fitted on one half of the images and
  evaluated on the other (and back): a lower bound on I(Z_a; Z_b) <= I(Z; X)
  whatever the fit, at most log(N / 2); weak when D is large against N.

Detection limit: a signal direction below the noise edge is only counted
through the bulk's trace; with N = 1024 images and D = 256, 8 directions of
signal-to-noise 1 are at the edge. The known-answer tests cover D = 8 to 256.

The estimates need the model: `model_check` counts eigenvalues of S below the
noise-only bulk's lower edge, which the model forbids (Cov(Z) >= Sigma: the
views of one image cannot vary more than the images do). A contradicted
model makes every mi_* number a statistic of a wrong model, and the report
says so instead of calling it a mutual information.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax import estimators
from ssl_jax import losses

REPRESENTATIONS = ('features', 'z')    # encoder output, projector output
ENTROPIES = ('gaussian', 'logdet', 'pairwise_upper', 'pairwise_lower')
EDGE_MARGIN = 1.05   # noise-only eigenvalues reach past Wachter's edge by ~N^(-2/3)


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
  m = x.max(axis=axis, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def _sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return (np.square(a).sum(1)[:, None] - 2 * a @ b.T + np.square(b).sum(1)[None, :])


def wachter_edges(d: int, n: int, views: int) -> tuple[float, float, float]:
  """(lower edge, upper edge, mean) of the noise-only eigenvalues of S.

  S = Sigma_hat^-1/2 C_means Sigma_hat^-1/2 - I / V with no signal is (F - I) / V,
  F the ratio of sample covariances of N - 1 and N (V - 1) degrees of freedom,
  whose eigenvalues follow Wachter's law (Bai & Silverstein 2010, ch. 4).
  """
  y1, y2 = d / (n - 1), d / (n * (views - 1))
  h = math.sqrt(y1 + y2 - y1 * y2)
  low = ((1 - h) / (1 - y2)) ** 2
  high = ((1 + h) / (1 - y2)) ** 2
  return (low - 1) / views, (high - 1) / views, (1 / (1 - y2) - 1) / views


def fit_mixture(views: np.ndarray, *, spread_bulk: bool = False) -> dict[str, Any]:
  """The model's parameters from views [N, V, D] (V >= 2): see the module docstring.

  Returns the mean, `whiten` ([D, D]: x -> coordinates in which the noise is
  I and S is diagonal), the signal variances per coordinate, S's eigenvalues,
  which are above the noise edge, the whitened view means, and the edges.
  spread_bulk spreads the bulk's signal evenly (a smoother critic for InfoNCE).
  """
  z = np.asarray(views, np.float64)
  n, v, d = z.shape
  if v < 2:
    raise ValueError(f'The within-image covariance needs >= 2 views per image, got {v}.')
  if n * (v - 1) <= d or n <= d + 1:
    raise ValueError(
        f'{n} images x {v} views cannot estimate a {d}-dimensional within-image covariance '
        f'and centre covariance: use more images or views (N (V - 1) > D and N > D + 1; '
        f'N (V - 1) > 2 D for a usable noise edge).')
  means = z.mean(1)
  resid = (z - means[:, None, :]).reshape(n * v, d)
  sigma = resid.T @ resid / (n * (v - 1))
  noise_eig, noise_vec = np.linalg.eigh(sigma)
  if noise_eig[-1] <= 0:
    raise ValueError('The views of every image are identical: there is no within-image '
                     'noise to measure information against.')
  # Directions in which no view ever differs from its image's other views (dead
  # ReLU units, say) carry no noise: the model is fitted in the others.
  varying = noise_eig > 1e-9 * noise_eig[-1]
  noise_eig, noise_vec = noise_eig[varying], noise_vec[:, varying]
  d = int(varying.sum())
  w = noise_vec / np.sqrt(noise_eig)
  centre = means.mean(0)
  mw = (means - centre) @ w
  s = mw.T @ mw / (n - 1) - np.eye(d) / v
  lam, vec = np.linalg.eigh(s)
  if n * (v - 1) <= d or n <= d + 1:
    raise ValueError(f'{n} images x {v} views cannot estimate the {d} noisy directions: use '
                     'more images or views (N (V - 1) > D and N > D + 1).')
  low, high, null_mean = wachter_edges(d, n, v)
  keep = lam > EDGE_MARGIN * (high + 1 / v) - 1 / v
  bulk_count = max(1, d - int(keep.sum()))
  power = max(0.0, float(np.sum(np.where(keep, 0.0, lam))) - bulk_count * null_mean)
  weights = np.where(keep, 0.0, 1.0 if spread_bulk else np.maximum(lam - null_mean, 0.0))
  signal = np.where(keep, lam, power * weights / max(float(weights.sum()), 1e-300))
  return {'mean': centre, 'whiten': w @ vec, 'signal': signal, 'eigenvalues': lam,
          'kept': keep, 'means_whitened': mw @ vec, 'views': v, 'noise_eigenvalues': noise_eig,
          'edges': (low, high, null_mean), 'bulk_signal': power,
          'noise_free_dims': int((~varying).sum())}


def unbiased_logdet(eigenvalues: np.ndarray, dof: int) -> float:
  """log det Sigma from the eigenvalues of a sample covariance with `dof` degrees of freedom.

  log det of the sample covariance falls short of log det Sigma by
  D log(2 / dof) + sum_{i=1}^{D} psi((dof - i + 1) / 2) on average (the Wishart
  log-determinant's mean); about D^2 / (2 dof), 16 nats at D = 256 and 2,048
  samples. That mean is added back.
  """
  from scipy import special
  d = len(eigenvalues)
  bias = d * math.log(2 / dof) + float(np.sum(special.digamma((dof - np.arange(d)) / 2)))
  return float(np.sum(np.log(eigenvalues))) - bias


def _infonce(model: dict[str, Any], a: np.ndarray, b: np.ndarray) -> float:
  """InfoNCE of pairs (a_i, b_i) against all (a_i, b_j), critic log p(a, b) / p(a) p(b)
  of the Gaussian model with signal variances s per whitened coordinate."""
  s = model['signal']
  a = (a - model['mean']) @ model['whiten']
  b = (b - model['mean']) @ model['whiten']
  own = (s + 1) / (2 * s + 1) - 1 / (s + 1)
  cross = s / (2 * s + 1)
  f = -0.5 * ((np.square(a) * own).sum(1)[:, None] + (np.square(b) * own).sum(1)[None, :]
              - 2 * (a * cross) @ b.T)
  return math.log(len(a)) + float(np.mean(np.diag(f) - _logsumexp(f, 1)))


def mixture_information(views: np.ndarray, *, samples: int = 2, seed: int = 0
                        ) -> dict[str, Any]:
  """I(Z; X) estimates and bounds from views [N, V, D], V >= 2 (module docstring)."""
  z = np.asarray(views, np.float64)
  n, v, d = z.shape
  log_n = math.log(n)
  model = fit_mixture(z)
  s = model['signal']
  # Centres: each whitened view mean (variance lambda + 1/V per coordinate)
  # shrunk to the fitted signal variance s.
  var = np.maximum(model['eigenvalues'], 0.0) + 1.0 / v
  centres = model['means_whitened'] * np.sqrt(s / var)
  d2 = _sq_distances(centres, centres)
  rng = np.random.default_rng(seed)
  draws = []
  for _ in range(samples):
    eps = rng.normal(size=centres.shape)
    own = 0.5 * np.square(eps).sum(1)[:, None]
    draws.append(log_n - float(np.mean(
        _logsumexp(-0.5 * _sq_distances(centres + eps, centres) + own, 1))))
  half = n // 2
  folds = (np.arange(half), np.arange(half, n))
  infonce = []
  for fit_rows, eval_rows in (folds, folds[::-1]):
    try:
      infonce.append(_infonce(fit_mixture(z[fit_rows], spread_bulk=True),
                              z[eval_rows, 0], z[eval_rows, 1]))
    except ValueError:   # half the images cannot fit the model: no bound
      infonce.append(0.0)
  low, high, _ = model['edges']
  return {
      'mi_estimate': float(np.mean(draws)),
      'mi_pairwise_lower': log_n - float(np.mean(_logsumexp(-d2 / 8, 1))),
      'mi_gaussian_upper': min(log_n, 0.5 * float(np.sum(np.log1p(s)))),
      'mi_infonce_lower': max(0.0, float(np.mean(infonce))),
      'log_num_images': log_n,
      # over the directions with noise (noise_free_dims are left out)
      'noise_entropy': 0.5 * len(model['noise_eigenvalues']) * math.log(2 * math.pi * math.e)
                       + 0.5 * unbiased_logdet(model['noise_eigenvalues'], n * (v - 1)),
      'signal_directions': int(model['kept'].sum()),
      'noise_free_dims': model['noise_free_dims'],
      'bulk_signal': model['bulk_signal'],
      'noise_edge': high,
      'model_check': model_check(model['eigenvalues'], low),
  }


def model_check(eigenvalues: np.ndarray, lower_edge: float) -> dict[str, Any]:
  """Does the data allow Cov(Z) >= Sigma? Counts S's eigenvalues below the noise-only
  bulk's lower edge (with the same margin as the upper one)."""
  # The lower edge is negative (S - I / V below 0 in noise-only directions):
  # the margin moves it further down.
  threshold = lower_edge * EDGE_MARGIN if lower_edge < 0 else lower_edge / EDGE_MARGIN
  below = int(np.sum(eigenvalues < threshold))
  share = below / len(eigenvalues)
  return {
      'eigenvalues_below_noise': below, 'share_below_noise': share,
      'lower_edge': float(lower_edge), 'min_eigenvalue': float(np.min(eigenvalues)),
      # A few may cross by chance near the edge; a share of 1% is far beyond it.
      'contradicted': bool(share > 0.01),
  }


# ----------------------------------------------------------------------------
# Entropy of Z and the spectrum, from the estimators the objectives use.
# ----------------------------------------------------------------------------

@jax.jit
def _spectrum_stats(z: jax.Array) -> dict[str, jax.Array]:
  """Eigenvalues of C = zc^T zc / N, descending ([min(N, D)]), and the effective
  rank, from one SVD of zc: neither the [D, D] nor the [N, N] matrix is formed."""
  s = jnp.linalg.svd(losses.center(losses.to_stats_dtype(z)), compute_uv=False)
  return {'spectrum': jnp.square(s) / z.shape[0],
          'effective_rank': estimators.effective_rank_of_singular_values(s)}


@jax.jit
def _pairwise_terms(z: jax.Array) -> dict[str, jax.Array]:
  """(1/N) sum_i logsumexp_j(-||z_i - z_j||^2 / (c sigma^2)) for the KL (c = 2) and
  Bhattacharyya (c = 8) kernels at the median bandwidth sigma^2."""
  d2 = estimators.pairwise_sq_distances(z)
  sigma2 = jnp.maximum(estimators.median_offdiag(d2), 1e-12)
  lse = lambda c: jnp.mean(jax.nn.logsumexp(-d2 / (c * sigma2), axis=1))
  return {'upper': lse(2.0), 'lower': lse(8.0), 'sigma2': sigma2}


def entropy_estimates(z: np.ndarray, *, beta: float = 1.0) -> dict[str, Any]:
  """The entropy estimates of Z [M, D] that the objectives optimise, in nats.

  entropy_gaussian: of N(mean, C), C the 1/M covariance with a 1e-6 ridge
  (rank-deficient features); entropy_logdet: the log-det estimate at the run's
  beta as the differential entropy of N(mean, C + I / beta)
  (estimators.logdet_as_differential_entropy; logdet_entropy is the raw
  0.5 log det(I + beta C)); entropy_pairwise_upper / _lower: the KL and
  Bhattacharyya kernel estimates at the median bandwidth, as the pairwise
  objective. All but the effective rank change with the features' scale.
  """
  z = np.asarray(z, np.float32)
  m, d = z.shape
  spec = _spectrum_stats(jnp.asarray(z))
  eig = np.asarray(spec['spectrum'], np.float64)
  eig_all = np.concatenate([eig, np.zeros(max(0, d - len(eig)))])
  logdet = 0.5 * float(np.sum(np.log1p(beta * eig)))
  pair = _pairwise_terms(jnp.asarray(z))
  h_median = 0.5 * d * math.log(2 * math.pi * math.e * float(pair['sigma2'])) + math.log(m)
  return {
      'entropy_gaussian': 0.5 * d * math.log(2 * math.pi * math.e)
                          + 0.5 * float(np.sum(np.log(eig_all + 1e-6))),
      'logdet_entropy': logdet,
      'entropy_logdet': float(estimators.logdet_as_differential_entropy(logdet, d, beta)),
      'entropy_pairwise_upper': h_median - float(pair['upper']),
      'entropy_pairwise_lower': h_median - float(pair['lower']),
      'pairwise_sigma2': float(pair['sigma2']),
      'effective_rank': float(spec['effective_rank']),
      'spectrum': eig.tolist(),
  }


def information_quantities(z_a: np.ndarray, z_b: Optional[np.ndarray] = None, *,
                           more_views: Sequence[np.ndarray] = (), beta: float = 1.0
                           ) -> dict[str, Any]:
  """Entropy of Z and I(Z; X) estimates of two (or more) views [N, D] of N images.

  Returns entropy_estimates() of all views, the mixture_information() of the
  views (mi_* in nats: mi_estimate, mi_pairwise_lower, mi_gaussian_upper,
  mi_infonce_lower, each bound named as one, with model_check), and
  invariance (E (z_a - z_b)^2 per coordinate), conditional_entropy
  (H(Z | X) = 1/2 log det(2 pi e Sigma) of the fitted Sigma) and
  conditional_entropy_paper (the paper's isotropic bound D/2 log(2 pi e
  invariance), estimators.conditional_entropy_bound). z_b may be omitted when
  z_a is [N, V, D].
  """
  if z_b is None:
    stacked = np.asarray(z_a, np.float64)
  else:
    stacked = np.stack([np.asarray(x, np.float64) for x in (z_a, z_b, *more_views)], 1)
  n, v, d = stacked.shape
  out = {'num_images': n, 'views': v, 'dim': d, 'beta': beta}
  out.update(entropy_estimates(stacked.reshape(n * v, d), beta=beta))
  try:
    out.update(mixture_information(stacked))
  except ValueError as error:   # too few images or views for this dimension
    out.update({k: math.nan for k in MI_KEYS}, log_num_images=math.log(n),
               noise_entropy=math.nan, signal_directions=0, bulk_signal=math.nan,
               noise_edge=math.nan, noise_free_dims=math.nan, mi_unavailable=str(error),
               model_check={'contradicted': None, 'eigenvalues_below_noise': None,
                            'share_below_noise': None, 'reason': str(error)})
  out['invariance'] = float(np.mean(np.square(stacked[:, 0] - stacked[:, 1])))
  out['conditional_entropy'] = out.pop('noise_entropy')
  out['conditional_entropy_paper'] = float(estimators.conditional_entropy_bound(
      jnp.asarray(stacked[:, 0], jnp.float32), jnp.asarray(stacked[:, 1], jnp.float32))[0])
  return out


MI_KEYS = ('mi_estimate', 'mi_pairwise_lower', 'mi_gaussian_upper', 'mi_infonce_lower')
