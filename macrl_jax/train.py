"""Pre-training: `train_and_evaluate(config, workdir)`.

Plain sections, in order: mesh → workdir → data → model, optimizer, sharding and step → checkpoint
→ writers → evals → loop. Only process 0 writes files other than checkpoints (which all processes
save collectively).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import socket
import tempfile
import time
from typing import Any

import jax
import numpy as np
from clu import metric_writers, periodic_actions

from macrl_jax import checkpoint, config_checks, knn, mimco, presets, reconstruction, sharding, train_step
from macrl_jax.errors import UserError

NAN_HINT = ('Lower the learning rate (--config.optim.base_lr), add gradient clipping '
            '(--config.optim.grad_clip=1.0) or use float32 (--config.dtype=float32).')


class NonFiniteLossError(UserError, FloatingPointError):
  """A step produced a non-finite loss, gradient or update (the step did not apply it)."""


class _Preemption:
  """Turns SIGTERM and SIGINT (Ctrl-C) into a flag that the loop checks between steps (save, then
  exit 0)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
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


def _prepare_workdir(workdir: str) -> None:
  """Creates the workdir and checks that checkpoints can be written, before any step is spent."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'--workdir {workdir} is a file, not a folder; pass another --workdir')
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


def _write_config(config, workdir: str) -> None:
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


class MetricsLog:
  """metrics.jsonl: one JSON object per logged step (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.enabled = enabled

  def write(self, record: dict) -> None:
    if self.enabled:
      with open(self.path, 'a') as f:
        f.write(json.dumps(record, sort_keys=True) + '\n')

  def truncate_after(self, step: int) -> None:
    """Drops the rows logged after `step` (by a run that died before its next checkpoint), so that
    the resumed run logs each step once."""
    if not (self.enabled and os.path.exists(self.path)):
      return
    with open(self.path) as f:
      rows = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
    with open(self.path, 'w') as f:
      f.writelines(rows)


def _first_skipped(history: list[tuple[int, dict]]) -> tuple[int, dict] | None:
  """The first step whose update the step refused (train_step.guard_non_finite)."""
  for step, metrics in history:
    if metrics.get('skipped', 0.0) or not all(math.isfinite(v) for v in metrics.values()):
      return step, metrics
  return None


def _non_finite_message(step: int, metrics: dict, mngr) -> str:
  bad = [k for k, v in sorted(metrics.items()) if not math.isfinite(v)]
  what = ', '.join(bad) if bad else 'the parameter update'
  terms = ', '.join(f'{k}={v:.4g}' for k, v in sorted(metrics.items()) if k != 'skipped')
  steps = mngr.all_steps()
  back = (f'the last good checkpoint is step {max(steps)} in {mngr.directory}; rerunning resumes '
          f'from it' if steps else 'there is no checkpoint to go back to')
  return (f'non-finite {what} at step {step} (the step was not applied; {terms}). {NAN_HINT} '
          f'Nothing was saved after it: {back}.')


def _explain_out_of_memory(error: Exception, config) -> UserError | None:
  """A RESOURCE_EXHAUSTED from XLA as a message with the sizes and the fixes (None if not one)."""
  text = str(error)
  if 'RESOURCE_EXHAUSTED' not in text:
    return None
  asked = re.search(r'allocat\w* (\d+) bytes', text)
  asked = f'{int(asked.group(1)) / 2**30:.1f} GiB' if asked else 'more memory than there is'
  stats = jax.local_devices()[0].memory_stats() or {}
  have = (f'{stats["bytes_limit"] / 2**30:.1f} GiB per device' if 'bytes_limit' in stats
          else 'less')
  return UserError(
      f'out of memory: the step needs {asked}, the device has {have} '
      f'({jax.device_count()} {jax.devices()[0].platform} device(s), global batch '
      f'{config.batch_size}). Lower --config.batch_size, set --config.model.remat=True (recomputes '
      f'activations in the backward pass), use bfloat16 (--config.dtype=bfloat16) or run on more '
      f'devices.')


def _mean_metrics(history: list[tuple[int, dict]]) -> dict:
  keys = history[-1][1].keys()
  out = {k: float(np.mean([m[k] for _, m in history])) for k in keys}
  # The schedules are values at the last step, not averages.
  for k in ('lr', 'momentum'):
    if k in out:
      out[k] = float(history[-1][1][k])
  return out


def make_knn_eval(config, trainer: train_step.Trainer, mesh, input_pipeline):
  """kNN monitor: online encoder features, train split as memory, whole test split."""
  feature_fn = knn.make_feature_fn(trainer.modules.encoder, config.model.pool, mesh)
  batch_size = config.knn.eval_batch_size // jax.process_count()

  def evaluate(params) -> float:
    def features(split):
      batches = input_pipeline.create_eval_iterator(config, split, batch_size=batch_size)
      return knn.extract(feature_fn, params['encoder'], batches, mesh)

    train_f, train_y = features(config.train_split)
    test_f, test_y = features(config.test_split)
    return knn.knn_top1(train_f, train_y, test_f, test_y, config.num_classes,
                        config.knn.k, config.knn.temperature)

  return evaluate


def _reconstruction_images(config, trainer, state, input_pipeline, mesh, num: int = 8) -> dict:
  """Grids for TensorBoard, one per masked view, on a few test images.

  Called by every process: with sharding.fsdp the parameters are spread over the processes, and
  gathering them is a collective. Only process 0 writes the grids.
  """
  if not presets.uses_reconstruction(config):  # (MimCo's decoder predicts features, not pixels)
    return {}
  params = sharding.to_host(state['params'])
  batch = next(iter(input_pipeline.create_eval_iterator(
      config, config.test_split, batch_size=num, process_index=0, process_count=1)))
  out = {}
  for v, ratio in enumerate(presets.view_mask_ratios(config)):
    if ratio > 0:
      p = reconstruction.panels(trainer.modules, params, batch['image'], ratio,
                                jax.random.PRNGKey(v), config.norm_pix_loss)
      out[f'reconstruction/view{v + 1}'] = reconstruction.grid(
          p, input_pipeline.MEAN, input_pipeline.STD)[None]
  return out


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Pre-trains `config` in `workdir`, resuming from its latest checkpoint. Returns final metrics."""
  # ---------------------------------------------------------------- checks (nothing written yet)
  mesh = sharding.make_mesh()
  config_checks.validate(config, num_devices=mesh.size)
  if config.batch_size % jax.process_count():
    raise UserError(f'config.batch_size: {config.batch_size} is not divisible by the '
                    f'{jax.process_count()} processes')
  is_main = jax.process_index() == 0
  if config.method == 'mimco':
    mimco.resolve_teacher(config)  # checks the teacher; its spec goes into config.json
    mimco.check_teacher_checkpoint(config)

  # ---------------------------------------------------------------- workdir
  workdir = os.path.abspath(workdir)
  if is_main:
    _prepare_workdir(workdir)
  with WorkdirLock(workdir, enabled=is_main):
    if is_main:
      _write_config(config, workdir)
    return _train(config, workdir, mesh, is_main)


def _train(config, workdir: str, mesh, is_main: bool) -> dict[str, Any]:
  # ---------------------------------------------------------------- data
  from macrl_jax import input_pipeline  # the only TensorFlow importer
  input_pipeline.get_builder(config)  # prepares the dataset once, or says how to

  # ---------------------------------------------------------------- model, optimizer, sharding, step
  trainer = train_step.Trainer(config, mesh)
  total_steps = trainer.total_steps

  def run_step(state, batch):
    try:
      return trainer.step(state, batch)
    except Exception as e:  # noqa: BLE001 - only an out-of-memory error is explained
      explained = _explain_out_of_memory(e, config)
      if explained is None:
        raise
      raise explained from None

  # ---------------------------------------------------------------- checkpoint
  mngr = checkpoint.manager(workdir, config.keep_checkpoints)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          trainer.abstract_state, trainer.state_sharding)
  restored = checkpoint.restore_latest(mngr, abstract, move_aside=True)
  if restored is None:
    state, start_step = trainer.init_state(), 0
    logging.info('Starting from scratch in %s', workdir)
  else:
    state, meta = restored
    start_step = int(meta['step'])
    logging.info('Resumed from step %d of %s', start_step, workdir)

  def save(step):
    checkpoint.save(mngr, step, state, {'data_position': step, 'method': config.method,
                                        'variant': config.model.variant})

  # ---------------------------------------------------------------- writers
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  metrics_log = MetricsLog(workdir, is_main)
  metrics_log.truncate_after(start_step)
  report_progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                                    every_steps=config.log_every_steps)

  # ---------------------------------------------------------------- evals
  knn_eval = make_knn_eval(config, trainer, mesh, input_pipeline)

  def run_evals(step) -> dict:
    result = {'knn_top1': knn_eval(state['params'])}
    writer.write_scalars(step, result)
    images = _reconstruction_images(config, trainer, state, input_pipeline, mesh)
    if images and is_main:
      writer.write_images(step, images)
    return result

  # ---------------------------------------------------------------- loop
  from macrl_jax import prefetch
  batches = prefetch.prefetch_to_mesh(
      input_pipeline.create_pretrain_iterator(config, start_step=start_step), mesh)
  history: list[tuple[int, Any]] = []  # metrics since the last log; fetched at sync points only
  last_record: dict[str, Any] = {}
  last_time, last_step = time.time(), start_step

  def check():
    """Fetches the metrics since the last check; raises at the first step that was refused."""
    nonlocal history
    history = [(s, {k: float(v) for k, v in m.items()}) for s, m in jax.device_get(history)]
    bad = _first_skipped(history)
    if bad is not None:
      raise NonFiniteLossError(_non_finite_message(*bad, mngr))

  def log_means(step) -> dict:
    nonlocal history, last_time, last_step
    check()
    if not history:
      return {}
    now = time.time()
    record = _mean_metrics(history)
    record.pop('skipped', None)
    record['images_per_sec'] = (step - last_step) * config.batch_size / max(now - last_time, 1e-9)
    history, last_time, last_step = [], now, step
    return record

  with _Preemption() as preemption:
    step = start_step
    while step < total_steps:
      state, metrics = run_step(state, next(batches))
      step += 1
      history.append((step, metrics))
      if len(history) > 2:
        # At most two steps in flight: a deep queue of dispatched steps can stall the first
        # cross-device reduction on many host devices (seen on 8 CPU devices in fine-tuning).
        jax.block_until_ready(history[-3][1])
      report_progress(step, time.time())

      record = {}
      last = step == total_steps
      stop = preemption.requested or mngr.reached_preemption(step)
      if step % config.log_every_steps == 0 or last:
        record.update(log_means(step))
      if step % config.eval_every_steps == 0 or last:
        check()  # never evaluate a state after a refused step
        record.update(run_evals(step))
        last_time = time.time()  # images/s counts training time only
      if record:
        writer.write_scalars(step, {k: v for k, v in record.items() if k != 'knn_top1'})
        metrics_log.write({'step': step, **record})
        last_record = {'step': step, **record}
      if step % config.checkpoint_every_steps == 0 or last or stop:
        check()  # never save a state after a refused step
        save(step)
      if stop:
        logging.warning('Stopped by preemption at step %d; rerun the same command to resume.', step)
        break

  checkpoint.finish(mngr)
  writer.flush()
  writer.close()
  if is_main:
    print(f'\nDone at step {step}/{total_steps}. Results in {workdir}:\n'
          f'  metrics.jsonl, config.json, checkpoints/ (steps {mngr.all_steps()})\n'
          f'  TensorBoard: tensorboard --logdir {workdir}', flush=True)
  return dict(last_record, step=step, preempted=step < total_steps)
