"""The checks a config passes before anything is built or compiled.

`validate(config, num_devices)` is called by the train program (and the benchmark) before the model
is built, so that a bad value fails with a message naming the field instead of a shape error from
inside XLA or a run that trains to nothing.
"""

from __future__ import annotations

import math
import os

import ml_collections

from macrl_jax.config import methods, schema
from macrl_jax.errors import bad_field
from macrl_jax.models import vit

_FILE_SUFFIXES = ('.safetensors', '.pth', '.pth.tar', '.pt', '.tar', '.bin')


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises UserError naming the offending field."""
  methods.check_method(c)  # first: the rest may rely on the fields a method fixes (num_views)
  _check_model(c)
  _check_choices(c)
  _check_masking(c)
  _check_files(c)
  _check_batches(c, num_devices)
  _check_numbers(c)
  _check_evals(c)


def _check_model(c) -> None:
  dims = vit.vit_dims(c.model)
  p = dims['patch_size']
  if c.image_size <= 0 or c.image_size % p:
    raise bad_field('image_size', f'{c.image_size} is not divisible by the patch size {p} of '
                    f'variant {c.model.variant!r}; pick an image size that is a multiple of {p} or '
                    'another patch size')
  if dims['width'] % dims['num_heads']:
    raise bad_field('model.width',
                    f'{dims["width"]} is not divisible by num_heads={dims["num_heads"]}')
  if c.model.decoder_width % c.model.decoder_heads:
    raise bad_field('model.decoder_width', f'{c.model.decoder_width} is not divisible by '
                    f'decoder_heads={c.model.decoder_heads}')


def _check_choices(c) -> None:
  """Fields that take one of a few values."""
  for field, value, allowed in (('model.pool', c.model.pool, ('cls', 'mean')),
                                ('key_mask', c.key_mask, ('none', 'same', 'query')),
                                ('lambda_rec_schedule', c.lambda_rec_schedule,
                                 ('constant', 'linear_up', 'linear_down', 'cosine_up',
                                  'cosine_down')),
                                ('rec_target', c.rec_target, ('view', 'clean')),
                                ('rec_loss', c.rec_loss, ('l1', 'l2'))):
    if value not in allowed:
      options = ', '.join(f'"{a}"' for a in allowed)
      raise bad_field(field, f'{value!r} is not one of {options}')
  if c.dtype not in ('float32', 'bfloat16', 'float16'):
    raise bad_field('dtype', f'{c.dtype!r} is not one of float32, bfloat16, float16')


def _check_masking(c) -> None:
  num_patches = (c.image_size // vit.vit_dims(c.model)['patch_size']) ** 2
  for field in ('mask_ratio_strong', 'mask_ratio_weak')[:c.num_views]:
    r = c[field]
    if not 0.0 <= r < 1.0:
      raise bad_field(field, f'{r} is outside [0, 1)')
    if vit.num_visible(num_patches, r) < 1:
      raise bad_field(field, f'{r} leaves no visible patch of the {num_patches} patches; lower it')
  if schema.uses_reconstruction(c) and not any(schema.view_mask_ratios(c)):
    raise bad_field('mask_ratio_strong',
                    f'method={c.method} reconstructs masked patches, but no view is masked')


def _check_files(c) -> None:
  for field, path in (('init', c.get('init')), ('teacher.checkpoint', c.teacher.get('checkpoint'))):
    if path and not path.endswith(_FILE_SUFFIXES):
      raise bad_field(field, f'{path!r} is not a .safetensors or PyTorch (.pth, .pth.tar) file')
    if path and not os.path.isfile(path):
      raise bad_field(field, f'{path} does not exist; pass the path of the file')


def _check_batches(c, num_devices: int | None) -> None:
  if c.queue_size < 0:
    raise bad_field('queue_size', f'{c.queue_size} must be >= 0')
  if c.queue_size and c.queue_size < c.num_views * c.batch_size:
    raise bad_field('queue_size', f'{c.queue_size} is smaller than the keys enqueued per step '
                    f'({c.num_views} views × batch_size {c.batch_size}); use 0 or at least that')
  if c.batch_size <= 0:
    raise bad_field('batch_size', f'{c.batch_size} must be > 0')
  if num_devices is not None and c.batch_size % num_devices:
    raise bad_field('batch_size', f'global batch {c.batch_size} is not divisible by the '
                    f'{num_devices} devices; use a multiple of {num_devices}')
  if num_devices is not None and c.knn.eval_batch_size % num_devices:
    raise bad_field('knn.eval_batch_size', f'{c.knn.eval_batch_size} is not divisible by the '
                    f'{num_devices} devices; use a multiple of {num_devices}')


def _check_numbers(c) -> None:
  """Values that would train without an error but to nothing (a negative rate, a decay above 1)."""
  if c.temperature <= 0:
    raise bad_field('temperature', f'{c.temperature} must be > 0')
  if not 0.0 <= c.momentum_base <= 1.0:
    raise bad_field('momentum_base', f'{c.momentum_base} is outside [0, 1]')
  if c.aug.blur_reference_size <= 0:
    raise bad_field('aug.blur_reference_size', f'{c.aug.blur_reference_size} must be > 0')
  if not 0.0 <= c.data.holdout_fraction < 1.0:
    raise bad_field('data.holdout_fraction', f'{c.data.holdout_fraction} is outside [0, 1)')
  for field in ('data.label_fraction', 'finetune.label_fraction'):
    value = c.data.label_fraction if field.startswith('data') else c.finetune.label_fraction
    if not 0.0 < value <= 1.0:
      raise bad_field(field, f'{value} is outside (0, 1]')
  if c.model.feature_decoder_depth < 0:
    raise bad_field('model.feature_decoder_depth', f'{c.model.feature_decoder_depth} must be >= 0')
  if c.total_steps <= 0:
    raise bad_field('total_steps', f'{c.total_steps} must be > 0')
  if c.optim.warmup_steps < 0 or c.optim.warmup_steps > c.total_steps:
    raise bad_field('optim.warmup_steps',
                    f'{c.optim.warmup_steps} must be in [0, total_steps={c.total_steps}]')

  def check(field, value, ok, want):  # also refuses NaN, inf and non-numbers
    if not (isinstance(value, (int, float)) and math.isfinite(value) and ok(value)):
      raise bad_field(field, f'{value} must be {want}')

  o = c.optim
  check('optim.base_lr', o.base_lr, lambda v: v > 0, '> 0')
  check('optim.min_lr', o.min_lr, lambda v: 0 <= v <= o.base_lr, f'in [0, base_lr={o.base_lr}]')
  check('optim.weight_decay', o.weight_decay, lambda v: v >= 0, '>= 0')
  if o.decay_params not in schema.DECAY_PARAMS:
    raise bad_field('optim.decay_params',
                    f'{o.decay_params!r} is not one of {", ".join(map(repr, schema.DECAY_PARAMS))}')
  check('model.cls_init_std', c.model.cls_init_std, lambda v: v >= 0, '>= 0')
  for field in ('b1', 'b2'):
    check(f'optim.{field}', o[field], lambda v: 0 <= v < 1, 'in [0, 1)')
  if o.grad_clip is not None:
    check('optim.grad_clip', o.grad_clip, lambda v: v > 0, '> 0 (or None for no clipping)')
  check('model.drop_path', c.model.drop_path, lambda v: 0 <= v < 1, 'in [0, 1)')
  check('knn.k', c.knn.k, lambda v: v >= 1, '>= 1')
  check('knn.temperature', c.knn.temperature, lambda v: v > 0, '> 0')
  for field in ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints'):
    check(field, c[field], lambda v: v >= 1, '>= 1')


EVALS = ('knn', 'reconstruction', 'masked_mse')  # evals/monitors.py


def _check_evals(c) -> None:
  unknown = sorted(set(c.evals) - set(EVALS))
  if unknown:
    raise bad_field('evals', f'unknown evaluation(s) {unknown}; known: {", ".join(EVALS)}')
  for name, spec in c.evals.items():
    if spec.every_steps is not None and spec.every_steps < 0:
      raise bad_field(f'evals.{name}.every_steps',
                      f'{spec.every_steps} must be >= 0 (0: off; None: eval_every_steps)')
  if c.evals.masked_mse.every_steps and not schema.uses_reconstruction(c):
    raise bad_field('evals.masked_mse.every_steps',
                    f'method={c.method} has no pixel decoder to evaluate; leave it 0')
