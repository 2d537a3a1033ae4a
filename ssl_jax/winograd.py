"""3x3 stride-1 convolution by Winograd's minimal filtering F(4x4, 3x3), for CPUs.

Why: after im2col (ssl_jax/conv.py) the small CNN's step is mostly matmuls
already running near the machine's peak, and most of their FLOPs are in 3x3
stride-1 layers. Winograd's algorithm (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", CVPR 2016) computes each 4x4 output tile
from a 6x6 input tile with 36 multiplies per (channel in, channel out) pair,
where direct convolution needs 4*4*9 = 144:

  Y = A^T [ (G g G^T) * (B^T d B) ] A          g [3, 3], d [6, 6], Y [4, 4]

Over a batch the elementwise product `*` becomes 36 independent matmuls,
one per position (p, q) of the 6x6 transformed tile:

  V [36, T, C] = (B^T (x) B^T) tiles(x)          T = batch * tiles
  U [36, C, O] = (G (x) G) w
  M [36, T, O] = V @ U                           (a batched matmul)
  y            = untile((A^T (x) A^T) M)

and the backward pass is the same three steps transposed (`_bwd`): 4x fewer
matmul FLOPs than im2col for the input and weight gradients as well. The
transforms are Kronecker-product matrices applied as small matmuls over the
36 (or 16) tile positions: one pass over memory each.

Interpolation points. The matrices follow from the Toom-Cook construction
with points (0, 1, -1, 2, -1/2) and infinity (`_matrices`). Lavin & Gray use
(0, 1, -1, 2, -2); measured on the small CNN's last layer in float32 against
a float64 reference, (0, 1, -1, 2, -1/2) has the lowest error of the sets
tried: RMS relative error 1.5e-6 in y (direct float32: 3.6e-7), 2.0e-6 in
both gradients. F(2x2, 3x3) is as exact as direct convolution but does
2.25x the multiplies of F(4x4, 3x3) and was 1.5x slower there.

F(7x7, 3x3) for 7x7 outputs. A layer whose output is 7x7 (the small CNN's
last layer) needs 2x2 tiles of F(4x4, 3x3), 8x8 outputs for 49: 4 * 36 = 144
transformed positions per image. One 7x7 tile of F(7x7, 3x3) (9x9 input
tiles, 81 positions) covers it exactly: 1.8x fewer multiplies and 1.8x less
memory for the transformed input and product, which is what the layer's time
goes to. The price is round-off: its 8 finite interpolation points
(0, 1, -1, 2, -2, 1/2, -1/2, 1/4) give an RMS relative error of about 4e-5
in float32 (9.5e-5 in the input gradient), against 1.5e-6 for F(4x4, 3x3)
and about 2e-3 for bfloat16 operands (TPU's default matmul precision).
`choose_tile` takes F(7x7) only where it needs at least 1.5x fewer positions
than F(4x4) (7x7 and 14x14 outputs), and only on the opt-in route 'winograd7'
(ssl_jax/conv.py): it made the default run 1.18x faster, with linear accuracy
+0.01 +- 0.25 points and kNN-20 -0.16 +- 0.16 over eight paired seeds
(docs/speed.md): a 0.3-point kNN-20 loss is not excluded, so it is not the default.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

TILE = 4                     # output tile side m of F(m x m, 3 x 3), the general choice
KERNEL = 3                   # filter side r
POINTS = (0, 1, -1, 2, Fraction(-1, 2))   # finite interpolation points; plus infinity
# F(7x7, 3x3): 8 finite points. Of the sets tried on the small CNN's last layer
# (the eighth point 3, 1/4 or -3/2), 1/4 had the lowest float32 error.
POINTS_7 = (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2), Fraction(1, 4))
TILES = (4, 7)


def _matrices(points: Sequence, r: int = KERNEL):
  """Toom-Cook matrices (A^T [m, n], G [n, r], B^T [n, n]) of F(m, r), n = m + r - 1.

  For finite points a_k (k < n - 1) and the point at infinity:
    A^T[i, k] = a_k^i                     (infinity: e_{m-1})
    G[k, j]   = a_k^j / f_k,  f_k = prod_{l != k} (a_k - a_l)   (infinity: e_{r-1})
    B^T[k]    = ascending coefficients of prod_{l != k} (x - a_l)
                (infinity: of prod_l (x - a_l))
  so that A^T [(G g) * (B^T d)] is the correlation sum_j g_j d_{i+j}, exactly
  in rational arithmetic (checked in tests/conv_test.py).
  """
  a = [Fraction(p) for p in points]
  n = len(a) + 1
  m = n - r + 1

  def poly(roots):
    coefs = [Fraction(1)]                      # ascending
    for root in roots:
      coefs = [Fraction(0)] + coefs            # * x
      for i in range(len(coefs) - 1):
        coefs[i] -= root * coefs[i + 1]        # - root * (previous)
    return coefs + [Fraction(0)] * (n - len(coefs))

  at = [[p ** i for p in a] + [Fraction(int(i == m - 1))] for i in range(m)]
  f = [math.prod(ak - al for al in a if al != ak) for ak in a]
  g = [[ak ** j / fk for j in range(r)] for ak, fk in zip(a, f)]
  g.append([Fraction(int(j == r - 1)) for j in range(r)])
  bt = [poly([al for al in a if al != ak]) for ak in a] + [poly(a)]
  return tuple(np.array(mat, dtype=object) for mat in (at, g, bt))


def _kron(mat) -> np.ndarray:
  """The 2-D transform X -> mat X mat^T as one matrix on row-major flattened X."""
  return np.kron(mat, mat).astype(np.float64)


class Transform(NamedTuple):
  """The three 2-D transforms of F(m x m, 3 x 3) as matrices on flattened tiles."""
  tile: int                  # m: output tile side
  n: int                     # m + 2: input tile side
  k_in: np.ndarray           # [n*n, n*n]: d (a, b) -> V (p, q)
  k_filter: np.ndarray       # [n*n, 9]:   g (i, j) -> U (p, q)
  k_out: np.ndarray          # [m*m, n*n]: M (p, q) -> Y (i, j)


def _transform(points) -> Transform:
  at, g, bt = _matrices(points)
  return Transform(at.shape[0], at.shape[1], _kron(bt), _kron(g), _kron(at))


TRANSFORMS = {4: _transform(POINTS), 7: _transform(POINTS_7)}
assert all(TRANSFORMS[m].tile == m for m in TILES)


def choose_tile(out_hw, tiles: Sequence[int] = TILES) -> int:
  """The output tile side for a layer with output out_hw: 4 unless 7 is allowed
  and needs at least 1.5x fewer transformed positions (n^2 per tile) per image."""
  def positions(m):
    return (m + KERNEL - 1) ** 2 * _tiles(out_hw[0], m) * _tiles(out_hw[1], m)
  if 7 in tiles and positions(4) >= 1.5 * positions(7):
    return 7
  return 4


def _apply(matrix: np.ndarray, x: Array) -> Array:
  """matrix [P, A] applied over the leading axis of x [A, ...] -> [P, ...]: one matmul."""
  k = jnp.asarray(matrix, x.dtype)
  out = lax.dot_general(k, x.reshape(x.shape[0], -1), (((1,), (0,)), ((), ())))
  return out.reshape((matrix.shape[0],) + x.shape[1:])


def _tiles(size: int, tile: int) -> int:
  return -(-size // tile)


def _input_transform(x: Array, pads, out_hw, t: Transform) -> Array:
  """x [B, H, W, C] -> V [n*n, B * th * tw, C], th x tw tiles of m x m outputs."""
  batch, h, w, c = x.shape
  m, n = t.tile, t.n
  th, tw = _tiles(out_hw[0], m), _tiles(out_hw[1], m)
  # Padded so that every tile's n x n window exists: m * tiles + 2 rows.
  x = lax.pad(x, jnp.zeros((), x.dtype), (
      (0, 0, 0), (pads[0][0], m * th + 2 - h - pads[0][0], 0),
      (pads[1][0], m * tw + 2 - w - pads[1][0], 0), (0, 0, 0)))
  d = jnp.stack([x[:, i:i + m * th:m, j:j + m * tw:m, :]
                 for i in range(n) for j in range(n)])        # [n*n, B, th, tw, C]
  return _apply(t.k_in, d).reshape(n * n, batch * th * tw, c)


def _input_transform_t(dv: Array, x_shape, pads, out_hw, t: Transform) -> Array:
  """The adjoint of `_input_transform`: dV [n*n, T, C] -> dx [B, H, W, C].

  (B^T (x) B^T)^T maps dV back to n x n tiles, which overlap by 2 rows and
  columns: they are added into place one axis at a time, with n pads
  (interior padding m - 1) summed per axis, not n*n.
  """
  batch, h, w, c = x_shape
  m, n = t.tile, t.n
  th, tw = _tiles(out_hw[0], m), _tiles(out_hw[1], m)
  hp, wp = m * th + 2, m * tw + 2
  d = _apply(t.k_in.T, dv).reshape(n, n, batch, th, tw, c)
  zero = jnp.zeros((), dv.dtype)
  rows = None                                            # [n (i), B, th, wp, C]
  for j in range(n):
    tap = lax.pad(d[:, j], zero, ((0, 0, 0), (0, 0, 0), (0, 0, 0),
                                  (j, wp - j - (tw - 1) * m - 1, m - 1), (0, 0, 0)))
    rows = tap if rows is None else rows + tap
  out = None                                             # [B, hp, wp, C]
  for i in range(n):
    tap = lax.pad(rows[i], zero, ((0, 0, 0), (i, hp - i - (th - 1) * m - 1, m - 1),
                                  (0, 0, 0), (0, 0, 0)))
    out = tap if out is None else out + tap
  return out[:, pads[0][0]:pads[0][0] + h, pads[1][0]:pads[1][0] + w]


def _output_transform(prod: Array, batch: int, out_hw, t: Transform) -> Array:
  """M [n*n, B * th * tw, O] -> y [B, Ho, Wo, O]."""
  m = t.tile
  th, tw = _tiles(out_hw[0], m), _tiles(out_hw[1], m)
  y = _apply(t.k_out, prod).reshape(m, m, batch, th, tw, -1)
  y = y.transpose(2, 3, 0, 4, 1, 5).reshape(batch, m * th, m * tw, -1)
  return y[:, :out_hw[0], :out_hw[1]]


def _output_transform_t(dy: Array, t: Transform) -> Array:
  """The adjoint of `_output_transform`: dy [B, Ho, Wo, O] -> dM [n*n, T, O]."""
  batch, ho, wo, o = dy.shape
  m = t.tile
  th, tw = _tiles(ho, m), _tiles(wo, m)
  dy = jnp.pad(dy, ((0, 0), (0, m * th - ho), (0, m * tw - wo), (0, 0)))
  dy = dy.reshape(batch, th, m, tw, m, o).transpose(2, 4, 0, 1, 3, 5)
  return _apply(t.k_out.T, dy.reshape(m * m, batch * th * tw, o))


def _filter_transform(w: Array, t: Transform) -> Array:
  """w [3, 3, C, O] -> U [n*n, C, O]."""
  return _apply(t.k_filter, w.reshape((KERNEL * KERNEL,) + w.shape[2:]))


def _batched_matmul(a: Array, b: Array, contract_a: int, contract_b: int) -> Array:
  """Per tile position (leading axis): a[p] contracted with b[p]."""
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((0,), (0,))))


def output_hw(x_shape, pads):
  """(Ho, Wo) of a 3x3 stride-1 convolution of x_shape [B, H, W, C] with explicit pads."""
  return tuple(x_shape[1 + i] + pads[i][0] + pads[i][1] - KERNEL + 1 for i in range(2))


def supports(x_shape, w_shape, strides, pads, dtype) -> bool:
  """Whether `conv3x3` computes this convolution (else use im2col).

  3x3 kernels at stride 1 with non-negative padding, in float32 or float64:
  in bfloat16 or float16 the transforms' round-off (entries up to 8 in A^T)
  would swamp the result. Layers with fewer than 8 input or output channels
  (the stem on RGB or grey images) gain nothing: their matmuls are thin and
  the transforms, not the multiplies, would cost the time.
  """
  kh, kw, c, o = w_shape
  return (kh == kw == KERNEL and tuple(strides) == (1, 1)
          and min(p for pair in pads for p in pair) >= 0
          and jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))
          and min(c, o) >= 8 and min(output_hw(x_shape, pads)) >= 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv3x3(x: Array, w: Array, pads: tuple[tuple[int, int], tuple[int, int]],
            tile: int = TILE) -> Array:
  """Cross-correlation of x [B, H, W, C] with w [3, 3, C, O] at stride 1 -> [B, Ho, Wo, O].

  Equal, up to float round-off, to `lax.conv_general_dilated(x, w, (1, 1),
  pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))`; `pads` are explicit,
  non-negative ((top, bottom), (left, right)) pairs; `tile` (4 or 7) picks
  F(4x4, 3x3) or F(7x7, 3x3) (`choose_tile`).
  """
  y, _ = _fwd(x, w, pads, tile)
  return y


def _fwd(x, w, pads, tile=TILE):
  t = TRANSFORMS[tile]
  out_hw = output_hw(x.shape, pads)
  v = _input_transform(x, pads, out_hw, t)
  u = _filter_transform(w, t)
  y = _output_transform(_batched_matmul(v, u, 2, 1), x.shape[0], out_hw, t)
  # V, not x, is kept: rebuilding it costs a pass over x, keeping it 2.25x
  # x's memory for F(4x4) (36 / 16 values per output pixel) against im2col's 9x.
  return y, (v, u)


def _bwd(pads, tile, residuals, dy):
  """dx = B-transform^T(dM @ U^T), dw = G-transform^T(V^T @ dM), dM = A-transform^T(dy)."""
  t = TRANSFORMS[tile]
  v, u = residuals
  out_hw = dy.shape[1:3]
  x_shape = (dy.shape[0],) + tuple(out_hw[i] + KERNEL - 1 - sum(pads[i]) for i in range(2)) + (
      v.shape[-1],)
  dm = _output_transform_t(dy, t)                           # [n*n, T, O]
  dv = _batched_matmul(dm, u, 2, 2)                         # [n*n, T, C]
  du = _batched_matmul(v, dm, 1, 1)                         # [n*n, C, O]
  dx = _input_transform_t(dv, x_shape, pads, out_hw, t)
  dw = _apply(t.k_filter.T, du).reshape((KERNEL, KERNEL) + du.shape[1:])
  return dx, dw


conv3x3.defvjp(_fwd, _bwd)
