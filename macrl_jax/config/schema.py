"""The config: its schema, the arguments of a config file, and what a config implies.

Every config file in configs/ starts from `base_config()`, sets its dataset fields and calls
`configure(config, arg)` with the text after its name (`--config=configs/x.py:method=mae,...`),
which applies the method (methods.py). checks.validate runs before anything compiles.

Fields marked "ours" are choices the MACRL/MimCo papers' abstracts leave open.
"""

from __future__ import annotations

import ml_collections

from macrl_jax.config import methods, recipes
from macrl_jax.errors import UserError

# ---------------------------------------------------------------------------------------- schema


def base_config() -> ml_collections.ConfigDict:
  """All fields with macrl defaults, by part; dataset configs override the data and size fields."""
  c = ml_collections.ConfigDict()
  c.method = 'macrl'
  c.seed = 0

  _data_fields(c)
  _model_fields(c)
  _method_fields(c)
  _teacher_fields(c)
  _optim_fields(c)
  _program_fields(c)
  return c


def _data_fields(c: ml_collections.ConfigDict) -> None:
  """The dataset, its splits and the augmentations."""
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
      view1=methods.strong_aug(), view2=methods.weak_aug(),
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
      # A fraction of each class of train_split (after the holdout) that train_split then means:
      # fine-tuning's labelled subset (finetune.label_fraction sets it there). Drawn with
      # label_seed, so the same examples for every method and config.seed. 1 = all of it.
      label_fraction=1.0,
      label_seed=0,
  ))


def _model_fields(c: ml_collections.ConfigDict) -> None:
  """The ViT, its decoders and heads, and the matmul dtype."""
  # Model.
  c.model = ml_collections.ConfigDict(dict(
      variant='Ti/4',  # "<size>/<patch>", size in models.VIT_SIZES
      # Explicit overrides of the variant's dims (None = the variant's value).
      width=ml_collections.FieldReference(None, field_type=int),
      depth=ml_collections.FieldReference(None, field_type=int),
      num_heads=ml_collections.FieldReference(None, field_type=int),
      mlp_dim=ml_collections.FieldReference(None, field_type=int),
      drop_path=0.0,
      pool='cls',  # 'cls' | 'mean' (ours)
      cls_init_std=0.02,  # std of the cls token's normal init: MAE 0.02, MoCo v3 1e-6
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
      # macrl: blocks that complete a masked view's tokens (visible tokens + mask tokens + position
      # embeddings, at the encoder's width and heads) before pooling for the contrastive query, as
      # CMAE's feature decoder does (ours). 0 = none: the query pools the visible tokens.
      feature_decoder_depth=0,
  ))
  c.dtype = 'float32'  # matmul dtype; parameters stay float32


def _method_fields(c: ml_collections.ConfigDict) -> None:
  """What the methods train: masking, loss weights, the contrastive key, the memory bank."""
  # Method fields.
  c.mask_ratio_strong = 0.75  # view 1
  c.mask_ratio_weak = 0.25  # view 2 (ours)
  # What the momentum encoder sees for the key of each view (ours): 'none' the full view; 'same'
  # the view masked as its own online branch (the other branch's input, for the query it meets);
  # 'query' the view masked with the mask of the query it is compared with (the patch positions
  # that query sees).
  c.key_mask = 'none'
  c.lambda_con = 1.0  # (ours)
  c.lambda_rec = 1.0  # (ours)
  # λ_rec over training: lambda_rec × f(step / total_steps), f = 1 ('constant'), or a ramp from 0
  # to 1 ('linear_up', 'cosine_up') or a decay from 1 to 0 ('linear_down', 'cosine_down') (ours).
  c.lambda_rec_schedule = 'constant'
  c.temperature = 0.2
  c.rec_loss = 'l1'  # 'l1' | 'l2'
  # What a masked view reconstructs: 'view' its own (distorted) pixels, 'clean' the same crop and
  # flip before colour distortion, blur and solarize (ours).
  c.rec_target = 'view'
  c.norm_pix_loss = True
  c.queue_size = 0  # memory bank of past keys; 0 = batch negatives only (ours)
  c.momentum_base = 0.99


def _teacher_fields(c: ml_collections.ConfigDict) -> None:
  """MimCo's frozen teacher and the student's losses."""
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


def _optim_fields(c: ml_collections.ConfigDict) -> None:
  """The batch, length and optimizer; parameter sharding; initialisation from a file."""
  # Optimisation.
  c.batch_size = 256  # global
  c.total_steps = 1000
  c.optim = ml_collections.ConfigDict(dict(
      base_lr=1.5e-4,  # scaled by batch_size / 256
      min_lr=0.0,
      warmup_steps=100,
      weight_decay=0.05,
      # Which parameters are decayed: 'weights' every one but biases and norms (timm's rule, as MAE
      # uses it: cls and mask tokens too), 'all' (MoCo v3 hands every parameter to AdamW),
      # 'kernels' the matmul kernels only.
      decay_params='weights',
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


def _program_fields(c: ml_collections.ConfigDict) -> None:
  """Logging, evaluation and checkpoint cadence; the in-training evaluations; the fine-tuning metric."""
  # Program: logging, evaluation and checkpoint cadence.
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.knn = ml_collections.ConfigDict(dict(k=20, temperature=0.07, eval_batch_size=256))
  # In-training evaluations (evals/monitors.py), each every `every_steps` (None: eval_every_steps;
  # 0: off) and at the last step: --config.evals.masked_mse.every_steps=500 turns one on.
  c.evals = ml_collections.ConfigDict(dict(
      knn=dict(every_steps=_optional_int()),
      reconstruction=dict(every_steps=_optional_int(), num_images=8),
      masked_mse=dict(every_steps=_optional_int(0), num_images=256)))
  # The fine-tuning metric of tools/ablate.py --finetune: one recipe for every method and seed.
  c.finetune = recipes.finetune_recipe()


def _optional_int(value: int | None = None):
  """An int field that may also be None (a plain None field would take any type)."""
  return ml_collections.FieldReference(value, field_type=int)


def set_field(c: ml_collections.ConfigDict, dotted: str, value) -> None:
  """c['a.b'] = value for a dotted field name, as --config.a.b=value does."""
  *parents, leaf = dotted.split('.')
  for name in parents:
    c = c[name]
  c[leaf] = value


# Fields whose value in a config file is given for that file's total_steps: when the command line
# changes the length but not them, they keep their share of it (as MAE gives its warm-up in
# epochs). Only a contradiction between fields the user set is an error (checks.py).
FOLLOW_LENGTH = ('optim.warmup_steps',)


def follow_the_user(c: ml_collections.ConfigDict, file_config: ml_collections.ConfigDict,
                    user_fields) -> None:
  """Scales the FOLLOW_LENGTH fields the user did not set to the total_steps they did set."""
  if 'total_steps' not in user_fields or c.total_steps == file_config.total_steps:
    return
  for dotted in FOLLOW_LENGTH:
    if dotted not in user_fields:
      value = file_config
      for name in dotted.split('.'):
        value = value[name]
      set_field(c, dotted, round(value * c.total_steps / file_config.total_steps))


# ----------------------------------------------------------------------- config file arguments


def configure(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies a config file's short arguments (`:method=mae,variant=S/4`) to its config."""
  args = parse_arg(arg)
  methods.apply_method(c, args.pop('method', 'macrl'))
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


# ------------------------------------------------------------------------ what a config implies
# The weight-decay sets of config.optim.decay_params (methods/optim.py's decay_mask).
DECAY_PARAMS = ('weights', 'all', 'kernels')



def _trains(c, weight: str) -> bool:
  entry = methods.METHOD_TABLE.get(c.method)
  return entry is not None and weight in entry['trains'] and c[weight] > 0


def uses_contrastive(c) -> bool:
  """Whether the step computes the InfoNCE loss between the views (and has projector/predictor)."""
  return _trains(c, 'lambda_con')


def uses_reconstruction(c) -> bool:
  """Whether the step reconstructs masked pixels (and has the pixel decoder)."""
  return _trains(c, 'lambda_rec')


def uses_feature_decoder(c) -> bool:
  """Whether the contrastive query of a masked view passes the feature decoder (and it exists)."""
  return (c.model.get('feature_decoder_depth', 0) > 0 and uses_contrastive(c)
          and any(view_mask_ratios(c)))


def view_mask_ratios(c) -> list[float]:
  return [c.mask_ratio_strong, c.mask_ratio_weak][:c.num_views]
