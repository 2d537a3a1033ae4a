"""The paper's eight-method comparison on Fashion-MNIST, on 2 CPU cores.

  python -m ssl_jax.experiments --config=configs/experiments/fmnist_compare.py \
      --root=runs/compare            # resumable; --shard=i/k splits it over machines

Protocol (README, "The comparison"): 10,000 class-balanced training images are
held out as a validation split; pretraining and the probes use the other
50,000. Every method gets the same encoder (small CNN), budget (300 steps of
batch 256 = 1.5 epochs of the 50,000), augmentations and probe. Each method
has 4 tuning trials at seed 0, scored by the validation linear probe; the best
one runs at seeds 0-2 and is evaluated once on the test split.

Trials are comma-separated overrides of the method's config; `variant=add`
picks the config variant that keeps VICReg's variance + covariance terms next
to the entropy term.
"""

import ml_collections

# The encoder is pinned to the small CNN the grid ran with (32-64-128-256), the
# default before the 512-wide last layer, so that resuming or extending the grid
# (more seeds) runs the same model as its finished cells.
SHARED = ('data.holdout=10000, total_steps=300, eval.baselines=False, '
          'eval.online_every_steps=0, model.encoder.channels=32-64-128-256')

LOGDET = 'loss.terms.logdet_entropy'
PAIRWISE = 'loss.terms.pairwise_entropy'


def byol_entropy_trials(term):
  """The same 4 trials for BYOL + LogDet and BYOL + PairDist: weight, z vs p, lr."""
  return [f'optim.base_lr=1.0, {term}.weight=0.25, {term}.inputs=z',
          f'optim.base_lr=1.0, {term}.weight=0.25, {term}.inputs=p',
          f'optim.base_lr=1.0, {term}.weight=1.0, {term}.inputs=z',
          f'optim.base_lr=2.0, {term}.weight=0.25, {term}.inputs=z']


def get_config():
  c = ml_collections.ConfigDict()
  c.name = 'fmnist_compare'
  c.budget_label = '300 steps (cnn256)'
  c.description = ('Fashion-MNIST, small CNN, 300 steps of batch 256, 2 CPU cores; tuned on a '
                   '10,000-image validation hold-out, final seeds on the test split.')
  c.shared = SHARED
  c.tune_seed = 0
  c.final_seeds = (0, 1, 2)
  lrs = lambda *values: [f'optim.base_lr={v}' for v in values]
  c.methods = dict(
      vicreg=dict(config='configs/vicreg.py', trials=lrs(0.1, 0.3, 1.0, 3.0)),
      vicreg_it=dict(config='configs/vicreg_it.py', trials=[
          f'optim.base_lr=0.3, {LOGDET}.weight=0.25',
          f'optim.base_lr=1.0, {LOGDET}.weight=0.25',
          f'optim.base_lr=0.3, {LOGDET}.weight=1.0, {LOGDET}.beta=0.25',
          f'optim.base_lr=0.3, {LOGDET}.weight=0.25, variant=add']),
      vicreg_pairdist=dict(config='configs/vicreg_pairdist.py', trials=[
          f'optim.base_lr=0.3, {PAIRWISE}.weight=1.0',
          f'optim.base_lr=0.3, {PAIRWISE}.weight=1.0, {PAIRWISE}.bound=lower',
          f'optim.base_lr=0.3, {PAIRWISE}.weight=1.0, variant=add',
          f'optim.base_lr=1.0, {PAIRWISE}.weight=1.0, variant=add']),
      byol=dict(config='configs/byol.py', trials=lrs(0.3, 1.0, 2.0, 4.0)),
      # Trials 0-1 (raw z and p) diverged to NaN; 2-3 were redefined before they ran, to
      # the log-det on the sphere (objectives.on_sphere), where scale cannot run away.
      byol_logdet=dict(config='configs/byol_logdet.py', trials=byol_entropy_trials(LOGDET)[:2] + [
          f'optim.base_lr=1.0, {LOGDET}.weight=0.25, {LOGDET}.inputs=z, {LOGDET}.sphere=True',
          # Weight 0.25 on the sphere still diverged (step 76), with BYOL's own
          # loss rising past 2 as the log-det pulled the projections apart; 0.05
          # trained stably for 150 steps in a short check, so the last trial
          # lowers the weight instead of raising it to 1.0 as first planned.
          f'optim.base_lr=1.0, {LOGDET}.weight=0.05, {LOGDET}.inputs=z, {LOGDET}.sphere=True']),
      byol_pairdist=dict(config='configs/byol_pairdist.py',
                         trials=byol_entropy_trials(PAIRWISE)),
      simclr=dict(config='configs/simclr.py', trials=lrs(0.1, 0.4, 1.0, 2.0)),
      barlow_twins=dict(config='configs/barlow_twins.py', trials=lrs(0.1, 0.3, 1.0, 3.0)),
  )
  return c
