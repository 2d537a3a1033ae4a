"""Optimisers and learning-rate schedules from `config.optim`.

LARS follows both reference codes: biases and normalisation parameters
(every parameter of rank 1) are excluded from weight decay and from the trust
ratio. The peak learning rate is base_lr * batch / 256 when
`lr_scaling='linear'` (official VICReg), else base_lr. The schedule is a
linear warm-up followed by a cosine decay to min_lr_ratio * peak.

Note: solo-learn's LARS also clips the trust-ratio-scaled rate at the base
rate ("exclude_bias_n_norm_lars" with clip_lr); optax.lars does not clip.
"""

from __future__ import annotations

import math

import jax
import optax

OPTIMIZERS = ('lars', 'sgd', 'adamw')


def peak_learning_rate(config, batch_size: int) -> float:
  if config.lr_scaling not in ('linear', 'none'):
    raise ValueError(f"optim.lr_scaling must be 'linear' or 'none', got {config.lr_scaling!r}.")
  if not config.base_lr > 0:
    raise ValueError(f'optim.base_lr must be > 0, got {config.base_lr}.')
  return config.base_lr * (batch_size / 256 if config.lr_scaling == 'linear' else 1.0)


def make_schedule(config, batch_size: int, total_steps: int, warmup_steps: int):
  peak = peak_learning_rate(config, batch_size)
  warmup_steps = min(max(0, warmup_steps), max(0, total_steps - 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=peak * config.min_lr_ratio)


def not_bias_or_norm(params):
  """True for parameters that get weight decay and LARS adaptation (rank > 1)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config, schedule) -> optax.GradientTransformation:
  name = config.name
  if name not in OPTIMIZERS:
    raise ValueError(f'Unknown optimiser {name!r}; use one of {OPTIMIZERS} (--config.optim.name).')
  if config.weight_decay < 0:
    raise ValueError(f'optim.weight_decay must be >= 0, got {config.weight_decay}.')
  if name == 'lars':
    return optax.lars(schedule, weight_decay=config.weight_decay,
                      weight_decay_mask=not_bias_or_norm, trust_ratio_mask=not_bias_or_norm,
                      trust_coefficient=config.trust_coefficient, momentum=config.momentum)
  if name == 'sgd':
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=not_bias_or_norm),
        optax.sgd(schedule, momentum=config.momentum))
  return optax.adamw(schedule, weight_decay=config.weight_decay, mask=not_bias_or_norm)


def byol_tau(step, total_steps: int, tau_base: float):
  """BYOL's EMA rate: 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2, from tau_base to 1."""
  progress = jax.numpy.minimum(step / max(1, total_steps), 1.0)
  return 1.0 - (1.0 - tau_base) * (jax.numpy.cos(math.pi * progress) + 1.0) / 2.0
