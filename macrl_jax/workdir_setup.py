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
  on this host (killed) is taken over. Only process 0 locks (the others follow it).
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, 'lock')
    self.enabled = enabled
    self.mine = json.dumps({'pid': os.getpid(), 'host': socket.gethostname()})

  def __enter__(self):
    while self.enabled:
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        self._check_holder()
        continue
      with os.fdopen(fd, 'w') as f:
        f.write(self.mine)
      break
    return self

  def _check_holder(self) -> None:
    """Raises if the lock's holder is alive (or elsewhere); removes a stale lock."""
    try:
      with open(self.path) as f:
        holder = json.load(f)
    except (OSError, ValueError):  # being written right now, or gone: look again
      time.sleep(0.1)
      return
    pid, host = holder.get('pid'), holder.get('host')
    if host == socket.gethostname() and (pid == os.getpid() or not _alive(pid)):
      logging.warning('Removing the stale lock %s of process %s, which no longer runs.', self.path,
                      pid)
      os.remove(self.path)
      return
    raise UserError(f'workdir {os.path.dirname(self.path)} in use by process {pid} on {host}; '
                    f'wait for it to end (or, if it is gone, delete {self.path})')

  def __exit__(self, *exc):
    if self.enabled and os.path.exists(self.path):
      with open(self.path) as f:
        if f.read() == self.mine:
          os.remove(self.path)


def _alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, TypeError, ValueError):
    return True  # another user's process, or an unreadable pid: do not take the lock over
  return True


def write_config(config, workdir: str) -> None:
  """config.json is written once; a resumed run with other values warns and leaves it as it is."""
  path = os.path.join(workdir, 'config.json')
  new = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != new:
      flat_old, flat_new = _flatten(old), _flatten(new)
      diff = sorted(k for k in set(flat_old) | set(flat_new) if flat_old.get(k) != flat_new.get(k))
      logging.warning('Resuming with a config that differs from %s in: %s', path, ', '.join(diff))
    return
  with open(path, 'w') as f:
    json.dump(new, f, indent=2, sort_keys=True)


def _flatten(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out
