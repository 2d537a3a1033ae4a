"""The eight-method comparison at a budget where every method learns (cnn512).

  python -m ssl_jax.experiments --config=configs/experiments/fmnist_compare_long.py \
      --root=runs/compare_long          # resumable; --shard=i/k splits it over machines

Protocol (docs/results.md):
- budget: TOTAL_STEPS, from the pilot (configs/experiments/fmnist_pilot.py,
  results/fmnist_pilot.md): the smallest step count at which VICReg and BYOL both
  beat raw pixels by 2 points of validation linear accuracy;
- the default encoder (small CNN 32-64-128-512), batch 256, augmentations and probe
  for every method;
- 3 tuning trials per method at seed 0, on the 10,000-image validation hold-out
  (a diverged trial counts as one): the base methods tune the learning rate on a
  grid centred on their 300-step choice (results/fmnist_compare.md) and extended
  past an edge they chose (BYOL chose its lowest, 0.3: its grid goes to 0.1);
  the entropy variants tune their weight (a quarter, once and four times their
  300-step choice) at the learning rate their base chose at 300 steps, the centre
  of the base's grid, with their 300-step variant (add/replace, inputs, sphere);
- 5 fresh final seeds (1-5) per method on the test split: no final cell reuses a
  tuning run;
- raw pixels and the random-init encoder measured in every cell (cached: computed
  once per split and seed), so that each table carries them.
Grid cells skip the online probe, the training diagnostics and the embedding map.
"""

import ml_collections

TOTAL_STEPS = 2000   # the pilot's budget (results/fmnist_pilot.md)
SHARED = (f'data.holdout=10000, total_steps={TOTAL_STEPS}, eval.baselines=True, '
          'eval.online_every_steps=0, diagnostics.every_steps=0, eval.embedding_map=False, '
          'ckpt_every_steps=250, keep_checkpoint_period=0')

LOGDET = 'loss.terms.logdet_entropy'
PAIRWISE = 'loss.terms.pairwise_entropy'


def lrs(*values):
  return [f'optim.base_lr={v}' for v in values]


def weights(lr, term, weight, extra=''):
  """The weight at a quarter, once and four times its 300-step value, at one lr."""
  return [f'optim.base_lr={lr}, {term}.weight={w:g}{extra}'
          for w in (weight / 4, weight, weight * 4)]


def get_config():
  c = ml_collections.ConfigDict()
  c.name = 'fmnist_compare_long'
  c.description = (f'Fashion-MNIST, small CNN 32-64-128-512, {TOTAL_STEPS} steps of batch 256, '
                   '2 CPU cores; tuned (3 trials) on a 10,000-image validation hold-out, 5 '
                   'fresh final seeds on the test split.')
  c.budget_label = f'{TOTAL_STEPS} steps (cnn512)'
  c.compare_with = 'configs/experiments/fmnist_compare.py'
  c.shared = SHARED
  c.tune_seed = 0
  c.final_seeds = (1, 2, 3, 4, 5)
  c.methods = dict(
      vicreg=dict(config='configs/vicreg.py', trials=lrs(0.1, 0.3, 1.0)),
      vicreg_it=dict(config='configs/vicreg_it.py', trials=weights(0.3, LOGDET, 0.25)),
      vicreg_pairdist=dict(config='configs/vicreg_pairdist.py',
                           trials=weights(0.3, PAIRWISE, 1.0, ', variant=add')),
      byol=dict(config='configs/byol.py', trials=lrs(0.1, 0.3, 1.0)),
      byol_logdet=dict(config='configs/byol_logdet.py', trials=weights(
          0.3, LOGDET, 0.05, f', {LOGDET}.inputs=z, {LOGDET}.sphere=True')),
      byol_pairdist=dict(config='configs/byol_pairdist.py', trials=weights(
          0.3, PAIRWISE, 0.25, f', {PAIRWISE}.inputs=p')),
      simclr=dict(config='configs/simclr.py', trials=lrs(0.4, 1.0, 2.0)),
      barlow_twins=dict(config='configs/barlow_twins.py', trials=lrs(0.1, 0.3, 1.0)),
  )
  return c
