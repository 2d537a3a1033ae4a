"""A folder of the user's images as a dataset: DIR/<split>/<class>/<image>.

TFDS's folder convention (tfds.folder_dataset.ImageFolder): `train` is
required, `test` optional; class folders are the labels (sorted by name),
used only for evaluation. Images (.png, .jpg, .jpeg, .bmp, .gif) are decoded
on the host, resized so that the shorter side is the config's image size and
centre-cropped to a square, as uint8 [S, S, C]; the device then takes the
augmented views as for CIFAR.

`scan` checks the folder once (a header per image, through Pillow) and
fails with an error that names the path and the fix for: a missing or empty
folder, no `train`, a test class that train lacks, an unreadable image, and
images with different channel counts. Its per-channel mean and std come
from up to 512 train images.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Optional, Union

import numpy as np

EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif')
LAYOUT = ('An image folder is laid out as DIR/train/<class>/<image> (and optionally '
          'DIR/test/<class>/<image>), with images ending in ' + ', '.join(EXTENSIONS) + '.')
_MODE_CHANNELS = {'1': 1, 'L': 1, 'I': 1, 'I;16': 1, 'F': 1, 'LA': 2, 'P': 3, 'RGB': 3,
                  'YCbCr': 3, 'LAB': 3, 'HSV': 3, 'RGBA': 4, 'CMYK': 4}


class ImageFolderError(ValueError):
  """An image folder that cannot be read as a dataset; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class Folder:
  root: str
  classes: tuple[str, ...]
  files: dict[str, tuple[tuple[str, int], ...]]   # split -> ((path, label), ...)
  channels: int
  mean: tuple[float, ...]
  std: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Shard:
  """Part `index` of `count` of a split (one process's share)."""
  split: str
  index: int
  count: int


def _images(folder: str) -> list[str]:
  return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                if f.lower().endswith(EXTENSIONS) and not f.startswith('.'))


def signature(root: str) -> str:
  """Changes when a file is added, removed or rewritten.

  The scan's cache key, and part of the baselines' (evaluate.data_identity).
  """
  digest = hashlib.sha256()
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in sorted(filenames):
      stat = os.stat(os.path.join(dirpath, name))
      digest.update(f'{dirpath}/{name}:{stat.st_size}:{stat.st_mtime_ns}'.encode())
  return digest.hexdigest()


def scan(root: Optional[str]) -> Folder:
  """The folder's classes, files per split and channels; ImageFolderError if unusable."""
  if not root:
    raise ImageFolderError('data.name=image_folder needs --config.data.data_dir=DIR. '
                           + LAYOUT)
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise ImageFolderError(f'--config.data.data_dir={root} does not exist. ' + LAYOUT)
  return _scan(root, signature(root))


@functools.lru_cache(maxsize=8)
def _scan(root: str, signature: str) -> Folder:
  del signature   # the cache key only
  train = os.path.join(root, 'train')
  if not os.path.isdir(train):
    raise ImageFolderError(f'{root} has no train/ folder. ' + LAYOUT)
  classes = tuple(sorted(d for d in os.listdir(train)
                         if os.path.isdir(os.path.join(train, d)) and not d.startswith('.')))
  if not classes:
    raise ImageFolderError(f'{train} has no class folders. ' + LAYOUT)
  files = {}
  for split in ('train', 'test'):
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
      continue
    present = sorted(d for d in os.listdir(folder)
                     if os.path.isdir(os.path.join(folder, d)) and not d.startswith('.'))
    unknown = sorted(set(present) - set(classes))
    if unknown:
      raise ImageFolderError(f'{folder} has classes that train/ lacks: {unknown}. Every test '
                             'class needs training images too; remove them or add them to '
                             'train/.')
    files[split] = tuple((path, classes.index(c)) for c in present
                         for path in _images(os.path.join(folder, c)))
  if not files['train']:
    raise ImageFolderError(f'{train} holds no images in its class folders. ' + LAYOUT)
  if 'test' in files and not files['test']:
    del files['test']   # an empty test/ is the same as none
  channels = _check_images(root, [p for split in files.values() for p, _ in split])
  mean, std = _statistics([p for p, _ in files['train']], channels)
  return Folder(root=root, classes=classes, files=files, channels=channels, mean=mean, std=std)


def _check_images(root: str, paths: list[str]) -> int:
  """Every image opens, and all have one channel count; returns it."""
  from PIL import Image
  by_channels: dict[int, str] = {}
  for path in paths:
    try:
      with Image.open(path) as image:
        mode = image.mode
        image.verify()
    except Exception as error:  # pylint: disable=broad-except
      raise ImageFolderError(f'{path} cannot be read as an image ({type(error).__name__}: '
                             f'{error}). Remove or replace it.') from None
    channels = _MODE_CHANNELS.get(mode)
    if channels is None:
      raise ImageFolderError(f'{path} has the image mode {mode!r}, which ssl_jax does not '
                             'read; convert it to grayscale or RGB.')
    by_channels.setdefault(channels, path)
  if len(by_channels) > 1:
    examples = ', '.join(f'{c} channel(s): {p}' for c, p in sorted(by_channels.items()))
    raise ImageFolderError(
        f'The images under {root} have different channel counts ({examples}). Convert them '
        'to one mode (all grayscale, or all RGB), for example with Pillow: '
        "Image.open(p).convert('RGB').save(p).")
  return next(iter(by_channels))


def _statistics(paths: list[str], channels: int, limit: int = 512
                ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of pixels in [0, 1] over up to `limit` images."""
  from PIL import Image
  step = max(1, len(paths) // limit)
  total, total_sq, count = np.zeros(channels), np.zeros(channels), 0
  for path in paths[::step][:limit]:
    with Image.open(path) as image:
      x = np.asarray(image.convert('L' if channels == 1 else 'RGB' if channels == 3
                                   else image.mode), np.float64) / 255.0
    x = x.reshape(-1, channels)
    total += x.sum(0)
    total_sq += np.square(x).sum(0)
    count += len(x)
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 1e-12))
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def holdout_size(folder: Folder) -> int:
  """A class-balanced hold-out for evaluation when there is no test/: about 10% of the
  smallest class from every class (at least one each)."""
  counts = np.bincount([label for _, label in folder.files['train']],
                       minlength=len(folder.classes))
  if counts.min() < 2:
    empty = [folder.classes[i] for i in np.flatnonzero(counts < 2)]
    raise ImageFolderError(f'Without a test/ split, every class needs at least 2 training '
                           f'images (one to hold out); {empty} in {folder.root}/train have '
                           'fewer. Add images or a test/ folder.')
  return len(folder.classes) * max(1, int(counts.min()) // 10)


def dataset(folder: Folder, split: Union[str, Shard], *, image_size: int,
            shuffle_files: bool = False, seed: int = 0, with_ids: bool = False,
            decode_images: bool = True):
  """A tf.data.Dataset of {'image': uint8 [S, S, C], 'label': int64} (and 'tfds_id': the
  file's path, with_ids) of a split or a Shard of one; decode_images=False leaves
  'image' out (the hold-out needs ids and labels only)."""
  import tensorflow as tf
  from ssl_jax import input_pipeline   # here: input_pipeline imports this module
  shard = split if isinstance(split, Shard) else Shard(split, 0, 1)
  if shard.split not in folder.files:
    raise ImageFolderError(f'{folder.root} has no {shard.split}/ split.')
  rows = folder.files[shard.split][shard.index::shard.count]
  if shuffle_files:
    rows = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]
  paths = tf.constant([p for p, _ in rows] or [''])[:len(rows)]
  labels = tf.constant([label for _, label in rows] or [0], tf.int64)[:len(rows)]
  ds = tf.data.Dataset.from_tensor_slices((paths, labels))
  channels = folder.channels

  def load(path, label):
    example = {'label': label}
    if with_ids:
      example['tfds_id'] = path
    if decode_images:
      image = tf.io.decode_image(tf.io.read_file(path), channels=channels,
                                 expand_animations=False)
      example['image'] = _resize_centre_crop(image, image_size)
    return example

  # Decoding runs in parallel on every core this process may use; the
  # pipelines that read this one switch tf.data's autotuning off
  # (input_pipeline.without_autotune_model).
  return ds.map(load, num_parallel_calls=input_pipeline.host_parallelism(),
                deterministic=True)


def _resize_centre_crop(image, size: int):
  """Shorter side to `size` (antialiased), then the central size x size square, uint8."""
  import tensorflow as tf
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = size / tf.reduce_min(shape)
  new = tf.cast(tf.math.ceil(shape * scale), tf.int32)
  image = tf.image.resize(image, new, method='bicubic', antialias=True)
  top, left = (new[0] - size) // 2, (new[1] - size) // 2
  image = image[top:top + size, left:left + size]
  image = tf.ensure_shape(image, [size, size, None])
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
