"""Metrics: TensorBoard events, a JSON-lines history, a progress bar, plots.

Only process 0 writes; the others get a writer that does nothing, so the
training loop calls it unconditionally.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import time
from typing import Any, Mapping, Optional

import numpy as np


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the message names the step and checkpoint.

  Here rather than in ssl_jax.train (which imports TensorFlow) so that the
  grid, which reads a diverged cell's one-line error, shares the message's
  start instead of restating it.
  """
  MESSAGE_START = 'Non-finite loss'


class MetricWriter:
  """Writes scalars to TensorBoard event files and to metrics.jsonl.

  metrics.jsonl is the record; the TensorBoard events are derived from it.
  A run resumed from the checkpoint of step k (resume_step=k) keeps the rows
  up to k, drops the later ones (they are redone), and rebuilds the events
  from the kept rows, so that after any number of kills and resumes neither
  holds a duplicated or missing step. A last line cut short by a kill is
  ignored.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: Optional[int] = None):
    self.enabled = enabled
    self.history: list[dict[str, float]] = []
    self._jsonl = os.path.join(workdir, 'metrics.jsonl')
    self._tb_dir = os.path.join(workdir, 'tensorboard')
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.history = read_jsonl(self._jsonl)
    if resume_step is not None:
      self.history = [r for r in self.history if r['step'] <= resume_step]
      self._rewrite()
      self._rebuild_events()
    import tensorflow as tf
    self._tb = tf.summary.create_file_writer(self._tb_dir)

  @property
  def path(self) -> str:
    """The metrics.jsonl file."""
    return self._jsonl

  def _rewrite(self) -> None:
    tmp = self._jsonl + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in self.history)
    os.replace(tmp, self._jsonl)   # a kill leaves the old file or the new one, whole

  def _rebuild_events(self) -> None:
    import tensorflow as tf
    if os.path.isdir(self._tb_dir):
      for name in os.listdir(self._tb_dir):
        if name.startswith('events.out.tfevents'):
          os.remove(os.path.join(self._tb_dir, name))
    if self.history:
      writer = tf.summary.create_file_writer(self._tb_dir)
      try:
        for row in self.history:
          self._write_events(writer, row)
      finally:
        # close() writes the buffered events: a full disk fails here, and must
        # fail as the OSError the training loop reports.
        with _tf_errors_as_oserror():
          writer.close()

  @staticmethod
  def _write_events(writer, row) -> None:
    import tensorflow as tf
    with _tf_errors_as_oserror(), writer.as_default(step=int(row['step'])):
      for k, v in row.items():
        if k != 'step' and math.isfinite(v):
          tf.summary.scalar(k, v)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {'step': int(step)}
    row.update({k: float(v) for k, v in scalars.items()})
    # Rows at or after this step (a rerun of earlier steps) are replaced, and
    # the file rewritten once; otherwise the row is appended.
    kept = [r for r in self.history if r['step'] < row['step']]
    rewrite = len(kept) != len(self.history)
    self.history = kept + [row]
    if rewrite:
      self._rewrite()
    else:
      with open(self._jsonl, 'a') as f:
        f.write(json.dumps(row) + '\n')
    self._write_events(self._tb, row)

  def write_text(self, name: str, text: str) -> None:
    if not self.enabled:
      return
    import tensorflow as tf
    with _tf_errors_as_oserror(), self._tb.as_default(step=0):
      tf.summary.text(name, text)

  def flush(self) -> None:
    if self._tb is not None:
      with _tf_errors_as_oserror():
        self._tb.flush()


@contextlib.contextmanager
def _tf_errors_as_oserror():
  """TensorBoard's writer reports a full disk as tf.errors.ResourceExhaustedError
  (seen in CI), not OSError: re-raise TF's I/O failures as OSError, so that the
  training loop turns every failed write into the same clear error."""
  import tensorflow as tf
  try:
    yield
  except tf.errors.OpError as error:
    code = errno.ENOSPC if 'No space left' in str(error) else errno.EIO
    raise OSError(code, f'TensorBoard event file: {error.message}') from error


class Stopwatch:
  """Seconds spent in named sections, summed over calls (the run's time breakdown).

  A section measures wall time, so work dispatched asynchronously before it
  (a training step) counts there unless it was waited for first; the
  training loop waits (it fetches the loss) before every periodic section.
  """

  def __init__(self):
    self.seconds: dict[str, float] = {}

  @contextlib.contextmanager
  def section(self, name: str):
    start = time.perf_counter()
    try:
      yield
    finally:
      self.add(name, time.perf_counter() - start)

  def add(self, name: str, seconds: float) -> None:
    self.seconds[name] = self.seconds.get(name, 0.0) + seconds

  def total(self) -> float:
    return sum(self.seconds.values())


def periodic_due(step: int, every: int, total_steps: int, log_every: int) -> bool:
  """Whether work run every `every` steps and at the end (online probe, diagnostics) runs now.

  At multiples of `every` and at the last step; a multiple less than one log
  interval before the last step is skipped, because the last step's
  measurement stands for it. The default run (305 steps, every 100, logs
  every 10) measured at 300 and again at 305: two passes five steps apart,
  2.4 s of its 10 s of periodic work. `every` 0 turns the work off.
  """
  if every <= 0:
    return False
  if step == total_steps:
    return True
  return step % every == 0 and total_steps - step >= log_every


class Throughput:
  """Images per second between two calls."""

  def __init__(self):
    self._time, self._images = time.perf_counter(), 0

  def add(self, images: int) -> None:
    self._images += images

  def rate(self) -> float:
    now = time.perf_counter()
    rate = self._images / max(now - self._time, 1e-9)
    self._time, self._images = now, 0
    return rate


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The rows of a JSON-lines file; a last line cut short (a killed writer) is skipped."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    lines = f.read().split('\n')
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i < len(lines) - 2:   # not the last line: the file is damaged, say so
        raise ValueError(f'{path}, line {i + 1}, is not JSON: {line[:80]!r}') from None
  return rows


def completed_summary(workdir: str) -> Optional[dict[str, Any]]:
  """workdir/summary.json if the run there completed (status 'completed'), else None."""
  path = os.path.join(workdir, 'summary.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    summary = json.load(f)
  return summary if summary.get('status') == 'completed' else None


def quiet_library_logs() -> None:
  """Keeps Orbax's and TFDS's INFO lines (every save, every read) off the console.

  Unless the command line asks for them with absl's --verbosity (-v).
  """
  from absl import flags
  from absl import logging
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


def progress_bar(total: int, initial: int, enabled: bool):
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, disable=not enabled, unit='step',
              dynamic_ncols=True, desc='pretrain')


PLOT_GROUPS = (
    ('objective', lambda k: k == 'loss'),
    ('loss terms', lambda k: k in ('invariance', 'variance', 'covariance', 'logdet_entropy',
                                   'pairwise_entropy', 'barlow_twins', 'nt_xent', 'byol')),
    ('online probe accuracy', lambda k: k.startswith('probe_') and k.endswith('acc')),
    ('embedding', lambda k: k in ('embedding_std', 'embedding_std_normalized')),
    ('effective rank', lambda k: k == 'effective_rank'),
    ('learning rate', lambda k: k == 'lr'),
    ('entropy (fixed batch)', lambda k: k.startswith('diag/') and 'entropy' in k),
    ('effective rank (fixed batch)', lambda k: k.startswith('diag/') and k.endswith('rank')),
)


def plot_history(history: list[Mapping[str, float]], path: str, title: str = '') -> Optional[str]:
  """A PNG with one panel per group of curves; returns the path."""
  if not history:
    return None
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  keys = sorted({k for row in history for k in row if k != 'step'})
  groups = [(name, [k for k in keys if pred(k)]) for name, pred in PLOT_GROUPS]
  groups = [(name, ks) for name, ks in groups if ks]
  cols = 3
  rows = math.ceil(len(groups) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
  for ax, (name, ks) in zip(axes.flat, groups):
    for k in ks:
      pts = [(r['step'], r[k]) for r in history if k in r and math.isfinite(r[k])]
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, label=k, marker='.' if len(pts) < 30 else None)
    ax.set_title(name)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    if ax.get_lines():
      ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(groups):]:
    ax.axis('off')
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def to_host_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in metrics.items()}


def embedding_map(features: np.ndarray, labels: np.ndarray, path: str, *, title: str = '',
                  count: int = 2000, seed: int = 0) -> Optional[str]:
  """A 2-D t-SNE map of the first `count` embeddings, coloured by class; the PNG's path.

  Standardised features, PCA to 50 dimensions, then scikit-learn's Barnes-Hut
  t-SNE (perplexity 30, or less for small sets): about 10 s for 2,000
  embeddings on 2 CPU cores. The map shows neighbourhoods, not distances:
  clusters' sizes and the gaps between them mean little in t-SNE.
  """
  from sklearn.decomposition import PCA
  from sklearn.manifold import TSNE
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  x = np.asarray(features[:count], np.float64)
  y = np.asarray(labels[:count])
  if len(x) < 5:
    return None
  x = (x - x.mean(0)) / (x.std(0) + 1e-6)
  x = PCA(min(50, x.shape[1], len(x)), random_state=seed).fit_transform(x)
  xy = TSNE(2, init='pca', random_state=seed,
            perplexity=min(30.0, (len(x) - 1) / 3)).fit_transform(x)
  fig, ax = plt.subplots(figsize=(6.5, 6))
  classes = np.unique(y)
  colours = plt.cm.tab10.colors if len(classes) <= 10 else plt.cm.tab20.colors
  for i, c in enumerate(classes):
    keep = y == c
    ax.scatter(xy[keep, 0], xy[keep, 1], s=4, color=colours[i % len(colours)], label=str(c))
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_title(f'{title}\nt-SNE of {len(x)} test embeddings, coloured by class', fontsize=9)
  if len(classes) <= 20:
    ax.legend(markerscale=3, fontsize=7, loc='best', frameon=False)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
