"""The training state and the pure, data-parallel training step.

Why jit with shardings rather than pmap: the step is written once for the
global batch; with the batch sharded over the mesh's 'data' axis and the
state replicated, XLA inserts every collective (batch statistics of the loss
and of BatchNorm, gradient reduction) and the same code runs on 1 CPU or a
TPU pod (big_vision, flax examples; pmap is in maintenance mode since JAX
0.8). The loss terms also accept an axis_name for pmap/shard_map users.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ssl_jax import augment
from ssl_jax import estimators
from ssl_jax import optim

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs to continue on the same trajectory.

  The data position is a function of `step` (input_pipeline), and the
  augmentation and dropout keys are fold_in(rng, step), so step + rng + the
  config's seed fix the data and randomness of every later step.
  """
  step: Array                      # int32 []
  rng: Array                       # uint32 key data
  params: Any                      # nnx.State of nnx.Param
  batch_stats: Any                 # nnx.State of nnx.BatchStat
  opt_state: Any
  probe_params: Any                # online linear probe {'w': [F, C], 'b': [C]}
  probe_opt_state: Any
  target_params: Any = None        # BYOL EMA target (None otherwise)
  target_batch_stats: Any = None


def init_probe(num_features: int, num_classes: int) -> dict[str, Array]:
  return {'w': jnp.zeros((num_features, num_classes), jnp.float32),
          'b': jnp.zeros((num_classes,), jnp.float32)}


def probe_loss(probe, features, labels, mask=None):
  """Softmax cross-entropy and accuracy of the linear probe."""
  logits = features @ probe['w'] + probe['b']
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  if mask is None:
    return jnp.mean(losses), jnp.mean(correct)
  mask = mask.astype(jnp.float32)
  denom = jnp.maximum(jnp.sum(mask), 1.0)
  return jnp.sum(losses * mask) / denom, jnp.sum(correct * mask) / denom


def create_train_state(model: nnx.Module, tx, probe_tx, *, num_classes: int, seed: int,
                       with_target: bool) -> tuple[nnx.GraphDef, TrainState]:
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  probe = init_probe(model.encoder.out_features, num_classes)
  state = TrainState(
      step=jnp.zeros((), jnp.int32),
      rng=jax.random.key_data(jax.random.key(seed)),
      params=params, batch_stats=batch_stats, opt_state=tx.init(params),
      probe_params=probe, probe_opt_state=probe_tx.init(probe),
      target_params=jax.tree.map(jnp.copy, params) if with_target else None,
      target_batch_stats=jax.tree.map(jnp.copy, batch_stats) if with_target else None)
  return graphdef, state


def l2_norm(tree) -> Array:
  return optax.global_norm(tree)


def make_train_step(*, graphdef: nnx.GraphDef, objective: Callable, tx, probe_tx,
                    views: tuple[augment.ViewParams, augment.ViewParams], image_size: int,
                    mean, std, crop_on_device: bool, schedule: Callable,
                    total_steps: int, tau_base: Optional[float], log_every: int
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Returns train_step(state, batch) -> (state, metrics), pure and jittable.

  Args:
    graphdef: the model's NNX graph definition (params are in the state).
    objective: objectives.build_objective(...).
    tau_base: BYOL's initial EMA rate; None when there is no target network.
    log_every: the effective rank (an SVD) is only computed on steps that
      are logged: the loop logs after step k when (k + 1) % log_every == 0.
  """
  view_a, view_b = views
  with_target = tau_base is not None

  def forward(params, batch_stats, x):
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    out = model(x, train=True)
    return out, nnx.state(model, nnx.BatchStat)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    x_a, x_b = augment.two_views(batch, key, view_a, view_b, out_size=image_size,
                                 mean=mean, std=std, crop=crop_on_device)

    def loss_fn(params):
      # The two views go through the network separately, each with its own
      # BatchNorm batch statistics, as in the official VICReg code.
      out_a, batch_stats = forward(params, state.batch_stats, x_a)
      out_b, batch_stats = forward(params, batch_stats, x_b)
      outputs = {'z_a': out_a['z'], 'z_b': out_b['z']}
      if 'p' in out_a:
        outputs.update(p_a=out_a['p'], p_b=out_b['p'])
      if with_target:
        # The target is only ever updated by the EMA below, never by gradients.
        t_a, _ = forward(state.target_params, state.target_batch_stats, x_a)
        t_b, _ = forward(state.target_params, state.target_batch_stats, x_b)
        outputs.update(t_a=jax.lax.stop_gradient(t_a['z']),
                       t_b=jax.lax.stop_gradient(t_b['z']))
      loss, metrics = objective(outputs)
      return loss, (metrics, batch_stats, out_a['features'], out_a['z'])

    (loss, (metrics, batch_stats, features, z)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    # Online linear probe on detached features of the first view. Unlabelled
    # images (label -1, e.g. STL-10's unlabelled split) are masked out.
    features = jax.lax.stop_gradient(features)
    labels = batch['label']
    (p_loss, p_acc), p_grads = jax.value_and_grad(probe_loss, has_aux=True)(
        state.probe_params, features, jnp.maximum(labels, 0), labels >= 0)
    p_updates, probe_opt_state = probe_tx.update(p_grads, state.probe_opt_state,
                                                 state.probe_params)
    probe_params = optax.apply_updates(state.probe_params, p_updates)

    target_params, target_batch_stats = state.target_params, state.target_batch_stats
    if with_target:
      tau = optim.byol_tau(state.step, total_steps, tau_base)
      ema = lambda t, o: tau * t + (1.0 - tau) * o
      target_params = jax.tree.map(ema, target_params, params)
      target_batch_stats = jax.tree.map(ema, target_batch_stats, batch_stats)
      metrics['tau'] = tau

    z = jax.lax.stop_gradient(z)
    metrics.update(
        lr=schedule(state.step), l2_grads=l2_norm(grads), l2_params=l2_norm(params),
        l2_updates=l2_norm(updates), probe_loss=p_loss, probe_train_acc=p_acc,
        embedding_std=jnp.mean(jnp.std(z, axis=0)),
        embedding_std_normalized=jnp.mean(jnp.std(
            z / jnp.maximum(jnp.linalg.norm(z, axis=1, keepdims=True), 1e-12), axis=0)),
        # Only on logged steps (an SVD per step costs). Other steps give 0, which
        # no rank can be and nobody reads: a NaN there would trip jax_debug_nans
        # at step 0 and make it useless for finding a real divergence.
        effective_rank=jax.lax.cond((state.step + 1) % log_every == 0,
                                    estimators.effective_rank,
                                    lambda z: jnp.zeros((), z.dtype), z))
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
        probe_params=probe_params, probe_opt_state=probe_opt_state,
        target_params=target_params, target_batch_stats=target_batch_stats)
    return new_state, metrics

  return train_step
