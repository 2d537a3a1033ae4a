"""The optimisers and schedules of ssl_jax.optim against their published definitions.

LARS is checked against the update rule of the official VICReg code (its LARS
class, written out in NumPy below): weight decay and the trust ratio
eta * ||w|| / ||g + wd w|| only for parameters of rank > 1, momentum on the
scaled update. The schedule and BYOL's EMA rate against their closed forms.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ssl_jax import optim


def optim_config(**overrides):
  config = ml_collections.ConfigDict(dict(
      name='lars', base_lr=0.3, lr_scaling='linear', weight_decay=1e-2, momentum=0.9,
      trust_coefficient=0.02, min_lr_ratio=0.0))
  config.update(overrides)
  return config


def params_and_grads():
  rng = np.random.default_rng(0)
  params = {'kernel': rng.normal(size=(3, 4)).astype(np.float32),
            'bias': rng.normal(size=(4,)).astype(np.float32)}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
           for _ in range(3)]
  return params, grads


def run(tx, params, grads):
  params = jax.tree.map(jnp.asarray, params)
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
  return jax.tree.map(np.asarray, params)


def reference_lars(params, grads, *, lr, weight_decay, momentum, eta):
  """The official VICReg LARS step (rank-1 parameters: no decay, no adaptation)."""
  params = {k: v.astype(np.float64) for k, v in params.items()}
  mu = {k: np.zeros_like(v) for k, v in params.items()}
  for g in grads:
    for k, p in params.items():
      dp = g[k].astype(np.float64)
      if p.ndim > 1:
        dp = dp + weight_decay * p
        param_norm, update_norm = np.linalg.norm(p), np.linalg.norm(dp)
        q = eta * param_norm / update_norm if param_norm > 0 and update_norm > 0 else 1.0
        dp = dp * q
      mu[k] = momentum * mu[k] + dp
      params[k] = p - lr * mu[k]
  return params


def test_lars_matches_the_official_vicreg_update_and_excludes_biases():
  params, grads = params_and_grads()
  config = optim_config(momentum=0.8)   # not optax's default 0.9: the config's is used
  tx = optim.make_optimizer(config, 0.5)   # a constant rate: 0.5
  got = run(tx, params, grads)
  want = reference_lars(params, grads, lr=0.5, weight_decay=1e-2, momentum=0.8, eta=0.02)
  for k in params:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
  # The bias moved by plain momentum SGD: -lr * (g1 (1 + m + m^2) + g2 (1 + m) + g3).
  g = [x['bias'] for x in grads]
  np.testing.assert_allclose(
      got['bias'], params['bias'] - 0.5 * (g[0] * (1 + 0.8 + 0.64) + g[1] * 1.8 + g[2]),
      rtol=1e-5, atol=1e-6)


def test_lars_trust_ratio_is_one_for_a_zero_parameter():
  # ||w|| = 0 gives the ratio 1 (else the weight could never leave zero).
  params = {'kernel': np.zeros((2, 2), np.float32)}
  grads = [{'kernel': np.full((2, 2), 2.0, np.float32)}]
  got = run(optim.make_optimizer(optim_config(), 0.1), params, grads)
  np.testing.assert_allclose(got['kernel'], np.full((2, 2), -0.2), rtol=1e-6)


def test_sgd_decays_only_matrices():
  params, grads = params_and_grads()
  config = optim_config(name='sgd', momentum=0.0, weight_decay=0.1)
  got = run(optim.make_optimizer(config, 0.5), params, grads[:1])
  np.testing.assert_allclose(
      got['kernel'], params['kernel'] - 0.5 * (grads[0]['kernel'] + 0.1 * params['kernel']),
      rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got['bias'], params['bias'] - 0.5 * grads[0]['bias'],
                             rtol=1e-6, atol=1e-6)
  # With the config's momentum (0.5): the bias after two steps, -lr (g1 (1 + m) + g2).
  got = run(optim.make_optimizer(optim_config(name='sgd', momentum=0.5), 0.5), params,
            grads[:2])
  np.testing.assert_allclose(
      got['bias'], params['bias'] - 0.5 * (1.5 * grads[0]['bias'] + grads[1]['bias']),
      rtol=1e-5, atol=1e-6)
  # No decay at all is a valid setting.
  got = run(optim.make_optimizer(optim_config(name='sgd', momentum=0.0, weight_decay=0.0),
                                 0.5), params, grads[:1])
  np.testing.assert_allclose(got['kernel'], params['kernel'] - 0.5 * grads[0]['kernel'],
                             rtol=1e-6, atol=1e-6)


def test_adamw_decays_only_matrices():
  # With zero gradients Adam's step is 0 / (0 + eps) = 0: only the decoupled
  # weight decay moves a parameter, -lr * wd * w, and never a bias.
  params, _ = params_and_grads()
  zeros = [{k: np.zeros_like(v) for k, v in params.items()}]
  config = optim_config(name='adamw', weight_decay=0.1)
  got = run(optim.make_optimizer(config, 0.5), params, zeros)
  np.testing.assert_allclose(got['kernel'], params['kernel'] * (1 - 0.5 * 0.1), rtol=1e-6)
  np.testing.assert_array_equal(got['bias'], params['bias'])


@pytest.mark.parametrize('scaling, batch, peak', [('linear', 512, 0.6), ('linear', 128, 0.15),
                                                   ('none', 512, 0.3)])
def test_peak_learning_rate_scales_with_the_batch(scaling, batch, peak):
  # Official VICReg: lr = base_lr * batch / 256.
  assert optim.peak_learning_rate(optim_config(lr_scaling=scaling), batch) == pytest.approx(peak)


def test_schedule_warms_up_linearly_then_decays_by_a_cosine():
  config = optim_config(base_lr=0.2, min_lr_ratio=0.1)
  schedule = optim.make_schedule(config, 512, total_steps=110, warmup_steps=10)
  peak, end = 0.4, 0.04
  assert float(schedule(0)) == pytest.approx(0.0, abs=1e-9)
  assert float(schedule(5)) == pytest.approx(peak / 2, rel=1e-5)
  assert float(schedule(10)) == pytest.approx(peak, rel=1e-5)
  # Cosine over the 100 steps after the warm-up: halfway is the mean of peak and end,
  # a quarter of the way is end + (peak - end) (1 + cos(pi / 4)) / 2.
  assert float(schedule(60)) == pytest.approx((peak + end) / 2, rel=1e-5)
  assert float(schedule(35)) == pytest.approx(
      end + (peak - end) * (1 + math.cos(math.pi / 4)) / 2, rel=1e-5)
  assert float(schedule(110)) == pytest.approx(end, rel=1e-5)
  assert float(schedule(500)) == pytest.approx(end, rel=1e-5)


def test_a_warm_up_longer_than_the_run_still_reaches_the_peak():
  # warm-up clipped to total - 1 steps: the last step trains at the peak rate.
  schedule = optim.make_schedule(optim_config(base_lr=0.256), 256, total_steps=5,
                                 warmup_steps=50)
  assert float(schedule(4)) == pytest.approx(0.256, rel=1e-5)
  assert float(schedule(2)) == pytest.approx(0.128, rel=1e-5)
  # ...and the decay spans the one step after it: the end value right after the run.
  assert float(schedule(5)) == pytest.approx(0.0, abs=1e-7)
  # A one-step run has no warm-up at all: its step trains at the peak.
  one = optim.make_schedule(optim_config(base_lr=0.256), 256, total_steps=1, warmup_steps=10)
  assert float(one(0)) == pytest.approx(0.256, rel=1e-5)
  # Zero steps give a valid schedule (nothing reads it; runs.build refuses such a run).
  zero = optim.make_schedule(optim_config(base_lr=0.256), 256, total_steps=0, warmup_steps=0)
  assert float(zero(0)) == pytest.approx(0.256, rel=1e-5)


def test_byol_tau_follows_its_cosine_from_tau_base_to_one():
  # BYOL: tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2.
  assert float(optim.byol_tau(0, 100, 0.99)) == pytest.approx(0.99, rel=1e-6)
  assert float(optim.byol_tau(50, 100, 0.99)) == pytest.approx(0.995, rel=1e-6)
  assert float(optim.byol_tau(25, 100, 0.99)) == pytest.approx(
      1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2, rel=1e-6)
  assert float(optim.byol_tau(100, 100, 0.99)) == pytest.approx(1.0, rel=1e-6)
  assert float(optim.byol_tau(150, 100, 0.99)) == pytest.approx(1.0, rel=1e-6)
  # A one-step run ends at 1 after its step; zero total steps read as one.
  assert float(optim.byol_tau(1, 1, 0.9)) == pytest.approx(1.0, rel=1e-6)
  assert float(optim.byol_tau(0, 0, 0.9)) == pytest.approx(0.9, rel=1e-6)
  assert float(optim.byol_tau(1, 0, 0.9)) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize('overrides, message', [
    (dict(name='adam'), r"^Unknown optimiser 'adam'"),
    (dict(weight_decay=-1.0), r'^optim.weight_decay must be >= 0'),
])
def test_bad_optimiser_settings_raise(overrides, message):
  with pytest.raises(ValueError, match=message):
    optim.make_optimizer(optim_config(**overrides), 0.1)


@pytest.mark.parametrize('overrides, message', [
    (dict(lr_scaling='sqrt'), r"^optim.lr_scaling must be 'linear' or 'none'"),
    (dict(base_lr=0.0), r'^optim.base_lr must be > 0'),
])
def test_bad_learning_rates_raise(overrides, message):
  with pytest.raises(ValueError, match=message):
    optim.peak_learning_rate(optim_config(**overrides), 256)
