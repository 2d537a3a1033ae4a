"""Evaluation of frozen features: kNN, linear probe, statistics, the baseline cache."""

import json
import math
import os

import numpy as np
import pytest

from ssl_jax import evaluate
from whitening import whitened  # tests/whitening.py


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


def test_baselines_are_read_back_for_their_key_only_and_a_corrupt_file_is_a_miss(
    tmp_path, monkeypatch):
  monkeypatch.setenv('SSL_JAX_CACHE_DIR', str(tmp_path))
  baselines = {'baseline_raw_pixels': {'linear_test_acc': 0.84}}
  key = {'dataset': 'fashion_mnist', 'seed': 0}
  assert evaluate.read_cached_baselines(key) == (None, None)          # nothing cached yet
  path = evaluate.write_cached_baselines(key, baselines)
  assert evaluate.read_cached_baselines(key) == (baselines, path)
  assert json.load(open(path))['key'] == key
  assert evaluate.read_cached_baselines(dict(key, seed=1)) == (None, None)   # another seed
  with open(path, 'w') as f:                                          # a corrupt file
    f.write('{not json')
  assert evaluate.read_cached_baselines(key) == (None, None)
  assert evaluate.write_cached_baselines(key, baselines) == path
  assert evaluate.read_cached_baselines(key) == (baselines, path)


# ----------------------------------------------------------------------------
# Closed forms and defaults.
# ----------------------------------------------------------------------------

def test_embedding_statistics_of_a_whitened_sample_in_closed_form():
  n, d = 300, 12
  z = whitened(n, d)
  stats = evaluate.embedding_statistics(z)
  assert stats['effective_rank'] == pytest.approx(d, rel=1e-4)
  # 0.5 log det(I + C) with C = zc^T zc / N = (N - 1) / N I.
  assert stats['entropy_logdet'] == pytest.approx(0.5 * d * math.log(1 + (n - 1) / n),
                                                  rel=1e-4)
  # D/2 log(2 pi e) + 0.5 log det(I + 1e-6 I), unbiased covariance.
  assert stats['entropy_gaussian'] == pytest.approx(
      0.5 * d * math.log(2 * math.pi * math.e) + 0.5 * d * math.log(1 + 1e-6), rel=1e-4)
  # Standardised (population std): C = I whatever each column's scale, and a constant
  # (dead) column standardises to 0, adding nothing.
  scaled = np.concatenate([z * np.linspace(0.1, 10.0, d), np.full((n, 1), 3.0)], axis=1)
  standardized = evaluate.embedding_statistics(scaled)
  assert standardized['entropy_logdet_standardized'] == pytest.approx(
      0.5 * d * math.log(2.0), rel=1e-4)
  assert stats['entropy_logdet_standardized'] == pytest.approx(0.5 * d * math.log(2.0),
                                                               rel=1e-4)
  assert all(np.isfinite(v) for v in standardized.values())
  # The pairwise upper bound is above the lower one (KL >= Bhattacharyya).
  assert stats['entropy_pairwise_upper'] > stats['entropy_pairwise_lower']


def test_embedding_statistics_read_the_first_max_examples_rows():
  z = np.random.default_rng(1).normal(size=(2100, 6)).astype(np.float32)
  z[2048:] *= 50.0
  assert evaluate.embedding_statistics(z) == evaluate.embedding_statistics(z[:2048])
  assert (evaluate.embedding_statistics(z, max_examples=2100)['entropy_logdet']
          > evaluate.embedding_statistics(z)['entropy_logdet'] + 1.0)


def test_linear_probe_first_adam_step_from_zero_in_closed_form():
  """One batch holding every example: Adam's first step is -lr * sign(gradient).

  From w = 0 the logits are 0, so the gradient of the mean cross-entropy is
  X^T (1/C - onehot(y)) / n on the standardised features, and b's is
  mean(1/C - onehot(y)); Adam's first update is lr * m / sqrt(v) = lr * sign(g)
  (bias-corrected), and decoupled weight decay of w = 0 adds nothing.
  """
  rng = np.random.default_rng(2)
  x = rng.normal(size=(40, 5)) * np.arange(1, 6) + 3.0
  y = rng.integers(0, 3, 40)
  out = evaluate.linear_probe(x, y, x[:7], y[:7], num_classes=3, epochs=1, batch_size=40,
                              lr=0.01, with_params=True)
  xs = (x - x.mean(0)) / (x.std(0) + 1e-6)
  residual = 1 / 3 - np.eye(3)[y]
  np.testing.assert_allclose(out['params']['w'], -0.01 * np.sign(xs.T @ residual / 40),
                             rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(out['params']['b'], -0.01 * np.sign(residual.mean(0)),
                             rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(out['std'], x.std(0) + 1e-6, rtol=1e-6)
  # The reported numbers are those of that classifier, on the train and the test rows.
  logits = xs @ out['params']['w'] + out['params']['b']
  assert out['train_acc'] == pytest.approx(np.mean(logits.argmax(1) == y))
  assert out['test_acc'] == pytest.approx(np.mean(logits[:7].argmax(1) == y[:7]))
  log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  assert out['train_loss'] == pytest.approx(-log_softmax[np.arange(40), y].mean(), rel=1e-5)
  with pytest.raises(ValueError, match='epochs must be > 0'):
    evaluate.linear_probe(x, y, x, y, num_classes=3, epochs=0)


def test_linear_probe_and_knn_defaults_are_the_documented_protocol():
  """30 epochs of AdamW at 1e-3 (decay 1e-5), batches of 1024; kNN k 20 and 200 at T 0.07."""
  rng = np.random.default_rng(3)
  y = rng.integers(0, 4, 1200)
  x = rng.normal(size=(1200, 6)) + 1.5 * np.eye(4, 6)[y]
  default = evaluate.linear_probe(x[:1100], y[:1100], x[1100:], y[1100:], num_classes=4,
                                  with_params=True)
  explicit = evaluate.linear_probe(x[:1100], y[:1100], x[1100:], y[1100:], num_classes=4,
                                   epochs=30, batch_size=1024, lr=1e-3, weight_decay=1e-5,
                                   seed=0, with_params=True)
  np.testing.assert_array_equal(default['params']['w'], explicit['params']['w'])
  other = evaluate.linear_probe(x[:1100], y[:1100], x[1100:], y[1100:], num_classes=4,
                                seed=1, with_params=True)
  assert not np.array_equal(default['params']['w'], other['params']['w'])
  assert (evaluate.knn_accuracy(x[:1100], y[:1100], x[1100:], y[1100:], num_classes=4)
          == evaluate.knn_accuracy(x[:1100], y[:1100], x[1100:], y[1100:], num_classes=4,
                                   ks=(20, 200), temperature=0.07))
  assert (evaluate.knn_accuracy(x[:1100], y[:1100], x[1100:], y[1100:], num_classes=4,
                                ks=(200,), temperature=0.07)
          != evaluate.knn_accuracy(x[:1100], y[:1100], x[1100:], y[1100:], num_classes=4,
                                   ks=(200,), temperature=10.0))


def test_knn_accuracy_is_the_share_of_test_points_classified_right():
  train = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  labels = np.array([0, 1])
  queries = np.array([[2.0, 0.1], [0.1, 3.0], [1.0, 0.2], [0.3, 1.0]], np.float32)
  # Nearest: 0, 1, 0, 1; labelled 0, 1, 1, 1: three of four right.
  assert evaluate.knn_accuracy(train, labels, queries, np.array([0, 1, 1, 1]), num_classes=2,
                               ks=(1,)) == {1: 0.75}


def test_knn_clips_k_to_the_train_set_and_refuses_a_bad_temperature():
  train = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]], np.float32)
  labels = np.array([0, 1, 1])
  # k = 10 > 3 train points: all three vote, so class 1 wins for a query nearer class 0.
  out = evaluate.knn_accuracy(train, labels, np.array([[1.0, 0.9]], np.float32),
                              np.array([0]), num_classes=2, ks=(1, 10), temperature=1.0)
  assert out == {1: 1.0, 3: 0.0}
  # A zero feature vector is compared by cosine without dividing by zero.
  zero = evaluate.knn_accuracy(train, labels, np.zeros((1, 2), np.float32), np.array([0]),
                               num_classes=2, ks=(1,))
  assert zero[1] in (0.0, 1.0)
  for bad in (0.0, -1.0):
    with pytest.raises(ValueError, match='temperature must be > 0'):
      evaluate.knn_accuracy(train, labels, train, labels, num_classes=2, temperature=bad)


def test_evaluate_features_wires_the_config_to_the_probes():
  import ml_collections
  rng = np.random.default_rng(4)
  y = rng.integers(0, 3, 300)
  x = rng.normal(size=(300, 4)) + 2.0 * np.eye(3, 4)[y]
  config = ml_collections.ConfigDict(dict(linear_epochs=3, linear_lr=0.05,
                                          linear_batch_size=64, knn_k=(3, 7),
                                          knn_temperature=0.5))
  out = evaluate.evaluate_features((x[:200], y[:200]), (x[200:], y[200:]), num_classes=3,
                                   config=config)
  probe = evaluate.linear_probe(x[:200], y[:200], x[200:], y[200:], num_classes=3, epochs=3,
                                lr=0.05, batch_size=64)
  knn = evaluate.knn_accuracy(x[:200], y[:200], x[200:], y[200:], num_classes=3, ks=(3, 7),
                              temperature=0.5)
  assert out == {'linear_train_acc': probe['train_acc'], 'linear_test_acc': probe['test_acc'],
                 'knn3_test_acc': knn[3], 'knn7_test_acc': knn[7]}


def test_num_batches_rounds_up_and_zero_means_all():
  assert [evaluate.num_batches(n, 16) for n in (None, 0, 1, 16, 17, 40)] == [
      None, None, 1, 1, 2, 3]


def test_cache_dir_from_the_environment_or_home(monkeypatch, tmp_path):
  monkeypatch.setenv('SSL_JAX_CACHE_DIR', str(tmp_path))
  assert evaluate.cache_dir() == str(tmp_path)
  monkeypatch.delenv('SSL_JAX_CACHE_DIR')
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert evaluate.cache_dir() == str(tmp_path / 'home' / '.cache' / 'ssl_jax')


def test_a_key_with_values_json_cannot_write_is_cached_by_their_text(tmp_path, monkeypatch):
  monkeypatch.setenv('SSL_JAX_CACHE_DIR', str(tmp_path))
  key = {'seed': np.int64(3), 'ks': (20, 200)}
  path = evaluate.write_cached_baselines(key, {'x': 1.0})
  assert path is not None
  assert evaluate.read_cached_baselines(key) == ({'x': 1.0}, path)


def test_an_unwritable_cache_is_no_path_and_another_keys_file_is_a_miss(tmp_path, monkeypatch):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  monkeypatch.setenv('SSL_JAX_CACHE_DIR', str(blocker))
  assert evaluate.write_cached_baselines({'a': 1}, {'x': 1.0}) is None
  assert evaluate.read_cached_baselines({'a': 1}) == (None, None)
  # A cached file whose key differs (a hash collision) is not used.
  monkeypatch.setenv('SSL_JAX_CACHE_DIR', str(tmp_path / 'cache'))
  path = evaluate.write_cached_baselines({'a': 1}, {'x': 1.0})
  with open(path, 'w') as f:
    json.dump({'key': {'a': 2}, 'baselines': {'x': 5.0}}, f)
  assert evaluate.read_cached_baselines({'a': 1}) == (None, None)


# ----------------------------------------------------------------------------
# The end-of-run evaluation on real data (Fashion-MNIST), with a smoke-sized model.
# ----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def untrained():
  """An untrained smoke-sized VICReg run: its evaluation is its random-init baseline."""
  import importlib
  from ssl_jax import runs
  from ssl_jax import sharding
  config = importlib.import_module('configs.vicreg').get_config('smoke')
  # 3 batches of 16 each way; 40 test examples round up to whole batches (48).
  config.eval.update(max_train_examples=48, max_test_examples=40, baselines=True,
                     embedding_map=False, online_max_examples=20)
  mesh = sharding.make_mesh()
  run = runs.build(config, mesh)
  feature_fn = evaluate.make_feature_fn(run.graphdef, run.image_size, run.spec.mean,
                                        run.spec.std)
  return config, mesh, run, feature_fn


def first_examples(split, count):
  """The first `count` (images uint8 [count, 28, 28, 1], labels) of a split, by TFDS directly."""
  from ssl_jax import input_pipeline
  batch = next(input_pipeline.load_split('fashion_mnist', split).batch(count)
               .as_numpy_iterator())
  return batch['image'], batch['label']


def normalised(images, spec):
  """uint8 images [M, 28, 28, 1] -> (x / 255 - mean) / std, in float32."""
  return (images.astype(np.float32) / 255 - np.float32(spec.mean)) / np.float32(spec.std)


def test_features_are_the_encoder_on_normalised_images_with_labels_in_order(untrained):
  config, mesh, run, feature_fn = untrained
  import jax
  from flax import nnx
  features, labels = evaluate.extract_features(
      feature_fn, run.state.params, run.state.batch_stats,
      evaluate.eval_split(config, 'test', mesh), mesh, max_batches=2)
  images, expected_labels = first_examples('test', 32)
  np.testing.assert_array_equal(labels, expected_labels)
  model = nnx.merge(run.graphdef, run.state.params, run.state.batch_stats, copy=True)
  x = normalised(images, run.spec)
  np.testing.assert_allclose(features, model.encoder(x, train=False), rtol=1e-4, atol=1e-5)
  # One pass for several encoders and the raw pixels: the same features, labels and pixels.
  zeros = jax.tree.map(np.zeros_like, run.state.params)
  (same, of_zeros), pass_labels, pixels = evaluate.extract_split(
      feature_fn, [(run.state.params, run.state.batch_stats), (zeros, run.state.batch_stats)],
      evaluate.eval_split(config, 'test', mesh), mesh, 2, (run.spec.mean, run.spec.std))
  np.testing.assert_array_equal(same, features)
  np.testing.assert_array_equal(pass_labels, expected_labels)
  zero_model = nnx.merge(run.graphdef, zeros, run.state.batch_stats, copy=True)
  np.testing.assert_allclose(of_zeros, zero_model.encoder(x, train=False), rtol=1e-4, atol=1e-5)
  # Raw pixels: the same images, flattened and normalised.
  np.testing.assert_allclose(pixels, x.reshape(32, -1), rtol=1e-6, atol=1e-6)
  assert evaluate.extract_split(feature_fn, [], evaluate.eval_split(config, 'test', mesh), mesh,
                                1)[2] is None


def test_splits_in_memory_decode_a_split_once_and_give_the_pipelines_batches(untrained,
                                                                            monkeypatch):
  config, mesh, _, _ = untrained
  streamed = list(evaluate.eval_split(config, 'test', mesh).as_numpy_iterator())
  decoded, eval_split = [], evaluate.eval_split
  monkeypatch.setattr(evaluate, 'eval_split',
                      lambda *a: decoded.append(a[1]) or eval_split(*a))

  def same_batches(dataset):
    batches = list(dataset.as_numpy_iterator())
    assert len(batches) == len(streamed)
    for got, want in zip(batches, streamed):
      assert got.keys() == want.keys()
      for k in want:
        np.testing.assert_array_equal(got[k], want[k])

  splits = evaluate.SplitsInMemory(config, mesh)
  for _ in range(3):
    same_batches(splits('test'))
  assert decoded == ['test']                  # decoded once, then read from memory
  # A split that does not fit streams: the same batches, from the pipeline at every pass.
  one_batch = sum(v.nbytes for v in streamed[0].values())
  small = evaluate.SplitsInMemory(config, mesh, max_bytes=one_batch)
  for _ in range(2):
    same_batches(small('test'))
  assert decoded == ['test'] * 3


def test_the_online_probe_check_reads_the_configured_part_of_the_test_split(untrained):
  config, mesh, run, feature_fn = untrained
  # The probe starts at zero: every prediction is class 0 (argmax of equal logits), so
  # its accuracy is the share of class 0 among the first 2 batches (20 rounds up to 32).
  _, labels = first_examples('test', 32)
  accuracy = evaluate.make_online_test_eval(config, run, mesh, feature_fn)(run.state)
  assert accuracy == pytest.approx(np.mean(labels == 0))


def test_final_evaluation_of_an_untrained_model_is_its_random_init_baseline(
    untrained, tmp_path, monkeypatch):
  from ssl_jax import metrics
  config, mesh, run, feature_fn = untrained
  monkeypatch.setenv('SSL_JAX_CACHE_DIR', str(tmp_path / 'cache'))
  timer = metrics.Stopwatch()
  out = evaluate.final_evaluation(config, run, run.state, mesh, feature_fn, timer)
  ev = out['eval']
  assert (ev['train_examples'], ev['test_examples']) == (48, 48)
  keys = ('linear_train_acc', 'linear_test_acc', 'knn2_test_acc', 'knn5_test_acc')
  # The random-init baseline is the same encoder at the same seed, never trained.
  assert {k: out['baseline_random_init'][k] for k in keys} == {k: ev[k] for k in keys}
  # Raw pixels: the probes on the first 48 train and test images' pixels.
  train_x, train_y = first_examples('train', 48)
  test_x, test_y = first_examples('test', 48)
  flat = lambda im: normalised(im, run.spec).reshape(len(im), -1)
  expected = evaluate.evaluate_features((flat(train_x), train_y), (flat(test_x), test_y),
                                        num_classes=10, config=config.eval)
  assert {k: out['baseline_raw_pixels'][k] for k in keys} == pytest.approx(expected, abs=1e-6)
  # The online probe (zero) predicts class 0 everywhere.
  assert ev['online_probe_test_acc'] == pytest.approx(np.mean(test_y == 0))
  features, _ = evaluate.extract_features(
      feature_fn, run.state.params, run.state.batch_stats,
      evaluate.eval_split(config, 'test', mesh), mesh, 3)
  assert ev['effective_rank'] == pytest.approx(
      evaluate.embedding_statistics(features)['effective_rank'], rel=1e-5)
  # Every part is timed once; the baselines' own probes count in 'baselines' only.
  assert set(timer.seconds) == {'evaluation: features', 'evaluation: linear probe',
                                'evaluation: kNN', 'evaluation: embedding statistics',
                                'evaluation: baselines'}
  # The baselines were cached, and the next run reads them without computing.
  assert out['baselines_cache'].startswith(str(tmp_path / 'cache'))
  assert out['baselines_cache'].endswith('.json')
  monkeypatch.setattr(evaluate, 'normalised_pixels', lambda *a, **k: pytest.fail('recomputed'))
  probes, encoders = [], []
  linear_probe, extract_split = evaluate.linear_probe, evaluate.extract_split
  monkeypatch.setattr(evaluate, 'linear_probe',
                      lambda *a, **k: probes.append(1) or linear_probe(*a, **k))
  monkeypatch.setattr(evaluate, 'extract_split',
                      lambda fn, weights, *a: encoders.append(len(weights))
                      or extract_split(fn, weights, *a))
  again = evaluate.final_evaluation(config, run, run.state, mesh, feature_fn,
                                    figure_dir=str(tmp_path))
  assert again['baseline_raw_pixels'] == out['baseline_raw_pixels']
  assert again['baseline_random_init'] == out['baseline_random_init']
  # Only the trained encoder: one probe, and one encoder in each split's pass.
  assert probes == [1] and encoders == [1, 1]
  assert again['eval'] == out['eval']
  # The splits kept in memory give the same evaluation.
  in_memory = evaluate.final_evaluation(config, run, run.state, mesh, feature_fn,
                                        splits=evaluate.SplitsInMemory(config, mesh))
  assert in_memory['eval'] == out['eval']
  assert not (tmp_path / 'embedding_map.png').exists()      # eval.embedding_map = False
  # A config from before eval.embedding_map existed draws the map (the default).
  old = config.copy_and_resolve_references()
  del old.eval['embedding_map']
  drawn = evaluate.final_evaluation(old, run, run.state, mesh, feature_fn,
                                    figure_dir=str(tmp_path))
  assert drawn['embedding_map'] == str(tmp_path / 'embedding_map.png')
  assert (tmp_path / 'embedding_map.png').stat().st_size > 0


def test_the_baseline_key_holds_what_the_baselines_depend_on_and_nothing_else():
  import importlib
  import types
  run = types.SimpleNamespace(spec=types.SimpleNamespace(train_split='train',
                                                         test_split='test'), image_size=28)

  def key(method='vicreg', **changes):
    config = importlib.import_module(f'configs.{method}').get_config()
    for name, value in changes.items():
      *parents, leaf = name.split('.')
      target = config
      for p in parents:
        target = target[p]
      target[leaf] = value
    return evaluate.baseline_key(config, run)

  base = key()
  # Shared by every method with the same encoder, data and evaluation.
  assert key('byol') == base and key('vicreg', **{'model.projector': '64-64'}) == base
  for change in ({'seed': 1}, {'eval.linear_lr': 0.01}, {'eval.knn_k': (5,)},
                 {'eval.max_test_examples': 100}, {'eval.batch_size': 500},
                 {'eval.linear_epochs': 3}, {'eval.linear_batch_size': 64},
                 {'eval.knn_temperature': 0.1}, {'eval.max_train_examples': 100},
                 {'model.encoder.width': 2.0}, {'data.data_dir': '/elsewhere'}):
    assert key(**change) != base, change
  assert base['train_split'] == 'train' and base['test_split'] == 'test'
  assert base['image_size'] == 28 and base['protocol'] == evaluate.BASELINE_PROTOCOL
  assert base['dataset'] == 'fashion_mnist' and base['dtype'] == 'float32'
  import jax
  assert base['backend'] == jax.default_backend()     # CPU and GPU results differ
  # A data_dir is named by its absolute path (~ expanded), so that two spellings agree.
  home = key(**{'data.data_dir': '~/data'})['data']['data_dir']
  assert home == os.path.join(os.path.expanduser('~'), 'data')


def test_a_raw_pixel_baseline_larger_than_half_the_memory_is_refused_before_training(tmp_path):
  import importlib
  from ssl_jax import input_pipeline
  gib = 2 ** 30
  imagenet = importlib.import_module('configs.vicreg_it').get_config('imagenet')
  imagenet.eval.baselines = True
  spec = input_pipeline.DATASETS['imagenet2012']
  # 1,281,167 images x 224 x 224 x 3 float32 values: the pixels' size, computed apart.
  assert evaluate.raw_pixel_bytes(imagenet, spec, 224) == 1_281_167 * 150_528 * 4
  with pytest.raises(ValueError, match=r'raw pixels.*718 GiB.*eval.baselines=False'):
    evaluate.check_baselines_fit(imagenet, spec, 224, memory_bytes=256 * gib)
  # The fixes the message names: a capped train split fits, no baselines need nothing.
  imagenet.eval.max_train_examples = 10_000            # 5.6 GiB
  evaluate.check_baselines_fit(imagenet, spec, 224, memory_bytes=16 * gib)
  with pytest.raises(ValueError, match='more than half'):
    evaluate.check_baselines_fit(imagenet, spec, 224, memory_bytes=8 * gib)
  imagenet.eval.baselines = False
  evaluate.check_baselines_fit(imagenet, spec, 224, memory_bytes=gib)
  # Fashion-MNIST's 60,000 x 784 pixels are 188 MB; STL-10 probes on another split: unknown.
  fmnist = importlib.import_module('configs.vicreg_it').get_config()
  assert evaluate.raw_pixel_bytes(fmnist, input_pipeline.DATASETS['fashion_mnist'],
                                  28) == 60_000 * 784 * 4
  evaluate.check_baselines_fit(fmnist, input_pipeline.DATASETS['fashion_mnist'], 28)
  assert evaluate.raw_pixel_bytes(fmnist, input_pipeline.DATASETS['stl10'], 96) is None
  # From the command line, before any dataset or parameter: the pod config with baselines on.
  from ssl_jax import cli
  from ssl_jax import main as main_lib
  argv = ['ssl_jax.main', '--config=configs/vicreg_it.py:imagenet', '--dry_run',
          f'--workdir={tmp_path / "run"}', f'--config.data.data_dir={tmp_path / "tfds"}',
          '--config.eval.baselines=True']
  with pytest.raises(ValueError, match='eval.baselines=True keeps the raw pixels'):
    main_lib.dry_run(cli.parse_command(main_lib.define_flags, argv))
  assert not (tmp_path / 'run').exists()
