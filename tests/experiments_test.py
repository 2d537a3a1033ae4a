"""The experiment runner: planning, shards, interval arithmetic, resume and skip."""

import json
import math
import os
import signal
import subprocess
import time

import ml_collections
import numpy as np
import pytest
from scipy import stats

from ssl_jax import experiment_report
from ssl_jax import experiments
from ssl_jax import grid
from ssl_jax import host


def experiment_config(**overrides):
  c = ml_collections.ConfigDict()
  c.name = 'tiny'
  c.description = 'test grid'
  c.shared = 'data.holdout=1000, eval.max_train_examples=128, eval.max_test_examples=64'
  c.tune_seed = 0
  c.final_seeds = (0, 1)
  c.methods = dict(
      vicreg=dict(config='configs/vicreg.py', trials=['variant=smoke', 'variant=smoke, '
                                                      'optim.base_lr=1.0']),
      vicreg_it=dict(config='configs/vicreg_it.py', trials=['variant=smoke']))
  c.update(overrides)
  return c


def fake_result(cell, linear, knn=0.5, rank=10.0):
  return {'cell': cell.name, 'method': cell.method, 'stage': cell.stage, 'trial': cell.trial,
          'seed': cell.seed, 'wall_time_sec': 60.0,
          'metrics': {'linear_test_acc': linear, 'knn20_test_acc': knn, 'knn200_test_acc': 0.1,
                      'effective_rank': rank, 'entropy_logdet': 1.0,
                      'entropy_pairwise_upper': 2.0, 'entropy_pairwise_lower': 1.5,
                      'entropy_gaussian': -3.0}}


# ------------------------------------------------------------------ planning

def test_overrides_are_parsed_and_bad_ones_named():
  assert grid.parse_overrides(' optim.base_lr=0.3, variant=add ') == {
      'optim.base_lr': '0.3', 'variant': 'add'}
  with pytest.raises(ValueError, match="'optim.base_lr' must look like 'key=value'"):
    grid.parse_overrides('optim.base_lr')


def test_tuning_evaluates_on_validation_and_final_on_test():
  exp = experiment_config()
  tune = grid.tuning_cells(exp)
  assert [c.name for c in tune] == ['vicreg__tune0__s0', 'vicreg_it__tune0__s0',
                                    'vicreg__tune1__s0']
  assert all(dict(c.overrides)['data.eval_on'] == 'validation' for c in tune)
  final = grid.final_cells(exp, {'vicreg': 1, 'vicreg_it': 0})
  assert all(dict(c.overrides)['data.eval_on'] == 'test' for c in final)
  assert dict(final[0].overrides)['optim.base_lr'] == '1.0'      # vicreg's chosen trial
  command = final[0].command('w')
  assert '--config=configs/vicreg.py:smoke' in command and '--config.seed=0' in command


def test_the_best_validation_trial_is_chosen_once_all_trials_are_in():
  exp = experiment_config()
  tune = {c.name: c for c in grid.tuning_cells(exp)}
  results = {'vicreg__tune0__s0': fake_result(tune['vicreg__tune0__s0'], 0.7)}
  assert grid.choose_trials(exp, results)['vicreg'] is None   # trial 1 missing
  results['vicreg__tune1__s0'] = fake_result(tune['vicreg__tune1__s0'], 0.8)
  assert grid.choose_trials(exp, results)['vicreg'] == 1
  assert all(c.trial < 0 for c in grid.final_cells(
      exp, grid.choose_trials(exp, results)) if c.method == 'vicreg_it')


def test_a_diverged_trial_is_recorded_never_chosen_and_shown():
  exp = experiment_config()
  tune = {c.name: c for c in grid.tuning_cells(exp)}
  log = ('pretrain: 66%\nssl_jax.train.NonFiniteLossError: Non-finite loss (nan) at step 198 '
         '(checked up to step 200); the last good checkpoint is step 100\n')
  diverged = grid.diverged_result(tune['vicreg__tune1__s0'], log, 60.0, 'abc', 'def',
                                     config={'method': 'vicreg'})
  assert diverged['status'] == 'diverged' and 'step 198' in diverged['error']
  assert grid.diverged_result(tune['vicreg__tune1__s0'], 'Killed\n', 1.0, 'a', 'b') is None
  results = {'vicreg__tune0__s0': fake_result(tune['vicreg__tune0__s0'], 0.7),
             'vicreg__tune1__s0': diverged,
             'vicreg_it__tune0__s0': fake_result(tune['vicreg_it__tune0__s0'], 0.8)}
  assert grid.choose_trials(exp, results) == {'vicreg': 0, 'vicreg_it': 0}
  table = experiment_report.markdown(exp, results, experiment_report.summarise(exp, results))
  assert '| vicreg | 1 | variant=smoke, optim.base_lr=1.0 | diverged (non-finite loss) |' in table
  assert grid.all_trials_diverged(exp, results) == frozenset()


def test_a_method_whose_every_trial_diverged_gets_no_final_cells_and_fails_its_claim():
  exp = experiment_config()
  tune = {c.name: c for c in grid.tuning_cells(exp)}
  log = 'ssl_jax.train.NonFiniteLossError: Non-finite loss (nan) at step 76\n'
  results = {'vicreg__tune0__s0': fake_result(tune['vicreg__tune0__s0'], 0.7),
             'vicreg__tune1__s0': fake_result(tune['vicreg__tune1__s0'], 0.72),
             'vicreg_it__tune0__s0': grid.diverged_result(
                 tune['vicreg_it__tune0__s0'], log, 60.0, 'abc', 'def')}
  skip = grid.all_trials_diverged(exp, results)
  assert skip == frozenset({'vicreg_it'})
  finals = grid.final_cells(exp, grid.choose_trials(exp, results), skip=skip)
  assert {c.method for c in finals} == {'vicreg'} and all(c.trial == 1 for c in finals)
  summary = experiment_report.summarise(exp, results)
  assert summary['chosen_trial'] == {'vicreg': 1, 'vicreg_it': None}
  assert summary['final']['vicreg_it']['all_trials_diverged']
  claim = summary['claims'][0]
  assert (claim['variant'], claim['base']) == ('vicreg_it', 'vicreg')
  assert claim['verdict'].startswith('not reproduced: every tuning trial')
  table = experiment_report.markdown(exp, results, summary)
  assert '| vicreg_it | 0 | every tuning trial diverged' in table
  # A method with one trial still unfinished is not given up on.
  del results['vicreg__tune1__s0']
  results['vicreg__tune0__s0'] = grid.diverged_result(
      tune['vicreg__tune0__s0'], log, 60.0, 'abc', 'def')
  assert 'vicreg' not in grid.all_trials_diverged(exp, results)


@pytest.mark.parametrize('shards', [1, 2, 3])
def test_shards_cover_every_cell_exactly_once(shards):
  exp = experiment_config()
  cells = grid.tuning_cells(exp) + grid.final_cells(exp, {'vicreg': 0,
                                                                       'vicreg_it': 0})
  covered = [c.name for i in range(shards) for c in grid.in_shard(cells, (i, shards))]
  assert sorted(covered) == sorted(c.name for c in cells)
  with pytest.raises(ValueError, match='--shard'):
    grid.parse_shard('2/2')


# --------------------------------------------------------------- aggregation

def test_aggregation_matches_a_hand_computed_student_t_interval(tmp_path):
  exp = experiment_config()
  chosen = {'vicreg': 0, 'vicreg_it': 0}
  folder = tmp_path / 'tiny'
  folder.mkdir()
  vicreg = [0.80, 0.82, 0.81]
  vicreg_it = [0.85, 0.86, 0.87]
  exp.final_seeds = (0, 1, 2)
  cells = grid.tuning_cells(exp) + grid.final_cells(exp, chosen)
  for cell in cells:
    if cell.stage == 'tune':
      value = 0.9 if cell.trial == 0 else 0.1
    else:
      value = (vicreg if cell.method == 'vicreg' else vicreg_it)[cell.seed]
    (folder / f'{cell.name}.json').write_text(json.dumps(fake_result(cell, value)))
  readme = tmp_path / 'README.md'
  readme.write_text('# ssl_jax\nbefore\n<!-- results:tiny:start -->\nold\n'
                    '<!-- results:tiny:end -->\nafter\n')
  summary = experiment_report.aggregate(exp, str(tmp_path), str(readme))

  # By hand: mean 0.81, sample sd 0.01, t_{0.975, 2} = 4.302653, n = 3.
  mean, half, n = summary['final']['vicreg']['stats']['linear_test_acc']
  assert n == 3 and mean == pytest.approx(0.81)
  assert half == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-4)
  # Paired differences 0.05, 0.04, 0.06: mean 0.05, sd 0.01.
  # One claim: Holm's level is alpha itself. t = 0.05 / (0.01 / sqrt(3)) = 8.660,
  # two-sided p with 2 df = 2 / (2 + t^2)^(1/2) * ... = 0.01307 (t distribution, 2 df:
  # P(|T| > t) = 1 - t / sqrt(2 + t^2)).
  claim = summary['claims'][0]
  assert claim['linear_test_acc']['mean_diff'] == pytest.approx(0.05)
  assert claim['linear_test_acc']['half'] == pytest.approx(4.302653 * 0.01 / math.sqrt(3),
                                                           rel=1e-4)
  assert claim['p_value'] == pytest.approx(1 - 8.660254 / math.sqrt(2 + 8.660254 ** 2),
                                           rel=1e-4)
  assert claim['holm_level'] == 0.05 and claim['rejected']
  assert claim['verdict'] == 'reproduced'
  assert summary['chosen_trial'] == {'vicreg': 0, 'vicreg_it': 0}
  table = (tmp_path / 'tiny.md').read_text()
  assert '| vicreg | 3 | 81.00 ± 2.48 |' in table
  # fake_result gives every method rank 10: a share of 1.00 of vicreg's.
  assert ("share of vicreg's: vicreg_it 1.00. Below 0.25 counts as collapsed: none." in table)
  assert (tmp_path / 'tiny.png').stat().st_size > 0
  text = readme.read_text()   # the README block is regenerated, the rest kept
  assert 'old' not in text and '| vicreg | 3 | 81.00 ± 2.48 |' in text
  assert text.startswith('# ssl_jax\nbefore\n') and text.endswith('after\n')
  assert '### Final' in text
  assert len(json.loads((tmp_path / 'tiny.json').read_text())['cells']) == len(cells)


def test_a_method_below_a_quarter_of_vicregs_effective_rank_is_named_collapsed():
  exp = experiment_config()
  cells = grid.tuning_cells(exp) + grid.final_cells(exp, {'vicreg': 0,
                                                                      'vicreg_it': 0})
  results = {c.name: fake_result(c, 0.8, rank=(2.0 if c.method == 'vicreg_it' else 10.0))
             for c in cells}
  table = experiment_report.markdown(exp, results, experiment_report.summarise(exp, results))
  assert "share of vicreg's: vicreg_it 0.20. Below 0.25 counts as collapsed: vicreg_it." in table


def test_verdicts_follow_the_printed_rule():
  verdict = experiment_report.verdict
  assert verdict(0.02, 0.01, 5, True, 0.0, 0.01) == 'reproduced'
  # The linear interval is above 0 but kNN-20 went the other way.
  assert verdict(0.02, 0.01, 5, True, -0.001, 0.01).startswith(
      'inconclusive (the kNN-20 difference is below 0)')
  assert verdict(-0.02, 0.01, 5, False, 0.0, 0.01).startswith('not reproduced: the base')
  # Contains 0 but excludes every gain of 1 point or more.
  assert verdict(0.002, 0.005, 5, False, 0.0, 0.01).startswith(
      'not reproduced: the corrected interval excludes gains of 1 point')
  text = verdict(0.005, 0.01, 5, False, 0.0, 0.0123)
  assert text.startswith('inconclusive (the corrected interval contains 0)')
  assert '1.23 points' in text
  assert verdict(0.02, math.nan, 1, False, 0.0, math.nan).startswith('inconclusive: fewer than 2')


def test_holm_bonferroni_on_a_textbook_example():
  # Sorted p: 0.005 <= 0.05/4, 0.01 <= 0.05/3, 0.03 > 0.05/2: the last two are kept.
  levels, rejected = experiment_report.holm_levels([0.01, 0.04, 0.03, 0.005])
  assert levels == pytest.approx([0.05 / 3, 0.05, 0.05 / 2, 0.05 / 4])
  assert rejected == [True, False, False, True]
  # A p that passes its own level after a failure is still not rejected (step-down).
  # 0.03 > 0.05 / 2 stops the procedure, so 0.04 < 0.05 is not rejected either.
  assert experiment_report.holm_levels([0.04, 0.03])[1] == [False, False]
  assert experiment_report.holm_levels([0.02, 0.011])[1] == [True, True]


@pytest.mark.parametrize('n, level', [(5, 0.05 / 4), (5, 0.05), (3, 0.05)])
def test_the_detectable_difference_is_rejected_80_percent_of_the_time(n, level):
  """Monte-Carlo: paired t-tests of n seeds whose true mean difference is the
  detectable one reject at `level` in 80% of 40,000 simulated experiments."""
  sd = 0.004
  effect = experiment_report.detectable_difference(sd, n, level)
  rng = np.random.default_rng(0)
  diffs = rng.normal(effect, sd, size=(40_000, n))
  t = diffs.mean(1) / (diffs.std(1, ddof=1) / math.sqrt(n))
  rejected = np.mean(np.abs(t) > stats.t.ppf(1 - level / 2, n - 1))
  assert rejected == pytest.approx(0.80, abs=0.01)   # Monte-Carlo sd 0.002


def test_the_budget_table_puts_methods_against_budgets_and_says_what_changed():
  exp = experiment_config()
  short = {'final': {'vicreg': {'seeds': [0, 1, 2], 'stats': {
               'linear_test_acc': (0.85, 0.01, 3)}},
                     'vicreg_it': {'seeds': [0, 1, 2], 'stats': {
               'linear_test_acc': (0.87, 0.002, 3)}}},
           'baselines': {'raw_pixels': {'linear_test_acc': (0.8442, math.nan, 1),
                                        'seeds': [0]}},
           'claims': [{'variant': 'vicreg_it', 'verdict': 'reproduced',
                       'linear_test_acc': {'mean_diff': 0.02, 'half': 0.01}}]}
  long = {'final': {'vicreg': {'seeds': [1, 2, 3, 4, 5], 'stats': {
              'linear_test_acc': (0.89, 0.004, 5)}}, 'vicreg_it': {'seeds': [], 'stats': {}}},
          'baselines': {},
          'claims': [{'variant': 'vicreg_it', 'verdict': 'inconclusive (the corrected ...)',
                      'linear_test_acc': {'mean_diff': 0.004, 'half': 0.006}}]}
  table = experiment_report.budget_markdown([('300 steps', exp, short),
                                             ('1000 steps', exp, long)])
  assert '| vicreg | 85.00 ± 1.00 (3) | 89.00 ± 0.40 (5) |' in table
  assert '| vicreg_it | 87.00 ± 0.20 (3) | - |' in table
  assert '| *raw pixels* | 84.42 | - |' in table
  assert ('- vicreg_it - vicreg: 300 steps: reproduced (2.00 ± 1.00 points); 1000 steps: '
          'inconclusive (0.40 ± 0.60 points). The longer budget changed the verdict.') in table
  # A longer budget whose final seeds have not run yet says so, and claims no change.
  long['claims'] = [{'variant': 'vicreg_it', 'n': 0, 'verdict': 'inconclusive: fewer than 2 '
                     'paired seeds so far', 'linear_test_acc': {'mean_diff': math.nan,
                                                                'half': math.nan, 'n': 0}}]
  table = experiment_report.budget_markdown([('300 steps', exp, short),
                                             ('1000 steps', exp, long)])
  assert ('- vicreg_it - vicreg: 300 steps: reproduced (2.00 ± 1.00 points); 1000 steps: '
          'pending (fewer than 2 paired seeds). Whether the longer budget changes the verdict '
          'is not known yet.') in table
  assert 'changed the verdict' not in table
  # The same verdict at both budgets is no change; a budget with fewer paired
  # seeds than the experiment plans gives an interim verdict, and says so.
  long['claims'] = [{'variant': 'vicreg_it', 'n': 2, 'verdict': 'reproduced',
                     'linear_test_acc': {'mean_diff': 0.01, 'half': 0.004, 'n': 2}}]
  table = experiment_report.budget_markdown([('300 steps', exp, short),
                                             ('1000 steps', exp, long)])
  assert ('- vicreg_it - vicreg: 300 steps: reproduced (2.00 ± 1.00 points); 1000 steps: '
          'reproduced (1.00 ± 0.40 points). The longer budget did not change the verdict.'
          ) in table
  long_exp = experiment_config()
  long_exp.final_seeds = (1, 2, 3, 4, 5)
  for verdict, said in (('reproduced', 'did not change'), ('inconclusive (...)', 'changed')):
    long['claims'][0]['verdict'] = verdict
    table = experiment_report.budget_markdown([('300 steps', exp, short),
                                               ('1000 steps', long_exp, long)])
    assert (f'1000 steps: {verdict.split(" (")[0]} (1.00 ± 0.40 points, interim at 2 of 5 '
            f'seeds). So far (not every final seed has run) the longer budget {said} the '
            'verdict.') in table


def pilot_config(**overrides):
  steps = [f'total_steps={s}' for s in (1000, 2000, 1500, 3000)]
  c = experiment_config(final_seeds=(), pilot=dict(setting='total_steps', margin=0.02),
                        **overrides)
  c.methods = ml_collections.ConfigDict(dict(   # replaced, not merged into the default's
      vicreg=dict(config='configs/vicreg.py', trials=steps),
      byol=dict(config='configs/byol.py', trials=steps)))
  return c


def pilot_results(exp, linear: dict[tuple[str, int], float], raw_pixels: float = 0.85):
  """Tuning results of the named (method, steps) cells, raw pixels measured in each."""
  results = {}
  for cell in grid.tuning_cells(exp):
    steps = int(grid.trials_of(exp, cell.method)[cell.trial]['total_steps'])
    if (cell.method, steps) in linear:
      r = fake_result(cell, linear[cell.method, steps])
      r['baselines'] = {'raw_pixels': {'linear_test_acc': raw_pixels, 'knn20_test_acc': 0.85}}
      results[cell.name] = r
  return results


def test_the_pilot_budget_is_the_first_step_count_every_method_has_passed_at():
  exp = pilot_config()
  # Raw pixels 85%: VICReg passes at 1000 (+3), BYOL fails at 1000 (+0.5) and
  # 1500 (+1.99), and passes at 2000 (exactly +2.00, float32-rounded as a probe's
  # accuracy is): the budget is 2000, whatever VICReg did there.
  results = pilot_results(exp, {('vicreg', 1000): 0.88, ('byol', 1000): 0.855,
                                ('byol', 1500): 0.8699, ('byol', 2000): float(np.float32(0.87))})
  summary = experiment_report.summarise(exp, results)
  pilot = summary['pilot']
  assert pilot['first_passing'] == {'vicreg': 1000.0, 'byol': 2000.0}
  assert pilot['budget'] == 2000.0
  table = experiment_report.markdown(exp, results, summary)
  assert '| total_steps | byol | vicreg |' in table
  assert '| 1000 | +0.50 | +3.00 (passes) |' in table
  assert '| 1500 | +1.99 | not run |' in table
  assert '| 2000 | +2.00 (passes) | not run |' in table
  assert ('First passes: byol at 2000, vicreg at 1000. **Budget: 2000** (byol fails at 1500, '
          'the largest value below it that ran).') in table
  assert '| vicreg | 1 | total_steps=2000 | pending |' in table
  # A closed pilot's missing cells read 'not run', with the reason.
  exp = pilot_config(not_run='stopped once 2,000 passed.')
  table = experiment_report.markdown(exp, results, experiment_report.summarise(exp, results))
  assert '| vicreg | 1 | total_steps=2000 | not run |' in table
  assert 'Not run: stopped once 2,000 passed.' in table
  # BYOL never passes: the budget is unknown until it failed at the largest value,
  # which is then the cap.
  del results['byol__tune1__s0']
  table = experiment_report.markdown(exp, results, experiment_report.summarise(exp, results))
  assert 'Passed at no value that ran: byol (first passes: vicreg at 1000); the budget is not ' \
         'known yet.' in table
  results.update(pilot_results(exp, {('byol', 3000): 0.86}))
  summary = experiment_report.summarise(exp, results)
  assert summary['pilot']['budget'] is None
  assert 'the largest value, 3000, is the cap.' in experiment_report.markdown(exp, results,
                                                                              summary)


def test_a_choice_at_an_end_of_the_tried_values_is_flagged():
  exp = experiment_config()
  exp.methods.vicreg.trials = [f'variant=smoke, optim.base_lr={lr}' for lr in ('0.1', '0.3', '1.0')]
  exp.methods.vicreg_it.trials = ['loss.terms.logdet_entropy.weight=0.5, optim.base_lr=0.3',
                                  'loss.terms.logdet_entropy.weight=0.05, optim.base_lr=0.3']
  # The middle learning rate is no end; 1.0 is the largest tried. 'variant' is no
  # number and a setting every trial shares (optim.base_lr=0.3) has no end.
  assert experiment_report.edge_choices(exp, {'vicreg': 1, 'vicreg_it': None}) == {}
  assert experiment_report.edge_choices(exp, {'vicreg': 2, 'vicreg_it': 1}) == {
      'vicreg': [('optim.base_lr', '1.0', 'largest')],
      'vicreg_it': [('loss.terms.logdet_entropy.weight', '0.05', 'smallest')]}
  cells = grid.tuning_cells(exp)
  results = {c.name: fake_result(c, 0.9 if (c.method, c.trial) in (('vicreg', 2),
                                                                   ('vicreg_it', 1)) else 0.5)
             for c in cells}
  table = experiment_report.markdown(exp, results, experiment_report.summarise(exp, results))
  assert ('Chosen at an end of its grid (the best setting may lie beyond it): vicreg '
          'optim.base_lr=1.0 (the largest tried); vicreg_it loss.terms.logdet_entropy.weight=0.05 '
          '(the smallest tried).') in table


def test_the_cost_line_sums_the_cells_and_gives_their_median_and_range():
  exp = experiment_config()
  cells = grid.tuning_cells(exp) + grid.final_cells(exp, {'vicreg': 0, 'vicreg_it': 0})
  results = {}
  for cell, minutes in zip(cells, (10, 12, 30, 11, 13, 90, 14)):
    r = fake_result(cell, 0.8)
    r['wall_time_sec'] = 60.0 * minutes
    r['time_breakdown_sec'] = {'steps': 50.0 * minutes, 'evaluation: features': 6.0 * minutes,
                               'evaluation: kNN': 1.0 * minutes, 'start-up': 3.0 * minutes}
    results[cell.name] = r
  assert [c.stage for c in cells] == ['tune'] * 3 + ['final'] * 4
  summary = experiment_report.summarise(exp, results)
  cost = summary['cost']
  assert cost['cells'] == 7 and cost['total_sec'] == 60.0 * 180
  assert cost['median_sec'] == 60.0 * 13 and cost['min_sec'] == 600 and cost['max_sec'] == 5400
  assert cost['parts_sec'] == {'steps': 50.0 * 180, 'evaluation': 7.0 * 180,
                               'start-up, compilation and the rest': 3.0 * 180}
  table = experiment_report.markdown(exp, results, summary)
  assert ('Cost: 7 cells took 3.0 h in all (median cell 13.0 min, 10.0-90.0); steps 2.5 h, '
          'evaluation 0.3 h, start-up, compilation and the rest 0.1 h. A cell\'s time includes '
          'any time it shared the cores with other work or was stopped. The cells do not '
          'record the machine they ran on.') in table
  # Cells from a runner that records stops, resumptions and the machine.
  for name, stopped, start, machine in (('vicreg__final__s0', 1800.0, 0, 'CPU A, 2 cores'),
                                        ('vicreg__final__s1', 0.0, 500, 'CPU B, 2 cores'),
                                        ('vicreg_it__final__s0', 0.0, 0, 'CPU A, 2 cores')):
    results[name].update(stopped_sec=stopped, start_step=start, host=machine)
  table = experiment_report.markdown(exp, results, experiment_report.summarise(exp, results))
  assert ('other work, and the 0.5 h that 3 cells spent stopped (4 earlier cells did not record '
          'stops). 1 cell resumed part-way after an interruption; only the last process of each '
          'is counted. Machines: CPU A, 2 cores (2 cells), CPU B, 2 cores (1 cell); 4 '
          'earlier do not record theirs.') in table
  # Final cells: vicreg seeds 0, 1 took 11 and 13 min, vicreg_it 90 and 14: the
  # median and range, not a t-interval over interruptions.
  finals = {c.name: m for c, m in zip(cells, (10, 12, 30, 11, 13, 90, 14)) if c.stage == 'final'}
  by_method = {m: sorted(v for k, v in finals.items() if k.startswith(m + '__'))
               for m in ('vicreg', 'vicreg_it')}
  for method, (low, high) in by_method.items():
    assert f'| {(low + high) / 2:.1f} ({low:.1f}-{high:.1f}) |' in [
        line[line.rindex('| ', 0, len(line) - 2):] for line in table.splitlines()
        if line.startswith(f'| {method} | 2 |')]


def test_the_final_cell_at_the_tuning_seed_reuses_the_tuning_pretraining(tmp_path):
  """Only a completed tuning run of the same overrides, with its checkpoints, is reused."""
  exp = experiment_config()
  root, results = tmp_path / 'root', tmp_path / 'results'
  tune = grid.tuning_cells(exp)[0]                       # vicreg, trial 0, seed 0
  finals = grid.final_cells(exp, {'vicreg': 0, 'vicreg_it': 0})
  final_s0 = next(c for c in finals if c.method == 'vicreg' and c.seed == 0)
  final_s1 = next(c for c in finals if c.method == 'vicreg' and c.seed == 1)
  source = root / tune.name
  (source / 'checkpoints' / '40').mkdir(parents=True)
  (source / 'checkpoints' / '40' / 'state').write_text('weights')
  (source / 'metrics.jsonl').write_text('{"step": 40}\n')
  summary = {'status': 'completed', 'steps': 40, 'total_steps': 40, 'wall_time_sec': 123.0,
             'eval': {'linear_test_acc': 0.8}}
  (source / 'summary.json').write_text(json.dumps(summary))
  result = dict(fake_result(tune, 0.8), status='completed', overrides=dict(tune.overrides))
  grid.write_json(grid.result_path(str(results), exp, tune), result)
  reusable = lambda cell: experiments.reusable_pretraining(exp, str(root), str(results), cell)

  assert reusable(final_s0) == str(source)
  assert reusable(final_s1) is None            # another seed pretrains from scratch
  # Result files written before results had a 'status' count by their metrics.
  del result['status']
  grid.write_json(grid.result_path(str(results), exp, tune), result)
  assert reusable(final_s0) == str(source)
  diverged = dict(result, status='diverged', metrics={})
  grid.write_json(grid.result_path(str(results), exp, tune), diverged)
  assert reusable(final_s0) is None
  grid.write_json(grid.result_path(str(results), exp, tune), result)
  assert reusable(tune) is None
  # The trial was redefined after the tuning run: its pretraining is not this cell's.
  exp.methods.vicreg.trials = ['variant=smoke, optim.base_lr=3.0', exp.methods.vicreg.trials[1]]
  redefined = grid.final_cells(exp, {'vicreg': 0, 'vicreg_it': 0})
  assert reusable(next(c for c in redefined if c.method == 'vicreg' and c.seed == 0)) is None
  exp.methods.vicreg.trials = experiment_config().methods.vicreg.trials
  # A tuning run stopped early (stop_at_step) is not reused.
  (source / 'summary.json').write_text(json.dumps(dict(summary, steps=20)))
  assert reusable(final_s0) is None
  (source / 'summary.json').write_text(json.dumps(summary))

  runner = experiments.Runner(exp, str(root), str(results), parallel=1, total=1, done=0)
  workdir = root / final_s0.name
  workdir.mkdir()
  experiments.reuse_pretraining(str(source), str(workdir))
  assert (workdir / 'checkpoints' / '40' / 'state').read_text() == 'weights'
  assert (workdir / 'metrics.jsonl').read_text() == '{"step": 40}\n'
  assert reusable(final_s0) is None            # the cell's own checkpoints are never replaced
  runner.record(final_s0, dict(summary, config={}, eval={'linear_test_acc': 0.79},
                               wall_time_sec=20.0), ('abc', 'def'))
  recorded = grid.load_results(str(results), exp)[final_s0.name]
  assert recorded['pretraining_from'] == {'cell': tune.name, 'wall_time_sec': 123.0}
  assert recorded['wall_time_sec'] is None and recorded['eval_wall_time_sec'] == 20.0
  assert recorded['evaluated_on'] == 'test'


# ------------------------------------------------------ running (real cells)

@pytest.mark.slow   # about 2.5 minutes on 2 cores: three processes, each compiling and evaluating
def test_a_killed_cell_resumes_and_finished_cells_are_skipped(tmp_path, monkeypatch):
  """One method, one trial, one final seed: two real :smoke cells on Fashion-MNIST."""
  exp = experiment_config(final_seeds=(0,))
  exp.methods = dict(vicreg=dict(config='configs/vicreg.py',
                                 trials=['variant=smoke, total_steps=40']))
  root, results = str(tmp_path / 'root'), str(tmp_path / 'results')
  tune_cell = grid.tuning_cells(exp)[0]
  workdir = os.path.join(root, tune_cell.name)

  # Kill the tuning cell with SIGKILL once its first checkpoint is complete.
  os.makedirs(workdir)
  process = subprocess.Popen(tune_cell.command(workdir), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
  checkpoint = os.path.join(workdir, 'checkpoints', '2')
  deadline = time.time() + 300
  while not os.path.isdir(checkpoint) and time.time() < deadline and process.poll() is None:
    time.sleep(0.2)
  time.sleep(0.5)  # let the asynchronous save of step 2 finish
  assert process.poll() is None, 'the cell finished before it could be killed'
  os.killpg(process.pid, signal.SIGKILL)
  process.wait()
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))

  experiments.run(exp, root, results, (0, 1), parallel=1)
  log = open(os.path.join(workdir, 'log.txt')).read()
  assert 'resuming at step' in log
  recorded = grid.load_results(results, exp)
  assert sorted(recorded) == ['vicreg__final__s0', 'vicreg__tune0__s0']
  assert recorded['vicreg__tune0__s0']['steps'] == 40
  assert recorded['vicreg__tune0__s0']['evaluated_on'] == 'validation'
  assert recorded['vicreg__final__s0']['evaluated_on'] == 'test'
  # The cost's context: this machine, the step the last process resumed at (the
  # checkpoint the kill left, 2 or later), and no time stopped.
  tune = recorded['vicreg__tune0__s0']
  assert tune['host'] == host.describe() and 2 <= tune['start_step'] < 40
  assert tune['stopped_sec'] == 0.0
  # The final cell at the tuning seed restored the tuning run's last checkpoint
  # and only evaluated it.
  assert recorded['vicreg__final__s0']['pretraining_from']['cell'] == 'vicreg__tune0__s0'
  final_log = open(os.path.join(root, 'vicreg__final__s0', 'log.txt')).read()
  assert 'resuming at step 40' in final_log
  assert os.path.exists(os.path.join(results, 'tiny.md'))

  # A second call starts nothing: every cell has a result file, even with
  # the run folders gone (a fresh machine with the committed results).
  def no_start(self, cell):
    raise AssertionError(f'{cell.name} was started again')
  monkeypatch.setattr(experiments.Runner, 'start', no_start)
  subprocess.run(['rm', '-rf', root], check=True)
  experiments.run(exp, root, results, (0, 1), parallel=1)


def _wait_for(condition, seconds=10.0):
  deadline = time.time() + seconds
  while not condition():
    assert time.time() < deadline, 'the process did not change state in time'
    time.sleep(0.05)


@pytest.mark.skipif(not os.path.exists('/proc/self/stat'), reason='needs /proc (Linux)')
def test_the_time_left_leaves_out_the_seconds_a_cell_was_stopped():
  """A SIGSTOPped cell (a grid paused for a timing) is not cell time for the estimate."""
  process = subprocess.Popen(['sleep', '60'])
  try:
    clock = experiments.PauseClock(now=0.0)
    clock.update({'cell': process.pid}, now=10.0)   # running through 0-10 s
    os.kill(process.pid, signal.SIGSTOP)
    _wait_for(lambda: experiments.process_stopped(process.pid))
    clock.update({'cell': process.pid}, now=40.0)   # found stopped: 10-40 s paused
    os.kill(process.pid, signal.SIGCONT)
    _wait_for(lambda: not experiments.process_stopped(process.pid))
    clock.update({'cell': process.pid}, now=50.0)   # running again
    assert clock.pop('cell') == 30.0
    assert clock.pop('cell') == 0.0
  finally:
    process.kill()
    process.wait()
  assert not experiments.process_stopped(process.pid)   # gone: not stopped
