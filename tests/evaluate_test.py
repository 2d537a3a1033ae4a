"""Evaluation of frozen features: kNN, linear probe, statistics, the baseline cache."""

import json
import math

import numpy as np
import pytest

from ssl_jax import evaluate


def test_knn_votes_by_exp_similarity_over_temperature():
  """Hand example: k=1 follows the nearest neighbour, k=3 the weighted majority."""
  train = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [-1.0, 0.0]], np.float32)
  labels = np.array([0, 1, 1, 0])
  query = np.array([[0.99, 0.141]], np.float32)   # nearest: train 0 (class 0)
  # Cosine similarities 0.99, 0.877, 0.707: at T = 1, class 1 has e^0.877 + e^0.707
  # = 4.43 against e^0.99 = 2.69, so k = 3 votes class 1; at T = 0.01, class 0's
  # single vote e^99 outweighs e^87.7 + e^70.7.
  one = evaluate.knn_accuracy(train, labels, query, np.array([0]), num_classes=2,
                              ks=(1, 3), temperature=1.0)
  assert one == {1: 1.0, 3: 0.0}
  sharp = evaluate.knn_accuracy(train, labels, query, np.array([0]), num_classes=2,
                                ks=(3,), temperature=0.01)
  assert sharp == {3: 1.0}
  # Queries in chunks that do not divide their number give the same answers.
  rng = np.random.default_rng(0)
  tr, te = rng.normal(size=(50, 4)).astype(np.float32), rng.normal(size=(23, 4)).astype(
      np.float32)
  y_tr, y_te = rng.integers(0, 3, 50), rng.integers(0, 3, 23)
  assert (evaluate.knn_accuracy(tr, y_tr, te, y_te, num_classes=3, ks=(5,), chunk=7)
          == evaluate.knn_accuracy(tr, y_tr, te, y_te, num_classes=3, ks=(5,), chunk=100))


def test_the_linear_probe_separates_separable_classes_and_reports_its_losses():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, 600)
  x = rng.normal(size=(600, 5)) + 6.0 * np.eye(5)[y]
  out = evaluate.linear_probe(x[:500], y[:500], x[500:], y[500:], num_classes=3, epochs=10,
                              batch_size=100, lr=1e-2, with_params=True)
  assert out['train_acc'] == 1.0 and out['test_acc'] == 1.0
  assert out['train_loss'] < math.log(3) and out['params']['w'].shape == (5, 3)   # below chance
  # Standardised with the train split's statistics.
  np.testing.assert_allclose(out['mean'], x[:500].mean(0), rtol=1e-6)


def test_scale_free_statistics_do_not_move_when_the_features_are_rescaled():
  z = np.random.default_rng(0).normal(size=(400, 16)).astype(np.float32) * np.linspace(
      0.5, 3.0, 16)
  a, b = evaluate.embedding_statistics(z), evaluate.embedding_statistics(4.0 * z)
  for key in ('effective_rank', 'entropy_logdet_standardized',
              'entropy_pairwise_standardized'):
    assert b[key] == pytest.approx(a[key], rel=1e-4), key
  # The pairwise entropy at the median bandwidth moves by exactly D log c.
  assert b['entropy_pairwise_upper'] - a['entropy_pairwise_upper'] == pytest.approx(
      16 * math.log(4.0), rel=1e-4)


def test_baselines_are_computed_once_per_key_and_recomputed_when_it_changes(tmp_path,
                                                                           monkeypatch):
  monkeypatch.setenv('SSL_JAX_CACHE_DIR', str(tmp_path))
  calls = []

  def compute():
    calls.append(1)
    return {'baseline_raw_pixels': {'linear_test_acc': 0.84}}

  key = {'dataset': 'fashion_mnist', 'seed': 0}
  first, path = evaluate.cached_baselines(key, compute)
  again, same = evaluate.cached_baselines(key, compute)
  assert first == again and path == same and len(calls) == 1
  assert json.load(open(path))['key'] == key
  evaluate.cached_baselines(dict(key, seed=1), compute)            # another seed
  assert len(calls) == 2
  with open(path, 'w') as f:                                        # a corrupt file
    f.write('{not json')
  assert evaluate.cached_baselines(key, compute)[0] == first and len(calls) == 3
