"""A run's diagnostics: the network and data of a workdir, every diagnostic of a
checkpoint, and `python -m ssl_jax.diagnose --workdir=DIR` (`diagnose_workdir`).

`diagnose_state` runs, for the encoder features and the projector output:
information quantities (information.py), locality (locality.py), the
Gaussianity of one image's views (gaussianity.py) and the probe's
generalisation terms (generalisation.py). Figures: figures.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from ssl_jax import augment
from ssl_jax import input_pipeline
from ssl_jax import models
from ssl_jax import sharding
from ssl_jax.diagnostics import figures
from ssl_jax.diagnostics import gaussianity
from ssl_jax.diagnostics import generalisation
from ssl_jax.diagnostics import information
from ssl_jax.diagnostics import locality as locality_lib

from ssl_jax.diagnostics.information import ENTROPIES
from ssl_jax.diagnostics.information import REPRESENTATIONS


@dataclasses.dataclass(frozen=True)
class Settings:
  """How much each diagnostic looks at. The defaults take about a minute per
  checkpoint of the Fashion-MNIST default on 2 CPU cores."""
  num_images: int = 2048             # information quantities: images ...
  info_views: int = 4                # ... x views (iid draws of the view-a augmentation)
  locality_images: int = 64          # K clean images
  locality_copies: int = 16          # noisy copies per image and scale
  noise_scales: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0)
  gauss_images: int = 32             # K images ...
  gauss_views: int = 80              # ... with M views: half fit directions, half tested
  # D': tested views >= 5 D'. Henze-Zirkler's power on 40 views falls fast
  # with D' (tests/diagnostics_test.py: a bimodal direction passes 0%, 12%,
  # 75% of the time at D' = 2, 4, 8), so 4 by default.
  gauss_dims: int = 4
  gauss_directions_1d: int = 8       # random directions per image for Shapiro-Wilk
  probe_train_images: int = 10_000
  probe_test_images: int = 10_000
  probe_epochs: int = 30
  level: float = 0.05                # test level alpha
  delta: float = 0.05                # confidence of the concentration term
  batch_size: int = 512
  seed: int = 0

  def __post_init__(self):
    for name in ('num_images', 'locality_images', 'locality_copies', 'gauss_images',
                 'gauss_views', 'gauss_dims', 'probe_train_images', 'probe_test_images',
                 'probe_epochs', 'batch_size', 'info_views'):
      if getattr(self, name) <= 0:
        raise ValueError(f'diagnostics setting {name} must be > 0, got {getattr(self, name)}.')
    if self.num_images < 2:
      raise ValueError('num_images must be >= 2 for any batch statistic.')
    if self.gauss_views - self.gauss_views // 2 < 5 * self.gauss_dims:
      raise ValueError(
          f'gauss_views={self.gauss_views} leaves {self.gauss_views - self.gauss_views // 2} '
          f'tested views per image for a {self.gauss_dims}-dimensional test; it needs at '
          f'least 5 x gauss_dims: set gauss_views >= {10 * self.gauss_dims} or lower gauss_dims.')
    if self.info_views < 2:
      raise ValueError(f'info_views must be >= 2 (the within-image covariance), got '
                       f'{self.info_views}.')
    if not all(s >= 0 for s in self.noise_scales):
      raise ValueError(f'noise_scales must be >= 0, got {self.noise_scales}.')


# ----------------------------------------------------------------------------
# The network and the fixed evaluation data of one run.
# ----------------------------------------------------------------------------

def fixed_images(config, split: str, count: int, *, allow_fewer: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
  """The first `count` images and labels of `split`, un-augmented, in a fixed order
  (all of them, if allow_fewer and the split is smaller)."""
  dataset = input_pipeline.eval_dataset(config.data.name, split, local_batch=min(count, 1000),
                                        data_dir=config.data.data_dir)
  images, labels, have = [], [], 0
  for batch in dataset.as_numpy_iterator():
    keep = batch['mask'].astype(bool)
    images.append(batch['image'][keep])
    labels.append(batch['label'][keep])
    have += int(keep.sum())
    if have >= count:
      break
  images, labels = np.concatenate(images)[:count], np.concatenate(labels)[:count]
  if len(images) < count and not allow_fewer:
    raise ValueError(f'{config.data.name}:{split} has {len(images)} images, fewer than the '
                     f'{count} asked for; lower the diagnostics image counts.')
  return images, labels


class Network:
  """A run's model as jitted functions of (params, batch_stats, inputs).

  Inputs are split into batches of `batch_size` rows (padded to that size:
  one compilation), sharded over the mesh's 'data' axis like training.
  BatchNorm uses its running averages, so each example is processed alone.
  """

  def __init__(self, run, mesh, batch_size: int = 512):
    self.mesh = mesh
    self.batch_size = max(mesh.size, (batch_size // mesh.size) * mesh.size)
    graphdef, spec, size = run.graphdef, run.spec, run.image_size
    view_a, view_b = run.views

    def model(params, batch_stats):
      return nnx.merge(graphdef, params, batch_stats, copy=True)

    @jax.jit
    def outputs(params, batch_stats, x):
      out = model(params, batch_stats)(x, train=False)
      return {k: out[k] for k in REPRESENTATIONS}

    @jax.jit
    def patterns(params, batch_stats, x):
      # The encoder's ReLUs (the features' linear region), then the
      # projector's (with them, Z's own region).
      m = model(params, batch_stats)
      with models.record_relu_patterns() as encoder:
        features = m.encoder(x, train=False)
      with models.record_relu_patterns() as projector:
        m.projector(features, train=False)
      return {'encoder': encoder, 'projector': projector}

    def augmented(view):
      return jax.jit(lambda images, key: augment.normalize(
          augment.augment_batch(images, key, view, size), spec.mean, spec.std))

    self._outputs, self._patterns = outputs, patterns
    self.view_a, self.view_b = augmented(view_a), augmented(view_b)
    self.clean = jax.jit(lambda images: augment.eval_view(images, out_size=size,
                                                          mean=spec.mean, std=spec.std))

  def put(self, x: np.ndarray) -> jax.Array:
    """Host rows -> a global array sharded over 'data' (rows a multiple of the mesh)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding.batch_sharding(self.mesh),
                                        lambda index: x[index])

  def map(self, fn: Callable, *arrays: np.ndarray) -> Any:
    """fn over row batches of host arrays; the outputs' rows concatenated on the host."""
    n = len(arrays[0])
    outs = []
    for start in range(0, n, self.batch_size):
      chunk = [a[start:start + self.batch_size] for a in arrays]
      rows = len(chunk[0])
      chunk = [_pad_rows(c, self.batch_size) for c in chunk]
      out = fn(*(self.put(c) for c in chunk))
      outs.append(jax.tree.map(lambda a: np.asarray(a)[:rows], out))
    return jax.tree.map(lambda *a: np.concatenate(a), *outs)

  def embed(self, params, batch_stats, images: np.ndarray, *, view: Optional[str] = None,
            key: Optional[jax.Array] = None) -> dict[str, np.ndarray]:
    """{'features', 'z'} of uint8 images: clean (view None) or augmented ('a' or 'b').

    Augmentation keys are fold_in(key, row): the same images get the same
    views at every checkpoint.
    """
    if view is None:
      prepare = self.clean
    else:
      augment_fn = self.view_a if view == 'a' else self.view_b
      prepare = lambda imgs, rows: augment_fn(imgs, jax.random.fold_in(key, rows[0]))
    rows = np.arange(len(images), dtype=np.int32)

    def fn(imgs, idx):
      x = prepare(imgs) if view is None else prepare(imgs, idx)
      return self._outputs(params, batch_stats, x)

    # One key per batch (its first row), so the views do not depend on the mesh.
    return self.map(fn, images, rows)

  def patterns_fn(self, params, batch_stats) -> Callable:
    """x -> [encoder ReLU patterns..., projector ReLU patterns...]."""
    def fn(x):
      out = self._patterns(params, batch_stats, x)
      return out['encoder'] + out['projector']
    return fn

  def encoder_layers(self, params, batch_stats, x) -> int:
    return len(jax.eval_shape(self._patterns, params, batch_stats, x)['encoder'])


@dataclasses.dataclass
class FixedData:
  """The images every checkpoint is diagnosed on (the same at every step).

  eval_images come from the run's evaluation split (its test split, or the
  validation hold-out of a tuning run); the probe trains on its train split.
  """
  eval_images: np.ndarray                   # [E, H, W, C] uint8
  probe_train: tuple[np.ndarray, np.ndarray]
  probe_test: tuple[np.ndarray, np.ndarray]

  @classmethod
  def load(cls, config, spec, settings: Settings) -> 'FixedData':
    count = max(settings.num_images, settings.locality_images, settings.gauss_images,
                settings.probe_test_images)
    images, labels = fixed_images(config, spec.test_split, count)
    train = fixed_images(config, spec.train_split, settings.probe_train_images)
    return cls(eval_images=images, probe_train=train,
               probe_test=(images[:settings.probe_test_images],
                           labels[:settings.probe_test_images]))


def run_beta(config) -> float:
  """The log-det beta of the run's own objective, else 1."""
  terms = config.loss.terms
  return float(terms['logdet_entropy'].get('beta', 1.0)) if 'logdet_entropy' in terms else 1.0


def diagnose_state(net: Network, params, batch_stats, data: FixedData, settings: Settings, *,
                   beta: float, num_classes: int, report: Callable[[str], None] = print
                   ) -> dict[str, Any]:
  """Every diagnostic of one state: information, locality, gaussianity, generalisation."""
  key = jax.random.key(settings.seed)
  k_info, k_loc, k_gauss, k_pairs = jax.random.split(key, 4)
  out: dict[str, Any] = {}

  report('information quantities')
  images = data.eval_images[:settings.num_images]
  views = [net.embed(params, batch_stats, images, view='a', key=jax.random.fold_in(k_info, v))
           for v in range(settings.info_views)]
  out['information'] = {rep: information.information_quantities(
      np.stack([v[rep] for v in views], 1), beta=beta) for rep in REPRESENTATIONS}

  report('locality')
  images = data.eval_images[:settings.locality_images]
  # Groups of whole images, a multiple of the device count where the batch allows.
  per_group = max(net.mesh.size, net.batch_size // settings.locality_copies
                  // net.mesh.size * net.mesh.size)
  patterns = net.patterns_fn(params, batch_stats)
  noise, aug_equal, aug_agree = [], [], []
  encoder_layers = None
  for g, start in enumerate(range(0, len(images), per_group)):
    group = images[start:start + per_group]
    clean = net.clean(net.put(_pad_rows(group, net.mesh.size)))
    if encoder_layers is None:
      encoder_layers = net.encoder_layers(params, batch_stats, clean)
    noise.append((len(group), locality_lib.locality(
        patterns, clean, jax.random.fold_in(k_loc, g), scales=settings.noise_scales,
        copies=settings.locality_copies, encoder_layers=encoder_layers)))
    copies = np.repeat(_pad_rows(group, net.mesh.size), settings.locality_copies, axis=0)
    augmented = net.view_a(net.put(copies), jax.random.fold_in(k_loc, 10_000 + g))
    equal, agree = locality_lib.pattern_agreement(patterns, clean, augmented)
    keep = len(group) * settings.locality_copies
    aug_equal.append(equal[:keep])
    aug_agree.append(agree[:keep])
  out['locality'] = locality_lib.merge(noise)
  out['locality']['augmentation'] = locality_lib.summarise(
      np.concatenate(aug_equal), np.concatenate(aug_agree), encoder_layers)

  report('gaussianity')
  k, m = settings.gauss_images, settings.gauss_views
  repeated = np.repeat(data.eval_images[:k], m, axis=0)
  views = net.embed(params, batch_stats, repeated, view='a', key=k_gauss)
  out['gaussianity'] = {rep: gaussianity.within_image_normality(
      views[rep].reshape(k, m, -1), dims=min(settings.gauss_dims, views[rep].shape[1]),
      directions_1d=settings.gauss_directions_1d, level=settings.level, seed=settings.seed)
      for rep in REPRESENTATIONS}

  report('generalisation terms')
  train = net.embed(params, batch_stats, data.probe_train[0])['features']
  test = net.embed(params, batch_stats, data.probe_test[0])['features']
  unlabelled = data.probe_train[0][:settings.num_images]
  pair_a = net.embed(params, batch_stats, unlabelled, view='a',
                     key=jax.random.fold_in(k_pairs, 0))['features']
  pair_b = net.embed(params, batch_stats, unlabelled, view='b',
                     key=jax.random.fold_in(k_pairs, 1))['features']
  out['generalisation'] = generalisation.generalisation_terms(
      (train, data.probe_train[1]), (test, data.probe_test[1]), (pair_a, pair_b),
      num_classes=num_classes, epochs=settings.probe_epochs, delta=settings.delta)
  return out


def _pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
  missing = -len(x) % multiple
  return np.concatenate([x, np.repeat(x[-1:], missing, 0)]) if missing else x


# ----------------------------------------------------------------------------
# After training: `python -m ssl_jax.diagnose --workdir=DIR`.
# ----------------------------------------------------------------------------

def select_steps(available: Sequence[int], which: str) -> list[int]:
  """'all' (step 0, the initialisation, and every checkpoint), 'last', or '100,300'."""
  available = sorted(available)
  if not available and which != 'init':
    raise FileNotFoundError('The workdir has no checkpoint to diagnose; train first (a run '
                            'keeps checkpoints every keep_checkpoint_period steps).')
  if which == 'all':
    return [0] + [s for s in available if s != 0]
  if which == 'last':
    return [available[-1]]
  try:
    steps = sorted({int(s) for s in which.split(',') if s.strip()})
  except ValueError:
    raise ValueError(f"--checkpoints must be 'all', 'last' or steps like '100,300', "
                     f'got {which!r}.') from None
  missing = [s for s in steps if s != 0 and s not in available]
  if missing:
    raise ValueError(f'No checkpoint at step(s) {missing}; the workdir has {available}.')
  return steps


def scalars_of(result: dict[str, Any]) -> dict[str, float]:
  """The headline numbers of one step's diagnostics, for TensorBoard."""
  out = {}
  for rep, info in result['information'].items():
    for key in ('effective_rank', 'conditional_entropy', 'conditional_entropy_paper',
                'invariance', 'logdet_entropy', *[f'entropy_{e}' for e in ENTROPIES],
                *information.MI_KEYS):
      out[f'information/{rep}/{key}'] = info[key]
    contradicted = info['model_check']['contradicted']
    out[f'information/{rep}/model_contradicted'] = (float('nan') if contradicted is None
                                                    else float(contradicted))
  loc = result['locality']
  for scale, share, z_share in zip(loc['scales'], loc['encoder'], loc['z_region']):
    out[f'locality/noise_{scale:g}'] = share
    out[f'locality/z_region_noise_{scale:g}'] = z_share
  out['locality/augmentation'] = loc['augmentation']['encoder']
  out['locality/z_region_augmentation'] = loc['augmentation']['z_region']
  for rep, g in result['gaussianity'].items():
    for key in ('henze_zirkler_pass_rate', 'mardia_skewness_pass_rate',
                'mardia_kurtosis_pass_rate', 'shapiro_wilk_pass_rate'):
      out[f'gaussianity/{rep}/{key}'] = g[key]
  for key, value in result['generalisation'].items():
    out[f'generalisation/{key}'] = value
  return {k: float(v) for k, v in out.items()}


def diagnose_workdir(workdir: str, *, checkpoints: str = 'all',
                     settings: Settings = Settings(), progress: bool = True,
                     out_dir: Optional[str] = None) -> dict[str, Any]:
  """Diagnoses a training workdir's checkpoints; writes out_dir (DIR/diagnostics/).

  diagnostics.json (every step diagnosed so far, merged with earlier runs of
  this command), TensorBoard scalars at each checkpoint's step, and PNG
  figures. The result file is rewritten after each step, so an interrupted
  command keeps what it finished. It refuses to write into a workdir that is
  still training (pass out_dir elsewhere, or wait).
  """
  from ssl_jax import checkpointing
  from ssl_jax import metrics as metrics_lib
  from ssl_jax import runs
  from ssl_jax import workdir_lock
  out_dir = out_dir or os.path.join(workdir, 'diagnostics')
  if os.path.abspath(out_dir).startswith(os.path.abspath(workdir) + os.sep):
    workdir_lock.refuse_if_training(workdir, 'ssl_jax.diagnose')
  config = runs.read_config(workdir)
  input_pipeline.hide_accelerators_from_tensorflow()
  mesh = sharding.make_mesh()
  run = runs.build(config, mesh)
  manager = checkpointing.make_manager(workdir, max_to_keep=config.keep_checkpoints,
                                       keep_period=config.get('keep_checkpoint_period', 0),
                                       create=False)
  steps = select_steps(manager.all_steps(), checkpoints)
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, 'diagnostics.json')
  record = {'workdir': os.path.abspath(workdir), 'method': config.method, 'steps': {}}
  if os.path.exists(json_path):
    with open(json_path) as f:
      record = json.load(f)
  record['settings'] = dataclasses.asdict(settings)
  net = Network(run, mesh, batch_size=settings.batch_size)
  data = FixedData.load(config, run.spec, settings)
  writer = metrics_lib.MetricWriter(out_dir, enabled=jax.process_index() == 0)
  from tqdm import tqdm
  bar = tqdm(total=len(steps) * 4, disable=not progress, desc='diagnose', unit='part',
             dynamic_ncols=True)
  for step in steps:
    if step == 0:  # the initialisation, rebuilt from the seed
      params, batch_stats = run.state.params, run.state.batch_stats
    else:
      state = checkpointing.restore_step(manager, step, run.abstract_state(mesh), config)
      params, batch_stats = state.params, state.batch_stats

    def report(part, step=step):
      bar.set_postfix_str(f'step {step}: {part}')
      if not report.first:
        bar.update(1)
      report.first = False
    report.first = True
    result = diagnose_state(net, params, batch_stats, data, settings, beta=run_beta(config),
                            num_classes=run.spec.num_classes, report=report)
    bar.update(1)
    record['steps'][str(step)] = result
    writer.write_scalars(step, scalars_of(result))
    if jax.process_index() == 0:
      with open(json_path + '.tmp', 'w') as f:
        json.dump(record, f)
      os.replace(json_path + '.tmp', json_path)
  bar.close()
  writer.flush()
  manager.close()
  if jax.process_index() == 0:
    record['figures'] = figures.plot_diagnostics(record, out_dir)
  return record
