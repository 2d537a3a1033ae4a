"""Flax NNX encoders, projector and predictor: `create_model(config)`.

- ResNet-18/34/50 (He et al. 2016) with a CIFAR stem (3x3 conv, stride 1, no
  max-pool; solo-learn) or an ImageNet stem (7x7 stride 2 + max-pool), and a
  width multiplier.
- `small_cnn`: a 4-layer convolutional encoder for 28x28 inputs on a CPU.
- MLP heads from a spec such as '2048-2048-2048': Linear -> BatchNorm -> ReLU
  between layers, the last layer plain (without bias for the projector, as
  the official VICReg code; with bias for BYOL's predictor).

BatchNorm normalises over the batch axis of whatever array it sees; under
`jax.jit` on a batch sharded over the mesh that is the global batch (XLA
inserts the cross-device reduction), so no axis_name is needed.

Every module's `__call__` takes `train`: batch statistics and running-average
updates when True, running averages when False.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from ssl_jax import conv as conv_lib

Array = jax.Array


def parse_mlp_spec(spec: str | Sequence[int], what: str = 'MLP spec',
                   example: str = '2048-2048-2048') -> list[int]:
  """'2048-2048-256' -> [2048, 2048, 256], with a clear error."""
  if isinstance(spec, str):
    try:
      dims = [int(v) for v in spec.split('-')]
    except ValueError as error:
      raise ValueError(f"{what} must look like {example!r}, got {spec!r}.") from error
  else:
    dims = [int(v) for v in spec]
  if not dims or min(dims) <= 0:
    raise ValueError(f'{what} needs positive layer widths, got {spec!r}.')
  return dims


# Open recorders of ReLU activation patterns (diagnostics' locality check).
# They hold traced arrays only while a function is being traced under
# `record_relu_patterns`; training never opens one, so the step is unchanged.
_PATTERN_RECORDERS: list[list[Array]] = []


def relu(x: Array) -> Array:
  """nnx.relu; inside `record_relu_patterns` it also records the pattern x > 0."""
  if _PATTERN_RECORDERS:
    _PATTERN_RECORDERS[-1].append(x > 0)
  return nnx.relu(x)


@contextlib.contextmanager
def record_relu_patterns() -> Iterator[list[Array]]:
  """Collects the boolean activation pattern [B, ...] of every `relu` called inside.

  The list fills in call order: the network's linear region, layer by layer
  (docs/method.md section 1). Use it inside a traced function and return the
  patterns, or reductions of them, as outputs.
  """
  patterns: list[Array] = []
  _PATTERN_RECORDERS.append(patterns)
  try:
    yield patterns
  finally:
    _PATTERN_RECORDERS.pop()


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: Array, scale: Array, bias: Array, epsilon: float):
  """Training-mode BatchNorm over every axis but the last: (y, mean, var).

  x [..., F], scale and bias [F]; mean and var [F] are the batch statistics
  (var = E[x^2] - E[x]^2 clipped at 0, as nnx.BatchNorm's fast variance) and
  y = (x - mean) * (rsqrt(var + epsilon) * scale) + bias, nnx.BatchNorm's
  formula op for op. Why a custom VJP: autodiff of that formula takes
  several passes over x and dy; the closed form below takes one reduction
  (sum dy, sum dy * x_hat) and one elementwise pass (Ioffe & Szegedy 2015,
  section 3): about 5% of the default CPU step.
  """
  return _batch_norm_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_fwd(x, scale, bias, epsilon):
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axes)
  var = jnp.maximum(jnp.mean(x * x, axes) - mean * mean, 0)
  rstd = lax.rsqrt(var + epsilon)
  y = (x - mean) * (rstd * scale) + bias
  return (y, mean, var), (x, mean, var, rstd, scale)


def _batch_norm_bwd(epsilon, residuals, cotangents):
  """dx = scale * rstd * (dy - (sum dy + x_hat * sum(dy * x_hat)) / n), plus the
  statistics' own cotangents (zero in training, where they only feed the
  running averages under stop_gradient)."""
  del epsilon
  x, mean, var, rstd, scale = residuals
  dy, dmean, dvar = cotangents
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  centred = x - mean
  x_hat = centred * rstd
  dbias = jnp.sum(dy, axes)
  dscale = jnp.sum(dy * x_hat, axes)
  # var's clip at 0 passes no gradient where it is active.
  dvar = jnp.where(var > 0, dvar, 0)
  dx = (scale * rstd) * (dy - (dbias + x_hat * dscale) / n) + (dmean + 2 * dvar * centred) / n
  return dx, dscale, dbias


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


class BatchNorm(nnx.BatchNorm):
  """nnx.BatchNorm whose training mode runs `batch_norm_train` (a hand-written VJP).

  The same variables (scale, bias; mean, var), running-average updates and
  values as nnx.BatchNorm, so checkpoints are unchanged. Settings the fast
  path does not cover (inference, masks, an axis_name, a feature axis other
  than the last, dtypes other than float32, the slow variance) go to
  nnx.BatchNorm itself.
  """

  def __call__(self, x, use_running_average: Optional[bool] = None, *, mask=None):
    if (use_running_average is not False or mask is not None or self.axis_name is not None
        or self.axis not in (-1, x.ndim - 1) or not self.use_fast_variance
        or self.scale is None or self.bias is None or x.dtype != jnp.float32
        or jnp.dtype(self.dtype or jnp.float32) != jnp.float32
        or self.scale[...].dtype != jnp.float32):
      return super().__call__(x, use_running_average, mask=mask)
    y, mean, var = batch_norm_train(x, self.scale[...], self.bias[...], self.epsilon)
    self.mean[...] = lax.stop_gradient(self.momentum * self.mean[...] + (1 - self.momentum) * mean)
    self.var[...] = lax.stop_gradient(self.momentum * self.var[...] + (1 - self.momentum) * var)
    return y


def _bn(features, rngs, dtype):
  # momentum 0.9 = torch's BatchNorm momentum 0.1.
  return BatchNorm(features, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs)


class MLP(nnx.Module):
  """Linear-BN-ReLU blocks, then a last Linear (bias optional)."""

  def __init__(self, in_features: int, spec, *, last_bias: bool, rngs: nnx.Rngs,
               dtype: Any = None):
    dims = parse_mlp_spec(spec)
    self.hidden = nnx.List()
    self.norms = nnx.List()
    for width in dims[:-1]:
      self.hidden.append(nnx.Linear(in_features, width, dtype=dtype, rngs=rngs))
      self.norms.append(_bn(width, rngs, dtype))
      in_features = width
    self.out = nnx.Linear(in_features, dims[-1], use_bias=last_bias, dtype=dtype, rngs=rngs)
    self.out_features = dims[-1]

  def __call__(self, x: Array, train: bool) -> Array:
    for linear, norm in zip(self.hidden, self.norms):
      x = relu(norm(linear(x), use_running_average=not train))
    return self.out(x)


def _conv(in_ch, out_ch, kernel, stride, rngs, dtype, conv_fn, padding='SAME'):
  """A bias-free nnx.Conv whose convolution is `conv_fn`.

  conv_fn is `lax.conv_general_dilated` or one of ssl_jax.conv's CPU routes
  (model.conv_route); the parameters are nnx.Conv's either way.
  """
  return nnx.Conv(in_ch, out_ch, (kernel, kernel), stride, padding=padding, use_bias=False,
                  dtype=dtype, rngs=rngs, conv_general_dilated=conv_fn)


def _torch_conv(in_ch, out_ch, kernel, stride, rngs, dtype, conv_fn):
  """`_conv` padded as PyTorch pads: kernel // 2 on every side.

  XLA's 'SAME' pads a stride-2 convolution of an even-sized input (0, 1) where
  PyTorch pads (1, 1) (3x3) or (3, 3) where 'SAME' pads (2, 3) (7x7), so the
  same weights computed different features; with PyTorch's padding, an
  exported ResNet (ssl_jax.export) computes in torchvision what it computes
  here. Stride-1 odd kernels pad the same either way.
  """
  pad = kernel // 2
  return _conv(in_ch, out_ch, kernel, stride, rngs, dtype, conv_fn,
               padding=((pad, pad), (pad, pad)))


def _projection_shortcut(in_ch, out_ch, stride, rngs, dtype, conv_fn):
  """(1x1 conv, BatchNorm) when the residual changes shape, else (None, None).

  Blocks assign the pair once: NNX treats an attribute first set to None as
  static, so it could not later hold a module.
  """
  if stride == 1 and in_ch == out_ch:
    return None, None
  return _torch_conv(in_ch, out_ch, 1, stride, rngs, dtype, conv_fn), _bn(out_ch, rngs, dtype)


class BasicBlock(nnx.Module):
  expansion = 1

  def __init__(self, in_ch, ch, stride, *, rngs, dtype, conv_fn):
    self.conv1 = _torch_conv(in_ch, ch, 3, stride, rngs, dtype, conv_fn)
    self.bn1 = _bn(ch, rngs, dtype)
    self.conv2 = _torch_conv(ch, ch, 3, 1, rngs, dtype, conv_fn)
    self.bn2 = _bn(ch, rngs, dtype)
    self.shortcut, self.shortcut_bn = _projection_shortcut(in_ch, ch, stride, rngs, dtype,
                                                           conv_fn)

  def __call__(self, x, train):
    ura = not train
    y = relu(self.bn1(self.conv1(x), use_running_average=ura))
    y = self.bn2(self.conv2(y), use_running_average=ura)
    if self.shortcut is not None:
      x = self.shortcut_bn(self.shortcut(x), use_running_average=ura)
    return relu(x + y)


class Bottleneck(nnx.Module):
  expansion = 4

  def __init__(self, in_ch, ch, stride, *, rngs, dtype, conv_fn):
    out_ch = ch * 4
    self.conv1 = _torch_conv(in_ch, ch, 1, 1, rngs, dtype, conv_fn)
    self.bn1 = _bn(ch, rngs, dtype)
    self.conv2 = _torch_conv(ch, ch, 3, stride, rngs, dtype, conv_fn)
    self.bn2 = _bn(ch, rngs, dtype)
    self.conv3 = _torch_conv(ch, out_ch, 1, 1, rngs, dtype, conv_fn)
    self.bn3 = _bn(out_ch, rngs, dtype)
    self.shortcut, self.shortcut_bn = _projection_shortcut(in_ch, out_ch, stride, rngs, dtype,
                                                           conv_fn)

  def __call__(self, x, train):
    ura = not train
    y = relu(self.bn1(self.conv1(x), use_running_average=ura))
    y = relu(self.bn2(self.conv2(y), use_running_average=ura))
    y = self.bn3(self.conv3(y), use_running_average=ura)
    if self.shortcut is not None:
      x = self.shortcut_bn(self.shortcut(x), use_running_average=ura)
    return relu(x + y)


RESNETS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
           50: (Bottleneck, (3, 4, 6, 3))}


class ResNet(nnx.Module):
  """ResNet encoder returning globally average-pooled features [B, F]."""

  def __init__(self, depth: int, in_channels: int, *, stem: str = 'cifar',
               width: float = 1.0, rngs: nnx.Rngs, dtype: Any = None,
               conv_fn=lax.conv_general_dilated):
    if depth not in RESNETS:
      raise ValueError(f'ResNet depth must be one of {sorted(RESNETS)}, got {depth}.')
    if stem not in ('cifar', 'imagenet'):
      raise ValueError(f"ResNet stem must be 'cifar' or 'imagenet', got {stem!r}.")
    block, counts = RESNETS[depth]
    base = max(1, int(64 * width))
    self.stem = stem
    if stem == 'cifar':
      self.conv = _torch_conv(in_channels, base, 3, 1, rngs, dtype, conv_fn)
    else:
      self.conv = _torch_conv(in_channels, base, 7, 2, rngs, dtype, conv_fn)
    self.bn = _bn(base, rngs, dtype)
    self.blocks = nnx.List()
    in_ch = base
    for stage, count in enumerate(counts):
      ch = base * 2 ** stage
      for i in range(count):
        stride = 2 if (stage > 0 and i == 0) else 1
        self.blocks.append(block(in_ch, ch, stride, rngs=rngs, dtype=dtype, conv_fn=conv_fn))
        in_ch = ch * block.expansion
    self.out_features = in_ch

  def __call__(self, x, train):
    x = relu(self.bn(self.conv(x), use_running_average=not train))
    if self.stem == 'imagenet':
      # PyTorch's max-pool padding (1 on every side), as for the convolutions.
      x = nnx.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for block in self.blocks:
      x = block(x, train)
    return jnp.mean(x, axis=(1, 2))


class SmallCNN(nnx.Module):
  """Conv(3x3)-BN-ReLU x4, strides 1-2-2-1, global average pool: for 28x28 on a CPU.

  channels: the four layers' widths before the width multiplier, 32-64-128-256
  by default; the output has channels[-1] * width features.
  """

  CHANNELS = (32, 64, 128, 256)

  def __init__(self, in_channels: int, *, width: float = 1.0, rngs: nnx.Rngs,
               dtype: Any = None, conv_fn=lax.conv_general_dilated,
               channels: Sequence[int] = CHANNELS):
    if len(channels) != 4:
      raise ValueError(f'small_cnn has 4 conv layers; channels needs 4 widths, got {channels}.')
    chans = [max(1, int(c * width)) for c in channels]
    strides = (1, 2, 2, 1)
    self.convs = nnx.List()
    self.norms = nnx.List()
    for ch, stride in zip(chans, strides):
      self.convs.append(_conv(in_channels, ch, 3, stride, rngs, dtype, conv_fn))
      self.norms.append(_bn(ch, rngs, dtype))
      in_channels = ch
    self.out_features = chans[-1]

  def __call__(self, x, train):
    for conv, norm in zip(self.convs, self.norms):
      x = relu(norm(conv(x), use_running_average=not train))
    return jnp.mean(x, axis=(1, 2))


class SSLModel(nnx.Module):
  """Encoder + projector (+ predictor): x [B, H, W, C] -> dict of [B, .] arrays.

  Returns {'features': encoder output, 'z': projection, 'p': prediction
  (only with a predictor)}. Outputs are cast to float32 for the losses.
  """

  def __init__(self, encoder: nnx.Module, projector: MLP, predictor: Optional[MLP]):
    self.encoder = encoder
    self.projector = projector
    self.predictor = predictor

  def __call__(self, x: Array, train: bool) -> dict[str, Array]:
    features = self.encoder(x, train)
    z = self.projector(features, train)
    out = {'features': features.astype(jnp.float32), 'z': z.astype(jnp.float32)}
    if self.predictor is not None:
      out['p'] = self.predictor(z, train).astype(jnp.float32)
    return out


def small_cnn_channels(config) -> tuple[int, ...]:
  """small_cnn's per-layer widths from model.encoder.channels ('' keeps the default)."""
  channels = config.get('channels') or ''
  if not channels:
    return SmallCNN.CHANNELS
  return tuple(parse_mlp_spec(channels, 'model.encoder.channels', '32-64-128-256'))


def create_encoder(config, in_channels: int, rngs: nnx.Rngs, dtype=None,
                   conv_route: str = 'auto') -> nnx.Module:
  """The encoder of `config` (model.encoder); conv_route: one of conv.ROUTES."""
  name = config.name
  conv_fn = conv_lib.conv_function(conv_route)
  if name == 'small_cnn':
    return SmallCNN(in_channels, width=config.get('width', 1.0), rngs=rngs, dtype=dtype,
                    conv_fn=conv_fn, channels=small_cnn_channels(config))
  if channels := config.get('channels'):
    raise ValueError(f'model.encoder.channels={channels!r} applies to small_cnn only; '
                     f'{name} takes a width multiplier (model.encoder.width). Set '
                     "--config.model.encoder.channels=''.")
  if name.startswith('resnet') and name[6:].isdigit():
    return ResNet(int(name[6:]), in_channels, stem=config.get('stem', 'cifar'),
                  width=config.get('width', 1.0), rngs=rngs, dtype=dtype, conv_fn=conv_fn)
  raise ValueError(f"Unknown encoder {name!r}; use 'small_cnn', 'resnet18', 'resnet34' "
                   "or 'resnet50' (--config.model.encoder.name).")


def compute_dtype(name: str):
  if name not in ('float32', 'bfloat16'):
    raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {name!r}.")
  return jnp.bfloat16 if name == 'bfloat16' else jnp.float32


def create_model(config, in_channels: int, *, with_predictor: bool, seed: int) -> SSLModel:
  """Builds the model of `config.model` (encoder, projector, predictor specs)."""
  dtype = compute_dtype(config.get('dtype', 'float32'))
  rngs = nnx.Rngs(seed)
  encoder = create_encoder(config.encoder, in_channels, rngs, dtype,
                           conv_route=config.get('conv_route', 'auto'))
  projector = MLP(encoder.out_features, config.projector, last_bias=False, rngs=rngs,
                  dtype=dtype)
  predictor = None
  if with_predictor:
    if parse_mlp_spec(config.predictor)[-1] != projector.out_features:
      raise ValueError(
          f'model.predictor {config.predictor!r} must end in the projection width '
          f'{projector.out_features} of model.projector {config.projector!r}: BYOL regresses '
          'the prediction onto the target projection.')
    predictor = MLP(projector.out_features, config.predictor, last_bias=True, rngs=rngs,
                    dtype=dtype)
  return SSLModel(encoder, projector, predictor)
