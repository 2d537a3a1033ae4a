"""During training: the cheap diagnostics, logged every diagnostics.every_steps."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from ssl_jax import estimators
from ssl_jax import metrics as metrics_lib
from ssl_jax.diagnostics.workdir import REPRESENTATIONS
from ssl_jax.diagnostics.workdir import Network
from ssl_jax.diagnostics.workdir import fixed_images


def make_training_monitor(config, run, mesh) -> Optional[Callable[[int, Any], dict]]:
  """(step, state) -> {'diag/...': value} every diagnostics.every_steps and at the end.

  When it measures: metrics.periodic_due (the online probe's rule too).

  On a fixed batch of diagnostics.num_images evaluation images with two fixed
  augmented views, for the encoder features and the projector output: the
  log-det entropy (beta 1), the pairwise KL upper bound (median bandwidth),
  the effective rank and the invariance. None when every_steps is 0.
  """
  diag = config.get('diagnostics', {})
  every = int(diag.get('every_steps', 0) or 0)
  if every < 0:
    raise ValueError(f'diagnostics.every_steps must be >= 0 (0: off), got {every}.')
  if every == 0:
    return None
  images, _ = fixed_images(config, run.spec.test_split, int(diag.get('num_images', 512)),
                           allow_fewer=True)   # a small image folder's hold-out, say
  count = len(images) // mesh.size * mesh.size
  if count < 2:
    return None   # no batch statistic of fewer than two images
  images = images[:count]
  net = Network(run, mesh, batch_size=count)
  key = jax.random.key(config.seed)
  x_a = net.view_a(net.put(images), jax.random.fold_in(key, 0))
  x_b = net.view_b(net.put(images), jax.random.fold_in(key, 1))

  @jax.jit
  def cheap(params, batch_stats, x_a, x_b):
    out_a = net._outputs(params, batch_stats, x_a)
    out_b = net._outputs(params, batch_stats, x_b)
    scalars = {}
    for rep in REPRESENTATIONS:
      z = jnp.concatenate([out_a[rep], out_b[rep]])
      scalars[f'diag/{rep}_logdet_entropy'] = estimators.logdet_entropy(z)[0]
      scalars[f'diag/{rep}_pairwise_entropy'] = estimators.pairwise_entropy(
          z, sigma_mode='median')[0]
      scalars[f'diag/{rep}_effective_rank'] = estimators.effective_rank(z)
      scalars[f'diag/{rep}_invariance'] = jnp.mean(jnp.square(out_a[rep] - out_b[rep]))
    return scalars

  def monitor(step: int, state) -> dict[str, float]:
    if not metrics_lib.periodic_due(step, every, run.total_steps, config.log_every_steps):
      return {}
    return {k: float(v) for k, v in
            jax.device_get(cheap(state.params, state.batch_stats, x_a, x_b)).items()}

  return monitor
