"""What each method is (METHOD_TABLE), and the augmentation presets that its recipe uses.

Per method:
- `fixed`: the fields that define the method; `check_method` refuses a config that overrides them.
- `recipe`: the method's published defaults (macrl's are ours); a config file or
  --config.FIELD=VALUE may change them after the method is applied.
- `trains`: the weights of the losses the method trains; each must stay > 0.
- `check` (optional): the method's other rules.
`apply_method` and `check_method` are each one loop over the method's entry.
"""

from __future__ import annotations

import ml_collections

from macrl_jax.errors import bad_field


def view_aug(**overrides) -> ml_collections.ConfigDict:
  """One view's augmentation; the defaults are BYOL's first view (MoCo v3's `augmentation1`)."""
  aug = ml_collections.ConfigDict(dict(
      crop_scale=(0.08, 1.0),
      crop_ratio=(3 / 4, 4 / 3),
      flip=True,
      color_jitter_prob=0.8,
      brightness=0.4,
      contrast=0.4,
      saturation=0.2,
      hue=0.1,
      grayscale_prob=0.2,
      blur_prob=1.0,
      blur_sigma=(0.1, 2.0),  # in pixels at aug.blur_reference_size, scaled to image_size
      solarize_prob=0.0,
  ))
  aug.update(overrides)
  return aug


def strong_aug() -> ml_collections.ConfigDict:
  """macrl's strongly corrupted view 1: BYOL's distortions, both blur and solarize (ours)."""
  return view_aug(crop_scale=(0.2, 1.0), solarize_prob=0.2)


def crop_flip_aug(min_scale: float) -> ml_collections.ConfigDict:
  """RandomResizedCrop(min_scale–1) and flip, no colour distortion (MAE's augmentation)."""
  return view_aug(crop_scale=(min_scale, 1.0), color_jitter_prob=0.0, grayscale_prob=0.0,
                  blur_prob=0.0, solarize_prob=0.0)


def weak_aug() -> ml_collections.ConfigDict:
  """macrl's weakly corrupted view 2 (and the mimco student's view): crop 0.5–1 and flip."""
  return crop_flip_aug(0.5)


def _check_mimco(c) -> None:
  if c.teacher.workdir and c.teacher.checkpoint:
    raise bad_field('teacher.checkpoint', 'set teacher.workdir or teacher.checkpoint, not both')
  if not c.teacher.workdir and not c.teacher.checkpoint and c.teacher.spec is None:
    raise bad_field(
        'teacher.workdir', 'method=mimco needs a contrastive teacher: pre-train one first (python '
        'main.py --config=configs/digits.py:method=mocov3 --workdir=TEACHER), then pass '
        '--config=configs/digits.py:method=mimco,teacher=TEACHER, or pass a MoCo v3 file with '
        '--config.teacher.checkpoint=FILE.pth.tar')
  if c.mask_ratio_strong <= 0:
    raise bad_field('mask_ratio_strong',
                    'method=mimco predicts the teacher at masked patches; mask some')
  if c.teacher.params not in ('momentum', 'online'):
    raise bad_field('teacher.params', f'{c.teacher.params!r} is not one of "momentum", "online"')
  if c.mimco.patch_negatives not in ('image', 'batch'):
    raise bad_field('mimco.patch_negatives',
                    f'{c.mimco.patch_negatives!r} is not one of "image", "batch"')
  for field in ('tau_patch', 'tau_img'):
    if c.mimco[field] <= 0:
      raise bad_field(f'mimco.{field}', f'{c.mimco[field]} must be > 0')


METHOD_TABLE = {
    'macrl': dict(
        fixed={'num_views': 2},
        recipe={'aug.view1': strong_aug, 'aug.view2': weak_aug, 'mask_ratio_strong': 0.75,
                'mask_ratio_weak': 0.25, 'lambda_con': 1.0, 'lambda_rec': 1.0, 'rec_loss': 'l1',
                'temperature': 0.2, 'momentum_base': 0.99, 'optim.b2': 0.95,
                'optim.weight_decay': 0.05, 'optim.decay_params': 'weights',
                'model.cls_init_std': 0.02},
        trains=('lambda_con', 'lambda_rec')),
    # MAE (He et al. 2022): one view, crop 0.2–1 + flip, 75 % masked, MSE on normalised pixels,
    # AdamW β2 0.95, weight decay 0.05 on every weight but biases and norms, cls token std 0.02.
    'mae': dict(
        fixed={'num_views': 1, 'lambda_con': 0.0, 'queue_size': 0},
        recipe={'aug.view1': lambda: crop_flip_aug(0.2), 'mask_ratio_strong': 0.75,
                'lambda_rec': 1.0, 'rec_loss': 'l2', 'norm_pix_loss': True, 'optim.b2': 0.95,
                'optim.weight_decay': 0.05, 'optim.decay_params': 'weights',
                'model.cls_init_std': 0.02},
        trains=('lambda_rec',)),
    # MoCo v3 ViT (Chen et al. 2021): BYOL's asymmetric views (blur 1.0 / 0.1, solarize 0 / 0.2,
    # crop 0.08–1), no masking, InfoNCE τ 0.2, momentum 0.99 → 1 (cosine), AdamW β2 0.999, wd 0.1
    # on every parameter, cls token std 1e-6.
    'mocov3': dict(
        fixed={'num_views': 2, 'lambda_rec': 0.0, 'mask_ratio_strong': 0.0,
               'mask_ratio_weak': 0.0},
        recipe={'aug.view1': view_aug,
                'aug.view2': lambda: view_aug(blur_prob=0.1, solarize_prob=0.2),
                'lambda_con': 1.0, 'temperature': 0.2, 'momentum_base': 0.99, 'optim.b2': 0.999,
                'optim.weight_decay': 0.1, 'optim.decay_params': 'all', 'model.cls_init_std': 1e-6},
        trains=('lambda_con',)),
    # MimCo student: one weak view, 75 % masked; the teacher sees it whole. Its losses are weighted
    # by the mimco.* fields, not by lambda_con and lambda_rec.
    'mimco': dict(
        fixed={'num_views': 1, 'lambda_con': 0.0, 'lambda_rec': 0.0, 'queue_size': 0},
        recipe={'aug.view1': weak_aug, 'mask_ratio_strong': 0.75, 'optim.b2': 0.95,
                'optim.weight_decay': 0.05, 'optim.decay_params': 'weights',
                'model.cls_init_std': 0.02},
        trains=(),
        check=_check_mimco),
}
METHODS = tuple(METHOD_TABLE)
_WHAT_EACH_TRAINS = 'macrl trains both losses, mae only reconstruction, mocov3 only the contrastive one'


def apply_method(c: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
  """Sets the fields that make `method` what it is. Mutates and returns `c`."""
  if method not in METHOD_TABLE:
    raise bad_field('method', f'unknown method {method!r}; known: {", ".join(METHODS)}')
  c.method = method
  entry = METHOD_TABLE[method]
  values = {**entry['recipe'], **entry['fixed']}
  # Keys are dotted field names ('optim.b2'); recipe values that are functions make a fresh value.
  c.update_from_flattened_dict({k: v() if callable(v) else v for k, v in values.items()})
  return c


def check_method(c: ml_collections.ConfigDict) -> None:
  """Raises UserError naming the field where `c` contradicts its method."""
  if c.method not in METHOD_TABLE:
    raise bad_field('method', f'unknown method {c.method!r}; known: {", ".join(METHODS)}')
  entry = METHOD_TABLE[c.method]
  for field, value in entry['fixed'].items():
    got = _get_field(c, field)
    if got != value:
      raise bad_field(field, f'method={c.method} fixes {field}={value!r} (got {got!r}); '
                      f'{_WHAT_EACH_TRAINS}')
  for weight in entry['trains']:
    if not c[weight] > 0:
      raise bad_field(weight, f'{c[weight]} must be > 0: method={c.method} trains the loss it '
                      f'weighs; {_WHAT_EACH_TRAINS}')
  if 'check' in entry:
    entry['check'](c)


def _get_field(c: ml_collections.ConfigDict, dotted: str):
  for name in dotted.split('.'):
    c = c[name]
  return c
