"""Orbax checkpoints of the full train state in `<workdir>/checkpoints/<step>/`.

Each checkpoint holds two items: `state` (the train-state pytree of methods/train_step.py, saved collectively
by all processes) and `meta` (JSON: the step, the data position and the shape of every array, so
that a checkpoint of another model is told apart from an unreadable one without reading arrays).
The data position is the step itself: the input pipeline is a pure function of (config, step,
process), so resuming at step s needs nothing more.

Restoring goes from the newest step down, skipping a checkpoint that cannot be read, e.g. one
half-written when a machine died during a save. Training moves it aside (never deletes it) so that
its step can be saved again; the evaluation tools only skip it, they never change a workdir.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from macrl_jax.errors import MissingFileError, UserError


class CheckpointMismatchError(UserError):
  """The workdir's checkpoint holds another model than the config builds."""


class UnreadableCheckpointError(UserError):
  """The checkpoint of an explicitly requested step cannot be read."""


class CheckpointSaveError(UserError):
  """A checkpoint could not be written (full disk, permissions, ...)."""


def manager(workdir: str, keep: int = 3, async_save: bool = True,
            create: bool = True) -> ocp.CheckpointManager:
  """The manager of `<workdir>/checkpoints`; `create=False` for a reader that must not change the
  workdir (the folder must then exist)."""
  _write_each_array_once_on_cpu()
  # The step directory is made before save() returns: when it cannot be made (permissions, full
  # disk), save() raises at once, where an asynchronous creation leaves Orbax's writer threads
  # waiting minutes for it.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=create, enable_async_checkpointing=async_save,
      async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if create and jax.process_index() == 0:
    _remove_unfinished_saves(directory)
  # Registering both items lets either be restored alone (meta is read before any array).
  handlers = {'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def _remove_unfinished_saves(directory: str) -> None:
  """Removes the temporary folders of saves that died (a full disk leaves them full), before the
  writer's first save. Done here, at once, rather than by Orbax's `cleanup_tmp_directories`, which
  runs in the background and can remove the folder of a save that a short run has already begun."""
  if os.path.isdir(directory):
    for name in os.listdir(directory):
      if '.orbax-checkpoint-tmp' in name:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


@functools.cache
def _write_each_array_once_on_cpu() -> None:
  """On CPU devices, each replicated array is written from one device, not sliced over all.

  Orbax splits the writing of a replicated array across its replicas (faster when each device has
  its own link to the host). Host CPU devices share one memory, so the split only adds a compiled
  slice per array and device (seconds on the first save of a run with several CPU devices). Orbax
  makes the same choice for GPUs. StandardCheckpointHandler takes no handler registry of its own,
  so this sets Orbax's global one, once per process.
  """
  if jax.devices()[0].platform == 'cpu':
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


def steps(workdir: str) -> list[int]:
  """The saved steps of `workdir`, oldest first; none when it has no checkpoints folder."""
  if not os.path.isdir(os.path.join(os.path.abspath(workdir), 'checkpoints')):
    return []
  mngr = manager(workdir, async_save=False, create=False)
  try:
    return sorted(mngr.all_steps())
  finally:
    mngr.close()


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Starts saving `step` in the background; raises CheckpointSaveError if this save or the one
  before failed, so that the run stops at once instead of training on without checkpoints."""
  meta = dict(meta, step=step, shapes=_shapes(state))
  try:
    mngr.check_for_errors()
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave(meta)), force=True)
  except Exception as e:  # noqa: BLE001 - any failure to write is reported the same way
    raise _save_error(mngr, e) from e


def finish(mngr: ocp.CheckpointManager) -> None:
  """Waits for the last save and closes `mngr`; raises CheckpointSaveError if a save failed."""
  try:
    mngr.wait_until_finished()
    mngr.check_for_errors()
  except Exception as e:  # noqa: BLE001
    raise _save_error(mngr, e) from e
  mngr.close()


# The operating system's reasons a save fails, which the one-line message must keep whatever
# wraps them (Orbax and TensorStore put them deep in long, multi-line messages).
_OS_REASONS = tuple(os.strerror(e) for e in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS))


def _save_error(mngr, error: Exception) -> CheckpointSaveError:
  reason = f'{type(error).__name__}: {str(error).splitlines()[0][:300]}' if str(error) else \
      type(error).__name__
  text = ' '.join(str(e) for e in _causes(error))
  reason += ''.join(f'; {r}' for r in _OS_REASONS if r in text and r not in reason)
  return CheckpointSaveError(f'saving a checkpoint to {mngr.directory} failed ({reason}); the run '
                             f'stopped. Free disk space or fix the permissions, then rerun to '
                             f'resume from the last checkpoint ({mngr.all_steps() or "none"}).')


def is_reported_save_failure(record: logging.LogRecord) -> bool:
  """Whether a log record is Orbax's (or its asyncio tasks') report of a write that failed for an
  operating-system reason: CheckpointSaveError reports the same failure in one line."""
  noisy = '/orbax/' in record.pathname or record.name == 'asyncio'
  text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else '')
  return noisy and record.levelno >= logging.ERROR and any(r in text for r in _OS_REASONS)


def _causes(error: BaseException) -> list[BaseException]:
  """`error` and the exceptions it was raised from, outermost first."""
  chain = []
  while error is not None and error not in chain:
    chain.append(error)
    error = error.__cause__ or error.__context__
  return chain


def _shapes(tree) -> dict[str, list[int]]:
  return {jax.tree_util.keystr(path): list(np.shape(x))
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'])


def check_compatible(meta: dict, where: str, abstract_state: Any, partial: bool = False) -> None:
  """Raises CheckpointMismatchError naming the first differing array and both of its shapes.

  With `partial`, `abstract_state` is a part of the saved state: other saved arrays are ignored.
  """
  saved = {k: tuple(v) for k, v in meta['shapes'].items()}
  wanted = {k: tuple(v) for k, v in _shapes(abstract_state).items()}
  for key in sorted(set(wanted) if partial else set(saved) | set(wanted)):
    if saved.get(key) != wanted.get(key):
      have = saved.get(key, 'absent')
      want = wanted.get(key, 'absent')
      raise CheckpointMismatchError(
          f'The checkpoint {where} holds another model: {key} has shape {have} there, but the config '
          f'builds {want}. Resume with the config the workdir was made with (its config.json), or '
          f'pass a new --workdir. Nothing was overwritten.')


def _move_aside(mngr: ocp.CheckpointManager, step: int, error: Exception) -> None:
  src = os.path.join(str(mngr.directory), str(step))
  dst = os.path.join(os.path.dirname(str(mngr.directory)), 'checkpoints_unreadable',
                     f'{step}-{int(time.time())}')
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.move(src, dst)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'checkpoint_moved_aside_{step}')
  logging.warning('Checkpoint step %d cannot be read (%s: %s); it was probably half-written when '
                  'the run died. Moved it to %s and trying the one before.', step,
                  type(error).__name__, str(error).splitlines()[0][:200], dst)
  mngr.reload()


def _unreadable(mngr, step: int, error: Exception) -> UnreadableCheckpointError:
  return UnreadableCheckpointError(
      f'checkpoint step {step} is unreadable ({type(error).__name__}: '
      f'{str(error).splitlines()[0][:200] if str(error) else ""}); it was probably half-written '
      f'when a run died. Pick another --step (available: {sorted(mngr.all_steps())})')


def _skip(mngr, step: int, error: Exception) -> None:
  logging.warning('Checkpoint step %d cannot be read (%s: %s); trying the one before.', step,
                  type(error).__name__, str(error).splitlines()[0][:200] if str(error) else '')


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any, step: int | None = None,
                   move_aside: bool = False, partial: bool = False) -> tuple[Any, dict] | None:
  """The newest readable checkpoint (or `step`) as (state, meta); None when there is none.

  `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings: the arrays are restored
  straight into that layout (sharded across processes with fsdp). An unreadable checkpoint is
  skipped, and with `move_aside` (training only) moved to checkpoints_unreadable/; one asked for by
  `step` raises UnreadableCheckpointError.
  With `partial`, `abstract_state` is a part of the saved state and only its arrays are read.
  """
  skip = _move_aside if move_aside else _skip
  steps = sorted(mngr.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise MissingFileError(f'No checkpoint at step {step} in {mngr.directory}; '
                              f'available steps: {sorted(steps) or "none"}')
    steps = [step]
  for s in steps:
    try:
      meta = read_meta(mngr, s)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped, not fatal
      if step is not None:
        raise _unreadable(mngr, s, e) from None
      skip(mngr, s, e)
      continue
    check_compatible(meta, os.path.join(str(mngr.directory), str(s)), abstract_state, partial)
    try:
      restored = _restore_state(mngr, s, abstract_state, partial)
    except Exception as e:  # noqa: BLE001
      if step is not None:
        raise _unreadable(mngr, s, e) from None
      skip(mngr, s, e)
      continue
    return restored, meta
  return None


def _restore_state(mngr, step: int, abstract_state: Any, partial: bool) -> Any:
  if not partial:
    return mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))['state']
  # Only the arrays of abstract_state, e.g. a MimCo teacher's encoder out of a whole train state.
  path = os.path.join(str(mngr.directory), str(step), 'state')
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        abstract_state, restore_args=restore_args, partial_restore=True))
