"""An experiment grid's report: tables, verdicts, plots and the README block.

Reads the result files of `ssl_jax.grid` and nothing else, so a report can be
rebuilt on any machine from the committed files
(`python -m ssl_jax.experiments --config=... --aggregate_only`).

Verdicts (printed with the tables, VERDICT_RULE): each paper claim is an
entropy variant minus its base method, paired over the final seeds both
have. The linear-probe differences get a two-sided paired t-test, and the
claims are corrected together by Holm-Bonferroni: ordered by p-value, the
claim ranked r of m is tested at level alpha / (m - r + 1), and once one is
not rejected none after it is. Its "corrected interval" is the paired
Student-t interval at that level, which excludes 0 exactly when the test
rejects. Then:
  reproduced      the corrected interval is above 0 (the step-down test
                  rejects), and the mean kNN-20 difference is not below 0;
  not reproduced  the corrected interval is below 0, or it excludes every
                  gain of GAIN_THRESHOLD (1 point) or more;
  inconclusive    otherwise, with the smallest difference these seeds could
                  detect at that level with 80% power.
"""

from __future__ import annotations

import collections
import math
import os
from typing import Any, Optional, Sequence

from scipy import stats as sp_stats

from ssl_jax import grid

# Paired comparisons the paper claims: (entropy variant, its base method).
CLAIMS = (('vicreg_it', 'vicreg'), ('vicreg_pairdist', 'vicreg'),
          ('byol_logdet', 'byol'), ('byol_pairdist', 'byol'))
# A method whose test features' effective rank is below a quarter of this
# method's counts as dimensionally collapsed (the grid's acceptance criterion).
COLLAPSE_REFERENCE = 'vicreg'
ALPHA = 0.05
GAIN_THRESHOLD = 0.01   # 1 point of accuracy
POWER = 0.8
VERDICT_RULE = (
    'Verdicts: the linear-probe differences (variant minus base, paired over seeds) get a '
    'two-sided paired t-test, corrected over the claims by Holm-Bonferroni (the claim ranked r '
    f'of m by p-value is tested at {ALPHA} / (m - r + 1); after the first claim not rejected, '
    'none is). The corrected interval is the paired t interval at that level. *Reproduced*: '
    'the corrected interval is above 0 and the mean kNN-20 difference is not below 0. *Not '
    'reproduced*: the corrected interval is below 0, or it excludes gains of '
    f'{100 * GAIN_THRESHOLD:.0f} point or more. *Inconclusive*: anything else, with the '
    f'smallest difference these seeds detect at that level with {100 * POWER:.0f}% power.')
FINAL_METRICS = ('linear_test_acc', 'knn_test_acc', 'effective_rank', 'entropy_logdet',
                 'entropy_pairwise_upper', 'entropy_pairwise_lower', 'entropy_gaussian')
BASELINES = (('raw_pixels', 'raw pixels'), ('random_init', 'random init (same encoder)'))


# ----------------------------------------------------------------------------
# Statistics.
# ----------------------------------------------------------------------------

def t_quantile(p: float, df: int) -> float:
  if df < 1:
    raise ValueError(f'Degrees of freedom must be >= 1, got {df}.')
  return float(sp_stats.t.ppf(p, df))


def mean_ci(values: Sequence[float], alpha: float = ALPHA) -> tuple[float, float, int]:
  """(mean, half-width of the two-sided 1 - alpha Student-t interval, n); nan for n < 2."""
  values = [v for v in values if not math.isnan(v)]
  n = len(values)
  if n == 0:
    return math.nan, math.nan, 0
  mean = sum(values) / n
  if n < 2:
    return mean, math.nan, n
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
  return mean, t_quantile(1 - alpha / 2, n - 1) * sd / math.sqrt(n), n


def paired_differences(variant: dict[int, float], base: dict[int, float]) -> list[float]:
  seeds = sorted(set(variant) & set(base))
  return [variant[s] - base[s] for s in seeds]


def paired(variant: dict[int, float], base: dict[int, float], alpha: float = ALPHA
           ) -> tuple[float, float, int]:
  """Mean and 1 - alpha interval half-width of variant - base over the seeds both have."""
  return mean_ci(paired_differences(variant, base), alpha)


def t_test_p(diffs: Sequence[float]) -> float:
  """Two-sided p-value of the paired t-test that the mean difference is 0."""
  n = len(diffs)
  if n < 2:
    return math.nan
  mean = sum(diffs) / n
  sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
  if sd == 0:
    return 0.0 if mean != 0 else 1.0
  return float(2 * sp_stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))


def holm_levels(p_values: Sequence[float], alpha: float = ALPHA
                ) -> tuple[list[float], list[bool]]:
  """Holm-Bonferroni: each hypothesis's test level and whether it is rejected.

  Sorted by p (nan last), the r-th (from 1) of m is tested at alpha / (m - r + 1);
  after the first one not rejected, no later one is.
  """
  m = len(p_values)
  order = sorted(range(m), key=lambda i: (math.isnan(p_values[i]), p_values[i]))
  levels, rejected = [math.nan] * m, [False] * m
  still = True
  for rank, i in enumerate(order):
    levels[i] = alpha / (m - rank)
    still = still and not math.isnan(p_values[i]) and p_values[i] < levels[i]
    rejected[i] = still
  return levels, rejected


def detectable_difference(sd: float, n: int, level: float, power: float = POWER) -> float:
  """The smallest true mean difference a paired t-test of n seeds at `level` (two-sided)
  rejects with probability `power`, if the seeds' sd is the observed one.

  Exact, from the noncentral t distribution (the shortcut (t_{1-level/2} +
  t_{power}) * sd / sqrt(n) gives only 76% power at n = 5, level 0.0125).
  """
  from scipy import optimize
  if n < 2 or math.isnan(sd) or sd == 0:
    return math.nan
  df = n - 1
  crit = t_quantile(1 - level / 2, df)

  def shortfall(ncp):
    # The far tail below -crit is ~0 but scipy returns NaN there for large ncp.
    lower = float(sp_stats.nct.cdf(-crit, df, ncp))
    return sp_stats.nct.sf(crit, df, ncp) + (0.0 if math.isnan(lower) else lower) - power

  high = 1.0
  while shortfall(high) < 0:   # bracket the root
    high *= 2
  ncp = optimize.brentq(shortfall, 0.0, high)
  return ncp * sd / math.sqrt(n)


def verdict(mean: float, half: float, n: int, rejected: bool, knn_mean: float,
            detectable: float) -> str:
  """The rule of VERDICT_RULE, for one claim's corrected interval mean ± half."""
  if n < 2 or math.isnan(half):
    return 'inconclusive: fewer than 2 paired seeds so far'
  if rejected and mean - half > 0 and not knn_mean < 0:
    return 'reproduced'
  if mean + half < 0:
    return 'not reproduced: the base method is better'
  if mean + half < GAIN_THRESHOLD:
    return (f'not reproduced: the corrected interval excludes gains of '
            f'{100 * GAIN_THRESHOLD:.0f} point or more')
  why = ('the kNN-20 difference is below 0' if rejected and mean - half > 0
         else 'the corrected interval contains 0')
  return (f'inconclusive ({why}); these seeds detect differences of '
          f'{100 * detectable:.2f} points or more')


# ----------------------------------------------------------------------------
# Summaries.
# ----------------------------------------------------------------------------

def knn_k(metrics: dict[str, float]) -> Optional[int]:
  """The smallest k of the run's kNN accuracies (20 in the default config)."""
  ks = [int(k[3:-9]) for k in metrics if k.startswith('knn') and k.endswith('_test_acc')]
  return min(ks) if ks else None


def metric(result: dict[str, Any], name: str) -> float:
  """A result's metric; 'knn_test_acc' is the kNN accuracy at the smallest k."""
  metrics = result['metrics']
  if name == 'knn_test_acc':
    k = knn_k(metrics)
    return metrics[f'knn{k}_test_acc'] if k is not None else math.nan
  return metrics.get(name, math.nan)


def completed_finals(results: dict[str, dict], method: str) -> list[dict]:
  return [r for r in results.values() if r['method'] == method and r['stage'] == 'final'
          and r.get('status', 'completed') == 'completed']


def summarise_claims(experiment, results: dict[str, dict],
                     diverged: frozenset[str]) -> list[dict[str, Any]]:
  """Every claim's paired differences, Holm-corrected levels, intervals and verdict."""
  claims = [(v, b) for v, b in CLAIMS if v in experiment.methods and b in experiment.methods]
  by_seed = lambda m, name: {r['seed']: metric(r, name) for r in completed_finals(results, m)}
  diffs = [paired_differences(by_seed(v, 'linear_test_acc'), by_seed(b, 'linear_test_acc'))
           for v, b in claims]
  p_values = [t_test_p(d) for d in diffs]
  levels, rejected = holm_levels(p_values)
  out = []
  for (variant, base), d, p, level, reject in zip(claims, diffs, p_values, levels, rejected):
    lin_mean, lin_half, n = mean_ci(d, level)
    knn_mean, knn_half, _ = paired(by_seed(variant, 'knn_test_acc'),
                                   by_seed(base, 'knn_test_acc'), level)
    sd = (math.sqrt(sum((x - lin_mean) ** 2 for x in d) / (n - 1)) if n > 1 else math.nan)
    detectable = detectable_difference(sd, n, level)
    text = verdict(lin_mean, lin_half, n, reject, knn_mean, detectable)
    if variant in diverged:
      text = ('not reproduced: every tuning trial of the variant diverged (non-finite loss) '
              'at this budget')
    out.append({'variant': variant, 'base': base, 'n': n, 'p_value': p, 'holm_level': level,
                'rejected': reject,
                'linear_test_acc': {'mean_diff': lin_mean, 'half': lin_half, 'n': n},
                'knn_test_acc': {'mean_diff': knn_mean, 'half': knn_half, 'n': n},
                'detectable_difference': detectable, 'verdict': text})
  return out


def summarise_baselines(results: dict[str, dict], stage: str = 'final'
                        ) -> dict[str, dict[str, Any]]:
  """Raw pixels and the random-init encoder over the cells of a stage that measured
  them: the test split for 'final' cells, the validation split for 'tune' cells."""
  out = {}
  finals = [r for r in results.values() if r['stage'] == stage and r.get('baselines')]
  for name, _ in BASELINES:
    by_seed = {r['seed']: r['baselines'][name] for r in finals if name in r['baselines']}
    if by_seed:
      out[name] = {m: mean_ci([v.get(m, math.nan) for v in by_seed.values()])
                   for m in ('linear_test_acc', 'knn20_test_acc')}
      out[name]['seeds'] = sorted(by_seed)
  return out


def summarise(experiment, results: dict[str, dict]) -> dict[str, Any]:
  """Tuning choices, final means with intervals, baselines, and the claims' verdicts."""
  chosen = grid.choose_trials(experiment, results)
  diverged = grid.all_trials_diverged(experiment, results)
  for method in diverged:
    chosen[method] = None
  final: dict[str, dict[str, Any]] = {}
  for method in experiment.methods:
    rows = completed_finals(results, method)
    stats = {m: mean_ci([metric(r, m) for r in rows]) for m in FINAL_METRICS}
    # Cells that reused their tuning run's pretraining only evaluated: not counted.
    walls = sorted(r['wall_time_sec'] for r in rows if r.get('wall_time_sec') is not None)
    final[method] = {'seeds': sorted(r['seed'] for r in rows), 'stats': stats,
                     'wall_times_sec': walls, 'all_trials_diverged': method in diverged}
  ks = {knn_k(r['metrics']) for r in results.values()} - {None}
  steps = {r.get('steps') for r in results.values() if r.get('steps')}
  validation = summarise_baselines(results, 'tune')
  raw_val = validation.get('raw_pixels', {}).get('linear_test_acc', (None,))[0]
  return {'chosen_trial': chosen, 'final': final,
          'claims': summarise_claims(experiment, results, diverged),
          'baselines': summarise_baselines(results),
          'validation_baselines': validation,
          'pilot': summarise_pilot(experiment, results, raw_val),
          'cost': summarise_cost(results),
          'knn_k': min(ks) if ks else None,
          'steps': max(steps) if steps else None, 'verdict_rule': VERDICT_RULE}


def passes_margin(difference: Optional[float], margin: float) -> bool:
  # The margins are differences of float32 accuracies: 1e-9 keeps an exact
  # 2.00 points from failing by round-off.
  return difference is not None and difference >= margin - 1e-9


def summarise_pilot(experiment, results: dict[str, dict],
                    raw_pixels: Optional[float]) -> Optional[dict[str, Any]]:
  """A budget pilot's margins over raw pixels and the budget they give.

  experiment.pilot: {'setting': the override each trial varies (total_steps),
  'margin': the validation linear accuracy over raw pixels a method must reach}.
  Each method's first passing value is the smallest value of the setting at
  which it reached the margin; the budget is the largest of those, so that
  every method passes at the budget or below. None without experiment.pilot.
  """
  pilot = experiment.get('pilot')
  if not pilot:
    return None
  setting, margin = pilot['setting'], float(pilot['margin'])
  rows: dict[str, dict[float, Optional[float]]] = {m: {} for m in experiment.methods}
  for cell in grid.tuning_cells(experiment):
    trial = grid.trials_of(experiment, cell.method)[cell.trial]
    if setting not in trial:
      raise ValueError(f'Pilot trial {cell.method} {cell.trial} ({trial}) does not set '
                       f'{setting!r}, the setting experiment.pilot names: every pilot '
                       'trial must set it.')
    r = results.get(cell.name)
    ok = r is not None and r.get('status', 'completed') == 'completed'
    rows[cell.method][float(trial[setting])] = (
        r['metrics']['linear_test_acc'] - raw_pixels if ok and raw_pixels is not None
        else None)
  first = {m: min((v for v, d in by.items() if passes_margin(d, margin)), default=None)
           for m, by in rows.items()}
  budget = (max(first.values()) if first and all(v is not None for v in first.values())
            else None)
  return {'setting': setting, 'margin': margin, 'raw_pixels': raw_pixels,
          'margins': rows, 'first_passing': first, 'budget': budget}


def edge_choices(experiment, chosen: dict[str, Optional[int]]
                 ) -> dict[str, list[tuple[str, str, str]]]:
  """Methods whose chosen trial sits at an end of a numeric setting its trials vary.

  Returns {method: [(setting, chosen value, 'largest' or 'smallest'), ...]}:
  the best setting may lie beyond the grid, so the method may be under-tuned.
  """
  out = {}
  for method, trial in chosen.items():
    trials = grid.trials_of(experiment, method)
    if trial is None or len(trials) < 2:
      continue
    ends = []
    for key in sorted({k for t in trials for k in t}):
      try:
        values = [float(t[key]) for t in trials]
      except (KeyError, ValueError):
        continue   # not set by every trial, or not a number: no order to be at the end of
      if len(set(values)) < 2:
        continue
      value = values[trial]
      if value == max(values):
        ends.append((key, trials[trial][key], 'largest'))
      elif value == min(values):
        ends.append((key, trials[trial][key], 'smallest'))
    if ends:
      out[method] = ends
  return out


def summarise_cost(results: dict[str, dict]) -> dict[str, Any]:
  """The cells' wall time: total, median and range, and where it went.

  A cell's wall time is what its process took, including any time it shared
  the cores with other work or was stopped: the sum bounds the experiment's
  cost on an otherwise idle machine from above.
  """
  timed = [r for r in results.values() if r.get('wall_time_sec') is not None]
  walls = sorted(r['wall_time_sec'] for r in timed)
  parts: dict[str, float] = {}
  for r in results.values():
    for name, sec in (r.get('time_breakdown_sec') or {}).items():
      part = ('evaluation' if name.startswith('evaluation') else
              name if name in ('steps',) else 'start-up, compilation and the rest')
      parts[part] = parts.get(part, 0.0) + sec
  n = len(walls)
  median = (walls[n // 2] if n % 2 else (walls[n // 2 - 1] + walls[n // 2]) / 2) if n else None
  hosts = collections.Counter(r['host'] for r in timed if r.get('host'))
  return {'cells': n, 'total_sec': sum(walls), 'median_sec': median,
          'min_sec': walls[0] if n else None, 'max_sec': walls[-1] if n else None,
          'parts_sec': parts,
          # Recorded since the runner watched for stops: older cells have none.
          'stopped_sec': sum(r.get('stopped_sec') or 0.0 for r in timed),
          'cells_recording_stops': sum('stopped_sec' in r for r in timed),
          'resumed_cells': sum(bool(r.get('start_step')) for r in timed),
          'hosts': dict(hosts), 'cells_without_host': sum(not r.get('host') for r in timed)}


# ----------------------------------------------------------------------------
# Tables, plot, README.
# ----------------------------------------------------------------------------

def _pct(mean: float, half: float) -> str:
  if math.isnan(mean):
    return '-'
  return f'{100 * mean:.2f}' + ('' if math.isnan(half) else f' ± {100 * half:.2f}')


def _num(mean: float, half: float, digits: int = 1) -> str:
  if math.isnan(mean):
    return '-'
  return f'{mean:.{digits}f}' + ('' if math.isnan(half) else f' ± {half:.{digits}f}')


def _cost(result: dict[str, Any]) -> str:
  wall = result.get('wall_time_sec')
  return '' if wall is None else f'{wall / 60:.1f}'


def _minutes(seconds: Sequence[float]) -> str:
  """Median (range) in minutes: cell times are skewed by time shared or stopped,
  so a mean and t-interval would describe the interruptions, not the cells."""
  if not seconds:
    return '-'
  s = sorted(seconds)
  n = len(s)
  median = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
  return f'{median / 60:.1f}' + ('' if n == 1 else f' ({s[0] / 60:.1f}-{s[-1] / 60:.1f})')


def pilot_markdown(pilot: dict[str, Any], methods: Sequence[str]) -> list[str]:
  """The pilot's table (validation linear accuracy minus raw pixels per method and
  value of the setting) and the sentence that gives the budget."""
  setting, margin = pilot['setting'], 100 * pilot['margin']
  values = sorted({v for by in pilot['margins'].values() for v in by})
  show = lambda v: f'{v:g}'
  lines = ['', '## The budget', '',
           'Linear accuracy on the validation split minus raw pixels\' ('
           + ('not measured yet' if pilot['raw_pixels'] is None else
              f'{_pct(pilot["raw_pixels"], math.nan)}%')
           + f'), in points; a method passes at {margin:g} points or more.', '',
           f'| {setting} | ' + ' | '.join(methods) + ' |', '|---|' + '---|' * len(methods)]
  for v in values:
    cells = []
    for m in methods:
      d = pilot['margins'][m].get(v)
      cells.append('not run' if d is None else
                   f'{100 * d:+.2f}' + (' (passes)' if passes_margin(d, pilot['margin'])
                                        else ''))
    lines.append(f'| {show(v)} | ' + ' | '.join(cells) + ' |')
  first = pilot['first_passing']
  passed = ', '.join(f'{m} at {show(v)}' for m, v in first.items() if v is not None)
  failed = [m for m, v in first.items() if v is None]
  rule = (f'The budget is the smallest {setting} at which every method has passed '
          '(at it or at a smaller value).')
  if pilot['budget'] is None:
    # The largest value is the cap only once every method still failing ran there.
    capped = values and all(pilot['margins'][m].get(values[-1]) is not None for m in failed)
    ending = (f'the largest value, {show(values[-1])}, is the cap' if capped else
              'the budget is not known yet')
    lines += ['', f'{rule} Passed at no value that ran: {", ".join(failed)}'
              + (f' (first passes: {passed})' if passed else '') + f'; {ending}.']
  else:
    decider = max(first, key=lambda m: first[m])
    below = [v for v, d in pilot['margins'][decider].items()
             if v < pilot['budget'] and d is not None]
    lines += ['', f'{rule} First passes: {passed}. **Budget: '
              f'{show(pilot["budget"])}**' + (
                  f' ({decider} fails at {show(max(below))}, the largest value below it '
                  'that ran).' if below else '.')]
  return lines


def cost_markdown(cost: dict[str, Any]) -> list[str]:
  if not cost['cells']:
    return []
  parts = ', '.join(f'{name} {sec / 3600:.1f} h' for name, sec in
                    sorted(cost['parts_sec'].items(), key=lambda kv: -kv[1]))
  text = (f'Cost: {cost["cells"]} cells took {cost["total_sec"] / 3600:.1f} h in all '
          f'(median cell {cost["median_sec"] / 60:.1f} min, '
          f'{cost["min_sec"] / 60:.1f}-{cost["max_sec"] / 60:.1f})'
          + (f'; {parts}' if parts else '') + '. A cell\'s time includes any time it '
          'shared the cores with other work')
  older = cost['cells'] - cost['cells_recording_stops']
  if not cost['cells_recording_stops']:
    text += ' or was stopped.'
  else:
    text += (f', and the {cost["stopped_sec"] / 3600:.1f} h that '
             f'{_count(cost["cells_recording_stops"], "cell")} spent stopped'
             + (f' ({_count(older, "earlier cell")} did not record stops).' if older else '.'))
  if cost['resumed_cells']:
    text += (f' {_count(cost["resumed_cells"], "cell")} resumed part-way after an '
             'interruption; only the last process of each is counted.')
  if cost['hosts']:
    text += ' Machines: ' + ', '.join(f'{name} ({_count(k, "cell")})' for name, k in
                                      sorted(cost['hosts'].items(), key=lambda kv: -kv[1]))
    text += (f'; {cost["cells_without_host"]} earlier do not record theirs.'
             if cost['cells_without_host'] else '.')
  else:
    text += ' The cells do not record the machine they ran on.'
  return ['', text]


def _count(n: int, noun: str) -> str:
  return f'{n} {noun}' + ('' if n == 1 else 's')


def markdown(experiment, results: dict[str, dict], summary: dict[str, Any]) -> str:
  k = summary['knn_k']
  lines = [f'# {experiment.name}', '',
           f'{experiment.get("description", "")}'.strip(), '',
           f'Generated by `python -m ssl_jax.experiments` from {len(results)} result files in '
           f'`results/{experiment.name}/`; do not edit by hand.', '',
           '## Tuning (one seed, validation split)', '',
           f'| method | trial | overrides | val. linear (%) | val. kNN-{k} (%) '
           '| eff. rank | chosen | cell (min) |',
           '|---|---|---|---|---|---|---|---|']
  for cell in grid.tuning_cells(experiment):
    r = results.get(cell.name)
    trial = grid.trials_of(experiment, cell.method)[cell.trial]
    text = ', '.join(f'{k_}={v}' for k_, v in trial.items()) or '(defaults)'
    if r is None or r.get('status') == 'diverged':
      state = ('diverged (non-finite loss)' if r is not None else
               'not run' if experiment.get('not_run') else 'pending')
      lines.append(f'| {cell.method} | {cell.trial} | {text} | {state} | | | '
                   f'| {_cost(r) if r else ""} |')
      continue
    m = r['metrics']
    mark = 'yes' if summary['chosen_trial'].get(cell.method) == cell.trial else ''
    lines.append(f'| {cell.method} | {cell.trial} | {text} | {100 * m["linear_test_acc"]:.2f} '
                 f'| {100 * metric(r, "knn_test_acc"):.2f} | {m["effective_rank"]:.1f} | {mark} '
                 f'| {_cost(r)} |')
  edges = edge_choices(experiment, summary['chosen_trial'])
  if edges:
    lines += ['', 'Chosen at an end of its grid (the best setting may lie beyond it): ' + '; '.join(
        f'{m} ' + ', '.join(f'{key}={value} (the {end} tried)' for key, value, end in ends)
        for m, ends in edges.items()) + '.']
  val = summary.get('validation_baselines', {})
  if val:
    lines += ['', 'On the validation split: ' + '; '.join(
        f'{label} {_pct(val[name]["linear_test_acc"][0], math.nan)}% linear, '
        f'{_pct(val[name]["knn20_test_acc"][0], math.nan)}% kNN-20'
        for name, label in BASELINES if name in val) + '.']
  if experiment.get('not_run'):
    lines += ['', f'Not run: {experiment.not_run}']
  if summary.get('pilot'):
    lines += pilot_markdown(summary['pilot'], list(experiment.methods))
  if not experiment.final_seeds:   # a pilot: tuning cells only
    return '\n'.join(lines + cost_markdown(summary['cost'])) + '\n'
  lines += ['', '## Final (chosen settings, test split; mean ± 95% Student-t interval)', '',
            f'| method | seeds | linear (%) | kNN-{k} (%) | eff. rank | H log-det | '
            'H pairwise upper | H pairwise lower | H Gaussian | cell (min: median, range) |',
            '|---|---|---|---|---|---|---|---|---|---|']
  for method, entry in summary['final'].items():
    if entry.get('all_trials_diverged'):
      lines.append(f'| {method} | 0 | every tuning trial diverged: no setting to run at the '
                   'final seeds | | | | | | | |')
      continue
    s = entry['stats']
    lines.append(
        f'| {method} | {len(entry["seeds"])} | {_pct(*s["linear_test_acc"][:2])} '
        f'| {_pct(*s["knn_test_acc"][:2])} | {_num(*s["effective_rank"][:2])} '
        f'| {_num(*s["entropy_logdet"][:2])} | {_num(*s["entropy_pairwise_upper"][:2])} '
        f'| {_num(*s["entropy_pairwise_lower"][:2])} | {_num(*s["entropy_gaussian"][:2])} '
        f'| {_minutes(entry["wall_times_sec"])} |')
  for name, label in BASELINES:
    if name in summary['baselines']:
      b = summary['baselines'][name]
      lines.append(f'| *{label}* | {len(b["seeds"])} | {_pct(*b["linear_test_acc"][:2])} '
                   f'| {_pct(*b["knn20_test_acc"][:2])} | | | | | | |')
  base_rank = summary['final'].get(COLLAPSE_REFERENCE, {}).get('stats', {}).get(
      'effective_rank', (math.nan,))[0]
  shares = [(m, e['stats']['effective_rank'][0] / base_rank)
            for m, e in summary['final'].items()
            if m != COLLAPSE_REFERENCE and e['seeds'] and not math.isnan(base_rank)]
  if shares:
    lines += ['', f'Dimensional collapse check, mean effective rank as a share of '
              f'{COLLAPSE_REFERENCE}\'s: ' + ', '.join(f'{m} {v:.2f}' for m, v in shares)
              + '. Below 0.25 counts as collapsed: '
              + (', '.join(m for m, v in shares if v < 0.25) or 'none') + '.']
  if any(r.get('pretraining_from') for r in results.values()):
    lines += ['', f'At seed {experiment.tune_seed}, a final cell restores its chosen tuning '
              'run\'s checkpoint (the same pretraining) and only evaluates it on the test split; '
              'cell times are those of the cells that pretrained.']
  lines += ['', '## The paper\'s claims: entropy variant minus its base method (same seeds)', '',
            f'| comparison | seeds | p | Holm level | linear (points, corrected interval) '
            f'| kNN-{k} (points) | verdict |',
            '|---|---|---|---|---|---|---|']
  for claim in summary['claims']:
    lin, knn = claim['linear_test_acc'], claim['knn_test_acc']
    p = '-' if math.isnan(claim['p_value']) else f'{claim["p_value"]:.3g}'
    lines.append(f'| {claim["variant"]} - {claim["base"]} | {claim["n"]} | {p} '
                 f'| {claim["holm_level"]:.4f} | {_pct(lin["mean_diff"], lin["half"])} '
                 f'| {_pct(knn["mean_diff"], knn["half"])} | {claim["verdict"]} |')
  lines += ['', VERDICT_RULE] + cost_markdown(summary['cost'])
  return '\n'.join(lines) + '\n'


def budget_markdown(reports: Sequence[tuple[str, Any, dict[str, Any]]]) -> str:
  """One table of method x budget, and a sentence per claim on what the budgets say.

  reports: (budget label, experiment config, summary) from shortest to longest.
  """
  methods = []
  for _, experiment, _ in reports:
    methods += [m for m in experiment.methods if m not in methods]
  head = ' | '.join(f'{label}: linear (%)' for label, _, _ in reports)
  lines = ['| method | ' + head + ' |', '|---|' + '---|' * len(reports)]
  for method in methods:
    cells = []
    for _, _, summary in reports:
      entry = summary['final'].get(method)
      cells.append('-' if not entry or not entry['seeds'] else
                   f'{_pct(*entry["stats"]["linear_test_acc"][:2])} ({len(entry["seeds"])})')
    lines.append(f'| {method} | ' + ' | '.join(cells) + ' |')
  for name, label in BASELINES:
    cells = [_pct(*s['baselines'][name]['linear_test_acc'][:2]) if name in s['baselines']
             else '-' for _, _, s in reports]
    lines.append(f'| *{label}* | ' + ' | '.join(cells) + ' |')
  lines += ['', '(mean ± 95% Student-t interval over the final seeds, their count in '
            'parentheses)', '']
  for variant, base in CLAIMS:
    verdicts = []   # (label, verdict or None while pending, linear difference, interim note)
    for label, experiment, summary in reports:
      claim = next((c for c in summary['claims'] if c['variant'] == variant), None)
      if claim is None:
        continue
      lin, n = claim['linear_test_acc'], claim.get('n')
      planned = len(experiment.get('final_seeds', ()))
      if (n is not None and n < 2) or math.isnan(lin['mean_diff']):
        verdicts.append((label, None, lin, ''))   # a budget whose final seeds are still running
      else:
        # Fewer paired seeds than the experiment plans: the verdict may still move.
        interim = f', interim at {n} of {planned} seeds' if n is not None and n < planned else ''
        verdicts.append((label, claim['verdict'].split(':')[0].split(' (')[0], lin, interim))
    if len(verdicts) < 2:
      continue
    parts = '; '.join(f'{label}: pending (fewer than 2 paired seeds)' if v is None else
                      f'{label}: {v} ({_pct(lin["mean_diff"], lin["half"])} points{interim})'
                      for label, v, lin, interim in verdicts)
    if any(v is None for _, v, _, _ in verdicts):
      ending = 'Whether the longer budget changes the verdict is not known yet.'
    else:
      verb = 'changed' if len({v for _, v, _, _ in verdicts}) > 1 else 'did not change'
      opening = ('So far (not every final seed has run) the'
                 if any(interim for _, _, _, interim in verdicts) else 'The')
      ending = f'{opening} longer budget {verb} the verdict.'
    lines.append(f'- {variant} - {base}: {parts}. {ending}')
  return '\n'.join(lines) + '\n'


def plot(experiment, summary: dict[str, Any], path: str) -> Optional[str]:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  methods = [m for m, e in summary['final'].items() if e['seeds']]
  if not methods:
    return None
  fig, ax = plt.subplots(figsize=(1.2 * len(methods) + 2, 4))
  for offset, (name, label) in enumerate((('linear_test_acc', 'linear probe'),
                                          ('knn_test_acc', f'kNN k={summary["knn_k"]}'))):
    means = [100 * summary['final'][m]['stats'][name][0] for m in methods]
    halves = [100 * summary['final'][m]['stats'][name][1] for m in methods]
    halves = [0 if math.isnan(h) else h for h in halves]
    xs = [i + 0.15 * (2 * offset - 1) for i in range(len(methods))]
    ax.errorbar(xs, means, yerr=halves, fmt='o', capsize=4, label=label)
  for name, label in BASELINES:
    if name in summary['baselines']:
      ax.axhline(100 * summary['baselines'][name]['linear_test_acc'][0], ls='--', lw=1,
                 color='grey' if name == 'raw_pixels' else 'silver',
                 label=f'{label} (linear)')
  ax.set_xticks(range(len(methods)))
  ax.set_xticklabels(methods, rotation=30, ha='right')
  ax.set_ylabel('test accuracy (%), mean ± 95% CI')
  ax.set_title(f'{experiment.name}: frozen-feature accuracy per method')
  ax.grid(axis='y', alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def update_readme(path: str, name: str, tables: str, *, drop_title: bool = True) -> bool:
  """Replaces the <!-- results:NAME:start --> ... end block of `path`; False if absent."""
  start, end = f'<!-- results:{name}:start -->', f'<!-- results:{name}:end -->'
  if not path or not os.path.exists(path):
    return False
  with open(path) as f:
    text = f.read()
  if start not in text or end not in text:
    return False
  lines = tables.splitlines()[1:] if drop_title else tables.splitlines()
  body = '\n'.join(('#' + line) if line.startswith('#') else line   # nest the headings
                   for line in lines)
  head, rest = text.split(start, 1)
  _, tail = rest.split(end, 1)
  with open(path + '.tmp', 'w') as f:
    f.write(f'{head}{start}\n{body.strip()}\n{end}{tail}')
  os.replace(path + '.tmp', path)
  return True


def aggregate(experiment, results_root: str, readme: Optional[str] = None) -> dict[str, Any]:
  """Rebuilds results/<experiment>.json, .md and .png from the result files.

  The files named in `readme` (comma-separated) get the tables in their
  <!-- results:NAME --> blocks.
  An experiment that names `compare_with` (a shorter budget's experiment
  config) also gets the method x budget table, in results/<experiment>_budgets.md
  and the <!-- results:budgets --> blocks.
  """
  results = grid.load_results(results_root, experiment)
  summary = summarise(experiment, results)
  base = os.path.join(results_root, experiment.name)
  grid.write_json(base + '.json', {'experiment': experiment.to_dict(), 'summary': summary,
                                   'cells': results})
  tables = markdown(experiment, results, summary)
  with open(base + '.md', 'w') as f:
    f.write(tables)
  plot(experiment, summary, base + '.png')
  docs = [p.strip() for p in (readme or '').split(',') if p.strip()]
  for path in docs:
    update_readme(path, experiment.name, tables)
  if experiment.get('compare_with'):
    short = grid.load_experiment(experiment.compare_with)
    short_summary = summarise(short, grid.load_results(results_root, short))
    table = budget_markdown([(short.get('budget_label', short.name), short, short_summary),
                             (experiment.get('budget_label', experiment.name), experiment,
                              summary)])
    with open(base + '_budgets.md', 'w') as f:
      f.write(f'# Both budgets\n\n{table}')
    for path in docs:
      update_readme(path, 'budgets', table, drop_title=False)
  return summary
