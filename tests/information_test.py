"""The information estimates against answers known apart from the code.

Known-answer cases: N images with known centres mu_n, X uniform over them,
views = mu_X + Gaussian noise of a known covariance. The truth,
I(Z; X) = log N - E[log sum_m exp(-q_m / 2 + q_X / 2)] (q_m the Mahalanobis
distance of Z to centre m), is a Monte-Carlo average with the exact mixture
density, computed here and not by the code under test. Every mi_* output must
pass (the issue's rule): a lower bound is not above the truth by more than
0.5 nats, an upper bound not below it by more than 0.5 nats, a point estimate
within max(0.75 nats, 25%) of it.

The cases cover isotropic and anisotropic noise (variances over a 100x range,
in a random rotation), D = 8, 64 and 256, signal from none to saturating
log N (in 8 dimensions, and a weak signal spread over 64 dimensions), two and
four views.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import estimators
from ssl_jax.diagnostics import information

N = 1024
TOLERANCE_BOUND = 0.5


def make_case(d, signal_dims, signal_scale, noise, seed=0):
  rng = np.random.default_rng(seed)
  mu = np.zeros((N, d))
  mu[:, :signal_dims] = rng.normal(0.0, signal_scale, (N, signal_dims))
  variances = (np.ones(d) if noise == 'isotropic'
               else np.exp(rng.uniform(math.log(0.1), math.log(10.0), d)))
  rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
  return mu, (rotation * variances) @ rotation.T


def true_information(mu, sigma, draws=3, seed=123):
  """Monte-Carlo I(Z; X) with the exact mixture density, in whitened coordinates."""
  n, d = mu.shape
  u = mu @ np.linalg.inv(np.linalg.cholesky(sigma)).T
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(draws):
    eps = rng.normal(size=(n, d))
    z = u + eps
    q = np.square(z).sum(1)[:, None] - 2 * z @ u.T + np.square(u).sum(1)[None, :]
    values.append(math.log(n) - np.mean(np.logaddexp.reduce(
        -0.5 * q + 0.5 * np.square(eps).sum(1)[:, None], axis=1)))
  return float(np.mean(values))


def views_of(mu, sigma, count, seed=7):
  rng = np.random.default_rng(seed)
  return mu[:, None, :] + rng.normal(size=(len(mu), count, mu.shape[1])) @ \
      np.linalg.cholesky(sigma).T


CASES = [(d, 0, 0.0, noise) for d in (8, 64, 256) for noise in ('isotropic', 'anisotropic')]
CASES += [(d, 8, scale, noise) for d in (8, 64, 256) for scale in (0.3, 1.0, 2.0, 30.0)
          for noise in ('isotropic', 'anisotropic')]
CASES += [(64, 64, 1.0, 'isotropic'), (256, 64, 0.5, 'anisotropic')]


@pytest.mark.parametrize('views', [2, 4])
@pytest.mark.parametrize('d, signal_dims, signal_scale, noise', CASES)
def test_every_information_estimate_against_the_exact_mixture(d, signal_dims, signal_scale,
                                                              noise, views):
  mu, sigma = make_case(d, signal_dims, signal_scale, noise)
  truth = true_information(mu, sigma)
  z = views_of(mu, sigma, views)
  out = information.information_quantities(z[:, 0], z[:, 1], more_views=list(
      z[:, v] for v in range(2, views)))
  assert set(information.MI_KEYS) <= set(out)
  for key in information.MI_KEYS:
    value = out[key]
    if 'lower' in key:
      assert value <= truth + TOLERANCE_BOUND, (key, value, truth)
    elif 'upper' in key:
      assert value >= truth - TOLERANCE_BOUND, (key, value, truth)
    else:
      assert abs(value - truth) <= max(0.75, 0.25 * truth), (key, value, truth)
    assert -1e-9 <= value <= math.log(N) + 1e-9
  assert not out['model_check']['contradicted']   # the data follow the model here
  # H(Z | X) = 1/2 log det(2 pi e Sigma), from N (V - 1) degrees of freedom: the
  # estimate's sd is about 1/2 sqrt(2 D / dof).
  exact = 0.5 * np.linalg.slogdet(2 * math.pi * math.e * sigma)[1]
  sd = 0.5 * math.sqrt(2 * d / (N * (views - 1)))
  assert out['conditional_entropy'] == pytest.approx(exact, abs=4 * sd)


def test_pure_noise_reads_as_no_information_not_log_n():
  """The issue's symptom: with D = 256 and no signal, the midpoint estimates read log N."""
  mu, sigma = make_case(256, 0, 0.0, 'isotropic')
  z = views_of(mu, sigma, 2)
  out = information.information_quantities(z[:, 0], z[:, 1])
  assert out['mi_estimate'] < 0.1 and out['mi_pairwise_lower'] < 0.1
  assert out['mi_gaussian_upper'] < 0.5 and out['signal_directions'] == 0


def test_views_with_less_variance_than_the_noise_contradict_the_model():
  """Cov(Z) below the within-image noise in some directions: the model cannot hold."""
  rng = np.random.default_rng(0)
  n, d = 1024, 32
  # The two views of an image are anti-correlated in half the coordinates: their
  # difference varies more than the images do, which no Z = mu + noise allows.
  base = rng.normal(size=(n, d))
  z_a = base + 0.3 * rng.normal(size=(n, d))
  z_b = base + 0.3 * rng.normal(size=(n, d))
  z_b[:, :16] = -base[:, :16] + 0.3 * rng.normal(size=(n, 16))
  out = information.information_quantities(z_a, z_b)
  check = out['model_check']
  assert check['contradicted'] and check['eigenvalues_below_noise'] >= 16
  # The report shows how far below: the smallest eigenvalue of S, under the edge.
  assert check['min_eigenvalue'] < check['lower_edge'] < 0
  clean = information.information_quantities(*views_of(*make_case(32, 8, 1.0, 'isotropic'),
                                                       2).transpose(1, 0, 2))
  assert not clean['model_check']['contradicted']


def test_too_few_images_for_the_dimension_gives_no_estimate_and_says_why():
  z = np.random.default_rng(0).normal(size=(20, 2, 64))
  out = information.information_quantities(z[:, 0], z[:, 1])
  assert math.isnan(out['mi_estimate']) and 'more images or views' in out['mi_unavailable']
  # The same keys as an estimate (reports and tables read them), NaN where unknown.
  estimated = information.information_quantities(
      *views_of(*make_case(8, 8, 1.0, 'isotropic'), 2).transpose(1, 0, 2))
  assert set(estimated) <= set(out)
  for key in ('bulk_signal', 'noise_edge', 'noise_free_dims', 'conditional_entropy'):
    assert math.isnan(out[key]), key


# ---- Entropy of Z where a closed form exists: Gaussian samples.

@pytest.mark.parametrize('d', [4, 16])
def test_gaussian_and_logdet_entropies_of_gaussian_samples(d):
  rng = np.random.default_rng(d)
  a = rng.normal(size=(d, d))
  cov = a @ a.T / d + 0.5 * np.eye(d)
  m = 8000   # entropy_estimates also forms the [m, m] distances of the pairwise terms
  z = rng.normal(size=(m, d)) @ np.linalg.cholesky(cov).T
  out = information.entropy_estimates(z, beta=2.0)
  exact = 0.5 * np.linalg.slogdet(2 * math.pi * math.e * cov)[1]
  # The sample log-determinant's bias is -d (d + 1) / (2 m); its sd about sqrt(2 d / m).
  tolerance = 4 * math.sqrt(2 * d / m) + d * (d + 1) / (2 * m)
  assert out['entropy_gaussian'] == pytest.approx(exact, abs=tolerance)
  # The log-det at beta stands for N(mean, C + I / beta).
  smoothed = 0.5 * np.linalg.slogdet(2 * math.pi * math.e * (cov + np.eye(d) / 2.0))[1]
  assert out['entropy_logdet'] == pytest.approx(smoothed, abs=tolerance)


def test_gaussian_entropy_estimator_uses_n_minus_1_on_a_small_exact_sample():
  """A whitened sample (covariance with N - 1 exactly the identity times std^2)."""
  rng = np.random.default_rng(0)
  n, d, std = 12, 3, 2.5
  x = rng.normal(size=(n, d))
  x -= x.mean(0)
  x = x @ np.linalg.inv(np.linalg.cholesky(x.T @ x / (n - 1))).T * std
  h, _ = estimators.gaussian_entropy(jnp.asarray(x, jnp.float32))
  assert float(h) == pytest.approx(d / 2 * math.log(2 * math.pi * math.e) + d * math.log(std),
                                   rel=1e-5)


@pytest.mark.parametrize('n, views, d', [(2048, 2, 64), (1024, 4, 128)])
def test_pure_noise_eigenvalues_fill_wachters_interval(n, views, d):
  """With no signal, S's eigenvalues follow Wachter's law (Bai & Silverstein 2010,
  ch. 4): the smallest and largest sit at its edges, their mean at its mean. A
  simulation, not the formula, is the reference; the noise's scale and offset do
  not matter (the model whitens them)."""
  z = np.random.default_rng(0).normal(size=(n, views, d)) * 3.0 + 5.0
  fitted = information.fit_mixture(z)
  eigenvalues, (low, high, null_mean) = fitted['eigenvalues'], fitted['edges']
  assert eigenvalues.min() == pytest.approx(low, abs=0.03)
  assert eigenvalues.max() == pytest.approx(high, abs=0.05)
  assert eigenvalues.mean() == pytest.approx(null_mean, abs=0.005)
  assert not fitted['kept'].any()   # nothing above the noise edge


def test_infonce_of_a_gaussian_channel_reaches_its_closed_form():
  """Z = mu + noise with mu ~ N(0, s I), unit noise: two views share
  I(Z_a; Z_b) = -D/2 log(1 - (s / (s + 1))^2), 0.588 nats for D = 2, s = 2. With
  the model's exact critic and 2,048 held-out pairs, InfoNCE is close to it (its
  bound log(N / 2) is far above); the lower-bound checks above cannot see a wrong
  critic, which only makes the bound weaker."""
  n, d, s = 4096, 2, 2.0
  rng = np.random.default_rng(0)
  z = rng.normal(size=(n, 1, d)) * math.sqrt(s) + rng.normal(size=(n, 2, d))
  exact = -0.5 * d * math.log(1 - (s / (s + 1)) ** 2)
  out = information.mixture_information(z)
  assert out['mi_infonce_lower'] == pytest.approx(exact, abs=0.05)


def test_views_stacked_or_apart_and_float32_give_the_float64_answer():
  """[N, V, D] alone equals the views passed apart; float32 embeddings (what training
  produces) are analysed in float64, so they give exactly what their float64 copy
  gives."""
  mu, sigma = make_case(8, 8, 1.0, 'anisotropic')
  z = views_of(mu, sigma, 3).astype(np.float32)
  apart = information.information_quantities(z[:, 0], z[:, 1], more_views=[z[:, 2]])
  stacked = information.information_quantities(z)
  wide = information.information_quantities(*(z[:, v].astype(np.float64) for v in range(2)),
                                            more_views=[z[:, 2].astype(np.float64)])
  for key in (*information.MI_KEYS, 'conditional_entropy', 'invariance', 'entropy_gaussian'):
    assert stacked[key] == apart[key] == wide[key], key
  # The paper's isotropic bound D/2 log(2 pi e s^2), s^2 the mean squared difference of
  # the first two views.
  s2 = np.mean(np.square(z[:, 0].astype(np.float64) - z[:, 1]))
  assert stacked['conditional_entropy_paper'] == pytest.approx(
      4 * math.log(2 * math.pi * math.e * s2), rel=1e-5)
