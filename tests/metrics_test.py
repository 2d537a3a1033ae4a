"""Metric history across resumes, and the training-curve plot."""

import json
import os

from ssl_jax import metrics


def rows(path):
  return [json.loads(line) for line in open(path)]


def test_resumed_run_replaces_the_rows_after_its_checkpoint(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  for step in range(1, 6):
    writer.write_scalars(step, {'loss': float(step)})
  # The process dies after step 5; the newest checkpoint was step 2.
  resumed = metrics.MetricWriter(str(tmp_path))
  assert [r['step'] for r in resumed.history] == [1, 2, 3, 4, 5]
  resumed.write_scalars(3, {'loss': 30.0})
  resumed.write_scalars(4, {'loss': 40.0})
  assert [(r['step'], r['loss']) for r in rows(tmp_path / 'metrics.jsonl')] == [
      (1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_disabled_writer_writes_nothing(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path / 'w'), enabled=False)
  writer.write_scalars(1, {'loss': 1.0})
  assert not os.path.exists(tmp_path / 'w')


def test_plot_has_a_panel_per_group(tmp_path):
  history = [{'step': s, 'loss': 1.0 / s, 'invariance': 0.5, 'lr': 0.1 * s,
              'probe_train_acc': 0.1 * s, 'effective_rank': float('nan')} for s in range(1, 8)]
  path = metrics.plot_history(history, str(tmp_path / 'curves.png'), title='t')
  assert path and os.path.getsize(path) > 10_000
  assert metrics.plot_history([], str(tmp_path / 'none.png')) is None


def test_library_info_logs_are_quiet_unless_asked_for():
  from absl import flags
  from absl import logging
  before = logging.get_verbosity()
  try:
    logging.set_verbosity(logging.INFO)
    metrics.quiet_library_logs()
    assert logging.get_verbosity() == logging.WARNING
    flags.FLAGS['verbosity'].present = 1      # as if --verbosity=0 was given
    logging.set_verbosity(logging.INFO)
    metrics.quiet_library_logs()
    assert logging.get_verbosity() == logging.INFO
  finally:
    flags.FLAGS['verbosity'].present = 0
    logging.set_verbosity(before)


def event_steps(tb_dir, tag='loss'):
  """Every step at which the event files in tb_dir hold `tag`, in file order."""
  import tensorflow as tf
  steps = []
  for name in sorted(os.listdir(tb_dir)):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(tb_dir, name)):
      steps += [event.step for v in event.summary.value if v.tag == tag]
  return steps


def test_resume_step_truncates_the_record_and_rebuilds_the_events(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  for step in range(1, 6):
    writer.write_scalars(step, {'loss': float(step)})
  writer.flush()
  # Killed after step 5 with half a row written; the newest checkpoint is step 2.
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 6, "lo')
  resumed = metrics.MetricWriter(str(tmp_path), resume_step=2)
  assert [r['step'] for r in rows(tmp_path / 'metrics.jsonl')] == [1, 2]
  for step in range(3, 5):
    resumed.write_scalars(step, {'loss': 10.0 * step})
  resumed.flush()
  assert [(r['step'], r['loss']) for r in rows(tmp_path / 'metrics.jsonl')] == [
      (1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
  assert sorted(event_steps(tmp_path / 'tensorboard')) == [1, 2, 3, 4]


def test_a_damaged_line_in_the_middle_is_an_error(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1}\n{"st\n{"step": 3}\n')
  import pytest
  with pytest.raises(ValueError, match='line 2'):
    metrics.read_jsonl(str(tmp_path / 'metrics.jsonl'))


def test_a_failed_event_rebuild_is_an_oserror(tmp_path, monkeypatch):
  """A full disk while the resumed run rewrites its TensorBoard events (TF raises
  its own error type from the writer's close) reaches the caller as OSError."""
  import pytest
  import tensorflow as tf
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write_scalars(1, {'loss': 1.0})
  writer.flush()

  class FullDiskWriter:
    def __init__(self, inner):
      self.inner = inner

    def as_default(self, step):
      return self.inner.as_default(step=step)

    def close(self):
      self.inner.close()
      raise tf.errors.ResourceExhaustedError(None, None, 'No space left on device')

  create = tf.summary.create_file_writer
  monkeypatch.setattr(tf.summary, 'create_file_writer', lambda d: FullDiskWriter(create(d)))
  with pytest.raises(OSError, match='No space left') as error:
    metrics.MetricWriter(str(tmp_path), resume_step=1)
  import errno
  assert error.value.errno == errno.ENOSPC


def test_periodic_work_runs_at_multiples_and_the_end_but_not_twice_at_the_end():
  def due(total, every, log_every):
    logged = [s for s in range(1, total + 1) if s % log_every == 0 or s == total]
    return [s for s in logged if metrics.periodic_due(s, every, total, log_every)]

  # The default run: 305 steps, every 100, logged every 10. Step 300 is five
  # steps before the end, whose measurement stands for it.
  assert due(305, 100, 10) == [100, 200, 305]
  # A run ending on a multiple measures it once; one ending a log interval or
  # more after a multiple keeps both.
  assert due(300, 100, 10) == [100, 200, 300]
  assert due(310, 100, 10) == [100, 200, 300, 310]
  assert due(3, 2, 1) == [2, 3]   # the smoke config
  assert due(305, 0, 10) == []    # off


def test_a_restart_from_scratch_drops_a_killed_first_attempts_rows_and_events(tmp_path):
  # Killed after step 2, before its first checkpoint: the restart begins at
  # step 0 (resume_step=0) and logs steps 1-2 again, once each.
  first = metrics.MetricWriter(str(tmp_path))
  for step in (1, 2):
    first.write_scalars(step, {'loss': float(step)})
  first.flush()
  again = metrics.MetricWriter(str(tmp_path), resume_step=0)
  for step in (1, 2, 3):
    again.write_scalars(step, {'loss': 10.0 * step})
  again.flush()
  assert [(r['step'], r['loss']) for r in rows(tmp_path / 'metrics.jsonl')] == [
      (1, 10.0), (2, 20.0), (3, 30.0)]
  assert sorted(event_steps(tmp_path / 'tensorboard')) == [1, 2, 3]
