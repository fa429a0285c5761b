"""MimCo: a masked student predicts a frozen contrastive teacher's features.

The teacher is any mocov3 or macrl workdir of this codebase, or a PyTorch file in MoCo v3's layout
(config.teacher.checkpoint, read by interop_files). Its encoder and projector (momentum or
online) are restored once and carried in the student's train state under `state['teacher']`: they
are saved with the student's checkpoints (so a MimCo workdir is self-contained for the tools) but
are no part of `params`, so they get no gradient and no optimizer state, and the step returns them
untouched.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from macrl_jax import checkpoint, losses, methods, models, optim, presets
from macrl_jax.errors import MissingFileError, UserError


# ----------------------------------------------------------------------------------- the teacher
def resolve_teacher(config) -> None:
  """Fills `config.teacher.spec` from the teacher workdir's config.json and checks compatibility.

  Raises with a clear message for a missing workdir or checkpoint, or a teacher whose patch size or
  image size differs from the student's. A config whose spec is already filled (a MimCo workdir's
  own config.json, read by the tools) is left as it is.
  """
  if config.teacher.spec is not None:
    return
  if config.teacher.get('checkpoint'):
    _resolve_teacher_file(config)
    return
  workdir = config.teacher.workdir
  path = os.path.join(workdir, 'config.json')
  if not os.path.isdir(workdir):
    raise MissingFileError(f'config.teacher.workdir: {workdir} does not exist. Pre-train the teacher '
                            'first, e.g. python main.py --config=configs/digits.py:method=mocov3 '
                            f'--workdir={workdir}')
  if not os.path.exists(path):
    raise MissingFileError(f'config.teacher.workdir: {workdir} has no config.json; is it a workdir '
                            'of this codebase?')
  with open(path) as f:
    teacher = ml_collections.ConfigDict(json.load(f))
  if teacher.method not in ('mocov3', 'macrl'):
    raise UserError(f'config.teacher.workdir: {workdir} was trained with method={teacher.method}; '
                     'a MimCo teacher must be contrastive (mocov3 or macrl)')
  mngr = checkpoint.manager(workdir)
  steps = mngr.all_steps()
  mngr.close()
  if not steps:
    raise MissingFileError(f'config.teacher.workdir: {workdir} has no checkpoint in '
                            f'{os.path.join(workdir, "checkpoints")}; its pre-training has not saved yet')
  student_patch = models.vit_dims(config.model)['patch_size']
  teacher_patch = models.vit_dims(teacher.model)['patch_size']
  if student_patch != teacher_patch:
    raise UserError(
        f'config.teacher.workdir: the teacher has patch size {teacher_patch} (variant '
        f'{teacher.model.variant!r}) but the student has patch size {student_patch} (variant '
        f'{config.model.variant!r}); MimCo matches their tokens position by position, so use a '
        f'student variant with patch {teacher_patch}')
  if teacher.image_size != config.image_size:
    raise UserError(f'config.image_size: the teacher was trained at {teacher.image_size} px, the '
                     f'student at {config.image_size} px; their token grids must match')
  config.teacher.spec = ml_collections.ConfigDict(dict(
      method=teacher.method, image_size=teacher.image_size, model=teacher.model.to_dict()))


def _resolve_teacher_file(config) -> None:
  """A PyTorch teacher (MoCo v3 layout): built with the student's model fields, cls-pooled as in
  MoCo v3. Reading it here checks every shape before anything compiles."""
  spec = ml_collections.ConfigDict(dict(method='mocov3', image_size=config.image_size,
                                        model=dict(config.model.to_dict(), pool='cls')))
  config.teacher.spec = spec
  _read_teacher_file(config)


def _read_teacher_file(config) -> dict:
  from macrl_jax import interop_files  # only with a file to read (it may need torch)
  path = config.teacher.checkpoint
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config.teacher.checkpoint: {path} does not exist')
  variables = interop_files.load_variables(path, teacher_config(config),
                                           encoder=config.teacher.params,
                                           interpolate_pos=config.init_interpolate_pos,
                                           parts=('encoder', 'projector'))
  if 'projector' not in variables['params']:
    raise ValueError(f'config.teacher.checkpoint: {path} has no projector; a MimCo teacher needs '
                     "MoCo v3's layout (module.base_encoder.head.* / module.momentum_encoder.head.*)")
  return variables


def teacher_config(config) -> ml_collections.ConfigDict:
  """The teacher's own config, enough to build its modules (from config.teacher.spec)."""
  spec = config.teacher.spec
  c = presets.base_config()
  methods.apply_method(c, spec.method)
  c.image_size = spec.image_size
  c.model = ml_collections.ConfigDict(spec.model.to_dict())
  c.dtype = config.dtype
  return c


def _teacher_parts(config, mesh) -> dict:
  """The parts of the teacher's train state MimCo uses, as ShapeDtypeStructs laid out on `mesh`.

  Only these are restored: the rest of the teacher's state (optimizer, queue, ...) may be of any
  shape, e.g. a teacher trained with queue_size > 0.
  """
  from macrl_jax import train_step  # the teacher's state layout is the one train_step builds
  trainer = train_step.Trainer(teacher_config(config), mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          trainer.abstract_state, trainer.state_sharding)
  if config.teacher.params == 'momentum':
    return {k: abstract[k] for k in ('ema_params', 'ema_batch_stats')}
  return {'params': {k: abstract['params'][k] for k in ('encoder', 'projector')},
          'batch_stats': {'projector': abstract['batch_stats']['projector']}}


def _restore_teacher(config, mesh, read_arrays: bool):
  parts = _teacher_parts(config, mesh)
  mngr = checkpoint.manager(config.teacher.workdir)
  try:
    if not read_arrays:  # the shapes of the chosen checkpoint only
      step = config.teacher.step
      step = max(mngr.all_steps()) if step is None else step
      meta = checkpoint.read_meta(mngr, step)
      where = os.path.join(config.teacher.workdir, 'checkpoints', str(step))
      checkpoint.check_compatible(meta, where, parts, partial=True)
      return None
    restored = checkpoint.restore_latest(mngr, parts, config.teacher.step, partial=True)
  finally:
    mngr.close()
  if restored is None:
    raise UserError(f'config.teacher.workdir: no readable checkpoint in '
                    f'{os.path.join(config.teacher.workdir, "checkpoints")}')
  return restored[0]


def check_teacher_checkpoint(config) -> None:
  """Checks, without reading arrays, that the teacher's checkpoint holds the parts MimCo needs."""
  if config.teacher.get('checkpoint'):
    return  # a PyTorch file: read and checked whole by resolve_teacher
  from macrl_jax import sharding
  _restore_teacher(config, sharding.make_mesh(), read_arrays=False)


def load_teacher(config, mesh) -> dict:
  """The teacher's frozen variables {'params': {encoder, projector}, 'batch_stats': {projector}}."""
  if config.teacher.get('checkpoint'):
    return _read_teacher_file(config)
  state = _restore_teacher(config, mesh, read_arrays=True)
  if config.teacher.params == 'momentum':
    return {'params': state['ema_params'], 'batch_stats': state['ema_batch_stats']}
  return state


# ----------------------------------------------------------------------------------- the student
def make_modules(config) -> tuple[models.Modules, models.Modules]:
  """(student, teacher) modules. The student: encoder, a decoder predicting a teacher-width
  feature per patch, and an image-level head (in the projector slot) to the teacher's proj_dim."""
  teacher = models.make_modules(teacher_config(config))
  student = models.make_modules(config)  # the encoder only, for method=mimco
  m = config.model
  num_patches = (config.image_size // student.encoder.patch_size) ** 2
  dtype = jnp.dtype(config.dtype)
  decoder = models.Decoder(num_patches, m.decoder_width, m.decoder_depth, m.decoder_heads,
                           teacher.encoder.width, dtype)
  head = models.MLPHead(m.proj_hidden, teacher.projector.out, 3, dtype)
  return models.Modules(student.encoder, decoder, head, None), teacher


def make_train_step(config, modules: models.Modules, teacher: models.Modules,
                    tx: optax.GradientTransformation, lr_fn: optax.Schedule) -> Callable:
  enc, dec, head, _ = modules
  num_patches = (config.image_size // enc.patch_size) ** 2
  keep = presets.num_visible(num_patches, config.mask_ratio_strong)
  teacher_pool = config.teacher.spec.model.pool
  mc = config.mimco

  def teacher_targets(variables, x):
    """The teacher on the whole view: its patch tokens and its projected pooled feature."""
    tokens = teacher.encoder.apply({'params': variables['params']['encoder']}, x)
    image = teacher.projector.apply(
        {'params': variables['params']['projector'],
         'batch_stats': variables['batch_stats']['projector']},
        models.pool(tokens, teacher_pool), train=False)
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
                       models.pool(z, config.model.pool), mutable=['batch_stats'])
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
    mask = models.random_masking(jax.random.fold_in(rng, 0), x.shape[0], num_patches,
                                 config.mask_ratio_strong)
    targets = teacher_targets(state['teacher'], x)
    grads, (terms, batch_stats) = jax.grad(loss_fn, has_aux=True)(
        state['params'], state['batch_stats'], x, mask, targets, jax.random.fold_in(rng, 100))
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    new = dict(state, step=step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    norms = dict(loss=terms['loss'], grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(params))
    new, skipped = optim.guard_non_finite(new, state, norms)
    metrics = dict(terms, **norms, lr=lr_fn(step), skipped=skipped)
    return new, metrics

  return train_step
