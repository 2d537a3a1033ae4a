"""Label-free selection: which quantity of the frozen features ranks runs like the probe?

Over an experiment grid's tuning cells (evaluated on the validation split),
each LABEL_FREE quantity is compared with the validation linear probe:

- pooled Spearman rho over every cell, with a 95% interval from a bootstrap
  that resamples methods (all of a drawn method's cells together): the cells
  of one method are not independent, and most of the pooled spread is
  between methods;
- Spearman rho within each method, and their mean;
- how often the quantity orders two cells of the same method as the probe
  does (pairs of cells of one method with different accuracy).

Quantities that change when the features are rescaled rank scales, not
representations (the pairwise entropy at the median bandwidth moves by
D log c when the features are multiplied by c): they are marked, and the
scale-free ones (effective rank, and the entropies of standardised features)
come first.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from typing import Any, Sequence

import numpy as np

# (quantity, scale-free?)
LABEL_FREE = (('effective_rank', True), ('entropy_logdet_standardized', True),
              ('entropy_pairwise_standardized', True), ('entropy_logdet', False),
              ('entropy_pairwise_upper', False), ('entropy_pairwise_lower', False),
              ('entropy_gaussian', False))
BOOTSTRAP = 2000


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman's rho of the finite pairs; nan for fewer than 3 or a constant."""
  from scipy import stats as sp_stats
  x, y = np.asarray(x, float), np.asarray(y, float)
  keep = np.isfinite(x) & np.isfinite(y)
  x, y = x[keep], y[keep]
  if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return math.nan
  return float(sp_stats.spearmanr(x, y).statistic)


def spearman_ci(x: Sequence[float], y: Sequence[float], level: float = 0.95
                ) -> tuple[float, float, float, int]:
  """Spearman's rho with a Fisher-z interval for independent pairs: (rho, low, high, n).

  SE = sqrt(1.06 / (n - 3)) (Fieller, Hartley & Pearson 1957); n >= 4, else nan.
  """
  from scipy import stats as sp_stats
  x, y = np.asarray(x, float), np.asarray(y, float)
  keep = np.isfinite(x) & np.isfinite(y)
  n = int(keep.sum())
  rho = spearman(x, y)
  if n < 4 or not math.isfinite(rho):
    return rho, math.nan, math.nan, n
  z = math.atanh(max(min(rho, 0.999999), -0.999999))
  half = sp_stats.norm.ppf(0.5 + level / 2) * math.sqrt(1.06 / (n - 3))
  return rho, math.tanh(z - half), math.tanh(z + half), n


def cluster_bootstrap(x: Sequence[float], y: Sequence[float], groups: Sequence[str], *,
                      draws: int = BOOTSTRAP, level: float = 0.95, seed: int = 0
                      ) -> tuple[float, float]:
  """Percentile interval of Spearman's rho when whole groups are resampled."""
  x, y, groups = np.asarray(x, float), np.asarray(y, float), np.asarray(groups)
  names = sorted(set(groups))
  rows = {g: np.flatnonzero(groups == g) for g in names}
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(draws):
    picked = np.concatenate([rows[names[i]] for i in rng.integers(0, len(names), len(names))])
    value = spearman(x[picked], y[picked])
    if math.isfinite(value):
      values.append(value)
  if len(values) < draws / 2:
    return math.nan, math.nan
  return (float(np.quantile(values, (1 - level) / 2)),
          float(np.quantile(values, (1 + level) / 2)))


def pairs_ordered(x: Sequence[float], y: Sequence[float], groups: Sequence[str]
                  ) -> tuple[int, int]:
  """(correctly ordered, total): pairs within a group with different y and finite x."""
  correct = total = 0
  for g in set(groups):
    rows = [i for i, h in enumerate(groups) if h == g and math.isfinite(x[i])]
    for i, j in itertools.combinations(rows, 2):
      if y[i] == y[j]:
        continue
      total += 1
      correct += (x[i] - x[j]) * (y[i] - y[j]) > 0
  return correct, total


def correlations(cells: list[dict[str, Any]], accuracy: str) -> dict[str, dict[str, Any]]:
  acc = [c['metrics'][accuracy] for c in cells]
  methods = [c['method'] for c in cells]
  rows = {}
  for q, scale_free in LABEL_FREE:
    values = [float(c['metrics'].get(q, math.nan)) for c in cells]
    if not any(math.isfinite(v) for v in values):
      continue
    rho, low, high, n = spearman_ci(values, acc)
    within = {}
    for m in sorted(set(methods)):
      idx = [i for i, h in enumerate(methods) if h == m]
      within[m] = spearman([values[i] for i in idx], [acc[i] for i in idx])
    finite = [v for v in within.values() if math.isfinite(v)]
    correct, total = pairs_ordered(values, acc, methods)
    rows[q] = {'scale_free': scale_free, 'spearman': rho, 'ci95_independent': [low, high],
               'ci95_cluster_bootstrap': list(cluster_bootstrap(values, acc, methods)),
               'within_method': within,
               'within_method_mean': float(np.mean(finite)) if finite else math.nan,
               'pairs_correct': correct, 'pairs': total, 'n': n}
  return rows


def label_free_selection(results_dir: str, out_prefix: str,
                         accuracy: str = 'linear_test_acc') -> dict[str, Any]:
  """Reads every tuning cell's result file in results_dir (diverged cells left out);
  writes out_prefix + '.json', '.md' and '.png' (one scatter per quantity)."""
  cells = []
  for name in sorted(os.listdir(results_dir)):
    if not name.endswith('.json'):
      continue
    with open(os.path.join(results_dir, name)) as f:
      result = json.load(f)
    if result.get('stage') == 'tune' and result.get('status', 'completed') != 'diverged' \
        and accuracy in result.get('metrics', {}):
      cells.append(result)
  if not cells:
    raise FileNotFoundError(f'No evaluated tuning cells in {results_dir}.')
  rows = correlations(cells, accuracy)
  out = {'results_dir': results_dir, 'accuracy': accuracy, 'cells': [
      {'cell': c['cell'], 'method': c['method'], accuracy: c['metrics'][accuracy],
       **{q: c['metrics'].get(q) for q, _ in LABEL_FREE}} for c in cells],
      'correlations': rows}
  with open(out_prefix + '.json', 'w') as f:
    json.dump(out, f, indent=1)
  with open(out_prefix + '.md', 'w') as f:
    f.write(markdown(out, results_dir))
  _plot(out, out_prefix + '.png')
  return out


def _interval(pair: Sequence[float]) -> str:
  return 'n/a' if not math.isfinite(pair[0]) else f'[{pair[0]:+.2f}, {pair[1]:+.2f}]'


def markdown(out: dict[str, Any], results_dir: str) -> str:
  cells = out['cells']
  methods = sorted({c['method'] for c in cells})
  lines = [f'Label-free selection over {len(cells)} tuning cells of {len(methods)} methods in '
           f'`{results_dir}`: Spearman correlation with the validation {out["accuracy"]}.', '',
           '- *pooled*: over all cells; the interval resamples whole methods (a cell is not '
           'independent of the other cells of its method); the Fisher-z interval, which '
           'assumes independent cells, is in the JSON;',
           '- *within method*: Spearman inside each method, averaged; *pairs*: two cells of one '
           'method ordered as the probe orders them;',
           '- *scale-free*: unchanged when the features are rescaled. The others move with '
           'the scale (the pairwise entropy at the median bandwidth by D log c), so they '
           'rank scales as much as representations.', '',
           '| quantity | scale-free | pooled rho | 95% (methods resampled) | within-method '
           'rho (mean) | pairs ordered correctly | cells |', '|---|---|---|---|---|---|---|']
  for q, r in out['correlations'].items():
    pairs = (f'{r["pairs_correct"]}/{r["pairs"]}' if r['pairs'] else 'n/a')
    within = r['within_method_mean']
    lines.append(f'| {q} | {"yes" if r["scale_free"] else "no"} | {r["spearman"]:+.2f} '
                 f'| {_interval(r["ci95_cluster_bootstrap"])} '
                 f'| {"n/a" if not math.isfinite(within) else f"{within:+.2f}"} | {pairs} '
                 f'| {r["n"]} |')
  lines += ['', 'Within each method (Spearman rho):', '',
            '| quantity | ' + ' | '.join(methods) + ' |', '|---|' + '---|' * len(methods)]
  for q, r in out['correlations'].items():
    lines.append(f'| {q} | ' + ' | '.join(
        'n/a' if not math.isfinite(r['within_method'][m]) else f'{r["within_method"][m]:+.2f}'
        for m in methods) + ' |')
  return '\n'.join(lines) + '\n'


def _plot(out: dict[str, Any], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  names = list(out['correlations'])
  fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.3), squeeze=False)
  axes = axes[0]
  methods = sorted({c['method'] for c in out['cells']})
  colours = dict(zip(methods, plt.cm.tab10.colors))
  for ax, q in zip(axes, names):
    for c in out['cells']:
      if c.get(q) is not None:
        ax.scatter(c[q], 100 * c[out['accuracy']], color=colours[c['method']], s=18,
                   label=c['method'])
    r = out['correlations'][q]
    ax.set_title(f'{q}{"" if r["scale_free"] else " (scale-dependent)"}\n'
                 f'pooled {r["spearman"]:+.2f}, within {r["within_method_mean"]:+.2f}',
                 fontsize=7)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(f'validation {out["accuracy"]} (%)')
  handles, labels = axes[0].get_legend_handles_labels()
  unique = dict(zip(labels, handles))
  fig.legend(unique.values(), unique.keys(), fontsize=7, loc='lower center', ncol=len(unique))
  fig.tight_layout(rect=(0, 0.08, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)
