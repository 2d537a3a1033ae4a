"""Each augmentation respects its parameters."""

import colorsys
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

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


# ----------------------------------------------------------------------------
# Values against references known apart from this code: Python's colorsys, SciPy's
# Gaussian filter, the ITU-R 601 luma weights, the published VICReg / BYOL recipe,
# bilinear resampling of a linear ramp, and the sampling distributions' moments.
# ----------------------------------------------------------------------------

def test_hsv_conversions_match_colorsys():
  rng = np.random.default_rng(0)
  rgb = rng.uniform(size=(400, 3))
  # Ties between channels, greys, black, white and pure colours take the other branches.
  rgb[:60] = np.round(rgb[:60] * 2) / 2
  rgb[60:64] = [[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [0, 0, 1]]
  expected = np.array([colorsys.rgb_to_hsv(*c) for c in rgb])
  np.testing.assert_allclose(augment.rgb_to_hsv(jnp.asarray(rgb, jnp.float32)), expected,
                             atol=1e-6)
  hsv = rng.uniform(size=(400, 3))
  hsv[:12, 0] = np.arange(12) / 6 % 1.0        # the sector boundaries
  expected = np.array([colorsys.hsv_to_rgb(*c) for c in hsv])
  np.testing.assert_allclose(augment.hsv_to_rgb(jnp.asarray(hsv, jnp.float32)), expected,
                             atol=1e-6)


def test_grayscale_is_the_itu_601_luma_in_every_channel():
  primaries = jnp.eye(3).reshape(3, 1, 3)                    # red, green, blue pixels
  gray = augment.to_grayscale(primaries)
  np.testing.assert_allclose(gray[:, 0, :], np.repeat([[0.299], [0.587], [0.114]], 3, 1),
                             atol=1e-7)
  single = image(channels=1)
  np.testing.assert_array_equal(augment.to_grayscale(single), single)


@pytest.mark.parametrize('side,sigma', [(28, 0.7), (32, 1.3), (64, 2.0)])
def test_blur_matches_scipy_gaussian_filter_with_reflection(side, sigma):
  x = np.asarray(image(11, size=side))
  radius = augment.blur_kernel_size(side) // 2
  # NumPy's 'reflect' padding (edge not repeated) is SciPy's 'mirror'.
  expected = scipy.ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode='mirror',
                                           radius=(radius, radius, 0))
  np.testing.assert_allclose(augment.gaussian_blur(jnp.asarray(x), jnp.asarray(sigma)),
                             expected, atol=1e-5)


def test_blur_kernel_is_a_tenth_of_the_side_as_in_byol():
  # BYOL (Grill et al. 2020, appendix B): 23 x 23 at 224; odd, at least 3.
  assert [augment.blur_kernel_size(s) for s in (224, 96, 64, 32, 28, 8)] == [
      23, 11, 7, 5, 3, 3]


def test_imagenet_preset_is_the_published_vicreg_byol_recipe():
  """Bardes et al. 2022 appendix C / Grill et al. 2020 table 6, view by view."""
  a, b = augment.views_from_config('imagenet')
  for view in (a, b):
    assert view.crop_scale == (0.08, 1.0)
    assert view.crop_ratio == pytest.approx((3 / 4, 4 / 3))
    assert view.flip_prob == 0.5
    assert (view.jitter_prob, view.brightness, view.contrast, view.saturation, view.hue) == (
        0.8, 0.4, 0.4, 0.2, 0.1)
    assert view.grayscale_prob == 0.2
    assert view.blur_sigma == (0.1, 2.0)
    assert view.solarize_threshold == 0.5       # PIL's solarize at 128 of 255
  assert (a.blur_prob, b.blur_prob, a.solarize_prob, b.solarize_prob) == (1.0, 0.1, 0.0, 0.2)
  # SimCLR (Chen et al. 2020, appendix A): jitter strength 0.8, blur with probability 0.5.
  s, _ = augment.views_from_config('simclr')
  assert (s.brightness, s.contrast, s.saturation, s.hue, s.blur_prob) == (
      0.8, 0.8, 0.8, 0.2, 0.5)
  # The dataclass defaults are the solo-learn CIFAR recipe's.
  assert augment.ViewParams() == augment.ViewParams(**augment.PRESETS['cifar'][0])


def test_preset_overrides_none_keeps_the_preset_and_lists_become_tuples():
  import ml_collections
  a, b = augment.views_from_config(
      'cifar', view_a=ml_collections.ConfigDict({'crop_scale': [0.5, 0.9], 'hue': None}),
      view_b=None)
  assert a.crop_scale == (0.5, 0.9) and a.hue == 0.1 and b == augment.ViewParams(
      **augment.PRESETS['cifar'][1])


@pytest.mark.parametrize('name', ['flip_prob', 'jitter_prob', 'grayscale_prob', 'blur_prob',
                                  'solarize_prob', 'solarize_threshold', 'brightness',
                                  'contrast', 'saturation'])
def test_unit_interval_parameters_accept_their_ends_and_refuse_beyond(name):
  for ok in (0.0, 1.0):
    augment.ViewParams(**{name: ok})
  for bad in (-0.01, 1.01):
    with pytest.raises(ValueError, match=name):
      augment.ViewParams(**{name: bad})


@pytest.mark.parametrize('field,ok,bad', [
    ('hue', [0.0, 0.5], [-0.01, 0.51]),
    ('crop_scale', [(1.0, 1.0), (0.01, 0.01)], [(0.2, 1.01), (-0.1, 0.5)]),
    ('crop_ratio', [(1.0, 1.0), (0.5, 2.0)], [(1.1, 2.0), (0.5, 0.9), (0.0, 1.0)]),
    ('blur_sigma', [(1.0, 1.0)], [(2.0, 1.0), (-1.0, 1.0)]),
])
def test_range_parameters_accept_their_bounds_and_refuse_beyond(field, ok, bad):
  for value in ok:
    augment.ViewParams(**{field: value})
  for value in bad:
    with pytest.raises(ValueError, match=field):
      augment.ViewParams(**{field: value})


def test_crop_samples_area_aspect_and_position_uniformly():
  keys = jax.random.split(jax.random.key(12), 4000)
  y0, x0, h, w = (np.asarray(v) for v in jax.vmap(
      lambda k: augment.sample_crop(k, (0.2, 0.6), (3 / 4, 4 / 3)))(keys))
  area = h * w
  # U(0.2, 0.6): mean 0.4, sd 0.115; the sample mean's sd is 0.002.
  assert abs(area.mean() - 0.4) < 0.01 and area.min() < 0.21 and area.max() > 0.59
  log_ratio = np.log(w / h)     # U(log 3/4, log 4/3): symmetric, reaching both ends
  assert abs(log_ratio.mean()) < 0.01
  assert log_ratio.min() < math.log(3 / 4) + 0.01 and log_ratio.max() > math.log(4 / 3) - 0.01
  for start, side in ((y0, h), (x0, w)):   # the free room, U(0, 1 - side) each way
    u = start / (1 - side)
    assert abs(u.mean() - 0.5) < 0.02 and u.min() < 0.01 and u.max() > 0.99
  # A large area narrows the aspect ratio to what fits in the image: w, h <= 1.
  _, _, h, w = (np.asarray(v) for v in jax.vmap(
      lambda k: augment.sample_crop(k, (0.9, 0.9), (1 / 2, 2.0)))(keys))
  np.testing.assert_allclose(h * w, 0.9, rtol=1e-5)
  assert (w / h).min() == pytest.approx(0.9, abs=2e-3) and (w / h).max() == pytest.approx(
      1 / 0.9, abs=2e-3)


def test_crop_and_resize_is_bilinear_resampling_of_the_crop():
  """A linear ramp resampled bilinearly stays linear: the crop's window in closed form."""
  rows = np.arange(8, dtype=np.float32)
  ramp = jnp.asarray(rows[:, None, None] + 10 * rows[None, :, None])   # 1 per row, 10 per column
  # Rows 2..6 and columns 4..8 of 8 (fractions 0.25 + 0.5 and 0.5 + 0.5), to 8 pixels: output
  # pixel j's centre falls on input coordinate start + (j + 0.5) / 2, whose value is that
  # coordinate minus the half-pixel of the centres.
  y = np.asarray(augment.crop_and_resize(ramp, (0.25, 0.5, 0.5, 0.5), 8))[..., 0]
  j = np.arange(8)
  row_value, col_value = 2 + (j + 0.5) / 2 - 0.5, 4 + (j + 0.5) / 2 - 0.5
  expected = row_value[:, None] + 10 * col_value[None, :]
  # Away from the image border (the last output column samples beyond the last centre).
  np.testing.assert_allclose(y[:, :7], expected[:, :7], atol=1e-4)


def _factors(view, x, statistic, n=600):
  keys = jax.random.split(jax.random.key(13), n)
  y = jax.vmap(lambda k: augment.color_jitter(x, k, view))(keys)
  return np.asarray(jax.vmap(statistic)(y))


@pytest.mark.parametrize('op,amount', [('brightness', 0.4), ('contrast', 0.4),
                                       ('saturation', 0.2), ('brightness', 1.0)])
def test_jitter_factors_are_uniform_on_one_plus_minus_the_strength(op, amount):
  """torchvision's ColorJitter: each factor ~ U(max(0, 1 - s), 1 + s), applied as a blend."""
  off = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
  view = with_(**{**off, op: amount})
  if op == 'brightness':      # x * f
    x = jnp.full((4, 4, 1), 0.25)
    stat = lambda y: y[0, 0, 0] / 0.25
  elif op == 'contrast':      # mean + (x - mean) * f, mean of the luma
    x = jnp.asarray([[0.4, 0.6]]).reshape(1, 2, 1)
    stat = lambda y: (y[0, 1, 0] - y[0, 0, 0]) / 0.2
  else:                       # luma + (x - luma) * f, per pixel
    x = jnp.asarray([[[0.6, 0.4, 0.5]]])
    luma = 0.299 * 0.6 + 0.587 * 0.4 + 0.114 * 0.5
    stat = lambda y: (y[0, 0, 0] - luma) / (0.6 - luma)
  f = _factors(view, x, stat)
  lo, hi = max(0.0, 1 - amount), 1 + amount
  assert f.min() >= lo - 1e-4 and f.max() <= hi + 1e-4
  assert f.min() < lo + 0.02 * amount * 2 and f.max() > hi - 0.02 * amount * 2
  assert abs(f.mean() - (lo + hi) / 2) < 0.05 * (hi - lo)


def test_hue_shift_is_uniform_on_plus_minus_hue_and_keeps_saturation_and_value():
  off = dict(brightness=0.0, contrast=0.0, saturation=0.0)
  x = jnp.asarray([[[0.8, 0.3, 0.4]]])
  h0, s0, v0 = colorsys.rgb_to_hsv(0.8, 0.3, 0.4)
  hsv = _factors(with_(**off, hue=0.1), x, lambda y: augment.rgb_to_hsv(y)[0, 0])
  shift = (hsv[:, 0] - h0 + 0.5) % 1.0 - 0.5
  assert shift.min() >= -0.1 - 1e-5 and shift.max() <= 0.1 + 1e-5
  assert shift.min() < -0.095 and shift.max() > 0.095 and abs(shift.mean()) < 0.01
  np.testing.assert_allclose(hsv[:, 1], s0, atol=1e-5)
  np.testing.assert_allclose(hsv[:, 2], v0, atol=1e-5)


def test_jitter_contrast_uses_the_mean_luma_after_brightness_and_clips():
  # Two pixels 0.2 and 0.6, brightness and contrast strengths 0.4 and 0.5: no output
  # reaches 0 or 1, so both factors can be read back from each output.
  x = jnp.asarray([[0.2, 0.6]]).reshape(1, 2, 1)
  view = with_(brightness=0.4, contrast=0.5, saturation=0.0, hue=0.0)
  keys = jax.random.split(jax.random.key(14), 200)
  y = np.asarray(jax.vmap(lambda k: augment.color_jitter(x, k, view))(keys))[:, 0, :, 0]
  # Brightness keeps the ratio of the two pixels; contrast keeps their mean: so the
  # mean of the output is b * 0.4 with b = the brightness factor, and b * 0.2 and
  # b * 0.6 are its pre-contrast pixels.
  b = y.mean(1) / 0.4
  c = (y[:, 1] - y[:, 0]) / (b * 0.4)
  assert b.min() >= 0.6 - 1e-5 and b.max() <= 1.4 + 1e-5 and c.min() >= 0.5 - 1e-5
  assert c.max() <= 1.5 + 1e-5
  # Clipped to [0, 1]: a bright image at the strongest settings.
  bright = jnp.full((2, 2, 3), 0.95).at[0, 0].set(0.05)
  out = jax.vmap(lambda k: augment.color_jitter(bright, k, with_(brightness=1.0, contrast=1.0,
                                                                 saturation=1.0, hue=0.5)))(
      keys)
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


@pytest.mark.parametrize('field,prob', [('flip_prob', 0.3), ('jitter_prob', 0.8),
                                        ('grayscale_prob', 0.2), ('blur_prob', 0.1),
                                        ('solarize_prob', 0.2)])
def test_each_operation_fires_with_its_probability(field, prob):
  x = image(15, size=8)
  view = with_(**{field: prob}, brightness=0.9, contrast=0.0, hue=0.0, saturation=0.0)
  keys = jax.random.split(jax.random.key(16), 2000)
  y = jax.vmap(lambda k: augment.augment_image(x, k, view, 8))(keys)
  changed = np.asarray(jnp.max(jnp.abs(y - x[None]), axis=(1, 2, 3)) > 1e-4)
  # Binomial(2000, p): sd at most 0.011.
  assert abs(changed.mean() - prob) < 0.04, changed.mean()


def test_operations_draw_independent_decisions():
  x = image(17, size=8)
  view = with_(flip_prob=0.5, solarize_prob=0.5, solarize_threshold=0.0)   # solarise: 1 - x
  keys = jax.random.split(jax.random.key(18), 4000)
  y = jax.vmap(lambda k: augment.augment_image(x, k, view, 8))(keys)
  flipped_pixel = np.asarray(jnp.minimum(y[:, 0, 0], 1 - y[:, 0, 0]))
  flipped = np.abs(flipped_pixel - np.minimum(x[0, -1], 1 - x[0, -1])).max(-1) < 1e-5
  solarized = np.asarray(jnp.abs(y[:, 0, 0] - (1 - x[0, 0])).max(-1) < 1e-5) | np.asarray(
      jnp.abs(y[:, 0, 0] - (1 - x[0, -1])).max(-1) < 1e-5)
  both = (flipped & solarized).mean()
  assert abs(flipped.mean() - 0.5) < 0.04 and abs(solarized.mean() - 0.5) < 0.04
  assert abs(both - 0.25) < 0.04


def test_pixels_are_scaled_by_255_and_normalised():
  images = jnp.asarray([[[[0], [51]], [[204], [255]]]], jnp.uint8)     # [1, 2, 2, 1]
  x = augment.eval_view(images, out_size=2, mean=(0.5,), std=(0.25,))
  np.testing.assert_allclose(np.asarray(x)[0, ..., 0], [[-2.0, -1.2], [1.2, 2.0]], atol=1e-6)
  # Another size is resized (a constant image stays constant).
  big = augment.eval_view(jnp.full((1, 4, 4, 1), 255, jnp.uint8), out_size=2, mean=(0.0,),
                          std=(1.0,))
  assert big.shape == (1, 2, 2, 1) and np.allclose(big, 1.0)


def test_two_views_take_the_second_view_from_view_b_when_given():
  rng = np.random.default_rng(19)
  batch = {'image': rng.integers(0, 256, (3, 8, 8, 1), np.uint8),
           'view_b': rng.integers(0, 256, (3, 8, 8, 1), np.uint8)}
  x_a, x_b = augment.two_views(batch, jax.random.key(0), IDENTITY, IDENTITY, out_size=8,
                               mean=(0.5,), std=(2.0,))
  np.testing.assert_allclose(x_a, (batch['image'] / 255 - 0.5) / 2.0, atol=1e-6)
  np.testing.assert_allclose(x_b, (batch['view_b'] / 255 - 0.5) / 2.0, atol=1e-6)
  # Without the crop, a smaller output is a resize of the whole image.
  small = augment.augment_batch(jnp.full((2, 8, 8, 1), 255, jnp.uint8), jax.random.key(1),
                                IDENTITY, 4, crop=False)
  assert small.shape == (2, 4, 4, 1) and np.allclose(small, 1.0)


def test_saturation_beyond_one_stays_in_the_unit_cube():
  # A factor up to 2 pushes a pure colour's other channels below 0 before the clip:
  # (0, 0.9, 0) has luma 0.53, and 0.53 + 2 (0 - 0.53) < 0.
  colours = jnp.asarray([[[0.0, 0.9, 0.0], [0.9, 0.0, 0.1]], [[0.1, 0.1, 1.0], [1.0, 1.0, 0.0]]])
  view = with_(brightness=0.0, contrast=0.0, saturation=1.0, hue=0.0)
  keys = jax.random.split(jax.random.key(20), 200)
  out = jax.vmap(lambda k: augment.color_jitter(colours, k, view))(keys)
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
