"""Diagnostics: the paper's information quantities and assumption checks.

For any method's state (PAPER.md sections 1 and 4):

1. `information_quantities`: entropy estimates of the embedding Z (Gaussian,
   log-det, pairwise KL upper / Bhattacharyya lower / Chernoff-alpha bounds),
   the conditional term H(Z | X') <= D/2 log(2 pi e s^2) from two views, the
   resulting estimates of I(Z; X') = H(Z) - H(Z | X'), the effective rank and
   the covariance spectrum; on the encoder features and the projector output.
2. `locality`: the share of noisy (or augmented) copies of an image whose
   ReLU activation pattern, per layer and over the whole encoder, equals the
   clean image's, against the noise scale.
3. Gaussianity of Z given X' (`normality.within_image_normality`).
4. `generalisation_terms`: the frozen-feature linear probe's train and test
   risk, its weight norm, the invariance gap E||g(x) - g(x')|| on unlabelled
   pairs, and the measurable terms of the paper's bound.
5. `label_free_selection`: over an experiment grid's result files, the
   Spearman correlation of each label-free quantity with the validation probe.

Orchestration: `diagnose_workdir` (the `python -m ssl_jax.diagnose` command)
walks a workdir's checkpoints; `make_training_monitor` is the cheap subset
the training loop logs every `diagnostics.every_steps`.

Every statistic over N embeddings of dimension D comes from an SVD of the
centred [N, D] matrix or from [N, N] distances, never a [D, D] matrix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssl_jax import augment
from ssl_jax import estimators
from ssl_jax import evaluate
from ssl_jax import input_pipeline
from ssl_jax import losses
from ssl_jax import models
from ssl_jax import normality
from ssl_jax import sharding

REPRESENTATIONS = ('features', 'z')    # encoder output, projector output
ENTROPIES = ('gaussian', 'logdet', 'pairwise_upper', 'pairwise_lower')
INFORMATION = ('gaussian', 'logdet', 'pairwise_upper', 'pairwise_lower')   # mi_<name>


@dataclasses.dataclass(frozen=True)
class Settings:
  """How much each diagnostic looks at. The defaults take about a minute per
  checkpoint of the Fashion-MNIST default on 2 CPU cores."""
  num_images: int = 2048             # information quantities: images x 2 views
  chernoff_alphas: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)
  locality_images: int = 64          # K clean images
  locality_copies: int = 16          # noisy copies per image and scale
  noise_scales: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0)
  gauss_images: int = 32             # K images ...
  gauss_views: int = 80              # ... with M views: half fit directions, half tested
  # D': tested views >= 5 D'. Henze-Zirkler's power on 40 views falls fast
  # with D' (tests/diagnostics_test.py: a bimodal direction passes 0%, 12%,
  # 75% of the time at D' = 2, 4, 8), so 4 by default.
  gauss_dims: int = 4
  gauss_directions_1d: int = 8       # random directions per image for Shapiro-Wilk
  probe_train_images: int = 10_000
  probe_test_images: int = 10_000
  probe_epochs: int = 30
  level: float = 0.05                # test level alpha
  delta: float = 0.05                # confidence of the concentration term
  batch_size: int = 512
  seed: int = 0

  def __post_init__(self):
    for name in ('num_images', 'locality_images', 'locality_copies', 'gauss_images',
                 'gauss_views', 'gauss_dims', 'probe_train_images', 'probe_test_images',
                 'probe_epochs', 'batch_size'):
      if getattr(self, name) <= 0:
        raise ValueError(f'diagnostics setting {name} must be > 0, got {getattr(self, name)}.')
    if self.num_images < 2:
      raise ValueError('num_images must be >= 2 for any batch statistic.')
    if self.gauss_views - self.gauss_views // 2 < 5 * self.gauss_dims:
      raise ValueError(
          f'gauss_views={self.gauss_views} leaves {self.gauss_views - self.gauss_views // 2} '
          f'tested views per image for a {self.gauss_dims}-dimensional test; it needs at '
          f'least 5 x gauss_dims: set gauss_views >= {10 * self.gauss_dims} or lower gauss_dims.')
    if not all(0 < a < 1 for a in self.chernoff_alphas):
      raise ValueError(f'chernoff_alphas must lie in (0, 1), got {self.chernoff_alphas}.')
    if not all(s >= 0 for s in self.noise_scales):
      raise ValueError(f'noise_scales must be >= 0, got {self.noise_scales}.')


# ----------------------------------------------------------------------------
# 1. Information quantities.
# ----------------------------------------------------------------------------

@jax.jit
def _spectrum_stats(z: jax.Array) -> dict[str, jax.Array]:
  """Eigenvalues of C = zc^T zc / N, descending ([min(N, D)]), and the effective
  rank, from one SVD of zc: neither the [D, D] nor the [N, N] matrix is formed."""
  s = jnp.linalg.svd(losses.center(losses.to_stats_dtype(z)), compute_uv=False)
  return {'spectrum': jnp.square(s) / z.shape[0],
          'effective_rank': estimators.effective_rank_of_singular_values(s)}


@jax.jit
def _pairwise_terms(z: jax.Array, sigma2: jax.Array, alphas: jax.Array) -> dict[str, jax.Array]:
  """(1/N) sum_i logsumexp_j(-||z_i - z_j||^2 / (c sigma^2)) for the KL (c = 2),
  Bhattacharyya (c = 8) and Chernoff-alpha kernels, sharing one distance
  matrix; sigma2 <= 0 means the median off-diagonal squared distance."""
  d2 = estimators.pairwise_sq_distances(z)
  sigma2 = jnp.where(sigma2 > 0, sigma2, estimators.median_offdiag(d2))
  sigma2 = jnp.maximum(sigma2, 1e-12)
  lse = lambda c: jnp.mean(jax.nn.logsumexp(-d2 / (c * sigma2), axis=1))
  return {'upper': lse(2.0), 'lower': lse(8.0),
          'chernoff': jax.vmap(lambda a: lse(2.0 / (a * (1.0 - a))))(alphas), 'sigma2': sigma2}


def information_quantities(z_a: np.ndarray, z_b: np.ndarray, *, beta: float = 1.0,
                           alphas: Sequence[float] = (0.5,)) -> dict[str, Any]:
  """Entropy estimates of Z, the conditional entropy, and I(Z; X) estimates.

  Entropy of Z, on the sample of both views [2N, D], with the estimators the
  objectives use: entropy_gaussian (ridge 1e-6), entropy_logdet (the run's
  beta, as the differential entropy it stands for:
  estimators.logdet_as_differential_entropy; logdet_entropy is the raw
  0.5 log det(I + beta C)) and entropy_pairwise_upper / _lower (KL and
  Bhattacharyya bounds at the median bandwidth, as the pairwise objective).

  The conditional term and the information, under the paper's model
  (PAPER.md section 1): given an image, Z ~ N(mu_n, s^2 I). Two views fit
  s^2 = invariance / 2 per dimension (E(z_a - z_b)^2 = 2 s^2), so
    conditional_entropy = H(Z | X) = D/2 log(2 pi e s^2), and
    conditional_entropy_paper = D/2 log(2 pi e * invariance), the bound
      -E log q(Z | X') with q = N(z_b, s'^2 I) centred on the other view
      (estimators.conditional_entropy_bound), looser by D/2 log 2.
  Z is then the mixture of the N components N(mu_n, s^2 I), mu_n estimated
  by the views' midpoint, and I(Z; X) = H(Z) - H(Z | X) is:
    mi_pairwise_lower <= I <= mi_pairwise_upper: Kolchinsky & Tracey's
      bounds, log N - mean_i logsumexp_j(-||mu_i - mu_j||^2 / (c s^2)),
      c = 8 (Bhattacharyya) and 2 (KL); mi_chernoff {alpha: bound} are the
      other lower bounds; all lie in [0, log N];
    mi_logdet = 0.5 log det(I + C_mu / s^2): the Gaussian channel, the
      log-det estimator with beta = 1 / s^2 on the centres;
    mi_gaussian = entropy_gaussian - conditional_entropy: the Gaussian
      (maximum-entropy) upper estimate.

  Args:
    z_a, z_b: [N, D] embeddings of two augmented views of N images.
    beta: the run's log-det beta.
    alphas: Chernoff orders in (0, 1).
  Returns:
    The values above, plus effective_rank, spectrum (the covariance's
    eigenvalues of Z, descending), invariance, within_image_variance,
    log_num_images, pairwise_sigma2 (the median bandwidth).
  """
  z_a, z_b = np.asarray(z_a, np.float32), np.asarray(z_b, np.float32)
  z = jnp.asarray(np.concatenate([z_a, z_b]))
  n, d = z_a.shape
  spec = _spectrum_stats(z)
  eig = np.asarray(spec['spectrum'], np.float64)
  eig_all = np.concatenate([eig, np.zeros(max(0, d - len(eig)))])
  gaussian = 0.5 * d * math.log(2 * math.pi * math.e) + 0.5 * np.sum(np.log(eig_all + 1e-6))
  logdet = 0.5 * np.sum(np.log1p(beta * eig))
  alphas_arr = jnp.asarray(alphas, jnp.float32)
  median = _pairwise_terms(z, jnp.float32(0.0), alphas_arr)
  h_median = 0.5 * d * math.log(2 * math.pi * math.e * float(median['sigma2'])) + math.log(2 * n)

  invariance = float(np.mean(np.square(z_a.astype(np.float64) - z_b)))
  s2 = max(invariance / 2, 1e-30)
  h_cond = 0.5 * d * math.log(2 * math.pi * math.e * s2)
  centres = jnp.asarray((z_a + z_b) / 2)
  mix = _pairwise_terms(centres, jnp.float32(s2), alphas_arr)
  centre_eig = np.asarray(_spectrum_stats(centres)['spectrum'], np.float64)
  return {
      'num_samples': 2 * n, 'dim': d, 'beta': beta,
      'entropy_gaussian': float(gaussian),
      'logdet_entropy': float(logdet),
      'entropy_logdet': float(estimators.logdet_as_differential_entropy(logdet, d, beta)),
      'entropy_pairwise_upper': h_median - float(median['upper']),
      'entropy_pairwise_lower': h_median - float(median['lower']),
      'pairwise_sigma2': float(median['sigma2']),
      'invariance': invariance, 'within_image_variance': s2,
      'conditional_entropy': h_cond,
      'conditional_entropy_paper': float(estimators.conditional_entropy_bound(
          jnp.asarray(z_a), jnp.asarray(z_b))[0]),
      'log_num_images': math.log(n),
      'mi_pairwise_upper': math.log(n) - float(mix['upper']),
      'mi_pairwise_lower': math.log(n) - float(mix['lower']),
      'mi_chernoff': {str(a): math.log(n) - float(v)
                      for a, v in zip(alphas, np.asarray(mix['chernoff']))},
      'mi_logdet': float(0.5 * np.sum(np.log1p(centre_eig / s2))),
      'mi_gaussian': float(gaussian) - h_cond,
      'effective_rank': float(spec['effective_rank']),
      'spectrum': eig.tolist(),
  }


# ----------------------------------------------------------------------------
# 2. Locality: does the noise stay inside one linear region?
# ----------------------------------------------------------------------------

def pattern_agreement(patterns_fn: Callable, x_clean: jax.Array, x_copies: jax.Array
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Per copy and layer: does its ReLU pattern equal its clean image's, and the
  share of units that agree.

  Args:
    patterns_fn: x [B, ...] -> list of boolean activation patterns [B, ...].
    x_clean: [K, ...] clean inputs; x_copies: [K * C, ...], copy j of image
      k at row k * C + j.
  Returns:
    (equal [K * C, L] bool, agreement [K * C, L] float), L layers.
  """
  clean = patterns_fn(x_clean)
  copies = patterns_fn(x_copies)
  reps = x_copies.shape[0] // x_clean.shape[0]
  equal, agree = [], []
  for pc, pn in zip(clean, copies):
    same = jnp.repeat(pc, reps, axis=0) == pn
    same = same.reshape(same.shape[0], -1)
    equal.append(jnp.all(same, axis=1))
    agree.append(jnp.mean(same, axis=1))
  return np.stack([np.asarray(e) for e in equal], 1), np.stack([np.asarray(a) for a in agree], 1)


def locality(patterns_fn: Callable, x_clean: jax.Array, key: jax.Array, *,
             scales: Sequence[float], copies: int) -> dict[str, Any]:
  """Share of Gaussian-noise copies x + s * eps in the clean input's linear region.

  For each scale s, `copies` draws per clean image; the noise is in the
  network's (normalised) input units. Returns, per scale: 'encoder' (all
  layers' patterns equal), 'per_layer' [L] and 'unit_agreement' [L] (the mean
  share of units with the same sign).
  """
  out = {'scales': [float(s) for s in scales], 'encoder': [], 'per_layer': [],
         'unit_agreement': []}
  base = jnp.repeat(x_clean, copies, axis=0)
  for i, scale in enumerate(scales):
    noise = jax.random.normal(jax.random.fold_in(key, i), base.shape, base.dtype)
    equal, agree = pattern_agreement(patterns_fn, x_clean, base + scale * noise)
    out['encoder'].append(float(np.mean(np.all(equal, axis=1))))
    out['per_layer'].append(np.mean(equal, axis=0).tolist())
    out['unit_agreement'].append(np.mean(agree, axis=0).tolist())
  return out


# ----------------------------------------------------------------------------
# 4. Generalisation terms.
# ----------------------------------------------------------------------------

def generalisation_terms(train: tuple[np.ndarray, np.ndarray],
                         test: tuple[np.ndarray, np.ndarray],
                         pairs: tuple[np.ndarray, np.ndarray], *, num_classes: int,
                         epochs: int = 30, delta: float = 0.05) -> dict[str, float]:
  """The frozen-feature linear probe's risks and the measurable bound terms.

  PAPER.md section 4: the probe's downstream risk is bounded by its empirical
  risk + a term in ||w|| times the invariance gap ||f(x) - f(x')|| on
  unlabelled pairs + an information / complexity term + a concentration
  term. The constants are uncertain, so the terms are reported separately:
  - lipschitz_term = ||W||_2 * E||g(x) - g(x')||: how far the logits can move
    between two views (g: the probe's standardised features, ||W||_2 the
    spectral norm), the quantity the invariance term controls;
  - concentration_term = sqrt(log(2 / delta) / (2 n)): Hoeffding for the 0-1
    loss on n training examples, at confidence 1 - delta.
  The information term is not given a value here: its form is uncertain.

  Args:
    train, test: (features [M, F], labels [M]) for the probe.
    pairs: (features of view a, of view b) [P, F] of unlabelled images.
  """
  probe = evaluate.linear_probe(*train, *test, num_classes=num_classes, epochs=epochs,
                                with_params=True)
  w = np.asarray(probe['params']['w'], np.float64)
  g_a = (pairs[0] - probe['mean']) / probe['std']
  g_b = (pairs[1] - probe['mean']) / probe['std']
  gap = float(np.mean(np.linalg.norm(g_a - g_b, axis=1)))
  spectral = float(np.linalg.norm(w, 2))
  n = len(train[1])
  return {
      'train_error': 1.0 - probe['train_acc'], 'test_error': 1.0 - probe['test_acc'],
      'error_gap': probe['train_acc'] - probe['test_acc'],
      'train_risk': probe['train_loss'], 'test_risk': probe['test_loss'],
      'risk_gap': probe['test_loss'] - probe['train_loss'],
      'weight_norm_fro': float(np.linalg.norm(w)), 'weight_norm_spectral': spectral,
      'invariance_gap': gap, 'lipschitz_term': spectral * gap,
      'concentration_term': math.sqrt(math.log(2 / delta) / (2 * n)),
      'probe_train_examples': n, 'probe_test_examples': int(len(test[1])),
  }


# ----------------------------------------------------------------------------
# 5. Label-free selection over an experiment grid.
# ----------------------------------------------------------------------------

LABEL_FREE = ('effective_rank', 'entropy_logdet', 'entropy_pairwise_upper',
              'entropy_pairwise_lower', 'entropy_gaussian')


def spearman_ci(x: Sequence[float], y: Sequence[float], level: float = 0.95
                ) -> tuple[float, float, float, int]:
  """Spearman's rho with a Fisher-z confidence interval: (rho, low, high, n).

  The interval uses SE = sqrt(1.06 / (n - 3)) (Fieller, Hartley & Pearson
  1957); it needs n >= 4, else (rho, nan, nan, n).
  """
  from scipy import stats as sp_stats
  x, y = np.asarray(x, float), np.asarray(y, float)
  keep = np.isfinite(x) & np.isfinite(y)
  x, y = x[keep], y[keep]
  n = len(x)
  if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:  # a constant has no rank correlation
    return float('nan'), float('nan'), float('nan'), n
  rho = float(sp_stats.spearmanr(x, y).statistic)
  if n < 4 or not math.isfinite(rho):
    return rho, float('nan'), float('nan'), n
  z = math.atanh(max(min(rho, 0.999999), -0.999999))
  half = sp_stats.norm.ppf(0.5 + level / 2) * math.sqrt(1.06 / (n - 3))
  return rho, math.tanh(z - half), math.tanh(z + half), n


def label_free_selection(results_dir: str, out_prefix: str,
                         accuracy: str = 'linear_test_acc') -> dict[str, Any]:
  """Which label-free quantity ranks an experiment's tuning cells like the probe?

  Reads every tuning cell's result file in results_dir (evaluated on the
  validation split; diverged cells are left out), correlates each LABEL_FREE
  quantity of its frozen features with the validation `accuracy` (Spearman
  with a 95% interval) and writes out_prefix + '.json', '.md' and '.png'
  (one scatter plot per quantity).
  """
  cells = []
  for name in sorted(os.listdir(results_dir)):
    if not name.endswith('.json'):
      continue
    with open(os.path.join(results_dir, name)) as f:
      result = json.load(f)
    if result.get('stage') == 'tune' and result.get('status', 'completed') != 'diverged' \
        and accuracy in result.get('metrics', {}):
      cells.append(result)
  if not cells:
    raise FileNotFoundError(f'No evaluated tuning cells in {results_dir}.')
  acc = [c['metrics'][accuracy] for c in cells]
  rows = {}
  for q in LABEL_FREE:
    values = [c['metrics'].get(q, float('nan')) for c in cells]
    rho, low, high, n = spearman_ci(values, acc)
    rows[q] = {'spearman': rho, 'ci95': [low, high], 'n': n}
  out = {'results_dir': results_dir, 'accuracy': accuracy, 'cells': [
      {'cell': c['cell'], 'method': c['method'], accuracy: c['metrics'][accuracy],
       **{q: c['metrics'].get(q) for q in LABEL_FREE}} for c in cells], 'correlations': rows}
  with open(out_prefix + '.json', 'w') as f:
    json.dump(out, f, indent=1)
  lines = [f'Label-free selection: Spearman correlation with the validation {accuracy} over '
           f'{len(cells)} tuning cells of `{results_dir}` (95% interval, Fisher z).', '',
           '| quantity | Spearman rho | 95% CI | cells |', '|---|---|---|---|']
  for q, r in rows.items():
    ci = ('n/a' if not math.isfinite(r['ci95'][0])
          else f'[{r["ci95"][0]:+.2f}, {r["ci95"][1]:+.2f}]')
    lines.append(f'| {q} | {r["spearman"]:+.2f} | {ci} | {r["n"]} |')
  with open(out_prefix + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')
  _plot_selection(out, out_prefix + '.png')
  return out


def _plot_selection(out: dict[str, Any], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(LABEL_FREE), figsize=(3.6 * len(LABEL_FREE), 3.3))
  methods = sorted({c['method'] for c in out['cells']})
  colours = dict(zip(methods, plt.cm.tab10.colors))
  for ax, q in zip(axes, LABEL_FREE):
    for c in out['cells']:
      if c.get(q) is not None:
        ax.scatter(c[q], 100 * c[out['accuracy']], color=colours[c['method']], s=18,
                   label=c['method'])
    r = out['correlations'][q]
    ax.set_title(f'{q}\nrho={r["spearman"]:+.2f} (n={r["n"]})', fontsize=8)
    ax.set_xlabel(q, fontsize=7)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(f'validation {out["accuracy"]} (%)')
  handles, labels = axes[0].get_legend_handles_labels()
  unique = dict(zip(labels, handles))
  fig.legend(unique.values(), unique.keys(), fontsize=7, loc='lower center',
             ncol=len(unique))
  fig.tight_layout(rect=(0, 0.08, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ----------------------------------------------------------------------------
# The network and the fixed evaluation data of one run.
# ----------------------------------------------------------------------------

def fixed_images(config, split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
  """The first `count` images and labels of `split`, un-augmented, in a fixed order."""
  dataset = input_pipeline.eval_dataset(config.data.name, split, local_batch=min(count, 1000),
                                        data_dir=config.data.data_dir)
  images, labels, have = [], [], 0
  for batch in dataset.as_numpy_iterator():
    keep = batch['mask'].astype(bool)
    images.append(batch['image'][keep])
    labels.append(batch['label'][keep])
    have += int(keep.sum())
    if have >= count:
      break
  images, labels = np.concatenate(images)[:count], np.concatenate(labels)[:count]
  if len(images) < count:
    raise ValueError(f'{config.data.name}:{split} has {len(images)} images, fewer than the '
                     f'{count} asked for; lower the diagnostics image counts.')
  return images, labels


class Network:
  """A run's model as jitted functions of (params, batch_stats, inputs).

  Inputs are split into batches of `batch_size` rows (padded to that size:
  one compilation), sharded over the mesh's 'data' axis like training.
  BatchNorm uses its running averages, so each example is processed alone.
  """

  def __init__(self, run, mesh, batch_size: int = 512):
    self.mesh = mesh
    self.batch_size = max(mesh.size, (batch_size // mesh.size) * mesh.size)
    graphdef, spec, size = run.graphdef, run.spec, run.image_size
    view_a, view_b = run.views

    def model(params, batch_stats):
      return nnx.merge(graphdef, params, batch_stats, copy=True)

    @jax.jit
    def outputs(params, batch_stats, x):
      out = model(params, batch_stats)(x, train=False)
      return {k: out[k] for k in REPRESENTATIONS}

    @jax.jit
    def patterns(params, batch_stats, x):
      with models.record_relu_patterns() as recorded:
        model(params, batch_stats).encoder(x, train=False)
      return recorded

    def augmented(view):
      return jax.jit(lambda images, key: augment.normalize(
          augment.augment_batch(images, key, view, size), spec.mean, spec.std))

    self._outputs, self._patterns = outputs, patterns
    self.view_a, self.view_b = augmented(view_a), augmented(view_b)
    self.clean = jax.jit(lambda images: augment.eval_view(images, out_size=size,
                                                          mean=spec.mean, std=spec.std))

  def put(self, x: np.ndarray) -> jax.Array:
    """Host rows -> a global array sharded over 'data' (rows a multiple of the mesh)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding.batch_sharding(self.mesh),
                                        lambda index: x[index])

  def map(self, fn: Callable, *arrays: np.ndarray) -> Any:
    """fn over row batches of host arrays; the outputs' rows concatenated on the host."""
    n = len(arrays[0])
    outs = []
    for start in range(0, n, self.batch_size):
      chunk = [a[start:start + self.batch_size] for a in arrays]
      rows = len(chunk[0])
      chunk = [_pad_rows(c, self.batch_size) for c in chunk]
      out = fn(*(self.put(c) for c in chunk))
      outs.append(jax.tree.map(lambda a: np.asarray(a)[:rows], out))
    return jax.tree.map(lambda *a: np.concatenate(a), *outs)

  def embed(self, params, batch_stats, images: np.ndarray, *, view: Optional[str] = None,
            key: Optional[jax.Array] = None) -> dict[str, np.ndarray]:
    """{'features', 'z'} of uint8 images: clean (view None) or augmented ('a' or 'b').

    Augmentation keys are fold_in(key, row): the same images get the same
    views at every checkpoint.
    """
    if view is None:
      prepare = self.clean
    else:
      augment_fn = self.view_a if view == 'a' else self.view_b
      prepare = lambda imgs, rows: augment_fn(imgs, jax.random.fold_in(key, rows[0]))
    rows = np.arange(len(images), dtype=np.int32)

    def fn(imgs, idx):
      x = prepare(imgs) if view is None else prepare(imgs, idx)
      return self._outputs(params, batch_stats, x)

    # One key per batch (its first row), so the views do not depend on the mesh.
    return self.map(fn, images, rows)

  def patterns_fn(self, params, batch_stats) -> Callable:
    return lambda x: self._patterns(params, batch_stats, x)


@dataclasses.dataclass
class FixedData:
  """The images every checkpoint is diagnosed on (the same at every step).

  eval_images come from the run's evaluation split (its test split, or the
  validation hold-out of a tuning run); the probe trains on its train split.
  """
  eval_images: np.ndarray                   # [E, H, W, C] uint8
  probe_train: tuple[np.ndarray, np.ndarray]
  probe_test: tuple[np.ndarray, np.ndarray]

  @classmethod
  def load(cls, config, spec, settings: Settings) -> 'FixedData':
    count = max(settings.num_images, settings.locality_images, settings.gauss_images,
                settings.probe_test_images)
    images, labels = fixed_images(config, spec.test_split, count)
    train = fixed_images(config, spec.train_split, settings.probe_train_images)
    return cls(eval_images=images, probe_train=train,
               probe_test=(images[:settings.probe_test_images],
                           labels[:settings.probe_test_images]))


def run_beta(config) -> float:
  """The log-det beta of the run's own objective, else 1."""
  terms = config.loss.terms
  return float(terms['logdet_entropy'].get('beta', 1.0)) if 'logdet_entropy' in terms else 1.0


def diagnose_state(net: Network, params, batch_stats, data: FixedData, settings: Settings, *,
                   beta: float, num_classes: int, report: Callable[[str], None] = print
                   ) -> dict[str, Any]:
  """Every diagnostic of one state: information, locality, gaussianity, generalisation."""
  key = jax.random.key(settings.seed)
  k_info, k_loc, k_gauss, k_pairs = jax.random.split(key, 4)
  out: dict[str, Any] = {}

  report('information quantities')
  view_a = net.embed(params, batch_stats, data.eval_images[:settings.num_images], view='a', key=jax.random.fold_in(k_info, 0))
  view_b = net.embed(params, batch_stats, data.eval_images[:settings.num_images], view='b', key=jax.random.fold_in(k_info, 1))
  out['information'] = {rep: information_quantities(view_a[rep], view_b[rep], beta=beta,
                                                    alphas=settings.chernoff_alphas)
                        for rep in REPRESENTATIONS}

  report('locality')
  images = data.eval_images[:settings.locality_images]
  # Groups of whole images, a multiple of the device count where the batch allows.
  per_group = max(net.mesh.size, net.batch_size // settings.locality_copies
                  // net.mesh.size * net.mesh.size)
  patterns = net.patterns_fn(params, batch_stats)
  noise, aug_equal, aug_agree = [], [], []
  for g, start in enumerate(range(0, len(images), per_group)):
    group = images[start:start + per_group]
    clean = net.clean(net.put(_pad_rows(group, net.mesh.size)))
    noise.append((len(group), locality(patterns, clean, jax.random.fold_in(k_loc, g),
                                       scales=settings.noise_scales,
                                       copies=settings.locality_copies)))
    copies = np.repeat(_pad_rows(group, net.mesh.size), settings.locality_copies, axis=0)
    augmented = net.view_a(net.put(copies), jax.random.fold_in(k_loc, 10_000 + g))
    equal, agree = pattern_agreement(patterns, clean, augmented)
    keep = len(group) * settings.locality_copies
    aug_equal.append(equal[:keep])
    aug_agree.append(agree[:keep])
  out['locality'] = _merge_locality(noise)
  aug_equal, aug_agree = np.concatenate(aug_equal), np.concatenate(aug_agree)
  out['locality']['augmentation'] = {
      'encoder': float(np.mean(np.all(aug_equal, axis=1))),
      'per_layer': np.mean(aug_equal, axis=0).tolist(),
      'unit_agreement': np.mean(aug_agree, axis=0).tolist()}

  report('gaussianity')
  k, m = settings.gauss_images, settings.gauss_views
  repeated = np.repeat(data.eval_images[:k], m, axis=0)
  views = net.embed(params, batch_stats, repeated, view='a', key=k_gauss)
  out['gaussianity'] = {rep: normality.within_image_normality(
      views[rep].reshape(k, m, -1), dims=min(settings.gauss_dims, views[rep].shape[1]),
      directions_1d=settings.gauss_directions_1d, level=settings.level, seed=settings.seed)
      for rep in REPRESENTATIONS}

  report('generalisation terms')
  train = net.embed(params, batch_stats, data.probe_train[0])['features']
  test = net.embed(params, batch_stats, data.probe_test[0])['features']
  unlabelled = data.probe_train[0][:settings.num_images]
  pair_a = net.embed(params, batch_stats, unlabelled, view='a',
                     key=jax.random.fold_in(k_pairs, 0))['features']
  pair_b = net.embed(params, batch_stats, unlabelled, view='b',
                     key=jax.random.fold_in(k_pairs, 1))['features']
  out['generalisation'] = generalisation_terms(
      (train, data.probe_train[1]), (test, data.probe_test[1]), (pair_a, pair_b),
      num_classes=num_classes, epochs=settings.probe_epochs, delta=settings.delta)
  return out


def _pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
  missing = -len(x) % multiple
  return np.concatenate([x, np.repeat(x[-1:], missing, 0)]) if missing else x


def _merge_locality(groups: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
  """Image-weighted mean of per-group locality results."""
  total = sum(n for n, _ in groups)
  merged = {'scales': groups[0][1]['scales']}
  for key in ('encoder', 'per_layer', 'unit_agreement'):
    merged[key] = (sum(n * np.asarray(r[key]) for n, r in groups) / total).tolist()
  return merged


# ----------------------------------------------------------------------------
# During training: the cheap subset, every diagnostics.every_steps.
# ----------------------------------------------------------------------------

def make_training_monitor(config, run, mesh) -> Optional[Callable[[int, Any], dict]]:
  """(step, state) -> {'diag/...': value} at multiples of diagnostics.every_steps.

  On a fixed batch of diagnostics.num_images evaluation images with two fixed
  augmented views, for the encoder features and the projector output: the
  log-det entropy (beta 1), the pairwise KL upper bound (median bandwidth),
  the effective rank and the invariance. None when every_steps is 0.
  """
  diag = config.get('diagnostics', {})
  every = int(diag.get('every_steps', 0) or 0)
  if every < 0:
    raise ValueError(f'diagnostics.every_steps must be >= 0 (0: off), got {every}.')
  if every == 0:
    return None
  count = int(diag.get('num_images', 512))
  count = max(mesh.size, count // mesh.size * mesh.size)
  net = Network(run, mesh, batch_size=count)
  images, _ = fixed_images(config, run.spec.test_split, count)
  key = jax.random.key(config.seed)
  x_a = net.view_a(net.put(images), jax.random.fold_in(key, 0))
  x_b = net.view_b(net.put(images), jax.random.fold_in(key, 1))

  @jax.jit
  def cheap(params, batch_stats, x_a, x_b):
    out_a = net._outputs(params, batch_stats, x_a)
    out_b = net._outputs(params, batch_stats, x_b)
    scalars = {}
    for rep in REPRESENTATIONS:
      z = jnp.concatenate([out_a[rep], out_b[rep]])
      scalars[f'diag/{rep}_logdet_entropy'] = estimators.logdet_entropy(z)[0]
      scalars[f'diag/{rep}_pairwise_entropy'] = estimators.pairwise_entropy(
          z, sigma_mode='median')[0]
      scalars[f'diag/{rep}_effective_rank'] = estimators.effective_rank(z)
      scalars[f'diag/{rep}_invariance'] = jnp.mean(jnp.square(out_a[rep] - out_b[rep]))
    return scalars

  def monitor(step: int, state) -> dict[str, float]:
    if step % every and step != run.total_steps:
      return {}
    return {k: float(v) for k, v in
            jax.device_get(cheap(state.params, state.batch_stats, x_a, x_b)).items()}

  return monitor


# ----------------------------------------------------------------------------
# After training: `python -m ssl_jax.diagnose --workdir=DIR`.
# ----------------------------------------------------------------------------

def select_steps(available: Sequence[int], which: str) -> list[int]:
  """'all' (step 0, the initialisation, and every checkpoint), 'last', or '100,300'."""
  available = sorted(available)
  if not available and which != 'init':
    raise FileNotFoundError('The workdir has no checkpoint to diagnose; train first (a run '
                            'keeps checkpoints every keep_checkpoint_period steps).')
  if which == 'all':
    return [0] + [s for s in available if s != 0]
  if which == 'last':
    return [available[-1]]
  try:
    steps = sorted({int(s) for s in which.split(',') if s.strip()})
  except ValueError:
    raise ValueError(f"--checkpoints must be 'all', 'last' or steps like '100,300', "
                     f'got {which!r}.') from None
  missing = [s for s in steps if s != 0 and s not in available]
  if missing:
    raise ValueError(f'No checkpoint at step(s) {missing}; the workdir has {available}.')
  return steps


def scalars_of(result: dict[str, Any]) -> dict[str, float]:
  """The headline numbers of one step's diagnostics, for TensorBoard."""
  out = {}
  for rep, info in result['information'].items():
    for key in ('effective_rank', 'conditional_entropy', 'conditional_entropy_paper',
                'invariance', 'logdet_entropy', *[f'entropy_{e}' for e in ENTROPIES],
                *[f'mi_{e}' for e in INFORMATION]):
      out[f'information/{rep}/{key}'] = info[key]
  loc = result['locality']
  for scale, share in zip(loc['scales'], loc['encoder']):
    out[f'locality/noise_{scale:g}'] = share
  out['locality/augmentation'] = loc['augmentation']['encoder']
  for rep, g in result['gaussianity'].items():
    for key in ('henze_zirkler_pass_rate', 'mardia_skewness_pass_rate',
                'mardia_kurtosis_pass_rate', 'shapiro_wilk_pass_rate'):
      out[f'gaussianity/{rep}/{key}'] = g[key]
  for key, value in result['generalisation'].items():
    out[f'generalisation/{key}'] = value
  return {k: float(v) for k, v in out.items()}


def diagnose_workdir(workdir: str, *, checkpoints: str = 'all',
                     settings: Settings = Settings(), progress: bool = True,
                     out_dir: Optional[str] = None) -> dict[str, Any]:
  """Diagnoses a training workdir's checkpoints; writes out_dir (DIR/diagnostics/).

  diagnostics.json (every step diagnosed so far, merged with earlier runs of
  this command), TensorBoard scalars at each checkpoint's step, and PNG
  figures. The result file is rewritten after each step, so an interrupted
  command keeps what it finished. It refuses to write into a workdir that is
  still training (pass out_dir elsewhere, or wait).
  """
  from ssl_jax import checkpointing
  from ssl_jax import metrics as metrics_lib
  from ssl_jax import runs
  from ssl_jax import workdir_lock
  out_dir = out_dir or os.path.join(workdir, 'diagnostics')
  if os.path.abspath(out_dir).startswith(os.path.abspath(workdir) + os.sep):
    workdir_lock.refuse_if_training(workdir, 'ssl_jax.diagnose')
  config = runs.read_config(workdir)
  input_pipeline.hide_accelerators_from_tensorflow()
  mesh = sharding.make_mesh()
  run = runs.build(config, mesh)
  manager = checkpointing.make_manager(workdir, max_to_keep=config.keep_checkpoints,
                                       keep_period=config.get('keep_checkpoint_period', 0),
                                       create=False)
  steps = select_steps(manager.all_steps(), checkpoints)
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, 'diagnostics.json')
  record = {'workdir': os.path.abspath(workdir), 'method': config.method, 'steps': {}}
  if os.path.exists(json_path):
    with open(json_path) as f:
      record = json.load(f)
  record['settings'] = dataclasses.asdict(settings)
  net = Network(run, mesh, batch_size=settings.batch_size)
  data = FixedData.load(config, run.spec, settings)
  writer = metrics_lib.MetricWriter(out_dir, enabled=jax.process_index() == 0)
  from tqdm import tqdm
  bar = tqdm(total=len(steps) * 4, disable=not progress, desc='diagnose', unit='part',
             dynamic_ncols=True)
  for step in steps:
    if step == 0:  # the initialisation, rebuilt from the seed
      params, batch_stats = run.state.params, run.state.batch_stats
    else:
      state = checkpointing.restore_step(manager, step, run.abstract_state(mesh), config)
      params, batch_stats = state.params, state.batch_stats

    def report(part, step=step):
      bar.set_postfix_str(f'step {step}: {part}')
      if not report.first:
        bar.update(1)
      report.first = False
    report.first = True
    result = diagnose_state(net, params, batch_stats, data, settings, beta=run_beta(config),
                            num_classes=run.spec.num_classes, report=report)
    bar.update(1)
    record['steps'][str(step)] = result
    writer.write_scalars(step, scalars_of(result))
    if jax.process_index() == 0:
      with open(json_path + '.tmp', 'w') as f:
        json.dump(record, f)
      os.replace(json_path + '.tmp', json_path)
  bar.close()
  writer.flush()
  manager.close()
  if jax.process_index() == 0:
    record['figures'] = plot_diagnostics(record, out_dir)
  return record


# ----------------------------------------------------------------------------
# Figures.
# ----------------------------------------------------------------------------

def plot_diagnostics(record: dict[str, Any], out_dir: str) -> list[str]:
  """information.png, spectrum.png, locality.png, gaussianity.png, generalisation.png."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  steps = sorted(int(s) for s in record['steps'])
  results = [record['steps'][str(s)] for s in steps]
  title = f'{record.get("method", "")}: {os.path.basename(record.get("workdir", ""))}'
  colours = plt.cm.viridis(np.linspace(0, 0.9, len(steps)))
  marker = dict(marker='o', ms=3)
  paths = []

  def save(fig, name):
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

  # Information quantities over training.
  fig, axes = plt.subplots(2, 3, figsize=(14, 7))
  for row, rep in enumerate(REPRESENTATIONS):
    info = [r['information'][rep] for r in results]
    ax = axes[row, 0]
    for e in ENTROPIES:
      ax.plot(steps, [i[f'entropy_{e}'] for i in info], label=f'H {e}', **marker)
    ax.plot(steps, [i['conditional_entropy'] for i in info], 'k--', label='H(Z|X)', **marker)
    ax.plot(steps, [i['conditional_entropy_paper'] for i in info], 'k:',
            label='H(Z|X\') bound (q at the other view)', **marker)
    ax.set_title(f'{rep}: entropy estimates (nats)', fontsize=9)
    ax = axes[row, 1]
    for e in INFORMATION:
      ax.plot(steps, [i[f'mi_{e}'] for i in info], label=f'I via {e}', **marker)
    ax.plot(steps, [i['log_num_images'] for i in info], 'k--', label='log N (pairwise ceiling)')
    ax.set_yscale('symlog')
    ax.set_title(f'{rep}: I(Z;X) under Z|X ~ N(mu, s^2 I)', fontsize=9)
    ax = axes[row, 2]
    ax.plot(steps, [i['effective_rank'] for i in info], color='C3', **marker)
    ax.set_title(f'{rep}: effective rank (of {info[0]["dim"]})', fontsize=9)
    for ax in axes[row]:
      ax.set_xlabel('step')
      ax.grid(alpha=0.3)
    axes[row, 0].legend(fontsize=6)
    axes[row, 1].legend(fontsize=6)
  save(fig, 'information.png')

  # Covariance spectra.
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, rep in zip(axes, REPRESENTATIONS):
    for c, s, r in zip(colours, steps, results):
      eig = np.asarray(r['information'][rep]['spectrum'])
      ax.semilogy(np.arange(1, len(eig) + 1), np.maximum(eig, 1e-12), color=c,
                  label=f'step {s}')
    ax.set_xscale('log')
    ax.set_title(f'{rep}: covariance eigenvalues', fontsize=9)
    ax.set_xlabel('index')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  save(fig, 'spectrum.png')

  # Locality.
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for c, s, r in zip(colours, steps, results):
    loc = r['locality']
    axes[0].semilogx(loc['scales'], loc['encoder'], color=c, label=f'step {s}', **marker)
  last = results[-1]['locality']
  per_layer = np.asarray(last['per_layer'])
  agreement = np.asarray(last['unit_agreement'])
  for layer in range(per_layer.shape[1]):
    line, = axes[1].semilogx(last['scales'], per_layer[:, layer], label=f'ReLU {layer + 1}')
    axes[1].semilogx(last['scales'], agreement[:, layer], ':', color=line.get_color())
  axes[2].plot(steps, [r['locality']['augmentation']['encoder'] for r in results],
               label='same region (whole encoder)', **marker)
  axes[2].plot(steps, [np.mean(r['locality']['augmentation']['unit_agreement'])
                       for r in results], label='units agreeing (mean over layers)', **marker)
  axes[0].set_title('share of noisy copies in the clean input\'s linear region', fontsize=9)
  axes[0].set_xlabel('noise std (normalised input units)')
  axes[1].set_title(f'step {steps[-1]}, per ReLU layer: same pattern (solid), share of units '
                    'agreeing (dotted)', fontsize=8)
  axes[1].set_xlabel('noise std')
  axes[2].set_title('training augmentations vs the clean image', fontsize=9)
  axes[2].set_xlabel('step')
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  save(fig, 'locality.png')

  # Gaussianity.
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  tests = ('henze_zirkler', 'mardia_skewness', 'mardia_kurtosis', 'shapiro_wilk')
  for ax, rep in zip(axes[:2], REPRESENTATIONS):
    for t in tests:
      ax.plot(steps, [r['gaussianity'][rep][f'{t}_pass_rate'] for r in results], label=t,
              **marker)
    g0 = results[-1]['gaussianity'][rep]
    ax.axhline(g0['nominal_pass_rate'], color='k', ls='--', label='nominal (Gaussian)')
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f'{rep}: pass rate at alpha={g0["level"]}, {g0["dims"]}-d projections, '
                 f'{g0["tested_views"]} views', fontsize=8)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  for rep, style in zip(REPRESENTATIONS, ('-', '--')):
    spec = np.asarray(results[-1]['gaussianity'][rep]['within_image_spectrum'])
    axes[2].semilogy(np.arange(1, len(spec) + 1), np.maximum(spec, 1e-12), style, label=rep)
  axes[2].set_title(f'step {steps[-1]}: within-image covariance spectrum (share of variance)',
                    fontsize=8)
  axes[2].set_xlabel('index')
  axes[2].grid(alpha=0.3)
  axes[2].legend(fontsize=7)
  save(fig, 'gaussianity.png')

  # Generalisation terms.
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  gen = [r['generalisation'] for r in results]
  for key in ('train_error', 'test_error', 'error_gap', 'concentration_term'):
    axes[0].plot(steps, [g[key] for g in gen], label=key, **marker)
  axes[0].set_title('linear probe on frozen features: 0-1 risk', fontsize=9)
  for key in ('train_risk', 'test_risk', 'risk_gap'):
    axes[1].plot(steps, [g[key] for g in gen], label=key, **marker)
  ax2 = axes[1].twinx()
  ax2.plot(steps, [g['lipschitz_term'] for g in gen], 'k:', label='||W||_2 E||g(x)-g(x\')||',
           **marker)
  ax2.legend(fontsize=6, loc='upper right')
  axes[1].set_title('cross-entropy risk, and the invariance-gap term (right axis)', fontsize=9)
  for ax in axes:
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc='upper left')
  save(fig, 'generalisation.png')
  return paths


def summary_text(record: dict[str, Any]) -> str:
  """A few lines per diagnosed step, for the console."""
  lines = []
  for step in sorted(record['steps'], key=int):
    r = record['steps'][step]
    info = r['information']
    loc, gen = r['locality'], r['generalisation']
    lines.append(f'step {step}:')
    for rep in REPRESENTATIONS:
      i, g = info[rep], r['gaussianity'][rep]
      lines.append(
          f'  {rep:8s} eff. rank {i["effective_rank"]:.1f}/{i["dim"]}; H: gaussian '
          f'{i["entropy_gaussian"]:.1f}, logdet {i["entropy_logdet"]:.1f}, pairwise '
          f'[{i["entropy_pairwise_lower"]:.1f}, {i["entropy_pairwise_upper"]:.1f}]; '
          f'H(Z|X) {i["conditional_entropy"]:.1f}; I in [{i["mi_pairwise_lower"]:.2f}, '
          f'{i["mi_pairwise_upper"]:.2f}] (log N {i["log_num_images"]:.2f}), logdet '
          f'{i["mi_logdet"]:.1f}; '
          f'Gaussian views: HZ pass {g["henze_zirkler_pass_rate"]:.2f} '
          f'(nominal {g["nominal_pass_rate"]:.2f}), SW {g["shapiro_wilk_pass_rate"]:.2f}')
    shares = ', '.join(f'{s:g}: {v:.2f}' for s, v in zip(loc['scales'], loc['encoder']))
    lines.append(f'  locality (same linear region) by noise std: {shares}; '
                 f'augmentations: {loc["augmentation"]["encoder"]:.2f}')
    lines.append(f'  probe: train err {gen["train_error"]:.4f}, test err {gen["test_error"]:.4f}'
                 f'; ||W||_2 {gen["weight_norm_spectral"]:.2f} x invariance gap '
                 f'{gen["invariance_gap"]:.2f} = {gen["lipschitz_term"]:.2f}; concentration '
                 f'{gen["concentration_term"]:.4f}')
  return '\n'.join(lines)
