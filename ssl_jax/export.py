"""A run's pretrained encoder, out to PyTorch: a safetensors file and a check file.

  python -m ssl_jax.export --workdir runs/vicreg_it_c10 --out resnet18.safetensors

Writes the encoder of the newest (or --step) checkpoint:

- ResNet-18/34/50: a state dict with torchvision's key names and layouts
  (convolutions [out, in, kh, kw], BatchNorm weight, bias, running_mean,
  running_var, num_batches_tracked), which loads with
  `torchvision.models.resnet50().load_state_dict(state, strict=False)`; only
  `fc` is missing. The CIFAR stem (3x3 stride-1 first convolution, no
  max-pool) needs torchvision's model adapted first, as solo-learn does:
      model.conv1 = torch.nn.Conv2d(C, 64 * width, 3, 1, 1, bias=False)
      model.maxpool = torch.nn.Identity()
  The export prints this and records it in the file's metadata.
- small_cnn: its parameters under ssl_jax's own names
  (convs.i.weight [out, in, 3, 3], norms.i.*), in the same layout.

Beside FILE, FILE without its extension + '.npz' holds 8 sample network
`inputs` [B, H, W, C] (test images, already normalised) and the encoder's
pooled `features` [B, F] on them, computed here, so that a load can be
checked (torch takes the inputs transposed to [B, C, H, W]).

The safetensors format (a little-endian u64 header length, a JSON header
naming each tensor's dtype, shape and byte range, then the bytes) is written
directly; reading it needs the `safetensors` package (pip install
safetensors) or any reader of the format.
"""

import dataclasses
import functools
import json
import os
import struct
from typing import Any, Optional

import numpy as np
from absl import app
from absl import flags

from ssl_jax import cli

_DTYPES = {np.dtype(np.float32): 'F32', np.dtype(np.float64): 'F64',
           np.dtype(np.float16): 'F16', np.dtype(np.int64): 'I64', np.dtype(np.int32): 'I32'}
CIFAR_STEM_NOTE = ('CIFAR stem: before loading, replace torchvision\'s first layers, as '
                   'solo-learn does: model.conv1 = torch.nn.Conv2d({channels}, {width}, 3, 1, 1, '
                   'bias=False); model.maxpool = torch.nn.Identity()')


def write_safetensors(path: str, tensors: dict[str, np.ndarray],
                      metadata: Optional[dict[str, str]] = None) -> None:
  """Writes tensors in the safetensors format (through a temporary file)."""
  header: dict[str, Any] = {}
  offset, blobs = 0, []
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    if array.dtype not in _DTYPES:
      raise ValueError(f'{name}: dtype {array.dtype} has no safetensors code here.')
    data = array.astype(array.dtype.newbyteorder('<'), copy=False).tobytes()
    header[name] = {'dtype': _DTYPES[array.dtype], 'shape': list(array.shape),
                    'data_offsets': [offset, offset + len(data)]}
    offset += len(data)
    blobs.append(data)
  if metadata:
    header['__metadata__'] = {str(k): str(v) for k, v in metadata.items()}
  text = json.dumps(header, separators=(',', ':')).encode()
  text += b' ' * (-len(text) % 8)   # the data starts 8-byte aligned
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(struct.pack('<Q', len(text)))
    f.write(text)
    for blob in blobs:
      f.write(blob)
  os.replace(tmp, path)


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """The tensors and metadata of a safetensors file (numpy; for checks and tests)."""
  codes = {v: k for k, v in _DTYPES.items()}
  with open(path, 'rb') as f:
    (length,) = struct.unpack('<Q', f.read(8))
    header = json.loads(f.read(length))
    data = f.read()
  metadata = header.pop('__metadata__', {})
  tensors = {name: np.frombuffer(data[s:e], codes[h['dtype']]).reshape(h['shape'])
             for name, h in header.items() for s, e in [h['data_offsets']]}
  return tensors, metadata


def _conv_weight(kernel) -> np.ndarray:
  """flax HWIO -> PyTorch [out, in, kh, kw]."""
  return np.transpose(np.asarray(kernel, np.float32), (3, 2, 0, 1))


def _bn(prefix: str, params, stats, step: int) -> dict[str, np.ndarray]:
  return {f'{prefix}.weight': np.asarray(params['scale'], np.float32),
          f'{prefix}.bias': np.asarray(params['bias'], np.float32),
          f'{prefix}.running_mean': np.asarray(stats['mean'], np.float32),
          f'{prefix}.running_var': np.asarray(stats['var'], np.float32),
          f'{prefix}.num_batches_tracked': np.asarray(step, np.int64)}


def _value(tree):
  """nnx.State leaves (Variables or arrays) -> plain nested dicts of arrays."""
  if hasattr(tree, 'to_pure_dict'):
    return tree.to_pure_dict()
  return tree


def resnet_state_dict(encoder_params, encoder_stats, depth: int, step: int
                      ) -> dict[str, np.ndarray]:
  """ssl_jax's ResNet encoder -> torchvision's ResNet key names and layouts."""
  from ssl_jax import models
  block, counts = models.RESNETS[depth]
  p, s = encoder_params, encoder_stats
  out = {'conv1.weight': _conv_weight(p['conv']['kernel'])}
  out.update(_bn('bn1', p['bn'], s['bn'], step))
  names = (('conv1', 'bn1'), ('conv2', 'bn2'), ('conv3', 'bn3'))
  index = 0
  for stage, count in enumerate(counts):
    for i in range(count):
      bp, bs = p['blocks'][index], s['blocks'][index]
      prefix = f'layer{stage + 1}.{i}'
      for conv, bn in names[:3 if block is models.Bottleneck else 2]:
        out[f'{prefix}.{conv}.weight'] = _conv_weight(bp[conv]['kernel'])
        out.update(_bn(f'{prefix}.{bn}', bp[bn], bs[bn], step))
      if 'shortcut' in bp and bp['shortcut']:
        out[f'{prefix}.downsample.0.weight'] = _conv_weight(bp['shortcut']['kernel'])
        out.update(_bn(f'{prefix}.downsample.1', bp['shortcut_bn'], bs['shortcut_bn'], step))
      index += 1
  return out


def small_cnn_state_dict(encoder_params, encoder_stats, step: int) -> dict[str, np.ndarray]:
  out = {}
  for i, conv in enumerate(encoder_params['convs'].values() if hasattr(
      encoder_params['convs'], 'values') else encoder_params['convs']):
    out[f'convs.{i}.weight'] = _conv_weight(conv['kernel'])
  for i in range(len(out)):
    out.update(_bn(f'norms.{i}', encoder_params['norms'][i], encoder_stats['norms'][i], step))
  return out


def encoder_state_dict(config, params, batch_stats, step: int
                       ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(state dict, metadata) of the run's encoder."""
  import jax
  enc = config.model.encoder
  params = jax.device_get(_value(params)['encoder'])
  stats = jax.device_get(_value(batch_stats)['encoder'])
  metadata = {'format': 'pt', 'producer': 'ssl_jax.export', 'encoder': enc.name,
              'step': str(step), 'method': config.method, 'dataset': config.data.name}
  if enc.name.startswith('resnet'):
    depth = int(enc.name[len('resnet'):])
    tensors = resnet_state_dict(params, stats, depth, step)
    metadata['stem'] = enc.get('stem', 'cifar')
    metadata['torchvision'] = f'torchvision.models.resnet{depth}'
    if metadata['stem'] == 'cifar':
      metadata['note'] = CIFAR_STEM_NOTE.format(
          channels=tensors['conv1.weight'].shape[1], width=tensors['conv1.weight'].shape[0])
    if enc.get('width', 1.0) != 1.0:
      metadata['note'] = (metadata.get('note', '') + ' Width multiplier '
                          f'{enc.width}: torchvision has no such model; build one with '
                          'these shapes.').strip()
  elif enc.name == 'small_cnn':
    tensors = small_cnn_state_dict(params, stats, step)
  else:
    raise ValueError(f'Export knows ResNet-18/34/50 and small_cnn, not {enc.name!r}.')
  return tensors, metadata


def sample(loaded, count: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """(normalised network inputs [B, H, W, C], encoder features [B, F]) of test images."""
  import jax
  from flax import nnx
  from ssl_jax import augment
  from ssl_jax.diagnostics import workdir as diag_workdir
  config, run = loaded.config, loaded.run
  images, _ = diag_workdir.fixed_images(config, run.spec.test_split, count, allow_fewer=True)
  x = np.asarray(augment.eval_view(jax.numpy.asarray(images), out_size=run.image_size,
                                   mean=run.spec.mean, std=run.spec.std), np.float32)
  model = nnx.merge(run.graphdef, loaded.state.params, loaded.state.batch_stats, copy=True)
  features = np.asarray(jax.jit(lambda v: model.encoder(v, train=False))(x), np.float32)
  return x, features


def export(workdir: str, out: str, step: Optional[int] = None) -> dict[str, Any]:
  from ssl_jax import embed, runs
  embed.check_output(out, 'ssl_jax.export')
  loaded = runs.load_workdir(workdir, step=step)
  tensors, metadata = encoder_state_dict(loaded.config, loaded.state.params,
                                         loaded.state.batch_stats, loaded.step)
  write_safetensors(out, tensors, metadata)
  inputs, features = sample(loaded)
  check = os.path.splitext(out)[0] + '.npz'
  np.savez(check, inputs=inputs, features=features)
  loaded.manager.close()
  print(f'ssl_jax.export: {metadata["encoder"]} of step {loaded.step} ({len(tensors)} tensors, '
        f'{sum(t.size for t in tensors.values()):,} values) -> {out}; {len(inputs)} check '
        f'inputs and their features -> {check}', flush=True)
  if 'torchvision' in metadata:
    print(f'  loads with {metadata["torchvision"]}().load_state_dict(state, strict=False) '
          '(only fc missing)', flush=True)
  if 'note' in metadata:
    print(f'  {metadata["note"]}', flush=True)
  return {'tensors': tensors, 'metadata': metadata, 'check': check, 'step': loaded.step}


@dataclasses.dataclass(frozen=True)
class Flags:
  workdir: Any
  out: Any
  step: Any
  dry_run: Any


def define_flags(flag_values: flags.FlagValues) -> Flags:
  fv = dict(flag_values=flag_values)
  return Flags(
      workdir=flags.DEFINE_string('workdir', None, 'A training workdir.', **fv),
      out=flags.DEFINE_string('out', None, 'Output .safetensors path.', **fv),
      step=flags.DEFINE_integer('step', None, 'The checkpoint (default: the newest).', **fv),
      dry_run=flags.DEFINE_bool('dry_run', False, 'Check the workdir, the checkpoint and the '
                                'output path; write nothing.', **fv))


def dry_run(f: Flags) -> dict:
  from ssl_jax import embed, runs
  embed.check_output(f.out.value, 'ssl_jax.export')
  loaded = runs.load_workdir(f.workdir.value, abstract=True)
  steps = runs.checkpoint_steps(f.workdir.value)
  step = f.step.value if f.step.value is not None else steps[-1]
  encoder = loaded.config.model.encoder.name
  if not (encoder.startswith('resnet') or encoder == 'small_cnn'):
    raise ValueError(f'Export knows ResNet-18/34/50 and small_cnn, not {encoder!r}.')
  print(f'ssl_jax.export dry run: the {encoder} encoder of step {step} in {f.workdir.value} '
        f'-> {f.out.value}. Nothing was run or written.', flush=True)
  return {'step': step, 'encoder': encoder}


def main(argv, f: Flags):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if f.workdir.value is None or f.out.value is None:
    raise app.UsageError('--workdir and --out are required.')
  from ssl_jax import metrics
  from ssl_jax import runs
  metrics.quiet_library_logs()
  with cli.one_line_errors('ssl_jax.export', runs.load_errors()):
    if f.dry_run.value:
      dry_run(f)
      return
    export(f.workdir.value, f.out.value, f.step.value)


if __name__ == '__main__':
  cli.start('ssl_jax.export')
  app.run(functools.partial(main, f=define_flags(flags.FLAGS)), flags_parser=cli.parse_flags)
