"""Functional tests of the pure loss terms and entropy estimators.

Values against closed forms and hand-worked examples, gradients against
finite differences in float64, the Gram route against the D x D route,
stability on degenerate inputs, invariances, and input validation.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from ssl_jax import estimators
from ssl_jax import losses
from whitening import whitened  # tests/whitening.py


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


def normal(seed, shape, dtype=jnp.float64, scale=1.0):
  return scale * jax.random.normal(jax.random.key(seed), shape, dtype)


# Single-view and two-view terms, as (name, fn(z_a, z_b) -> scalar).
SINGLE_VIEW = {
    'variance': lambda z: losses.variance(z)[0],
    'covariance': lambda z: losses.covariance(z)[0],
    'logdet_entropy': lambda z: estimators.logdet_entropy(z, beta=0.7)[0],
    'logdet_entropy_n-1': lambda z: estimators.logdet_entropy(z, normalizer='n-1')[0],
    'pairwise_upper': lambda z: estimators.pairwise_entropy(z, sigma=1.3, bound='upper')[0],
    'pairwise_lower': lambda z: estimators.pairwise_entropy(z, sigma=1.3, bound='lower')[0],
}
TWO_VIEW = {
    'invariance': lambda a, b: losses.invariance(a, b)[0],
    'vicreg': lambda a, b: losses.vicreg(a, b)[0],
    'vicreg_sum': lambda a, b: losses.vicreg(a, b, var_reduce='sum')[0],
    'barlow_twins': lambda a, b: losses.barlow_twins(a, b)[0],
    'nt_xent': lambda a, b: losses.nt_xent(a, b, temperature=0.5)[0],
    'byol_regression': lambda a, b: losses.byol_regression(a, b)[0],
}


# ---------------------------------------------------------------- closed forms

@pytest.mark.parametrize('n,d', [(64, 8), (16, 32)])
def test_whitened_data_has_zero_covariance_and_variance_hinge(n, d):
  z = jnp.asarray(whitened(n, min(d, n - 1), std=1.5))
  assert float(losses.covariance(z)[0]) == pytest.approx(0.0, abs=1e-10)
  assert float(losses.variance(z, gamma=1.0)[0]) == 0.0
  # ... and the hinge is exactly gamma - sqrt(std^2 + eps) when std < gamma.
  expected = 2.0 - math.sqrt(1.5 ** 2 + 1e-4)
  assert float(losses.variance(z, gamma=2.0)[0]) == pytest.approx(expected, rel=1e-10)


def _random_spd(d, seed):
  a = np.random.default_rng(seed).normal(size=(d, d))
  return a @ a.T / d + 0.5 * np.eye(d)


def test_logdet_and_gaussian_entropy_of_a_large_gaussian_sample():
  d, n, beta = 5, 200_000, 0.8
  s = _random_spd(d, 1)
  z = np.random.default_rng(2).multivariate_normal(np.zeros(d), s, size=n)
  true_logdet = 0.5 * np.linalg.slogdet(np.eye(d) + beta * s)[1]
  # Sampling std of log det of a sample covariance is ~sqrt(2 D / N) = 0.007;
  # 0.5 * that * 5 sigma = 0.018.
  assert float(estimators.logdet_entropy(jnp.asarray(z), beta=beta)[0]) == pytest.approx(
      true_logdet, abs=0.018)
  true_h = 0.5 * d * math.log(2 * math.pi * math.e) + 0.5 * np.linalg.slogdet(s)[1]
  assert float(estimators.gaussian_entropy(jnp.asarray(z))[0]) == pytest.approx(
      true_h, abs=0.018)


def test_pairwise_bounds_sandwich_monte_carlo_mixture_entropy():
  n, d, sigma = 12, 2, 0.6
  centres = np.random.default_rng(3).normal(size=(n, d))
  rng = np.random.default_rng(4)
  m = 400_000
  x = centres[rng.integers(0, n, m)] + sigma * rng.normal(size=(m, d))
  d2 = ((x[:, None, :] - centres[None]) ** 2).sum(-1)                    # [M, N]
  log_comp = -d2 / (2 * sigma ** 2) - 0.5 * d * math.log(2 * math.pi * sigma ** 2)
  log_p = np.logaddexp.reduce(log_comp, axis=1) - math.log(n)
  h_mc, h_se = -log_p.mean(), log_p.std() / math.sqrt(m)
  z = jnp.asarray(centres)
  upper = float(estimators.pairwise_entropy(z, sigma=sigma, bound='upper')[0])
  lower = float(estimators.pairwise_entropy(z, sigma=sigma, bound='lower')[0])
  assert lower - 4 * h_se <= h_mc <= upper + 4 * h_se
  assert lower < upper
  # The general limits: between one component's entropy and that + log N.
  h_component = 0.5 * d * math.log(2 * math.pi * math.e * sigma ** 2)
  assert h_component <= lower and upper <= h_component + math.log(n)


def test_pairwise_entropy_saturates_when_components_separate():
  """Far-apart components: both bounds reach H(component) + log N."""
  z = 1e3 * jnp.eye(6, dtype=jnp.float64)  # six distinct, far-apart rows
  h_max = 0.5 * 6 * math.log(2 * math.pi * math.e) + math.log(6)
  for bound in ('upper', 'lower'):
    assert float(estimators.pairwise_entropy(z, bound=bound)[0]) == pytest.approx(h_max)


# ------------------------------------------------------ hand-worked examples

# Columns of Z_A have mean 0; zc^T zc = [[4, 0, 4], [0, 4, -4], [4, -4, 8]].
Z_A = jnp.array([[1., 1., 0.], [-1., -1., 0.], [1., -1., 2.], [-1., 1., -2.]])
# Z_B - Z_A has three entries of +-1, the rest 0.
Z_B = jnp.array([[0., 1., 0.], [-1., 0., 0.], [1., -1., 1.], [-1., 1., -2.]])


def test_hand_invariance():
  # Three squared differences of 1 over 4 * 3 entries.
  assert float(losses.invariance(Z_A, Z_B)[0]) == pytest.approx(3 / 12)


def test_hand_variance():
  # var (N-1 = 3): 4/3, 4/3, 8/3; gamma = 2.
  std = [math.sqrt(4 / 3 + 1e-4)] * 2 + [math.sqrt(8 / 3 + 1e-4)]
  expected = sum(max(0.0, 2 - s) for s in std) / 3
  assert float(losses.variance(Z_A, gamma=2.0)[0]) == pytest.approx(expected)
  assert float(losses.variance(Z_A, gamma=1.0)[0]) == 0.0  # all std > 1


def test_hand_covariance():
  # C = zc^T zc / 3; off-diagonal entries +-4/3 (twice each) -> 4 * 16/9, / D=3.
  assert float(losses.covariance(Z_A)[0]) == pytest.approx(4 * (4 / 3) ** 2 / 3)


def test_hand_vicreg_matches_weighted_sum_of_its_terms():
  inv, var_a, var_b = 3 / 12, 0.0, None
  zb = Z_B - Z_B.mean(0)
  # Z_B column variances (N-1): [4/3, 4/3, (1/4 + 1/4 + 1 + 9/4 ... computed below)]
  var_b_cols = [float(np.var(np.asarray(zb[:, k]), ddof=1)) for k in range(3)]
  var_b = sum(max(0.0, 1 - math.sqrt(v + 1e-4)) for v in var_b_cols) / 3
  cov_b = float(losses.covariance(Z_B)[0])
  cov_a = 4 * (4 / 3) ** 2 / 3
  expected = 25 * inv + 25 * 0.5 * (var_a + var_b) + 1 * (cov_a + cov_b)
  loss, metrics = losses.vicreg(Z_A, Z_B)
  assert float(loss) == pytest.approx(expected)
  assert float(metrics['invariance']) == pytest.approx(inv)


def test_hand_barlow_twins():
  # Each column has mean 0 and biased variance 1, so batch norm divides by
  # sqrt(1 + eps); z_b swaps the roles of the columns: c = [[0, 1], [1, 0]] / (1 + eps).
  z_a = jnp.array([[1., 1.], [-1., -1.], [1., -1.], [-1., 1.]])
  z_b = jnp.array([[1., 1.], [-1., -1.], [-1., 1.], [1., -1.]])
  eps, lambd = 1e-5, 0.0051
  off = 1 / (1 + eps)
  expected = 0.1 * ((1 - 0) ** 2 * 2 + lambd * 2 * off ** 2)
  assert float(losses.barlow_twins(z_a, z_b, lambd=lambd, scale=0.1, eps=eps)[0]) == (
      pytest.approx(expected))


def test_hand_nt_xent():
  tau = 0.5
  e = jnp.eye(2)
  # Identical views: positive similarity 1, two negatives with similarity 0.
  assert float(losses.nt_xent(e, e, temperature=tau)[0]) == pytest.approx(
      math.log(1 + 2 * math.exp(-1 / tau)))
  # Swapped views: positive has similarity 0, one negative has similarity 1.
  assert float(losses.nt_xent(e, e[::-1], temperature=tau)[0]) == pytest.approx(
      math.log(2 + math.exp(1 / tau)))
  # Scale-free: embeddings are L2-normalised first.
  assert float(losses.nt_xent(3 * e, 0.5 * e, temperature=tau)[0]) == pytest.approx(
      math.log(1 + 2 * math.exp(-1 / tau)))


def test_hand_logdet_and_pairwise():
  # Two points at distance a in D = 1: zc = [-a/2, a/2], C = a^2/4 (normaliser N = 2).
  a, beta, sigma = 3.0, 0.5, 1.2
  z = jnp.array([[0.0], [a]])
  assert float(estimators.logdet_entropy(z, beta=beta)[0]) == pytest.approx(
      0.5 * math.log(1 + beta * a * a / 4))
  for bound, c in (('upper', 2), ('lower', 8)):
    expected = (0.5 * math.log(2 * math.pi * math.e * sigma ** 2) + math.log(2)
                - math.log(1 + math.exp(-a * a / (c * sigma ** 2))))
    assert float(estimators.pairwise_entropy(z, sigma=sigma, bound=bound)[0]) == (
        pytest.approx(expected))


def test_hand_byol():
  p = jnp.array([[1., 0.], [0., 2.]])
  t = jnp.array([[2., 0.], [1., 0.]])   # cos = 1 and 0
  assert float(losses.byol_regression(p, t)[0]) == pytest.approx((0 + 2) / 2)


def test_median_sigma_uses_the_median_squared_distance():
  z = jnp.array([[0.0], [1.0], [3.0]])  # squared distances 1, 9, 4 -> median 4
  _, metrics = estimators.pairwise_entropy(z, sigma=0.5, sigma_mode='median')
  assert float(metrics['sigma2']) == pytest.approx(0.25 * 4)


# ------------------------------------------------------------------ gradients

@pytest.mark.parametrize('name', sorted(SINGLE_VIEW))
def test_single_view_gradients_match_finite_differences(name):
  z = normal(0, (10, 6))
  check_grads(SINGLE_VIEW[name], (z,), order=2, modes=['rev'])


@pytest.mark.parametrize('name', sorted(TWO_VIEW))
def test_two_view_gradients_match_finite_differences(name):
  z_a, z_b = normal(1, (10, 6)), normal(2, (10, 6))
  fn = TWO_VIEW[name]
  if name == 'byol_regression':
    # The target is under stop_gradient: only p gets a gradient.
    check_grads(lambda p: fn(p, z_b), (z_a,), order=2, modes=['rev'])
    assert not np.any(jax.grad(fn, argnums=1)(z_a, z_b))
  else:
    check_grads(fn, (z_a, z_b), order=2, modes=['rev'])


def test_gaussian_entropy_gradient():
  check_grads(lambda z: estimators.gaussian_entropy(z)[0], (normal(3, (20, 4)),),
              order=2, modes=['rev'])


def test_median_sigma_gradient_treats_sigma_as_a_constant():
  z = normal(4, (9, 3))
  _, metrics = estimators.pairwise_entropy(z, sigma_mode='median', sigma=0.8)
  fixed_sigma = math.sqrt(float(metrics['sigma2']))
  grad_median = jax.grad(lambda z: estimators.pairwise_entropy(
      z, sigma_mode='median', sigma=0.8)[0])(z)
  grad_fixed = jax.grad(lambda z: estimators.pairwise_entropy(
      z, sigma=fixed_sigma)[0])(z)
  np.testing.assert_allclose(grad_median, grad_fixed, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------- Gram route = D x D route

@pytest.mark.parametrize('n,d', [(6, 20), (20, 6)])
@pytest.mark.parametrize('fn', [
    lambda z, route: losses.covariance(z, route=route)[0],
    lambda z, route: estimators.logdet_entropy(z, beta=0.5, route=route)[0],
    # Two views: the second is a fixed nonlinear function of the first.
    lambda z, route: losses.barlow_twins(z, jnp.tanh(z[::-1] + 0.3 * z), lambd=0.3,
                                         route=route)[0],
], ids=['covariance', 'logdet_entropy', 'barlow_twins'])
def test_gram_route_equals_covariance_route(n, d, fn):
  z = normal(5, (n, d))
  v_gram, g_gram = jax.value_and_grad(lambda z: fn(z, 'gram'))(z)
  v_cov, g_cov = jax.value_and_grad(lambda z: fn(z, 'cov'))(z)
  np.testing.assert_allclose(v_gram, v_cov, rtol=1e-12)
  np.testing.assert_allclose(g_gram, g_cov, rtol=1e-9, atol=1e-12)
  assert losses.resolve_route('auto', n, d) == ('gram' if n < d else 'cov')


# ------------------------------------------------------------------ stability

DEGENERATE = {
    'identical_views': lambda: (normal(6, (8, 5)),) * 2,
    'collapsed': lambda: (jnp.ones((8, 5)), jnp.ones((8, 5))),
    'large_scale': lambda: (normal(6, (8, 5), scale=1e4), normal(7, (8, 5), scale=1e4)),
    'small_scale': lambda: (normal(6, (8, 5), scale=1e-4), normal(7, (8, 5), scale=1e-4)),
}


@pytest.mark.parametrize('case', sorted(DEGENERATE))
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('name', sorted(SINGLE_VIEW) + sorted(TWO_VIEW))
def test_values_and_gradients_are_finite(case, dtype, name):
  z_a, z_b = (z.astype(dtype) for z in DEGENERATE[case]())
  if name in SINGLE_VIEW:
    fn = lambda a, b: SINGLE_VIEW[name](a) + SINGLE_VIEW[name](b)
  else:
    fn = TWO_VIEW[name]
  value, grads = jax.value_and_grad(fn, argnums=(0, 1))(z_a, z_b)
  assert value.dtype == jnp.float32  # statistics in float32 for low precision
  assert np.isfinite(float(value)), value
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g, np.float32))), g


# ----------------------------------------------------------------- invariances

@pytest.mark.parametrize('name', sorted(SINGLE_VIEW) + sorted(TWO_VIEW))
def test_permuting_the_batch_changes_nothing(name):
  z_a, z_b = normal(8, (12, 5)), normal(9, (12, 5))
  perm = np.random.default_rng(0).permutation(12)
  if name in SINGLE_VIEW:
    fn = lambda a, b: SINGLE_VIEW[name](a)
  else:
    fn = TWO_VIEW[name]
  assert float(fn(z_a[perm], z_b[perm])) == pytest.approx(float(fn(z_a, z_b)), rel=1e-10)


@pytest.mark.parametrize('fn', [
    lambda z: estimators.logdet_entropy(z)[0],
    lambda z: estimators.logdet_entropy(z, route='gram')[0],
    lambda z: estimators.gaussian_entropy(z)[0],
    lambda z: estimators.pairwise_entropy(z, bound='upper')[0],
    lambda z: estimators.pairwise_entropy(z, bound='lower', sigma_mode='median')[0],
])
def test_entropy_is_rotation_invariant(fn):
  z = normal(10, (16, 6))
  rotation, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(6, 6)))
  assert float(fn(z @ rotation)) == pytest.approx(float(fn(z)), rel=1e-10)


# ----------------------------------------------------------------- bad inputs

class _ShapeOnly:
  """Has a shape and no dtype (not an array): refused as not an array."""
  shape = (4, 3)


BAD_CALLS = [
    (lambda: losses.variance(_ShapeOnly()), '^z must be an array of shape'),
    (lambda: losses.variance([[1.0, 2.0], [3.0, 4.0]]), '^z must be an array of shape'),
    (lambda: losses.variance(jnp.ones((4, 3, 2))), '^z must have rank 2'),
    (lambda: losses.covariance(jnp.ones((4,))), 'rank 2'),
    (lambda: losses.invariance(jnp.ones((4, 3)), jnp.ones((4, 2))),
     '^z_a and z_b must have the same shape'),
    (lambda: losses.byol_regression(jnp.ones((4, 3)), jnp.ones((4, 2))),
     '^p and t must have the same shape'),
    (lambda: losses.vicreg(jnp.ones((4, 3)), jnp.ones((5, 3))), 'same shape'),
    (lambda: losses.covariance(jnp.ones((1, 3))), 'N >= 2'),
    (lambda: losses.vicreg(jnp.ones((1, 3)), jnp.ones((1, 3))), '^z_a has N=1 rows'),
    (lambda: estimators.logdet_entropy(jnp.ones((1, 3))), 'N >= 2'),
    (lambda: estimators.pairwise_entropy(jnp.ones((1, 3))), 'N >= 2'),
    (lambda: losses.variance(jnp.ones((4, 3), jnp.int32)), 'floating dtype'),
    # The second view's own fault names the second view, not the first or None.
    (lambda: losses.vicreg(jnp.ones((4, 3)), jnp.ones((4, 3), jnp.int32)),
     '^z_b must have a floating dtype'),
    (lambda: losses.byol_regression(jnp.ones((4, 3)), jnp.ones((4, 3, 1))),
     '^t must have rank 2'),
    (lambda: losses.nt_xent(jnp.ones((4, 3), jnp.int32), jnp.ones((4, 3), jnp.int32)),
     'floating dtype'),
    (lambda: estimators.logdet_entropy(jnp.ones((4, 3)), beta=0.0), 'beta must be > 0'),
    (lambda: estimators.logdet_entropy(jnp.ones((4, 3)), beta=-1.0), 'beta must be > 0'),
    (lambda: estimators.pairwise_entropy(jnp.ones((4, 3)), sigma=0.0), 'sigma must be > 0'),
    (lambda: losses.nt_xent(jnp.ones((4, 3)), jnp.ones((4, 3)), temperature=-0.1),
     'temperature must be > 0'),
    (lambda: estimators.pairwise_entropy(jnp.ones((4, 3)), bound='middle'),
     '^bound must be one of'),
    (lambda: estimators.logdet_entropy(jnp.ones((4, 3)), normalizer='n+1'),
     '^normalizer must be one of'),
    (lambda: estimators.gaussian_entropy(jnp.ones((9, 3)), normalizer='N'),
     '^normalizer must be one of'),
    (lambda: losses.covariance(jnp.ones((4, 3)), route='fast'), '^route must be one of'),
    # Each hyper-parameter's error names it (mutation testing: a misspelt name passes
    # a test that only matches the rest of the message).
    (lambda: losses.variance(jnp.ones((4, 3)), gamma=0.0), '^gamma must be > 0'),
    (lambda: losses.variance(jnp.ones((4, 3)), eps=-1.0), '^eps must be > 0'),
    (lambda: losses.vicreg(jnp.ones((4, 3)), jnp.ones((4, 3)), var_reduce='max'),
     '^var_reduce must be one of'),
    (lambda: losses.barlow_twins(jnp.ones((4, 3)), jnp.ones((4, 3)), lambd=0.0),
     '^lambd must be > 0'),
    (lambda: losses.barlow_twins(jnp.ones((4, 3)), jnp.ones((4, 3)), scale=0.0),
     '^scale must be > 0'),
    (lambda: losses.barlow_twins(jnp.ones((4, 3)), jnp.ones((4, 3)), eps=0.0),
     '^eps must be > 0'),
    (lambda: estimators.pairwise_entropy(jnp.ones((4, 3)), sigma_mode='auto'),
     '^sigma_mode must be one of'),
    (lambda: estimators.pairwise_entropy(jnp.ones((4, 3)), bound='chernoff', alpha=1.0),
     'alpha in \\(0, 1\\)'),
    (lambda: estimators.gaussian_entropy(jnp.ones((4, 8))), 'N > D'),
]


@pytest.mark.parametrize('call,message', BAD_CALLS)
def test_bad_input_raises_value_error_naming_the_problem(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_bad_input_is_caught_at_trace_time_under_jit():
  with pytest.raises(ValueError, match='same shape'):
    jax.jit(lambda a, b: losses.invariance(a, b)[0])(jnp.ones((4, 3)), jnp.ones((4, 2)))


# ------------------------------------------- checks that a plausible bug fails
# Each test below fails for a realistic bug that the tests above let through
# (issue: surviving mutants of the loss core); the value it checks is known
# apart from the code.

def test_covariance_ignores_a_shift_of_the_embeddings():
  """The covariance is of centred embeddings: adding a constant changes nothing.
  A 10 x 6 example shifted by 3 would go from 1.11 to ~571 if it were not centred."""
  z = normal(3, (10, 6))
  shifted = z + 3.0
  for route in ('cov', 'gram'):
    assert float(losses.covariance(shifted, route=route)[0]) == pytest.approx(
        float(losses.covariance(z, route=route)[0]), rel=1e-10)


def test_covariance_of_a_known_uncentred_sample():
  # Columns (1, 2, 3, 4) + 10 and (2, 4, 6, 9): centred, the N-1 covariance's
  # off-diagonal entry is sum((-1.5, -.5, .5, 1.5) * (-3.25, -1.25, .75, 3.75)) / 3.
  z = jnp.array([[11., 2.], [12., 4.], [13., 6.], [14., 9.]])
  c01 = (1.5 * 3.25 + 0.5 * 1.25 + 0.5 * 0.75 + 1.5 * 3.75) / 3
  assert float(losses.covariance(z)[0]) == pytest.approx(2 * c01 ** 2 / 2)


@pytest.mark.parametrize('normalizer, m', [('n', 6), ('n-1', 5)])
def test_logdet_normalizer_on_the_gram_route_where_n_is_below_d(normalizer, m):
  """N = 6 < D = 20 takes the Gram route; the value must use the normaliser asked for:
  1/2 log det(I + beta zc^T zc / m), computed here from the D x D matrix in numpy."""
  z = np.asarray(normal(5, (6, 20)))
  zc = z - z.mean(0)
  exact = 0.5 * np.linalg.slogdet(np.eye(20) + 0.7 * zc.T @ zc / m)[1]
  h, _ = estimators.logdet_entropy(jnp.asarray(z), beta=0.7, normalizer=normalizer,
                                   route='auto')
  assert float(h) == pytest.approx(exact, rel=1e-10)


@pytest.mark.parametrize('alpha', [0.2, 0.5, 0.9])
def test_chernoff_bound_of_two_points_closed_form(alpha):
  """Two points at distance a in D = 1: the Chernoff-alpha kernel's exponent is
  alpha (1 - alpha) a^2 / (2 sigma^2), i.e. c = 2 / (alpha (1 - alpha))."""
  a, sigma = 2.0, 0.8
  z = jnp.array([[0.0], [a]])
  expected = (0.5 * math.log(2 * math.pi * math.e * sigma ** 2) + math.log(2)
              - math.log(1 + math.exp(-alpha * (1 - alpha) * a * a / (2 * sigma ** 2))))
  h, _ = estimators.pairwise_entropy(z, sigma=sigma, bound='chernoff', alpha=alpha)
  assert float(h) == pytest.approx(expected)


def test_gaussian_entropy_of_a_small_whitened_sample_uses_n_minus_1():
  """A whitened sample (N - 1 covariance std^2 I): D/2 log(2 pi e) + D log std exactly;
  with N instead of N - 1 it would be off by D/2 log(N / (N - 1)) = 0.13 nats here."""
  n, d, std = 12, 3, 2.5
  h, _ = estimators.gaussian_entropy(jnp.asarray(whitened(n, d, std)))
  assert float(h) == pytest.approx(d / 2 * math.log(2 * math.pi * math.e) + d * math.log(std),
                                   rel=1e-12)


def test_barlow_twins_hand_example_where_the_diagonal_and_off_diagonal_sums_differ():
  """Three orthonormal-ish columns, views identical but for one sign: c = diag(1, 1, -1)
  (over 1 + eps), so the diagonal term is (1 - 1)^2 + (1 - 1)^2 + (1 + 1)^2 = 4 (near)
  and the off-diagonal term 0: lambda on the wrong entries would change it by 100x."""
  z_a = jnp.array([[1., 1., 1.], [1., -1., -1.], [-1., 1., -1.], [-1., -1., 1.]])
  z_b = z_a * jnp.array([1., 1., -1.])
  eps, lambd, scale = 1e-5, 0.0051, 0.1
  c = 1 / (1 + eps)
  expected = scale * ((1 - c) ** 2 * 2 + (1 + c) ** 2)
  assert float(losses.barlow_twins(z_a, z_b, lambd=lambd, scale=scale, eps=eps)[0]) == (
      pytest.approx(expected, rel=1e-10))


def test_every_term_reports_its_value_under_its_name():
  """The training loop logs terms by these names (metrics.jsonl, the curves)."""
  a, b = normal(1, (8, 5)), normal(2, (8, 5))
  cases = {
      'invariance': losses.invariance(a, b), 'variance': losses.variance(a),
      'covariance': losses.covariance(a), 'barlow_twins': losses.barlow_twins(a, b),
      'nt_xent': losses.nt_xent(a, b), 'byol': losses.byol_regression(a, b),
      'logdet_entropy': estimators.logdet_entropy(a),
      'gaussian_entropy': estimators.gaussian_entropy(a),
      'pairwise_entropy': estimators.pairwise_entropy(a),
  }
  for name, (value, metrics) in cases.items():
    assert float(metrics[name]) == pytest.approx(float(value)), name
  loss, metrics = losses.vicreg(a, b)
  assert float(metrics['loss']) == pytest.approx(float(loss))
  assert {'invariance', 'variance', 'covariance'} <= set(metrics)


def test_per_sample_terms_accept_a_single_row():
  """Under pmap a device may hold one row: the invariance and BYOL's regression are
  means of per-sample values and need no batch statistic."""
  a, b = jnp.array([[0., 1.]]), jnp.array([[2., 1.]])
  assert float(losses.invariance(a, b)[0]) == pytest.approx(2.0)         # (4 + 0) / 2
  assert float(losses.byol_regression(a, b)[0]) == pytest.approx(2.0 - 2.0 / math.sqrt(5))


@pytest.mark.parametrize('name', ['vicreg', 'barlow_twins', 'nt_xent', 'variance', 'covariance',
                                  'logdet_entropy', 'pairwise_entropy', 'gaussian_entropy'])
def test_one_row_per_device_gives_the_global_batch_value(name):
  """A batch statistic gathered over devices needs N >= 2 globally, not on each device:
  with 8 devices and 8 rows, each device holds one row, and the value is the one-device one."""
  from jax.sharding import PartitionSpec as P
  from ssl_jax import sharding
  fns = {
      'vicreg': losses.vicreg, 'barlow_twins': losses.barlow_twins, 'nt_xent': losses.nt_xent,
      'variance': lambda a, b, **kw: losses.variance(a, **kw),
      'covariance': lambda a, b, **kw: losses.covariance(a, **kw),
      'logdet_entropy': lambda a, b, **kw: estimators.logdet_entropy(a, **kw),
      'pairwise_entropy': lambda a, b, **kw: estimators.pairwise_entropy(a, **kw),
      'gaussian_entropy': lambda a, b, **kw: estimators.gaussian_entropy(a, **kw)}
  fn = fns[name]
  n = jax.device_count()
  a, b = normal(3, (n, 5)), normal(4, (n, 5))
  expected = float(fn(a, b)[0])
  mesh = sharding.make_mesh()
  per_device = jax.shard_map(lambda x, y: fn(x, y, axis_name=sharding.DATA_AXIS)[0], mesh=mesh,
                             in_specs=(P(sharding.DATA_AXIS), P(sharding.DATA_AXIS)),
                             out_specs=P())
  assert float(jax.jit(per_device)(a, b)) == pytest.approx(expected, rel=1e-9)


def test_two_rows_are_enough_for_vicreg():
  """N = 2 is the smallest batch with a variance. Rows (0, 0) and (2, 2): each column's
  unbiased variance is 2 (std 1.41 > gamma: no hinge) and its covariance is 2, so each view's
  covariance term is 2 * 2^2 / D = 4 and VICReg(a, a) = 0 + 0 + 4 + 4 = 8."""
  a = jnp.array([[0.0, 0.0], [2.0, 2.0]], jnp.float64)
  loss, metrics = losses.vicreg(a, a)
  assert float(loss) == pytest.approx(8.0)
  assert float(metrics['variance']) == 0.0 and float(metrics['invariance']) == 0.0
  # gamma and eps reach the variance term: std sqrt(2 + 0.5) under gamma = 2 hinges.
  loss, _ = losses.vicreg(a, a, gamma=2.0, eps=0.5)
  assert float(loss) == pytest.approx(25.0 * (2.0 - math.sqrt(2.5)) + 8.0)


@pytest.mark.parametrize('fn, name', [
    (lambda z: losses.barlow_twins(z, z), 'z_a'),
    (lambda z: estimators.gaussian_entropy(z), 'z'),
    (lambda z: estimators.logdet_entropy(z), 'z'),
    (lambda z: estimators.pairwise_entropy(z), 'z'),
    (lambda z: losses.nt_xent(z, z), 'z_a'),
    (lambda z: losses.variance(z), 'z'),
    (lambda z: losses.covariance(z), 'z'),
])
def test_one_row_without_devices_is_refused_naming_the_input(fn, name):
  with pytest.raises(ValueError, match=f'^{name} has N=1 rows'):
    fn(jnp.ones((1, 3)))


def test_two_rows_are_enough_for_barlow_twins_with_its_documented_defaults():
  """Rows (1, 1), (-1, -1) and (1, -1), (-1, 1): each column has mean 0 and biased
  variance 1, so after the batch norm c = s [[1, -1], [1, -1]] with s = 1 / sqrt(1 + eps)^2,
  and the loss is scale ((1 - s)^2 + (1 + s)^2 + lambd 2 s^2), defaults lambd 0.0051,
  scale 1, eps 1e-5."""
  a = jnp.array([[1.0, 1.0], [-1.0, -1.0]], jnp.float64)
  b = jnp.array([[1.0, -1.0], [-1.0, 1.0]], jnp.float64)
  s = 1 / (1 + 1e-5)
  loss, metrics = losses.barlow_twins(a, b)
  assert float(loss) == pytest.approx((1 - s) ** 2 + (1 + s) ** 2 + 0.0051 * 2 * s ** 2,
                                      rel=1e-12)
  assert float(metrics['off_diag']) == pytest.approx(2 * s ** 2, rel=1e-12)
  assert float(metrics['on_diag']) == pytest.approx((1 - s) ** 2 + (1 + s) ** 2, rel=1e-12)


def test_barlow_twins_does_not_see_a_rescaled_column():
  # Each column is batch-normalised on its own, so scaling one column of one
  # view leaves c, and the loss, unchanged (up to eps against the variances).
  a, b = normal(5, (32, 4)), normal(6, (32, 4))
  scaled_a = a * jnp.array([1.0, 10.0, 0.1, 3.0])
  scaled_b = b * jnp.array([7.0, 1.0, 1.0, 0.2])
  np.testing.assert_allclose(float(losses.barlow_twins(scaled_a, scaled_b, eps=1e-12)[0]),
                             float(losses.barlow_twins(a, b, eps=1e-12)[0]), rtol=1e-9)


def test_gaussian_entropy_of_two_points_ridge_and_the_singular_case():
  """Closed forms: two points 0 and 2 in 1-D have unbiased variance 2, so
  H = log(2 pi e 2) / 2. A whitened sample (unbiased covariance I, N = 8, D = 3) with
  the ridge eps = 0.5 has H = 3/2 log(2 pi e) + 3/2 log(1 + 1/2). N = D without a
  ridge is singular."""
  two = jnp.array([[0.0], [2.0]], jnp.float64)
  assert float(estimators.gaussian_entropy(two)[0]) == pytest.approx(
      0.5 * math.log(2 * math.pi * math.e * 2.0), rel=1e-12)
  h, _ = estimators.gaussian_entropy(jnp.asarray(whitened(8, 3)), eps=0.5)
  assert float(h) == pytest.approx(
      1.5 * math.log(2 * math.pi * math.e) + 1.5 * math.log(1.5), rel=1e-12)
  with pytest.raises(ValueError, match='^gaussian_entropy needs N > D'):
    estimators.gaussian_entropy(normal(8, (3, 3)))   # N = D = 3


@pytest.mark.parametrize('estimate', [
    lambda z: estimators.gaussian_entropy(z, eps=0.1),
    lambda z: estimators.pairwise_entropy(z, sigma=0.5),     # a fixed bandwidth
])
def test_entropies_keep_float32_when_float64_is_enabled(estimate):
  # A constant built as float64 (the ridge's identity, a fixed sigma^2) would promote
  # a float32 batch.
  z = jnp.asarray(np.random.default_rng(1).normal(size=(6, 2)), jnp.float32)
  with jax.enable_x64(True):
    entropy, _ = estimate(z)
  assert entropy.dtype == jnp.float32


def test_the_chernoff_bound_at_its_default_alpha_is_bhattacharyya():
  z = normal(7, (12, 3))
  np.testing.assert_allclose(float(estimators.pairwise_entropy(z, bound='chernoff')[0]),
                             float(estimators.pairwise_entropy(z, bound='lower')[0]), rtol=1e-12)


def test_nt_xent_with_its_default_temperature_and_its_top1_metric():
  """Two orthogonal images with equal views: each of the 4 anchors has cosine 1 with
  its positive and 0 with its 2 negatives, so the loss is log(1 + 2 exp(-1 / 0.2)) and
  every positive is the nearest; with view b's images swapped every nearest is a
  negative."""
  eye = jnp.eye(2, dtype=jnp.float64)
  loss, metrics = losses.nt_xent(eye, eye)
  assert float(loss) == pytest.approx(math.log(1 + 2 * math.exp(-5.0)), rel=1e-12)
  assert float(metrics['positive_top1']) == 1.0
  _, swapped = losses.nt_xent(eye, eye[::-1])
  assert float(swapped['positive_top1']) == 0.0


def test_chernoff_constant_defaults_to_bhattacharyya_and_refuses_alpha_zero():
  # 2 / (alpha (1 - alpha)) at alpha = 1/2 is 8, the Bhattacharyya constant.
  assert estimators.pairwise_kernel_constant('chernoff') == pytest.approx(8.0)
  for alpha in (0.0, 1.0):
    with pytest.raises(ValueError, match=r'^The Chernoff bound needs alpha in \(0, 1\)'):
      estimators.pairwise_kernel_constant('chernoff', alpha)


def test_variance_of_one_feature_with_its_documented_defaults():
  # Points 0 and 1: unbiased variance 1/2, so relu(gamma - sqrt(1/2 + eps)) with gamma 1,
  # eps 1e-4. One feature (D = 1) is a valid embedding.
  loss, metrics = losses.variance(jnp.array([[0.0], [1.0]], jnp.float64))
  assert float(loss) == pytest.approx(1 - math.sqrt(0.5 + 1e-4), rel=1e-12)
  assert float(metrics['std_mean']) == pytest.approx(math.sqrt(0.5 + 1e-4), rel=1e-12)


@pytest.mark.parametrize('scale', [1e-3, 1.0, 1e3])
def test_effective_rank_of_a_small_spectrum_is_scale_free(scale):
  """Roy & Vetterli (2007): exp(H(p)) with p = s / sum(s). Singular values
  (0.3, 0.1, 0.1, 0) give p = (0.6, 0.2, 0.2, 0): exp(-(0.6 log 0.6 + 0.4 log 0.2))
  whatever their scale, so a spectrum summing below 1 is normalised too, and a
  zero singular value adds nothing."""
  expected = math.exp(-(0.6 * math.log(0.6) + 0.4 * math.log(0.2)))
  s = jnp.array([0.3, 0.1, 0.1, 0.0]) * scale
  assert float(estimators.effective_rank_of_singular_values(s)) == pytest.approx(
      expected, rel=1e-5)
  # Rows +-(0.3, 0, 0), +-(0, 0.1, 0), +-(0, 0, 0.1) (times scale / sqrt 2) are
  # centred with orthogonal columns of norms 0.3, 0.1, 0.1: the same singular values.
  rows = np.zeros((6, 4), np.float32)
  for i, value in enumerate((0.3, 0.1, 0.1)):
    rows[2 * i, i], rows[2 * i + 1, i] = value, -value
  z = jnp.asarray(rows * scale / math.sqrt(2))
  assert float(estimators.effective_rank(z)) == pytest.approx(expected, rel=1e-4)


def test_squared_distances_below_one_are_kept():
  """Points (0, 0), (0.1, 0), (0, 0.2): squared distances 0.01, 0.04 and 0.05, by
  hand; only rounding's negative values may be clipped, and the diagonal is 0."""
  z = jnp.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.2]])
  expected = np.array([[0.0, 0.01, 0.04], [0.01, 0.0, 0.05], [0.04, 0.05, 0.0]])
  np.testing.assert_allclose(estimators.pairwise_sq_distances(z), expected, atol=1e-7)


def test_conditional_entropy_bound_closed_form():
  """Views that differ by +-0.1 in every coordinate: s^2 = 0.01 whatever the
  embeddings are, and the bound is D/2 log(2 pi e s^2) (docs/method.md, section 1)."""
  z_a = jnp.arange(12.0).reshape(4, 3) * 0.5 - 2.0
  signs = jnp.array([[1.0, -1.0, 1.0], [-1.0, 1.0, 1.0], [1.0, 1.0, -1.0], [-1.0, -1.0, -1.0]])
  bound, metrics = estimators.conditional_entropy_bound(z_a, z_a + 0.1 * signs)
  np.testing.assert_allclose(metrics['invariance'], 0.01, rtol=1e-5)
  np.testing.assert_allclose(bound, 1.5 * math.log(2 * math.pi * math.e * 0.01), rtol=1e-5)
  np.testing.assert_allclose(metrics['conditional_entropy'], bound)
  # Two images are enough (the bound needs no batch statistic beyond the mean), one is not.
  two = jnp.array([[0.0, 0.0], [1.0, 1.0]])
  np.testing.assert_allclose(estimators.conditional_entropy_bound(two, two + 0.1)[0],
                             math.log(2 * math.pi * math.e * 0.01), rtol=1e-5)
  with pytest.raises(ValueError, match='^z has N=1 rows'):
    estimators.conditional_entropy_bound(two[:1], two[:1])


@pytest.mark.parametrize('beta', [0.5, 2.0])
def test_logdet_as_differential_entropy_is_the_entropy_of_the_smoothed_gaussian(beta):
  """C = I in D = 3: 0.5 log det(I + beta C) = 3/2 log(1 + beta), and it stands for
  the entropy of N(0, C + I / beta), 3/2 log(2 pi e (1 + 1 / beta)) nats."""
  logdet = 1.5 * math.log(1 + beta)
  expected = 1.5 * math.log(2 * math.pi * math.e * (1 + 1 / beta))
  assert float(estimators.logdet_as_differential_entropy(logdet, 3, beta)) == pytest.approx(
      expected, rel=1e-12)
