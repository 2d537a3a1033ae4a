"""Evaluation of frozen features: extraction, linear probe and kNN.

`final_evaluation` is what the training loop calls at the end of a run, and
`make_online_test_eval` the online probe's check during it; the rest are
their parts:

- `extract_features`: the encoder's pooled features of a whole split, with
  BatchNorm in inference mode, gathered from every process; `extract_split`
  the same for several encoders and the raw pixels in one pass.
- `linear_probe`: multinomial logistic regression on standardised frozen
  features (Adam, cosine schedule), accuracy on the test features.
- `knn_accuracy`: weighted kNN with cosine similarity and exp(sim / T)
  votes (Wu et al. 2018, as solo-learn and DINO), for several k.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from ssl_jax import augment
from ssl_jax import conv
from ssl_jax import estimators
from ssl_jax import input_pipeline
from ssl_jax import models
from ssl_jax import train_step as train_step_lib


def make_feature_fn(graphdef, image_size: int, mean, std,
                    conv_route: str = 'auto') -> Callable:
  """jitted (params, batch_stats, uint8 images [B, H, W, C]) -> features [B, F].

  conv_route: the model's training route (model.conv_route); the features
  take `conv.inference_function(conv_route)`, the route fastest forward.
  """
  inference_conv = conv.inference_function(conv_route)

  @jax.jit
  def features(params, batch_stats, images):
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    # A layer's route is how it computes, not what: parameters and outputs (up
    # to round-off) are the same, so the merged copy's layers can swap theirs.
    for _, module in nnx.iter_modules(model.encoder):
      if isinstance(module, nnx.Conv):
        module.conv_general_dilated = inference_conv
    x = augment.eval_view(images, out_size=image_size, mean=mean, std=std)
    return model.encoder(x, train=False).astype(jnp.float32)

  return features


def extract_features(feature_fn: Callable, params, batch_stats, dataset, mesh,
                     max_batches: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
  """Runs feature_fn over an eval_dataset; returns (features [M, F], labels [M])."""
  (features,), labels, _ = extract_split(feature_fn, [(params, batch_stats)], dataset, mesh,
                                         max_batches)
  return features, labels


def extract_split(feature_fn: Callable, weights: Sequence[tuple[Any, Any]], dataset, mesh,
                  max_batches: Optional[int] = None, pixels: Optional[tuple] = None
                  ) -> tuple[list[np.ndarray], np.ndarray, Optional[np.ndarray]]:
  """One pass over an eval_dataset for several encoders and, optionally, the raw pixels.

  weights: (params, batch_stats) pairs of one architecture (feature_fn's).
  pixels: (mean, std) to also return the flattened normalised pixels
  (x / 255 - mean) / std [M, H * W * C], the linear-probe floor; None skips them.
  Returns ([features [M, F] per pair], labels [M], pixels or None), gathered
  from every process. One pass rather than one per encoder: the final
  evaluation's baselines (random-init encoder, raw pixels) share the trained
  encoder's decoding of the split instead of decoding it twice more.
  """
  feats, labels, flat = [[] for _ in weights], [], []
  for i, batch in enumerate(input_pipeline.DeviceIterator(dataset, mesh)):
    if max_batches is not None and i >= max_batches:
      break
    outputs = [feature_fn(params, batch_stats, batch['image']) for params, batch_stats in weights]
    gathered = [batch['label'], batch['mask']] + outputs + ([batch['image']] if pixels else [])
    y, m, *rest = (multihost_utils.process_allgather(a, tiled=True) for a in gathered)
    m = np.asarray(m, bool)
    labels.append(np.asarray(y)[m])
    for out, f in zip(feats, rest):
      out.append(np.asarray(f)[m])
    if pixels:
      flat.append(normalised_pixels(np.asarray(rest[-1])[m], *pixels))
  return ([np.concatenate(f) for f in feats], np.concatenate(labels),
          np.concatenate(flat) if pixels else None)


def normalised_pixels(images: np.ndarray, mean, std) -> np.ndarray:
  """uint8 images [M, H, W, C] -> (x / 255 - mean) / std flattened [M, H * W * C], float32."""
  x = images.astype(np.float32) / 255.0
  x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return x.reshape(x.shape[0], -1)


def _probe_optimizer(lr: float, weight_decay: float, total: int):
  return optax.adamw(optax.cosine_decay_schedule(lr, total), weight_decay=weight_decay)


# At module level, keyed by shapes and hyperparameters: a run's probes of
# equally wide features (the trained and the random-init encoder's) and a
# re-evaluation share one compilation, about a second each on 2 cores.
@functools.partial(jax.jit, static_argnames=('batch_size', 'lr', 'weight_decay', 'total'))
def _linear_probe_epoch(carry, key, tr, tr_y, *, batch_size, lr, weight_decay, total):
  """One epoch of minibatch AdamW on the probe: (probe, opt_state) -> same."""
  tx = _probe_optimizer(lr, weight_decay, total)
  n, f = tr.shape
  steps_per_epoch = n // batch_size

  def step(carry, batch):
    probe, opt_state = carry
    x, y = batch
    grads, _ = jax.grad(train_step_lib.probe_loss, has_aux=True)(probe, x, y)
    updates, opt_state = tx.update(grads, opt_state, probe)
    return (optax.apply_updates(probe, updates), opt_state), None

  # One gather per epoch into the shuffled order, then contiguous batches: the
  # same batches as gathering each one, without a strided gather per step.
  perm = jax.random.permutation(key, n)[:steps_per_epoch * batch_size]
  xs = tr[perm].reshape(steps_per_epoch, batch_size, f)
  ys = tr_y[perm].reshape(steps_per_epoch, batch_size)
  return jax.lax.scan(step, carry, (xs, ys))[0]


# Jitted: op by op, the loss over 60,000 examples took about a second.
_probe_loss = jax.jit(train_step_lib.probe_loss)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, *, num_classes: int, epochs: int = 30,
                 batch_size: int = 1024, lr: float = 1e-3, weight_decay: float = 1e-5,
                 seed: int = 0, with_params: bool = False) -> dict[str, Any]:
  """Trains a linear classifier on frozen features; returns train/test accuracy.

  Features are standardised with the train split's mean and std. The result
  also holds the train and test cross-entropy; with_params adds 'params'
  ({'w': [F, C], 'b': [C]}) and the standardisation 'mean' and 'std' [F].
  """
  if epochs <= 0:
    raise ValueError(f'linear probe epochs must be > 0, got {epochs}.')
  mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
  tr = jnp.asarray((train_x - mu) / sd, jnp.float32)
  te = jnp.asarray((test_x - mu) / sd, jnp.float32)
  tr_y, te_y = jnp.asarray(train_y, jnp.int32), jnp.asarray(test_y, jnp.int32)
  n, f = tr.shape
  batch_size = min(batch_size, n)
  total = (n // batch_size) * epochs
  hyper = dict(batch_size=batch_size, lr=float(lr), weight_decay=float(weight_decay),
               total=total)
  probe = train_step_lib.init_probe(f, num_classes)
  carry = (probe, _probe_optimizer(lr, weight_decay, total).init(probe))
  for key in jax.random.split(jax.random.key(seed), epochs):
    carry = _linear_probe_epoch(carry, key, tr, tr_y, **hyper)
  probe = carry[0]
  train_loss, train_acc = _probe_loss(probe, tr, tr_y)
  test_loss, test_acc = _probe_loss(probe, te, te_y)
  out = {'train_acc': float(train_acc), 'test_acc': float(test_acc),
         'train_loss': float(train_loss), 'test_loss': float(test_loss)}
  if with_params:
    out.update(params=jax.device_get(probe), mean=mu, std=sd)
  return out


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, *, num_classes: int, ks: Sequence[int] = (20, 200),
                 temperature: float = 0.07, chunk: int = 1000) -> dict[int, float]:
  """Weighted cosine kNN accuracy on test for each k (votes exp(sim / T))."""
  if temperature <= 0:
    raise ValueError(f'kNN temperature must be > 0, got {temperature}.')
  ks = [min(int(k), len(train_x)) for k in ks]
  kmax = max(ks)
  normalize = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  tr = jnp.asarray(normalize(train_x), jnp.float32)
  tr_y = jnp.asarray(train_y, jnp.int32)

  # The train features are an argument, not a closed-over constant: as a
  # constant, 60,000 x 512 floats were folded into the compiled program, which
  # took longer to compile than the search itself.
  @jax.jit
  def predict(q, tr, tr_y):
    sims, idx = jax.lax.top_k(q @ tr.T, kmax)            # [C, kmax]
    votes = jax.nn.one_hot(tr_y[idx], num_classes) * jnp.exp(sims / temperature)[..., None]
    return jnp.stack([jnp.argmax(jnp.sum(votes[:, :k], axis=1), -1) for k in ks])

  correct = np.zeros(len(ks))
  te = normalize(test_x).astype(np.float32)
  chunk = min(chunk, len(te))
  for start in range(0, len(te), chunk):
    q = te[start:start + chunk]
    pad = chunk - len(q)  # one compiled shape
    preds = np.asarray(predict(jnp.asarray(np.pad(q, ((0, pad), (0, 0)))), tr, tr_y)
                       )[:, :len(q)]
    correct += (preds == test_y[start:start + chunk][None]).sum(1)
  return {k: float(c / len(te)) for k, c in zip(ks, correct)}


def evaluate_features(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                      *, num_classes: int, config) -> dict[str, float]:
  """Linear probe + kNN on (features, labels) pairs, as configured in config.eval."""
  out = {}
  probe = linear_probe(*train, *test, num_classes=num_classes, epochs=config.linear_epochs,
                       lr=config.linear_lr, batch_size=config.linear_batch_size)
  out['linear_train_acc'], out['linear_test_acc'] = probe['train_acc'], probe['test_acc']
  for k, acc in knn_accuracy(*train, *test, num_classes=num_classes, ks=config.knn_k,
                             temperature=config.knn_temperature).items():
    out[f'knn{k}_test_acc'] = acc
  return out


def embedding_statistics(features: np.ndarray, max_examples: int = 2048) -> dict[str, float]:
  """Collapse and entropy measures of frozen features [M, F] (the first max_examples).

  effective_rank (Roy & Vetterli), log-det entropy (beta 1, 1/N covariance),
  the pairwise-distance mixture entropy's KL upper and Bhattacharyya lower
  bounds (median bandwidth) and the Gaussian entropy (ridge 1e-6: features
  can be rank-deficient), in nats. All but the effective rank and the
  *_standardized entries depend on the features' scale.
  """
  z = jnp.asarray(features[:max_examples], jnp.float32)
  return {k: float(v) for k, v in jax.device_get(_embedding_statistics(z)).items()}


@jax.jit
def _embedding_statistics(z):
  """One compiled program for all (compiling each apart cost seconds).

  The *_standardized entries are of the features scaled to unit variance per
  dimension (dead units left at 0): they do not change when the features are
  rescaled, so they compare representations rather than scales.
  """
  sd = jnp.std(z, axis=0)
  standardized = (z - jnp.mean(z, axis=0)) / jnp.where(sd > 0, sd, 1.0)
  return {
      'entropy_logdet_standardized': estimators.logdet_entropy(standardized, beta=1.0)[0],
      'entropy_pairwise_standardized': estimators.pairwise_entropy(
          standardized, sigma_mode='median', bound='upper')[0],
      'effective_rank': estimators.effective_rank(z),
      'entropy_logdet': estimators.logdet_entropy(z, beta=1.0)[0],
      'entropy_pairwise_upper': estimators.pairwise_entropy(
          z, sigma_mode='median', bound='upper')[0],
      'entropy_pairwise_lower': estimators.pairwise_entropy(
          z, sigma_mode='median', bound='lower')[0],
      'entropy_gaussian': estimators.gaussian_entropy(z, eps=1e-6)[0],
  }


def num_batches(num_examples: Optional[int], batch_size: int) -> Optional[int]:
  return None if not num_examples else math.ceil(num_examples / batch_size)


# ----------------------------------------------------------------------------
# Orchestration: what train.py calls.
# ----------------------------------------------------------------------------

def eval_split(config, split: str, mesh):
  """This process's un-augmented, padded batches of `split` at config.eval.batch_size."""
  return input_pipeline.eval_dataset(
      config.data.name, split,
      local_batch=input_pipeline.local_batch_size(config.eval.batch_size, mesh),
      process_index=jax.process_index(), process_count=jax.process_count(),
      data_dir=config.data.data_dir)


def probe_accuracy(probe_params, features, labels) -> float:
  """Accuracy of the online linear probe on (features [M, F], labels [M])."""
  _, acc = train_step_lib.probe_loss(jax.device_get(probe_params), jnp.asarray(features),
                                     jnp.asarray(labels))
  return float(acc)


class _Batches:
  """Host batches with the as_numpy_iterator() of a tf.data.Dataset (one pass per call)."""

  def __init__(self, batches):
    self._batches = batches

  def as_numpy_iterator(self):
    return iter(self._batches)


class SplitsInMemory:
  """split -> its eval_split batches, decoded once per run and kept in host memory.

  A feature pass fed by the TFDS pipeline waits for it: on 2 cores, 10,000
  Fashion-MNIST test images took 3.4-4.6 s from batches in memory against
  4.2-5.3 s from the pipeline (docs/speed.md). A run reads the same splits
  many times (the online probe every few hundred steps, the final
  evaluation), so each is decoded once while all of them fit in max_bytes
  (Fashion-MNIST's: 55 MB); a split that does not fit streams from the
  pipeline at every pass, as without this.
  """

  def __init__(self, config, mesh, max_bytes: int = 1 << 30):
    self._config, self._mesh, self._room = config, mesh, max_bytes
    self._kept: dict[str, list] = {}
    self._streamed: set[str] = set()

  def __call__(self, split: str):
    key = str(split)
    if key in self._kept:
      return _Batches(self._kept[key])
    dataset = eval_split(self._config, split, self._mesh)
    if key in self._streamed:
      return dataset
    host, batches, used = dataset.as_numpy_iterator(), [], 0
    for batch in host:
      batches.append(batch)
      used += sum(v.nbytes for v in batch.values())
      if used > self._room:       # too big: this pass streams the rest, later ones all of it
        self._streamed.add(key)
        return _Batches(itertools.chain(batches, host))
    self._room -= used
    self._kept[key] = batches
    return _Batches(batches)


def make_online_test_eval(config, run, mesh, feature_fn, splits: Optional[Callable] = None):
  """state -> the online probe's accuracy on (part of) the test split, now.

  Features of clean test images with BatchNorm in inference mode, as at the
  end of the run; config.eval.online_max_examples bounds the cost (0: all).
  splits (e.g. a SplitsInMemory) gives a split's batches; by default the pipeline.
  """
  max_batches = num_batches(config.eval.online_max_examples, config.eval.batch_size)
  splits = splits or (lambda split: eval_split(config, split, mesh))

  def accuracy(state) -> float:
    features, labels = extract_features(
        feature_fn, state.params, state.batch_stats, splits(run.spec.test_split), mesh,
        max_batches)
    return probe_accuracy(state.probe_params, features, labels)

  return accuracy


# Bump when the probes' protocol changes, so that cached baselines are recomputed.
# 2: frozen features by conv.inference_function (round-off differs from 1's).
BASELINE_PROTOCOL = 2


def cache_dir() -> str:
  """Where ssl_jax keeps results worth reusing across runs (SSL_JAX_CACHE_DIR)."""
  return os.environ.get('SSL_JAX_CACHE_DIR') or os.path.join(
      os.path.expanduser('~'), '.cache', 'ssl_jax')


def data_identity(data_config) -> dict[str, Any]:
  """Which files a dataset name stands for: its data_dir, and an image folder's contents.

  Two image folders (or two TFDS data dirs) under one dataset name give
  different baselines; so does an image folder whose files changed.
  """
  data_dir = data_config.get('data_dir')
  data_dir = os.path.abspath(os.path.expanduser(data_dir)) if data_dir else None
  identity = {'data_dir': data_dir}
  if data_config.name == input_pipeline.IMAGE_FOLDER and data_dir:
    from ssl_jax.datasets import image_folder
    identity['files'] = image_folder.signature(data_dir)
  return identity


def raw_pixel_bytes(config, spec, image_size: int) -> Optional[int]:
  """Host memory the raw-pixel baseline keeps for its train split, or None if unknown.

  The baseline's probes need the whole train split's normalised pixels as
  float32 [M, H * W * C] in host memory. M is known here where the probes
  train on the pretraining split (every built-in dataset but STL-10), capped by
  eval.max_train_examples.
  """
  if spec.train_split != spec.pretrain_split or not spec.num_pretrain_examples:
    return None
  count = spec.num_pretrain_examples
  if config.eval.max_train_examples:
    count = min(count, config.eval.max_train_examples)
  return count * image_size * image_size * spec.channels * 4


def check_baselines_fit(config, spec, image_size: int,
                        memory_bytes: Optional[int] = None) -> None:
  """Refuses, before any training, a raw-pixel baseline larger than half the host's memory.

  Without this a pod run with eval.baselines=True on ImageNet (1.28M images
  at 224x224x3: 770 GB of float32 pixels) would train for days and then fail
  in its final evaluation.
  """
  if not (config.eval.enabled and config.eval.baselines):
    return
  needed = raw_pixel_bytes(config, spec, image_size)
  if memory_bytes is None:
    memory_bytes = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  if needed is not None and needed > memory_bytes // 2:
    raise ValueError(
        f'eval.baselines=True keeps the raw pixels of the train split in host memory: '
        f'{needed / 2**30:,.0f} GiB for {config.data.name} at {image_size}x{image_size}, more '
        f'than half of this host\'s {memory_bytes / 2**30:,.0f} GiB. Set '
        '--config.eval.baselines=False, or cap the probes\' train split with '
        '--config.eval.max_train_examples=N.')


def baseline_key(config, run) -> dict[str, Any]:
  """Everything the baselines' numbers depend on: data, evaluation, model, seed, backend."""
  ev = config.eval
  return {
      'protocol': BASELINE_PROTOCOL, 'dataset': config.data.name,
      'data': data_identity(config.data),
      'train_split': str(run.spec.train_split), 'test_split': str(run.spec.test_split),
      'image_size': run.image_size,
      'eval': {k: ev[k] for k in ('batch_size', 'linear_epochs', 'linear_lr',
                                  'linear_batch_size', 'knn_k', 'knn_temperature',
                                  'max_train_examples', 'max_test_examples')},
      # The encoder is built first from the seed's key stream, so its initial
      # weights do not depend on the projector or predictor: every method with
      # the same encoder shares one random-init baseline.
      'encoder': config.model.encoder.to_dict(), 'dtype': config.model.get('dtype', 'float32'),
      'seed': int(config.seed), 'backend': jax.default_backend(),
      'conv_route': conv.resolve_route(config.model.get('conv_route', 'auto')),
  }


def _baselines_path(key: dict[str, Any]) -> tuple[str, str]:
  text = json.dumps(key, sort_keys=True, default=str)
  return text, os.path.join(cache_dir(), 'baselines',
                            hashlib.sha256(text.encode()).hexdigest()[:20] + '.json')


def read_cached_baselines(key: dict[str, Any]) -> tuple[Optional[dict[str, Any]], Optional[str]]:
  """(the cached baselines of `key`, their path), or (None, None): absent, unreadable,
  another key, or a run of several processes (which never caches).

  Raw pixels and the random-init encoder do not depend on the pretraining, so
  every run of a dataset and model computes the same numbers: the first run
  pays for them (write_cached_baselines), the others read them. A run of
  several processes computes them (every process must take part in the
  feature extraction) and does not cache.
  """
  if jax.process_count() > 1:
    return None, None
  text, path = _baselines_path(key)
  try:
    with open(path) as f:
      cached = json.load(f)
    if cached.get('key') == json.loads(text):
      return cached['baselines'], path
  except (OSError, ValueError, KeyError):
    pass   # absent or unreadable: compute it again
  return None, None


def write_cached_baselines(key: dict[str, Any], result: dict[str, Any]) -> Optional[str]:
  """Caches `result` under `key` (atomically); its path, or None where it cannot."""
  if jax.process_count() > 1:
    return None
  text, path = _baselines_path(key)
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + f'.tmp{os.getpid()}', 'w') as f:
      json.dump({'key': json.loads(text), 'baselines': result}, f, indent=1)
    os.replace(path + f'.tmp{os.getpid()}', path)
  except OSError:
    return None   # a read-only home: the run still has its numbers
  return path


def final_evaluation(config, run, state, mesh, feature_fn, timer=None,
                     figure_dir: Optional[str] = None, splits: Optional[Callable] = None
                     ) -> dict[str, Any]:
  """Online probe, linear probe and kNN on the test split, and the baselines.

  run is the runs.Run the state was trained with (dataset spec, model config).
  timer (a metrics.Stopwatch) receives the seconds of each part; where the
  baselines are not cached, 'evaluation: features' includes extracting theirs
  (one pass for all), and 'evaluation: baselines' is their probes. With
  figure_dir (and eval.embedding_map), process 0 draws embedding_map.png there.
  splits (e.g. a SplitsInMemory) gives a split's batches; by default the pipeline.
  """
  import contextlib
  t0 = time.time()
  ev, spec = config.eval, run.spec
  max_train = num_batches(ev.max_train_examples, ev.batch_size)
  max_test = num_batches(ev.max_test_examples, ev.batch_size)
  section = timer.section if timer is not None else (lambda name: contextlib.nullcontext())
  splits = splits or (lambda split: eval_split(config, split, mesh))

  def probes(train, test, timed=True):
    out = {}
    timed_section = section if timed else (lambda name: contextlib.nullcontext())
    with timed_section('evaluation: linear probe'):
      probe = linear_probe(*train, *test, num_classes=spec.num_classes,
                           epochs=ev.linear_epochs, lr=ev.linear_lr,
                           batch_size=ev.linear_batch_size)
    out['linear_train_acc'], out['linear_test_acc'] = probe['train_acc'], probe['test_acc']
    with timed_section('evaluation: kNN'):
      for k, acc in knn_accuracy(*train, *test, num_classes=spec.num_classes, ks=ev.knn_k,
                                 temperature=ev.knn_temperature).items():
        out[f'knn{k}_test_acc'] = acc
    return out

  # The baselines (same architecture at initialisation, and raw pixels: what SSL
  # must beat) come from the cache, or from the same pass over each split as the
  # trained encoder's features.
  key = baseline_key(config, run) if ev.baselines else None
  cached, cache_path = read_cached_baselines(key) if ev.baselines else (None, None)
  compute_baselines = ev.baselines and cached is None
  weights = [(state.params, state.batch_stats)]
  if compute_baselines:
    # Rebuilt from the seed: run.state's buffers were donated to the first step.
    random_model = models.create_model(config.model, spec.channels,
                                       with_predictor=run.with_predictor, seed=config.seed)
    _, r_params, r_stats = nnx.split(random_model, nnx.Param, nnx.BatchStat)
    weights.append((r_params, r_stats))
  pixels = (spec.mean, spec.std) if compute_baselines else None

  print('ssl_jax: evaluating frozen features (linear probe, kNN'
        + (', baselines' if compute_baselines else '') + ')...', flush=True)
  # On a run that computes the baselines, this pass also extracts theirs.
  with section('evaluation: features'):
    train_feats, train_y, train_px = extract_split(
        feature_fn, weights, splits(spec.train_split), mesh, max_train, pixels)
    test_feats, test_y, test_px = extract_split(
        feature_fn, weights, splits(spec.test_split), mesh, max_test, pixels)
  train, test = (train_feats[0], train_y), (test_feats[0], test_y)
  out = {'eval': probes(train, test)}
  out['eval']['online_probe_test_acc'] = probe_accuracy(state.probe_params, *test)
  # Counted after the gather from every process: the whole split, not one host's shard.
  out['eval']['train_examples'], out['eval']['test_examples'] = len(train[1]), len(test[1])
  with section('evaluation: embedding statistics'):
    out['eval'].update(embedding_statistics(test[0]))
  if figure_dir and ev.get('embedding_map', True) and jax.process_index() == 0:
    from ssl_jax import metrics
    with section('evaluation: embedding map'):
      out['embedding_map'] = metrics.embedding_map(
          test[0], test[1], os.path.join(figure_dir, 'embedding_map.png'),
          title=f'{config.method} on {config.data.name}')
  if ev.baselines:
    with section('evaluation: baselines'):
      if compute_baselines:
        cached = {'baseline_random_init': probes((train_feats[1], train_y),
                                                 (test_feats[1], test_y), timed=False),
                  'baseline_raw_pixels': probes((train_px, train_y), (test_px, test_y),
                                                timed=False)}
        cache_path = write_cached_baselines(key, cached)
    out.update(cached)
    out['baselines_cache'] = cache_path
  out['eval_time_sec'] = time.time() - t0
  return out
