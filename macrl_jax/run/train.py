"""Pre-training: `train_and_evaluate(config, workdir)`.

Plain sections, in order: checks → workdir → data → model, optimizer, step → checkpoint →
writers → evals → loop (loop.py). Only process 0 writes files other than checkpoints (which all
processes save collectively). The model, optimizer, state layout and step come from
methods/build.py, as for the tools and tests.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

import jax
from clu import periodic_actions

from macrl_jax import sharding
from macrl_jax.config import checks
from macrl_jax.data import prefetch
from macrl_jax.errors import UserError
from macrl_jax.evals import monitors
from macrl_jax.methods import build
from macrl_jax.models import vit
from macrl_jax.run import checkpoint, loop, teacher, workdirs, writers

NAN_HINT = ('Lower the learning rate (--config.optim.base_lr), add gradient clipping '
            '(--config.optim.grad_clip=1.0) or use float32 (--config.dtype=float32).')


def train_and_evaluate(config, workdir: str, console: bool = False) -> dict[str, Any]:
  """Pre-trains `config` in `workdir`, resuming from its latest checkpoint. Returns final metrics.

  With `console`, process 0 prints a short header and one compact line per logged step (main.py);
  the full record goes to the log and metrics.jsonl either way.
  """
  # ---------------------------------------------------------------- checks (nothing written yet)
  mesh = sharding.make_mesh()
  checks.validate(config, num_devices=mesh.size)
  if config.batch_size % jax.process_count():
    raise UserError(f'config.batch_size: {config.batch_size} is not divisible by the '
                    f'{jax.process_count()} processes')
  is_main = jax.process_index() == 0
  workdir = os.path.abspath(workdir)
  # mimco: the teacher's architecture, which goes into config.json (a resumed student has its
  # teacher in its own checkpoint)
  teacher.resolve(config, workdir)
  teacher.check_checkpoint(config, mesh, workdir)

  # ---------------------------------------------------------------- workdir
  if is_main:
    workdirs.prepare(workdir)
  with workdirs.WorkdirLock(workdir, enabled=is_main):
    return _train(config, workdir, mesh, is_main, console)


def _train(config, workdir: str, mesh, is_main: bool, console: bool) -> dict[str, Any]:
  # ---------------------------------------------------------------- data
  from macrl_jax.data import input_pipeline  # the only TensorFlow importer
  input_pipeline.check_splits(config)  # prepares the dataset once (or says how to), then checks it

  # ---------------------------------------------------------------- model, optimizer, step
  # The modules, optimizer, state layout on the mesh and the jitted init and step (donating the
  # state), as every tool and test builds them. Equal configs get the same programs in a process.
  built = build.build(config, mesh)

  # ---------------------------------------------------------------- checkpoint
  mngr = checkpoint.manager(workdir, config.keep_checkpoints)
  state, start_step, resumed = _restore_or_start(config, mesh, built, mngr, workdir)
  if is_main:  # every check has passed: config.json says what this run does
    workdirs.write_config(config, workdir, fresh=not resumed)
    if console:
      print(_header(config, mesh, workdir, start_step), flush=True)

  def save(step, state):
    checkpoint.save(mngr, step, state, {'data_position': step, 'method': config.method,
                                        'variant': config.model.variant})

  # ---------------------------------------------------------------- writers
  writer, default_writer = writers.create(
      workdir, is_main, start_step,
      writers.ConsoleWriter(config.total_steps, config.batch_size) if console else None)
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=config.total_steps, writer=default_writer, every_steps=config.log_every_steps)

  # ---------------------------------------------------------------- evals
  # config.evals: the kNN monitor, reconstruction pictures, held-out reconstruction error, each
  # at its own period (evals/monitors.py); the loop asks at the periods' common divisor.
  def write_images(step, images):
    if images and is_main:
      writer.write_images(step, images)

  evaluators = monitors.make(config, mesh, built.modules, write_images)

  def evaluate(step, state) -> dict:
    return monitors.run_due(evaluators, step, step == config.total_steps, state)

  # ---------------------------------------------------------------- loop
  batches = prefetch.prefetch_to_mesh(
      input_pipeline.create_pretrain_iterator(config, start_step=start_step), mesh)
  every = loop.Every(log=config.log_every_steps, checkpoint=config.checkpoint_every_steps,
                     eval=monitors.every_steps(evaluators) or config.total_steps)
  state, step, record = loop.run(
      _explaining_out_of_memory(built.step, config), state, batches, start_step=start_step,
      total_steps=config.total_steps, every=every, batch_size=config.batch_size, mngr=mngr,
      save=save, writer=writer, hint=NAN_HINT, evaluate=evaluate if evaluators else None,
      on_step=lambda s: report_progress(s, time.time()))

  checkpoint.finish(mngr)
  writer.flush()
  writer.close()
  if is_main:
    print(f'\nDone at step {step}/{config.total_steps}. Results in {workdir}:\n'
          f'  metrics.jsonl, config.json, checkpoints/ (steps {mngr.all_steps()})\n'
          f'  TensorBoard: tensorboard --logdir {workdir}', flush=True)
  return dict(record, step=step, preempted=step < config.total_steps)


def _restore_or_start(config, mesh, built, mngr, workdir: str) -> tuple[dict, int, bool]:
  """(state, step, resumed): the latest readable checkpoint, or the initial state (config.init's PyTorch
  weights applied; mimco's placeholder replaced by the restored teacher)."""
  restored = checkpoint.restore_latest(mngr, built.abstract_state, move_aside=True)
  if restored is not None:
    state, meta = restored
    logging.info('Resumed from step %d of %s', int(meta['step']), workdir)
    return state, int(meta['step']), True
  state = built.init_state()
  if config.method == 'mimco':
    state['teacher'] = jax.device_put(teacher.load(config, mesh), built.shardings['teacher'])
  logging.info('Starting from scratch in %s', workdir)
  return state, 0, False


def _header(config, mesh, workdir: str, start_step: int) -> str:
  """What the run is, where it runs and writes, and whether it resumes."""
  dims = vit.vit_dims(config.model)
  device = mesh.devices.flat[0]
  started = f'resuming from step {start_step}' if start_step else 'starting from scratch'
  return (f'{config.method} on {config.dataset} ({config.image_size} px): ViT {config.model.variant} '
          f'(width {dims["width"]}, depth {dims["depth"]}), batch {config.batch_size}, '
          f'{config.total_steps} steps\n'
          f'{mesh.size} × {device.platform} ({device.device_kind}), {jax.process_count()} '
          f'process(es)\n'
          f'{workdir}: {started}; the full log and metrics.jsonl are there')


def _explaining_out_of_memory(step_fn, config):
  """`step_fn`, raising a RESOURCE_EXHAUSTED from XLA as a message with the sizes and the fixes."""

  def run_step(state, batch):
    try:
      return step_fn(state, batch)
    except Exception as e:  # noqa: BLE001 - only an out-of-memory error is explained
      if 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      raise _out_of_memory(e, config) from None

  return run_step


def _out_of_memory(error: Exception, config) -> UserError:
  asked = re.search(r'allocat\w* (\d+) bytes', str(error))
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
