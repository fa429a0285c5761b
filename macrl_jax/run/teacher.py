"""MimCo's teacher: found and checked before the student is built, then loaded into its state.

The teacher is a mocov3 or macrl workdir (config.teacher.workdir, restored by restore.py as the
tools restore a checkpoint) or a PyTorch file in MoCo v3's layout (config.teacher.checkpoint, read
by interop/torch_files.py). `resolve` fills config.teacher.spec, the teacher's architecture, which the
student's modules need (methods/mimco.py); it is written into the student's config.json, so a MimCo
workdir is read later without its teacher.
"""

from __future__ import annotations

import os

import ml_collections

from macrl_jax.errors import MissingFileError, UserError
from macrl_jax.methods import mimco
from macrl_jax.models import vit
from macrl_jax.run import checkpoint, restore


def resolve(config, student_workdir: str | None = None) -> None:
  """Fills `config.teacher.spec` from the teacher's config.json (or file) and checks compatibility.

  Raises with a clear message for a missing workdir or checkpoint, or a teacher whose patch size or
  image size differs from the student's. Nothing to do for a method without a teacher, or a config
  whose spec is already filled (a MimCo workdir's own config.json). A student resuming in
  `student_workdir` takes the spec from its own config.json: its checkpoints hold the teacher's
  variables, so the teacher is not read again (and may have moved).
  """
  if config.method != 'mimco' or config.teacher.spec is not None:
    return
  if in_student_checkpoint(student_workdir):
    config.teacher.spec = restore.load_config(student_workdir).teacher.spec
    return
  if config.teacher.get('checkpoint'):
    _resolve_file(config)
    return
  path = config.teacher.workdir
  if not os.path.isdir(path):
    raise MissingFileError(f'config.teacher.workdir: {path} does not exist. Pre-train the teacher '
                           'first, e.g. python main.py --config=configs/digits.py:method=mocov3 '
                           f'--workdir={path}')
  if not os.path.exists(os.path.join(path, 'config.json')):
    raise MissingFileError(f'config.teacher.workdir: {path} has no config.json; is it a workdir '
                           'of this codebase?')
  teacher = restore.load_config(path)
  if teacher.method not in ('mocov3', 'macrl'):
    raise UserError(f'config.teacher.workdir: {path} was trained with method={teacher.method}; '
                    'a MimCo teacher must be contrastive (mocov3 or macrl)')
  if not checkpoint.steps(path):
    raise MissingFileError(f'config.teacher.workdir: {path} has no checkpoint in '
                           f'{os.path.join(path, "checkpoints")}; its pre-training has not saved '
                           'yet')
  student_patch = vit.vit_dims(config.model)['patch_size']
  teacher_patch = vit.vit_dims(teacher.model)['patch_size']
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


def in_student_checkpoint(student_workdir: str | None) -> bool:
  """Whether the student's workdir has a checkpoint, which holds the teacher, and the spec of
  that teacher in its config.json."""
  if not student_workdir or not checkpoint.steps(student_workdir):
    return False
  try:
    return restore.load_config(student_workdir).teacher.get('spec') is not None
  except ValueError:  # a UserError (no config.json) or a torn config.json
    return False


def _resolve_file(config) -> None:
  """A PyTorch teacher (MoCo v3 layout): built with the student's model fields, cls-pooled as in
  MoCo v3. Reading it here checks every shape before anything compiles."""
  config.teacher.spec = ml_collections.ConfigDict(dict(
      method='mocov3', image_size=config.image_size,
      model=dict(config.model.to_dict(), pool='cls')))
  _read_file(config)


def _read_file(config) -> dict:
  from macrl_jax.interop import torch_files  # only with a file to read (it may need torch)
  path = config.teacher.checkpoint
  if not os.path.isfile(path):
    raise MissingFileError(f'config.teacher.checkpoint: {path} does not exist; pass the path of a '
                           'MoCo v3 checkpoint (.pth.tar), or use --config.teacher.workdir')
  variables = torch_files.load_variables(path, mimco.teacher_config(config),
                                           encoder=config.teacher.params,
                                           interpolate_pos=config.init_interpolate_pos,
                                           parts=('encoder', 'projector'))
  if 'projector' not in variables['params']:
    raise UserError(f'config.teacher.checkpoint: {path} has no projector; a MimCo teacher needs '
                    "MoCo v3's layout (module.base_encoder.head.* / "
                    'module.momentum_encoder.head.*)')
  return variables


def _prefix(config) -> str:
  """The teacher's networks in its train state: the online ones, or the momentum ones (ema_*)."""
  return '' if config.teacher.params == 'online' else 'ema_'


def _saved_parts(config, mesh) -> dict:
  """The parts of the teacher's train state that MimCo uses, as ShapeDtypeStructs on `mesh`.

  Only these are restored: the rest of the teacher's state (optimizer, queue, ...) may be of any
  shape, e.g. a teacher trained with queue_size > 0.
  """
  abstract = restore.abstract_state(mimco.teacher_config(config), mesh)
  p = _prefix(config)
  return {p + c: {k: abstract[p + c][k] for k in keys} for c, keys in mimco.TEACHER_PARTS.items()}


def check_checkpoint(config, mesh, student_workdir: str | None = None) -> None:
  """Checks, reading shapes only, that the teacher's checkpoint holds the parts MimCo needs."""
  if (config.method != 'mimco' or config.teacher.get('checkpoint')
      or in_student_checkpoint(student_workdir)):
    return  # nothing to check, a PyTorch file (read and checked whole by resolve), or a resume
  restore.check_state(config.teacher.workdir, _saved_parts(config, mesh), config.teacher.step)


def load(config, mesh) -> dict:
  """The teacher's frozen variables {'params': {encoder, projector}, 'batch_stats': {projector}}."""
  if config.teacher.get('checkpoint'):
    return _read_file(config)
  state, _ = restore.restore_state(config.teacher.workdir, _saved_parts(config, mesh),
                                   config.teacher.step, partial=True)
  return {c: state[_prefix(config) + c] for c in mimco.TEACHER_PARTS}
