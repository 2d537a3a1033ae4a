"""The budget pilot of the long comparison (configs/experiments/fmnist_compare_long.py).

  python -m ssl_jax.experiments --config=configs/experiments/fmnist_pilot.py \
      --root=runs/pilot --max_cells=2

The smallest step count at which VICReg and BYOL both beat raw pixels by at
least 2 points of validation linear accuracy, with the default encoder
(32-64-128-512), batch 256, and each method's learning rate chosen at 300
steps (results/fmnist_compare.md: 0.3 for both). Trials are step counts,
tried in order (trial-major: VICReg then BYOL at 1,000 steps, then 1,500, ...);
stop the runner once a step count passes for both. If BYOL needs more than
3,000, the comparison uses 3,000 and says so. Evaluated on the 10,000-image
validation hold-out only; raw pixels and the random-init encoder are measured
there too (eval.baselines, cached after the first cell).

Outcome (results/fmnist_pilot.md): BYOL +1.50 points at 1,500 steps, +2.12 at 2,000;
VICReg +3.78 at 1,000. Budget: 2,000 steps. VICReg's 2,000-step cell is the long
comparison's VICReg trial 1 (same settings), so it is not run here.
"""

import ml_collections

SHARED = ('data.holdout=10000, eval.baselines=True, eval.online_every_steps=0, '
          'diagnostics.every_steps=0, ckpt_every_steps=250, keep_checkpoint_period=0, '
          'optim.base_lr=0.3')


def get_config():
  c = ml_collections.ConfigDict()
  c.name = 'fmnist_pilot'
  c.description = ('Budget pilot: VICReg and BYOL (learning rate 0.3, their 300-step choice) '
                   'at growing step counts, validation split; the budget is the first step '
                   'count where both beat raw pixels by 2 points of linear accuracy.')
  c.shared = SHARED
  c.tune_seed = 0
  c.final_seeds = ()
  # Tried in this order: 2,000 came second once BYOL stood at raw pixels + 0.3
  # after 1,000 (a bisection; 1,500 is only run if 2,000 passes).
  steps = [f'total_steps={s}' for s in (1000, 2000, 1500, 3000)]
  c.methods = dict(vicreg=dict(config='configs/vicreg.py', trials=steps),
                   byol=dict(config='configs/byol.py', trials=steps))
  # The report's budget: the smallest total_steps at which every method has
  # beaten raw pixels by 2 points of validation linear accuracy.
  c.pilot = dict(setting='total_steps', margin=0.02)
  c.not_run = ('the pilot stopped once 2,000 steps passed for both methods. VICReg at 2,000 '
               'steps is the long comparison\'s VICReg trial 1 (the same settings; '
               'results/fmnist_compare_long.md); BYOL at 3,000 was not needed.')
  return c
