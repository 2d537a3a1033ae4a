"""Orbax checkpoints of the TrainState, with a compatibility check.

Each checkpoint holds the state (params, optimiser state, EMA target, probe,
step, rng) and a JSON 'meta' item with the step, the seed and a fingerprint of
the config's shape-defining parts. Restoring from a checkpoint whose
fingerprint differs raises a ValueError naming the differing keys, never a
silent partial restore. Orbax writes to a temporary folder and renames it
when complete, so `latest_step()` only ever sees complete checkpoints; one
that is complete but unreadable is moved aside to checkpoints/corrupt/.
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
                 keep_period: int = 0, create: bool = True) -> ocp.CheckpointManager:
  """The workdir's checkpoint manager: the newest max_to_keep checkpoints, plus
  every checkpoint whose step is a multiple of keep_period (> 0), which
  `ssl_jax.diagnose` reads to draw curves over training without a rerun.
  create=False for readers: nothing is created in the workdir."""
  if keep_period < 0:
    raise ValueError(f'keep_checkpoint_period must be >= 0 (0: off), got {keep_period}.')
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                           enable_async_checkpointing=async_save,
                                           keep_period=keep_period or None))


class CheckpointWriteError(OSError):
  """A checkpoint could not be written: full disk, unwritable or vanished folder."""


def check_writable(workdir: str) -> None:
  """Creates workdir if needed and checks a file can be written there, before any
  training: an unwritable --workdir fails at once, not at the first save."""
  probe = os.path.join(workdir, f'.write_test.{os.getpid()}')
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as error:
    raise CheckpointWriteError(
        f'--workdir {workdir} cannot be written ({type(error).__name__}: {error}). Choose a '
        'folder this user can write to, or fix its permissions.') from error


def write_error(manager: ocp.CheckpointManager, error: Exception, what: str
                ) -> CheckpointWriteError:
  """The error for a failed write into the run folder (a checkpoint, or the
  metrics beside it: a full disk hits whichever writes first), naming the intact
  checkpoints and the step a rerun resumes from."""
  try:
    kept = [s for s in manager.all_steps() if os.path.isdir(
        os.path.join(str(manager.directory), str(s)))]
  except Exception:  # pylint: disable=broad-except
    kept = []
  message = str(error).splitlines()[0][:400] if str(error) else type(error).__name__
  full = 'No space left' in str(error) or "os_error_code='28'" in str(error)
  cause = 'the disk is full' if full else 'the folder could not be written'
  resume = (f'run the same command again to resume from step {max(kept)}' if kept
            else 'run the same command again to start over')
  return CheckpointWriteError(
      f'{what} failed: {cause} ({type(error).__name__}: {message}). '
      f'The complete checkpoints already there (steps {kept}) are intact, and an unfinished '
      f'one is ignored on restart. Free space or fix the folder, then {resume}.')


def save(manager: ocp.CheckpointManager, state, config, *, force: bool = False) -> bool:
  """Starts saving `state` (asynchronously if the manager is); a failed write,
  of this save or of the previous asynchronous one, raises CheckpointWriteError."""
  step = int(jax.device_get(state.step))
  meta = {'step': step, 'seed': int(config.seed), 'fingerprint': fingerprint(config)}
  try:
    return manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
  except (OSError, ValueError) as error:
    raise write_error(manager, error, f'Saving the checkpoint of step {step} in {manager.directory}') from error


def wait(manager: ocp.CheckpointManager) -> None:
  """Waits for asynchronous saves; a failed one raises CheckpointWriteError."""
  try:
    manager.wait_until_finished()
  except (OSError, ValueError) as error:
    raise write_error(manager, error, f'An asynchronous checkpoint save in {manager.directory}') from error


class CorruptCheckpointError(ValueError):
  """A checkpoint folder that cannot be read back (truncated, overwritten, missing files)."""


class IncompatibleCheckpointError(ValueError):
  """A readable checkpoint written by a config with other shapes or structure."""


def move_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves checkpoints/<step> to checkpoints/corrupt/<step> (never deletes); returns the path.

  Process 0 moves it; every process waits for the move before going on.
  """
  source = os.path.join(str(manager.directory), str(step))
  corrupt = os.path.join(str(manager.directory), 'corrupt')
  target = os.path.join(corrupt, str(step))
  suffix = 1
  while os.path.exists(target):   # an earlier corrupt copy of the same step stays too
    target = os.path.join(corrupt, f'{step}.{suffix}')
    suffix += 1
  if jax.process_index() == 0:
    os.makedirs(corrupt, exist_ok=True)
    os.rename(source, target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f'ssl_jax_move_aside_{step}')
  manager.reload()
  return target


def restore_latest(manager: ocp.CheckpointManager, abstract_state, config, *,
                   strict: bool = False, log=print) -> Optional[Any]:
  """The newest readable checkpoint restored onto abstract_state's shardings, or None.

  A newest checkpoint that cannot be read is moved to checkpoints/corrupt/<step>
  (nothing is deleted), reported through `log`, and the one before it is
  tried, so that unattended restarts go on. With strict, it raises
  CorruptCheckpointError instead and leaves the folder in place. A checkpoint
  of an incompatible config always raises IncompatibleCheckpointError.
  """
  while (step := manager.latest_step()) is not None:
    try:
      return restore_step(manager, step, abstract_state, config)
    except CorruptCheckpointError as error:
      if strict:
        raise
      moved = move_aside(manager, step)
      log(f'ssl_jax: WARNING: {error} It was moved to {moved}; trying the checkpoint before it '
          '(checkpoint_strict=True refuses instead).')
  return None


def restore_step(manager: ocp.CheckpointManager, step: int, abstract_state, config) -> Any:
  """The checkpoint at `step`, after checking it was written by a compatible config.

  Raises CorruptCheckpointError if it cannot be read, IncompatibleCheckpointError
  if its config fingerprint differs from config's.
  """
  where = os.path.join(str(manager.directory), str(step))
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  except Exception as error:  # pylint: disable=broad-except
    raise CorruptCheckpointError(
        f'The checkpoint in {where} could not be read ({type(error).__name__}: '
        f'{str(error)[:300]}).') from error
  expected = fingerprint(config)
  found = meta.get('fingerprint', {})
  differing = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
  if differing:
    details = '; '.join(f'{k}: checkpoint {found.get(k)!r} vs config {expected.get(k)!r}'
                        for k in differing)
    raise IncompatibleCheckpointError(
        f'The checkpoint in {where} was written by an incompatible config ({details}). '
        'Use a new --workdir for this config, or restore the original values.')
  try:
    return manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))['state']
  except Exception as error:  # pylint: disable=broad-except
    # The fingerprint matched, so the structure is this config's: the data is bad.
    raise CorruptCheckpointError(
        f'The checkpoint in {where} could not be restored although its config matches '
        f'({type(error).__name__}: {str(error)[:300]}).') from error
