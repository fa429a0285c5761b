"""The pre-training workdir before the first step: created and checked writable, locked against a
second training in it, and its config.json written (or compared with the resumed run's config).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time

from macrl_jax.errors import UserError


def refuse_a_file(workdir: str) -> None:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'--workdir {workdir} is a file, not a folder; pass another --workdir')


def prepare(workdir: str) -> None:
  """Creates the workdir and checks that checkpoints can be written, before any step is spent."""
  refuse_a_file(workdir)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  try:
    os.makedirs(ckpt_dir, exist_ok=True)
    for path in (workdir, ckpt_dir):
      tempfile.TemporaryFile(dir=path).close()
  except OSError as e:
    raise UserError(f'cannot write to {e.filename or workdir} ({e.strerror}); pass a --workdir '
                    f'you can write to, or fix its permissions') from None


class WorkdirLock:
  """`<workdir>/lock` holds the pid and host of the training that uses the workdir.

  A second training in the same workdir is refused; a lock left by a process that no longer runs
  on this host (killed) is taken over. The lock is written beside and then linked into place, so it
  never exists half-written; one that cannot be parsed (left by a crash or a full disk) is taken
  over once it is STALE_AFTER_S old. Taking the lock gives up after DEADLINE_S. Only process 0
  locks (the others follow it).
  """

  STALE_AFTER_S = 5.0
  DEADLINE_S = 30.0

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, 'lock')
    self.enabled = enabled
    self.mine = json.dumps({'pid': os.getpid(), 'host': socket.gethostname()})

  def __enter__(self):
    deadline = time.monotonic() + self.DEADLINE_S
    while self.enabled and not self._take():
      if time.monotonic() > deadline:
        raise UserError(f'{self.path} could not be taken in {self.DEADLINE_S:.0f} s (it keeps '
                        'changing or cannot be read); if no training uses '
                        f'{os.path.dirname(self.path)}, delete {self.path}')
      self._check_holder()
    return self

  def _take(self) -> bool:
    """Links a complete lock file into place; False when another lock is there."""
    tmp = f'{self.path}.{os.getpid()}.tmp'
    try:
      with open(tmp, 'w') as f:
        f.write(self.mine)
      os.link(tmp, self.path)
      return True
    except FileExistsError:
      return False
    except OSError as e:
      raise UserError(f'cannot write {self.path} ({e.strerror}); free disk space or fix the '
                      f'permissions of {os.path.dirname(self.path)}') from None
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)

  def _check_holder(self) -> None:
    """Raises if the lock's holder is alive (or elsewhere); removes a stale lock."""
    try:
      with open(self.path) as f:
        holder = json.load(f)
      pid, host = holder['pid'], holder['host']
    except FileNotFoundError:  # released meanwhile: take it
      return
    except (OSError, ValueError, KeyError, TypeError):
      self._remove_if_old_and_unreadable()
      return
    if host == socket.gethostname() and (pid == os.getpid() or not _alive(pid)):
      logging.warning('Removing the stale lock %s of process %s, which no longer runs.', self.path,
                      pid)
      _remove(self.path)
      return
    raise UserError(f'workdir {os.path.dirname(self.path)} in use by process {pid} on {host}; '
                    f'wait for it to end (or, if it is gone, delete {self.path})')

  def _remove_if_old_and_unreadable(self) -> None:
    """A lock without a readable owner comes from a crash (a complete one is linked into place):
    once it is STALE_AFTER_S old it is taken over; until then it is waited for."""
    try:
      age = time.time() - os.path.getmtime(self.path)
    except FileNotFoundError:
      return
    if age < self.STALE_AFTER_S:
      logging.info('Waiting for %s to be readable (%.0f s old).', self.path, age)
      time.sleep(0.2)
      return
    logging.warning('Removing the lock %s: it names no process (torn by a crash or a full disk).',
                    self.path)
    _remove(self.path)

  def __exit__(self, *exc):
    if self.enabled and os.path.exists(self.path):
      with open(self.path) as f:
        if f.read() == self.mine:
          os.remove(self.path)


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:  # another process took it over first
    pass


def _alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, TypeError, ValueError):
    return True  # another user's process, or an unreadable pid: do not take the lock over
  return True


def write_config(config, workdir: str, fresh: bool) -> None:
  """config.json records the run: written when a run starts from scratch (after every check has
  passed); a resumed run keeps it, with a warning naming the fields that differ."""
  path = os.path.join(workdir, 'config.json')
  new = json.loads(config.to_json_best_effort())
  old = None if fresh else _read_json(path)
  if old is None:
    _write_json_atomically(path, new)
  elif old != new:
    flat_old, flat_new = _flatten(old), _flatten(new)
    diff = sorted(k for k in set(flat_old) | set(flat_new) if flat_old.get(k) != flat_new.get(k))
    logging.warning('Resuming with a config that differs from %s in: %s', path, ', '.join(diff))


def _read_json(path: str) -> dict | None:
  """The file's JSON; None when it is missing or torn (then it is written again)."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except ValueError:
    logging.warning('%s cannot be parsed (torn by a crash?); writing it again.', path)
    return None


def _write_json_atomically(path: str, value: dict) -> None:
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _flatten(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out
