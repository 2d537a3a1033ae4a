"""Orbax checkpoints of the TrainState, with a compatibility check.

Each checkpoint holds the state (params, optimiser state, EMA target, probe,
step, rng) and a JSON 'meta' item with the step, the seed and a fingerprint of
the config's shape-defining parts. Restoring from a checkpoint whose
fingerprint differs raises a ValueError naming the differing keys, never a
silent partial restore. Orbax writes to a temporary folder and renames it
when complete, so `latest_step()` only ever sees complete checkpoints.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

# Config keys that define the shapes and structure of the state: a
# checkpoint only fits a run that agrees on all of them.
FINGERPRINT_KEYS = ('model', 'data.name', 'optim.name', 'loss.terms')


def _get(config, dotted: str):
  value = config
  for part in dotted.split('.'):
    value = value[part]
  return value.to_dict() if hasattr(value, 'to_dict') else value


def fingerprint(config) -> dict[str, Any]:
  out = {}
  for key in FINGERPRINT_KEYS:
    value = _get(config, key)
    if key == 'loss.terms':  # term names decide which networks exist; weights may change
      value = sorted(value)
    out[key] = json.loads(json.dumps(value, default=str))
  return out


def make_manager(workdir: str, *, max_to_keep: int, async_save: bool = True,
                 keep_period: int = 0) -> ocp.CheckpointManager:
  """The workdir's checkpoint manager: the newest max_to_keep checkpoints, plus
  every checkpoint whose step is a multiple of keep_period (> 0), which
  `ssl_jax.diagnose` reads to draw curves over training without a rerun."""
  if keep_period < 0:
    raise ValueError(f'keep_checkpoint_period must be >= 0 (0: off), got {keep_period}.')
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           keep_period=keep_period or None))


def save(manager: ocp.CheckpointManager, state, config, *, force: bool = False) -> bool:
  step = int(jax.device_get(state.step))
  meta = {'step': step, 'seed': int(config.seed), 'fingerprint': fingerprint(config)}
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)


def restore_latest(manager: ocp.CheckpointManager, abstract_state, config
                   ) -> Optional[Any]:
  """The newest complete checkpoint restored onto abstract_state's shardings, or None."""
  step = manager.latest_step()
  if step is None:
    return None
  return restore_step(manager, step, abstract_state, config)


def restore_step(manager: ocp.CheckpointManager, step: int, abstract_state, config) -> Any:
  """The checkpoint at `step`, after checking it was written by a compatible config."""
  where = os.path.join(str(manager.directory), str(step))
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  except Exception as error:  # pylint: disable=broad-except
    raise ValueError(
        f'The checkpoint in {where} could not be read ({type(error).__name__}: {error}). '
        'It may be corrupt: move that folder aside (nothing is deleted automatically) to '
        'resume from the previous checkpoint, or use a new --workdir.') from error
  expected = fingerprint(config)
  found = meta.get('fingerprint', {})
  differing = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
  if differing:
    details = '; '.join(f'{k}: checkpoint {found.get(k)!r} vs config {expected.get(k)!r}'
                        for k in differing)
    raise ValueError(
        f'The checkpoint in {where} was written by an incompatible config ({details}). '
        'Use a new --workdir for this config, or restore the original values.')
  try:
    return manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))['state']
  except Exception as error:  # pylint: disable=broad-except
    raise ValueError(
        f'The checkpoint in {where} does not match the state of this config '
        f'({type(error).__name__}: {error}). Use a new --workdir, or move the folder aside '
        'if it is corrupt.') from error
