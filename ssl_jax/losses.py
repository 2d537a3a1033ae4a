"""Pure loss terms on embeddings of shape [N, D].

Every function takes arrays and returns `(scalar, metrics)`; none holds state
or knows about models, configs or devices. Formulas and conventions follow
`docs/method.md` section 2, which follows the official VICReg code
(facebookresearch/vicreg, main_vicreg.py) and solo-learn's CIFAR recipes.

Multi-device: every term that computes a batch statistic takes an optional
`axis_name`. When it is given the term runs inside `jax.pmap` or
`jax.shard_map` on a per-device slice, and the slices are gathered over that
axis before the statistic (`gather_batch`), which is the official code's
FullGatherLayer: forward all-gathers, backward sums the incoming gradients
over devices and hands each device its own slice (the transpose of
`jax.lax.all_gather` is exactly that reduce-scatter). Under plain `jax.jit`
on globally sharded arrays no `axis_name` is needed: the arrays already are
the global batch and XLA inserts the collectives.

Statistics are computed in float32 (or float64 when the input is float64)
even for bfloat16 inputs, because variances and Gram matrices of low-precision
embeddings lose most of their digits.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Metrics = dict[str, Array]


# ----------------------------------------------------------------------------
# Input checks and shared helpers.
# ----------------------------------------------------------------------------

def check_embeddings(z, name: str = 'z', min_rows: int = 2) -> None:
  """Raises ValueError at trace time if `z` is not a floating [N, D] array.

  `min_rows` applies to the local array; a batch statistic needs N >= 2.
  """
  shape = getattr(z, 'shape', None)
  dtype = getattr(z, 'dtype', None)
  if shape is None or dtype is None:
    raise ValueError(f'{name} must be an array of shape [N, D], got {type(z).__name__}.')
  if len(shape) != 2:
    raise ValueError(
        f'{name} must have rank 2 ([N, D] embeddings), got shape {tuple(shape)}; '
        'flatten the features first, e.g. z.reshape(z.shape[0], -1).')
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f'{name} must have a floating dtype, got {dtype}; cast it with '
        f'{name}.astype(jnp.float32).')
  if shape[0] < min_rows:
    raise ValueError(
        f'{name} has N={shape[0]} rows; a batch statistic needs N >= {min_rows}. '
        'Use a larger batch.')
  if shape[1] < 1:
    raise ValueError(f'{name} has D={shape[1]} features; D must be >= 1.')


def check_pair(z_a, z_b, names=('z_a', 'z_b'), min_rows: int = 2) -> None:
  """Checks two views' embeddings and that their shapes match."""
  check_embeddings(z_a, names[0], min_rows)
  check_embeddings(z_b, names[1], min_rows)
  if tuple(z_a.shape) != tuple(z_b.shape):
    raise ValueError(
        f'{names[0]} and {names[1]} must have the same shape (two views of the same '
        f'images), got {tuple(z_a.shape)} and {tuple(z_b.shape)}.')


def check_positive(value, name: str) -> None:
  """Raises ValueError if a Python hyper-parameter is not > 0."""
  # Traced values cannot be checked at trace time; Python and NumPy numbers can.
  if isinstance(value, (int, float, np.number)) and not value > 0:
    raise ValueError(f'{name} must be > 0, got {value}.')


def check_choice(value, name: str, choices) -> None:
  if value not in choices:
    raise ValueError(f'{name} must be one of {sorted(choices)}, got {value!r}.')


def stats_dtype(dtype) -> jnp.dtype:
  """float32, or float64 if the input already is; never lower."""
  return jnp.promote_types(dtype, jnp.float32)


def to_stats_dtype(z: Array) -> Array:
  return z.astype(stats_dtype(z.dtype))


def gather_batch(z: Array, axis_name: Optional[str]) -> Array:
  """[n_local, D] -> [N, D]: all-gathers the batch over `axis_name` if given.

  Gradient semantics are those of the official VICReg FullGatherLayer: the
  transpose of all_gather sums the cotangents of every device and returns each
  device the rows of its own slice.
  """
  if axis_name is None:
    return z
  return jax.lax.all_gather(z, axis_name, axis=0, tiled=True)


def mean_over_devices(x, axis_name: Optional[str]):
  """pmean of a pytree over `axis_name`, or the identity when it is None.

  Applied to the outputs of gathered statistics too, where every device holds
  the same value: the pmean then changes nothing in value but marks the result
  device-invariant, which `jax.shard_map(..., out_specs=P())` requires and
  which makes shard_map gradients exact. Under `jax.pmap` each device's
  gradient is then devices x d(global loss)/d(its slice), the FullGatherLayer
  + DDP convention: averaging parameter gradients with `pmean` (as DDP does)
  gives exactly the single-device gradient.
  """
  return x if axis_name is None else jax.lax.pmean(x, axis_name)


def center(z: Array) -> Array:
  """z [N, D] minus its column means ([D] broadcasts over the rows)."""
  return z - jnp.mean(z, axis=0)


def resolve_route(route: str, n: int, d: int) -> str:
  """'auto' picks the N x N Gram matrix when N < D, else the D x D covariance."""
  check_choice(route, 'route', ('auto', 'gram', 'cov'))
  if route == 'auto':
    return 'gram' if n < d else 'cov'
  return route


# ----------------------------------------------------------------------------
# VICReg terms.
# ----------------------------------------------------------------------------

def invariance(z_a: Array, z_b: Array, *, axis_name: Optional[str] = None
               ) -> tuple[Array, Metrics]:
  """Mean over all N*D entries of (z_a - z_b)^2 (VICReg's F.mse_loss).

  Args:
    z_a, z_b: [N, D] embeddings of the two views (local slices under
      `axis_name`).
    axis_name: if given, the per-device means are averaged over that axis,
      which equals the global mean because every device holds N/devices rows.
  Returns:
    (loss, {'invariance': loss}).
  """
  check_pair(z_a, z_b, min_rows=1)
  z_a, z_b = to_stats_dtype(z_a), to_stats_dtype(z_b)
  loss = mean_over_devices(jnp.mean(jnp.square(z_a - z_b)), axis_name)
  return loss, {'invariance': loss}


def variance(z: Array, *, gamma: float = 1.0, eps: float = 1e-4,
             axis_name: Optional[str] = None) -> tuple[Array, Metrics]:
  """VICReg variance hinge: mean_k relu(gamma - sqrt(var_k + eps)).

  var_k uses the unbiased N-1 normaliser (torch's Tensor.var default, as in
  main_vicreg.py). docs/method.md section 2.

  Args:
    z: [N, D] embeddings (local slice under `axis_name`).
    gamma: target standard deviation.
    eps: added to the variance before the square root so the gradient stays
      finite for a collapsed dimension.
  Returns:
    (loss, {'variance': loss, 'std_mean': mean_k std_k}).
  """
  check_embeddings(z, min_rows=1 if axis_name else 2)
  check_positive(gamma, 'gamma')
  check_positive(eps, 'eps')
  z = to_stats_dtype(gather_batch(z, axis_name))
  if z.shape[0] < 2:
    raise ValueError(f'variance needs a global batch N >= 2, got N={z.shape[0]}.')
  std = jnp.sqrt(jnp.var(z, axis=0, ddof=1) + eps)  # [D]
  loss = jnp.mean(jax.nn.relu(gamma - std))
  return mean_over_devices((loss, {'variance': loss, 'std_mean': jnp.mean(std)}), axis_name)


def covariance(z: Array, *, route: str = 'auto', axis_name: Optional[str] = None
               ) -> tuple[Array, Metrics]:
  """VICReg covariance term: sum_{i != j} C_ij^2 / D, C = zc^T zc / (N - 1).

  The off-diagonal sum is ||C||_F^2 - sum_k C_kk^2, and ||zc^T zc||_F equals
  ||zc zc^T||_F, so with route 'gram' (chosen by 'auto' when N < D) the
  [N, N] Gram matrix replaces the [D, D] covariance: same value, same gradient.

  Args:
    z: [N, D] embeddings.
    route: 'auto', 'gram' (N x N) or 'cov' (D x D).
  Returns:
    (loss, {'covariance': loss}).
  """
  check_embeddings(z, min_rows=1 if axis_name else 2)
  z = to_stats_dtype(gather_batch(z, axis_name))
  n, d = z.shape
  if n < 2:
    raise ValueError(f'covariance needs a global batch N >= 2, got N={n}.')
  route = resolve_route(route, n, d)
  zc = center(z)
  gram = zc @ zc.T if route == 'gram' else zc.T @ zc
  frob_sq = jnp.sum(jnp.square(gram)) / (n - 1) ** 2       # ||C||_F^2
  diag = jnp.sum(jnp.square(zc), axis=0) / (n - 1)          # C_kk, [D]
  loss = (frob_sq - jnp.sum(jnp.square(diag))) / d
  return mean_over_devices((loss, {'covariance': loss}), axis_name)


def vicreg(z_a: Array, z_b: Array, *, inv_weight: float = 25.0,
           var_weight: float = 25.0, cov_weight: float = 1.0,
           gamma: float = 1.0, eps: float = 1e-4, var_reduce: str = 'mean',
           route: str = 'auto', axis_name: Optional[str] = None
           ) -> tuple[Array, Metrics]:
  """VICReg loss = inv_w * invariance + var_w * variance + cov_w * covariance.

  var_reduce='mean' averages the two views' variance terms (official code);
  'sum' adds them (solo-learn). The covariance term is summed over the views
  in both codes.
  """
  check_pair(z_a, z_b, min_rows=1 if axis_name else 2)
  check_choice(var_reduce, 'var_reduce', ('mean', 'sum'))
  inv, _ = invariance(z_a, z_b, axis_name=axis_name)
  var_a, _ = variance(z_a, gamma=gamma, eps=eps, axis_name=axis_name)
  var_b, _ = variance(z_b, gamma=gamma, eps=eps, axis_name=axis_name)
  var = var_a + var_b
  if var_reduce == 'mean':
    var = 0.5 * var
  cov = (covariance(z_a, route=route, axis_name=axis_name)[0]
         + covariance(z_b, route=route, axis_name=axis_name)[0])
  loss = inv_weight * inv + var_weight * var + cov_weight * cov
  return loss, {'loss': loss, 'invariance': inv, 'variance': var, 'covariance': cov}


# ----------------------------------------------------------------------------
# Baselines.
# ----------------------------------------------------------------------------

def barlow_twins(z_a: Array, z_b: Array, *, lambd: float = 0.0051,
                 scale: float = 1.0, eps: float = 1e-5, route: str = 'auto',
                 axis_name: Optional[str] = None) -> tuple[Array, Metrics]:
  """Barlow Twins: sum_i (1 - c_ii)^2 + lambd * sum_{i != j} c_ij^2, times scale.

  Each view is batch-normalised over the (global) batch without affine
  parameters (biased variance, + eps, as torch's BatchNorm1d in training
  mode), then c = z_a^T z_b / N.  solo-learn uses scale 0.1 on CIFAR.

  The diagonal c_ii is O(N D). The full sum of squares ||a^T b||_F^2 / N^2
  equals tr(a a^T b b^T) / N^2 = sum(G_a * G_b) / N^2 with the N x N Gram
  matrices G = a a^T, so route 'gram' (chosen by 'auto' when N < D) never
  forms the D x D matrix c.
  """
  check_pair(z_a, z_b, min_rows=1 if axis_name else 2)
  check_positive(lambd, 'lambd')
  check_positive(scale, 'scale')
  check_positive(eps, 'eps')
  z_a = to_stats_dtype(gather_batch(z_a, axis_name))
  z_b = to_stats_dtype(gather_batch(z_b, axis_name))
  n = z_a.shape[0]

  def batch_norm(z):
    return center(z) / jnp.sqrt(jnp.var(z, axis=0) + eps)

  a, b = batch_norm(z_a), batch_norm(z_b)
  diagonal = jnp.sum(a * b, axis=0) / n                   # c_ii, [D]
  if resolve_route(route, n, a.shape[1]) == 'gram':
    sum_of_squares = jnp.sum((a @ a.T) * (b @ b.T)) / n ** 2   # two [N, N] Grams
  else:
    sum_of_squares = jnp.sum(jnp.square(a.T @ b / n))          # c itself, [D, D]
  on_diag = jnp.sum(jnp.square(1.0 - diagonal))
  off_diag = sum_of_squares - jnp.sum(jnp.square(diagonal))
  loss = scale * (on_diag + lambd * off_diag)
  return mean_over_devices(
      (loss, {'barlow_twins': loss, 'on_diag': on_diag, 'off_diag': off_diag}), axis_name)


def nt_xent(z_a: Array, z_b: Array, *, temperature: float = 0.2,
            axis_name: Optional[str] = None) -> tuple[Array, Metrics]:
  """SimCLR's NT-Xent over all 2N L2-normalised embeddings.

  For each of the 2N embeddings the positive is the other view of the same
  image; the other 2N - 2 are negatives; self-similarities are excluded.
  loss = mean_i -log softmax_{j != i}(s_ij / temperature)[positive(i)].
  """
  check_pair(z_a, z_b, min_rows=1 if axis_name else 2)
  check_positive(temperature, 'temperature')
  z_a = to_stats_dtype(gather_batch(z_a, axis_name))
  z_b = to_stats_dtype(gather_batch(z_b, axis_name))
  n = z_a.shape[0]
  z = l2_normalize(jnp.concatenate([z_a, z_b], axis=0))   # [2N, D]
  logits = z @ z.T / temperature                            # [2N, 2N]
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)
  positive = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(0, n)])
  log_prob = jax.nn.log_softmax(logits, axis=1)
  loss = -jnp.mean(log_prob[jnp.arange(2 * n), positive])
  accuracy = jnp.mean(jnp.argmax(logits, axis=1) == positive)
  return mean_over_devices((loss, {'nt_xent': loss, 'positive_top1': accuracy}), axis_name)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """x / max(||x||, eps) row-wise (torch.nn.functional.normalize)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def byol_regression(p: Array, t: Array, *, axis_name: Optional[str] = None
                    ) -> tuple[Array, Metrics]:
  """BYOL's normalised regression: mean_n 2 - 2 cos(p_n, t_n).

  Args:
    p: [N, D] online predictions.
    t: [N, D] target projections. They receive no gradient: the target is
      the EMA network's output and BYOL only updates it by averaging.
  """
  check_pair(p, t, names=('p', 't'), min_rows=1)
  p = to_stats_dtype(p)
  # stop_gradient even though the target network is never differentiated,
  # to make the intent explicit (as deepmind-research/byol does).
  t = jax.lax.stop_gradient(to_stats_dtype(t))
  cos = jnp.sum(l2_normalize(p) * l2_normalize(t), axis=-1)
  loss = mean_over_devices(jnp.mean(2.0 - 2.0 * cos), axis_name)
  return loss, {'byol': loss}
