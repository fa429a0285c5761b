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
from macrl_jax.config import checks, schema
from macrl_jax.data import prefetch
from macrl_jax.errors import UserError
from macrl_jax.evals import features, knn, reconstruction
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
  restored = checkpoint.restore_latest(mngr, built.abstract_state, move_aside=True)
  if restored is None:
    state, start_step = built.init_state(), 0  # (config.init's PyTorch weights applied)
    if config.method == 'mimco':  # the placeholder of init_state becomes the restored teacher
      state['teacher'] = jax.device_put(teacher.load(config, mesh), built.shardings['teacher'])
    logging.info('Starting from scratch in %s', workdir)
  else:
    state, meta = restored
    start_step = int(meta['step'])
    logging.info('Resumed from step %d of %s', start_step, workdir)
  if is_main:  # every check has passed: config.json says what this run does
    workdirs.write_config(config, workdir, fresh=restored is None)
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
  def evaluate(step, state) -> dict:
    result = {'knn_top1': _knn_top1(config, mesh, built.modules.encoder,
                                    state['params']['encoder'])}
    images = _reconstruction_images(config, built.modules, state, input_pipeline)
    if images and is_main:
      writer.write_images(step, images)
    return result

  # ---------------------------------------------------------------- loop
  batches = prefetch.prefetch_to_mesh(
      input_pipeline.create_pretrain_iterator(config, start_step=start_step), mesh)
  every = loop.Every(log=config.log_every_steps, checkpoint=config.checkpoint_every_steps,
                     eval=config.eval_every_steps)
  state, step, record = loop.run(
      _explaining_out_of_memory(built.step, config), state, batches, start_step=start_step,
      total_steps=config.total_steps, every=every, batch_size=config.batch_size, mngr=mngr,
      save=save, writer=writer, hint=NAN_HINT, evaluate=evaluate,
      on_step=lambda s: report_progress(s, time.time()))

  checkpoint.finish(mngr)
  writer.flush()
  writer.close()
  if is_main:
    print(f'\nDone at step {step}/{config.total_steps}. Results in {workdir}:\n'
          f'  metrics.jsonl, config.json, checkpoints/ (steps {mngr.all_steps()})\n'
          f'  TensorBoard: tensorboard --logdir {workdir}', flush=True)
  return dict(record, step=step, preempted=step < config.total_steps)


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


def _knn_top1(config, mesh, encoder, params) -> float:
  """The kNN monitor: online encoder features, the train split as memory, the whole test split."""
  (train_f, train_y), (test_f, test_y) = (
      features.split_features(config, mesh, encoder, params, split)
      for split in (config.train_split, config.test_split))
  return knn.evaluate(train_f, train_y, test_f, test_y, config.num_classes, config.knn.k,
                      config.knn.temperature)['top1']


def _reconstruction_images(config, modules, state, input_pipeline, num: int = 8) -> dict:
  """Grids for TensorBoard, one per masked view, on a few test images.

  Called by every process: with sharding.fsdp the parameters are spread over the processes, and
  gathering them is a collective. Only process 0 writes the grids.
  """
  if not schema.uses_reconstruction(config):  # (MimCo's decoder predicts features, not pixels)
    return {}
  params = sharding.to_host(state['params'])
  batch = next(iter(input_pipeline.create_eval_iterator(
      config, config.test_split, batch_size=num, process_index=0, process_count=1)))
  out = {}
  for v, ratio in enumerate(schema.view_mask_ratios(config)):
    if ratio > 0:
      p = reconstruction.panels(modules, params, batch['image'], ratio, jax.random.PRNGKey(v),
                                config.norm_pix_loss)
      out[f'reconstruction/view{v + 1}'] = reconstruction.grid(
          p, input_pipeline.MEAN, input_pipeline.STD)[None]
  return out


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
