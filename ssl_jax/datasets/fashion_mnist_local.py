"""Fashion-MNIST as a TFDS dataset, built from local idx files (no network).

The embedded default dataset of ssl_jax. Debian's package
`dataset-fashion-mnist` installs the four original gzipped idx files in
/usr/share/datasets/fashion-mnist/; this builder turns them into a prepared
TFDS dataset (`fashion_mnist_local`, features identical to TFDS's own
`fashion_mnist`: image uint8 [28, 28, 1], label ClassLabel(10)), so that it
loads like every other dataset.
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import tensorflow_datasets as tfds

DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz', 60_000),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz', 10_000),
}
CLASS_NAMES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
               'Sneaker', 'Bag', 'Ankle boot']
HOW_TO_GET = (
    'Install the Debian package with `apt-get install dataset-fashion-mnist` (it puts the '
    f'idx files in {DEBIAN_DIR}), or point $SSL_JAX_FASHION_MNIST_DIR at a folder holding '
    f'{sorted(f for v in FILES.values() for f in v[:2])}, or, where the network allows it, '
    'prepare TFDS\'s own copy with `python -c "import tensorflow_datasets as tfds; '
    'tfds.builder(\'fashion_mnist\').download_and_prepare()"`.')


def source_dir() -> str:
  """Where the idx files are looked for: $SSL_JAX_FASHION_MNIST_DIR or Debian's folder."""
  return os.environ.get('SSL_JAX_FASHION_MNIST_DIR', DEBIAN_DIR)


def missing_files(directory: str) -> list[str]:
  return [f for v in FILES.values() for f in v[:2]
          if not os.path.exists(os.path.join(directory, f))]


def read_idx(path: str) -> np.ndarray:
  """Reads a gzipped idx file (big-endian header: magic, dims) into uint8."""
  with gzip.open(path, 'rb') as f:
    data = f.read()
  magic = int.from_bytes(data[0:4], 'big')
  if magic >> 8 != 0x08:  # 0x08: unsigned byte data
    raise ValueError(f'{path} is not an unsigned-byte idx file (magic {magic:#x}).')
  ndim = magic & 0xFF
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise ValueError(f'{path} is truncated: header says {shape}, found {array.size} bytes.')
  return array.reshape(shape)


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST read from the local idx files of Debian's package."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Built from the original idx files.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = HOW_TO_GET

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Fashion-MNIST (Xiao et al. 2017) from local idx files.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(28, 28, 1)),
            'label': tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/zalandoresearch/fashion-mnist',
    )

  def _split_generators(self, dl_manager):
    directory = str(dl_manager.manual_dir)
    missing = missing_files(directory)
    if missing:
      raise FileNotFoundError(f'Fashion-MNIST idx files {missing} not found in {directory}. '
                              + HOW_TO_GET)
    return {split: self._generate_examples(directory, split) for split in FILES}

  def _generate_examples(self, directory, split):
    images_file, labels_file, count = FILES[split]
    images = read_idx(os.path.join(directory, images_file))
    labels = read_idx(os.path.join(directory, labels_file))
    if images.shape != (count, 28, 28) or labels.shape != (count,):
      raise ValueError(f'Unexpected Fashion-MNIST {split} shapes {images.shape}, '
                       f'{labels.shape}; expected ({count}, 28, 28) and ({count},).')
    for i in range(count):
      yield i, {'image': images[i][..., None], 'label': int(labels[i])}
