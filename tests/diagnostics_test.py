"""Diagnostics: estimators and tests against known answers, and the command end to end."""

import importlib
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import diagnostics
from ssl_jax import estimators
from ssl_jax import models
from ssl_jax import train
from ssl_jax.diagnostics import gaussianity as normality
from ssl_jax.diagnostics import selection


# ---- Entropy estimators.

def mixture_entropy_monte_carlo(centres, sigma, samples, seed=0):
  """-E log p(x) of the uniform mixture of N(c_i, sigma^2 I), and its standard error."""
  rng = np.random.default_rng(seed)
  n, d = centres.shape
  x = centres[rng.integers(0, n, samples)] + sigma * rng.standard_normal((samples, d))
  d2 = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
  log_comp = -d2 / (2 * sigma ** 2) - 0.5 * d * math.log(2 * math.pi * sigma ** 2)
  log_p = np.logaddexp.reduce(log_comp, axis=1) - math.log(n)
  return -log_p.mean(), log_p.std() / math.sqrt(samples)


@pytest.mark.parametrize('spread', [0.3, 1.0, 3.0])
def test_pairwise_bounds_bracket_a_monte_carlo_mixture_entropy(spread):
  rng = np.random.default_rng(1)
  centres = spread * rng.standard_normal((12, 2))
  sigma = 0.7
  truth, se = mixture_entropy_monte_carlo(centres, sigma, 200_000)
  z = jnp.asarray(centres, jnp.float32)
  upper = float(estimators.pairwise_entropy(z, sigma=sigma, bound='upper')[0])
  lower = float(estimators.pairwise_entropy(z, sigma=sigma, bound='lower')[0])
  assert lower - 4 * se <= truth <= upper + 4 * se
  for alpha in (0.05, 0.2, 0.5, 0.7, 0.95):
    chernoff = float(estimators.pairwise_entropy(z, sigma=sigma, bound='chernoff',
                                                 alpha=alpha)[0])
    assert chernoff <= truth + 4 * se
    assert chernoff <= lower + 1e-4   # alpha = 1/2 is the tightest for equal covariances


def test_chernoff_half_is_bhattacharyya_and_is_symmetric_in_alpha():
  z = jax.random.normal(jax.random.key(0), (32, 5))
  lower = estimators.pairwise_entropy(z, sigma=0.5, bound='lower')[0]
  half = estimators.pairwise_entropy(z, sigma=0.5, bound='chernoff', alpha=0.5)[0]
  np.testing.assert_allclose(half, lower, rtol=1e-6)
  a = estimators.pairwise_entropy(z, sigma=0.5, bound='chernoff', alpha=0.2)[0]
  b = estimators.pairwise_entropy(z, sigma=0.5, bound='chernoff', alpha=0.8)[0]
  np.testing.assert_allclose(a, b, rtol=1e-6)
  with pytest.raises(ValueError, match='alpha in'):
    estimators.pairwise_entropy(z, bound='chernoff', alpha=1.0)


@pytest.mark.parametrize('k', [1, 3, 10])
def test_effective_rank_of_a_constructed_rank_k_matrix(k):
  rng = np.random.default_rng(k)
  n, d = 200, 40
  # Orthonormal columns orthogonal to the ones vector, so centring changes nothing.
  q, _ = np.linalg.qr(np.concatenate([np.ones((n, 1)), rng.standard_normal((n, k))], 1))
  u = q[:, 1:k + 1]
  v, _ = np.linalg.qr(rng.standard_normal((d, k)))
  z = jnp.asarray(3.0 * u @ v.T, jnp.float32)  # k equal singular values
  assert float(estimators.effective_rank(z)) == pytest.approx(k, rel=1e-4)


# ---- Locality.

def two_layer_net(always_active):
  w1 = jax.random.normal(jax.random.key(1), (10, 32))
  w2 = jax.random.normal(jax.random.key(2), (32, 16))
  shift = 1e6 if always_active else 0.0   # every unit on for any input: a linear map

  def patterns(x):
    with models.record_relu_patterns() as recorded:
      models.relu(models.relu(x @ w1 + shift) @ w2 + shift)
    return recorded
  return patterns


def test_a_linear_network_has_locality_one_at_every_noise_scale():
  x = jax.random.normal(jax.random.key(0), (8, 10))
  out = diagnostics.locality.locality(two_layer_net(True), x, jax.random.key(3),
                             scales=(1e-3, 1.0, 100.0), copies=16, encoder_layers=1)
  assert out['encoder'] == [1.0, 1.0, 1.0] and out['z_region'] == [1.0, 1.0, 1.0]
  assert np.all(np.asarray(out['per_layer']) == 1.0)


def test_a_relu_network_under_huge_noise_has_locality_near_zero():
  x = jax.random.normal(jax.random.key(0), (8, 10))
  out = diagnostics.locality.locality(two_layer_net(False), x, jax.random.key(3),
                             scales=(0.0, 1e3), copies=16, encoder_layers=1)
  assert out['encoder'] == [1.0, 0.0] and out['z_region'] == [1.0, 0.0]
  agreement = np.asarray(out['unit_agreement'])
  assert np.all(agreement[0] == 1.0)
  assert np.all((agreement[1] > 0.3) & (agreement[1] < 0.7))  # sign of noise: a coin flip


def test_relu_patterns_of_the_small_cnn_are_recorded_per_layer():
  from flax import nnx
  cnn = models.SmallCNN(1, width=0.25, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
  with models.record_relu_patterns() as recorded:
    cnn(x, train=False)
  assert [p.shape for p in recorded] == [(2, 28, 28, 8), (2, 14, 14, 16), (2, 7, 7, 32),
                                         (2, 7, 7, 64)]
  assert all(p.dtype == jnp.bool_ for p in recorded)
  with models.record_relu_patterns() as outside:
    pass
  cnn(x, train=False)
  assert outside == []


# ---- Normality tests.

def test_henze_zirkler_matches_pingouin():
  # Reference values from pingouin 0.7.0, multivariate_normality(x), on these samples.
  x = np.random.default_rng(1).standard_normal((30, 3))
  hz, p = normality.henze_zirkler(x)
  assert hz == pytest.approx(0.5531640776442903, rel=1e-9)
  assert p == pytest.approx(0.6306097130965649, rel=1e-9)
  x = np.random.default_rng(2).uniform(size=(50, 4))
  hz, p = normality.henze_zirkler(x)
  assert hz == pytest.approx(1.0431922950734955, rel=1e-9)
  assert p == pytest.approx(0.009832258636607805, rel=1e-9)


def pass_rate(test, draws):
  return np.mean([test(x) >= 0.05 for x in draws])


def test_gaussian_samples_pass_at_the_nominal_rate():
  rng = np.random.default_rng(0)
  draws = [rng.standard_normal((50, 4)) @ rng.standard_normal((4, 4)) for _ in range(400)]
  # 400 draws: the binomial standard error at 0.95 is 0.011.
  assert 0.92 <= pass_rate(lambda x: normality.henze_zirkler(x)[1], draws) <= 0.98
  assert 0.92 <= pass_rate(lambda x: normality.mardia(x)['skewness_p'], draws) <= 0.995


def test_uniform_and_bimodal_samples_almost_never_pass():
  rng = np.random.default_rng(0)
  uniform = [rng.uniform(size=(200, 2)) for _ in range(100)]
  bimodal = [rng.standard_normal((100, 2)) + np.where(rng.uniform(size=(100, 1)) < 0.5, -3, 3)
             * np.array([1.0, 0.0]) for _ in range(100)]
  assert pass_rate(lambda x: normality.henze_zirkler(x)[1], uniform) <= 0.05
  assert pass_rate(lambda x: normality.henze_zirkler(x)[1], bimodal) <= 0.05


def test_within_image_normality_of_gaussian_and_of_bimodal_views():
  rng = np.random.default_rng(0)
  k, m, d = 60, 80, 24
  means = rng.standard_normal((k, 1, d)) * 5
  mixing = rng.standard_normal((k, d, d)) / math.sqrt(d)
  gaussian = means + np.einsum('kmd,kde->kme', rng.standard_normal((k, m, d)), mixing)
  out = normality.within_image_normality(gaussian, dims=8)
  assert out['nominal_pass_rate'] == 0.95
  assert out['henze_zirkler_pass_rate'] >= 0.85
  assert out['shapiro_wilk_pass_rate'] >= 0.9
  assert len(out['within_image_spectrum']) == d
  assert sum(out['within_image_spectrum']) == pytest.approx(1.0)
  # Two clusters of views per image along one direction: the leading principal
  # direction is the bimodal one, and the test sees it. Its power on 40 views
  # falls with the dimension it tests in (measured: 0.0 / 0.12 / 0.75 pass at
  # 2 / 4 / 8 dims), hence the default of 4.
  sign = np.where(rng.uniform(size=(k, m, 1)) < 0.5, -1.0, 1.0)
  bimodal = gaussian + 6.0 * sign * np.eye(d)[0]
  assert normality.within_image_normality(bimodal, dims=2)['henze_zirkler_pass_rate'] <= 0.05
  assert normality.within_image_normality(bimodal, dims=4)['henze_zirkler_pass_rate'] <= 0.2
  with pytest.raises(ValueError, match='5 x dims'):
    normality.within_image_normality(gaussian[:, :40], dims=8)


# ---- Label-free selection.

def test_spearman_interval_and_label_free_selection(tmp_path):
  rho, low, high, n = diagnostics.spearman_ci([1, 2, 3, 4, 5, 6], [2, 4, 5, 8, 9, 12])
  assert (rho, n) == (1.0, 6) and low > 0.5
  results = tmp_path / 'exp'
  results.mkdir()
  # Two methods. Within each, effective rank follows the accuracy; entropy_gaussian
  # only separates the methods (higher for the better method, constant inside).
  for i in range(8):
    method = 'a' if i < 4 else 'b'
    metrics = {'linear_test_acc': 0.5 + 0.05 * i, 'effective_rank': 10.0 + (i % 4),
               'entropy_logdet': -float(i), 'entropy_pairwise_upper': 1.0,
               'entropy_pairwise_lower': 1.0, 'entropy_gaussian': float(i >= 4)}
    with open(results / f'{method}__tune{i}__s0.json', 'w') as f:
      json.dump({'cell': f'{method}__tune{i}__s0', 'method': method, 'stage': 'tune',
                 'metrics': metrics}, f)
  with open(results / 'a__final__s0.json', 'w') as f:   # final cells are not used
    json.dump({'cell': 'a__final__s0', 'method': 'a', 'stage': 'final',
               'metrics': {'linear_test_acc': 0.0, 'effective_rank': 99.0}}, f)
  out = diagnostics.label_free_selection(str(results), str(tmp_path / 'sel'))
  rank, gauss = out['correlations']['effective_rank'], out['correlations']['entropy_gaussian']
  assert rank['within_method'] == {'a': pytest.approx(1.0), 'b': pytest.approx(1.0)}
  assert (rank['pairs_correct'], rank['pairs']) == (12, 12) and rank['scale_free']
  # Pooled, the between-method step makes entropy_gaussian look good, but it orders
  # no pair of runs within a method. Ranks: (2.5 x4, 6.5 x4) against 1..8, so rho =
  # 32 / sqrt(32 * 42) = 0.873.
  assert gauss['spearman'] == pytest.approx(32 / math.sqrt(32 * 42), abs=1e-6)
  assert (gauss['pairs_correct'], gauss['pairs']) == (0, 12)
  assert math.isnan(gauss['within_method_mean']) and not gauss['scale_free']
  assert out['correlations']['entropy_logdet']['spearman'] == pytest.approx(-1.0)
  assert math.isnan(out['correlations']['entropy_pairwise_upper']['spearman'])  # constant
  for ext in ('json', 'md', 'png'):
    assert os.path.getsize(tmp_path / f'sel.{ext}') > 100


def test_the_cluster_bootstrap_is_wider_than_the_independent_interval_for_clustered_cells():
  """Ten methods, each's five cells at one accuracy: the pooled cells look like 50
  points but carry 10 independent ones; the methods-resampled interval says so."""
  rng = np.random.default_rng(0)
  acc = np.repeat(rng.normal(size=10), 5)
  x = acc + 0.3 * np.repeat(rng.normal(size=10), 5) + 0.01 * rng.normal(size=50)
  groups = np.repeat([f'm{i}' for i in range(10)], 5)
  _, low, high, _ = selection.spearman_ci(x, acc)
  b_low, b_high = selection.cluster_bootstrap(x, acc, groups)
  assert b_high - b_low > 1.5 * (high - low)


# ---- The command, end to end.

def test_select_steps():
  assert diagnostics.select_steps([2, 4], 'all') == [0, 2, 4]
  assert diagnostics.select_steps([4, 2], 'last') == [4]
  assert diagnostics.select_steps([2, 4], '4,0') == [0, 4]
  with pytest.raises(ValueError, match='No checkpoint at step'):
    diagnostics.select_steps([2, 4], '3')
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    diagnostics.select_steps([], 'last')


def test_bad_settings_are_rejected():
  with pytest.raises(ValueError, match='gauss_views >= 80'):
    diagnostics.Settings(gauss_views=60, gauss_dims=8)
  with pytest.raises(ValueError, match='must be > 0'):
    diagnostics.Settings(num_images=0)


def test_diagnose_a_smoke_workdir(tmp_path):
  config = importlib.import_module('configs.vicreg').get_config('smoke')
  config.eval.baselines = False
  config.total_steps = 4
  train.train_and_evaluate(config, str(tmp_path))
  settings = diagnostics.Settings(num_images=80, locality_images=4, locality_copies=4,
                                  noise_scales=(1e-6, 10.0), gauss_images=3, gauss_views=20,
                                  gauss_dims=2, gauss_directions_1d=2, probe_train_images=64,
                                  probe_test_images=32, probe_epochs=2, batch_size=32)
  record = diagnostics.diagnose_workdir(str(tmp_path), settings=settings, progress=False)
  # keep_checkpoint_period=2 (smoke) keeps step 2 beside the newest; step 0 is the init.
  assert sorted(record['steps'], key=int) == ['0', '2', '4']
  out = tmp_path / 'diagnostics'
  with open(out / 'diagnostics.json') as f:
    saved = json.load(f)
  for step in ('0', '2', '4'):
    r = saved['steps'][step]
    for rep in ('features', 'z'):
      info = r['information'][rep]
      assert all(math.isfinite(info[k]) for k in ('entropy_gaussian', 'entropy_logdet',
                                                  'entropy_pairwise_upper', 'mi_pairwise_lower',
                                                  'mi_estimate', 'mi_gaussian_upper',
                                                  'conditional_entropy', 'effective_rank'))
      assert info['views'] == 4 and info['model_check']['contradicted'] in (True, False)
      assert info['entropy_pairwise_lower'] <= info['entropy_pairwise_upper']
      assert 0.0 <= r['gaussianity'][rep]['henze_zirkler_pass_rate'] <= 1.0
    assert r['locality']['scales'] == [1e-6, 10.0]
    assert r['locality']['encoder'][1] == 0.0
    # The small CNN's four ReLU layers, then the projector's one (smoke: 32-32).
    assert len(r['locality']['per_layer'][0]) == 5
    assert r['locality']['encoder_layers'] == 4
    assert r['generalisation']['probe_train_examples'] == 64
  for name in ('information', 'spectrum', 'locality', 'gaussianity', 'generalisation'):
    assert os.path.getsize(out / f'{name}.png') > 10_000
  assert any(n.startswith('events') for n in os.listdir(out / 'tensorboard'))
  rows = [json.loads(line) for line in open(out / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [0, 2, 4]
  # Running it again for the last step keeps the earlier steps' results.
  again = diagnostics.diagnose_workdir(str(tmp_path), checkpoints='last', settings=settings,
                                       progress=False)
  assert sorted(again['steps'], key=int) == ['0', '2', '4']


def test_embeddings_and_patterns_on_eight_devices_equal_one_device():
  from ssl_jax import runs, sharding
  config = importlib.import_module('configs.vicreg').get_config('smoke')
  images = np.random.default_rng(0).integers(0, 256, (48, 28, 28, 1), dtype=np.uint8)
  out, patterns = {}, {}
  for devices in (1, 8):
    mesh = sharding.make_mesh(devices)
    run = runs.build(config, mesh)
    net = diagnostics.Network(run, mesh, batch_size=16)
    out[devices] = net.embed(run.state.params, run.state.batch_stats, images, view='a',
                             key=jax.random.key(0))
    clean = net.clean(net.put(images[:16]))
    patterns[devices] = [np.asarray(p) for p in
                         net.patterns_fn(run.state.params, run.state.batch_stats)(clean)]
  for rep in ('features', 'z'):
    np.testing.assert_allclose(out[8][rep], out[1][rep], rtol=1e-5, atol=1e-6)
  assert all(np.array_equal(a, b) for a, b in zip(patterns[8], patterns[1]))


def test_mardia_statistics_of_a_two_point_factorial_design():
  """Known values: each column takes 0 (p = 3/4) and 3 (p = 1/4); over the full 4 x 4
  factorial the two columns are exactly uncorrelated, so b1 is the sum of the columns'
  squared skewnesses and b2 their kurtoses plus p(p - 1). For this two-point law,
  skewness^2 = (1 - 2q)^2 / (q (1 - q)) = 4/3 and kurtosis = (1 - 3q(1 - q)) / (q (1 - q))
  = 7/3 with q = 1/4."""
  column = np.array([0., 0., 0., 3.])
  x = np.array([[a, b] for a in column for b in column])
  out = normality.mardia(x)
  assert out['skewness'] == pytest.approx(2 * 4 / 3, rel=1e-12)
  assert out['kurtosis'] == pytest.approx(2 * 7 / 3 + 2, rel=1e-12)
  one = normality.mardia(np.tile(column, 10)[:, None])
  assert (one['skewness'], one['kurtosis']) == (pytest.approx(4 / 3), pytest.approx(7 / 3))


def test_spearman_interval_of_a_known_ranking():
  """rho = 1 - 6 sum d^2 / (n (n^2 - 1)) for n = 10 with two adjacent pairs swapped:
  sum d^2 = 4, rho = 1 - 24 / 990; Fisher z interval with SE sqrt(1.06 / 7)."""
  x = list(range(10))
  y = [1, 0, 2, 3, 4, 5, 6, 7, 9, 8]
  rho, low, high, n = diagnostics.spearman_ci(x, y)
  expected = 1 - 24 / 990
  half = 1.959964 * math.sqrt(1.06 / 7)
  assert (rho, n) == (pytest.approx(expected), 10)
  assert low == pytest.approx(math.tanh(math.atanh(expected) - half), rel=1e-6)
  assert high == pytest.approx(math.tanh(math.atanh(expected) + half), rel=1e-6)
