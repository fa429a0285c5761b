"""User mistakes end in one line, not a traceback.

`UserError` is raised for anything the user can fix (a bad config value, missing data, a bad path,
a workdir in use). `run(main)` is the one place that turns it into `error: <message>` on stderr
and exit status 2; any other exception is an internal error and keeps its traceback.

The config flag of ml_collections loads the config file and applies `--config.FIELD=VALUE` while
flags are defined and parsed, and reports a mistake there as several chained tracebacks;
`check_config_args` checks the same arguments first, so that they fail with one line too.
"""

from __future__ import annotations

import difflib
import errno
import importlib.util
import os
import signal
import sys
import threading

from absl import app, flags

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


class UserError(ValueError):
  """A mistake the user can fix; the message says what was wrong and what to do."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or folder the user named (or must provide) is not there."""


def fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


_INTERRUPTED = threading.Event()


def _interrupt(signum, frame) -> None:
  """Ctrl-C before training installs its own handler (loop.Preemption). Remembered as well as
  raised: where it lands in a callback (jax's gc callback), nothing can raise it."""
  _INTERRUPTED.set()
  raise KeyboardInterrupt


def _remember_unraisable_interrupts() -> None:
  """A Ctrl-C that lands in a callback Python cannot raise from (jax's gc callback) is reported as
  unraisable, with a traceback; it is only remembered (raise_if_interrupted)."""
  hook = sys.unraisablehook
  sys.unraisablehook = lambda u: None if u.exc_type is KeyboardInterrupt else hook(u)


def raise_if_interrupted() -> None:
  """Raises KeyboardInterrupt if a Ctrl-C was swallowed during start-up (before the first step)."""
  if _INTERRUPTED.is_set():
    raise KeyboardInterrupt


def _is_closed_loop_callback(exc_type, exc) -> bool:
  """Orbax's read threads post their results to its asyncio loop; when a read fails (a half-written
  checkpoint), the loop is closed first and each late thread reports this RuntimeError."""
  return exc_type is RuntimeError and str(exc) == 'Event loop is closed'


def _quiet_closed_loop_callbacks() -> None:
  """Lets the one-line message of a failed read stand alone: the late threads' report of a closed
  event loop is dropped, every other uncaught exception reported as usual."""
  excepthook, unraisablehook, thread_hook = sys.excepthook, sys.unraisablehook, threading.excepthook
  sys.excepthook = lambda t, e, tb: None if _is_closed_loop_callback(t, e) else excepthook(t, e, tb)
  sys.unraisablehook = lambda u: (None if _is_closed_loop_callback(u.exc_type, u.exc_value)
                                  else unraisablehook(u))
  threading.excepthook = lambda a: (None if _is_closed_loop_callback(a.exc_type, a.exc_value)
                                    else thread_hook(a))


def run(main) -> None:
  """absl's app.run(main) with user errors (including flag values) printed as one line."""

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      fail(str(e).splitlines()[0])

  def wrapped(argv):
    try:
      return main(argv)
    except UserError as e:
      fail(str(e))
    except KeyboardInterrupt:  # before training's own handler is installed, or after it
      print('error: interrupted (Ctrl-C); rerun the same command (a training resumes from its last '
            'checkpoint)', file=sys.stderr, flush=True)
      sys.exit(EXIT_INTERRUPTED)
    except OSError as e:
      if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        raise
      fail(f'{e.strerror} writing {e.filename or "a file"}; free disk space, then rerun the same '
           'command (a training resumes from its last checkpoint)')

  _quiet_closed_loop_callbacks()
  signal.signal(signal.SIGINT, _interrupt)
  _remember_unraisable_interrupts()
  app.run(wrapped, flags_parser=parse)


# ----------------------------------------------------------------------------------- config flags
def _flag_value(argv: list[str], name: str) -> str | None:
  """The value of --name=V or --name V in argv (the last one wins, as absl's parser does)."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      value = arg.split('=', 1)[1]
    elif arg == f'--{name}' and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _load_config_file(spec: str):
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
    known = sorted(f'configs/{n}' for n in os.listdir(configs) if n.endswith('.py'))
    raise UserError(f'config file {path} not found; the configs are: {", ".join(known)}')
  module_spec = importlib.util.spec_from_file_location('_checked_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def bad_field(path: str, message: str) -> UserError:
  """A config field with a value that cannot work: 'config.PATH: message'."""
  return UserError(f'config.{path}: {message}')


def unknown_field(path: str, known) -> UserError:
  parent, _, leaf = path.rpartition('.')
  close = difflib.get_close_matches(leaf, list(known), n=1)
  hint = f'; did you mean config.{parent + "." if parent else ""}{close[0]}?' if close else ''
  return UserError(f'unknown field config.{path}{hint}')


def file_config(argv: list[str], default: str, name: str = 'config'):
  """The config as its file (and the file's arguments) makes it, before any `--config.FIELD`."""
  return _load_config_file(_flag_value(argv, name) or default)


def overridden_fields(argv: list[str], name: str = 'config') -> list[str]:
  """The fields set on the command line: FIELD of each `--config.FIELD=VALUE`."""
  prefix = f'--{name}.'
  return [arg[len(prefix):].split('=', 1)[0] for arg in argv if arg.startswith(prefix)]


def check_config_args(argv: list[str], default: str, name: str = 'config') -> None:
  """Raises UserError for a missing config file or a `--config.FIELD` the config does not have."""
  config = file_config(argv, default, name)
  for path in overridden_fields(argv, name):
    node = config
    for i, part in enumerate(path.split('.')):
      if not hasattr(node, 'keys') or part not in node:
        raise unknown_field('.'.join(path.split('.')[:i + 1]),
                            node.keys() if hasattr(node, 'keys') else [])
      node = node[part]
