"""TFDS -> per-process tf.data -> global jax.Array batches.

Pretraining batches are {'image': uint8 [B, H, W, C], 'label': int32 [B]}
(plus 'view_b' where crops must be taken on the host, see below); the two
augmented views are made on device by `augment.two_views`, so augmentation
is keyed by (seed, step) and a resumed run replays it exactly.

Design (big_vision input_pipeline, flax examples):
- Each process reads its own disjoint shard,
  `tfds.even_splits(split, process_count)[process_index]`.
- Shuffle -> repeat -> batch(global_batch // process_count) -> prefetch.
  The order of epoch e is a shuffle seeded by (seed, e), so the data position
  at step k is a pure function of (seed, k): resuming at step k starts at
  epoch k*B // n and skips only the rest of that epoch.
- `DeviceIterator` turns host batches into global arrays sharded over the
  mesh's 'data' axis and keeps the next batches in flight on the devices.

Datasets of fixed image size (Fashion-MNIST, CIFAR, STL-10) are cropped on
device; ImageNet's images vary in size, so its two random-resized crops are
taken on the host here (tf.image.sample_distorted_bounding_box) and the
device skips the crop.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import os
import re
from typing import Any, Iterator, Optional

import jax
import numpy as np

from ssl_jax import sharding

# TensorFlow is imported lazily by the functions that need it, so importing
# ssl_jax (e.g. for the losses) does not pay for it.


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the pipeline and the model need to know about a dataset."""
  tfds_name: str
  pretrain_split: str      # images used for self-supervised pretraining
  train_split: str         # labelled split for the probes
  test_split: str
  image_size: int          # side of the (square) training images
  channels: int
  num_classes: int
  mean: tuple[float, ...]  # per-channel, on images scaled to [0, 1]
  std: tuple[float, ...]
  num_pretrain_examples: int = 0   # images in pretrain_split (epochs -> steps)
  variable_size: bool = False   # crops must be taken on the host
  cache: bool = False           # small enough to keep decoded in memory
  how_to_get: str = ''
  note: str = ''                 # said once at the start of a run (an image folder's hold-out)


_MANUAL = ('It cannot be downloaded by ssl_jax; prepare it once with TFDS where you have the '
           'files (see https://www.tensorflow.org/datasets/catalog/{name}) and pass '
           '--config.data.data_dir=DIR.')

DATASETS: dict[str, DatasetSpec] = {
    'fashion_mnist': DatasetSpec(
        'fashion_mnist_local', 'train', 'train', 'test', 28, 1, 10,
        (0.2860,), (0.3530,), 60_000, cache=True),
    'cifar10': DatasetSpec(
        'cifar10', 'train', 'train', 'test', 32, 3, 10,
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 50_000, cache=True,
        how_to_get=_MANUAL.format(name='cifar10')),
    'cifar100': DatasetSpec(
        'cifar100', 'train', 'train', 'test', 32, 3, 100,
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 50_000, cache=True,
        how_to_get=_MANUAL.format(name='cifar100')),
    'stl10': DatasetSpec(
        'stl10', 'unlabelled+train', 'train', 'test', 96, 3, 10,
        (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), 105_000,
        how_to_get=_MANUAL.format(name='stl10')),
    'imagenet2012': DatasetSpec(
        'imagenet2012', 'train', 'train', 'validation', 224, 3, 1000,
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1_281_167, variable_size=True,
        how_to_get=('ImageNet needs a manual download: put ILSVRC2012_img_train.tar and '
                    'ILSVRC2012_img_val.tar in <data_dir>/downloads/manual and run '
                    "tfds.builder('imagenet2012', data_dir=<data_dir>).download_and_prepare().")),
}


IMAGE_FOLDER = 'image_folder'
# An image folder's side, when data.image_size does not set it: the size its
# augmentation preset was made for.
PRESET_IMAGE_SIZE = {'fashion_mnist': 28, 'cifar': 32, 'imagenet': 224}
_FOLDER_IMAGE_SIZE: dict[str, int] = {}   # data_dir -> side, set by spec_for
_CACHE_BYTES = 2 << 30                    # decoded images kept in memory up to this


def get_spec(name: str, data_dir: Optional[str] = None) -> DatasetSpec:
  """The spec of a dataset; an image folder's is read from the folder in data_dir."""
  if name == IMAGE_FOLDER:
    return _folder_spec(data_dir)
  if name not in DATASETS:
    raise ValueError(f'Unknown dataset {name!r}; known datasets: '
                     f'{sorted(DATASETS) + [IMAGE_FOLDER]}. Set --config.data.name to one of '
                     'them.')
  return DATASETS[name]


def _folder_spec(data_dir: Optional[str]) -> DatasetSpec:
  from ssl_jax.datasets import image_folder
  folder = image_folder.scan(data_dir)
  size = _FOLDER_IMAGE_SIZE.get(folder.root, 32)
  train = len(folder.files['train'])
  return DatasetSpec(
      IMAGE_FOLDER, 'train', 'train', 'test' if 'test' in folder.files else '', size,
      folder.channels, len(folder.classes), folder.mean, folder.std, train,
      cache=(train + len(folder.files.get('test', ()))) * size * size * folder.channels
      < _CACHE_BYTES)


EVAL_ON = ('test', 'validation')


def spec_for(data_config, aug_preset: Optional[str] = None) -> DatasetSpec:
  """The dataset spec of `config.data`, with its validation hold-out applied.

  data.holdout = K > 0 holds a fixed, class-balanced set of K images out of
  the train split: pretraining and the probes' training use the rest, and
  data.eval_on = 'validation' evaluates on the K held-out images instead of
  the test split (for choosing hyper-parameters without touching the test
  split); 'test' evaluates on the test split.
  """
  if data_config.name == IMAGE_FOLDER:
    return _folder_spec_for(data_config, aug_preset)
  spec = get_spec(data_config.name)
  return _with_holdout(spec, data_config)


def _folder_spec_for(data_config, aug_preset: Optional[str]) -> DatasetSpec:
  """An image folder's spec at data.image_size (default: the preset's), evaluated on
  its test/ split, or on a class-balanced hold-out of train/ when it has none."""
  from ssl_jax.datasets import image_folder
  folder = image_folder.scan(data_config.get('data_dir'))
  size = data_config.get('image_size') or PRESET_IMAGE_SIZE.get(aug_preset or '', 32)
  _FOLDER_IMAGE_SIZE[folder.root] = int(size)
  spec = get_spec(IMAGE_FOLDER, folder.root)
  if spec.test_split or int(data_config.get('holdout', 0) or 0):
    return _with_holdout(spec, data_config)
  holdout = image_folder.holdout_size(folder)
  held = _with_holdout(dataclasses.replace(spec, test_split='train'),
                       _DataView(data_config, holdout=holdout, eval_on='validation'))
  return dataclasses.replace(held, note=(
      f'{folder.root} has no test/ split: evaluating on a class-balanced hold-out of '
      f'{holdout} train images ({holdout // spec.num_classes} per class), which '
      'pretraining and the probes do not see.'))


class _DataView:
  """config.data with some fields replaced (spec_for reads it through .get)."""

  def __init__(self, data_config, **changes):
    self._config, self._changes = data_config, changes

  def get(self, key, default=None):
    if key in self._changes:
      return self._changes[key]
    return self._config.get(key, default)

  @property
  def name(self):
    return self._config.name


def _with_holdout(spec: DatasetSpec, data_config) -> DatasetSpec:
  holdout = int(data_config.get('holdout', 0) or 0)
  eval_on = data_config.get('eval_on', 'test')
  if eval_on not in EVAL_ON:
    raise ValueError(f'data.eval_on must be one of {EVAL_ON}, got {eval_on!r}.')
  if holdout < 0:
    raise ValueError(f'data.holdout must be >= 0, got {holdout}.')
  if holdout == 0:
    if eval_on == 'validation':
      raise ValueError("data.eval_on='validation' needs a hold-out: set data.holdout > 0 "
                       '(for example 10000).')
    return spec
  if spec.pretrain_split != spec.train_split:
    raise ValueError(f'data.holdout needs a dataset pretrained on its labelled split; '
                     f'{data_config.name} pretrains on {spec.pretrain_split!r}.')
  if not spec.test_split and eval_on == 'test':
    raise ValueError(f'{data_config.name} has no test split; set data.holdout > 0 and '
                     "data.eval_on='validation'.")
  if holdout % spec.num_classes:
    raise ValueError(f'data.holdout must be a multiple of the {spec.num_classes} classes '
                     f'(class-balanced), got {holdout}.')
  if holdout >= spec.num_pretrain_examples:
    raise ValueError(f'data.holdout ({holdout}) must be smaller than the '
                     f'{spec.num_pretrain_examples} training images.')
  rest = f'{spec.train_split}[holdout={holdout}]'
  return dataclasses.replace(
      spec, pretrain_split=rest, train_split=rest,
      test_split=(f'{spec.train_split}[holdout={holdout}:only]' if eval_on == 'validation'
                  else spec.test_split),
      num_pretrain_examples=spec.num_pretrain_examples - holdout)


@dataclasses.dataclass(frozen=True)
class HoldoutSplit:
  """`base` (a TFDS split or one process's part of it) with the hold-out of
  `full` removed, or (only=True) nothing but the hold-out."""
  base: Any
  full: str
  count: int
  only: bool


_HOLDOUT = re.compile(r'^(?P<full>[^\[\]]+)\[holdout=(?P<count>\d+)(?P<only>:only)?\]$')


def parse_split(split):
  """'train[holdout=10000]' / 'train[holdout=10000:only]' -> HoldoutSplit; else as is."""
  if not isinstance(split, str):
    return split
  match = _HOLDOUT.match(split)
  if match is None:
    return split
  return HoldoutSplit(base=match['full'], full=match['full'], count=int(match['count']),
                      only=bool(match['only']))


_RECORD_IDS: dict[tuple, list[tuple[bytes, int]]] = {}


def record_ids(name: str, split, data_dir: Optional[str] = None) -> list[tuple[bytes, int]]:
  """(tfds_id, label) of every record of `split`, in file order; images not decoded."""
  import tensorflow_datasets as tfds
  key = (name, repr(split), data_dir)
  if key not in _RECORD_IDS:
    ds = load_split(name, split, data_dir=data_dir, with_ids=True, decode_images=False)
    batches = tfds.as_numpy(ds.map(lambda ex: (ex['tfds_id'], ex['label'])).batch(8192))
    _RECORD_IDS[key] = [(bytes(i), int(label)) for ids, labels in batches
                        for i, label in zip(ids, labels)]
  return _RECORD_IDS[key]


@functools.lru_cache(maxsize=8)
def holdout_ids(name: str, full: str, count: int, data_dir: Optional[str] = None
                ) -> frozenset[bytes]:
  """The TFDS record ids of the class-balanced hold-out of `full`.

  count / num_classes images per class: those whose ids come first in an
  order fixed by a hash of the id, so the hold-out is the same on every
  machine, process count and run. Keyed on ids (file and record), not on the
  position in a process's shard.
  """
  per_class = count // get_spec(name, data_dir).num_classes
  by_class: dict[int, list[bytes]] = {}
  for record_id, label in record_ids(name, full, data_dir):
    by_class.setdefault(label, []).append(record_id)
  chosen = []
  for label in sorted(by_class):
    ids = sorted(by_class[label], key=lambda i: hashlib.sha256(i).digest())
    if len(ids) < per_class:
      raise ValueError(f'Class {label} of {name} {full} has {len(ids)} images, fewer than '
                       f'the {per_class} a hold-out of {count} takes from each class.')
    chosen.extend(ids[:per_class])
  return frozenset(chosen)


# ----------------------------------------------------------------------------
# Builders.
# ----------------------------------------------------------------------------

def _fashion_mnist_builder(data_dir: Optional[str]):
  """TFDS's own prepared `fashion_mnist` if present, else the local idx build."""
  import tensorflow_datasets as tfds
  from ssl_jax.datasets import fashion_mnist_local
  root = data_dir or os.environ.get('TFDS_DATA_DIR') or tfds.core.constants.DATA_DIR
  # Only look for TFDS's own copy where one could be: asking for a missing one
  # makes TFDS log warnings on every call.
  if os.path.isdir(os.path.join(os.path.expanduser(root), 'fashion_mnist')):
    official = tfds.builder('fashion_mnist', data_dir=data_dir)
    if official.is_prepared():
      return official
  return fashion_mnist_local.FashionMnistLocal(data_dir=data_dir)


def _builder(name: str, data_dir: Optional[str]):   # TFDS datasets (not image folders)
  import tensorflow_datasets as tfds
  if name == 'fashion_mnist':
    return _fashion_mnist_builder(data_dir)
  return tfds.builder(get_spec(name).tfds_name, data_dir=data_dir)


def _fashion_mnist_source() -> str:
  """Debian's idx files' folder; FileNotFoundError naming the fix if they are missing."""
  from ssl_jax.datasets import fashion_mnist_local
  source = fashion_mnist_local.source_dir()
  missing = fashion_mnist_local.missing_files(source)
  if missing:
    raise FileNotFoundError(
        f'Fashion-MNIST is neither prepared in the TFDS data dir nor found as idx files '
        f'in {source} (missing {missing}). {fashion_mnist_local.HOW_TO_GET}')
  return source


def _prepare_fashion_mnist(builder) -> None:
  """Builds the TFDS files from Debian's idx files once (about 15 s)."""
  import tensorflow_datasets as tfds
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=_fashion_mnist_source()))


class DatasetNotPreparedError(FileNotFoundError):
  """A dataset ssl_jax cannot download is not prepared where the config points."""


def _not_prepared(name: str, builder) -> DatasetNotPreparedError:
  spec = get_spec(name)
  return DatasetNotPreparedError(
      f'Dataset {name!r} ({spec.tfds_name}) is not prepared in the TFDS data dir '
      f'{builder.data_dir_root}. {spec.how_to_get}')


def check_prepared(name: str, data_dir: Optional[str] = None) -> str:
  """Where `name` will be read from, from TFDS's metadata alone (no record is read).

  Raises DatasetNotPreparedError (or FileNotFoundError for Fashion-MNIST
  without its idx files) naming the folder and the fix, as training would.
  An image folder is scanned (each image's header), with its own errors.
  """
  if name == IMAGE_FOLDER:
    spec = get_spec(name, data_dir)
    return (f'an image folder of {spec.num_pretrain_examples} train images in '
            f'{spec.num_classes} classes, {spec.channels} channel(s), read from {data_dir}')
  from absl import logging
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)   # TFDS warns about every empty version folder
  try:
    builder = _builder(name, data_dir)
    prepared = builder.is_prepared()
  finally:
    logging.set_verbosity(verbosity)
  if prepared:
    return f'prepared in {builder.data_dir}'
  if name == 'fashion_mnist':
    return (f'prepared on first use from the idx files in {_fashion_mnist_source()} '
            f'into {builder.data_dir_root} (once, about 15 s)')
  raise _not_prepared(name, builder)


def load_split(name: str, split, *, data_dir: Optional[str] = None,
               shuffle_files: bool = False, seed: int = 0, with_ids: bool = False,
               decode_images: bool = True):
  """A tf.data.Dataset of {'image', 'label'} for `split`, with clear errors.

  `split` may be any TFDS split expression, including even_splits' objects,
  or a hold-out split (`parse_split`, `process_split`). with_ids adds TFDS's
  'tfds_id' of each record; decode_images=False leaves images encoded.
  """
  import tensorflow as tf
  import tensorflow_datasets as tfds
  split = parse_split(split)
  if isinstance(split, HoldoutSplit):
    held_out = holdout_ids(name, split.full, split.count, data_dir)
    ids = sorted(held_out)
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(ids), tf.ones(len(ids), tf.int32)),
        default_value=0)
    ds = load_split(name, split.base, data_dir=data_dir, shuffle_files=shuffle_files,
                    seed=seed, with_ids=True, decode_images=decode_images)
    ds = ds.filter(lambda ex: tf.equal(table.lookup(ex['tfds_id']) > 0, split.only))
    if not with_ids:
      ds = ds.map(lambda ex: {k: v for k, v in ex.items() if k != 'tfds_id'})
    # Filtering hides the size; state it so that epochs and steps are known.
    size = sum((i in held_out) == split.only for i, _ in record_ids(name, split.base, data_dir))
    return ds.apply(tf.data.experimental.assert_cardinality(size))
  if name == IMAGE_FOLDER:
    from ssl_jax.datasets import image_folder
    spec = get_spec(name, data_dir)
    return image_folder.dataset(image_folder.scan(data_dir), split, image_size=spec.image_size,
                                shuffle_files=shuffle_files, seed=seed, with_ids=with_ids,
                                decode_images=decode_images)
  spec = get_spec(name)
  builder = _builder(name, data_dir)
  read_config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=False, add_tfds_id=with_ids)
  skip = spec.variable_size or not decode_images
  decoders = {'image': tfds.decode.SkipDecoding()} if skip else None

  def as_dataset():
    return builder.as_dataset(split=split, shuffle_files=shuffle_files,
                              read_config=read_config, decoders=decoders)

  # as_dataset first: under tfds.testing.mock_data builders report that they
  # are not prepared, yet serve data.
  try:
    return as_dataset()
  except Exception as error:  # pylint: disable=broad-except
    if builder.is_prepared():
      raise
    if name == 'fashion_mnist':
      _prepare_fashion_mnist(builder)
      return as_dataset()
    raise _not_prepared(name, builder) from error


def process_split(split: str, process_index: int, process_count: int,
                  name: Optional[str] = None):
  """This process's disjoint part of `split` of dataset `name`; together they cover it."""
  import tensorflow_datasets as tfds
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count}).')
  if name == IMAGE_FOLDER:
    from ssl_jax.datasets import image_folder
    part = lambda s: image_folder.Shard(s, process_index, process_count)
  else:
    part = lambda s: tfds.even_splits(s, process_count)[process_index]
  parsed = parse_split(split)
  if isinstance(parsed, HoldoutSplit):   # shard the base split, then filter each part
    return dataclasses.replace(parsed, base=part(parsed.full))
  return part(split)


# ----------------------------------------------------------------------------
# Host-side preprocessing.
# ----------------------------------------------------------------------------

def _host_random_crop(image_bytes, size: int, scale, ratio, seed):
  """Inception-style crop of an encoded image, resized to size x size (uint8)."""
  import tensorflow as tf
  shape = tf.image.extract_jpeg_shape(image_bytes)
  begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
      seed=seed, min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale,
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  y, x, _ = tf.unstack(begin)
  h, w, _ = tf.unstack(crop)
  image = tf.image.decode_and_crop_jpeg(image_bytes, tf.stack([y, x, h, w]), channels=3)
  image = tf.image.resize(image, [size, size], method='bicubic', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _host_center_crop(image_bytes, size: int, crop_fraction: float = 0.875):
  """Resize-then-centre-crop for evaluation of variable-size images."""
  import tensorflow as tf
  image = tf.image.decode_jpeg(image_bytes, channels=3)
  shape = tf.shape(image)
  side = tf.cast(tf.cast(tf.minimum(shape[0], shape[1]), tf.float32) * crop_fraction, tf.int32)
  y, x = (shape[0] - side) // 2, (shape[1] - side) // 2
  image = tf.image.crop_to_bounding_box(image, y, x, side, side)
  image = tf.image.resize(image, [size, size], method='bicubic', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _encode_if_raw(image):
  """Mock datasets hand out decoded images where real ImageNet has JPEG bytes."""
  import tensorflow as tf
  if image.dtype == tf.string:
    return image
  return tf.io.encode_jpeg(image)


def pretrain_dataset(name: str, *, local_batch: int, seed: int, start_step: int = 0,
                     split: Optional[str] = None, process_index: int = 0,
                     process_count: int = 1, input_shards: int = 0,
                     data_dir: Optional[str] = None, shuffle_buffer: int = 50_000,
                     host_crop_scale=(0.08, 1.0), host_crop_ratio=(3 / 4, 4 / 3)):
  """An infinite tf.data.Dataset of this process's pretraining batches.

  The split is cut into `input_shards` disjoint shards (0: one per process),
  each an independently shuffled stream; a process owns input_shards /
  process_count consecutive shards, and its batch is their batches, in shard
  order. The global batch therefore depends on the shard count only, not on
  how many processes read it: one process with input_shards=2 sees the same
  global batches as two processes (tests/multihost_test.py).

  Args:
    name: a key of DATASETS.
    local_batch: this process's batch, global_batch // process_count.
    seed: fixes the shuffles (and host crops); epoch e uses seed (seed, e).
    start_step: the first batch to yield: batches 0..start_step-1 of the same
      (seed, shard) streams are skipped, cheaply (whole epochs are not read).
    split: the split to pretrain on (default: the dataset's pretrain_split;
      `spec_for` gives one without the validation hold-out).
    input_shards: a multiple of process_count (0: process_count).
  Returns:
    Batches {'image': uint8 [B, H, W, C], 'label': int32 [B]} and, for
    variable-size datasets, 'view_b' (the second host crop of each image).
  """
  import tensorflow as tf
  if local_batch <= 0:
    raise ValueError(f'local_batch must be > 0, got {local_batch}.')
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  shards = input_shards or process_count
  if shards % process_count:
    raise ValueError(f'data.input_shards={input_shards} must be a multiple of the process '
                     f'count {process_count} (or 0: one shard per process).')
  owned = shards // process_count
  if local_batch % owned:
    raise ValueError(f'The local batch {local_batch} must split evenly over this process\'s '
                     f'{owned} input shards; change data.input_shards or the batch size.')
  spec = get_spec(name, data_dir)
  streams = [
      _shard_stream(name, process_split(split or spec.pretrain_split,
                                        process_index * owned + k, shards, name),
                    batch=local_batch // owned, seed=seed, start_step=start_step,
                    data_dir=data_dir, shuffle_buffer=shuffle_buffer,
                    host_crop_scale=host_crop_scale, host_crop_ratio=host_crop_ratio)
      for k in range(owned)]
  if owned == 1:
    ds = streams[0]
  else:
    ds = tf.data.Dataset.zip(tuple(streams)).map(
        lambda *parts: {k: tf.concat([p[k] for p in parts], 0) for k in parts[0]})
  return without_autotune_model(ds.prefetch(tf.data.AUTOTUNE))


def _shard_stream(name: str, split, *, batch: int, seed: int, start_step: int,
                  data_dir: Optional[str], shuffle_buffer: int, host_crop_scale,
                  host_crop_ratio):
  """One shard's infinite stream of batches of `batch` examples (pretrain_dataset)."""
  import tensorflow as tf
  spec = get_spec(name, data_dir)
  base = load_split(name, split, data_dir=data_dir, shuffle_files=True, seed=seed)
  if spec.cache:
    base = base.cache()
  n_local = int(base.cardinality())
  if n_local < batch:
    raise ValueError(f'An input shard holds {n_local} pretraining images of {name}, fewer '
                     f'than its part of the batch ({batch}); lower the batch size or the '
                     'number of input shards.')

  # The data position after start_step batches, in examples of this stream.
  position = start_step * batch
  first_epoch, skip = divmod(position, n_local)

  def epoch(e):
    return base.shuffle(min(shuffle_buffer, n_local), seed=seed * 1_000_003 + e,
                        reshuffle_each_iteration=False)

  ds = tf.data.Dataset.range(first_epoch, 2 ** 62).flat_map(epoch).skip(skip)

  if spec.variable_size:
    size = spec.image_size

    def crops(index, example):
      image = _encode_if_raw(example['image'])
      s = tf.stack([tf.cast(seed, tf.int64), index])
      view_a = _host_random_crop(image, size, host_crop_scale, host_crop_ratio, s)
      view_b = _host_random_crop(image, size, host_crop_scale, host_crop_ratio, s + 7)
      return {'image': view_a, 'view_b': view_b, 'label': example['label']}

    ds = ds.enumerate(start=position).map(crops, num_parallel_calls=host_parallelism())
  else:
    ds = ds.map(lambda ex: {'image': ex['image'], 'label': ex['label']})
  ds = ds.map(lambda ex: {**ex, 'label': tf.cast(ex['label'], tf.int32)})
  return ds.batch(batch, drop_remainder=True)


def eval_dataset(name: str, split: str, *, local_batch: int, process_index: int = 0,
                 process_count: int = 1, data_dir: Optional[str] = None):
  """One pass over `split` without augmentation, padded to whole batches.

  Yields {'image': uint8 [B, H, W, C], 'label': int32 [B], 'mask': bool [B]};
  padding rows have mask False so that every batch has the same shape (one
  compilation, divisible over devices).
  """
  import tensorflow as tf
  spec = get_spec(name, data_dir)
  ds = load_split(name, process_split(split, process_index, process_count, name),
                  data_dir=data_dir)
  if spec.variable_size:
    ds = ds.map(lambda ex: {'image': _host_center_crop(_encode_if_raw(ex['image']),
                                                       spec.image_size),
                            'label': ex['label']}, num_parallel_calls=host_parallelism())
  ds = ds.map(lambda ex: {'image': ex['image'], 'label': tf.cast(ex['label'], tf.int32),
                          'mask': True})
  ds = ds.batch(local_batch, drop_remainder=False)

  def pad(batch):
    missing = local_batch - tf.shape(batch['label'])[0]
    return {k: tf.pad(v, [[0, missing]] + [[0, 0]] * (len(v.shape) - 1))
            for k, v in batch.items()}

  return without_autotune_model(ds.map(pad).prefetch(tf.data.AUTOTUNE))


def host_parallelism() -> int:
  """Parallel calls for the host's map stages: the CPU cores this process may use."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def without_autotune_model(ds):
  """ds without tf.data's autotuning model thread (options.autotune.enabled = False).

  Why: deleting an iterator of an autotuned pipeline waits for that thread,
  which sleeps between optimisations for a period that doubles up to 60 s and
  is not woken by the deletion (TF 2.21). A run's pretraining iterator lives
  for the whole run, so its deletion at the end held the process 0-60 s after
  the summary was printed (27 s in /tmp reproductions; "imports and process
  start" of 17-61 s in benchmarks/default_run.py). The knobs it tuned are set
  instead: map stages run host_parallelism() calls, and prefetch(AUTOTUNE)
  keeps its own buffer tuner, which needs no model thread. On Fashion-MNIST
  the pipelines' throughput did not change (docs/speed.md).
  """
  import tensorflow as tf
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.with_options(options)


# ----------------------------------------------------------------------------
# Host -> device.
# ----------------------------------------------------------------------------

def local_batch_size(global_batch: int, mesh: jax.sharding.Mesh) -> int:
  sharding.check_batch_divisible(global_batch, mesh)
  return global_batch // jax.process_count()


def to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """This process's numpy batch -> global arrays sharded over 'data'."""
  data_sharding = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(data_sharding, np.asarray(v))
          for k, v in batch.items()}


class DeviceIterator:
  """Iterates global device batches, keeping `prefetch` batches in flight.

  Transfers are asynchronous, so while the devices run step k the host
  already decodes and transfers batches k+1..k+prefetch.
  """

  def __init__(self, dataset, mesh: jax.sharding.Mesh, prefetch: int = 2):
    self._host = iter(dataset.as_numpy_iterator())
    self._mesh = mesh
    self._queue = collections.deque()
    self._prefetch = max(1, prefetch)

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    return self

  def _fill(self):
    while len(self._queue) < self._prefetch:
      try:
        self._queue.append(to_global(next(self._host), self._mesh))
      except StopIteration:
        break

  def __next__(self) -> dict[str, jax.Array]:
    self._fill()
    if not self._queue:
      raise StopIteration
    batch = self._queue.popleft()
    self._fill()
    return batch


def hide_accelerators_from_tensorflow() -> None:
  """TF is only the input pipeline: keep it off GPUs/TPUs JAX needs."""
  import tensorflow as tf
  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):
      pass
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
