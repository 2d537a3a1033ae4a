"""What every command line of ssl_jax shares: quiet start-up, one-line flag errors.

- `start(module)`: TensorFlow's C++ start-up lines ("oneDNN custom
  operations are on", "All log messages before absl::InitializeLog()") stay
  off the console unless --verbosity/-v asks for logs; each command calls it
  first thing in its `__main__`.
- `parse_flags`: absl's flag parser for `app.run(main, flags_parser=...)`,
  which turns a mistyped flag or config override into one line naming the key
  and the closest valid keys (ml_collections' own error is a bare
  AttributeError after a 15-line traceback), and exits with status 2.
- `parse_command`: the same parse into fresh FlagValues, so that tests (and
  the test of the documented commands) can parse many command lines in one
  process.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import os
import sys
from typing import Any, Callable, NoReturn, Optional, Sequence

from absl import flags


class CommandLineError(ValueError):
  """A command line that cannot run as written; the message names the fix."""


def verbosity_asked(argv: Sequence[str]) -> bool:
  return any(a.startswith(('--verbosity', '-v=', '--v=')) or a in ('-v', '--v') for a in argv)


def start(module: str, *, tcmalloc: bool = False, tensorflow: bool = True) -> None:
  """First thing in a command's `__main__`: tcmalloc where asked, then a quiet TensorFlow.

  TensorFlow 2.21 writes "oneDNN custom operations are on" (twice) and "All log
  messages before absl::InitializeLog()" to stderr from C++ while it is
  imported, whatever TF_CPP_MIN_LOG_LEVEL says, so the command imports it
  once with stderr pointed at /dev/null (a failed import still raises, and
  its traceback is printed as usual). --verbosity/-v keeps everything.
  TF_CPP_MIN_LOG_LEVEL=2 still quiets TensorFlow's later INFO and WARNING lines
  in this process and the ones it starts. tcmalloc=True re-executes under
  tcmalloc first where it is installed (ssl_jax/allocator.py).
  """
  if tcmalloc:
    from ssl_jax import allocator
    allocator.reexec_with_tcmalloc(module)   # returns only when it does not re-execute
  if verbosity_asked(sys.argv):
    return
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if tensorflow and 'tensorflow' not in sys.modules:
    with stderr_to_devnull():
      import tensorflow  # pylint: disable=import-outside-toplevel
    # TFDS's reader calls deprecated tf.data functions; their Python warnings
    # ("CounterV2 ... is deprecated", twice: TF's logger and absl's) say nothing
    # a user can act on. Errors still print.
    tensorflow.get_logger().setLevel('ERROR')


@contextlib.contextmanager
def stderr_to_devnull():
  """Points file descriptor 2 at /dev/null for the block (C++ libraries write there)."""
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def _config_argument(argv: Sequence[str], name: str) -> Optional[str]:
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def load_config(argument: str):
  """configs/x.py[:arg] -> the ConfigDict its get_config returns (as config_flags loads it)."""
  path, _, arg = argument.partition(':')
  if not os.path.exists(path):
    raise CommandLineError(f'config file {path!r} does not exist (relative to '
                           f'{os.getcwd()}); pass e.g. --config=configs/vicreg_it.py')
  spec = importlib.util.spec_from_file_location('_ssl_jax_cli_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def config_paths(config, prefix: str = '') -> list[str]:
  """Every dotted key of a ConfigDict, inner nodes and leaves."""
  out = []
  for key in config.keys():
    path = f'{prefix}{key}'
    out.append(path)
    value = config[key]
    if hasattr(value, 'keys'):
      out.extend(config_paths(value, path + '.'))
  return out


def unknown_override(argv: Sequence[str], name: str = 'config') -> Optional[str]:
  """A one-line message for the first --NAME.KEY=... whose KEY the config lacks, else None."""
  argument = _config_argument(argv, name)
  if argument is None:
    return None
  config = load_config(argument)
  known = config_paths(config)
  for arg in argv:
    if not arg.startswith(f'--{name}.'):
      continue
    key = arg[len(name) + 3:].split('=', 1)[0]
    if key in known:
      continue
    hint = ', '.join(closest_keys(key, known))
    hint = f'; closest valid keys: {hint}' if hint else ''
    return f'unknown config key {key!r} in {arg} ({argument} has no such field){hint}.'
  return None


def closest_keys(key: str, known: Sequence[str]) -> list[str]:
  """Valid keys a mistyped `key` most likely meant: its siblings first, then any key."""
  parent, _, leaf = key.rpartition('.')
  if parent in known:
    siblings = [k[len(parent) + 1:] for k in known
                if k.startswith(parent + '.') and '.' not in k[len(parent) + 1:]]
    close = difflib.get_close_matches(leaf, siblings, n=3, cutoff=0.3) or siblings[:8]
    return [f'{parent}.{k}' for k in close]
  return difflib.get_close_matches(key, known, n=3, cutoff=0.5)


def one_line(error: BaseException, argv: Sequence[str], name: str = 'config') -> str:
  """The one-line explanation of a failed parse of argv."""
  try:
    unknown = unknown_override(argv, name)
  except CommandLineError as problem:
    return str(problem)
  except Exception as problem:  # pylint: disable=broad-except
    return f'the config file could not be loaded: {_last_line(problem)}'
  if unknown:
    return unknown
  return _last_line(error)


def _last_line(error: BaseException) -> str:
  """The message of an error, without the traceback config_flags embeds in it."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  if len(lines) > 1 and any(line.startswith('Traceback') for line in lines):
    return f'{lines[0].split(":")[0]}: {lines[-1]}'
  return ' '.join(lines)[:500]


def exit_with_error(program: str, message: Any, status: int = 1) -> NoReturn:
  """Ends the command: one line `PROGRAM: error: MESSAGE` on stderr, exit `status`.

  Every command-line entry point reports a bad input this way (a bad flag
  exits 2, like absl; a missing dataset or a held workdir 1), never a traceback.
  """
  print(error_line(program, message), file=sys.stderr, flush=True)
  sys.exit(status)


def error_line(program: str, message: Any) -> str:
  """The line `exit_with_error` prints (the experiment runner reads it in a cell's log)."""
  return f'{program}: error: {message}'


@contextlib.contextmanager
def one_line_errors(program: str, errors: tuple[type[BaseException], ...], status: int = 1,
                    hint: str = ''):
  """Ends the command by `exit_with_error` on any of `errors`: bad input whose
  message names the problem and the fix. Anything else keeps its traceback.

  status: the exit status (2 for a bad flag, as absl's). hint: appended to the
  message in parentheses, e.g. the command that checks the input without running.
  """
  try:
    yield
  except errors as error:
    exit_with_error(program, f'{error} ({hint})' if hint else error, status)


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS
                ) -> list[str]:
  """absl parser for app.run: a bad flag is one line on stderr and exit status 2."""
  try:
    return flag_values(list(argv))
  except Exception as error:  # pylint: disable=broad-except
    spec = getattr(sys.modules.get('__main__'), '__spec__', None)
    exit_with_error(spec.name if spec is not None else 'ssl_jax', one_line(error, argv), 2)


def parse_command(define_flags: Callable[[flags.FlagValues], Any], argv: Sequence[str]) -> Any:
  """Parses argv into fresh FlagValues defined by define_flags; returns its holders.

  config_flags reads its overrides from sys.argv, so sys.argv is argv while
  parsing. A bad command line raises CommandLineError with the one-line message.
  """
  flag_values = flags.FlagValues()
  holders = define_flags(flag_values)
  saved = sys.argv
  sys.argv = list(argv)
  try:
    rest = flag_values(list(argv))
  except Exception as error:  # pylint: disable=broad-except
    raise CommandLineError(one_line(error, argv)) from error
  finally:
    sys.argv = saved
  if len(rest) > 1:
    raise CommandLineError(f'unexpected arguments {rest[1:]}')
  return holders


# ----------------------------------------------------------------------------
# Child processes that must not outlive their parent (experiment cells).
# ----------------------------------------------------------------------------

PARENT_PID_ENV = 'SSL_JAX_PARENT_PID'
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> Callable[[], None]:
  """A Popen preexec_fn: the child gets SIGKILL when its parent dies (Linux).

  SIGKILL rather than SIGTERM: a cell still compiling or evaluating would
  finish that first, and a restarted runner would find its workdir locked.
  A cell killed this way loses only the steps since its last checkpoint.
  """
  def preexec() -> None:
    import ctypes
    import signal
    try:
      libc = ctypes.CDLL(None, use_errno=True)
      libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
      pass   # not Linux: watch_parent() in the child covers it
    if os.getppid() != parent_pid:   # the parent died before prctl took effect
      os._exit(1)

  return preexec


def watch_parent(poll_seconds: float = 1.0) -> Optional[Any]:
  """In a child started with PARENT_PID_ENV set: exit at once when that parent is gone.

  The portable half of die_with_parent (which needs Linux's prctl): a
  daemon thread compares os.getppid() with the recorded parent.
  """
  import threading
  parent = os.environ.get(PARENT_PID_ENV)
  if not parent:
    return None
  parent_pid = int(parent)

  def watch():
    import time
    while True:
      if os.getppid() != parent_pid:
        print(f'ssl_jax: parent process {parent_pid} is gone; exiting (resume from the last '
              'checkpoint by running the grid again).', file=sys.stderr, flush=True)
        os._exit(137)
      time.sleep(poll_seconds)

  thread = threading.Thread(target=watch, name='ssl_jax-parent-watch', daemon=True)
  thread.start()
  return thread
