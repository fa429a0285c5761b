"""Full fine-tuning of a pre-trained encoder, MAE's recipe at small scale: the classifier and its
layer-decayed optimizer (methods/classifier.py), label smoothing, optional mixup/cutmix (data/mixup.py).

Training data come from the pre-training input pipeline with one weakly augmented view (random
resized crop + flip), so batches are a pure function of (seed, step) and a resumed fine-tune sees
the same ones as an uninterrupted one. Checkpoints go to `<pre-training workdir>/<name>/checkpoints`
through checkpoint.py, and the loop is pre-training's (loop.py): SIGTERM saves and stops.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from macrl_jax import sharding
from macrl_jax.config import methods, recipes
from macrl_jax.data import mixup, prefetch
from macrl_jax.evals import features
from macrl_jax.evals.accuracy import topk_accuracy
from macrl_jax.methods import classifier, optim
from macrl_jax.run import checkpoint, loop, writers
from macrl_jax.run.restore import Restored, WorkdirError


def default_args() -> ml_collections.ConfigDict:
  """The fine-tuning hyperparameters (the tool's flags): recipes.finetune_recipe() and the run's."""
  args = recipes.finetune_recipe()
  args.update(dict(
      pool=ml_collections.FieldReference(None, field_type=str),  # None = the pre-training pool
      from_scratch=False,
      seed=0,
      log_every_steps=50,
      checkpoint_every_steps=500,
      eval_batch_size=ml_collections.FieldReference(None, field_type=int),
  ))
  return args


# The arguments a fine-tune cannot change when it resumes (the others only change logging).
_FIXED = ('epochs', 'batch_size', 'base_lr', 'min_lr', 'warmup_epochs', 'weight_decay', 'b1', 'b2',
          'layer_decay', 'drop_path', 'label_smoothing', 'mixup', 'cutmix', 'pool', 'from_scratch',
          'seed', 'label_fraction', 'label_seed')


def data_config(config, args):
  """The pre-training config turned into the fine-tuning input: one weak view, the ft batch, the
  labelled part of the train split."""
  c = copy.deepcopy(config)
  c.num_views = 1
  c.aug.view1 = methods.weak_aug()
  c.batch_size = args.batch_size
  c.seed = args.seed
  c.data.label_fraction = args.get('label_fraction', 1.0)
  c.data.label_seed = args.get('label_seed', 0)
  return c


class Finetuning(NamedTuple):
  """The classifier, optimizer, state layout and jitted functions of one fine-tuning run."""
  model: classifier.Classifier
  pool: str
  total_steps: int
  tx: optax.GradientTransformation
  lr_fn: optax.Schedule
  new_state: Callable  # (params) -> the state at step 0
  abstract_state: Any  # ShapeDtypeStructs carrying `shardings`
  shardings: Any
  step: Callable  # jit(step)(state, batch) -> (state, metrics); donates the state
  logits: Callable  # jit(params, images) -> logits, batch sharded


def build(restored: Restored, args, num_train: int) -> Finetuning:
  config, mesh = restored.config, restored.mesh
  if args.batch_size % mesh.size:
    raise ValueError(f'--batch_size={args.batch_size} is not divisible by the {mesh.size} '
                     f'devices; use a multiple of {mesh.size}')
  steps_per_epoch = max(num_train // args.batch_size, 1)
  total_steps = max(int(round(args.epochs * steps_per_epoch)), 1)
  warmup = int(round(args.warmup_epochs * steps_per_epoch))
  warmup = min(max(warmup, 1), total_steps - 1)  # ≥ 1: optax logs about a 0-step warm-up
  pool = args.pool or config.model.pool
  model = classifier.Classifier(
      classifier.finetuning_encoder(restored.modules.encoder, pool, args.drop_path),
      config.num_classes, pool)
  encoder = model.encoder

  size = config.image_size
  abstract_params = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                   jnp.zeros((1, size, size, 3)))['params']
  tx, lr_fn = classifier.make_optimizer(args, abstract_params, encoder.depth, total_steps, warmup)

  def new_state(params):
    return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                rng=jax.random.PRNGKey(args.seed))

  abstract = jax.eval_shape(new_state, abstract_params)
  shardings = sharding.state_shardings(abstract, mesh, config.sharding.fsdp)
  batch = sharding.batch_sharding(mesh)
  step = jax.jit(make_train_step(model, tx, lr_fn, args, config.num_classes),
                 in_shardings=(shardings, batch),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  logits = jax.jit(lambda params, images: model.apply({'params': params}, images),
                   in_shardings=(None, batch), out_shardings=batch)
  return Finetuning(model, pool, total_steps, tx, lr_fn, new_state,
                    sharding.with_shardings(abstract, shardings), shardings, step, logits)


def init_state(ft: Finetuning, restored: Restored, args):
  """The pre-trained encoder with a fresh head, or everything fresh with from_scratch."""
  size = restored.config.image_size
  init_rng = jax.random.fold_in(jax.random.PRNGKey(args.seed), 1)
  params = jax.jit(ft.model.init)(init_rng, jnp.zeros((1, size, size, 3)))['params']  # not op by op
  if not args.from_scratch:
    params = dict(params, encoder=classifier.with_pretrained(params['encoder'],
                                                             restored.encoder_params))
  params = jax.device_put(params, ft.shardings['params'])
  return jax.jit(ft.new_state, out_shardings=ft.shardings)(params)


def make_train_step(model, tx, lr_fn, args, num_classes: int) -> Callable:
  """Returns train_step(state, batch) -> (state, metrics); pure, for the caller to jit."""

  def train_step(state, batch):
    rng = jax.random.fold_in(state['rng'], state['step'])
    mix_rng, drop_rng = jax.random.split(rng)
    onehot = jax.nn.one_hot(batch['label'], num_classes)
    targets = optax.smooth_labels(onehot, args.label_smoothing) if args.label_smoothing else onehot
    images, targets = mixup.mix(mix_rng, batch['view1'], targets, args.mixup, args.cutmix)

    def loss_fn(params):
      logits = model.apply({'params': params}, images, train=True, rngs={'dropout': drop_rng})
      return optax.softmax_cross_entropy(logits, targets).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    new = dict(state, step=state['step'] + 1, params=params, opt_state=opt_state)
    norms = dict(loss=loss, grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params))
    new, skipped = optim.guard_non_finite(new, state, norms)
    metrics = dict(loss=loss, train_top1=(logits.argmax(-1) == batch['label']).mean(),
                   grad_norm=norms['grad_norm'], lr=lr_fn(state['step']), skipped=skipped)
    return new, metrics

  return train_step


def evaluate(ft: Finetuning, restored: Restored, params, split: str,
             batch_size: int | None = None) -> dict:
  """Top-1 and top-5 accuracy of the classifier on every example of `split`."""
  from macrl_jax.data import input_pipeline  # TensorFlow only where data is read
  config, mesh = restored.config, restored.mesh
  local = features.eval_batch_size(config, mesh, batch_size) // jax.process_count()
  batches = input_pipeline.create_eval_iterator(config, split, batch_size=local)
  logits, labels = features.extract(ft.logits, params, batches, mesh)
  return {'top1': topk_accuracy(logits, labels, 1), 'top5': topk_accuracy(logits, labels, 5)}


def _check_same_args(mngr, args, where: str) -> None:
  steps = mngr.all_steps()
  if not steps:
    return
  saved = checkpoint.read_meta(mngr, max(steps)).get('finetune', {})
  defaults = default_args()  # for arguments added since the checkpoint was written
  differ = sorted(k for k in _FIXED if saved.get(k, defaults.get(k)) != args.get(k))
  if differ:
    raise WorkdirError(
        f'{where} holds a fine-tune with other arguments '
        f'({", ".join(f"{k}={saved.get(k)}" for k in differ)}); resume it with those, or pass '
        f'another --name to start a new one beside it')


def finetune(restored: Restored, args, name: str = 'finetune') -> dict:
  """Fine-tunes (or resumes fine-tuning) in `<workdir>/<name>`; returns the test top-1/top-5."""
  from macrl_jax.data import input_pipeline  # TensorFlow
  config = restored.config
  data = data_config(config, args)
  ft = build(restored, args, input_pipeline.num_examples(data, data.train_split))
  ft_dir = os.path.join(restored.workdir, name)
  is_main = jax.process_index() == 0

  mngr = checkpoint.manager(ft_dir, keep=2)
  _check_same_args(mngr, args, ft_dir)
  restored_ft = checkpoint.restore_latest(mngr, ft.abstract_state)
  if restored_ft is None:
    state, start = init_state(ft, restored, args), 0
  else:
    state, saved = restored_ft
    start = int(saved['step'])
    logging.info('Resumed fine-tuning from step %d of %s', start, ft_dir)
  meta = {'finetune': args.to_dict(), 'pretrain_step': restored.step}

  def save(step, state):
    checkpoint.save(mngr, step, state, dict(meta, data_position=step))

  writer, _ = writers.create(ft_dir, is_main, start)
  batches = prefetch.prefetch_to_mesh(
      input_pipeline.create_pretrain_iterator(data, start_step=start),
      restored.mesh)
  state, step, _ = loop.run(
      ft.step, state, batches, start_step=start, total_steps=ft.total_steps,
      every=loop.Every(log=args.log_every_steps, checkpoint=args.checkpoint_every_steps),
      batch_size=args.batch_size, mngr=mngr, save=save, writer=writer,
      hint='Lower --base_lr.')
  checkpoint.finish(mngr)

  result = dict(step=step, total_steps=ft.total_steps, pretrain_step=restored.step,
                preempted=step < ft.total_steps, pool=ft.pool)
  if step == ft.total_steps:
    result.update(evaluate(ft, restored, state['params'], config.test_split,
                           args.eval_batch_size))
    writer.write_scalars(step, {'test_top1': result['top1'], 'test_top5': result['top5']})
  writer.close()
  if is_main:
    with open(os.path.join(ft_dir, 'args.json'), 'w') as f:
      json.dump(args.to_dict(), f, indent=2, sort_keys=True)
  return result
