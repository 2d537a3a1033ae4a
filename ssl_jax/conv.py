"""2-D convolution as large matmuls (im2col) with a custom VJP, for CPUs.

Why: XLA's CPU convolutions run at a fraction of the machine's matmul rate
(about 23-40% of peak for the small CNN's layers on 2 cores), while one
matmul per layer reaches the peak. On CPU we therefore express every
convolution, forward and backward, as a patches-times-weights matmul:

  forward   y  [B, Ho, Wo, O] = patches(x)  [B, Ho, Wo, k*k*C] @ W [k*k*C, O]
  d weights dW [k*k*C, O]     = patches(x)^T @ dy     (the forward patches, reused)
  d input   dx [B, H, W, C]   = patches(dilate(dy)) [B, H, W, k*k*O] @ flip(W)^T [k*k*O, C]

The input gradient is itself a stride-1 convolution of the cotangent with the
spatially flipped, in/out-transposed kernel. A stride s is handled by
dilating the cotangent (s - 1 zeros between its entries, `lax.pad`'s interior
padding) rather than by scattering slices, so it is again one matmul.

`conv_general_dilated` has the signature of `jax.lax.conv_general_dilated`
and is handed to `nnx.Conv(conv_general_dilated=...)`: parameters, their
names, shapes and initialisers stay those of `nnx.Conv`, so checkpoints do
not depend on the route. On GPU and TPU, `lax.conv` (cuDNN, the TPU's
convolution units) stays the faster choice; `resolve_route('auto')` picks by
backend and `model.conv_route` can force either.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from ssl_jax import allocator

Array = jax.Array

ROUTES = ('auto', 'im2col', 'lax')
_NHWC = ('NHWC', 'HWIO', 'NHWC')


def resolve_route(route: str) -> str:
  """'auto' -> 'im2col' on CPU, 'lax' on GPU/TPU; checks the name."""
  if route not in ROUTES:
    raise ValueError(f'model.conv_route must be one of {ROUTES}, got {route!r}.')
  if route == 'auto':
    return 'im2col' if jax.default_backend() == 'cpu' else 'lax'
  return route


def conv_function(route: str):
  """The function to pass as `nnx.Conv(conv_general_dilated=...)` for a route."""
  return conv_general_dilated if resolve_route(route) == 'im2col' else lax.conv_general_dilated


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


def _phase_taps(n: int, k: int, s: int, lo: int, out: int):
  """Sub-pixel split of the input gradient along one axis.

  Input index i = s*m + r receives dy[o] * w[t] for o*s + t - lo = i, i.e.
  taps t = r + lo (mod s) at cotangent offset d = (r + lo - t) / s: for each
  phase r, dx[s*m + r] = sum_t dy[m + d_t] w[t], a stride-1 correlation of
  the undilated cotangent. This equals correlating the dilated cotangent
  with the flipped kernel, without the s - 1 of every s zero rows.

  Returns (phases, size, pre, post): phases[r] = [(t, d_t), ...], size =
  ceil(n / s) rows per phase, and the zero padding of dy so that every
  m + d_t for m < size is a valid index.
  """
  size = -(-n // s)
  phases = [[(t, (r + lo - t) // s) for t in range(k) if (t - r - lo) % s == 0]
            for r in range(s)]
  offsets = [d for taps in phases for _, d in taps] or [0]
  pre = max(0, -min(offsets))
  post = max(0, size - 1 + max(offsets) - (out - 1))
  return phases, size, pre, post


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


def _conv2d_fwd(x, w, strides, pads):
  kh, kw, c, o = w.shape
  batch, h, wd, _ = x.shape
  ho, wo = _out_size(h, kh, strides[0], pads[0]), _out_size(wd, kw, strides[1], pads[1])
  w_mat = w.reshape(kh * kw * c, o)

  def chunk(arrays, carry):
    return [_matmul(patches(arrays[0], (kh, kw), strides, pads), w_mat)], carry

  chunks = num_chunks(batch, ho * wo * kh * kw * c * x.dtype.itemsize)
  (y,), _ = _chunked(chunk, [x], [jax.ShapeDtypeStruct((batch, ho, wo, o), x.dtype)], chunks)
  # The input, not the patches, is the residual: the backward pass rebuilds
  # each chunk's patches in cache, which costs less than writing 9x the
  # activations to memory and reading them back.
  return y, (x, w)


def _conv2d_bwd(strides, pads, residuals, dy):
  x, w = residuals
  kh, kw, c, o = w.shape
  batch, h, wd, _ = x.shape
  ho, wo = dy.shape[1:3]
  ph, size_h, pre_h, post_h = _phase_taps(h, kh, strides[0], pads[0][0], ho)
  pw, size_w, pre_w, post_w = _phase_taps(wd, kw, strides[1], pads[1][0], wo)
  sh, sw = strides
  # One weight matrix per phase: rows ordered (tap_h, tap_w, o) like patches().
  w_t = w.transpose(0, 1, 3, 2)  # [kh, kw, O, C]
  phase_weights = {
      (rh, rw): jnp.stack([w_t[th, tw] for th, _ in ph[rh] for tw, _ in pw[rw]]).reshape(-1, c)
      for rh in range(sh) for rw in range(sw) if ph[rh] and pw[rw]}

  def chunk(arrays, dw):
    x_c, dy_c = arrays
    # dW = patches^T @ dy, contracting batch and both spatial axes.
    cols = patches(x_c, (kh, kw), strides, pads)
    dw = dw + lax.dot_general(cols.reshape(-1, cols.shape[-1]), dy_c.reshape(-1, o),
                              (((0,), (0,)), ((), ())))
    dy_pad = jnp.pad(dy_c, ((0, 0), (pre_h, post_h), (pre_w, post_w), (0, 0)))
    rows = []
    for rh in range(sh):
      cols_of_row = []
      for rw in range(sw):
        if (rh, rw) not in phase_weights:  # no tap reaches this phase (1x1, stride 2)
          cols_of_row.append(jnp.zeros((dy_c.shape[0], size_h, size_w, c), dy_c.dtype))
          continue
        windows = [dy_pad[:, pre_h + dh:pre_h + dh + size_h, pre_w + dw_:pre_w + dw_ + size_w]
                   for _, dh in ph[rh] for _, dw_ in pw[rw]]
        phase_cols = windows[0] if len(windows) == 1 else jnp.concatenate(windows, -1)
        cols_of_row.append(_matmul(phase_cols, phase_weights[(rh, rw)]))
      rows.append(jnp.stack(cols_of_row, 3))        # [b, size_h, sw, size_w, C]
    dx_c = jnp.stack(rows, 2)                        # [b, size_h, sh, size_w, sw, C]
    dx_c = dx_c.reshape(dx_c.shape[0], size_h * sh, size_w * sw, c)[:, :h, :wd]
    return [dx_c], dw

  chunks = num_chunks(batch, h * wd * kh * kw * o * x.dtype.itemsize // (sh * sw))
  (dx,), dw = _chunked(chunk, [x, dy], [jax.ShapeDtypeStruct(x.shape, x.dtype)], chunks,
                       carry=jnp.zeros((kh * kw * c, o), jnp.float32))
  return dx, dw.reshape(w.shape).astype(w.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv_general_dilated(lhs: Array, rhs: Array, window_strides, padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None,
                         out_sharding=None) -> Array:
  """`lax.conv_general_dilated` through im2col for the NHWC 2-D case.

  Handles what the encoders use: NHWC inputs, HWIO kernels, any strides,
  'SAME' / 'VALID' / explicit padding, no dilation, one feature group.
  Anything else is passed on to `lax.conv_general_dilated` unchanged.
  """
  dilated = any(d != 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
  nhwc = lhs.ndim == 4 and rhs.ndim == 4 and dimension_numbers is not None and (
      lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if (not nhwc
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
  return conv2d(lhs, rhs.astype(lhs.dtype), strides, pads)
