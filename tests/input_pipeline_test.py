"""Input pipeline: the real Fashion-MNIST default and mocked other datasets."""

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ssl_jax import augment
from ssl_jax import input_pipeline
from ssl_jax import sharding
from ssl_jax.datasets import fashion_mnist_local


def _whole_split(name, split, **kw):
  ds = input_pipeline.load_split(name, split, **kw)
  return next(iter(ds.batch(100_000).as_numpy_iterator()))


@pytest.fixture(scope='module')
def fashion_train():
  if fashion_mnist_local.missing_files(fashion_mnist_local.source_dir()):
    pytest.fail('Fashion-MNIST idx files are missing: ' + fashion_mnist_local.HOW_TO_GET)
  return _whole_split('fashion_mnist', 'train')


def test_real_fashion_mnist_train_split(fashion_train):
  images, labels = fashion_train['image'], fashion_train['label']
  assert images.shape == (60_000, 28, 28, 1) and images.dtype == np.uint8
  assert images.min() == 0 and images.max() == 255
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 6_000))
  # Known pixel statistics of Fashion-MNIST train (the normalisation we use).
  spec = input_pipeline.get_spec('fashion_mnist')
  assert images.mean() / 255 == pytest.approx(spec.mean[0], abs=5e-4)
  assert images.std() / 255 == pytest.approx(spec.std[0], abs=5e-4)


def test_real_fashion_mnist_test_split():
  test = _whole_split('fashion_mnist', 'test')
  assert test['image'].shape == (10_000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(test['label'], minlength=10), np.full(10, 1_000))


def test_missing_fashion_mnist_gives_instructions(tmp_path, monkeypatch):
  monkeypatch.setenv('SSL_JAX_FASHION_MNIST_DIR', str(tmp_path / 'nowhere'))
  with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
    input_pipeline.load_split('fashion_mnist', 'train', data_dir=str(tmp_path / 'tfds'))


def test_missing_other_dataset_gives_instructions(tmp_path):
  with pytest.raises(FileNotFoundError, match='not prepared.*data_dir'):
    input_pipeline.load_split('cifar10', 'train', data_dir=str(tmp_path))


def test_unknown_dataset_name():
  with pytest.raises(ValueError, match="Unknown dataset 'mnist3'.*config.data.name"):
    input_pipeline.get_spec('mnist3')


def test_process_shards_are_disjoint_and_cover_the_split():
  labels_and_pixels = []
  for index in range(3):
    ds = input_pipeline.load_split(
        'fashion_mnist', input_pipeline.process_split('test', index, 3))
    batch = next(iter(ds.batch(100_000).as_numpy_iterator()))
    labels_and_pixels.append({hash(img.tobytes()) for img in batch['image']})
  total = sum(len(s) for s in labels_and_pixels)
  union = set().union(*labels_and_pixels)
  assert len(union) == total  # disjoint (the test split has no duplicate images)
  full = _whole_split('fashion_mnist', 'test')
  assert union == {hash(img.tobytes()) for img in full['image']}


def _first_batches(n_batches, **kw):
  ds = input_pipeline.pretrain_dataset('fashion_mnist', **kw)
  return [b for _, b in zip(range(n_batches), ds.as_numpy_iterator())]


def test_same_seed_same_order_different_seed_differs():
  a = _first_batches(2, local_batch=32, seed=3)
  b = _first_batches(2, local_batch=32, seed=3)
  c = _first_batches(2, local_batch=32, seed=4)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
  assert not np.array_equal(a[0]['image'], c[0]['image'])


def test_resume_continues_the_same_stream_across_epochs():
  # Test split of a mocked 50-image dataset: 3 batches of 16 per epoch.
  with tfds.testing.mock_data(num_examples=50):
    straight = [b['image'] for _, b in zip(range(7), input_pipeline.pretrain_dataset(
        'cifar10', local_batch=16, seed=0).as_numpy_iterator())]
    resumed = [b['image'] for _, b in zip(range(3), input_pipeline.pretrain_dataset(
        'cifar10', local_batch=16, seed=0, start_step=4).as_numpy_iterator())]
  for x, y in zip(straight[4:], resumed):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize('name', ['cifar10', 'cifar100', 'stl10', 'imagenet2012'])
def test_mocked_datasets_build_two_view_batches(name):
  spec = input_pipeline.get_spec(name)
  mesh = sharding.make_mesh()
  with tfds.testing.mock_data(num_examples=24):
    ds = input_pipeline.pretrain_dataset(name, local_batch=8, seed=0)
    batch = next(input_pipeline.DeviceIterator(ds, mesh))
    evals = next(iter(input_pipeline.eval_dataset(
        name, spec.test_split, local_batch=16).as_numpy_iterator()))
  size = spec.image_size
  assert batch['image'].shape == (8, size, size, spec.channels)
  assert batch['image'].sharding.spec == sharding.batch_sharding(mesh).spec
  assert ('view_b' in batch) == spec.variable_size
  view_a, view_b = augment.views_from_config(
      'imagenet' if spec.variable_size else 'cifar')
  x_a, x_b = jax.jit(lambda b, k: augment.two_views(
      b, k, view_a, view_b, out_size=size, mean=spec.mean, std=spec.std,
      crop=not spec.variable_size))(batch, jax.random.key(0))
  assert x_a.shape == x_b.shape == (8, size, size, spec.channels)
  assert np.all(np.isfinite(x_a)) and not np.allclose(x_a, x_b)
  # Normalised: roughly zero-mean, unit-scale values, not [0, 255].
  assert np.abs(np.asarray(x_a)).max() < 5
  assert evals['image'].shape == (16, size, size, spec.channels)
  assert evals['mask'].sum() == 16


def test_eval_dataset_pads_the_last_batch():
  ds = input_pipeline.eval_dataset('fashion_mnist', 'test', local_batch=3000)
  batches = list(ds.as_numpy_iterator())
  assert [b['image'].shape[0] for b in batches] == [3000] * 4
  assert sum(int(b['mask'].sum()) for b in batches) == 10_000
  assert not batches[-1]['mask'][1000:].any()


@pytest.mark.parametrize('name', ['fashion_mnist', 'imagenet2012'])
def test_pipelines_run_without_the_autotune_model_thread(name):
  # Deleting an autotuned iterator waits for tf.data's model thread, which
  # sleeps up to 60 s and is not woken by the deletion: the end of every run
  # waited for it (input_pipeline.without_autotune_model). Both kinds of
  # pipeline, fixed-size and host-cropped, switch it off.
  spec = input_pipeline.get_spec(name)
  with tfds.testing.mock_data(num_examples=24):
    pretrain = input_pipeline.pretrain_dataset(name, local_batch=8, seed=0)
    evals = input_pipeline.eval_dataset(name, spec.test_split, local_batch=16)
    for ds, batch in ((pretrain, 8), (evals, 16)):
      assert ds.options().autotune.enabled is False
      assert next(iter(ds.as_numpy_iterator()))['image'].shape[0] == batch


def test_batch_not_divisible_by_devices():
  mesh = sharding.make_mesh()
  with pytest.raises(ValueError, match='multiple of the device count 8.*batch_size'):
    input_pipeline.local_batch_size(12, mesh)


def test_validation_holdout_is_class_balanced_fixed_and_disjoint_over_process_shards():
  data = ml_collections.ConfigDict(dict(name='fashion_mnist', holdout=10_000,
                                        eval_on='validation'))
  spec = input_pipeline.spec_for(data)
  assert spec.num_pretrain_examples == 50_000
  assert spec.pretrain_split == spec.train_split == 'train[holdout=10000]'
  batches = input_pipeline.eval_dataset('fashion_mnist', spec.test_split,
                                        local_batch=1000).as_numpy_iterator()
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)   # 1,000 per class
  held_out = input_pipeline.holdout_ids('fashion_mnist', 'train', 10_000)
  assert len(held_out) == 10_000
  # Two processes: their parts of the rest are disjoint, cover 50,000 images,
  # and never touch the hold-out, which does not depend on the process count.
  parts = []
  for index in range(2):
    split = input_pipeline.process_split(spec.train_split, index, 2)
    ds = input_pipeline.load_split('fashion_mnist', split, with_ids=True, decode_images=False)
    ids = [i for batch in ds.map(lambda ex: ex['tfds_id']).batch(8192).as_numpy_iterator()
           for i in batch]
    assert int(ds.cardinality()) == len(ids)
    parts.append(set(ids))
  assert not parts[0] & parts[1] and len(parts[0] | parts[1]) == 50_000
  assert not (parts[0] | parts[1]) & held_out
  assert spec == input_pipeline.spec_for(data)


@pytest.mark.parametrize('holdout,eval_on,message', [
    (0, 'validation', 'needs a hold-out'),
    (1005, 'test', 'multiple of the 10 classes'),
    (-10, 'test', 'must be >= 0'),
    (60_000, 'test', 'must be smaller than'),
    (1000, 'val', "data.eval_on must be one of"),
])
def test_bad_holdout_settings_are_rejected(holdout, eval_on, message):
  data = ml_collections.ConfigDict(dict(name='fashion_mnist', holdout=holdout, eval_on=eval_on))
  with pytest.raises(ValueError, match=message):
    input_pipeline.spec_for(data)
