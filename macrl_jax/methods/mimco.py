"""MimCo: a masked student predicts a frozen contrastive teacher's features.

The teacher is any mocov3 or macrl workdir of this codebase, or a PyTorch file in MoCo v3's layout
(run/teacher.py finds, checks and loads it). Its encoder and projector (momentum or online) are carried
in the student's train state under `state['teacher']`: they are saved with the student's
checkpoints (so a MimCo workdir is self-contained for the tools) but are no part of `params`, so
they get no gradient and no optimizer state, and the step returns them untouched.

This module is the model side: the teacher's config and modules, the student's modules, state and
step. The teacher's architecture comes from `config.teacher.spec` (filled by teacher.resolve).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from macrl_jax.config import methods, schema
from macrl_jax.methods import losses, networks, optim, train_step
from macrl_jax.methods.train_step import dropout_rng
from macrl_jax.models import decoders, heads, vit

# ----------------------------------------------------------------------------------- the teacher
# The parts of a contrastive train state that the teacher keeps, by collection.
TEACHER_PARTS = {'params': ('encoder', 'projector'), 'batch_stats': ('projector',)}


def teacher_config(config) -> ml_collections.ConfigDict:
  """The teacher's own config, enough to build its modules (from config.teacher.spec)."""
  spec = config.teacher.spec
  if spec is None:
    raise ValueError('config.teacher.spec is not filled: call teacher.resolve(config) first')
  c = schema.base_config()
  methods.apply_method(c, spec.method)
  c.image_size = spec.image_size
  c.model = ml_collections.ConfigDict(spec.model.to_dict())
  c.dtype = config.dtype
  return c


def teacher_modules(config) -> networks.Modules:
  return networks.make_modules(teacher_config(config))


# ----------------------------------------------------------------------------------- the student
def make_modules(config) -> networks.Modules:
  """The student: encoder, a decoder predicting a teacher-width feature per patch, and an
  image-level head (in the projector slot) to the teacher's proj_dim."""
  teacher = teacher_modules(config)
  student = networks.make_modules(config)  # the encoder only, for method=mimco
  m = config.model
  num_patches = (config.image_size // student.encoder.patch_size) ** 2
  dtype = jnp.dtype(config.dtype)
  decoder = decoders.Decoder(num_patches, m.decoder_width, m.decoder_depth, m.decoder_heads,
                           teacher.encoder.width, dtype)
  head = heads.MLPHead(m.proj_hidden, teacher.projector.out, 3, dtype)
  return networks.Modules(student.encoder, decoder, head, None)


def init_state(config, modules: networks.Modules, tx: optax.GradientTransformation,
               rng: jax.Array) -> dict[str, Any]:
  """The student's state of train_step.init_state, and under 'teacher' a placeholder of the
  teacher's shapes, which the program replaces with the restored teacher."""
  state = train_step.init_state(config, modules, tx, rng)
  v = networks.init_variables(teacher_modules(config), teacher_config(config),
                            jax.random.split(rng, 3)[2])
  state['teacher'] = {c: {k: v[c][k] for k in keys} for c, keys in TEACHER_PARTS.items()}
  return state


def make_train_step(config, modules: networks.Modules, tx: optax.GradientTransformation,
                    lr_fn: optax.Schedule) -> Callable:
  """Returns train_step(state, batch) -> (state, metrics); pure, for the caller to jit."""
  enc, dec, head = modules.encoder, modules.decoder, modules.projector
  teacher = teacher_modules(config)
  num_patches = (config.image_size // enc.patch_size) ** 2
  keep = vit.num_visible(num_patches, config.mask_ratio_strong)
  teacher_pool = config.teacher.spec.model.pool
  mc = config.mimco

  def teacher_targets(variables, x):
    """The teacher on the whole view: its patch tokens and its projected pooled feature."""
    tokens = teacher.encoder.apply({'params': variables['params']['encoder']}, x)
    image = teacher.projector.apply(
        {'params': variables['params']['projector'],
         'batch_stats': variables['batch_stats']['projector']},
        vit.pool(tokens, teacher_pool), train=False)
    return jax.lax.stop_gradient(tokens[:, 1:]), jax.lax.stop_gradient(image)

  def loss_fn(params, batch_stats, x, mask, targets, rng):
    t_patch, t_image = targets
    z = enc.apply({'params': params['encoder']}, x, mask.ids_keep, train=True,
                  rngs={'dropout': rng})
    pred = dec.apply({'params': params['decoder']}, z, mask.ids_restore)
    ids_masked = jnp.argsort(mask.ids_restore, axis=1)[:, keep:]  # ids_shuffle's masked part
    l_patch, acc_patch = losses.patch_infonce(pred, t_patch, ids_masked, mc.tau_patch,
                                              mc.patch_negatives)
    q, up = head.apply({'params': params['projector'], 'batch_stats': batch_stats['projector']},
                       vit.pool(z, config.model.pool), mutable=['batch_stats'])
    l_img, acc_img = losses.infonce(q, t_image, mc.tau_img)
    l_img = l_img / (2 * mc.tau_img)  # plain InfoNCE, like the patch term
    total = l_patch + mc.lambda_img * l_img
    terms = dict(loss=total, loss_patch=l_patch, loss_img=l_img, patch_acc=acc_patch,
                 img_acc=acc_img)
    return total, (terms, {'projector': up['batch_stats']})

  def train_step(state: dict[str, Any], batch: dict) -> tuple[dict, dict]:
    step = state['step']
    rng = jax.random.fold_in(state['rng'], step)
    x = batch['view1']
    mask = vit.random_masking(jax.random.fold_in(rng, 0), x.shape[0], num_patches,
                                 config.mask_ratio_strong)
    targets = teacher_targets(state['teacher'], x)
    grads, (terms, batch_stats) = jax.grad(loss_fn, has_aux=True)(
        state['params'], state['batch_stats'], x, mask, targets, dropout_rng(rng, 0))
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    new = dict(state, step=step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    norms = dict(loss=terms['loss'], grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(params))
    new, skipped = optim.guard_non_finite(new, state, norms)
    metrics = dict(terms, **norms, lr=lr_fn(step), skipped=skipped)
    return new, metrics

  return train_step
