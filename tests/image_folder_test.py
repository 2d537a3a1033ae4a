"""Pretraining on a folder of the user's images (DIR/<split>/<class>/<image>)."""

import importlib
import os

import numpy as np
import pytest
from PIL import Image

from ssl_jax import input_pipeline
from ssl_jax import train
from ssl_jax.datasets import image_folder

CLASSES = ('circle', 'square', 'stripes')


def make_folder(root, per_class=(12, 4), mode='RGB', sizes=((30, 24), (24, 30))):
  """Small PNGs of three colour classes; the sizes differ, so resizing is exercised."""
  rng = np.random.default_rng(0)
  for split, count in zip(('train', 'test'), per_class):
    for label, name in enumerate(CLASSES):
      os.makedirs(root / split / name, exist_ok=True)
      for i in range(count):
        h, w = sizes[i % len(sizes)]
        pixels = np.full((h, w, 3), 20, np.uint8)
        pixels[..., label] = 220
        pixels = (pixels + rng.integers(0, 30, pixels.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).convert(mode).save(root / split / name / f'{i}.png')
  return root


def test_the_folder_is_read_resized_and_labelled_by_class(tmp_path):
  folder = image_folder.scan(str(make_folder(tmp_path)))
  assert folder.classes == CLASSES and folder.channels == 3
  assert len(folder.files['train']) == 36 and len(folder.files['test']) == 12
  assert all(0.0 < m < 1.0 for m in folder.mean)
  examples = list(image_folder.dataset(folder, 'test', image_size=16).as_numpy_iterator())
  assert len(examples) == 12
  for example in examples:
    assert example['image'].shape == (16, 16, 3) and example['image'].dtype == np.uint8
    # The class's colour channel is the brightest: the label matches the folder.
    assert np.argmax(example['image'].reshape(-1, 3).mean(0)) == example['label']
  # Two processes' shards are disjoint and cover the split.
  shards = [image_folder.dataset(folder, image_folder.Shard('train', i, 2), image_size=8,
                                 with_ids=True) for i in range(2)]
  ids = [set(e['tfds_id'] for e in s.as_numpy_iterator()) for s in shards]
  assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 36


def test_grayscale_folders_have_one_channel(tmp_path):
  folder = image_folder.scan(str(make_folder(tmp_path, mode='L')))
  assert folder.channels == 1
  example = next(image_folder.dataset(folder, 'train', image_size=8).as_numpy_iterator())
  assert example['image'].shape == (8, 8, 1)


@pytest.mark.parametrize('problem, message', [
    ('missing', 'does not exist'),
    ('no_train', 'has no train/ folder'),
    ('empty', 'holds no images'),
    ('unreadable', 'cannot be read as an image'),
    ('mixed', 'different channel counts'),
    ('unknown_test_class', 'classes that train/ lacks'),
])
def test_a_bad_folder_is_a_clear_error_naming_the_path_and_the_fix(tmp_path, problem, message):
  root = tmp_path / 'images'
  if problem == 'no_train':
    (root / 'test' / 'a').mkdir(parents=True)
  elif problem == 'empty':
    (root / 'train' / 'a').mkdir(parents=True)
  elif problem != 'missing':
    make_folder(root)
  if problem == 'unreadable':
    (root / 'train' / 'circle' / 'broken.png').write_bytes(b'not a png at all')
  if problem == 'mixed':
    Image.new('L', (8, 8)).save(root / 'train' / 'square' / 'gray.png')
  if problem == 'unknown_test_class':
    (root / 'test' / 'triangle').mkdir()
  with pytest.raises(image_folder.ImageFolderError, match=message) as error:
    image_folder.scan(str(root))
  assert str(root) in str(error.value)
  if problem == 'mixed':
    assert 'gray.png' in str(error.value) and 'convert' in str(error.value).lower()


def smoke_config(data_dir, **overrides):
  config = importlib.import_module('configs.vicreg_it').get_config('smoke')
  config.data.name, config.data.data_dir = 'image_folder', str(data_dir)
  config.eval.baselines, config.async_checkpoints = False, False
  for key, value in overrides.items():
    parent, _, leaf = key.rpartition('.')
    (config[parent] if parent else config)[leaf] = value
  return config


def test_smoke_pretraining_on_a_folder_without_test_split_evaluates_on_a_hold_out(tmp_path,
                                                                              capsys):
  root = make_folder(tmp_path / 'images', per_class=(20, 0))
  config = smoke_config(root, **{'data.image_size': 20})
  spec = input_pipeline.spec_for(config.data, config.aug.preset)
  assert spec.test_split == 'train[holdout=6:only]' and spec.num_pretrain_examples == 54
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['status'] == 'completed' and summary['dataset'] == 'image_folder'
  assert summary['eval']['test_examples'] == 6   # 2 per class, never pretrained on
  assert 'no test/ split: evaluating on a class-balanced hold-out of 6' in capsys.readouterr().out


def test_baselines_of_one_folder_are_not_reused_for_another(tmp_path):
  """The baseline cache's key names the folder and its contents, not only 'image_folder'."""
  import types
  from configs import common
  from ssl_jax import evaluate
  first, second = make_folder(tmp_path / 'a'), make_folder(tmp_path / 'b')
  run = types.SimpleNamespace(spec=types.SimpleNamespace(train_split='train', test_split='test'),
                              image_size=16)

  def key(root):
    config = common.get_config('vicreg_it')
    config.data.name, config.data.data_dir = 'image_folder', str(root)
    return evaluate.baseline_key(config, run)

  assert key(first) == key(first)
  assert key(first) != key(second)          # same layout and classes, other files
  before = key(first)
  Image.fromarray(np.zeros((24, 30, 3), np.uint8)).save(first / 'test' / 'circle' / '0.png')
  assert key(first) != before                # a rewritten image
