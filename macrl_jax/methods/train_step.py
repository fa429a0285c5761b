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
  return TwoViewStep(config, modules, tx, lr_fn)


def dropout_rng(rng: jax.Array, view: int) -> jax.Array:
  """The stochastic-depth key of `view`'s online encoder: its own stream of the step's key, apart
  from the masks' fold_in(rng, view)."""
  return jax.random.fold_in(rng, 100 + view)


class TwoViewStep:
  """One step of macrl, mae or mocov3: the views' masks, the momentum branch's keys (outside the
  gradient), the online branch's losses and their gradient, then the optimizer, EMA and memory
  bank updates, with non-finite steps refused."""

  def __init__(self, config, modules: networks.Modules, tx: optax.GradientTransformation,
               lr_fn: optax.Schedule):
    self.config, self.modules, self.tx, self.lr_fn = config, modules, tx, lr_fn
    self.num_patches = (config.image_size // modules.encoder.patch_size) ** 2
    self.ratios = schema.view_mask_ratios(config)
    self.rec, self.con = schema.uses_reconstruction(config), schema.uses_contrastive(config)

  def __call__(self, state: State, batch: dict) -> tuple[State, dict]:
    c, step = self.config, state['step']
    rng = jax.random.fold_in(state['rng'], step)
    views = [batch['view1'], batch.get('view2')][:c.num_views]
    # What each view reconstructs: itself, or (rec_target='clean') its undistorted crop.
    targets = [batch.get(f'view{v + 1}_target', x) for v, x in enumerate(views)]
    # One random mask per view and per image.
    masks = [vit.random_masking(jax.random.fold_in(rng, v), views[0].shape[0], self.num_patches, r)
             if r > 0 else None for v, r in enumerate(self.ratios)]
    # The EMA after step t takes m(t + 1), as MoCo v3 updates its momentum encoder at the start
    # of iteration t + 1 with that iteration's momentum.
    m = momentum_at(step + 1, c.total_steps, c.momentum_base)
    keys, ema_stats = self.momentum_keys(state, views, masks) if self.con else (None, None)
    grads, (terms, batch_stats) = jax.grad(self.loss, has_aux=True)(
        state['params'], state, views, targets, masks, keys, rng)
    new = self.updated(state, grads, batch_stats, ema_stats, keys, m)
    norms = dict(loss=terms['loss'], grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(new['params']))
    new, skipped = optim.guard_non_finite(new, state, norms)
    return new, dict(terms, **norms, lr=self.lr_fn(step), momentum=m, skipped=skipped)

  def momentum_keys(self, state: State, views: list, masks: list) -> tuple[list, dict]:
    """k_i = P'(pool(E'(x_i))) of each view, and the momentum projector's BatchNorm statistics."""
    enc, proj = self.modules.encoder, self.modules.projector
    ema, ema_stats, keys = state['ema_params'], state['ema_batch_stats'], []
    for x, mask in zip(views, key_masks(self.config.key_mask, masks)):
      z = enc.apply({'params': ema['encoder']}, x, None if mask is None else mask.ids_keep)
      k, up = proj.apply({'params': ema['projector'], 'batch_stats': ema_stats['projector']},
                         vit.pool(z, self.config.model.pool), mutable=['batch_stats'])
      ema_stats = {'projector': up['batch_stats']}
      keys.append(jax.lax.stop_gradient(k))
    return keys, ema_stats

  def loss(self, params, state: State, views, targets, masks, keys, rng):
    """(the weighted loss, (its terms, the online heads' BatchNorm statistics))."""
    batch_stats, rec_losses, qs = state['batch_stats'], [], []
    for v, (x, target, mask) in enumerate(zip(views, targets, masks)):
      z = self.modules.encoder.apply(
          {'params': params['encoder']}, x, None if mask is None else mask.ids_keep, train=True,
          rngs={'dropout': dropout_rng(rng, v)})
      if self.rec and mask is not None:
        rec_losses.append(self.reconstruction_loss(params, z, target, mask))
      if self.con:
        q, batch_stats = self.query(params, batch_stats, z, mask)
        qs.append(q)
    terms, total = {}, 0.0
    if self.rec:
      total += self.weighted_reconstruction(terms, rec_losses, state['step'])
    if self.con:
      total += self.weighted_contrastive(terms, qs, keys, state.get('queue'))
    terms['loss'] = total
    return total, (terms, batch_stats)

  def reconstruction_loss(self, params, z, target, mask):
    c = self.config
    recon = self.modules.decoder.apply({'params': params['decoder']}, z, mask.ids_restore)
    return losses.reconstruction_loss(recon, vit.patchify(target, self.modules.encoder.patch_size),
                                      mask.mask, norm_pix=c.norm_pix_loss, kind=c.rec_loss)

  def query(self, params, batch_stats, z, mask):
    """q = Q(P(pool(z))), the masked tokens completed first by the feature decoder (CMAE) when
    there is one; and the online heads' updated BatchNorm statistics."""
    proj, pred, fdec = self.modules.projector, self.modules.predictor, self.modules.feature_decoder
    if fdec is not None and mask is not None:
      z = fdec.apply({'params': params['feature_decoder']}, z, mask.ids_restore)
    h, up = proj.apply({'params': params['projector'], 'batch_stats': batch_stats['projector']},
                       vit.pool(z, self.config.model.pool), mutable=['batch_stats'])
    q, up2 = pred.apply({'params': params['predictor'], 'batch_stats': batch_stats['predictor']},
                        h, mutable=['batch_stats'])
    return q, {'projector': up['batch_stats'], 'predictor': up2['batch_stats']}

  def weighted_reconstruction(self, terms: dict, rec_losses: list, step):
    c = self.config
    terms['loss_rec'] = sum(rec_losses) / len(rec_losses)
    lambda_rec = c.lambda_rec
    if c.lambda_rec_schedule != 'constant':
      lambda_rec *= lambda_rec_factor(step, c.total_steps, c.lambda_rec_schedule)
      terms['lambda_rec'] = lambda_rec
    return lambda_rec * terms['loss_rec']

  def weighted_contrastive(self, terms: dict, qs: list, keys: list, queue):
    """The symmetric InfoNCE: each view's query against the other view's key."""
    t = self.config.temperature
    l12, a12 = losses.infonce(qs[0], keys[1], t, queue)
    l21, a21 = losses.infonce(qs[1], keys[0], t, queue)
    terms['loss_con'], terms['con_acc'] = l12 + l21, (a12 + a21) / 2
    return self.config.lambda_con * terms['loss_con']

  def updated(self, state: State, grads, batch_stats, ema_stats, keys, m) -> State:
    """The state after the optimizer's update, the momentum networks' EMA and the memory bank."""
    updates, opt_state = self.tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    new = dict(state, step=state['step'] + 1, params=params, batch_stats=batch_stats,
               opt_state=opt_state)
    if self.con:
      online = {k: params[k] for k in state['ema_params']}
      new['ema_params'] = jax.tree.map(lambda e, o: m * e + (1.0 - m) * o,
                                       state['ema_params'], online)
      new['ema_batch_stats'] = ema_stats
      if 'queue' in state:
        new['queue'], new['queue_ptr'] = losses.enqueue(
            state['queue'], state['queue_ptr'], jnp.concatenate(keys))
    return new
