"""The training loop of pre-training (train.py) and fine-tuning (finetune.py).

Per step: dispatch the jitted step, keep its metrics on the device, and at most MAX_IN_FLIGHT
steps ahead of the device. At log, eval and checkpoint steps the host fetches the metrics; a step
that the guard refused (optim.guard_non_finite: `skipped` = 1) stops the run with
NonFiniteLossError before anything after it is evaluated or saved. SIGTERM and SIGINT (Ctrl-C), as
Orbax's preemption notice, save a checkpoint at the current step and end the loop; rerunning the
same command resumes from it.
"""

from __future__ import annotations

import collections
import logging
import math
import signal
import time
from typing import Any, Callable, Iterator, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from clu import metric_writers

from macrl_jax.errors import raise_if_interrupted, UserError

# Dispatched steps that may be outstanding. A deep queue of dispatched steps can stall the first
# cross-device reduction with many host devices (seen with 8 CPU devices), and buys nothing: the
# input pipeline is prefetched separately.
MAX_IN_FLIGHT = 2


class NonFiniteLossError(UserError, FloatingPointError):
  """A step produced a non-finite loss, gradient or update (the step did not apply it)."""


class Preemption:
  """Turns SIGTERM and SIGINT (Ctrl-C) into a flag that the loop checks between steps (save, then
  exit 0)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    raise_if_interrupted()  # a Ctrl-C during start-up that a library swallowed
    try:
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    except ValueError:  # not in the main thread (e.g. some test runners): no handler
      self._previous = {}
    return self

  def _handle(self, signum, frame):
    logging.warning('%s: saving a checkpoint at the current step, then exiting.',
                    signal.Signals(signum).name)
    self.requested = True

  def __exit__(self, *exc):
    for s, previous in self._previous.items():
      signal.signal(s, previous)


class Every(NamedTuple):
  """Periods in steps; the last step does all three. `eval` None: no evaluation."""
  log: int
  checkpoint: int
  eval: int | None = None


class _History:
  """The metrics of the steps since the last log, fetched from the device only when read."""

  def __init__(self, start_step: int, batch_size: int):
    self.rows: list[tuple[int, Any]] = []
    self.batch_size = batch_size
    self.last_time, self.last_step = time.time(), start_step

  def add(self, step: int, metrics: dict) -> None:
    self.rows.append((step, metrics))

  def restart_clock(self) -> None:
    """images/s counts training time only: the clock restarts after an evaluation."""
    self.last_time = time.time()

  def check(self, mngr: ocp.CheckpointManager, hint: str) -> None:
    """Fetches the metrics; raises at the first step that was refused."""
    self.rows = [(s, {k: float(v) for k, v in m.items()}) for s, m in jax.device_get(self.rows)]
    for step, metrics in self.rows:
      if metrics.get('skipped', 0.0) or not all(math.isfinite(v) for v in metrics.values()):
        raise NonFiniteLossError(_non_finite_message(step, metrics, mngr, hint))

  def means(self, step: int, mngr: ocp.CheckpointManager, hint: str) -> dict:
    """The mean metrics since the last call and the images/s of those steps; then starts over."""
    self.check(mngr, hint)
    if not self.rows:
      return {}
    now = time.time()
    record = {k: float(np.mean([m[k] for _, m in self.rows])) for k in self.rows[-1][1]}
    # The schedules are values at the last step, not averages.
    for k in ('lr', 'momentum'):
      if k in record:
        record[k] = float(self.rows[-1][1][k])
    record.pop('skipped', None)
    record['images_per_sec'] = ((step - self.last_step) * self.batch_size /
                                max(now - self.last_time, 1e-9))
    self.rows, self.last_time, self.last_step = [], now, step
    return record


def _non_finite_message(step: int, metrics: dict, mngr, hint: str) -> str:
  bad = [k for k, v in sorted(metrics.items()) if not math.isfinite(v)]
  what = ', '.join(bad) if bad else 'the parameter update'
  terms = ', '.join(f'{k}={v:.4g}' for k, v in sorted(metrics.items()) if k != 'skipped')
  steps = mngr.all_steps()
  back = (f'the last good checkpoint is step {max(steps)} in {mngr.directory}; rerunning resumes '
          f'from it' if steps else 'there is no checkpoint to go back to')
  return (f'non-finite {what} at step {step} (the step was not applied; {terms}). {hint} '
          f'Nothing was saved after it: {back}.')


def run(step_fn: Callable, state: Any, batches: Iterator, *, start_step: int, total_steps: int,
        every: Every, batch_size: int, mngr: ocp.CheckpointManager,
        save: Callable[[int, Any], None], writer: metric_writers.MetricWriter, hint: str,
        evaluate: Callable[[int, Any], dict] | None = None,
        on_step: Callable[[int], None] | None = None) -> tuple[Any, int, dict]:
  """Runs steps start_step + 1 ... total_steps (fewer when preempted); returns (state, the last
  step, its logged record).

  `save(step, state)` starts a checkpoint; `evaluate(step, state)` returns metrics to log with the
  step's; `hint` is what the non-finite error suggests; `on_step(step)` runs after every step.
  """
  history = _History(start_step, batch_size)
  in_flight = collections.deque()
  step, last_record = start_step, {}
  with Preemption() as preemption:
    while step < total_steps:
      state, metrics = step_fn(state, next(batches))
      step += 1
      history.add(step, metrics)
      in_flight.append(metrics)
      if len(in_flight) > MAX_IN_FLIGHT:
        jax.block_until_ready(in_flight.popleft())
      if on_step:
        on_step(step)

      record = {}
      last = step == total_steps
      stop = preemption.requested or mngr.reached_preemption(step)
      if step % every.log == 0 or last:
        record.update(history.means(step, mngr, hint))
      saving = step % every.checkpoint == 0 or last or stop
      evaluating = evaluate and (step % every.eval == 0 or last)
      if saving or evaluating:
        history.check(mngr, hint)  # never save or evaluate a state after a refused step
      if saving:  # before evaluating, so that a failed evaluation costs no training
        save(step, state)
      if evaluating:
        try:
          record.update(evaluate(step, state))
        except Exception:
          _keep_the_step(step, state, record, None if saving else save, writer, mngr)
          raise
        history.restart_clock()
      if record:
        writer.write_scalars(step, record)
        last_record = {'step': step, **record}
      if stop:
        logging.warning('Stopped by preemption at step %d; rerun the same command to resume.', step)
        break
  return state, step, last_record


def _keep_the_step(step: int, state: Any, record: dict, save: Callable | None,
                   writer: metric_writers.MetricWriter, mngr: ocp.CheckpointManager) -> None:
  """After a failed evaluation: logs the step's metrics and saves it (`save` None: already
  started), so that rerunning resumes from this step with nothing lost."""
  if record:
    writer.write_scalars(step, record)
  if save:
    save(step, state)
  mngr.wait_until_finished()
  logging.warning('The evaluation at step %d failed; step %d is saved in %s.', step, step,
                  mngr.directory)
