"""Objectives built from names and weights, and every term on 8 fake devices.

The multi-device tests check that `jax.pmap` with `axis_name`,
`jax.shard_map` with `axis_name`, and `jax.jit` over a sharded global batch
give the value and gradients of one device on the whole batch.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from ssl_jax import objectives
from ssl_jax import sharding
from whitening import whitened  # tests/whitening.py

N_DEVICES = 8
KEYS = ('z_a', 'z_b', 'p_a', 'p_b', 't_a', 't_b')


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


def make_outputs(n=16, d=6, seed=0):
  keys = jax.random.split(jax.random.key(seed), len(KEYS))
  return {k: jax.random.normal(key, (n, d), jnp.float64) for k, key in zip(KEYS, keys)}


def fixed_sigma(terms):
  """Median-sigma pairwise terms put the bandwidth under stop_gradient, which
  finite differences cannot see; gradient checks use a fixed sigma instead
  (the median-mode gradient equals it: see losses_test)."""
  if 'pairwise_entropy' in terms:
    terms['pairwise_entropy'].update(sigma_mode='fixed', sigma=2.0)
  return terms


ALL_METHODS = sorted(objectives.METHODS) + ['vicreg_it+add', 'vicreg_pairdist+add']


def terms_for(method):
  if method.endswith('+add'):
    return objectives.method_terms(method[:-4], vicreg_terms='add')
  return objectives.method_terms(method)


def test_vicreg_objective_equals_the_reference_weighted_sum():
  from ssl_jax import losses
  out = make_outputs()
  loss, metrics = objectives.build_objective(objectives.method_terms('vicreg'))(out)
  expected, _ = losses.vicreg(out['z_a'], out['z_b'])
  assert float(loss) == pytest.approx(float(expected), rel=1e-12)
  assert set(metrics) >= {'loss', 'invariance', 'variance', 'covariance'}


def test_entropy_terms_are_subtracted_and_modes_differ():
  from ssl_jax import estimators
  out = make_outputs()
  terms = objectives.method_terms('vicreg_it')
  loss, metrics = objectives.build_objective(terms)(out)
  h_a = estimators.logdet_entropy(out['z_a'])[0]
  h_b = estimators.logdet_entropy(out['z_b'])[0]
  inv = jnp.mean((out['z_a'] - out['z_b']) ** 2)
  assert float(metrics['logdet_entropy']) == pytest.approx(float(0.5 * (h_a + h_b)))
  w = terms['logdet_entropy']['weight']
  assert w > 0
  assert float(loss) == pytest.approx(float(25 * inv - w * 0.5 * (h_a + h_b)))
  terms['logdet_entropy']['mode'] = 'concat'
  _, metrics_concat = objectives.build_objective(terms)(out)
  h_concat = estimators.logdet_entropy(jnp.concatenate([out['z_a'], out['z_b']]))[0]
  assert float(metrics_concat['logdet_entropy']) == pytest.approx(float(h_concat))


def test_replace_versus_add_vicreg_terms():
  assert set(objectives.method_terms('vicreg_it')) == {'invariance', 'logdet_entropy'}
  assert set(objectives.method_terms('vicreg_pairdist', vicreg_terms='add')) == {
      'invariance', 'pairwise_entropy', 'variance', 'covariance'}


def test_byol_entropy_can_read_the_predictions():
  terms = objectives.method_terms('byol_logdet')
  terms['logdet_entropy']['inputs'] = 'p'
  assert objectives.needed_outputs(terms) == {'p_a', 'p_b', 't_a', 't_b', 'z_a', 'z_b'}
  out = make_outputs()
  from ssl_jax import estimators
  _, metrics = objectives.build_objective(terms)(out)
  expected = 0.5 * (estimators.logdet_entropy(out['p_a'])[0]
                    + estimators.logdet_entropy(out['p_b'])[0])
  assert float(metrics['logdet_entropy']) == pytest.approx(float(expected))


def test_logdet_on_the_sphere_ignores_the_embedding_scale():
  terms = objectives.method_terms('byol_logdet')
  terms['logdet_entropy']['sphere'] = True
  objective = objectives.build_objective(terms)
  out = make_outputs()
  from ssl_jax import estimators
  _, metrics = objectives.build_objective(terms)(out)
  rows = lambda z: z * np.sqrt(z.shape[1]) / np.linalg.norm(z, axis=1, keepdims=True)
  expected = 0.5 * (estimators.logdet_entropy(rows(out['z_a']))[0]
                    + estimators.logdet_entropy(rows(out['z_b']))[0])
  assert float(metrics['logdet_entropy']) == pytest.approx(float(expected), rel=1e-12)
  # The raw log-det grows with the scale (what let BYOL + LogDet diverge); this one does not.
  scaled = {**out, 'z_a': 10 * out['z_a'], 'z_b': 10 * out['z_b']}
  assert float(objective(scaled)[1]['logdet_entropy']) == pytest.approx(
      float(metrics['logdet_entropy']), rel=1e-10)
  raw = objectives.build_objective(objectives.method_terms('byol_logdet'))
  assert float(raw(scaled)[1]['logdet_entropy']) > float(raw(out)[1]['logdet_entropy']) + 1
  # Its gradient against finite differences, through the rescaling.
  check_grads(lambda z_a, z_b: objective({**out, 'z_a': z_a, 'z_b': z_b})[0],
              (out['z_a'], out['z_b']), order=1, modes=['rev'])


def test_byol_target_gets_no_gradient():
  out = make_outputs()
  objective = objectives.build_objective(objectives.method_terms('byol'))
  grads = jax.grad(lambda o: objective(o)[0])(out)
  assert not np.any(grads['t_a']) and not np.any(grads['t_b'])
  assert np.any(grads['p_a']) and np.any(grads['p_b'])


@pytest.mark.parametrize('method', ALL_METHODS)
def test_every_method_gradient_matches_finite_differences(method):
  objective = objectives.build_objective(fixed_sigma(terms_for(method)))
  out = make_outputs(n=8, d=4)
  # Targets are under stop_gradient, which finite differences cannot see:
  # hold them fixed and differentiate the rest.
  free = ('z_a', 'z_b', 'p_a', 'p_b')
  check_grads(lambda *arrays: objective({**out, **dict(zip(free, arrays))})[0],
              tuple(out[k] for k in free), order=1, modes=['rev'])


# -------------------------------------------------------------- multi-device

def _split(x):
  return x.reshape(N_DEVICES, x.shape[0] // N_DEVICES, *x.shape[1:])


@pytest.mark.parametrize('method', ALL_METHODS)
def test_pmap_shard_map_and_jit_equal_one_device(method):
  assert jax.device_count() == N_DEVICES, 'tests/conftest.py sets 8 CPU devices'
  objective = objectives.build_objective(terms_for(method))
  out = make_outputs(n=32, d=6, seed=1)

  def loss_fn(o, axis_name=None):
    return objective(o, axis_name=axis_name)[0]

  ref_value, ref_grads = jax.value_and_grad(loss_fn)(out)

  # pmap: per-device slices; each device gets devices x d loss / d its slice
  # (FullGatherLayer semantics), so the pmean of gradients, what a
  # data-parallel step applies to shared parameters, is exact.
  pmapped = jax.pmap(jax.value_and_grad(functools.partial(loss_fn, axis_name=sharding.DATA_AXIS)),
                     axis_name=sharding.DATA_AXIS)
  values, grads = pmapped(jax.tree.map(_split, out))
  np.testing.assert_allclose(values, np.full(N_DEVICES, ref_value), rtol=1e-10)
  for k in KEYS:
    np.testing.assert_allclose(
        grads[k].reshape(ref_grads[k].shape) / N_DEVICES, ref_grads[k],
        rtol=1e-8, atol=1e-12, err_msg=k)

  mesh = sharding.make_mesh()
  sharded = jax.device_put(out, NamedSharding(mesh, P(sharding.DATA_AXIS)))

  # shard_map: the same functions with axis_name, exact gradients.
  sm = jax.shard_map(functools.partial(loss_fn, axis_name=sharding.DATA_AXIS), mesh=mesh,
                     in_specs=P(sharding.DATA_AXIS), out_specs=P())
  value, grads = jax.jit(jax.value_and_grad(sm))(sharded)
  np.testing.assert_allclose(value, ref_value, rtol=1e-10)
  for k in KEYS:
    np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-8, atol=1e-12, err_msg=k)

  # jit over the sharded global batch: no axis_name, XLA inserts collectives.
  value, grads = jax.jit(jax.value_and_grad(loss_fn))(sharded)
  np.testing.assert_allclose(value, ref_value, rtol=1e-10)
  for k in KEYS:
    np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-8, atol=1e-12, err_msg=k)


# ----------------------------------------------------------------- bad input

@pytest.mark.parametrize('terms,message', [
    ({'invariance': {'weight': 1.0}, 'entropy': {'weight': 1.0}}, "Unknown loss term 'entropy'"),
    ({'logdet_entropy': {'weight': 1.0, 'betta': 2.0}}, "unknown parameters \\['betta'\\]"),
    ({'invariance': {'weight': -1.0}}, 'weight >= 0'),
    ({'invariance': {}}, 'finite weight'),
    ({'invariance': {'weight': float('nan')}}, 'finite weight'),
    ({}, 'no terms'),
])
def test_bad_objective_config_raises(terms, message):
  with pytest.raises(ValueError, match=message):
    objectives.build_objective(terms)


def test_bad_method_and_missing_outputs_raise():
  with pytest.raises(ValueError, match='^method must be one of'):
    objectives.method_terms('vicreg2')
  with pytest.raises(ValueError, match="vicreg_terms='add' applies"):
    objectives.method_terms('simclr', vicreg_terms='add')
  objective = objectives.build_objective(objectives.method_terms('byol'))
  out = make_outputs()
  with pytest.raises(ValueError, match='predictor and a target'):
    objective({'z_a': out['z_a'], 'z_b': out['z_b']})
  objective = objectives.build_objective(
      {'pairwise_entropy': {'weight': 1.0, 'mode': 'both'}})
  with pytest.raises(ValueError, match='^mode must be one of'):
    objective(out)
  for term, params, message in [
      ('logdet_entropy', {'inputs': 'q'}, '^inputs must be one of'),
      ('variance', {'reduce': 'max'}, '^reduce must be one of'),
      ('pairwise_entropy', {'mode': 'concat', 'inputs': 'y'}, '^inputs must be one of')]:
    objective = objectives.build_objective({term: {'weight': 1.0, **params}})
    with pytest.raises(ValueError, match=message):
      objective(out)
  with pytest.raises(ValueError, match='^vicreg_terms must be one of'):
    objectives.method_terms('vicreg_it', vicreg_terms='both')


def test_every_entropy_term_is_maximised_and_each_objective_is_its_weighted_sum():
  """The objective is sum_t w_t term_t with every entropy term subtracted: checked for
  each method on known arrays against the terms computed one by one."""
  from ssl_jax import estimators
  from ssl_jax import losses
  out = make_outputs(n=12, d=5, seed=3)
  for method in ('vicreg_pairdist', 'byol_pairdist', 'byol_logdet', 'vicreg_it'):
    terms = fixed_sigma(objectives.method_terms(method))
    loss, metrics = objectives.build_objective(terms)(out)
    expected = 0.0
    for name, spec in terms.items():
      w = spec['weight']
      if name == 'pairwise_entropy':
        inputs = spec.get('inputs', 'z')
        h = np.mean([float(estimators.pairwise_entropy(out[f'{inputs}_{v}'], sigma=2.0,
                                                       bound=spec.get('bound', 'upper'))[0])
                     for v in 'ab'])
        expected -= w * h
      elif name == 'logdet_entropy':
        inputs = spec.get('inputs', 'z')
        z = {v: out[f'{inputs}_{v}'] for v in 'ab'}
        if spec.get('sphere'):
          z = {v: objectives.on_sphere(x) for v, x in z.items()}
        h = np.mean([float(estimators.logdet_entropy(z[v], beta=spec.get('beta', 1.0))[0])
                     for v in 'ab'])
        expected -= w * h
      elif name == 'invariance':
        expected += w * float(losses.invariance(out['z_a'], out['z_b'])[0])
      elif name == 'byol':
        expected += w * (float(losses.byol_regression(out['p_a'], out['t_b'])[0])
                         + float(losses.byol_regression(out['p_b'], out['t_a'])[0]))
      else:
        raise AssertionError(f'{method}: unexpected term {name}')
    assert float(loss) == pytest.approx(expected, rel=1e-10), method


def test_byol_pairs_each_prediction_with_the_other_views_target():
  """byol(p_a, t_b) + byol(p_b, t_a) on arrays where the pairing matters: p_a = t_b and
  p_b = t_a make the loss 0; pairing p_b with t_b instead would not."""
  out = make_outputs(n=8, d=4, seed=1)
  out['t_b'], out['t_a'] = out['p_a'] * 2.0, out['p_b'] * 3.0   # parallel: cosine 1
  loss, metrics = objectives.build_objective(objectives.method_terms('byol'))(out)
  assert float(loss) == pytest.approx(0.0, abs=1e-12)
  assert set(metrics) == {'loss', 'byol'}    # the term's value once, under its name


def whitened_biased(d, n=8):
  """[n, d] with zero column means and z^T z / n = I exactly (biased covariance)."""
  return whitened(n, d, std=math.sqrt(n / (n - 1)))


def test_a_barlow_term_given_only_its_weight_takes_lambda_scale_and_eps_of_its_docs():
  # Whitened z_a and z_b = z_a rotated by theta: after the batch norm (biased
  # variance 1, + eps) the cross-correlation is R(theta) / (1 + eps), so the
  # loss is scale * (2 (1 - cos / (1 + eps))^2 + lambd * 2 sin^2 / (1 + eps)^2)
  # with the term's documented defaults lambd 0.0051, scale 0.1, eps 1e-5.
  z_a = whitened_biased(2)
  theta = 0.7
  rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  out = {'z_a': jnp.asarray(z_a), 'z_b': jnp.asarray(z_a @ rot)}
  loss, _ = objectives.build_objective({'barlow_twins': {'weight': 1.0}})(out)
  s = 1 + 1e-5
  expected = 0.1 * (2 * (1 - np.cos(theta) / s) ** 2 + 0.0051 * 2 * np.sin(theta) ** 2 / s ** 2)
  assert float(loss) == pytest.approx(expected, rel=1e-9)


def test_a_logdet_term_given_only_its_weight_is_the_per_view_beta_1_entropy_of_z():
  # Whitened z (covariance I with the 1/N normaliser): log det(I + beta I) / 2 =
  # D/2 log 2 at beta 1. z_b = 2 z_a has covariance 4 I: D/2 log 5. Per view the
  # term averages the two; the concatenated batch would give D/2 log 3.5, 'n-1' or
  # beta 2 other values, and the sphere would not see the factor 2.
  d = 3
  z_a = whitened_biased(d)
  out = {'z_a': jnp.asarray(z_a), 'z_b': jnp.asarray(2 * z_a)}
  loss, metrics = objectives.build_objective({'logdet_entropy': {'weight': 1.0}})(out)
  expected = 0.5 * (d / 2 * np.log(2) + d / 2 * np.log(5))
  assert float(metrics['logdet_entropy']) == pytest.approx(expected, rel=1e-9)
  assert float(loss) == pytest.approx(-expected, rel=1e-9)


def test_on_sphere_puts_every_row_at_radius_sqrt_d_whatever_its_norm():
  z = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4))
                  * np.array([1e-3, 0.5, 1.0, 7.0, 1e3])[:, None])
  on = objectives.on_sphere(z)
  np.testing.assert_allclose(np.linalg.norm(on, axis=1), np.full(5, 2.0), rtol=1e-12)
  # The direction is kept: each row is a positive multiple of the input row.
  np.testing.assert_allclose(on / np.linalg.norm(on, axis=1, keepdims=True),
                             z / np.linalg.norm(z, axis=1, keepdims=True), rtol=1e-12)


def test_an_nt_xent_term_given_only_its_weight_uses_temperature_0_2():
  # Two orthogonal images, both views equal: every anchor has cosine 1 with its
  # positive and 0 with its two negatives, so the loss is log(1 + 2 exp(-1 / T)).
  z = jnp.eye(2, dtype=jnp.float64)
  loss, _ = objectives.build_objective({'nt_xent': {'weight': 1.0}})({'z_a': z, 'z_b': z})
  assert float(loss) == pytest.approx(math.log(1 + 2 * math.exp(-5.0)), rel=1e-9)


def test_a_pairwise_term_given_only_its_weight_is_the_per_view_kl_bound_at_the_median():
  # Two points at distance delta: the median squared distance is delta^2, so sigma^2 =
  # delta^2 (factor 1), and the KL (upper) bound is
  # 1/2 log(2 pi e delta^2) + log 2 - log(1 + exp(-delta^2 / (2 sigma^2))), per view.
  z_a = jnp.array([[0.0], [3.0]], jnp.float64)
  out = {'z_a': z_a, 'z_b': 2 * z_a}
  _, metrics = objectives.build_objective({'pairwise_entropy': {'weight': 1.0}})(out)
  h = lambda delta: (0.5 * math.log(2 * math.pi * math.e * delta ** 2) + math.log(2)
                     - math.log(1 + math.exp(-0.5)))
  assert float(metrics['pairwise_entropy']) == pytest.approx(0.5 * (h(3.0) + h(6.0)), rel=1e-9)


def test_concatenated_entropy_takes_one_row_per_view_and_names_the_inputs_it_reads():
  # [p_a; p_b] has 2 rows, enough for a batch statistic, though each view has one.
  terms = {'logdet_entropy': {'weight': 1.0, 'mode': 'concat', 'inputs': 'p'}}
  objective = objectives.build_objective(terms)
  one_row = {'z_a': jnp.zeros((1, 2)), 'z_b': jnp.zeros((1, 2)),
             'p_a': jnp.array([[0.0, 0.0]]), 'p_b': jnp.array([[2.0, 0.0]])}
  # The two rows (0, 0) and (2, 0): covariance diag(1, 0) with 1/N, so log det = log 2 / 2.
  assert float(objective(one_row)[1]['logdet_entropy']) == pytest.approx(0.5 * math.log(2))
  mismatched = {**one_row, 'p_b': jnp.zeros((1, 3))}
  with pytest.raises(ValueError, match='^p_a and p_b must have the same shape'):
    objective(mismatched)


def test_variance_and_covariance_terms_given_only_their_weight():
  # Rows (0, 0) and (1, 1): each column's unbiased variance is 1/2, so the variance hinge
  # is relu(1 - sqrt(1/2 + 1e-4)) per column (gamma 1, eps 1e-4), averaged over the
  # views. Rows (0, 0) and (2, 2): covariance 2 off the diagonal, 2 * 2^2 / D = 4 per
  # view, summed over the two views.
  small = jnp.array([[0.0, 0.0], [1.0, 1.0]])
  _, metrics = objectives.build_objective({'variance': {'weight': 1.0}})(
      {'z_a': small, 'z_b': small})
  assert float(metrics['variance']) == pytest.approx(1 - math.sqrt(0.5 + 1e-4), rel=1e-12)
  # A term's other metrics are averaged over the views too.
  assert float(metrics['variance/std_mean']) == pytest.approx(math.sqrt(0.5 + 1e-4), rel=1e-12)
  wide = 2 * small
  _, metrics = objectives.build_objective({'covariance': {'weight': 1.0}})(
      {'z_a': wide, 'z_b': wide})
  assert float(metrics['covariance']) == pytest.approx(8.0, rel=1e-12)


def test_method_terms_are_fresh_copies_and_a_zero_weight_turns_a_term_off():
  # Editing one config's terms (as a command-line override does) leaves the next one alone.
  first = objectives.method_terms('vicreg_it', vicreg_terms='add')
  first['variance']['weight'] = 123.0
  first['variance']['gamma'] = 9.0
  again = objectives.method_terms('vicreg_it', vicreg_terms='add')
  assert again['variance']['weight'] != 123.0 and again['variance'].get('gamma') != 9.0
  # Weight 0 is valid (a term switched off) and adds nothing.
  out = make_outputs()
  off = objectives.method_terms('vicreg')
  off['covariance']['weight'] = 0.0
  no_cov = {k: v for k, v in objectives.method_terms('vicreg').items() if k != 'covariance'}
  assert float(objectives.build_objective(off)(out)[0]) == pytest.approx(
      float(objectives.build_objective(no_cov)(out)[0]), rel=1e-12)


def test_an_entropy_of_the_predictions_asks_the_model_for_them():
  assert objectives.needed_outputs({'logdet_entropy': {'weight': 1.0}}) == {'z_a', 'z_b'}
  assert objectives.needed_outputs({'logdet_entropy': {'weight': 1.0, 'inputs': 'p'}}) == {
      'z_a', 'z_b', 'p_a', 'p_b'}


@pytest.mark.parametrize('reserved', ['outputs', 'axis_name'])
def test_a_term_cannot_be_given_the_arguments_the_objective_passes_itself(reserved):
  # They would clash with the objective's own call (a TypeError deep in tracing).
  with pytest.raises(ValueError, match=rf"^Term 'variance' has unknown parameters \['{reserved}'\]"):
    objectives.validate_terms({'variance': {'weight': 1.0, reserved: 'x'}})


def test_a_concatenated_entropy_on_8_devices_is_the_global_one():
  # mode 'concat' gathers [z_a; z_b] over the devices before the estimate.
  terms = {'logdet_entropy': {'weight': 1.0, 'mode': 'concat'},
           'pairwise_entropy': {'weight': 1.0, 'mode': 'concat'}}
  objective = objectives.build_objective(terms)
  out = {k: v for k, v in make_outputs(n=16, d=4, seed=2).items() if k in ('z_a', 'z_b')}
  expected = float(objective(out)[0])
  mesh = sharding.make_mesh()
  sm = jax.shard_map(lambda o: objective(o, axis_name=sharding.DATA_AXIS)[0], mesh=mesh,
                     in_specs=P(sharding.DATA_AXIS), out_specs=P())
  assert float(jax.jit(sm)(out)) == pytest.approx(expected, rel=1e-10)


def test_a_concatenated_pairwise_term_keeps_its_median_bandwidth():
  # One row per view: [z_a; z_b] = points 0 and 3, the two-point KL bound at sigma^2 = 9.
  out = {'z_a': jnp.array([[0.0]]), 'z_b': jnp.array([[3.0]])}
  _, metrics = objectives.build_objective(
      {'pairwise_entropy': {'weight': 1.0, 'mode': 'concat'}})(out)
  assert float(metrics['pairwise_entropy']) == pytest.approx(
      0.5 * math.log(2 * math.pi * math.e * 9.0) + math.log(2) - math.log(1 + math.exp(-0.5)),
      rel=1e-9)
