"""Each augmentation respects its parameters."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import augment

IDENTITY = augment.ViewParams(**augment.PRESETS['none'][0])


def image(seed=0, size=16, channels=3):
  return jax.random.uniform(jax.random.key(seed), (size, size, channels))


def with_(**kw):
  return dataclasses.replace(IDENTITY, **kw)


@pytest.mark.parametrize('channels', [1, 3])
def test_all_probabilities_zero_leave_the_image_unchanged(channels):
  x = image(channels=channels)
  params = with_(blur_prob=0.0, solarize_prob=0.0)
  y = augment.augment_image(x, jax.random.key(1), params, 16)
  np.testing.assert_allclose(y, x, atol=1e-6)


def test_flip_with_probability_one_mirrors():
  x = image()
  y = augment.augment_image(x, jax.random.key(2), with_(flip_prob=1.0), 16)
  np.testing.assert_allclose(y, x[:, ::-1], atol=1e-6)


def test_solarize_threshold():
  x = jnp.linspace(0, 1, 16 * 16 * 3).reshape(16, 16, 3)
  y = augment.augment_image(x, jax.random.key(3), with_(solarize_prob=1.0,
                                                       solarize_threshold=0.3), 16)
  np.testing.assert_allclose(y, np.where(x < 0.3, x, 1 - x), atol=1e-6)


def test_grayscale_with_probability_one_equalises_channels():
  y = augment.augment_image(image(), jax.random.key(4), with_(grayscale_prob=1.0), 16)
  np.testing.assert_allclose(y[..., 0], y[..., 1], atol=1e-6)
  np.testing.assert_allclose(y[..., 0], y[..., 2], atol=1e-6)


def test_crop_area_and_ratio_bounds_hold():
  keys = jax.random.split(jax.random.key(5), 2000)
  y0, x0, h, w = jax.vmap(lambda k: augment.sample_crop(k, (0.2, 0.6), (3 / 4, 4 / 3)))(keys)
  area = np.asarray(h * w)
  assert area.min() >= 0.2 - 1e-6 and area.max() <= 0.6 + 1e-6
  ratio = np.asarray(w / h)
  assert ratio.min() >= 3 / 4 - 1e-5 and ratio.max() <= 4 / 3 + 1e-5
  assert np.all(np.asarray(y0 + h) <= 1 + 1e-6) and np.all(np.asarray(x0 + w) <= 1 + 1e-6)
  assert np.all(np.asarray(y0) >= 0) and np.all(np.asarray(x0) >= 0)


def test_full_crop_is_the_identity_and_half_crop_magnifies():
  x = image(size=8)
  np.testing.assert_allclose(augment.crop_and_resize(x, (0.0, 0.0, 1.0, 1.0), 8), x, atol=1e-5)
  # The top-left quarter, resized 2x: each source pixel covers 2x2 outputs
  # (bilinear), so the centres of the 2x2 blocks agree with the source up to
  # interpolation; compare block means.
  y = augment.crop_and_resize(x, (0.0, 0.0, 0.5, 0.5), 8)
  np.testing.assert_allclose(y.mean(), x[:4, :4].mean(), atol=0.05)


def test_brightness_scales_and_blur_smooths():
  x = jnp.full((16, 16, 1), 0.5)
  y = augment.color_jitter(x, jax.random.key(6), with_(brightness=0.5, contrast=0.0))
  factor = float(y[0, 0, 0] / 0.5)
  assert 0.5 <= factor <= 1.5 and np.allclose(y, y[0, 0, 0])
  noisy = image(7, channels=1)
  blurred = augment.gaussian_blur(noisy, jnp.asarray(2.0))
  assert float(jnp.std(blurred)) < 0.7 * float(jnp.std(noisy))
  np.testing.assert_allclose(augment.gaussian_blur(x, jnp.asarray(2.0)), x, atol=1e-6)


def test_hsv_round_trip_and_hue_zero_is_identity():
  x = image(8)
  np.testing.assert_allclose(augment.hsv_to_rgb(augment.rgb_to_hsv(x)), x, atol=1e-5)
  y = augment.color_jitter(x, jax.random.key(9), with_(brightness=0.0, contrast=0.0,
                                                      saturation=0.0, hue=0.0))
  np.testing.assert_allclose(y, x, atol=1e-5)


def test_two_views_differ_and_are_reproducible():
  batch = {'image': (255 * jax.random.uniform(jax.random.key(10), (4, 28, 28, 1))
                     ).astype(jnp.uint8)}
  view_a, view_b = augment.views_from_config('fashion_mnist')
  run = lambda k: augment.two_views(batch, k, view_a, view_b, out_size=28,
                                    mean=(0.286,), std=(0.353,))
  x_a, x_b = run(jax.random.key(0))
  assert x_a.shape == (4, 28, 28, 1) and not np.allclose(x_a, x_b)
  np.testing.assert_array_equal(run(jax.random.key(0))[0], x_a)
  assert not np.allclose(run(jax.random.key(1))[0], x_a)


def test_presets_are_asymmetric_as_published():
  a, b = augment.views_from_config('imagenet')
  assert (a.blur_prob, b.blur_prob, a.solarize_prob, b.solarize_prob) == (1.0, 0.1, 0.0, 0.2)
  a, b = augment.views_from_config('cifar', view_b={'solarize_prob': 0.0})
  assert b.solarize_prob == 0.0 and a.crop_scale == (0.2, 1.0)


@pytest.mark.parametrize('overrides,message', [
    ({'flip_prob': 1.5}, 'flip_prob must be in \\[0, 1\\]'),
    ({'crop_scale': (0.5, 0.2)}, 'crop_scale'),
    ({'crop_scale': (0.0, 1.0)}, 'crop_scale'),
    ({'hue': 0.7}, 'hue'),
    ({'brightness': -0.1}, 'brightness'),
    ({'blur_sigma': (0.0, 1.0)}, 'blur_sigma'),
    ({'blurr_prob': 0.5}, 'Unknown augmentation parameters'),
])
def test_out_of_range_parameters_raise(overrides, message):
  with pytest.raises(ValueError, match=message):
    augment.views_from_config('cifar', view_a=overrides)


def test_unknown_preset():
  with pytest.raises(ValueError, match='Unknown augmentation preset'):
    augment.views_from_config('strong')
