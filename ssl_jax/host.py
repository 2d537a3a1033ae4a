"""The machine a process runs on, as run summaries and benchmarks name it.

Timings on the 2-core cloud machines this project runs on differ by 3x
between CPU models (docs/speed.md), so a run's summary and each grid cell
record the host they ran on.
"""

from __future__ import annotations

import os
import platform


def cpu_name() -> str:
  """The CPU's model name, with its family and model numbers where the name alone is vague
  (a cloud's 'AMD EPYC' is Zen 4 at family 25 and Zen 5 at family 26)."""
  fields = {}
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        if not key.strip():
          break  # the first processor's block is enough
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  if 'model name' not in fields:
    return platform.processor() or 'unknown CPU'
  if 'cpu family' in fields and 'model' in fields:
    return f"{fields['model name']} (family {fields['cpu family']}, model {fields['model']})"
  return fields['model name']


def describe() -> str:
  """'<cpu_name()>, <n> cores': the cores this process may use."""
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:   # not Linux
    cores = os.cpu_count() or 0
  return f'{cpu_name()}, {cores} cores'
