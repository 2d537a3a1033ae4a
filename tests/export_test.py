"""Backbones out to PyTorch: the safetensors export loads into torchvision and agrees."""

import importlib
import json
import os

import jax
import numpy as np
import pytest

from image_folder_test import make_folder
from ssl_jax import checkpointing
from ssl_jax import export
from ssl_jax import runs
from ssl_jax import sharding


def saved_run(workdir, data_dir, encoder, seed=0):
  """A workdir holding a config and a checkpoint whose BatchNorm statistics are not the
  initial zeros and ones (so that exporting them is tested); no training."""
  config = importlib.import_module('configs.vicreg_it').get_config('smoke')
  config.data.name, config.data.data_dir, config.data.image_size = 'image_folder', str(
      data_dir), 32
  config.model.encoder = encoder
  run = runs.build(config, sharding.make_mesh(1))
  keys = iter(jax.random.split(jax.random.key(seed), 1000))
  stats = jax.tree.map(lambda x: x + 0.2 * jax.random.uniform(next(keys), x.shape, x.dtype),
                       run.state.batch_stats)
  # Every parameter moved too: at initialisation the ResNets' last BatchNorm scale in each
  # residual block is zero, and ResNet-50's features were then all exactly 0 here, which
  # any export would match.
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype),
                        run.state.params)
  state = run.state.replace(params=params, batch_stats=stats, step=run.state.step + 7)
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort())
  manager = checkpointing.make_manager(str(workdir), max_to_keep=1, async_save=False)
  checkpointing.save(manager, state, config, force=True)
  manager.close()
  return config


@pytest.fixture(scope='module')
def images(tmp_path_factory):
  return make_folder(tmp_path_factory.mktemp('images'), sizes=((32, 32),))


def test_the_safetensors_file_round_trips_with_its_metadata(tmp_path):
  tensors = {'a.weight': np.arange(6, dtype=np.float32).reshape(2, 3),
             'a.num_batches_tracked': np.asarray(3, np.int64)}
  export.write_safetensors(str(tmp_path / 'x.safetensors'), tensors, {'note': 'hi'})
  back, metadata = export.read_safetensors(str(tmp_path / 'x.safetensors'))
  assert metadata == {'note': 'hi'}
  for name, value in tensors.items():
    np.testing.assert_array_equal(back[name], value)
    assert back[name].dtype == value.dtype
  raw = (tmp_path / 'x.safetensors').read_bytes()
  header_length = int.from_bytes(raw[:8], 'little')
  assert header_length % 8 == 0 and json.loads(raw[8:8 + header_length])['a.weight'][
      'shape'] == [2, 3]


def test_the_small_cnn_exports_its_own_names(tmp_path, images):
  saved_run(tmp_path / 'run', images, {'name': 'small_cnn', 'width': 0.25, 'stem': 'cifar',
                                       'channels': ''})
  out = export.export(str(tmp_path / 'run'), str(tmp_path / 'cnn.safetensors'))
  assert sorted(out['tensors'])[:3] == ['convs.0.weight', 'convs.1.weight', 'convs.2.weight']
  assert out['tensors']['convs.0.weight'].shape == (8, 3, 3, 3)   # [out, in, kh, kw]
  check = np.load(out['check'])
  assert check['inputs'].shape == (8, 32, 32, 3) and check['features'].shape == (8, 64)


# PyTorch in its own process, as a user would load the file (and because importing
# torchvision after TensorFlow crashes this process: both ship their own libraries).
TORCH_SIDE = r"""
import json, sys
import numpy as np, torch, torchvision
from safetensors.torch import load_file
path, check, depth, stem = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
model = getattr(torchvision.models, f'resnet{depth}')()
if stem == 'cifar':   # as the export's note says
  model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
  model.maxpool = torch.nn.Identity()
missing, unexpected = model.load_state_dict(load_file(path), strict=False)
model.fc = torch.nn.Identity()
model.eval()
inputs = np.load(check)['inputs']
with torch.no_grad():
  features = model(torch.from_numpy(inputs).permute(0, 3, 1, 2)).numpy()
np.save(check + '.torch.npy', features)
print(json.dumps({'missing': sorted(missing), 'unexpected': sorted(unexpected),
                  'tracked': int(model.bn1.num_batches_tracked)}))
"""


@pytest.mark.parametrize('depth, stem', [(18, 'cifar'), (18, 'imagenet'), (50, 'imagenet')])
def test_a_resnet_export_loads_into_torchvision_and_computes_the_same_features(
    tmp_path, images, depth, stem):
  import importlib.util
  import subprocess
  import sys
  for package in ('torch', 'torchvision', 'safetensors'):
    if importlib.util.find_spec(package) is None:
      pytest.skip(f'{package} is not installed (pip install -e .[torch])')
  saved_run(tmp_path / 'run', images, {'name': f'resnet{depth}', 'width': 1.0, 'stem': stem})
  path = str(tmp_path / 'backbone.safetensors')
  out = export.export(str(tmp_path / 'run'), path)
  _, metadata = export.read_safetensors(path)
  if stem == 'cifar':
    assert 'model.maxpool = torch.nn.Identity()' in metadata['note']
  done = subprocess.run([sys.executable, '-c', TORCH_SIDE, path, out['check'], str(depth), stem],
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  loaded = json.loads(done.stdout.strip().splitlines()[-1])
  assert loaded == {'missing': ['fc.bias', 'fc.weight'], 'unexpected': [], 'tracked': 7}
  features = np.load(out['check'] + '.torch.npy')
  expected = np.load(out['check'])['features']
  print(f'resnet{depth} ({stem} stem): max |torchvision - ssl_jax| = '
        f'{np.abs(features - expected).max():.2e}, max |feature| = {np.abs(expected).max():.3f}')
  # Features that tell inputs apart, so that agreeing on them means something.
  assert np.abs(expected).max() > 0.01 and np.ptp(expected, axis=0).max() > 0.01
  np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
