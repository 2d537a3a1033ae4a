"""Entropy estimators for the embedding distribution (PAPER.md section 2).

The information-theoretic view of VICReg: SSL maximises
I(Z; X') = H(Z) - H(Z | X'). The invariance term bounds H(Z | X'); these
functions estimate H(Z) for the VICReg-IT family of objectives:

- `logdet_entropy`: 0.5 log det(I + beta C), the log-determinant estimator
  (MixEntroPY's convention), computed through the smaller Gram matrix.
- `gaussian_entropy`: the entropy of a Gaussian with Z's covariance, the upper
  bound that VICReg's variance and covariance terms implicitly push up.
- `pairwise_entropy`: Kolchinsky & Tracey (2017) bounds on the entropy of the
  mixture of isotropic Gaussians centred on the batch's embeddings.

All take [N, D] embeddings and return `(scalar, metrics)`; statistics are in
float32 at least. `axis_name` gathers per-device slices first (see
`losses.gather_batch`).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from ssl_jax import losses

Array = jax.Array
Metrics = dict[str, Array]

NORMALIZERS = ('n', 'n-1')


def _normalizer(n: int, normalizer: str) -> int:
  losses.check_choice(normalizer, 'normalizer', NORMALIZERS)
  return n if normalizer == 'n' else n - 1


def half_logdet_pd(a: Array) -> Array:
  """0.5 log det(A) for symmetric positive definite A, via its Cholesky factor.

  log det A = 2 sum_i log L_ii for A = L L^T; never log(det(A)), which
  overflows or underflows for a D of a few hundred.
  """
  chol = jnp.linalg.cholesky(a)
  return jnp.sum(jnp.log(jnp.diagonal(chol)))


def logdet_entropy(z: Array, *, beta: float = 1.0, normalizer: str = 'n',
                   route: str = 'auto', axis_name: Optional[str] = None
                   ) -> tuple[Array, Metrics]:
  """Log-determinant entropy estimate 0.5 log det(I_D + beta C).

  C = zc^T zc / M with zc the centred embeddings and M = N ('n', MixEntroPY)
  or N - 1 ('n-1'). By Sylvester's identity
  log det(I_D + beta zc^T zc / M) = log det(I_N + beta zc zc^T / M), so route
  'gram' (chosen by 'auto' when N < D) costs O(N^2 D + N^3) instead of
  O(N D^2 + D^3). I + beta G is positive definite for beta > 0, so the
  Cholesky factor always exists, collapsed embeddings included.

  Args:
    z: [N, D] embeddings (local slice under `axis_name`).
    beta: scale of the covariance inside the log-det, > 0.
    normalizer: 'n' or 'n-1'.
    route: 'auto', 'gram' ([N, N]) or 'cov' ([D, D]).
  Returns:
    (entropy, {'logdet_entropy': entropy}).
  """
  losses.check_embeddings(z, min_rows=1 if axis_name else 2)
  losses.check_positive(beta, 'beta')
  z = losses.to_stats_dtype(losses.gather_batch(z, axis_name))
  n, d = z.shape
  if n < 2:
    raise ValueError(f'logdet_entropy needs a global batch N >= 2, got N={n}.')
  m = _normalizer(n, normalizer)
  route = losses.resolve_route(route, n, d)
  zc = losses.center(z)
  gram = zc @ zc.T if route == 'gram' else zc.T @ zc
  eye = jnp.eye(gram.shape[0], dtype=gram.dtype)
  entropy = half_logdet_pd(eye + (beta / m) * gram)
  return losses.mean_over_devices((entropy, {'logdet_entropy': entropy}), axis_name)


def gaussian_entropy(z: Array, *, normalizer: str = 'n-1', eps: float = 0.0,
                     axis_name: Optional[str] = None) -> tuple[Array, Metrics]:
  """Entropy of N(mu, C): D/2 log(2 pi e) + 0.5 log det(C + eps I).

  C = zc^T zc / M is the sample covariance [D, D]. It is singular when
  N <= D, so that case needs eps > 0 (a ridge), else a ValueError is raised.
  """
  losses.check_embeddings(z, min_rows=1 if axis_name else 2)
  if eps < 0:
    raise ValueError(f'eps must be >= 0, got {eps}.')
  z = losses.to_stats_dtype(losses.gather_batch(z, axis_name))
  n, d = z.shape
  if n <= d and eps == 0:
    raise ValueError(
        f'gaussian_entropy needs N > D for a non-singular covariance, got N={n}, '
        f'D={d}; pass eps > 0 for a ridge, or use logdet_entropy.')
  m = _normalizer(n, normalizer)
  zc = losses.center(z)
  cov = zc.T @ zc / m + eps * jnp.eye(d, dtype=z.dtype)
  entropy = 0.5 * d * math.log(2 * math.pi * math.e) + half_logdet_pd(cov)
  return losses.mean_over_devices((entropy, {'gaussian_entropy': entropy}), axis_name)


def pairwise_sq_distances(z: Array) -> Array:
  """[N, D] -> [N, N] squared Euclidean distances, exact zeros on the diagonal.

  Uses the Gram form ||z_i||^2 + ||z_j||^2 - 2 z_i.z_j (O(N^2) memory, not
  O(N^2 D)) on centred rows, which keeps the cancellation error small; tiny
  negative values from rounding are clipped to 0.
  """
  zc = losses.center(z)
  sq = jnp.sum(jnp.square(zc), axis=1)
  d2 = sq[:, None] + sq[None, :] - 2.0 * (zc @ zc.T)
  d2 = jnp.maximum(d2, 0.0)
  return jnp.where(jnp.eye(z.shape[0], dtype=bool), 0.0, d2)


def median_offdiag(d2: Array) -> Array:
  """Median of the N(N-1)/2 distinct off-diagonal entries of a symmetric [N, N]."""
  rows, cols = jnp.triu_indices(d2.shape[0], k=1)
  return jnp.median(d2[rows, cols])


SIGMA_MODES = ('fixed', 'median')
BOUNDS = {'upper': 2.0, 'lower': 8.0}  # c in exp(-d^2 / (c sigma^2))


def pairwise_entropy(z: Array, *, sigma: float = 1.0, sigma_mode: str = 'fixed',
                     bound: str = 'upper', min_sigma2: float = 1e-12,
                     axis_name: Optional[str] = None) -> tuple[Array, Metrics]:
  """Pairwise-distance bounds on the entropy of a Gaussian mixture.

  The mixture has one component N(z_i, sigma^2 I) per row, uniform weights.
  Kolchinsky & Tracey (2017), PAPER.md section 2:
    H = D/2 log(2 pi e sigma^2) + log N
        - (1/N) sum_i logsumexp_j(-||z_i - z_j||^2 / (c sigma^2)),
  c = 2 (KL divergence: upper bound) or 8 (Bhattacharyya: lower bound); j
  runs over all rows, j = i included. The value lies between
  D/2 log(2 pi e sigma^2) and that + log N, so it cannot be raised by
  inflating the embedding scale.

  Args:
    z: [N, D] embeddings.
    sigma: component standard deviation ('fixed'), or the factor applied to
      sqrt(median off-diagonal squared distance) ('median'), > 0.
    sigma_mode: 'fixed' or 'median'. In 'median' mode sigma^2 is
      sigma^2 * median(d^2) under stop_gradient: the bandwidth is a choice of
      estimator, not something the network may move.
    bound: 'upper' (KL) or 'lower' (Bhattacharyya).
    min_sigma2: floor on sigma^2, so a collapsed batch (median 0) stays finite.
  Returns:
    (entropy, {'pairwise_entropy': entropy, 'sigma2': sigma^2}).
  """
  losses.check_embeddings(z, min_rows=1 if axis_name else 2)
  losses.check_positive(sigma, 'sigma')
  losses.check_choice(sigma_mode, 'sigma_mode', SIGMA_MODES)
  losses.check_choice(bound, 'bound', tuple(BOUNDS))
  z = losses.to_stats_dtype(losses.gather_batch(z, axis_name))
  n, d = z.shape
  if n < 2:
    raise ValueError(f'pairwise_entropy needs a global batch N >= 2, got N={n}.')
  d2 = pairwise_sq_distances(z)
  if sigma_mode == 'median':
    sigma2 = sigma ** 2 * jax.lax.stop_gradient(median_offdiag(d2))
  else:
    sigma2 = jnp.asarray(sigma ** 2, z.dtype)
  sigma2 = jnp.maximum(sigma2, min_sigma2)
  lse = jax.nn.logsumexp(-d2 / (BOUNDS[bound] * sigma2), axis=1)  # [N]
  entropy = (0.5 * d * jnp.log(2 * math.pi * math.e * sigma2) + math.log(n)
             - jnp.mean(lse))
  return losses.mean_over_devices(
      (entropy, {'pairwise_entropy': entropy, 'sigma2': sigma2}), axis_name)


def effective_rank(z: Array) -> Array:
  """exp of the Shannon entropy of the normalised singular values of zc.

  Roy & Vetterli (2007); a collapse diagnostic in [1, min(N, D)].
  """
  zc = losses.center(losses.to_stats_dtype(z))
  s = jnp.linalg.svd(zc, compute_uv=False)
  p = s / jnp.maximum(jnp.sum(s), 1e-12)
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-30)), 0.0)))
