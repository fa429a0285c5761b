"""Full fine-tuning of a pre-trained encoder, MAE's recipe at small scale.

  classifier = encoder (drop path) → pool (cls token, or mean of patch tokens + LayerNorm) → linear
  AdamW, linear warm-up + cosine, lr = base_lr · batch / 256, layer-wise lr decay (BEiT/MAE: block i
  of depth d gets lr · decay^(d − i), the patch embedding and cls token decay^(d + 1), the final
  norm and the head lr), label smoothing, optional mixup/cutmix (timm's batch mode).

Training data come from the pre-training input pipeline with one weakly augmented view (random
resized crop + flip), so batches are a pure function of (seed, step) and a resumed fine-tune sees
the same ones as an uninterrupted one. Checkpoints go to `<pre-training workdir>/<name>/checkpoints`
through checkpoint.py, and SIGTERM saves and stops, as in pre-training.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from macrl_jax import checkpoint, evaluation, knn, methods, models, optim, prefetch, sharding
from macrl_jax.restore import Restored, WorkdirError


def default_args() -> ml_collections.ConfigDict:
  """The fine-tuning hyperparameters (the tool's flags)."""
  return ml_collections.ConfigDict(dict(
      epochs=50.0,
      batch_size=128,
      base_lr=1e-3,  # scaled by batch_size / 256
      min_lr=1e-6,
      warmup_epochs=5.0,
      weight_decay=0.05,
      b1=0.9,
      b2=0.999,
      layer_decay=0.75,
      drop_path=0.1,
      label_smoothing=0.1,
      mixup=0.0,  # Beta(α, α) of mixup; 0 = off
      cutmix=0.0,  # Beta(α, α) of cutmix; 0 = off
      pool=ml_collections.FieldReference(None, field_type=str),  # None = the pre-training pool
      from_scratch=False,
      seed=0,
      log_every_steps=50,
      checkpoint_every_steps=500,
      eval_batch_size=ml_collections.FieldReference(None, field_type=int),
  ))


# The arguments a fine-tune cannot change when it resumes (the others only change logging).
_FIXED = ('epochs', 'batch_size', 'base_lr', 'min_lr', 'warmup_epochs', 'weight_decay', 'b1', 'b2',
          'layer_decay', 'drop_path', 'label_smoothing', 'mixup', 'cutmix', 'pool', 'from_scratch',
          'seed')


class Classifier(nn.Module):
  encoder: models.Encoder
  num_classes: int
  pool: str = 'cls'

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = models.pool(self.encoder(images, train=train), self.pool)
    if self.pool == 'mean':  # MAE's global-pool head normalises the averaged tokens
      x = nn.LayerNorm(name='fc_norm')(x)
    # A near-zero head (MAE) starts from uniform predictions without disturbing the encoder.
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(2e-5),
                    name='head')(x)


def layer_multipliers(params, depth: int, decay: float):
  """The lr multiplier of every parameter (same tree): layer-wise decay, see the module docstring.

  Under nn.scan (model.scan) the blocks are one stacked array per parameter; their multiplier is an
  array over the leading (layer) axis.
  """

  def one(path, leaf):
    keys = [getattr(p, 'key', None) for p in path]
    if keys[0] != 'encoder':
      return 1.0  # head, fc_norm
    if 'transformer' not in keys:
      return decay ** (depth + 1)  # patch embedding, cls token
    block = keys[keys.index('transformer') + 1]
    if block == 'blocks':
      per_layer = decay ** (depth - np.arange(depth, dtype=np.float32))
      return jnp.asarray(per_layer.reshape((depth,) + (1,) * (leaf.ndim - 1)))
    if block.startswith('block'):
      return decay ** (depth - int(block[5:]))
    return 1.0  # the encoder's final norm

  return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(args, params, depth: int, total_steps: int, warmup_steps: int):
  peak = args.base_lr * args.batch_size / 256
  schedule = optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, max(total_steps, 2),
                                                end_value=min(args.min_lr, peak))
  multipliers = layer_multipliers(params, depth, args.layer_decay)
  tx = optax.chain(
      optax.adamw(schedule, b1=args.b1, b2=args.b2, weight_decay=args.weight_decay,
                  mask=optim.decay_mask),
      # After AdamW, so that the multiplier scales the decay term too (as PyTorch's param groups).
      optax.stateless(lambda updates, _: jax.tree.map(lambda u, m: u * m, updates, multipliers)))
  return tx, schedule


def mix(rng, images, targets, mixup: float, cutmix: float, switch_prob: float = 0.5):
  """timm's Mixup in batch mode: one λ ~ Beta(α, α) per batch, the partner is the reversed batch.

  With both on, each batch is cutmixed with probability `switch_prob`, else mixed up. Cutmix pastes
  a box of area ≈ (1 − λ) and sets λ to the exact unpasted fraction.
  """
  if mixup <= 0 and cutmix <= 0:
    return images, targets
  k_switch, k_mixup, k_cutmix, k_box = jax.random.split(rng, 4)
  other_x, other_t = images[::-1], targets[::-1]
  blend = lambda lam: (lam * images + (1 - lam) * other_x, lam * targets + (1 - lam) * other_t)
  if mixup > 0:
    mixed = blend(jax.random.beta(k_mixup, mixup, mixup))
  if cutmix <= 0:
    return mixed
  h, w = images.shape[1:3]
  lam = jax.random.beta(k_cutmix, cutmix, cutmix)
  cut = jnp.sqrt(1.0 - lam)
  cy, cx = jax.random.uniform(k_box, (2,)) * jnp.array([h, w])
  y0, y1 = (jnp.clip(jnp.round(cy + s * cut * h / 2), 0, h) for s in (-1, 1))
  x0, x1 = (jnp.clip(jnp.round(cx + s * cut * w / 2), 0, w) for s in (-1, 1))
  ys, xs = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  box = ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1))[None, :, :, None]
  lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
  cutmixed = (jnp.where(box, other_x, images), lam * targets + (1 - lam) * other_t)
  if mixup <= 0:
    return cutmixed
  use_cutmix = jax.random.uniform(k_switch) < switch_prob
  return jax.tree.map(lambda a, b: jnp.where(use_cutmix, a, b), cutmixed, mixed)


def data_config(config, args):
  """The pre-training config turned into the fine-tuning input: one weak view, the ft batch."""
  c = copy.deepcopy(config)
  c.num_views = 1
  c.aug.view1 = methods.weak_aug()
  c.batch_size = args.batch_size
  c.seed = args.seed
  return c


class Finetuner:
  """The classifier, optimizer, sharded state and jitted steps of one fine-tuning run."""

  def __init__(self, restored: Restored, args, num_train: int):
    self.restored, self.args, self.mesh = restored, args, restored.mesh
    config = restored.config
    if args.batch_size % self.mesh.size:
      raise ValueError(f'--batch_size={args.batch_size} is not divisible by the {self.mesh.size} '
                       f'devices; use a multiple of {self.mesh.size}')
    self.steps_per_epoch = max(num_train // args.batch_size, 1)
    self.total_steps = max(int(round(args.epochs * self.steps_per_epoch)), 1)
    warmup = int(round(args.warmup_epochs * self.steps_per_epoch))
    warmup = min(max(warmup, 1), self.total_steps - 1)  # ≥ 1: optax logs about a 0-step warm-up
    self.pool = args.pool or config.model.pool
    encoder = restored.modules.encoder.clone(drop_path=float(args.drop_path))
    self.model = Classifier(encoder, config.num_classes, self.pool)

    size = config.image_size
    self.abstract_params = jax.eval_shape(
        self.model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))['params']
    self.tx, self.lr_fn = make_optimizer(args, self.abstract_params, encoder.depth,
                                         self.total_steps, warmup)

    abstract = jax.eval_shape(self._new_state, self.abstract_params)
    shardings = sharding.state_shardings(abstract, self.mesh, config.sharding.fsdp)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    self.state_sharding = shardings
    batch = sharding.batch_sharding(self.mesh)
    self.step = jax.jit(self._train_step, in_shardings=(shardings, batch),
                        out_shardings=(shardings, sharding.replicated(self.mesh)),
                        donate_argnums=(0,))
    self.logits = jax.jit(lambda params, images: self.model.apply({'params': params}, images),
                          in_shardings=(None, batch), out_shardings=batch)

  def _new_state(self, params):
    return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                rng=jax.random.PRNGKey(self.args.seed))

  def init_state(self):
    """The pre-trained encoder with a fresh head, or everything fresh with from_scratch."""
    size = self.restored.config.image_size
    init_rng = jax.random.fold_in(jax.random.PRNGKey(self.args.seed), 1)
    params = self.model.init(init_rng, jnp.zeros((1, size, size, 3)))['params']
    if not self.args.from_scratch:
      params = dict(params, encoder=self.restored.encoder_params)
    params = jax.device_put(params, self.state_sharding['params'])
    return jax.jit(self._new_state, out_shardings=self.state_sharding)(params)

  def _train_step(self, state, batch):
    a = self.args
    rng = jax.random.fold_in(state['rng'], state['step'])
    mix_rng, drop_rng = jax.random.split(rng)
    onehot = jax.nn.one_hot(batch['label'], self.restored.config.num_classes)
    targets = optax.smooth_labels(onehot, a.label_smoothing) if a.label_smoothing else onehot
    images, targets = mix(mix_rng, batch['view1'], targets, a.mixup, a.cutmix)

    def loss_fn(params):
      logits = self.model.apply({'params': params}, images, train=True, rngs={'dropout': drop_rng})
      return optax.softmax_cross_entropy(logits, targets).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    updates, opt_state = self.tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    new = dict(state, step=state['step'] + 1, params=params, opt_state=opt_state)
    metrics = dict(loss=loss, train_top1=(logits.argmax(-1) == batch['label']).mean(),
                   grad_norm=optax.tree.norm(grads), lr=self.lr_fn(state['step']))
    return new, metrics

  def evaluate(self, params, split: str) -> dict:
    from macrl_jax import input_pipeline
    config = self.restored.config
    b = evaluation.eval_batch_size(config, self.mesh, self.args.eval_batch_size)
    batches = input_pipeline.create_eval_iterator(config, split,
                                                  batch_size=b // jax.process_count())
    logits, labels = knn.extract(self.logits, params, batches, self.mesh)
    return {'top1': evaluation.topk_accuracy(logits, labels, 1),
            'top5': evaluation.topk_accuracy(logits, labels, 5)}


def _check_same_args(mngr, args, where: str) -> None:
  steps = mngr.all_steps()
  if not steps:
    return
  saved = checkpoint.read_meta(mngr, max(steps)).get('finetune', {})
  differ = sorted(k for k in _FIXED if saved.get(k) != args.get(k))
  if differ:
    raise WorkdirError(
        f'{where} holds a fine-tune with other arguments '
        f'({", ".join(f"{k}={saved.get(k)}" for k in differ)}); resume it with those, or pass '
        f'another --name to start a new one beside it')


def finetune(restored: Restored, args, name: str = 'finetune') -> dict:
  """Fine-tunes (or resumes fine-tuning) in `<workdir>/<name>`; returns the test top-1/top-5."""
  from macrl_jax import input_pipeline, train  # TensorFlow; train for its SIGTERM handler
  config = restored.config
  ft_config = data_config(config, args)
  num_train = input_pipeline.num_examples(config, config.train_split)
  ft = Finetuner(restored, args, num_train)
  ft_dir = os.path.join(restored.workdir, name)
  is_main = jax.process_index() == 0

  mngr = checkpoint.manager(ft_dir, keep=2)
  _check_same_args(mngr, args, ft_dir)
  restored_ft = checkpoint.restore_latest(mngr, ft.abstract_state)
  if restored_ft is None:
    state, start = ft.init_state(), 0
  else:
    state, saved = restored_ft
    start = int(saved['step'])
    logging.info('Resumed fine-tuning from step %d of %s', start, ft_dir)
  meta = {'finetune': args.to_dict(), 'pretrain_step': restored.step, 'data_position': 0}
  log = train.MetricsLog(ft_dir, is_main)

  batches = prefetch.prefetch_to_mesh(
      input_pipeline.create_pretrain_iterator(ft_config, start_step=start), ft.mesh)
  step, history, t0 = start, [], time.time()

  def flush():
    """Logs the mean metrics since the last flush; raises on a non-finite loss (before a save)."""
    nonlocal history, t0
    if not history:
      return
    record = {k: float(np.mean([m[k] for m in jax.device_get(history)])) for k in history[0]}
    if not np.isfinite(record['loss']):
      raise FloatingPointError(f'non-finite fine-tuning loss before step {step}: {record}; lower '
                               f'--base_lr')
    record.update(step=step, images_per_sec=len(history) * args.batch_size / (time.time() - t0))
    log.write(record)
    logging.info('fine-tune step %d/%d: %s', step, ft.total_steps, record)
    history, t0 = [], time.time()

  with train._Preemption() as preemption:  # noqa: SLF001 - the train program's SIGTERM flag
    while step < ft.total_steps:
      state, metrics = ft.step(state, next(batches))
      step += 1
      # At most two steps in flight. Dispatching hundreds ahead deadlocks XLA:CPU's collectives
      # with several host devices (some device threads never reach the all-reduce).
      if history:
        jax.block_until_ready(history[-1])
      history.append(metrics)
      last = step == ft.total_steps
      if step % args.log_every_steps == 0 or last:
        flush()
      stop = preemption.requested or mngr.reached_preemption(step)
      if step % args.checkpoint_every_steps == 0 or last or stop:
        flush()
        checkpoint.save(mngr, step, state, dict(meta, data_position=step))
      if stop:
        logging.warning('Stopped by preemption at fine-tuning step %d; rerun to resume.', step)
        break
  mngr.wait_until_finished()
  mngr.close()

  result = dict(step=step, total_steps=ft.total_steps, pretrain_step=restored.step,
                preempted=step < ft.total_steps, pool=ft.pool)
  if step == ft.total_steps:
    result.update(ft.evaluate(state['params'], config.test_split))
    log.write({'step': step, **{f'test_{k}': v for k, v in result.items()
                                if k in ('top1', 'top5')}})
  if is_main:
    with open(os.path.join(ft_dir, 'args.json'), 'w') as f:
      json.dump(args.to_dict(), f, indent=2, sort_keys=True)
  return result
