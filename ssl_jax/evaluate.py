"""Evaluation of frozen features: extraction, linear probe and kNN.

`final_evaluation` is what the training loop calls at the end of a run, and
`make_online_test_eval` the online probe's check during it; the rest are
their parts:

- `extract_features`: the encoder's pooled features of a whole split, with
  BatchNorm in inference mode, gathered from every process.
- `linear_probe`: multinomial logistic regression on standardised frozen
  features (Adam, cosine schedule), accuracy on the test features.
- `knn_accuracy`: weighted kNN with cosine similarity and exp(sim / T)
  votes (Wu et al. 2018, as solo-learn and DINO), for several k.
"""

from __future__ import annotations

import hashlib
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
from ssl_jax import estimators
from ssl_jax import input_pipeline
from ssl_jax import models
from ssl_jax import train_step as train_step_lib


def make_feature_fn(graphdef, image_size: int, mean, std) -> Callable:
  """jitted (params, batch_stats, uint8 images [B, H, W, C]) -> features [B, F]."""

  @jax.jit
  def features(params, batch_stats, images):
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    x = augment.eval_view(images, out_size=image_size, mean=mean, std=std)
    return model.encoder(x, train=False).astype(jnp.float32)

  return features


def extract_features(feature_fn: Callable, params, batch_stats, dataset, mesh,
                     max_batches: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
  """Runs feature_fn over an eval_dataset; returns (features [M, F], labels [M])."""
  feats, labels = [], []
  for i, batch in enumerate(input_pipeline.DeviceIterator(dataset, mesh)):
    if max_batches is not None and i >= max_batches:
      break
    f = feature_fn(params, batch_stats, batch['image'])
    f, y, m = (multihost_utils.process_allgather(a, tiled=True)
               for a in (f, batch['label'], batch['mask']))
    m = np.asarray(m, bool)
    feats.append(np.asarray(f)[m])
    labels.append(np.asarray(y)[m])
  return np.concatenate(feats), np.concatenate(labels)


def raw_pixels(dataset, max_batches: Optional[int] = None, mean=None, std=None
               ) -> tuple[np.ndarray, np.ndarray]:
  """Flattened normalised pixels of an eval_dataset: the linear-probe floor."""
  xs, ys = [], []
  for i, batch in enumerate(dataset.as_numpy_iterator()):
    if max_batches is not None and i >= max_batches:
      break
    m = batch['mask'].astype(bool)
    x = batch['image'][m].astype(np.float32) / 255.0
    if mean is not None:
      x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    xs.append(x.reshape(x.shape[0], -1))
    ys.append(batch['label'][m])
  return np.concatenate(xs), np.concatenate(ys)


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
  steps_per_epoch = n // batch_size
  total = steps_per_epoch * epochs
  tx = optax.adamw(optax.cosine_decay_schedule(lr, total), weight_decay=weight_decay)
  probe = train_step_lib.init_probe(f, num_classes)
  opt_state = tx.init(probe)

  def step(carry, batch):
    probe, opt_state = carry
    x, y = batch
    (loss, _), grads = jax.value_and_grad(train_step_lib.probe_loss, has_aux=True)(
        probe, x, y)
    updates, opt_state = tx.update(grads, opt_state, probe)
    return (optax.apply_updates(probe, updates), opt_state), loss

  @jax.jit
  def epoch(carry, key, tr, tr_y):
    # One gather per epoch into the shuffled order, then contiguous batches: the
    # same batches as gathering each one, without a strided gather per step.
    perm = jax.random.permutation(key, n)[:steps_per_epoch * batch_size]
    xs = tr[perm].reshape(steps_per_epoch, batch_size, f)
    ys = tr_y[perm].reshape(steps_per_epoch, batch_size)
    return jax.lax.scan(step, carry, (xs, ys))

  carry = (probe, opt_state)
  for key in jax.random.split(jax.random.key(seed), epochs):
    carry, _ = epoch(carry, key, tr, tr_y)
  probe = carry[0]
  train_loss, train_acc = train_step_lib.probe_loss(probe, tr, tr_y)
  test_loss, test_acc = train_step_lib.probe_loss(probe, te, te_y)
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


def make_online_test_eval(config, run, mesh, feature_fn):
  """state -> the online probe's accuracy on (part of) the test split, now.

  Features of clean test images with BatchNorm in inference mode, as at the
  end of the run; config.eval.online_max_examples bounds the cost (0: all).
  """
  max_batches = num_batches(config.eval.online_max_examples, config.eval.batch_size)

  def accuracy(state) -> float:
    features, labels = extract_features(
        feature_fn, state.params, state.batch_stats,
        eval_split(config, run.spec.test_split, mesh), mesh, max_batches)
    return probe_accuracy(state.probe_params, features, labels)

  return accuracy


# Bump when the probes' protocol changes, so that cached baselines are recomputed.
BASELINE_PROTOCOL = 1


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


def baseline_key(config, run) -> dict[str, Any]:
  """Everything the baselines' numbers depend on: data, evaluation, model, seed, backend."""
  from ssl_jax import conv
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


def cached_baselines(key: dict[str, Any], compute: Callable[[], dict[str, Any]]
                     ) -> tuple[dict[str, Any], Optional[str]]:
  """The baselines of `key` from the cache, else computed and cached; (result, path).

  Raw pixels and the random-init encoder do not depend on the pretraining, so
  every run of a dataset and model computes the same numbers: the first run
  pays for them (about as much as the trained encoder's own evaluation), the
  others read them. A run of several processes computes them (every process
  must take part in the feature extraction) and does not cache.
  """
  if jax.process_count() > 1:
    return compute(), None
  text = json.dumps(key, sort_keys=True, default=str)
  path = os.path.join(cache_dir(), 'baselines',
                      hashlib.sha256(text.encode()).hexdigest()[:20] + '.json')
  try:
    with open(path) as f:
      cached = json.load(f)
    if cached.get('key') == json.loads(text):
      return cached['baselines'], path
  except (OSError, ValueError, KeyError):
    pass   # absent or unreadable: compute it again
  result = compute()
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + f'.tmp{os.getpid()}', 'w') as f:
      json.dump({'key': json.loads(text), 'baselines': result}, f, indent=1)
    os.replace(path + f'.tmp{os.getpid()}', path)
  except OSError:
    return result, None   # a read-only home: the run still has its numbers
  return result, path


def final_evaluation(config, run, state, mesh, feature_fn, timer=None,
                     figure_dir: Optional[str] = None) -> dict[str, Any]:
  """Online probe, linear probe and kNN on the test split, and the baselines.

  run is the runs.Run the state was trained with (dataset spec, model config).
  timer (a metrics.Stopwatch) receives the seconds of each part. With
  figure_dir (and eval.embedding_map), process 0 draws embedding_map.png there.
  """
  import contextlib
  t0 = time.time()
  ev, spec = config.eval, run.spec
  max_train = num_batches(ev.max_train_examples, ev.batch_size)
  max_test = num_batches(ev.max_test_examples, ev.batch_size)
  section = timer.section if timer is not None else (lambda name: contextlib.nullcontext())

  def features_of(params, batch_stats):
    train = extract_features(feature_fn, params, batch_stats,
                             eval_split(config, spec.train_split, mesh), mesh, max_train)
    test = extract_features(feature_fn, params, batch_stats,
                            eval_split(config, spec.test_split, mesh), mesh, max_test)
    return train, test

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

  print('ssl_jax: evaluating frozen features (linear probe, kNN)...', flush=True)
  with section('evaluation: features'):
    train, test = features_of(state.params, state.batch_stats)
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
    def baselines():
      # Same architecture at initialisation, and raw pixels: what SSL must beat.
      # (The model is rebuilt from the seed: run.state's buffers were donated to
      # the first training step.)
      random_model = models.create_model(config.model, spec.channels,
                                         with_predictor=run.with_predictor, seed=config.seed)
      _, r_params, r_stats = nnx.split(random_model, nnx.Param, nnx.BatchStat)
      p_train = raw_pixels(eval_split(config, spec.train_split, mesh), max_train,
                           spec.mean, spec.std)
      p_test = raw_pixels(eval_split(config, spec.test_split, mesh), max_test,
                          spec.mean, spec.std)
      return {'baseline_random_init': probes(*features_of(r_params, r_stats), timed=False),
              'baseline_raw_pixels': probes(p_train, p_test, timed=False)}

    with section('evaluation: baselines'):
      result, path = cached_baselines(baseline_key(config, run), baselines)
    out.update(result)
    out['baselines_cache'] = path
  out['eval_time_sec'] = time.time() - t0
  return out
