"""2-D convolution as large matmuls (im2col) with a custom VJP, for CPUs.

Why: XLA's CPU convolutions run at a fraction of the machine's matmul rate
(about 23-40% of peak for the small CNN's layers on 2 cores), while one
matmul per layer reaches the peak. On CPU we therefore express every
convolution, forward and backward, as a patches-times-weights matmul:

  forward   y  [B, Ho, Wo, O]   = patches(x) [B, Ho, Wo, k*k*C] @ W [k*k*C, O]
  d weights dW [k*k*C, O]       = patches(x)^T @ dy   (the forward patches, reused)
  d input   dx [B, H, W, C]     = col2im(dy [B, Ho, Wo, O] @ W^T [O, k*k*C])

The input gradient is one matmul of the cotangent with the transposed kernel,
whose k*k*C wide product is added back into place by `col2im`, the adjoint
of `patches`: k*k pads (a stride s is their interior padding, s - 1 zeros)
summed in one fused pass, not a scatter of slices. Patches of the cotangent
(the route of a transposed convolution) would be k*k*O wide and built by
copies; the small CNN's O is twice its C.

Routes (`model.conv_route`):
- 'winograd' (the CPU default): 3x3 stride-1 layers by Winograd's F(4x4, 3x3)
  (ssl_jax/winograd.py: 4x fewer matmul FLOPs), every other layer by im2col;
- 'winograd7': the same with F(7x7, 3x3) where the output is 7x7 or 14x14
  (`winograd.choose_tile`): the default run 1.18x faster, 25x more round-off,
  and over eight paired seeds kNN-20 accuracy -0.16 +- 0.16 points, an
  interval that does not exclude a 0.3-point loss (docs/speed.md), so opt-in;
- 'im2col': every layer by im2col;
- 'lax': `lax.conv_general_dilated`, the choice on GPU and TPU (cuDNN, the
  TPU's convolution units); 'auto' picks by backend.

Frozen features (the evaluation, the online probe's checks, `ssl_jax.embed`)
need no backward pass, so on CPU they take the route fastest forward,
`inference_function`, whatever the training route: thin-input layers by
`lax.conv`, 3x3 stride-1 layers by F(7x7) where it applies, the rest by
im2col (docs/speed.md). Its round-off (about 2e-5 of the largest feature)
matters to no probe; F(7x7)'s accuracy question is one of training.

The route functions have the signature of `jax.lax.conv_general_dilated` and
are handed to `nnx.Conv(conv_general_dilated=...)`: parameters, their names,
shapes and initialisers stay those of `nnx.Conv`, so checkpoints do not
depend on the route.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from ssl_jax import allocator
from ssl_jax import winograd

Array = jax.Array

ROUTES = ('auto', 'winograd', 'winograd7', 'im2col', 'lax')
_NHWC = ('NHWC', 'HWIO', 'NHWC')


CPU_ROUTE_SCOPE = 'ssl_jax_cpu_conv_route'
_TARGET_PLATFORMS: list[str] = []


@contextlib.contextmanager
def target_platform(platform: str):
  """Resolves 'auto' for `platform` ('cpu', 'tpu', 'cuda', ...) instead of this
  process's backend, while models are built inside: for lowering a step for an
  accelerator on a CPU-only machine (ssl_jax.lowering)."""
  _TARGET_PLATFORMS.append(platform)
  try:
    yield
  finally:
    _TARGET_PLATFORMS.pop()


def resolve_route(route: str) -> str:
  """'auto' -> 'winograd' on CPU, 'lax' on GPU/TPU; checks the name."""
  if route not in ROUTES:
    raise ValueError(f'model.conv_route must be one of {ROUTES}, got {route!r}.')
  if route == 'auto':
    backend = _TARGET_PLATFORMS[-1] if _TARGET_PLATFORMS else jax.default_backend()
    return 'winograd' if backend == 'cpu' else 'lax'
  return route


def conv_function(route: str):
  """The function to pass as `nnx.Conv(conv_general_dilated=...)` for a route."""
  return {'winograd': conv_general_dilated_winograd,
          'winograd7': conv_general_dilated_winograd7, 'im2col': conv_general_dilated,
          'lax': lax.conv_general_dilated}[resolve_route(route)]


def inference_function(route: str):
  """The convolution for frozen features of a model trained with `route`.

  Accelerators keep `lax.conv_general_dilated`. On CPU, per layer, what was
  fastest forward at the small CNN's evaluation batch (1,000 Fashion-MNIST
  images, 2-core EPYC at 465 GFLOP/s, ms per batch): the 1-channel stem by
  lax.conv (46 against im2col's 76), the stride-2 layers by im2col (82 and 38
  against lax's 101 and 59), the 7x7 128->512 layer by F(7x7) (156 against
  F(4x4)'s 227 and im2col's 203): the whole encoder 1.27x faster than the
  training route's forward.
  """
  if resolve_route(route) == 'lax':
    return lax.conv_general_dilated
  return conv_general_dilated_inference


def patches(x: Array, kernel_hw: tuple[int, int], strides: tuple[int, int],
            pads: Sequence[tuple[int, int]]) -> Array:
  """im2col: x [B, H, W, C] -> [B, Ho, Wo, kh*kw*C], features ordered (i, j, c).

  The (i, j, c) order is that of a HWIO kernel reshaped to [kh*kw*C, O].
  Built from kh*kw strided slices of the padded input and one concatenate.
  """
  kh, kw = kernel_hw
  sh, sw = strides
  x = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  ho = (x.shape[1] - kh) // sh + 1
  wo = (x.shape[2] - kw) // sw + 1
  if kh == kw == 1:
    return x[:, :(ho - 1) * sh + 1:sh, :(wo - 1) * sw + 1:sw, :]
  cols = [x[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw, :]
          for i in range(kh) for j in range(kw)]
  return jnp.concatenate(cols, axis=-1)


def _matmul(a: Array, b: Array) -> Array:
  """[..., K] @ [K, O] -> [..., O], a plain dot over the last axis."""
  return lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())))


# Bytes of patches built per loop iteration. Why it depends on the allocator
# (ssl_jax/allocator.py): with glibc's malloc every block over 32 MiB comes
# as fresh pages that fault in on each step, so one batch-wide patch matrix
# (9x the activations) costs more in page faults than it saves; chunks of
# 4-16 MiB stay under that size and in cache. With tcmalloc, which reuses
# freed memory, large chunks are fastest, but not one batch-wide chunk: XLA
# then keeps every layer's patches alive from the forward pass to the
# backward pass, and the ResNet-18 CIFAR step grew to 21 GB and was killed on
# a 24 GB machine. 128 MiB is as fast as one chunk on the default step, whose
# forward patches (116 MB per layer) still fit in one. Measured on 2 Xeon
# cores, default step, seconds (benchmarks/train_step.py):
#   glibc     8 MiB 0.721 | 128 MiB 0.749 | one chunk 0.853
#   tcmalloc  8 MiB 0.669 | 128 MiB 0.599 | one chunk 0.594
CHUNK_BYTES_GLIBC = 8 << 20
CHUNK_BYTES_TCMALLOC = 128 << 20
CHUNK_BYTES = None  # None: chosen by the allocator this process runs with


def patch_bytes_per_chunk() -> float:
  """The patch bytes per loop iteration: CHUNK_BYTES if set, else by allocator."""
  if CHUNK_BYTES is not None:
    return CHUNK_BYTES
  return CHUNK_BYTES_TCMALLOC if allocator.tcmalloc_loaded() else CHUNK_BYTES_GLIBC


def num_chunks(batch: int, bytes_per_image: int, chunk_bytes: Optional[float] = None) -> int:
  """The number of equal batch chunks (a power of 2 dividing `batch`) to loop over."""
  limit = patch_bytes_per_chunk() if chunk_bytes is None else chunk_bytes
  n = 1
  while batch % (2 * n) == 0 and (batch // n) * bytes_per_image > limit:
    n *= 2
  return n


def _chunked(fn, arrays: Sequence[Array], outs: Sequence[jax.ShapeDtypeStruct], chunks: int,
             carry=None):
  """Loops fn(chunk_arrays, carry) -> (chunk_outs, carry) over batch chunks.

  Each [B, ...] array is viewed as [B / chunks, chunks, ...] (a free reshape)
  and iteration i takes [:, i]: the images of a chunk are strided, but the
  leading, sharded batch axis stays whole, so under jit with the batch sharded
  over devices every device loops over its own images.
  """
  batch = arrays[0].shape[0]
  b = batch // chunks
  views = [a.reshape((b, chunks) + a.shape[1:]) for a in arrays]
  if chunks == 1:
    results, carry = fn([v[:, 0] for v in views], carry)
    return [r.reshape((batch,) + r.shape[1:]) for r in results], carry

  def body(i, state):
    buffers, carry = state
    results, carry = fn([lax.dynamic_index_in_dim(v, i, 1, keepdims=False) for v in views],
                        carry)
    buffers = [lax.dynamic_update_index_in_dim(buf, r, i, 1) for buf, r in zip(buffers, results)]
    return buffers, carry

  buffers = [jnp.zeros((b, chunks) + o.shape[1:], o.dtype) for o in outs]
  buffers, carry = lax.fori_loop(0, chunks, body, (buffers, carry))
  return [buf.reshape((batch,) + buf.shape[2:]) for buf in buffers], carry


def _out_size(n: int, k: int, s: int, pad: tuple[int, int]) -> int:
  return (n + pad[0] + pad[1] - k) // s + 1


def col2im(cols: Array, in_hw: tuple[int, int], strides: tuple[int, int],
           pads: Sequence[tuple[int, int]]) -> Array:
  """The adjoint of `patches`: cols [B, Ho, Wo, kh, kw, C] -> [B, H, W, C].

  Input pixel i (along one axis) receives cols[o, t] for every o*s + t - lo = i.
  Each tap t is one `lax.pad` of cols[:, :, :, th, tw]: low padding t - lo,
  interior padding s - 1 (the stride), high padding up to H (negative pads
  crop). XLA fuses the kh*kw pads and their sum into one elementwise pass over
  the output, with no scatter and no intermediate per tap.
  """
  _, ho, wo, kh, kw, _ = cols.shape
  h, w = in_hw
  (sh, sw), (lo_h, lo_w) = strides, (pads[0][0], pads[1][0])
  out = None
  for th in range(kh):
    for tw in range(kw):
      low_h, low_w = th - lo_h, tw - lo_w
      tap = lax.pad(cols[:, :, :, th, tw, :], jnp.zeros((), cols.dtype), (
          (0, 0, 0),
          (low_h, h - low_h - (ho - 1) * sh - 1, sh - 1),
          (low_w, w - low_w - (wo - 1) * sw - 1, sw - 1),
          (0, 0, 0)))
      out = tap if out is None else out + tap
  return out


def _saves_patches(chunks: int) -> bool:
  """Whether the forward pass keeps its patches for the weight gradient.

  When one chunk holds the whole batch's patches (the small CNN's layers under
  tcmalloc), keeping them costs their memory from the forward to the backward
  pass but saves rebuilding them. When the patches are chunked (large images
  or batches, glibc's small chunks; see CHUNK_BYTES) the backward pass
  rebuilds each chunk's patches instead: keeping them all is what made a
  ResNet-18 step outgrow a 24 GB machine.
  """
  return chunks == 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: Array, w: Array, strides: tuple[int, int],
           pads: tuple[tuple[int, int], tuple[int, int]]) -> Array:
  """Cross-correlation of x [B, H, W, C] with w [kh, kw, C, O] -> [B, Ho, Wo, O].

  Equal to `lax.conv_general_dilated(x, w, strides, pads,
  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))`; `pads` are explicit
  ((top, bottom), (left, right)) pairs.
  """
  y, _ = _conv2d_fwd(x, w, strides, pads)
  return y


def _patch_chunks(x_shape, w_shape, out_hw, itemsize) -> int:
  """The batch chunks of a layer: its patches, kh*kw*C per output pixel, bound the size."""
  kh, kw, c, _ = w_shape
  return num_chunks(x_shape[0], out_hw[0] * out_hw[1] * kh * kw * c * itemsize)


def _conv2d_fwd(x, w, strides, pads):
  kh, kw, c, o = w.shape
  batch, h, wd, _ = x.shape
  ho, wo = _out_size(h, kh, strides[0], pads[0]), _out_size(wd, kw, strides[1], pads[1])
  w_mat = w.reshape(kh * kw * c, o)
  chunks = _patch_chunks(x.shape, w.shape, (ho, wo), x.dtype.itemsize)
  if _saves_patches(chunks):
    cols = patches(x, (kh, kw), strides, pads)
    return _matmul(cols, w_mat), (x, cols, w)

  def chunk(arrays, carry):
    return [_matmul(patches(arrays[0], (kh, kw), strides, pads), w_mat)], carry

  (y,), _ = _chunked(chunk, [x], [jax.ShapeDtypeStruct((batch, ho, wo, o), x.dtype)], chunks)
  # The input, not the patches, is the residual: the backward pass rebuilds
  # each chunk's patches in cache.
  return y, (x, None, w)


def _conv2d_bwd(strides, pads, residuals, dy):
  """dW = patches(x)^T @ dy; dx = col2im(dy @ W^T).

  The input gradient multiplies the cotangent by the transposed kernel
  ([.., O] @ [O, kh*kw*C]: the forward matmul's FLOPs, strides included) and
  adds the products back into place with `col2im`. Its intermediate is
  kh*kw*C wide and written once by the matmul, where patches of the
  cotangent would be kh*kw*O wide and built by copies.
  """
  x, saved_cols, w = residuals
  kh, kw, c, o = w.shape
  h, wd = x.shape[1:3]
  ho, wo = dy.shape[1:3]
  w_t = w.reshape(kh * kw * c, o).T   # [O, kh*kw*C], columns ordered (i, j, c)

  def chunk(arrays, dw):
    x_c, dy_c = arrays[:2]
    cols = arrays[2] if saved_cols is not None else patches(x_c, (kh, kw), strides, pads)
    # dW = patches^T @ dy, contracting batch and both spatial axes.
    dw = dw + lax.dot_general(cols.reshape(-1, cols.shape[-1]), dy_c.reshape(-1, o),
                              (((0,), (0,)), ((), ())))
    dcols = _matmul(dy_c, w_t).reshape(dy_c.shape[0], ho, wo, kh, kw, c)
    return [col2im(dcols, (h, wd), strides, pads)], dw

  chunks = _patch_chunks(x.shape, w.shape, (ho, wo), x.dtype.itemsize)
  arrays = [x, dy] + ([saved_cols] if saved_cols is not None else [])
  (dx,), dw = _chunked(chunk, arrays, [jax.ShapeDtypeStruct(x.shape, x.dtype)], chunks,
                       carry=jnp.zeros((kh * kw * c, o), jnp.float32))
  return dx, dw.reshape(w.shape).astype(w.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv_general_dilated(lhs: Array, rhs: Array, window_strides, padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None,
                         out_sharding=None, *, winograd_tiles: Sequence[int] = (),
                         thin_input_by_lax: bool = False) -> Array:
  """`lax.conv_general_dilated` through im2col for the NHWC 2-D case (route 'im2col').

  Handles what the encoders use: NHWC inputs, HWIO kernels, any strides,
  'SAME' / 'VALID' / explicit padding, no dilation, one feature group.
  Anything else is passed on to `lax.conv_general_dilated` unchanged. With
  winograd_tiles (routes 'winograd' and 'winograd7'), the layers
  `winograd.supports` (3x3 kernels at stride 1, float32 or float64, at least
  8 channels in and out) go through Winograd instead, with the output tile
  `winograd.choose_tile` picks among winograd_tiles. thin_input_by_lax (the
  inference route): layers with fewer than 8 input channels, whose patches
  matmul is too thin to pay for building the patches, go to lax.conv.
  """
  dilated = any(d != 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
  nhwc = lhs.ndim == 4 and rhs.ndim == 4 and dimension_numbers is not None and (
      lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  thin = thin_input_by_lax and nhwc and rhs.shape[2] < 8
  if (not nhwc or thin
      or feature_group_count != 1 or batch_group_count != 1 or dilated
      or preferred_element_type is not None or out_sharding is not None):
    kwargs = {} if out_sharding is None else {'out_sharding': out_sharding}
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type, **kwargs)
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  else:
    pads = padding
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  rhs = rhs.astype(lhs.dtype)
  # The scope names the CPU routes in lowered programs (and profiles):
  # ssl_jax.lowering checks that an accelerator's step has none.
  with jax.named_scope(CPU_ROUTE_SCOPE):
    if winograd_tiles and winograd.supports(lhs.shape, rhs.shape, strides, pads, lhs.dtype):
      tile = winograd.choose_tile(winograd.output_hw(lhs.shape, pads), winograd_tiles)
      return winograd.conv3x3(lhs, rhs, pads, tile)
    return conv2d(lhs, rhs, strides, pads)


# Routes 'winograd' and 'winograd7': the same function with Winograd for the
# layers it supports, F(4x4, 3x3) only / F(4x4, 3x3) or F(7x7, 3x3).
conv_general_dilated_winograd = functools.partial(conv_general_dilated, winograd_tiles=(4,))
conv_general_dilated_winograd7 = functools.partial(conv_general_dilated,
                                                   winograd_tiles=winograd.TILES)
# The CPU's route for frozen features (`inference_function`): never differentiated.
conv_general_dilated_inference = functools.partial(
    conv_general_dilated, winograd_tiles=winograd.TILES, thin_input_by_lax=True)
