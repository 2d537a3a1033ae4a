"""Metrics: TensorBoard events, a JSON-lines history, a progress bar, plots.

Only process 0 writes; the others get a writer that does nothing, so the
training loop calls it unconditionally.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping, Optional

import numpy as np


class MetricWriter:
  """Writes scalars to TensorBoard event files and to metrics.jsonl."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self.history: list[dict[str, float]] = []
    self._jsonl = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      import tensorflow as tf
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, 'tensorboard'))
      if os.path.exists(self._jsonl):  # a resumed run keeps its earlier curves
        with open(self._jsonl) as f:
          self.history = [json.loads(line) for line in f if line.strip()]

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    import tensorflow as tf
    row = {'step': int(step)}
    row.update({k: float(v) for k, v in scalars.items()})
    with self._tb.as_default(step=int(step)):
      for k, v in row.items():
        if k != 'step' and math.isfinite(v):
          tf.summary.scalar(k, v)
    # A run resumed from a checkpoint redoes the steps after it: their old rows
    # go, and the file is rewritten once; otherwise rows are appended.
    kept = [r for r in self.history if r['step'] < row['step']]
    rewrite = len(kept) != len(self.history) or not self.history
    self.history = kept + [row]
    if rewrite:
      with open(self._jsonl, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in self.history)
    else:
      with open(self._jsonl, 'a') as f:
        f.write(json.dumps(row) + '\n')

  def write_text(self, name: str, text: str) -> None:
    if not self.enabled:
      return
    import tensorflow as tf
    with self._tb.as_default(step=0):
      tf.summary.text(name, text)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()


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
