"""Locality: do an image's noisy or augmented copies stay in its linear region?

The paper's mixture-of-Gaussians view needs the network to be (close to)
linear over the noise an image sees: then Gaussian input noise stays
Gaussian in Z. A ReLU network is linear inside the region where every ReLU
keeps its sign, so `locality` measures, against the noise scale, the share of
copies whose whole activation pattern equals the clean image's: over the
encoder's ReLUs (the features' region) and over the encoder's and the
projector's (Z's own region), and per layer.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def pattern_agreement(patterns_fn: Callable, x_clean: jax.Array, x_copies: jax.Array
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Per copy and layer: does its ReLU pattern equal its clean image's, and the
  share of units that agree.

  Args:
    patterns_fn: x [B, ...] -> list of boolean activation patterns [B, ...].
    x_clean: [K, ...] clean inputs; x_copies: [K * C, ...], copy j of image
      k at row k * C + j.
  Returns:
    (equal [K * C, L] bool, agreement [K * C, L] float), L layers.
  """
  clean = patterns_fn(x_clean)
  copies = patterns_fn(x_copies)
  reps = x_copies.shape[0] // x_clean.shape[0]
  equal, agree = [], []
  for pc, pn in zip(clean, copies):
    same = jnp.repeat(pc, reps, axis=0) == pn
    same = same.reshape(same.shape[0], -1)
    equal.append(jnp.all(same, axis=1))
    agree.append(jnp.mean(same, axis=1))
  return np.stack([np.asarray(e) for e in equal], 1), np.stack([np.asarray(a) for a in agree], 1)


def summarise(equal: np.ndarray, agree: np.ndarray, encoder_layers: int) -> dict[str, Any]:
  """Shares over copies: the features' region (encoder layers), Z's region (all layers),
  per layer, and the mean share of units agreeing per layer."""
  return {'encoder': float(np.mean(np.all(equal[:, :encoder_layers], axis=1))),
          'z_region': float(np.mean(np.all(equal, axis=1))),
          'per_layer': np.mean(equal, axis=0).tolist(),
          'unit_agreement': np.mean(agree, axis=0).tolist()}


def locality(patterns_fn: Callable, x_clean: jax.Array, key: jax.Array, *,
             scales: Sequence[float], copies: int, encoder_layers: int) -> dict[str, Any]:
  """Share of Gaussian-noise copies x + s * eps in the clean input's linear region.

  For each scale s, `copies` draws per clean image; the noise is in the
  network's (normalised) input units. Returns, per scale, `summarise`'s
  'encoder', 'z_region', 'per_layer' [L] and 'unit_agreement' [L]; the first
  encoder_layers layers are the encoder's, the rest the projector's.
  """
  out = {'scales': [float(s) for s in scales], 'encoder': [], 'z_region': [],
         'per_layer': [], 'unit_agreement': [], 'encoder_layers': encoder_layers}
  base = jnp.repeat(x_clean, copies, axis=0)
  for i, scale in enumerate(scales):
    noise = jax.random.normal(jax.random.fold_in(key, i), base.shape, base.dtype)
    shares = summarise(*pattern_agreement(patterns_fn, x_clean, base + scale * noise),
                       encoder_layers)
    for name, value in shares.items():
      out[name].append(value)
  return out


def merge(groups: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
  """Image-weighted mean of per-group locality results."""
  total = sum(n for n, _ in groups)
  merged = {'scales': groups[0][1]['scales'], 'encoder_layers': groups[0][1]['encoder_layers']}
  for key in ('encoder', 'z_region', 'per_layer', 'unit_agreement'):
    merged[key] = (sum(n * np.asarray(r[key]) for n, r in groups) / total).tolist()
  return merged
