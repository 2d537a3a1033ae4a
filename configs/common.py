"""Shared config blocks: `get_config(method, arg)` builds every method's config.

Each configs/<method>.py is a thin `get_config(arg)` over this file, so every
experiment of the paper is a config, not a code path. The argument after the
colon picks variants, comma-separated:

  configs/vicreg_it.py                 Fashion-MNIST default, ~10 min on 2 CPU cores
  configs/vicreg_it.py:cifar10         solo-learn CIFAR recipe (ResNet-18, 1000 epochs)
  configs/vicreg_it.py:cifar100 / :stl10 / :imagenet (official VICReg ImageNet recipe)
  configs/vicreg_it.py:smoke           a few tiny steps, for tests
  configs/vicreg_pairdist.py:lower     Bhattacharyya lower bound instead of the KL upper
  configs/vicreg_it.py:add             keep VICReg's variance + covariance next to the entropy

Any value can then be overridden: --config.loss.terms.logdet_entropy.weight=2
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from ssl_jax import augment
from ssl_jax import objectives

VARIANTS = ('smoke', 'cifar10', 'cifar100', 'stl10', 'imagenet', 'lower', 'add', 'concat')

# Per-method recipe differences (docs/method.md section 4): projector / predictor,
# base learning rate and weight decay of the solo-learn CIFAR recipes.
RECIPES = {
    'vicreg': dict(projector='2048-2048-2048', base_lr=0.3, weight_decay=1e-4),
    'vicreg_it': dict(projector='2048-2048-2048', base_lr=0.3, weight_decay=1e-4),
    'vicreg_pairdist': dict(projector='2048-2048-2048', base_lr=0.3, weight_decay=1e-4),
    'barlow_twins': dict(projector='2048-2048-2048', base_lr=0.3, weight_decay=1e-4),
    'simclr': dict(projector='2048-256', base_lr=0.4, weight_decay=1e-5),
    'byol': dict(projector='4096-256', predictor='4096-256', base_lr=1.0, weight_decay=1e-5),
    'byol_logdet': dict(projector='4096-256', predictor='4096-256', base_lr=1.0,
                        weight_decay=1e-5),
    'byol_pairdist': dict(projector='4096-256', predictor='4096-256', base_lr=1.0,
                          weight_decay=1e-5),
}


def parse_arg(arg):
  """'cifar10,lower' -> {'cifar10', 'lower'}, rejecting unknown variants."""
  variants = {v.strip() for v in (arg or '').split(',') if v.strip()}
  unknown = variants - set(VARIANTS)
  if unknown:
    raise ValueError(f'Unknown config variant(s) {sorted(unknown)}; known: {VARIANTS}.')
  datasets = variants & {'cifar10', 'cifar100', 'stl10', 'imagenet'}
  if len(datasets) > 1:
    raise ValueError(f'Pick at most one dataset variant, got {sorted(datasets)}.')
  return variants


def _view_overrides():
  """One typed placeholder per augmentation parameter: None means "the preset's value".

  Typed, not bare None: ml_collections cannot infer a command-line type from
  None, so `--config.aug.view_a.blur_prob=0.5` would be refused.
  """
  return {f.name: config_dict.placeholder(tuple if f.default.__class__ is tuple else float)
          for f in dataclasses.fields(augment.ViewParams)}


def get_config(method: str, arg=None) -> ml_collections.ConfigDict:
  variants = parse_arg(arg)
  recipe = RECIPES[method]
  c = ml_collections.ConfigDict()
  c.method = method
  c.seed = 0

  # Fashion-MNIST default: sized to pretrain and evaluate in about 10 minutes
  # on 2 CPU cores.
  # holdout: a fixed, class-balanced set of that many train images kept out of
  # pretraining and probe training; eval_on='validation' evaluates on them
  # instead of the test split (hyper-parameter search; configs/experiments/).
  # data_dir and image_size are typed placeholders (None: TFDS's default data dir,
  # the dataset's own size), so that the command line can set them.
  c.data = dict(name='fashion_mnist', batch_size=256, data_dir=config_dict.placeholder(str),
                shuffle_buffer=60_000, prefetch=2, image_size=config_dict.placeholder(int),
                holdout=0, eval_on='test',
                # input_shards: independently shuffled parts of the split, a
                # multiple of the process count (0: one per process). The global
                # batches depend on it, not on the process count.
                input_shards=0)
  c.aug = dict(preset='fashion_mnist', view_a=_view_overrides(), view_b=_view_overrides())
  # encoder.channels: small_cnn's per-layer widths ('': 32-64-128-256). The
  # default's last conv is 512 wide: 512 features for the probe, at about 1.4x the
  # step time of 256, reached higher accuracy at equal wall-clock budgets
  # (benchmarks/time_to_accuracy.py, README "Time to accuracy"). ResNets take only
  # the width multiplier.
  c.model = dict(encoder=dict(name='small_cnn', width=1.0, stem='cifar',
                              channels='32-64-128-512'),
                 projector='1024-1024-1024', predictor='1024-256', dtype='float32',
                 # 'auto': Winograd and im2col matmuls on CPU (ssl_jax/conv.py), lax.conv on
                 # GPU/TPU; 'winograd', 'im2col' or 'lax' force one; 'winograd7' (opt-in)
                 # adds F(7x7) tiles on 7x7/14x14 outputs: faster, more round-off.
                 conv_route='auto')
  if 'predictor' in recipe:
    c.model.projector, c.model.predictor = '1024-256', '1024-256'
  c.loss = dict(terms=objectives.method_terms(
      method, vicreg_terms='add' if 'add' in variants else 'replace'))
  c.optim = dict(name='lars', base_lr=recipe['base_lr'], lr_scaling='linear',
                 weight_decay=recipe['weight_decay'], momentum=0.9, trust_coefficient=0.02,
                 min_lr_ratio=0.0)
  c.byol = dict(tau_base=0.99)
  c.probe = dict(lr=0.1, momentum=0.9)
  c.total_epochs, c.total_steps = 1.3, 0
  c.warmup_epochs, c.warmup_steps = 0.1, 0
  c.log_every_steps, c.ckpt_every_steps, c.keep_checkpoints = 10, 100, 3
  # Checkpoints at multiples of this step are kept besides the newest
  # keep_checkpoints, for `python -m ssl_jax.diagnose` over training (0: off).
  c.keep_checkpoint_period = 100
  c.async_checkpoints = True
  # An unreadable newest checkpoint is moved to checkpoints/corrupt/ and the run
  # resumes from the one before; True refuses to start instead.
  c.checkpoint_strict = False
  c.stop_at_step = 0   # > 0: stop there with a checkpoint, as if pre-empted
  # online_every_steps: the online probe's test accuracy is measured at logged
  # steps that are multiples of it and at the end (a multiple less than one log
  # interval before the end is skipped: metrics.periodic_due), on the first
  # online_max_examples test images (0: all); 0 turns it off. The final
  # evaluation measures it on the whole test split. Every 100 steps on 2,000
  # images keeps this periodic work, with the diagnostics below, under 5% of
  # pretraining (every 50 on all 10,000 images cost about a fifth).
  # baselines: raw pixels and the random-init encoder, cached across runs
  # (evaluate.read_cached_baselines).
  c.eval = dict(enabled=True, batch_size=1000, linear_epochs=30, linear_lr=1e-3,
                linear_batch_size=1024, knn_k=(20, 200), knn_temperature=0.07,
                baselines=True, max_train_examples=0, max_test_examples=0,
                online_every_steps=100, online_max_examples=2000,
                # embedding_map: a t-SNE picture of 2,000 test embeddings
                # (workdir/embedding_map.png, about 10 s on 2 cores).
                embedding_map=True)

  # Logged during training every every_steps (0: off) on num_images fixed
  # evaluation images: entropy estimates, effective rank, invariance.
  c.diagnostics = dict(every_steps=100, num_images=512)

  for term in c.loss.terms.values():
    if 'mode' in term and 'concat' in variants:
      term.mode = 'concat'
  if 'lower' in variants:
    if 'pairwise_entropy' not in c.loss.terms:
      raise ValueError("Variant 'lower' applies to the pairwise-distance methods only.")
    c.loss.terms.pairwise_entropy.bound = 'lower'

  if variants & {'cifar10', 'cifar100', 'stl10'}:
    # solo-learn CIFAR recipe: ResNet-18 (CIFAR stem), batch 256, LARS eta 0.02,
    # 10 warm-up epochs then cosine, 1000 epochs.
    c.data.name = (variants & {'cifar10', 'cifar100', 'stl10'}).pop()
    c.data.shuffle_buffer = 50_000
    c.aug.preset = 'cifar'
    stem = 'imagenet' if c.data.name == 'stl10' else 'cifar'
    c.model.encoder = dict(name='resnet18', width=1.0, stem=stem)
    c.model.projector = recipe['projector']
    c.model.predictor = recipe.get('predictor', '4096-256')
    c.total_epochs, c.warmup_epochs = 1000, 10
    c.log_every_steps, c.ckpt_every_steps = 50, 2000
    c.eval.linear_epochs, c.eval.baselines = 100, False
    c.eval.online_every_steps = 1000
    c.keep_checkpoint_period, c.diagnostics.every_steps = 25_000, 1000
  if 'imagenet' in variants:
    # Official VICReg: ResNet-50, projector 8192-8192-8192, LARS eta 1e-3, wd 1e-6,
    # lr = 0.2 * batch / 256, batch 2048, 10 warm-up epochs, cosine to 0.001x.
    c.data.name, c.data.batch_size, c.data.shuffle_buffer = 'imagenet2012', 2048, 10_000
    c.aug.preset = 'imagenet'
    c.model.encoder = dict(name='resnet50', width=1.0, stem='imagenet')
    c.model.projector = '8192-8192-8192' if 'predictor' not in recipe else '4096-256'
    c.model.predictor = '4096-256'
    c.model.dtype = 'bfloat16'
    c.optim.update(base_lr=0.2, weight_decay=1e-6, trust_coefficient=1e-3, min_lr_ratio=1e-3)
    c.total_epochs, c.warmup_epochs = 1000, 10
    c.log_every_steps, c.ckpt_every_steps = 100, 2500
    c.eval.update(linear_epochs=100, batch_size=1024, baselines=False,
                  online_every_steps=2500, online_max_examples=10_000)
    c.keep_checkpoint_period, c.diagnostics.every_steps = 62_500, 2500
    c.diagnostics.num_images = 1024
  if 'smoke' in variants:
    c.data.batch_size, c.data.shuffle_buffer = 16, 64
    c.model.encoder = dict(name='small_cnn', width=0.25, stem='cifar', channels='')
    c.model.projector, c.model.predictor = '32-32', '32-32'
    c.model.dtype = 'float32'
    c.total_epochs, c.total_steps, c.warmup_steps = 0, 3, 1
    c.log_every_steps, c.ckpt_every_steps = 1, 2
    c.eval.update(batch_size=16, linear_epochs=2, linear_batch_size=16, knn_k=(2, 5),
                  max_train_examples=64, max_test_examples=32, online_every_steps=2,
                  online_max_examples=32)
    c.keep_checkpoint_period = 2
    c.diagnostics.update(every_steps=2, num_images=16)
  return c
