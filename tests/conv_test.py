"""The CPU convolution routes (im2col, Winograd) against lax.conv: values, gradients,
devices, encoders."""

from fractions import Fraction

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax import lax
from jax.test_util import check_grads
from jax.sharding import NamedSharding, PartitionSpec as P

from ssl_jax import conv
from ssl_jax import models
from ssl_jax import sharding
from ssl_jax import winograd

NHWC = ('NHWC', 'HWIO', 'NHWC')

# (H, W, C, O, kernel, stride, padding): every layer shape the encoders use
# (small CNN 28x28 strides 1-2-2-1 from 1 channel; ResNet CIFAR stem 3x3/1 and
# ImageNet stem 7x7/2; 3x3 stride 2 and 1x1 stride 1/2 in blocks), at odd and
# even spatial sizes, plus VALID and explicit padding.
CASES = [
    (28, 28, 1, 8, 3, 1, 'SAME'), (28, 28, 8, 16, 3, 2, 'SAME'), (14, 14, 16, 8, 3, 2, 'SAME'),
    (7, 7, 8, 16, 3, 1, 'SAME'), (9, 11, 3, 5, 3, 2, 'SAME'), (8, 8, 4, 6, 1, 2, 'SAME'),
    (7, 7, 4, 6, 1, 2, 'SAME'), (5, 5, 4, 6, 1, 1, 'SAME'), (15, 15, 3, 4, 7, 2, 'SAME'),
    (16, 16, 3, 4, 7, 2, 'SAME'), (9, 9, 3, 4, 3, 1, 'VALID'), (10, 10, 3, 4, 3, 2, 'VALID'),
    (5, 5, 2, 3, 3, 3, 'SAME'), (6, 7, 2, 3, 3, 2, ((2, 0), (1, 1))),
]
# 3x3 stride-1 layers with at least 8 channels, which the 'winograd' route
# computes by Winograd: the small CNN's last layer and ResNet's block convs at
# the channel counts they use, sizes that are and are not multiples of the
# 4x4 output tile (1x1 to 9x11 outputs), VALID and uneven explicit padding.
WINOGRAD_CASES = [
    (7, 7, 8, 16, 3, 1, 'SAME'), (7, 7, 128, 256, 3, 1, 'SAME'), (8, 8, 64, 64, 3, 1, 'SAME'),
    (4, 4, 32, 16, 3, 1, 'SAME'), (1, 1, 16, 8, 3, 1, 'SAME'), (9, 11, 8, 12, 3, 1, 'SAME'),
    (9, 9, 8, 8, 3, 1, 'VALID'), (3, 3, 8, 8, 3, 1, 'VALID'), (6, 7, 8, 9, 3, 1, ((2, 0), (1, 1))),
]
# F(7x7, 3x3) tiles: the outputs `winograd.choose_tile` gives them (7x7, 14x14),
# padded and not, and a 6x6 output that a 7x7 tile covers with a margin.
WINOGRAD7_CASES = [
    (7, 7, 8, 16, 3, 1, 'SAME'), (14, 14, 8, 8, 3, 1, 'SAME'), (9, 9, 8, 12, 3, 1, 'VALID'),
    (6, 7, 8, 9, 3, 1, ((2, 0), (1, 1))), (16, 16, 8, 8, 3, 1, 'VALID'),
]
ROUTE_FUNCTIONS = {'im2col': conv.conv_general_dilated,
                   'winograd': conv.conv_general_dilated_winograd,
                   'winograd7': conv.conv_general_dilated_winograd7}


def _both(x, w, stride, padding, route='im2col'):
  ref = lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), padding,
                                              dimension_numbers=NHWC)
  ours = lambda x, w: ROUTE_FUNCTIONS[route](x, w, (stride, stride), padding,
                                             dimension_numbers=NHWC)
  return ref, ours


def _assert_route_equals_lax_conv(route, case, dtype, batch, seed, tol, grad_tol):
  """Values and both gradients of `route` against lax.conv on one CASES entry."""
  h, w, c, o, k, stride, padding = case
  kx, kw, kc = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (batch, h, w, c), dtype)
  kernel = jax.random.normal(kw, (k, k, c, o), dtype) / np.sqrt(k * k * c)
  ref, ours = _both(x, kernel, stride, padding, route)
  y_ref = ref(x, kernel)
  np.testing.assert_allclose(ours(x, kernel), y_ref, rtol=tol, atol=tol)
  cotangent = jax.random.normal(kc, y_ref.shape, dtype)
  grads_ref = jax.grad(lambda x, w: jnp.sum(ref(x, w) * cotangent), (0, 1))(x, kernel)
  grads = jax.grad(lambda x, w: jnp.sum(ours(x, w) * cotangent), (0, 1))(x, kernel)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, rtol=grad_tol, atol=grad_tol)


# Float32 at direct convolution's tolerances: im2col and F(4x4, 3x3). The
# 'winograd7' route's F(7x7, 3x3) layers are checked exactly in float64
# (test_winograd_routes_equal_lax_conv_in_float64) and for their float32
# round-off against a bound (test_winograd7_round_off_...).
@pytest.mark.parametrize('route,h,w,c,o,k,stride,padding',
                         [('im2col',) + case for case in CASES + WINOGRAD_CASES]
                         + [('winograd',) + case for case in CASES + WINOGRAD_CASES])
def test_values_and_gradients_equal_lax_conv(route, h, w, c, o, k, stride, padding):
  _assert_route_equals_lax_conv(route, (h, w, c, o, k, stride, padding), jnp.float32,
                                batch=3, seed=h * 100 + c, tol=1e-5, grad_tol=1e-4)


def test_gradients_match_finite_differences_in_float64():
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3), jnp.float64)
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 4), jnp.float64)
    f = lambda x, w: conv.conv_general_dilated(x, w, (2, 2), 'SAME', dimension_numbers=NHWC)
    check_grads(f, (x, kernel), order=1, modes=['rev'])


@pytest.mark.parametrize('tile', winograd.TILES)
def test_winograd_gradients_match_finite_differences_in_float64(tile):
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 8), jnp.float64)
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 8, 9), jnp.float64)
    f = lambda x, w: winograd.conv3x3(x, w, ((1, 1), (2, 0)), tile)
    check_grads(f, (x, kernel), order=1, modes=['rev'])


@pytest.mark.parametrize('points', [winograd.POINTS, winograd.POINTS_7])
def test_winograd_matrices_compute_the_correlation_exactly(points):
  # In rational arithmetic, A^T [(G g) * (B^T d)] is the 1-D correlation
  # y_i = sum_j g_j d_{i+j} for any filter g and input tile d: the Toom-Cook
  # construction is exact, and only float round-off separates the route from
  # a direct convolution.
  at, g_mat, bt = winograd._matrices(points)
  m, n = at.shape
  assert n == m + winograd.KERNEL - 1 == len(points) + 1
  rng = np.random.default_rng(0)
  for _ in range(5):
    g = [Fraction(int(v)) for v in rng.integers(-9, 10, size=winograd.KERNEL)]
    d = [Fraction(int(v)) for v in rng.integers(-9, 10, size=n)]
    gg, bd = g_mat.dot(g), bt.dot(d)
    y = at.dot([a * b for a, b in zip(gg, bd)])
    assert list(y) == [sum(g[j] * d[i + j] for j in range(winograd.KERNEL)) for i in range(m)]


@pytest.mark.parametrize('route,h,w,c,o,k,stride,padding',
                         [('winograd7',) + case for case in CASES + WINOGRAD_CASES + WINOGRAD7_CASES]
                         + [('winograd',) + case for case in WINOGRAD7_CASES])
def test_winograd_routes_equal_lax_conv_in_float64(route, h, w, c, o, k, stride, padding):
  # In float64 the round-off of either tile is far below the tolerance, so any
  # error of tiling, padding, cropping or the adjoint transforms shows.
  with jax.enable_x64(True):
    _assert_route_equals_lax_conv(route, (h, w, c, o, k, stride, padding), jnp.float64,
                                  batch=2, seed=h * 1000 + c + o, tol=1e-10, grad_tol=1e-10)


def test_choose_tile_takes_7x7_tiles_where_they_need_far_fewer_positions():
  # Positions per image, F(4x4): 36 per 4x4 tile; F(7x7): 81 per 7x7 tile.
  assert winograd.choose_tile((7, 7)) == 7        # 144 against 81
  assert winograd.choose_tile((14, 14)) == 7      # 576 against 324
  assert winograd.choose_tile((28, 28)) == 4      # 1764 against 1296: under 1.5x
  assert winograd.choose_tile((32, 32)) == 4      # ResNet's CIFAR stages: 4x4 tiles fit
  assert winograd.choose_tile((8, 8)) == 4
  assert winograd.choose_tile((4, 4)) == 4
  assert winograd.choose_tile((7, 7), tiles=(4,)) == 4


def test_winograd_round_off_stays_within_a_few_times_direct_float32():
  # The 36 transformed products add and subtract terms up to 8x larger than
  # the result, so Winograd's float32 error exceeds a direct convolution's.
  # Measured on the small CNN's last layer against a float64 reference:
  # RMS relative error 1.5e-6 (y) and 2.0e-6 (gradients), direct 3-4e-7.
  # This bounds it at 10x direct float32, so a change of interpolation points
  # or transform order that loses accuracy fails here.
  with jax.enable_x64(True):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (8, 7, 7, 128), jnp.float64)
    kernel = jax.random.normal(kw, (3, 3, 128, 256), jnp.float64) / np.sqrt(9 * 128)
    g = jax.random.normal(kg, (8, 7, 7, 256), jnp.float64)
    ref = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=NHWC)
    ours = lambda x, w: winograd.conv3x3(x, w, ((1, 1), (1, 1)))

    def outputs(f, *args):
      y, vjp = jax.vjp(f, *args)
      return (y,) + vjp(g.astype(args[0].dtype))

    exact = outputs(ref, x, kernel)
    x32, k32 = x.astype(jnp.float32), kernel.astype(jnp.float32)
    rms = lambda a, b: float(jnp.sqrt(jnp.mean((a - b) ** 2) / jnp.mean(b ** 2)))
    for direct, wino, truth in zip(outputs(ref, x32, k32), outputs(ours, x32, k32), exact):
      assert rms(wino, truth) < 10 * max(rms(direct, truth), 1e-7)


def test_winograd7_round_off_stays_10x_below_bfloat16_operands():
  # F(7x7, 3x3) trades accuracy for speed: its 8 finite interpolation points
  # give transforms with entries up to 4^6, and a float32 RMS relative error of
  # about 4e-5 (y) and 1e-4 (gradients) on the small CNN's last layer (direct
  # float32: 3-4e-7). The yardstick is the precision accelerators train in:
  # a direct convolution whose operands are rounded to bfloat16 (TPU's default
  # matmul precision, about 2e-3 here). This bounds F(7x7) at a tenth of that.
  with jax.enable_x64(True):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.nn.relu(jax.random.normal(kx, (8, 7, 7, 128), jnp.float64))
    kernel = jax.random.normal(kw, (3, 3, 128, 256), jnp.float64) / np.sqrt(9 * 128)
    g = jax.random.normal(kg, (8, 7, 7, 256), jnp.float64)
    ref = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=NHWC)
    ours = lambda x, w: winograd.conv3x3(x, w, ((1, 1), (1, 1)), 7)
    bf16 = lambda a: a.astype(jnp.bfloat16).astype(jnp.float64)

    def outputs(f, x, w, g):
      y, vjp = jax.vjp(f, x, w)
      return (y,) + vjp(g)

    exact = outputs(ref, x, kernel, g)
    rounded = outputs(ref, bf16(x), bf16(kernel), bf16(g))
    f32 = lambda a: a.astype(jnp.float32)
    wino = outputs(ours, f32(x), f32(kernel), f32(g))
    rms = lambda a, b: float(jnp.sqrt(jnp.mean((a - b) ** 2) / jnp.mean(b ** 2)))
    for w7, bf, truth in zip(wino, rounded, exact):
      assert rms(w7.astype(jnp.float64), truth) < 0.1 * rms(bf, truth)


@pytest.mark.parametrize('h,w,c,o,k,stride,padding', CASES)
def test_col2im_is_the_adjoint_of_patches(h, w, c, o, k, stride, padding):
  # <patches(x), g> = <x, col2im(g)> for every x and g: col2im is exactly the
  # transpose of the linear map patches, which is what the input gradient needs.
  del o
  pads = lax.padtype_to_pads((h, w), (k, k), (stride, stride), padding) if isinstance(
      padding, str) else padding
  x = jax.random.normal(jax.random.key(0), (2, h, w, c), jnp.float32)
  cols = conv.patches(x, (k, k), (stride, stride), pads)
  g = jax.random.normal(jax.random.key(1), cols.shape, jnp.float32)
  back = conv.col2im(g.reshape(cols.shape[:3] + (k, k, c)), (h, w), (stride, stride), pads)
  assert back.shape == x.shape
  _, vjp = jax.vjp(lambda x: conv.patches(x, (k, k), (stride, stride), pads), x)
  np.testing.assert_allclose(back, vjp(g)[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jnp.vdot(cols, g), jnp.vdot(x, back), rtol=1e-4)


@pytest.mark.parametrize('chunk_bytes', [1, 2048, 1 << 30])
def test_batch_chunking_does_not_change_the_result(monkeypatch, chunk_bytes):
  # 1 byte: one image per loop iteration; 1 GiB: the whole batch at once.
  x = jax.random.normal(jax.random.key(0), (8, 9, 9, 4), jnp.float32)
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 4, 5), jnp.float32)
  ref, _ = _both(x, kernel, 2, 'SAME')
  monkeypatch.setattr(conv, 'CHUNK_BYTES', chunk_bytes)
  # The setting reaches the convolution: the forward patches of one image are
  # 5 * 5 * 9 * 4 channels * 4 bytes, so 1 and 2048 bytes loop image by image.
  assert conv.num_chunks(8, 5 * 5 * 9 * 4 * 4) == (1 if chunk_bytes == 1 << 30 else 8)
  f = lambda x, w: conv.conv2d(x, w, (2, 2), ((1, 1), (1, 1)))   # 'SAME' for 9 -> 5
  np.testing.assert_allclose(f(x, kernel), ref(x, kernel), rtol=1e-5, atol=1e-5)
  g_ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(ref(x, w))), (0, 1))(x, kernel)
  g = jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), (0, 1))(x, kernel)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_chunk_size_follows_the_allocator(monkeypatch):
  monkeypatch.setattr(conv, 'CHUNK_BYTES', None)
  monkeypatch.setattr(conv.allocator, 'tcmalloc_loaded', lambda: False)
  assert conv.patch_bytes_per_chunk() == conv.CHUNK_BYTES_GLIBC
  monkeypatch.setattr(conv.allocator, 'tcmalloc_loaded', lambda: True)
  assert conv.patch_bytes_per_chunk() == conv.CHUNK_BYTES_TCMALLOC
  # The default step's forward patches (512 views of 7x7x1152 floats) fit in
  # one chunk; a ResNet-18 CIFAR layer's (32x32x576 floats) is split.
  assert conv.num_chunks(512, 7 * 7 * 1152 * 4) == 1
  assert conv.num_chunks(512, 32 * 32 * 576 * 4) == 16


def test_num_chunks_divides_the_batch_and_bounds_the_chunk():
  assert conv.num_chunks(256, 1000, chunk_bytes=64_000) == 4    # 64 images of 1000 B
  assert conv.num_chunks(256, 10, chunk_bytes=1 << 20) == 1
  assert conv.num_chunks(6, 10 ** 9, chunk_bytes=1) == 2        # 6 = 2 * 3: powers of 2 only
  assert conv.num_chunks(7, 10 ** 9, chunk_bytes=1) == 1


@pytest.mark.parametrize('route,stride', [('im2col', 2), ('winograd', 1)])
def test_sharded_over_eight_devices_equals_one_device(route, stride):
  assert jax.device_count() == 8, 'tests/conftest.py sets 8 CPU devices'
  mesh = sharding.make_mesh()   # the training step's 1-D Auto mesh
  x = jax.random.normal(jax.random.key(0), (16, 14, 14, 8), jnp.float32)
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 8, 16), jnp.float32) / 8

  def loss(x, w):
    y = ROUTE_FUNCTIONS[route](x, w, (stride, stride), 'SAME', dimension_numbers=NHWC)
    return jnp.mean(jnp.square(y - jnp.mean(y, 0)))   # a batch statistic: global under jit

  value, grads = jax.jit(jax.value_and_grad(loss, (0, 1)))(x, kernel)
  xs = jax.device_put(x, NamedSharding(mesh, P('data')))
  ws = jax.device_put(kernel, NamedSharding(mesh, P()))
  value_8, grads_8 = jax.jit(jax.value_and_grad(loss, (0, 1)))(xs, ws)
  np.testing.assert_allclose(value_8, value, rtol=1e-5)
  for a, b in zip(grads_8, grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_unsupported_cases_fall_back_to_lax_conv():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4), jnp.float32)
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 2, 4), jnp.float32)
  grouped = dict(window_strides=(1, 1), padding='SAME', dimension_numbers=NHWC,
                 feature_group_count=2)
  np.testing.assert_allclose(conv.conv_general_dilated(x, kernel, **grouped),
                             lax.conv_general_dilated(x, kernel, **grouped), rtol=1e-6)


def test_route_names():
  assert conv.resolve_route('auto') == ('winograd' if jax.default_backend() == 'cpu' else 'lax')
  assert conv.conv_function('lax') is lax.conv_general_dilated
  assert conv.conv_function('im2col') is conv.conv_general_dilated
  assert conv.conv_function('winograd') is conv.conv_general_dilated_winograd
  with pytest.raises(ValueError, match="conv_route must be one of"):
    conv.resolve_route('fft')


def test_winograd_route_takes_only_the_layers_it_supports():
  f32 = jnp.float32
  assert winograd.supports((2, 7, 7, 128), (3, 3, 128, 256), (1, 1), ((1, 1), (1, 1)), f32)
  assert not winograd.supports((2, 28, 28, 1), (3, 3, 1, 32), (1, 1), ((1, 1), (1, 1)), f32)
  assert not winograd.supports((2, 14, 14, 32), (3, 3, 32, 64), (2, 2), ((1, 1), (1, 1)), f32)
  assert not winograd.supports((2, 7, 7, 128), (1, 1, 128, 256), (1, 1), ((0, 0), (0, 0)), f32)
  assert not winograd.supports((2, 7, 7, 128), (3, 3, 128, 256), (1, 1), ((1, 1), (1, 1)),
                               jnp.bfloat16)


@pytest.mark.parametrize('name,stem,size', [
    # BasicBlock (ResNet-18) and Bottleneck (ResNet-50) blocks, both stems, an odd size.
    ('small_cnn', 'cifar', 28), ('resnet18', 'imagenet', 17),
    ('resnet50', 'imagenet', 32)])
def test_encoders_give_the_same_outputs_and_gradients_on_every_route(name, stem, size):
  def make(route):
    # dtype None: compute in the inputs' dtype (float64 below), not float32.
    encoder = ml_collections.ConfigDict(dict(name=name, stem=stem, width=0.125))
    return models.create_encoder(encoder, 3, nnx.Rngs(0), dtype=None, conv_route=route)

  # In float64 (parameters cast up): deep ResNets with
  # BatchNorm over 4 images at 1x1 resolution amplify float32 round-off of
  # either route into percent-level gradient differences.
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (4, size, size, 3), jnp.float64)
    results = {}
    # ResNet-50 (the Bottleneck block) against the Winograd route only, which
    # takes im2col for its strided and 1x1 layers: each route's float64 step
    # compiles for about 13 s of CI. ResNet-18 still checks im2col on its own.
    routes = ('lax', 'winograd') if name == 'resnet50' else ('lax', 'im2col', 'winograd')
    for route in routes:
      graphdef, params, stats = nnx.split(make(route), nnx.Param, nnx.BatchStat)
      params, stats = jax.tree.map(lambda a: a.astype(jnp.float64), (params, stats))

      def loss(params, graphdef=graphdef, stats=stats):
        model = nnx.merge(graphdef, params, stats, copy=True)
        return jnp.sum(jnp.square(model(x, train=True)))

      results[route] = jax.jit(jax.value_and_grad(loss))(params)
  v_lax, g_lax = results['lax']
  for route in routes[1:]:
    v_ours, g_ours = results[route]
    np.testing.assert_allclose(v_ours, v_lax, rtol=1e-10)
    # Same parameter tree on every route: checkpoints do not depend on the route.
    assert jax.tree.structure(g_ours) == jax.tree.structure(g_lax)
    # Absolute tolerance relative to the largest gradient entry: some leaves are
    # analytically zero (biases of Linear layers that BatchNorm follows).
    scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(g_lax))
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_lax)):
      np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9 * scale)


def test_frozen_features_take_the_route_fastest_forward_and_equal_lax_conv():
  assert conv.inference_function('lax') is lax.conv_general_dilated
  for route in ('winograd', 'winograd7', 'im2col'):
    assert conv.inference_function(route) is conv.conv_general_dilated_inference
  # Per layer: the 1-channel stem by lax.conv, 3x3 stride 1 by Winograd (F(7x7)
  # at 7x7), stride 2 by im2col; each equal to lax.conv in float64.
  layers = [((2, 28, 28, 1), (3, 3, 1, 32), 1, 'conv_general_dilated'),
            ((2, 28, 28, 32), (3, 3, 32, 64), 2, 'ssl_jax_cpu_conv_route'),
            ((2, 7, 7, 128), (3, 3, 128, 512), 1, 'ssl_jax_cpu_conv_route')]
  with jax.enable_x64(True):
    for x_shape, w_shape, stride, marker in layers:
      x = jax.random.normal(jax.random.key(1), x_shape, jnp.float64)
      w = jax.random.normal(jax.random.key(2), w_shape, jnp.float64)
      args = ((stride, stride), 'SAME')
      kwargs = dict(dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      ours = jax.jit(lambda x, w: conv.conv_general_dilated_inference(x, w, *args, **kwargs))
      want = lax.conv_general_dilated(x, w, *args, **kwargs)
      np.testing.assert_allclose(ours(x, w), want, rtol=1e-10, atol=1e-10)
      text = ours.lower(x, w).as_text()
      if marker == 'conv_general_dilated':
        assert 'stablehlo.convolution' in text and conv.CPU_ROUTE_SCOPE not in text
      else:
        assert 'stablehlo.convolution' not in text
