"""The experiment runner: planning, shards, interval arithmetic, resume and skip."""

import json
import math
import os
import signal
import subprocess
import time

import ml_collections
import pytest
from scipy import stats

from ssl_jax import experiments


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
  assert experiments.parse_overrides(' optim.base_lr=0.3, variant=add ') == {
      'optim.base_lr': '0.3', 'variant': 'add'}
  with pytest.raises(ValueError, match="'optim.base_lr' must look like 'key=value'"):
    experiments.parse_overrides('optim.base_lr')


def test_tuning_evaluates_on_validation_and_final_on_test():
  exp = experiment_config()
  tune = experiments.tuning_cells(exp)
  assert [c.name for c in tune] == ['vicreg__tune0__s0', 'vicreg_it__tune0__s0',
                                    'vicreg__tune1__s0']
  assert all(dict(c.overrides)['data.eval_on'] == 'validation' for c in tune)
  final = experiments.final_cells(exp, {'vicreg': 1, 'vicreg_it': 0})
  assert all(dict(c.overrides)['data.eval_on'] == 'test' for c in final)
  assert dict(final[0].overrides)['optim.base_lr'] == '1.0'      # vicreg's chosen trial
  command = final[0].command('w')
  assert '--config=configs/vicreg.py:smoke' in command and '--config.seed=0' in command


def test_the_best_validation_trial_is_chosen_once_all_trials_are_in():
  exp = experiment_config()
  tune = {c.name: c for c in experiments.tuning_cells(exp)}
  results = {'vicreg__tune0__s0': fake_result(tune['vicreg__tune0__s0'], 0.7)}
  assert experiments.choose_trials(exp, results)['vicreg'] is None   # trial 1 missing
  results['vicreg__tune1__s0'] = fake_result(tune['vicreg__tune1__s0'], 0.8)
  assert experiments.choose_trials(exp, results)['vicreg'] == 1
  assert all(c.trial < 0 for c in experiments.final_cells(
      exp, experiments.choose_trials(exp, results)) if c.method == 'vicreg_it')


def test_a_diverged_trial_is_recorded_never_chosen_and_shown():
  exp = experiment_config()
  tune = {c.name: c for c in experiments.tuning_cells(exp)}
  log = ('pretrain: 66%\nssl_jax.train.NonFiniteLossError: Non-finite loss (nan) at step 198 '
         '(checked up to step 200); the last good checkpoint is step 100\n')
  diverged = experiments.diverged_result(tune['vicreg__tune1__s0'], log, 60.0, 'abc')
  assert diverged['status'] == 'diverged' and 'step 198' in diverged['error']
  assert experiments.diverged_result(tune['vicreg__tune1__s0'], 'Killed\n', 1.0, 'a') is None
  results = {'vicreg__tune0__s0': fake_result(tune['vicreg__tune0__s0'], 0.7),
             'vicreg__tune1__s0': diverged,
             'vicreg_it__tune0__s0': fake_result(tune['vicreg_it__tune0__s0'], 0.8)}
  assert experiments.choose_trials(exp, results) == {'vicreg': 0, 'vicreg_it': 0}
  table = experiments.markdown(exp, results, experiments.summarise(exp, results))
  assert '| vicreg | 1 | variant=smoke, optim.base_lr=1.0 | diverged (non-finite loss) |' in table
  assert experiments.all_trials_diverged(exp, results) == frozenset()


def test_a_method_whose_every_trial_diverged_gets_no_final_cells_and_fails_its_claim():
  exp = experiment_config()
  tune = {c.name: c for c in experiments.tuning_cells(exp)}
  log = 'ssl_jax.train.NonFiniteLossError: Non-finite loss (nan) at step 76\n'
  results = {'vicreg__tune0__s0': fake_result(tune['vicreg__tune0__s0'], 0.7),
             'vicreg__tune1__s0': fake_result(tune['vicreg__tune1__s0'], 0.72),
             'vicreg_it__tune0__s0': experiments.diverged_result(
                 tune['vicreg_it__tune0__s0'], log, 60.0, 'abc')}
  skip = experiments.all_trials_diverged(exp, results)
  assert skip == frozenset({'vicreg_it'})
  finals = experiments.final_cells(exp, experiments.choose_trials(exp, results), skip=skip)
  assert {c.method for c in finals} == {'vicreg'} and all(c.trial == 1 for c in finals)
  summary = experiments.summarise(exp, results)
  assert summary['chosen_trial'] == {'vicreg': 1, 'vicreg_it': None}
  assert summary['final']['vicreg_it']['all_trials_diverged']
  claim = summary['claims'][0]
  assert (claim['variant'], claim['base']) == ('vicreg_it', 'vicreg')
  assert claim['linear_test_acc']['verdict'].startswith('not reproduced: every tuning trial')
  table = experiments.markdown(exp, results, summary)
  assert '| vicreg_it | 0 | every tuning trial diverged' in table
  # A method with one trial still unfinished is not given up on.
  del results['vicreg__tune1__s0']
  results['vicreg__tune0__s0'] = experiments.diverged_result(
      tune['vicreg__tune0__s0'], log, 60.0, 'abc')
  assert 'vicreg' not in experiments.all_trials_diverged(exp, results)


@pytest.mark.parametrize('shards', [1, 2, 3])
def test_shards_cover_every_cell_exactly_once(shards):
  exp = experiment_config()
  cells = experiments.tuning_cells(exp) + experiments.final_cells(exp, {'vicreg': 0,
                                                                       'vicreg_it': 0})
  covered = [c.name for i in range(shards) for c in experiments.in_shard(cells, (i, shards))]
  assert sorted(covered) == sorted(c.name for c in cells)
  with pytest.raises(ValueError, match='--shard'):
    experiments.parse_shard('2/2')


# --------------------------------------------------------------- aggregation

def test_t_quantiles_match_scipy():
  for df in list(range(1, 40)) + [60, 100, 1000]:
    assert experiments.t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-4)


def test_aggregation_matches_a_hand_computed_student_t_interval(tmp_path):
  exp = experiment_config()
  chosen = {'vicreg': 0, 'vicreg_it': 0}
  folder = tmp_path / 'tiny'
  folder.mkdir()
  vicreg = [0.80, 0.82, 0.81]
  vicreg_it = [0.85, 0.86, 0.87]
  exp.final_seeds = (0, 1, 2)
  cells = experiments.tuning_cells(exp) + experiments.final_cells(exp, chosen)
  for cell in cells:
    if cell.stage == 'tune':
      value = 0.9 if cell.trial == 0 else 0.1
    else:
      value = (vicreg if cell.method == 'vicreg' else vicreg_it)[cell.seed]
    (folder / f'{cell.name}.json').write_text(json.dumps(fake_result(cell, value)))
  readme = tmp_path / 'README.md'
  readme.write_text('# ssl_jax\nbefore\n<!-- results:tiny:start -->\nold\n'
                    '<!-- results:tiny:end -->\nafter\n')
  summary = experiments.aggregate(exp, str(tmp_path), str(readme))

  # By hand: mean 0.81, sample sd 0.01, t_{0.975, 2} = 4.302653, n = 3.
  mean, half, n = summary['final']['vicreg']['stats']['linear_test_acc']
  assert n == 3 and mean == pytest.approx(0.81)
  assert half == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-4)
  # Paired differences 0.05, 0.04, 0.06: mean 0.05, sd 0.01.
  claim = summary['claims'][0]['linear_test_acc']
  assert claim['mean_diff'] == pytest.approx(0.05)
  assert claim['ci95_half'] == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-4)
  assert claim['verdict'].startswith('reproduced')
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
  cells = experiments.tuning_cells(exp) + experiments.final_cells(exp, {'vicreg': 0,
                                                                      'vicreg_it': 0})
  results = {c.name: fake_result(c, 0.8, rank=(2.0 if c.method == 'vicreg_it' else 10.0))
             for c in cells}
  table = experiments.markdown(exp, results, experiments.summarise(exp, results))
  assert "share of vicreg's: vicreg_it 0.20. Below 0.25 counts as collapsed: vicreg_it." in table


def test_verdicts():
  assert experiments.verdict(0.02, 0.01, 3).startswith('reproduced')
  assert experiments.verdict(-0.02, 0.01, 3).startswith('not reproduced')
  assert experiments.verdict(0.005, 0.01, 3).startswith('inconclusive at this budget')
  assert experiments.verdict(0.02, math.nan, 1).startswith('inconclusive: fewer than 2')


def test_the_final_cell_at_the_tuning_seed_reuses_the_tuning_pretraining(tmp_path):
  """Only a completed tuning run of the same overrides, with its checkpoints, is reused."""
  exp = experiment_config()
  root, results = tmp_path / 'root', tmp_path / 'results'
  tune = experiments.tuning_cells(exp)[0]                       # vicreg, trial 0, seed 0
  finals = experiments.final_cells(exp, {'vicreg': 0, 'vicreg_it': 0})
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
  experiments.write_json(experiments.result_path(str(results), exp, tune), result)
  reusable = lambda cell: experiments.reusable_pretraining(exp, str(root), str(results), cell)

  assert reusable(final_s0) == str(source)
  assert reusable(final_s1) is None            # another seed pretrains from scratch
  # Result files written before results had a 'status' count by their metrics.
  del result['status']
  experiments.write_json(experiments.result_path(str(results), exp, tune), result)
  assert reusable(final_s0) == str(source)
  diverged = dict(result, status='diverged', metrics={})
  experiments.write_json(experiments.result_path(str(results), exp, tune), diverged)
  assert reusable(final_s0) is None
  experiments.write_json(experiments.result_path(str(results), exp, tune), result)
  assert reusable(tune) is None
  # The trial was redefined after the tuning run: its pretraining is not this cell's.
  exp.methods.vicreg.trials = ['variant=smoke, optim.base_lr=3.0', exp.methods.vicreg.trials[1]]
  redefined = experiments.final_cells(exp, {'vicreg': 0, 'vicreg_it': 0})
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
                               wall_time_sec=20.0), 'abc')
  recorded = experiments.load_results(str(results), exp)[final_s0.name]
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
  tune_cell = experiments.tuning_cells(exp)[0]
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
  recorded = experiments.load_results(results, exp)
  assert sorted(recorded) == ['vicreg__final__s0', 'vicreg__tune0__s0']
  assert recorded['vicreg__tune0__s0']['steps'] == 40
  assert recorded['vicreg__tune0__s0']['evaluated_on'] == 'validation'
  assert recorded['vicreg__final__s0']['evaluated_on'] == 'test'
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
