"""The config schema, the method presets and the checks that run before anything compiles.

Every config file in configs/ starts from `base_config()`, sets its dataset fields and calls
`apply_method(config, method)`. `validate(config, num_devices)` is called by the train program (and
the benchmark) before the model is built, so that a bad value fails with a message naming the field
instead of a shape error from inside XLA.

Fields marked "ours" are choices the MACRL/MimCo papers' abstracts leave open.
"""

from __future__ import annotations

import math

import ml_collections

from macrl_jax.errors import UserError

# ViT variants (Dosovitskiy et al.; Ti/S from DeiT): width, depth, heads, mlp_dim.
VIT_SIZES = {
    'mu': (64, 4, 2, 256),  # tiny test/debug size, not a published variant
    'Ti': (192, 12, 3, 768),
    'S': (384, 12, 6, 1536),
    'B': (768, 12, 12, 3072),
    'L': (1024, 24, 16, 4096),
}


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


# What each method is. `fixed` fields define the method: validate() refuses a config that
# overrides them. `recipe` fields are the method's published defaults (macrl's are ours); a
# config or --config.FIELD=VALUE may change them after the method is applied.
METHOD_TABLE = {
    'macrl': dict(
        fixed={'num_views': 2},
        recipe={'aug.view1': strong_aug, 'aug.view2': weak_aug, 'mask_ratio_strong': 0.75,
                'mask_ratio_weak': 0.25, 'lambda_con': 1.0, 'lambda_rec': 1.0, 'rec_loss': 'l1',
                'temperature': 0.2, 'momentum_base': 0.99, 'optim.b2': 0.95,
                'optim.weight_decay': 0.05}),
    # MAE (He et al. 2022): one view, crop 0.2–1 + flip, 75 % masked, MSE on normalised pixels,
    # AdamW β2 0.95, weight decay 0.05.
    'mae': dict(
        fixed={'num_views': 1, 'lambda_con': 0.0, 'queue_size': 0},
        recipe={'aug.view1': lambda: crop_flip_aug(0.2), 'mask_ratio_strong': 0.75,
                'lambda_rec': 1.0, 'rec_loss': 'l2', 'norm_pix_loss': True, 'optim.b2': 0.95,
                'optim.weight_decay': 0.05}),
    # MoCo v3 ViT (Chen et al. 2021): BYOL's asymmetric views (blur 1.0 / 0.1, solarize 0 / 0.2,
    # crop 0.08–1), no masking, InfoNCE τ 0.2, momentum 0.99 → 1 (cosine), AdamW β2 0.999, wd 0.1.
    'mocov3': dict(
        fixed={'num_views': 2, 'lambda_rec': 0.0, 'mask_ratio_strong': 0.0,
               'mask_ratio_weak': 0.0},
        recipe={'aug.view1': view_aug,
                'aug.view2': lambda: view_aug(blur_prob=0.1, solarize_prob=0.2),
                'lambda_con': 1.0, 'temperature': 0.2, 'momentum_base': 0.99, 'optim.b2': 0.999,
                'optim.weight_decay': 0.1}),
    # MimCo student: one weak view, 75 % masked; the teacher sees it whole.
    'mimco': dict(
        fixed={'num_views': 1, 'lambda_con': 0.0, 'lambda_rec': 0.0, 'queue_size': 0},
        recipe={'aug.view1': weak_aug, 'mask_ratio_strong': 0.75, 'optim.b2': 0.95,
                'optim.weight_decay': 0.05}),
}
METHODS = tuple(METHOD_TABLE)


def set_field(c: ml_collections.ConfigDict, dotted: str, value) -> None:
  """c['a.b'] = value for a dotted field name, as --config.a.b=value does."""
  *parents, leaf = dotted.split('.')
  for name in parents:
    c = c[name]
  c[leaf] = value


def get_field(c: ml_collections.ConfigDict, dotted: str):
  for name in dotted.split('.'):
    c = c[name]
  return c


def base_config() -> ml_collections.ConfigDict:
  """All fields with macrl defaults; dataset configs override the data and size fields."""
  c = ml_collections.ConfigDict()
  c.method = 'macrl'
  c.seed = 0

  # Data.
  c.dataset = 'digits'
  c.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data dir; None = default
  c.manual_dir = ml_collections.FieldReference(None, field_type=str)  # for manual downloads
  c.train_split = 'train'
  c.test_split = 'test'
  c.num_classes = 10
  c.image_size = 16
  c.shuffle_buffer = 10_000
  c.num_views = 2
  c.aug = ml_collections.ConfigDict(dict(
      view1=strong_aug(), view2=weak_aug(),
      # Blur σ is given for images of this size and scaled to image_size (224: the published
      # σ 0.1–2 at 224 px; at 32 px that is at most 0.29 px, so a small-image study may lower it).
      blur_reference_size=224,
  ))
  c.data = ml_collections.ConfigDict(dict(
      # Storage format when preparing: 'tfrecord' (held in memory when read) or 'array_record'
      # (read from disk by index); None = the dataset's default (array_record for imagenet100).
      file_format=ml_collections.FieldReference(None, field_type=str),
      # Evaluation: resize the shorter side to image_size / eval_crop_fraction, then center crop
      # (1.0 for the low-resolution datasets; 0.875 is the usual ImageNet value).
      eval_crop_fraction=1.0,
      # A fraction of each class of train_split held out (deterministically, whatever the seed) as
      # the split named 'holdout', for choosing hyperparameters without touching test_split; with
      # it, train_split means the rest. 0 = train_split whole.
      holdout_fraction=0.0,
  ))

  # Model.
  c.model = ml_collections.ConfigDict(dict(
      variant='Ti/4',  # "<size>/<patch>", size in VIT_SIZES
      # Explicit overrides of the variant's dims (None = the variant's value).
      width=ml_collections.FieldReference(None, field_type=int),
      depth=ml_collections.FieldReference(None, field_type=int),
      num_heads=ml_collections.FieldReference(None, field_type=int),
      mlp_dim=ml_collections.FieldReference(None, field_type=int),
      drop_path=0.0,
      pool='cls',  # 'cls' | 'mean' (ours)
      remat=False,
      # nn.scan over the transformer blocks (encoder and decoder): one block compiled instead of
      # `depth`, for large models' compile time; params are stacked ('blocks', leading depth axis).
      scan=False,
      decoder_width=128,
      decoder_depth=2,
      decoder_heads=4,
      proj_hidden=1024,
      proj_dim=256,
      pred_hidden=1024,
  ))
  c.dtype = 'float32'  # matmul dtype; parameters stay float32

  # Method fields.
  c.mask_ratio_strong = 0.75  # view 1
  c.mask_ratio_weak = 0.25  # view 2 (ours)
  c.key_mask = 'none'  # 'none' | 'same' (ours)
  c.lambda_con = 1.0  # (ours)
  c.lambda_rec = 1.0  # (ours)
  c.temperature = 0.2
  c.rec_loss = 'l1'  # 'l1' | 'l2'
  # What a masked view reconstructs: 'view' its own (distorted) pixels, 'clean' the same crop and
  # flip before colour distortion, blur and solarize (ours).
  c.rec_target = 'view'
  c.norm_pix_loss = True
  c.queue_size = 0  # memory bank of past keys; 0 = batch negatives only (ours)
  c.momentum_base = 0.99

  # MimCo: the frozen contrastive teacher and the student's two losses.
  c.teacher = ml_collections.ConfigDict(dict(
      workdir=ml_collections.FieldReference(None, field_type=str),  # a mocov3 or macrl workdir
      # Or a PyTorch file in MoCo v3's layout (e.g. its public vit-s-300ep.pth.tar): the teacher
      # is then built with this config's model fields (MoCo v3 ViT-S: model.num_heads=12).
      checkpoint=ml_collections.FieldReference(None, field_type=str),
      step=ml_collections.FieldReference(None, field_type=int),  # None = latest
      params='momentum',  # 'momentum' | 'online' encoder and projector of the teacher
      spec=None,  # filled from the teacher's config.json: method, image_size, model
  ))
  c.mimco = ml_collections.ConfigDict(dict(
      tau_patch=0.1,  # (ours)
      tau_img=0.2,  # (ours)
      lambda_img=1.0,  # (ours)
      patch_negatives='image',  # 'image' | 'batch'
  ))

  # Optimisation.
  c.batch_size = 256  # global
  c.total_steps = 1000
  c.optim = ml_collections.ConfigDict(dict(
      base_lr=1.5e-4,  # scaled by batch_size / 256
      min_lr=0.0,
      warmup_steps=100,
      weight_decay=0.05,
      b1=0.9,
      b2=0.95,
      grad_clip=ml_collections.FieldReference(None, field_type=float),
  ))

  c.sharding = ml_collections.ConfigDict(dict(fsdp=False))

  # Initialisation from a PyTorch file (timm ViT, MoCo v3 .pth.tar, MAE .pth, or a .safetensors of
  # tools/export.py): the encoder, and the heads/decoder the file and the method both have.
  c.init = ml_collections.FieldReference(None, field_type=str)
  # A file whose position-embedding grid differs from image_size / patch_size is refused unless
  # this is set; the encoder then uses the sin-cos table of its own grid.
  c.init_interpolate_pos = False

  # Program: logging, evaluation and checkpoint cadence.
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.knn = ml_collections.ConfigDict(dict(k=20, temperature=0.07, eval_batch_size=256))
  return c


def apply_method(c: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
  """Sets the fields that make `method` what it is (METHOD_TABLE). Mutates and returns `c`."""
  if method not in METHOD_TABLE:
    raise UserError(f'config.method: unknown method {method!r}; known: {", ".join(METHODS)}')
  c.method = method
  entry = METHOD_TABLE[method]
  for field, value in {**entry['recipe'], **entry['fixed']}.items():
    set_field(c, field, value() if callable(value) else value)
  return c


def configure(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies a config file's short arguments (`:method=mae,variant=S/4`) to its config."""
  args = parse_arg(arg)
  apply_method(c, args.pop('method', 'macrl'))
  if 'variant' in args:
    c.model.variant = args.pop('variant')
  if 'teacher' in args:
    c.teacher.workdir = args.pop('teacher')
  if args:
    raise UserError(f'unknown config argument(s) {sorted(args)}; known: method, variant, teacher. '
                     'Set any other field with --config.FIELD=VALUE')
  return c


def parse_arg(arg: str | None) -> dict[str, str]:
  """Parses the `:key=value,key=value` suffix of `--config=configs/x.py:...`."""
  out = {}
  for item in (arg or '').split(','):
    item = item.strip()
    if not item:
      continue
    if '=' not in item:
      raise UserError(f'config argument {item!r} must look like key=value (e.g. method=mae)')
    key, value = item.split('=', 1)
    out[key.strip()] = value.strip()
  return out


def vit_dims(model_cfg) -> dict:
  """Resolves `model.variant` ("S/4") and the explicit overrides into the ViT's dims."""
  variant = model_cfg.variant
  try:
    size, patch = variant.split('/')
    width, depth, heads, mlp = VIT_SIZES[size]
    patch = int(patch)
  except (ValueError, KeyError):
    raise UserError(
        f'config.model.variant: unknown variant {variant!r}; expected "<size>/<patch>" with size in '
        f'{sorted(VIT_SIZES)} (e.g. "S/4", "B/16")') from None
  dims = dict(patch_size=patch, width=width, depth=depth, num_heads=heads, mlp_dim=mlp)
  for k in ('width', 'depth', 'num_heads', 'mlp_dim'):
    if model_cfg.get(k) is not None:
      dims[k] = int(model_cfg[k])
  return dims


def num_visible(num_patches: int, mask_ratio: float) -> int:
  """Visible tokens per example: round(N · (1 − ratio))."""
  return int(round(num_patches * (1.0 - mask_ratio)))


def uses_contrastive(c) -> bool:
  return c.method in ('macrl', 'mocov3') and c.lambda_con > 0


def uses_reconstruction(c) -> bool:
  return c.method in ('macrl', 'mae') and c.lambda_rec > 0


def view_mask_ratios(c) -> list[float]:
  return [c.mask_ratio_strong, c.mask_ratio_weak][:c.num_views]


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises UserError naming the offending field; runs before any compilation."""

  def fail(field, msg):
    raise UserError(f'config.{field}: {msg}')

  if c.method not in METHODS:
    fail('method', f'unknown method {c.method!r}; known: {", ".join(METHODS)}')
  dims = vit_dims(c.model)
  p = dims['patch_size']
  if c.image_size <= 0 or c.image_size % p:
    fail('image_size', f'{c.image_size} is not divisible by the patch size {p} of variant '
         f'{c.model.variant!r}; pick an image size that is a multiple of {p} or another patch size')
  if dims['width'] % dims['num_heads']:
    fail('model.width', f'{dims["width"]} is not divisible by num_heads={dims["num_heads"]}')
  if c.model.decoder_width % c.model.decoder_heads:
    fail('model.decoder_width',
         f'{c.model.decoder_width} is not divisible by decoder_heads={c.model.decoder_heads}')
  if c.model.pool not in ('cls', 'mean'):
    fail('model.pool', f'{c.model.pool!r} is not one of "cls", "mean"')
  if c.key_mask not in ('none', 'same'):
    fail('key_mask', f'{c.key_mask!r} is not one of "none", "same"')
  if c.rec_target not in ('view', 'clean'):
    fail('rec_target', f'{c.rec_target!r} is not one of "view", "clean"')
  if c.aug.blur_reference_size <= 0:
    fail('aug.blur_reference_size', f'{c.aug.blur_reference_size} must be > 0')
  if not 0.0 <= c.data.holdout_fraction < 1.0:
    fail('data.holdout_fraction', f'{c.data.holdout_fraction} is outside [0, 1)')
  if c.rec_loss not in ('l1', 'l2'):
    fail('rec_loss', f'{c.rec_loss!r} is not one of "l1", "l2"')
  if c.dtype not in ('float32', 'bfloat16', 'float16'):
    fail('dtype', f'{c.dtype!r} is not one of float32, bfloat16, float16')
  if c.num_views not in (1, 2):
    fail('num_views', f'{c.num_views} must be 1 or 2')

  num_patches = (c.image_size // p) ** 2
  for field in ('mask_ratio_strong', 'mask_ratio_weak')[:c.num_views]:
    r = c[field]
    if not 0.0 <= r < 1.0:
      fail(field, f'{r} is outside [0, 1)')
    if num_visible(num_patches, r) < 1:
      fail(field, f'{r} leaves no visible patch of the {num_patches} patches; lower it')

  if uses_reconstruction(c) and not any(view_mask_ratios(c)):
    fail('mask_ratio_strong', f'method={c.method} reconstructs masked patches, but no view is masked')

  if c.lambda_con < 0 or c.lambda_rec < 0:
    fail('lambda_con', f'loss weights must be >= 0 (lambda_con={c.lambda_con}, '
         f'lambda_rec={c.lambda_rec})')
  if c.method in ('macrl', 'mae', 'mocov3') and c.lambda_con == 0 and c.lambda_rec == 0:
    fail('lambda_con', 'both loss weights (lambda_con, lambda_rec) are zero: nothing to train')

  # The fields a method fixes must not be overridden into another method.
  for field, value in METHOD_TABLE[c.method]['fixed'].items():
    if get_field(c, field) != value:
      fail(field, f'method={c.method} fixes {field}={value!r} (got {get_field(c, field)!r}); '
           'macrl trains both losses, mae only reconstruction, mocov3 only the contrastive one')
  if c.method == 'mimco':
    if c.teacher.workdir and c.teacher.checkpoint:
      fail('teacher.checkpoint', 'set teacher.workdir or teacher.checkpoint, not both')
    if not c.teacher.workdir and not c.teacher.checkpoint and c.teacher.spec is None:
      fail('teacher.workdir', 'method=mimco needs a contrastive teacher: pre-train one first '
           '(python main.py --config=configs/digits.py:method=mocov3 --workdir=TEACHER), then pass '
           '--config=configs/digits.py:method=mimco,teacher=TEACHER, or pass a MoCo v3 file with '
           '--config.teacher.checkpoint=FILE.pth.tar')
    if c.mask_ratio_strong <= 0:
      fail('mask_ratio_strong', 'method=mimco predicts the teacher at masked patches; mask some')
    if c.teacher.params not in ('momentum', 'online'):
      fail('teacher.params', f'{c.teacher.params!r} is not one of "momentum", "online"')
    if c.mimco.patch_negatives not in ('image', 'batch'):
      fail('mimco.patch_negatives', f'{c.mimco.patch_negatives!r} is not one of "image", "batch"')
    for field in ('tau_patch', 'tau_img'):
      if c.mimco[field] <= 0:
        fail(f'mimco.{field}', f'{c.mimco[field]} must be > 0')
  if c.method == 'macrl' and (c.lambda_con == 0 or c.lambda_rec == 0):
    fail('lambda_con' if c.lambda_con == 0 else 'lambda_rec',
         'method=macrl trains both losses; use method=mae or method=mocov3 for one of them')

  for field, path in (('init', c.get('init')), ('teacher.checkpoint', c.teacher.get('checkpoint'))):
    if path and not path.endswith(('.safetensors', '.pth', '.pth.tar', '.pt', '.tar', '.bin')):
      fail(field, f'{path!r} is not a .safetensors or PyTorch (.pth, .pth.tar) file')
  if c.temperature <= 0:
    fail('temperature', f'{c.temperature} must be > 0')
  if not 0.0 <= c.momentum_base <= 1.0:
    fail('momentum_base', f'{c.momentum_base} is outside [0, 1]')
  if c.queue_size < 0:
    fail('queue_size', f'{c.queue_size} must be >= 0')
  if c.queue_size and c.queue_size < c.num_views * c.batch_size:
    fail('queue_size', f'{c.queue_size} is smaller than the keys enqueued per step '
         f'({c.num_views} views × batch_size {c.batch_size}); use 0 or at least that')
  if c.batch_size <= 0:
    fail('batch_size', f'{c.batch_size} must be > 0')
  if num_devices is not None and c.batch_size % num_devices:
    fail('batch_size', f'global batch {c.batch_size} is not divisible by the {num_devices} devices; '
         f'use a multiple of {num_devices}')
  if num_devices is not None and c.knn.eval_batch_size % num_devices:
    fail('knn.eval_batch_size', f'{c.knn.eval_batch_size} is not divisible by the {num_devices} '
         f'devices; use a multiple of {num_devices}')
  if c.total_steps <= 0:
    fail('total_steps', f'{c.total_steps} must be > 0')
  if c.optim.warmup_steps < 0 or c.optim.warmup_steps > c.total_steps:
    fail('optim.warmup_steps', f'{c.optim.warmup_steps} must be in [0, total_steps={c.total_steps}]')
  _validate_numbers(c, fail)


def _validate_numbers(c, fail) -> None:
  """Values that would train without an error but to nothing (a negative rate, a decay above 1)."""

  def check(field, value, ok, want):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and ok(value)):
      fail(field, f'{value} must be {want}')

  o = c.optim
  check('optim.base_lr', o.base_lr, lambda v: v > 0, '> 0')
  check('optim.min_lr', o.min_lr, lambda v: 0 <= v <= o.base_lr, f'in [0, base_lr={o.base_lr}]')
  check('optim.weight_decay', o.weight_decay, lambda v: v >= 0, '>= 0')
  for field in ('b1', 'b2'):
    check(f'optim.{field}', o[field], lambda v: 0 <= v < 1, 'in [0, 1)')
  if o.grad_clip is not None:
    check('optim.grad_clip', o.grad_clip, lambda v: v > 0, '> 0 (or None for no clipping)')
  check('model.drop_path', c.model.drop_path, lambda v: 0 <= v < 1, 'in [0, 1)')
  check('knn.k', c.knn.k, lambda v: v >= 1, '>= 1')
  check('knn.temperature', c.knn.temperature, lambda v: v > 0, '> 0')
  for field in ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints'):
    check(field, c[field], lambda v: v >= 1, '>= 1')
