"""Figures and console text of a run's diagnostics (`python -m ssl_jax.diagnose`)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ssl_jax.diagnostics.information import ENTROPIES
from ssl_jax.diagnostics.information import REPRESENTATIONS


def plot_diagnostics(record: dict[str, Any], out_dir: str) -> list[str]:
  """information.png, spectrum.png, locality.png, gaussianity.png, generalisation.png."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  steps = sorted(int(s) for s in record['steps'])
  results = [record['steps'][str(s)] for s in steps]
  title = f'{record.get("method", "")}: {os.path.basename(record.get("workdir", ""))}'
  colours = plt.cm.viridis(np.linspace(0, 0.9, len(steps)))
  marker = dict(marker='o', ms=3)
  paths = []

  def save(fig, name):
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

  # Information quantities over training.
  fig, axes = plt.subplots(2, 3, figsize=(14, 7))
  for row, rep in enumerate(REPRESENTATIONS):
    info = [r['information'][rep] for r in results]
    ax = axes[row, 0]
    for e in ENTROPIES:
      ax.plot(steps, [i[f'entropy_{e}'] for i in info], label=f'H {e}', **marker)
    ax.plot(steps, [i['conditional_entropy'] for i in info], 'k--', label='H(Z|X)', **marker)
    ax.plot(steps, [i['conditional_entropy_paper'] for i in info], 'k:',
            label='H(Z|X\') bound (q at the other view)', **marker)
    ax.set_title(f'{rep}: entropy estimates (nats)', fontsize=9)
    ax = axes[row, 1]
    for key, style in (('mi_estimate', '-'), ('mi_pairwise_lower', '--'),
                       ('mi_infonce_lower', ':'), ('mi_gaussian_upper', '-.')):
      ax.plot(steps, [i[key] for i in info], style, label=key, **marker)
    ax.plot(steps, [i['log_num_images'] for i in info], 'k--', lw=0.8, label='log N')
    bad = [s for s, i in zip(steps, info) if i['model_check']['contradicted']]
    panel = f'{rep}: I(Z;X) under Z|X ~ N(mu, Sigma), X uniform over N images'
    if bad:
      panel += f'\nmodel contradicted at steps {bad}: not a mutual information there'
      for s in bad:
        ax.axvline(s, color='red', alpha=0.25)
    ax.set_title(panel, fontsize=8)
    ax = axes[row, 2]
    ax.plot(steps, [i['effective_rank'] for i in info], color='C3', **marker)
    ax.set_title(f'{rep}: effective rank (of {info[0]["dim"]})', fontsize=9)
    for ax in axes[row]:
      ax.set_xlabel('step')
      ax.grid(alpha=0.3)
    axes[row, 0].legend(fontsize=6)
    axes[row, 1].legend(fontsize=6)
  save(fig, 'information.png')

  # Covariance spectra.
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, rep in zip(axes, REPRESENTATIONS):
    for c, s, r in zip(colours, steps, results):
      eig = np.asarray(r['information'][rep]['spectrum'])
      ax.semilogy(np.arange(1, len(eig) + 1), np.maximum(eig, 1e-12), color=c,
                  label=f'step {s}')
    ax.set_xscale('log')
    ax.set_title(f'{rep}: covariance eigenvalues', fontsize=9)
    ax.set_xlabel('index')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  save(fig, 'spectrum.png')

  # Locality.
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for c, s, r in zip(colours, steps, results):
    loc = r['locality']
    axes[0].semilogx(loc['scales'], loc['encoder'], color=c, label=f'step {s}', **marker)
    axes[0].semilogx(loc['scales'], loc['z_region'], ':', color=c)
  last = results[-1]['locality']
  per_layer = np.asarray(last['per_layer'])
  agreement = np.asarray(last['unit_agreement'])
  for layer in range(per_layer.shape[1]):
    where = ('encoder' if layer < last['encoder_layers']
             else 'projector')
    line, = axes[1].semilogx(last['scales'], per_layer[:, layer],
                             label=f'{where} ReLU {layer + 1}')
    axes[1].semilogx(last['scales'], agreement[:, layer], ':', color=line.get_color())
  axes[2].plot(steps, [r['locality']['augmentation']['encoder'] for r in results],
               label='same region (whole encoder)', **marker)
  axes[2].plot(steps, [r['locality']['augmentation']['z_region'] for r in results],
               label='same region (encoder and projector: Z)', **marker)
  axes[2].plot(steps, [np.mean(r['locality']['augmentation']['unit_agreement'])
                       for r in results], label='units agreeing (mean over layers)', **marker)
  axes[0].set_title('share of noisy copies in the clean input\'s linear region\n'
                    '(solid: encoder; dotted: encoder and projector, Z\'s region)', fontsize=8)
  axes[0].set_xlabel('noise std (normalised input units)')
  axes[1].set_title(f'step {steps[-1]}, per ReLU layer: same pattern (solid), share of units '
                    'agreeing (dotted)', fontsize=8)
  axes[1].set_xlabel('noise std')
  axes[2].set_title('training augmentations vs the clean image', fontsize=9)
  axes[2].set_xlabel('step')
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  save(fig, 'locality.png')

  # Gaussianity.
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  tests = ('henze_zirkler', 'mardia_skewness', 'mardia_kurtosis', 'shapiro_wilk')
  for ax, rep in zip(axes[:2], REPRESENTATIONS):
    for t in tests:
      ax.plot(steps, [r['gaussianity'][rep][f'{t}_pass_rate'] for r in results], label=t,
              **marker)
    g0 = results[-1]['gaussianity'][rep]
    ax.axhline(g0['nominal_pass_rate'], color='k', ls='--', label='nominal (Gaussian)')
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f'{rep}: pass rate at alpha={g0["level"]}, {g0["dims"]}-d projections, '
                 f'{g0["tested_views"]} views', fontsize=8)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  for rep, style in zip(REPRESENTATIONS, ('-', '--')):
    spec = np.asarray(results[-1]['gaussianity'][rep]['within_image_spectrum'])
    axes[2].semilogy(np.arange(1, len(spec) + 1), np.maximum(spec, 1e-12), style, label=rep)
  axes[2].set_title(f'step {steps[-1]}: within-image covariance spectrum (share of variance)',
                    fontsize=8)
  axes[2].set_xlabel('index')
  axes[2].grid(alpha=0.3)
  axes[2].legend(fontsize=7)
  save(fig, 'gaussianity.png')

  # Generalisation terms.
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  gen = [r['generalisation'] for r in results]
  for key in ('train_error', 'test_error', 'error_gap', 'heldout_error_bound'):
    axes[0].plot(steps, [g[key] for g in gen], label=key, **marker)
  axes[0].set_title('linear probe on frozen features: 0-1 risk; the held-out bound holds\n'
                    'with probability 1 - delta (Hoeffding on images the probe never saw)',
                    fontsize=8)
  for key in ('train_risk', 'test_risk', 'risk_gap'):
    axes[1].plot(steps, [g[key] for g in gen], label=key, **marker)
  ax2 = axes[1].twinx()
  ax2.plot(steps, [g['loss_shift_bound'] for g in gen], 'k:',
           label='sqrt(2) E||W^T (g(x)-g(x\'))||', **marker)
  ax2.legend(fontsize=6, loc='upper right')
  axes[1].set_title('cross-entropy risk; right: the bound on E|loss(x) - loss(x\')|', fontsize=9)
  for ax in axes:
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc='upper left')
  save(fig, 'generalisation.png')
  return paths


def summary_text(record: dict[str, Any]) -> str:
  """A few lines per diagnosed step, for the console."""
  lines = []
  for step in sorted(record['steps'], key=int):
    r = record['steps'][step]
    info = r['information']
    loc, gen = r['locality'], r['generalisation']
    lines.append(f'step {step}:')
    for rep in REPRESENTATIONS:
      i, g = info[rep], r['gaussianity'][rep]
      check = i['model_check']
      if 'mi_unavailable' in i:
        mi = f'I(Z;X) not estimated: {i["mi_unavailable"]}'
      elif check['contradicted']:
        mi = (f'the views contradict the model Z|X ~ N(mu, Sigma) '
              f'({check["eigenvalues_below_noise"]} of {i["dim"]} eigenvalues below the '
              'noise): no mutual information is reported')
      else:
        mi = (f'I(Z;X) {i["mi_estimate"]:.2f} in [{max(i["mi_pairwise_lower"], i["mi_infonce_lower"]):.2f}, '
              f'{i["mi_gaussian_upper"]:.2f}] (log N {i["log_num_images"]:.2f}, '
              f'{i["signal_directions"]} signal directions)')
      lines.append(
          f'  {rep:8s} eff. rank {i["effective_rank"]:.1f}/{i["dim"]}; H: gaussian '
          f'{i["entropy_gaussian"]:.1f}, logdet {i["entropy_logdet"]:.1f}, pairwise '
          f'[{i["entropy_pairwise_lower"]:.1f}, {i["entropy_pairwise_upper"]:.1f}]; {mi}; '
          f'Gaussian views: HZ pass {g["henze_zirkler_pass_rate"]:.2f} '
          f'(nominal {g["nominal_pass_rate"]:.2f}), SW {g["shapiro_wilk_pass_rate"]:.2f}')
    shares = ', '.join(f'{s:g}: {v:.2f}/{z:.2f}' for s, v, z in
                       zip(loc['scales'], loc['encoder'], loc['z_region']))
    lines.append(f'  locality (same linear region, encoder/Z) by noise std: {shares}; '
                 f'augmentations: {loc["augmentation"]["encoder"]:.2f}/'
                 f'{loc["augmentation"]["z_region"]:.2f}')
    lines.append(f'  probe: train err {gen["train_error"]:.4f}, test err {gen["test_error"]:.4f}'
                 f'; held-out bound {gen["heldout_error_bound"]:.4f} '
                 f'({"vacuous" if gen["vacuous"] else "not vacuous"}); logits move '
                 f'{gen["logit_shift"]:.3f} between views (||W||_2 x gap: '
                 f'{gen["spectral_term"]:.2f})')
  return '\n'.join(lines)
