"""The train state and the one jitted step of macrl, mae and mocov3.

The state is a plain dict:
  step            int32 scalar
  params          online networks {'encoder', 'decoder'?, 'projector'?, 'predictor'?}
  batch_stats     BatchNorm statistics of the online heads
  opt_state       optax state of `params`
  rng             the run's key; step s uses fold_in(rng, s)
  ema_params      momentum networks {'encoder', 'projector'} (contrastive methods only)
  ema_batch_stats BatchNorm statistics of the momentum projector
  queue, queue_ptr  memory bank of past keys (only when queue_size > 0)
  teacher         MimCo only: the frozen teacher's variables (added by mimco.init_state)
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from macrl_jax.config import schema
from macrl_jax.methods import losses, networks, optim
from macrl_jax.models import vit

State = dict[str, Any]


def momentum_at(step, total_steps: int, base: float):
  """Cosine schedule of the EMA coefficient from `base` at step 0 to 1 at the last step (BYOL)."""
  frac = jnp.minimum(step / max(total_steps, 1), 1.0)
  return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * frac) + 1.0) / 2.0


def lambda_rec_factor(step, total_steps: int, schedule: str):
  """The multiplier of lambda_rec at `step` (config.lambda_rec_schedule): 1, or a ramp from 0 to 1
  ('*_up') or a decay from 1 to 0 ('*_down') over training, linear or half-cosine."""
  frac = jnp.minimum(step / max(total_steps, 1), 1.0)
  shape, direction = schedule.split('_')
  rising = frac if shape == 'linear' else (1.0 - jnp.cos(jnp.pi * frac)) / 2.0
  return rising if direction == 'up' else 1.0 - rising


def key_masks(key_mask: str, masks: list) -> list:
  """The mask of each view's momentum key (config.key_mask); None: the full view. The key of view
  v meets the query of the other view, so 'query' masks it with that view's mask."""
  return {'none': [None] * len(masks), 'same': list(masks), 'query': masks[::-1]}[key_mask]


def init_state(config, modules: networks.Modules, tx: optax.GradientTransformation,
               rng: jax.Array) -> State:
  init_rng, run_rng, queue_rng = jax.random.split(rng, 3)
  variables = networks.init_variables(modules, config, init_rng)
  params = variables['params']
  state = dict(step=jnp.zeros((), jnp.int32), params=params,
               batch_stats=variables['batch_stats'], opt_state=tx.init(params), rng=run_rng)
  if schema.uses_contrastive(config):
    # The momentum networks start as exact copies of the online ones (MoCo).
    state['ema_params'] = {k: params[k] for k in ('encoder', 'projector')}
    state['ema_batch_stats'] = {'projector': variables['batch_stats']['projector']}
    if config.queue_size:
      queue = jax.random.normal(queue_rng, (config.queue_size, config.model.proj_dim))
      state['queue'] = queue / jnp.linalg.norm(queue, axis=-1, keepdims=True)
      state['queue_ptr'] = jnp.zeros((), jnp.int32)
  return state


def make_train_step(config, modules: networks.Modules, tx: optax.GradientTransformation,
                    lr_fn: optax.Schedule) -> Callable[[State, dict], tuple]:
  """Returns train_step(state, batch) -> (state, metrics); pure, for the caller to jit."""
  enc, dec, proj, pred, fdec = modules
  patch = enc.patch_size
  num_patches = (config.image_size // patch) ** 2
  ratios = schema.view_mask_ratios(config)
  rec, con = schema.uses_reconstruction(config), schema.uses_contrastive(config)

  def heads(params, batch_stats, feats):
    """Online projector + predictor; returns q and the heads' updated BatchNorm statistics."""
    h, up = proj.apply({'params': params['projector'], 'batch_stats': batch_stats['projector']},
                       feats, mutable=['batch_stats'])
    q, up2 = pred.apply({'params': params['predictor'], 'batch_stats': batch_stats['predictor']},
                        h, mutable=['batch_stats'])
    return q, {'projector': up['batch_stats'], 'predictor': up2['batch_stats']}

  def momentum_keys(state, views, masks):
    """k_i = P'(pool(E'(x_i))): the momentum branch, outside the gradient."""
    ema, ema_stats, keys = state['ema_params'], state['ema_batch_stats'], []
    for x, mask in zip(views, key_masks(config.key_mask, masks)):
      ids = None if mask is None else mask.ids_keep
      z = enc.apply({'params': ema['encoder']}, x, ids)
      k, up = proj.apply({'params': ema['projector'], 'batch_stats': ema_stats['projector']},
                         vit.pool(z, config.model.pool), mutable=['batch_stats'])
      ema_stats = {'projector': up['batch_stats']}
      keys.append(jax.lax.stop_gradient(k))
    return keys, ema_stats

  def loss_fn(params, state, views, targets, masks, keys, rng):
    batch_stats, terms, rec_losses, qs = state['batch_stats'], {}, [], []
    for v, (x, target, mask) in enumerate(zip(views, targets, masks)):
      z = enc.apply({'params': params['encoder']}, x, None if mask is None else mask.ids_keep,
                    train=True, rngs={'dropout': jax.random.fold_in(rng, 100 + v)})
      if rec and mask is not None:
        recon = dec.apply({'params': params['decoder']}, z, mask.ids_restore)
        rec_losses.append(losses.reconstruction_loss(
            recon, vit.patchify(target, patch), mask.mask, norm_pix=config.norm_pix_loss,
            kind=config.rec_loss))
      if con:
        if fdec is not None and mask is not None:  # complete the masked tokens first (CMAE)
          z = fdec.apply({'params': params['feature_decoder']}, z, mask.ids_restore)
        q, batch_stats = heads(params, batch_stats, vit.pool(z, config.model.pool))
        qs.append(q)
    total = 0.0
    if rec:
      terms['loss_rec'] = sum(rec_losses) / len(rec_losses)
      lambda_rec = config.lambda_rec
      if config.lambda_rec_schedule != 'constant':
        lambda_rec *= lambda_rec_factor(state['step'], config.total_steps,
                                        config.lambda_rec_schedule)
        terms['lambda_rec'] = lambda_rec
      total += lambda_rec * terms['loss_rec']
    if con:
      queue = state.get('queue')
      l12, a12 = losses.infonce(qs[0], keys[1], config.temperature, queue)
      l21, a21 = losses.infonce(qs[1], keys[0], config.temperature, queue)
      terms['loss_con'], terms['con_acc'] = l12 + l21, (a12 + a21) / 2
      total += config.lambda_con * terms['loss_con']
    terms['loss'] = total
    return total, (terms, batch_stats)

  def train_step(state: State, batch: dict) -> tuple[State, dict]:
    step = state['step']
    rng = jax.random.fold_in(state['rng'], step)
    views = [batch['view1'], batch.get('view2')][:config.num_views]
    # What each view reconstructs: itself, or (rec_target='clean') its undistorted crop.
    targets = [batch.get(f'view{v + 1}_target', x) for v, x in enumerate(views)]
    size = views[0].shape[0]
    # One random mask per view and per image.
    masks = [vit.random_masking(jax.random.fold_in(rng, v), size, num_patches, r) if r > 0
             else None for v, r in enumerate(ratios)]
    # The EMA after step t takes m(t + 1), as MoCo v3 updates its momentum encoder at the start
    # of iteration t + 1 with that iteration's momentum.
    m = momentum_at(step + 1, config.total_steps, config.momentum_base)

    keys = ema_stats = None
    if con:
      keys, ema_stats = momentum_keys(state, views, masks)

    grad_fn = jax.grad(loss_fn, has_aux=True)
    grads, (terms, batch_stats) = grad_fn(state['params'], state, views, targets, masks, keys, rng)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)

    new = dict(state, step=step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    if con:
      online = {k: params[k] for k in state['ema_params']}
      new['ema_params'] = jax.tree.map(lambda e, o: m * e + (1.0 - m) * o,
                                       state['ema_params'], online)
      new['ema_batch_stats'] = ema_stats
      if 'queue' in state:
        new['queue'], new['queue_ptr'] = losses.enqueue(
            state['queue'], state['queue_ptr'], jnp.concatenate(keys))

    norms = dict(loss=terms['loss'], grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(params))
    new, skipped = optim.guard_non_finite(new, state, norms)
    metrics = dict(terms, **norms, lr=lr_fn(step), momentum=m, skipped=skipped)
    return new, metrics

  return train_step


