"""One trainer per workdir: an exclusive lock held from start to exit.

Two trainers in one workdir race on its checkpoints and append to the same
metrics, and a later resume can mix their states. `hold(workdir)` makes the
second one fail at once, with an error naming the workdir, the holder (host,
pid, start time, command) and the fix.

What protects what:
- Local and network file systems (ext4, xfs, NFSv4, Lustre, ...): an
  exclusive `fcntl.flock` on WORKDIR/.lock, held by the open file. The kernel
  releases it when the holder dies in any way (SIGKILL, OOM, a crash), so a
  resume after a kill is never blocked; the holder's record in the file is
  then stale, and the next trainer takes it over with a log line. A machine
  that reboots loses its locks the same way.
- Object stores (paths with a scheme, e.g. gs://), which have no locks: a lock
  object WORKDIR/lock.json (host, pid, start, heartbeat), refreshed every
  HEARTBEAT_SECONDS by a background thread. A record whose heartbeat is older
  than STALE_SECONDS is taken over. This refuses a second trainer started
  while the first is alive, but not two trainers started within the same
  moment (an object store offers no atomic create through tf.io.gfile); the
  launch scripts start one job per workdir.
- Readers (`ssl_jax.embed`, `ssl_jax.diagnose`, `ssl_jax.export`) take no
  lock: `refuse_if_training(path)` only asks whether a trainer holds the
  workdir, so that they never write into a workdir that is training.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterator, Optional

LOCK_FILE = '.lock'
LOCK_OBJECT = 'lock.json'
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0
# A reader's probe holds a shared lock for microseconds; a trainer that meets
# one retries for this long before it reports the workdir as taken.
_RETRY_SECONDS = 2.0


class WorkdirLockedError(RuntimeError):
  """Another live process trains in this workdir."""


def is_object_store(path: str) -> bool:
  return '://' in str(path)


def record(command: Optional[str] = None) -> dict[str, Any]:
  """Who holds the lock: host, pid, start time, command line."""
  return {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
          'command': command if command is not None else ' '.join(sys.argv)}


def _describe(holder: Optional[dict[str, Any]]) -> str:
  if not holder:
    return 'a process whose record could not be read'
  return (f'pid {holder.get("pid")} on host {holder.get("host")}, started '
          f'{holder.get("started")} ({holder.get("command", "")})')


def _locked_error(workdir: str, holder: Optional[dict[str, Any]]) -> WorkdirLockedError:
  return WorkdirLockedError(
      f'The workdir {workdir} is in use: {_describe(holder)} is training there. Two '
      'trainers in one workdir would overwrite each other\'s checkpoints and metrics. Wait '
      'for it to finish (or stop it: SIGTERM saves a checkpoint), then run the same command '
      'again to resume; or pass another --workdir (for ssl_jax.experiments, another --root).')


def _read_json(text: str) -> Optional[dict[str, Any]]:
  try:
    value = json.loads(text)
  except ValueError:
    return None
  return value if isinstance(value, dict) else None


# ----------------------------------------------------------------------------
# Local and network file systems: flock.
# ----------------------------------------------------------------------------

def _read_fd(fd: int) -> Optional[dict[str, Any]]:
  return _read_json(os.pread(fd, 65536, 0).decode('utf-8', 'replace'))


@contextlib.contextmanager
def _hold_flock(workdir: str, log: Callable[[str], None], command: Optional[str]
                ) -> Iterator[dict[str, Any]]:
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    deadline = time.monotonic() + _RETRY_SECONDS
    while True:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if time.monotonic() >= deadline:
          raise _locked_error(workdir, _read_fd(fd)) from None
        time.sleep(0.05)
    stale = _read_fd(fd)
    if stale:
      log(f'ssl_jax: taking over the lock of {workdir} from {_describe(stale)}, which no '
          'longer holds it (killed or rebooted).')
    mine = record(command)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(mine).encode(), 0)
    os.fsync(fd)
    try:
      yield mine
    finally:
      os.ftruncate(fd, 0)    # a clean exit leaves no record to take over
  finally:
    os.close(fd)             # releases the flock


def _probe_flock(workdir: str) -> Optional[dict[str, Any]]:
  path = os.path.join(workdir, LOCK_FILE)
  try:
    fd = os.open(path, os.O_RDONLY)
  except FileNotFoundError:
    return None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
      return _read_fd(fd) or {}
    fcntl.flock(fd, fcntl.LOCK_UN)
    return None
  finally:
    os.close(fd)


# ----------------------------------------------------------------------------
# Object stores: a lock object with a heartbeat.
# ----------------------------------------------------------------------------

def _gfile():
  import tensorflow as tf
  return tf.io.gfile


def _read_object(path: str) -> Optional[dict[str, Any]]:
  gfile = _gfile()
  if not gfile.exists(path):
    return None
  with gfile.GFile(path, 'r') as f:
    return _read_json(f.read())


def _write_object(path: str, value: dict[str, Any]) -> None:
  with _gfile().GFile(path, 'w') as f:
    f.write(json.dumps(value))


def _alive(holder: Optional[dict[str, Any]], now: float) -> bool:
  return bool(holder) and now - float(holder.get('heartbeat', 0)) < STALE_SECONDS


@contextlib.contextmanager
def _hold_object(workdir: str, log: Callable[[str], None], command: Optional[str]
                 ) -> Iterator[dict[str, Any]]:
  path = f'{workdir.rstrip("/")}/{LOCK_OBJECT}'
  _gfile().makedirs(workdir)
  found = _read_object(path)
  if _alive(found, time.time()):
    raise _locked_error(workdir, found)
  if found:
    log(f'ssl_jax: taking over the lock object {path} from {_describe(found)}: its last '
        f'heartbeat is more than {STALE_SECONDS:.0f} s old.')
  mine = dict(record(command), heartbeat=time.time())
  _write_object(path, mine)
  stop = threading.Event()

  def beat():
    while not stop.wait(HEARTBEAT_SECONDS):
      try:
        _write_object(path, dict(mine, heartbeat=time.time()))
      except Exception:  # pylint: disable=broad-except
        pass   # a missed beat only makes the lock look older; the next one retries

  thread = threading.Thread(target=beat, name='ssl_jax-workdir-heartbeat', daemon=True)
  thread.start()
  try:
    yield mine
  finally:
    stop.set()
    thread.join(timeout=5)
    with contextlib.suppress(Exception):
      _gfile().remove(path)


# ----------------------------------------------------------------------------
# The interface.
# ----------------------------------------------------------------------------

_HELD: dict[str, dict[str, Any]] = {}   # workdirs this process holds -> record


@contextlib.contextmanager
def hold(workdir: str, *, log: Callable[[str], None] = print, command: Optional[str] = None,
         object_store: Optional[bool] = None) -> Iterator[dict[str, Any]]:
  """Holds the workdir's exclusive lock for the duration of the block.

  Raises WorkdirLockedError at once when a live process holds it. A lock left
  by a dead process is taken over with a line through `log`. Re-entrant within
  a process (the command line takes it before the imports, and
  train_and_evaluate again). object_store forces (True) or forbids (False)
  the lock-object fallback; by default paths with a scheme use it, and so
  does a file system that refuses flock.
  """
  workdir = str(workdir)
  key = workdir if is_object_store(workdir) else os.path.abspath(workdir)
  if key in _HELD:
    yield _HELD[key]
    return
  with _hold_new(workdir, log, command, object_store) as mine:
    _HELD[key] = mine
    try:
      yield mine
    finally:
      del _HELD[key]


@contextlib.contextmanager
def _hold_new(workdir: str, log: Callable[[str], None], command: Optional[str],
              object_store: Optional[bool]) -> Iterator[dict[str, Any]]:
  use_object = is_object_store(workdir) if object_store is None else object_store
  if not use_object:
    os.makedirs(workdir, exist_ok=True)
    try:
      with _hold_flock(workdir, log, command) as mine:
        yield mine
      return
    except OSError as error:
      if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        raise
      log(f'ssl_jax: {workdir} does not support file locks ({error.strerror}); using a '
          'lock object with a heartbeat instead (see ssl_jax/workdir_lock.py).')
  with _hold_object(workdir, log, command) as mine:
    yield mine


def holder(workdir: str) -> Optional[dict[str, Any]]:
  """The record of the live trainer holding workdir ({} if unreadable), else None."""
  workdir = str(workdir)
  if is_object_store(workdir):
    found = _read_object(f'{workdir.rstrip("/")}/{LOCK_OBJECT}')
    return found if _alive(found, time.time()) else None
  held = _probe_flock(workdir)
  if held is None and os.path.exists(os.path.join(workdir, LOCK_OBJECT)):
    found = _read_object(os.path.join(workdir, LOCK_OBJECT))   # the no-flock fallback
    return found if _alive(found, time.time()) else None
  return held


def refuse_if_training(workdir: str, what: str) -> None:
  """Raises WorkdirLockedError if a trainer holds workdir: readers never write into it."""
  found = holder(workdir)
  if found is not None:
    raise WorkdirLockedError(
        f'{what} would write into {workdir}, where {_describe(found)} is training. Write '
        'the output elsewhere, or wait until the run has finished.')
