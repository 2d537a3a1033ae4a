"""Two-view augmentations on device, in JAX, with explicit per-image keys.

The recipe of VICReg / BYOL / SimCLR (docs/method.md section 4): random resized
crop, horizontal flip, colour jitter (brightness, contrast, saturation, hue,
applied together with a probability), grayscale, Gaussian blur and
solarisation, each view with its own parameters (the official recipe is
asymmetric: blur 1.0 vs 0.1, solarise 0 vs 0.2).

Why on device: the ops are vmapped over per-image keys derived from
(seed, step), so a resumed run replays the same views, tests are plain JAX,
and on accelerators the host only decodes (as deepmind-research/byol does).
Probabilistic ops compute both branches and select, which is what `lax.cond`
becomes under vmap anyway.

Differences from torchvision, on purpose:
- Jitter sub-ops run in a fixed order (brightness, contrast, saturation,
  hue), not a random permutation.
- The crop samples an area fraction uniformly in `crop_scale` and a log
  aspect ratio uniformly in `crop_ratio` clipped to what fits, so it never
  needs torchvision's 10 retries and its centre-crop fallback, and the area
  bounds hold exactly.
- Single-channel (grayscale) images: saturation, hue and grayscale are the
  identity (they are undefined or no-ops without colour); brightness,
  contrast, blur and solarise act as usual.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ViewParams:
  """Augmentation parameters of one view; images are in [0, 1]."""
  crop_scale: tuple[float, float] = (0.2, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip_prob: float = 0.5
  jitter_prob: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.2
  hue: float = 0.1
  grayscale_prob: float = 0.2
  blur_prob: float = 0.0
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  solarize_prob: float = 0.0
  solarize_threshold: float = 0.5

  def __post_init__(self):
    for name in ('flip_prob', 'jitter_prob', 'grayscale_prob', 'blur_prob', 'solarize_prob',
                 'solarize_threshold'):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise ValueError(f'augmentation {name} must be in [0, 1], got {value}.')
    for name in ('brightness', 'contrast', 'saturation'):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise ValueError(f'augmentation {name} must be in [0, 1] (factor drawn from '
                         f'[1 - {name}, 1 + {name}]), got {value}.')
    if not 0.0 <= self.hue <= 0.5:
      raise ValueError(f'augmentation hue must be in [0, 0.5], got {self.hue}.')
    lo, hi = self.crop_scale
    if not 0.0 < lo <= hi <= 1.0:
      raise ValueError(f'augmentation crop_scale must satisfy 0 < low <= high <= 1, got '
                       f'{self.crop_scale}.')
    lo, hi = self.crop_ratio
    if not 0.0 < lo <= 1.0 <= hi:
      raise ValueError(f'augmentation crop_ratio must satisfy 0 < low <= 1 <= high, got '
                       f'{self.crop_ratio}.')
    lo, hi = self.blur_sigma
    if not 0.0 < lo <= hi:
      raise ValueError(f'augmentation blur_sigma must satisfy 0 < low <= high, got '
                       f'{self.blur_sigma}.')


_COLOR = dict(jitter_prob=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
              grayscale_prob=0.2)
# (view_a, view_b) of each published recipe; docs/method.md section 4.
PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # Official VICReg / BYOL ImageNet recipe.
    'imagenet': (dict(crop_scale=(0.08, 1.0), blur_prob=1.0, solarize_prob=0.0, **_COLOR),
                 dict(crop_scale=(0.08, 1.0), blur_prob=0.1, solarize_prob=0.2, **_COLOR)),
    # solo-learn CIFAR recipes (VICReg, BYOL, Barlow Twins): no blur.
    'cifar': (dict(crop_scale=(0.2, 1.0), blur_prob=0.0, solarize_prob=0.0, **_COLOR),
              dict(crop_scale=(0.2, 1.0), blur_prob=0.0, solarize_prob=0.2, **_COLOR)),
    # SimCLR: stronger jitter (0.8 strength), symmetric.
    'simclr': (dict(crop_scale=(0.08, 1.0), jitter_prob=0.8, brightness=0.8, contrast=0.8,
                    saturation=0.8, hue=0.2, grayscale_prob=0.2, blur_prob=0.5),) * 2,
    # Small grayscale images: colour ops reduce to brightness / contrast.
    'fashion_mnist': (dict(crop_scale=(0.3, 1.0), blur_prob=0.0, solarize_prob=0.0, **_COLOR),
                      dict(crop_scale=(0.3, 1.0), blur_prob=0.0, solarize_prob=0.2, **_COLOR)),
    # Identity except for resizing: for ablations and tests.
    'none': (dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0,
                  grayscale_prob=0.0),) * 2,
}


def views_from_config(preset: str, view_a: Optional[Mapping[str, Any]] = None,
                      view_b: Optional[Mapping[str, Any]] = None) -> tuple[ViewParams, ViewParams]:
  """Both views' parameters: the preset, then each view's overrides."""
  if preset not in PRESETS:
    raise ValueError(f'Unknown augmentation preset {preset!r}; known: {sorted(PRESETS)}.')
  out = []
  for base, overrides in zip(PRESETS[preset], (view_a, view_b)):
    overrides = dict(overrides.to_dict() if hasattr(overrides, 'to_dict') else overrides or {})
    overrides = {k: v for k, v in overrides.items() if v is not None}  # None: the preset's
    known = {f.name for f in dataclasses.fields(ViewParams)}
    unknown = set(overrides) - known
    if unknown:
      raise ValueError(f'Unknown augmentation parameters {sorted(unknown)}; known: '
                       f'{sorted(known)}.')
    merged = {**base, **overrides}
    merged = {k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()}
    out.append(ViewParams(**merged))
  return out[0], out[1]


# ----------------------------------------------------------------------------
# Single-image ops on float images [H, W, C] in [0, 1].
# ----------------------------------------------------------------------------

def sample_crop(key: Array, scale, ratio) -> tuple[Array, Array, Array, Array]:
  """Samples a crop as fractions of the side: (y0, x0, h, w), all in [0, 1].

  area = h * w ~ U(scale); log(w / h) ~ U(log ratio) clipped to
  [log area, -log area] so that h, w <= 1 (square images).
  """
  k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
  area = jax.random.uniform(k_area, (), minval=scale[0], maxval=scale[1])
  log_lo = jnp.maximum(math.log(ratio[0]), jnp.log(area))
  log_hi = jnp.minimum(math.log(ratio[1]), -jnp.log(area))
  aspect = jnp.exp(jax.random.uniform(k_ratio, (), minval=log_lo, maxval=log_hi))
  w = jnp.minimum(jnp.sqrt(area * aspect), 1.0)
  h = jnp.minimum(jnp.sqrt(area / aspect), 1.0)
  y0 = jax.random.uniform(k_y, ()) * (1.0 - h)
  x0 = jax.random.uniform(k_x, ()) * (1.0 - w)
  return y0, x0, h, w


def crop_and_resize(image: Array, crop, out_size: int) -> Array:
  """Bilinear resample of the crop (fractions of the side) to out_size^2."""
  height, width, channels = image.shape
  y0, x0, h, w = crop
  scale = jnp.stack([out_size / (h * height), out_size / (w * width)])
  translation = -jnp.stack([y0 * height, x0 * width]) * scale
  return jax.image.scale_and_translate(
      image, (out_size, out_size, channels), (0, 1), scale, translation,
      method='linear', antialias=True)


def to_grayscale(image: Array) -> Array:
  """ITU-R 601 luma, kept with the input's channel count."""
  if image.shape[-1] == 1:
    return image
  luma = image @ jnp.array([0.299, 0.587, 0.114], image.dtype)
  return jnp.broadcast_to(luma[..., None], image.shape)


def rgb_to_hsv(rgb: Array) -> Array:
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  maxc = jnp.max(rgb, axis=-1)
  minc = jnp.min(rgb, axis=-1)
  delta = maxc - minc
  safe = jnp.where(delta > 0, delta, 1.0)
  s = jnp.where(maxc > 0, delta / jnp.where(maxc > 0, maxc, 1.0), 0.0)
  rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
  h = jnp.where(r == maxc, bc - gc, jnp.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
  h = jnp.where(delta > 0, (h / 6.0) % 1.0, 0.0)
  return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(hsv: Array) -> Array:
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  i = jnp.floor(h * 6.0)
  f = h * 6.0 - i
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  i = i.astype(jnp.int32) % 6
  r = jnp.choose(i, [v, q, p, p, t, v], mode='clip')
  g = jnp.choose(i, [t, v, v, q, p, p], mode='clip')
  b = jnp.choose(i, [p, p, t, v, v, q], mode='clip')
  return jnp.stack([r, g, b], axis=-1)


def color_jitter(image: Array, key: Array, p: ViewParams) -> Array:
  """Brightness, contrast, saturation, hue, in that order, each clipped to [0, 1]."""
  kb, kc, ks, kh = jax.random.split(key, 4)

  def factor(k, amount):
    return jax.random.uniform(k, (), minval=max(0.0, 1.0 - amount), maxval=1.0 + amount)

  image = jnp.clip(image * factor(kb, p.brightness), 0.0, 1.0)
  mean = jnp.mean(to_grayscale(image))
  image = jnp.clip((image - mean) * factor(kc, p.contrast) + mean, 0.0, 1.0)
  if image.shape[-1] == 3:
    gray = to_grayscale(image)
    image = jnp.clip((image - gray) * factor(ks, p.saturation) + gray, 0.0, 1.0)
    shift = jax.random.uniform(kh, (), minval=-p.hue, maxval=p.hue)
    hsv = rgb_to_hsv(image)
    image = hsv_to_rgb(hsv.at[..., 0].set((hsv[..., 0] + shift) % 1.0))
  return image


def blur_kernel_size(side: int) -> int:
  """About 10% of the side, odd (23 at 224 as in BYOL); at least 3."""
  return max(3, 2 * round(0.05 * side) + 1)


def gaussian_blur(image: Array, sigma: Array) -> Array:
  """Separable Gaussian blur with reflect padding; kernel size from the side."""
  size = blur_kernel_size(image.shape[0])
  radius = size // 2
  x = jnp.arange(-radius, radius + 1, dtype=image.dtype)
  kernel = jnp.exp(-0.5 * (x / sigma) ** 2)
  kernel = kernel / jnp.sum(kernel)
  padded = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode='reflect')
  h, w = image.shape[:2]
  rows = sum(kernel[i] * padded[i:i + h] for i in range(size))            # [H, W+2r, C]
  return sum(kernel[i] * rows[:, i:i + w] for i in range(size))          # [H, W, C]


def solarize(image: Array, threshold: float) -> Array:
  return jnp.where(image < threshold, image, 1.0 - image)


def augment_image(image: Array, key: Array, p: ViewParams, out_size: int,
                  crop: bool = True) -> Array:
  """One view of one image: [H, W, C] in [0, 1] -> [out_size, out_size, C]."""
  keys = jax.random.split(key, 8)
  if crop:
    image = crop_and_resize(image, sample_crop(keys[0], p.crop_scale, p.crop_ratio), out_size)
  elif image.shape[0] != out_size:
    image = jax.image.resize(image, (out_size, out_size, image.shape[-1]), 'linear')
  image = jnp.clip(image, 0.0, 1.0)

  def maybe(k, prob, transformed, original):
    return jnp.where(jax.random.uniform(k, ()) < prob, transformed, original)

  if p.flip_prob > 0:
    image = maybe(keys[1], p.flip_prob, image[:, ::-1], image)
  if p.jitter_prob > 0:
    image = maybe(keys[2], p.jitter_prob, color_jitter(image, keys[3], p), image)
  if p.grayscale_prob > 0 and image.shape[-1] == 3:
    image = maybe(keys[4], p.grayscale_prob, to_grayscale(image), image)
  if p.blur_prob > 0:
    sigma = jax.random.uniform(keys[5], (), minval=p.blur_sigma[0], maxval=p.blur_sigma[1])
    image = maybe(keys[6], p.blur_prob, gaussian_blur(image, sigma), image)
  if p.solarize_prob > 0:
    image = maybe(keys[7], p.solarize_prob, solarize(image, p.solarize_threshold), image)
  return image


# ----------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------

def to_float(images: Array) -> Array:
  """uint8 [.., H, W, C] -> float32 in [0, 1]."""
  return images.astype(jnp.float32) / 255.0


def normalize(images: Array, mean, std) -> Array:
  return (images - jnp.asarray(mean, images.dtype)) / jnp.asarray(std, images.dtype)


def augment_batch(images: Array, key: Array, p: ViewParams, out_size: int,
                  crop: bool = True) -> Array:
  """[B, H, W, C] uint8 -> [B, out, out, C] float in [0, 1], one key per image."""
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda x, k: augment_image(x, k, p, out_size, crop))(to_float(images), keys)


def two_views(batch: Mapping[str, Array], key: Array, view_a: ViewParams,
              view_b: ViewParams, *, out_size: int, mean, std,
              crop: bool = True) -> tuple[Array, Array]:
  """The two normalised views x_a, x_b [B, out, out, C] of a pretraining batch.

  If the batch carries 'view_b' (host-cropped datasets) it is the second
  view's source image; otherwise both views come from 'image'.
  """
  key_a, key_b = jax.random.split(key)
  x_a = augment_batch(batch['image'], key_a, view_a, out_size, crop)
  x_b = augment_batch(batch.get('view_b', batch['image']), key_b, view_b, out_size, crop)
  return normalize(x_a, mean, std), normalize(x_b, mean, std)


def eval_view(images: Array, *, out_size: int, mean, std) -> Array:
  """Evaluation images: resize only (if needed), normalise."""
  x = to_float(images)
  if x.shape[1] != out_size:
    x = jax.image.resize(x, (x.shape[0], out_size, out_size, x.shape[-1]), 'linear')
  return normalize(x, mean, std)
