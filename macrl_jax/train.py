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
import signal
import time
from typing import Any

import jax
import numpy as np
from clu import metric_writers, periodic_actions

from macrl_jax import checkpoint, knn, mimco, presets, reconstruction, sharding, train_step

NAN_HINT = ('Lower the learning rate (--config.optim.base_lr), add gradient clipping '
            '(--config.optim.grad_clip=1.0) or use float32 (--config.dtype=float32).')


class NonFiniteLossError(FloatingPointError):
  pass


class _Preemption:
  """Turns SIGTERM into a flag that the loop checks between steps (save, then exit 0)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not in the main thread (e.g. some test runners): no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    logging.warning('SIGTERM: saving a checkpoint at the current step, then exiting.')
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


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


def _first_non_finite(history: list[tuple[int, dict]]) -> tuple[int, dict] | None:
  for step, metrics in history:
    if not all(math.isfinite(float(v)) for v in metrics.values()):
      return step, metrics
  return None


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


def _reconstruction_images(config, trainer, state, input_pipeline, num: int = 8) -> dict:
  """Grids for TensorBoard, one per masked view (process 0 only, on a few test images)."""
  if not presets.uses_reconstruction(config):  # (MimCo's decoder predicts features, not pixels)
    return {}
  batch = next(iter(input_pipeline.create_eval_iterator(
      config, config.test_split, batch_size=num, process_index=0, process_count=1)))
  params = jax.device_get(state['params'])
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
  # ---------------------------------------------------------------- mesh
  mesh = sharding.make_mesh()
  presets.validate(config, num_devices=mesh.size)
  if config.batch_size % jax.process_count():
    raise ValueError(f'config.batch_size: {config.batch_size} is not divisible by the '
                     f'{jax.process_count()} processes')
  is_main = jax.process_index() == 0
  if config.method == 'mimco':
    mimco.resolve_teacher(config)  # checks the teacher; its spec goes into config.json

  # ---------------------------------------------------------------- workdir
  workdir = os.path.abspath(workdir)
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    _write_config(config, workdir)

  # ---------------------------------------------------------------- data
  from macrl_jax import input_pipeline  # the only TensorFlow importer
  input_pipeline.get_builder(config)  # prepares the dataset once, or says how to

  # ---------------------------------------------------------------- model, optimizer, sharding, step
  trainer = train_step.Trainer(config, mesh)
  total_steps = trainer.total_steps

  # ---------------------------------------------------------------- checkpoint
  mngr = checkpoint.manager(workdir, config.keep_checkpoints)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          trainer.abstract_state, trainer.state_sharding)
  restored = checkpoint.restore_latest(mngr, abstract)
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
  report_progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                                    every_steps=config.log_every_steps)

  # ---------------------------------------------------------------- evals
  knn_eval = make_knn_eval(config, trainer, mesh, input_pipeline)

  def run_evals(step) -> dict:
    result = {'knn_top1': knn_eval(state['params'])}
    writer.write_scalars(step, result)
    if is_main:
      images = _reconstruction_images(config, trainer, state, input_pipeline)
      if images:
        writer.write_images(step, images)
    return result

  # ---------------------------------------------------------------- loop
  from macrl_jax import prefetch
  batches = prefetch.prefetch_to_mesh(
      input_pipeline.create_pretrain_iterator(config, start_step=start_step), mesh)
  history: list[tuple[int, Any]] = []  # device metrics since the last check; fetched together
  last_record: dict[str, Any] = {}
  last_time, last_step = time.time(), start_step

  def check_and_log(step) -> dict:
    """Fetches the metrics since the last check; raises on a non-finite one; logs their mean."""
    nonlocal history, last_time, last_step
    fetched = [(s, {k: float(v) for k, v in m.items()}) for s, m in jax.device_get(history)]
    history = []
    bad = _first_non_finite(fetched)
    if bad is not None:
      s, m = bad
      terms = ', '.join(f'{k}={v:.4g}' for k, v in sorted(m.items()))
      raise NonFiniteLossError(
          f'Non-finite loss at step {s}: {terms}. {NAN_HINT} The last good checkpoint is kept in '
          f'{mngr.directory} (steps {mngr.all_steps()}); rerunning resumes from it.')
    if not fetched:
      return {}
    now = time.time()
    record = _mean_metrics(fetched)
    record['images_per_sec'] = (step - last_step) * config.batch_size / max(now - last_time, 1e-9)
    last_time, last_step = now, step
    return record

  with _Preemption() as preemption:
    step = start_step
    while step < total_steps:
      state, metrics = trainer.step(state, next(batches))
      step += 1
      history.append((step, metrics))
      if len(history) > 2:
        # At most two steps in flight: a deep queue of dispatched steps can stall the first
        # cross-device reduction on many host devices (seen on 8 CPU devices in fine-tuning).
        jax.block_until_ready(history[-3][1])
      report_progress(step, time.time())

      record = {}
      last = step == total_steps
      if step % config.log_every_steps == 0 or last:
        record.update(check_and_log(step))
      if step % config.eval_every_steps == 0 or last:
        record.update(run_evals(step))
        last_time = time.time()  # images/s counts training time only
      if record:
        writer.write_scalars(step, {k: v for k, v in record.items() if k != 'knn_top1'})
        metrics_log.write({'step': step, **record})
        last_record = {'step': step, **record}
      stop = preemption.requested or mngr.reached_preemption(step)
      if step % config.checkpoint_every_steps == 0 or last or stop:
        check_and_log(step)  # never save a non-finite state
        save(step)
      if stop:
        logging.warning('Stopped by preemption at step %d; rerun the same command to resume.', step)
        break

  mngr.wait_until_finished()
  mngr.close()
  writer.flush()
  writer.close()
  if is_main:
    print(f'\nDone at step {step}/{total_steps}. Results in {workdir}:\n'
          f'  metrics.jsonl, config.json, checkpoints/ (steps {mngr.all_steps()})\n'
          f'  TensorBoard: tensorboard --logdir {workdir}', flush=True)
  return dict(last_record, step=step, preempted=step < total_steps)
