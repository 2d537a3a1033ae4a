"""Entropy estimators for the embedding distribution (docs/method.md section 2).

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
BOUNDS = {'upper': 2.0, 'lower': 8.0, 'chernoff': None}  # c in exp(-d^2 / (c sigma^2))


def pairwise_kernel_constant(bound: str, alpha: float = 0.5) -> float:
  """c in exp(-||z_i - z_j||^2 / (c sigma^2)) for each pairwise bound.

  Between N(mu_i, s^2 I) and N(mu_j, s^2 I) the KL divergence is
  d^2 / (2 s^2) (c = 2: upper bound) and the Chernoff alpha-divergence is
  alpha (1 - alpha) d^2 / (2 s^2), so c = 2 / (alpha (1 - alpha)): a lower
  bound for every alpha in (0, 1), the tightest at alpha = 1/2 for equal
  covariances, which is the Bhattacharyya bound, c = 8 (Kolchinsky & Tracey
  2017, section 4).
  """
  losses.check_choice(bound, 'bound', tuple(BOUNDS))
  if bound != 'chernoff':
    return BOUNDS[bound]
  if not 0.0 < alpha < 1.0:
    raise ValueError(f'The Chernoff bound needs alpha in (0, 1), got {alpha}.')
  return 2.0 / (alpha * (1.0 - alpha))


def pairwise_entropy(z: Array, *, sigma: float = 1.0, sigma_mode: str = 'fixed',
                     bound: str = 'upper', alpha: float = 0.5, min_sigma2: float = 1e-12,
                     axis_name: Optional[str] = None) -> tuple[Array, Metrics]:
  """Pairwise-distance bounds on the entropy of a Gaussian mixture.

  The mixture has one component N(z_i, sigma^2 I) per row, uniform weights.
  Kolchinsky & Tracey (2017), docs/method.md section 2:
    H = D/2 log(2 pi e sigma^2) + log N
        - (1/N) sum_i logsumexp_j(-||z_i - z_j||^2 / (c sigma^2)),
  c = 2 (KL divergence: upper bound), 8 (Bhattacharyya: lower bound) or
  2 / (alpha (1 - alpha)) (Chernoff alpha-divergence: a lower bound for any
  alpha in (0, 1); alpha = 1/2 is Bhattacharyya); j
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
    bound: 'upper' (KL), 'lower' (Bhattacharyya) or 'chernoff' (with alpha).
    alpha: the Chernoff order, only read when bound == 'chernoff'.
    min_sigma2: floor on sigma^2, so a collapsed batch (median 0) stays finite.
  Returns:
    (entropy, {'pairwise_entropy': entropy, 'sigma2': sigma^2}).
  """
  losses.check_embeddings(z, min_rows=1 if axis_name else 2)
  losses.check_positive(sigma, 'sigma')
  losses.check_choice(sigma_mode, 'sigma_mode', SIGMA_MODES)
  c = pairwise_kernel_constant(bound, alpha)
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
  lse = jax.nn.logsumexp(-d2 / (c * sigma2), axis=1)  # [N]
  entropy = (0.5 * d * jnp.log(2 * math.pi * math.e * sigma2) + math.log(n)
             - jnp.mean(lse))
  return losses.mean_over_devices(
      (entropy, {'pairwise_entropy': entropy, 'sigma2': sigma2}), axis_name)


def effective_rank(z: Array) -> Array:
  """exp of the Shannon entropy of the normalised singular values of zc.

  Roy & Vetterli (2007); a collapse diagnostic in [1, min(N, D)].
  """
  zc = losses.center(losses.to_stats_dtype(z))
  return effective_rank_of_singular_values(jnp.linalg.svd(zc, compute_uv=False))


def effective_rank_of_singular_values(s: Array) -> Array:
  """`effective_rank` from the singular values s of the centred embeddings."""
  p = s / jnp.maximum(jnp.sum(s), 1e-12)
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-30)), 0.0)))


def logdet_as_differential_entropy(logdet: Array, dim: int, beta: float) -> Array:
  """0.5 log det(I + beta C) -> the differential entropy it stands for, in nats.

  D/2 log(2 pi e / beta) + 0.5 log det(I + beta C) is the entropy of a
  Gaussian with covariance C + I / beta: Z's second moments, smoothed by
  isotropic noise of variance 1 / beta. This puts the log-det estimate on the
  same scale as the Gaussian and pairwise entropies.
  """
  return logdet + 0.5 * dim * math.log(2 * math.pi * math.e / beta)


def conditional_entropy_bound(z_a: Array, z_b: Array) -> tuple[Array, Metrics]:
  """Upper bound on H(Z | X') from two views: D/2 log(2 pi e s^2).

  docs/method.md section 1, item 3: H(Z | X') <= -E log q(Z | X') for any q. Take q the
  isotropic Gaussian centred on the other view's embedding, N(z_b, s^2 I),
  with s^2 fitted by maximum likelihood: s^2 = E||z_a - z_b||^2 / D, which is
  VICReg's invariance term (the mean over N * D entries). Then
  -E log q = D/2 log(2 pi s^2) + D/2 = D/2 log(2 pi e s^2).

  Args:
    z_a, z_b: [N, D] embeddings of two views of the same N inputs.
  Returns:
    (bound, {'invariance': s^2, 'conditional_entropy': bound}).
  """
  losses.check_embeddings(z_a)
  if z_a.shape != z_b.shape:
    raise ValueError(f'z_a and z_b must have the same shape, got {z_a.shape} and {z_b.shape}.')
  z_a, z_b = losses.to_stats_dtype(z_a), losses.to_stats_dtype(z_b)
  d = z_a.shape[1]
  s2 = jnp.maximum(jnp.mean(jnp.square(z_a - z_b)), 1e-30)
  bound = 0.5 * d * jnp.log(2 * math.pi * math.e * s2)
  return bound, {'invariance': s2, 'conditional_entropy': bound}
