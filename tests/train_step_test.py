"""One training step, checked against what it must do: the BYOL target is an
exact EMA of the updated online network, the online probe never reaches the
encoder, the logged rate is the schedule's, and the step counter advances.

(train_test.py trains whole runs; these tests call the step once.)
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ssl_jax import augment
from ssl_jax import models
from ssl_jax import objectives
from ssl_jax import optim
from ssl_jax import train_step as train_step_lib

TOTAL_STEPS, BATCH = 10, 16


def fixed_batch(labels=None):
  """The step tests' batch: BATCH random 28 x 28 uint8 images and their labels."""
  rng = np.random.default_rng(0)
  return {'image': rng.integers(0, 256, (BATCH, 28, 28, 1), dtype=np.uint8),
          'label': (rng.integers(0, 10, BATCH) if labels is None else labels
                    ).astype(np.int32)}


def one_step(method, *, labels=None, probe_lr=0.1, step=0, log_every=1, tx=None,
             stats_shift=0.0, views=None, crop_on_device=True, probe_momentum=None,
             z_scale=1.0):
  """(state before, state after, metrics, schedule) of one jitted step on a fixed batch.

  tx: the optimiser (default: the config's, LARS for VICReg). stats_shift is
  added to every BatchNorm running statistic before the step; views default
  to the Fashion-MNIST preset. z_scale multiplies the projector's last layer
  (so z itself, before the update).
  """
  config = importlib.import_module(f'configs.{method}').get_config('smoke')
  with_target = 'byol' in method
  model = models.create_model(config.model, 1, with_predictor=with_target, seed=0)
  for param in nnx.state(model.projector.out, nnx.Param).values():
    param.value = param.value * z_scale
  # No warm-up: the optimiser counts its own steps from 0, so a warm-up's rate 0
  # would leave the parameters where they were whatever `step` is.
  schedule = optim.make_schedule(config.optim, BATCH, TOTAL_STEPS, 0)
  tx = tx or optim.make_optimizer(config.optim, schedule)
  probe_tx = optax.sgd(probe_lr, momentum=probe_momentum)
  graphdef, state = train_step_lib.create_train_state(
      model, tx, probe_tx, num_classes=10, seed=0, with_target=with_target)
  if with_target:
    # A target different from the online network, so that the EMA's two terms differ.
    state = state.replace(target_params=jax.tree.map(lambda p: p * 0.5 + 0.1,
                                                     state.target_params))
  state = state.replace(step=jnp.asarray(step, jnp.int32),
                        batch_stats=jax.tree.map(lambda x: x + stats_shift, state.batch_stats))
  batch = fixed_batch(labels)
  step_fn = train_step_lib.make_train_step(
      graphdef=graphdef, objective=objectives.build_objective(config.loss.terms), tx=tx,
      probe_tx=probe_tx, views=views or augment.views_from_config('fashion_mnist'),
      image_size=28, mean=(0.286,), std=(0.353,), crop_on_device=crop_on_device,
      schedule=schedule, total_steps=TOTAL_STEPS, tau_base=config.byol.tau_base if with_target else None,
      log_every=log_every)
  before = jax.device_get(state)
  after, metrics = jax.jit(step_fn)(state, batch)
  return before, jax.device_get(after), jax.device_get(metrics), schedule, config


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize('step', [0, 6])
def test_byol_target_is_the_ema_of_the_updated_online_network(step):
  before, after, metrics, _, config = one_step('byol', step=step)
  tau = 1 - (1 - config.byol.tau_base) * (np.cos(np.pi * step / TOTAL_STEPS) + 1) / 2
  assert float(metrics['tau']) == pytest.approx(tau, rel=1e-6)
  for name in ('params', 'batch_stats'):
    old_target = leaves(getattr(before, f'target_{name}'))
    online = leaves(getattr(after, name))      # after this step's update
    new_target = leaves(getattr(after, f'target_{name}'))
    assert len(old_target) == len(online) == len(new_target) > 0
    for t, o, n in zip(old_target, online, new_target):
      np.testing.assert_allclose(n, tau * t + (1 - tau) * o, rtol=1e-5, atol=1e-6)
  # The online network did move, so the check above is not of t = o = n.
  assert any(not np.allclose(a, b) for a, b in zip(leaves(before.params),
                                                   leaves(after.params)))


def test_the_probe_learns_from_labels_but_never_moves_the_encoder():
  rng = np.random.default_rng(1)
  labels_a = rng.integers(0, 10, BATCH)
  _, after_a, metrics_a, _, _ = one_step('vicreg', labels=labels_a)
  _, after_b, metrics_b, _, _ = one_step('vicreg', labels=(labels_a + 3) % 10)
  _, after_c, _, _, _ = one_step('vicreg', labels=labels_a, probe_lr=10.0)
  # Other labels, or another probe rate: the probe differs...
  assert not np.allclose(after_a.probe_params['w'], after_b.probe_params['w'])
  assert not np.allclose(after_a.probe_params['w'], after_c.probe_params['w'])
  # ...and the encoder, projector and BatchNorm statistics are bit for bit the same.
  for other in (after_b, after_c):
    for name in ('params', 'batch_stats', 'opt_state'):
      for x, y in zip(leaves(getattr(after_a, name)), leaves(getattr(other, name))):
        np.testing.assert_array_equal(x, y)
  assert float(metrics_a['loss']) == float(metrics_b['loss'])


def test_the_probe_takes_one_softmax_regression_step_from_zero():
  # From w = 0, b = 0 the logits are 0 and the softmax uniform, so one SGD step of
  # rate lr gives b = lr (onehot - 1/C) averaged over the labelled images.
  labels = np.array([0, 1, 1, -1] * (BATCH // 4))     # -1: unlabelled, masked out
  _, after, _, _, _ = one_step('vicreg', labels=labels, probe_lr=0.5)
  labelled = labels[labels >= 0]
  onehot = np.eye(10)[labelled]
  np.testing.assert_allclose(after.probe_params['b'], 0.5 * (onehot - 0.1).mean(0),
                             rtol=1e-5, atol=1e-7)


def test_step_counter_rate_and_effective_rank_logging():
  before, after, metrics, schedule, _ = one_step('vicreg', step=5, log_every=3)
  assert int(after.step) == int(before.step) + 1 == 6
  np.testing.assert_array_equal(after.rng, before.rng)   # keys are fold_in(rng, step)
  assert float(metrics['lr']) == pytest.approx(float(schedule(5)), rel=1e-6)
  assert float(metrics['lr']) > 0
  assert 1.0 <= float(metrics['effective_rank']) <= BATCH    # (5 + 1) % 3 == 0: logged
  for unlogged_step in (3, 4):                               # 4 % 3 and 5 % 3 are not 0
    _, _, unlogged, _, _ = one_step('vicreg', step=unlogged_step, log_every=3)
    assert float(unlogged['effective_rank']) == 0.0


def test_logged_norms_are_those_of_the_gradient_update_and_new_parameters():
  # Plain SGD at rate 0.5: the update is -0.5 x the gradient.
  before, after, metrics, _, _ = one_step('vicreg', tx=optax.sgd(0.5))
  update = [a - b for a, b in zip(leaves(after.params), leaves(before.params))]
  norm = lambda arrays: np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64)))
                                    for a in arrays))
  assert float(metrics['l2_updates']) == pytest.approx(norm(update), rel=1e-4)
  assert float(metrics['l2_grads']) == pytest.approx(norm(update) / 0.5, rel=1e-4)
  assert float(metrics['l2_params']) == pytest.approx(norm(leaves(after.params)), rel=1e-5)
  assert float(metrics['l2_updates']) > 0


@pytest.mark.parametrize('with_target', [False, True])
def test_the_initial_state(with_target):
  config = importlib.import_module('configs.vicreg').get_config('smoke')
  model = models.create_model(config.model, 1, with_predictor=False, seed=0)
  probe_tx = optax.sgd(0.1, momentum=0.9)           # a probe optimiser with state
  _, state = train_step_lib.create_train_state(
      model, optax.sgd(0.1, momentum=0.9), probe_tx, num_classes=10, seed=3,
      with_target=with_target)
  # Step 0, int32: the checkpoints' and the counter's type on every platform.
  assert state.step.dtype == jnp.int32 and state.step.shape == () and int(state.step) == 0
  features = model.encoder.out_features
  assert state.probe_params['w'].shape == (features, 10) and state.probe_params['b'].shape == (
      10,)
  assert not np.any(leaves(state.probe_params)[0]) and not np.any(leaves(state.probe_params)[1])
  # The probe's momentum, shaped like the probe; the encoder's, like the encoder.
  assert ([x.shape for x in leaves(state.probe_opt_state)]
          == [x.shape for x in leaves(state.probe_params)])
  assert ([x.shape for x in leaves(state.opt_state)] == [x.shape for x in leaves(state.params)])
  # Keys from the seed: another seed, another key.
  _, other = train_step_lib.create_train_state(
      model, optax.sgd(0.1), probe_tx, num_classes=10, seed=4, with_target=False)
  assert not np.array_equal(state.rng, other.rng)
  if with_target:   # the EMA target starts as a copy of the online network
    for name in ('params', 'batch_stats'):
      for t, o in zip(leaves(getattr(state, f'target_{name}')), leaves(getattr(state, name))):
        np.testing.assert_array_equal(t, o)
  else:             # no second network's memory for methods without one
    assert state.target_params is None and state.target_batch_stats is None


def test_batchnorm_trains_on_each_view_in_turn_and_ignores_its_running_averages():
  """Training-mode BatchNorm: the loss uses the batch's statistics, and the running
  averages move twice (view a, then view b), new = m^2 old + (terms of the batches)."""
  config = importlib.import_module('configs.vicreg').get_config('smoke')
  model = models.create_model(config.model, 1, with_predictor=False, seed=0)
  momenta = {m.momentum for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)}
  assert len(momenta) == 1
  m = momenta.pop()
  before, after, metrics, _, _ = one_step('vicreg', tx=optax.sgd(0.1))
  before_s, after_s, metrics_s, _, _ = one_step('vicreg', tx=optax.sgd(0.1), stats_shift=0.5)
  assert float(metrics_s['loss']) == float(metrics['loss'])
  for x, y in zip(leaves(after.params), leaves(after_s.params)):
    np.testing.assert_array_equal(x, y)
  stats, shifted = leaves(after.batch_stats), leaves(after_s.batch_stats)
  assert len(stats) > 0
  for x, y in zip(stats, shifted):
    np.testing.assert_allclose(y - x, m * m * 0.5, rtol=1e-4, atol=1e-5)
  # And they did move from where they were.
  assert any(not np.allclose(a, b) for a, b in zip(leaves(before.batch_stats), stats))


def test_host_cropped_batches_are_not_cropped_again_on_device():
  # Views that only crop (to a tenth of the area): cropped on device they differ, so the
  # invariance term is positive; with crop_on_device False both views are the image
  # itself and the two embeddings are equal.
  crop_only = augment.ViewParams(**{**augment.PRESETS['none'][0], 'crop_scale': (0.1, 0.1),
                                    'crop_ratio': (3 / 4, 4 / 3)})
  _, _, cropped, _, _ = one_step('vicreg', views=(crop_only, crop_only))
  _, _, uncropped, _, _ = one_step('vicreg', views=(crop_only, crop_only),
                                   crop_on_device=False)
  assert float(cropped['invariance']) > 1e-3
  assert float(uncropped['invariance']) == pytest.approx(0.0, abs=1e-10)


def test_logged_probe_and_embedding_statistics_are_those_of_the_first_view():
  identity = augment.ViewParams(**augment.PRESETS['none'][0])
  labels = np.array([0, 3, 3, -1] * (BATCH // 4))
  before, _, metrics, _, config = one_step('vicreg', views=(identity, identity),
                                           crop_on_device=False, labels=labels)
  # The probe starts at zero: uniform softmax (loss log 10) and argmax class 0, over
  # the labelled images only.
  assert float(metrics['probe_loss']) == pytest.approx(np.log(10), rel=1e-6)
  assert float(metrics['probe_train_acc']) == pytest.approx(np.mean(labels[labels >= 0] == 0))
  # Unaugmented views: z is the projector's output for the normalised images, with
  # the parameters before the update (the same model rebuilt from its seed).
  model = models.create_model(config.model, 1, with_predictor=False, seed=0)
  for x, y in zip(leaves(nnx.state(model, nnx.Param)), leaves(before.params)):
    np.testing.assert_array_equal(x, y)
  images = fixed_batch()['image']
  z = np.asarray(model((images / 255.0 - 0.286) / 0.353, train=True)['z'], np.float64)
  assert float(metrics['embedding_std']) == pytest.approx(z.std(0).mean(), rel=1e-4)
  unit = z / np.linalg.norm(z, axis=1, keepdims=True)
  assert float(metrics['embedding_std_normalized']) == pytest.approx(unit.std(0).mean(),
                                                                     rel=1e-4)


def test_normalised_embedding_std_does_not_depend_on_the_scale_of_z():
  # z / |z| is the same for z and 1e-3 z, whose norms are below 1: the logged std
  # of the normalised embeddings stays, the raw std scales by 1e-3.
  identity = augment.ViewParams(**augment.PRESETS['none'][0])
  kwargs = dict(views=(identity, identity), crop_on_device=False)
  _, _, unit, _, _ = one_step('vicreg', **kwargs)
  _, _, small, _, _ = one_step('vicreg', z_scale=1e-3, **kwargs)
  assert float(small['embedding_std']) == pytest.approx(1e-3 * float(unit['embedding_std']),
                                                        rel=1e-4)
  assert float(small['embedding_std_normalized']) == pytest.approx(
      float(unit['embedding_std_normalized']), rel=1e-4)


def test_both_optimisers_keep_their_momentum_for_the_next_step():
  # SGD with momentum from a zero trace: after one step the trace is the gradient,
  # and the update is -lr times it; the same for the probe.
  before, after, _, _, _ = one_step('vicreg', tx=optax.sgd(0.5, momentum=0.9),
                                    probe_lr=0.25, probe_momentum=0.9)
  traces = leaves(after.opt_state)
  moves = [(b - a) / 0.5 for a, b in zip(leaves(after.params), leaves(before.params))]
  assert len(traces) == len(moves)
  for trace, gradient in zip(traces, moves):
    np.testing.assert_allclose(trace, gradient, rtol=1e-4, atol=1e-6)
  assert any(np.any(t) for t in traces)
  probe_moves = [(b - a) / 0.25 for a, b in zip(leaves(after.probe_params),
                                                 leaves(before.probe_params))]
  for trace, gradient in zip(leaves(after.probe_opt_state), probe_moves):
    np.testing.assert_allclose(trace, gradient, rtol=1e-4, atol=1e-6)
  assert any(np.any(t) for t in leaves(after.probe_opt_state))


def test_the_probe_loss_averages_over_the_labelled_images_only():
  # A zero probe: every image's cross-entropy is log C and its prediction class 0.
  probe = train_step_lib.init_probe(3, 4)
  features = jnp.ones((5, 3))
  labels = jnp.array([0, 1, 2, 0, 3])
  loss, accuracy = train_step_lib.probe_loss(probe, features, labels)
  assert (float(loss), float(accuracy)) == pytest.approx((np.log(4), 2 / 5))
  one = jnp.array([False, False, False, True, False])          # a single labelled image
  assert train_step_lib.probe_loss(probe, features, labels, one) == pytest.approx(
      (np.log(4), 1.0))
  none = jnp.zeros(5, bool)                                     # none: 0, not NaN
  assert train_step_lib.probe_loss(probe, features, labels, none) == pytest.approx((0.0, 0.0))
