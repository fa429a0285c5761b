"""PyTorch state dicts <-> this codebase's flax parameters, on numpy arrays (no torch here).

Three layouts of PyTorch files are understood:
- timm's `VisionTransformer` ('patch_embed.proj.weight', 'cls_token', 'pos_embed', 'blocks.{i}...',
  'norm.*'), what tools/export.py writes;
- MoCo v3 (`checkpoint['state_dict']`): 'module.base_encoder.*' and 'module.momentum_encoder.*' (timm
  ViTs whose 'head' is the projector), 'module.predictor.*';
- MAE (`checkpoint['model']`): a timm-named encoder plus 'decoder_embed', 'mask_token',
  'decoder_pos_embed', 'decoder_blocks.*', 'decoder_norm', 'decoder_pred'.

How the two models differ, and what the conversion does about it:
- patch embedding: timm's Conv2d [D, C, p, p] is our Dense on patches flattened as (row, col, C);
- position embeddings: ours are fixed 2-D sin-cos on the patches only (MAE's order: column half
  first). A file's `pos_embed` must be such a table; its cls row (zero in MAE and MoCo v3) is folded
  into the cls token, which is exact since both are only ever added together. MoCo v3 puts the row
  half first: that model is imported with every residual-stream channel permuted (the two halves
  swapped), which computes exactly the same function up to that fixed permutation of the encoder's
  output channels; its projector absorbs the permutation, so projector outputs are identical;
- LayerNorm eps 1e-6, exact GELU, qkv as (three, heads, head_dim), BatchNorm eps 1e-5: as in timm,
  MoCo v3 and MAE, so no conversion;
- mean pooling: ours averages the patch tokens after the final norm, which is timm's
  global_pool='avg' with fc_norm=False (timm's default for 'avg' would norm after pooling instead).

The number of attention heads is not in any tensor's shape: it comes from the config
(`model.num_heads`) and, for files written by tools/export.py, is checked against the JSON beside it.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from macrl_jax import models
from macrl_jax.errors import UserError


class InteropError(UserError):
  """A file that cannot be converted; the message names the tensor and the config field."""


# ------------------------------------------------------------------------------------ layouts
def split_layout(sd: dict[str, np.ndarray]) -> tuple[str, dict[str, dict[str, np.ndarray]]]:
  """Recognises the layout of a flat state dict. Returns (layout, parts), parts among 'online',
  'momentum' (timm-named encoders, with their 'head.*' if any), 'predictor', 'decoder'."""
  if not sd:
    raise InteropError('the state dict is empty')
  keys = list(sd)
  if any(k.startswith('module.base_encoder.') for k in keys):
    parts = {'online': _strip(sd, 'module.base_encoder.'),
             'momentum': _strip(sd, 'module.momentum_encoder.'),
             'predictor': _strip(sd, 'module.predictor.')}
    return 'mocov3', {k: v for k, v in parts.items() if v}
  if all(k.startswith('module.') for k in keys):  # DistributedDataParallel's prefix
    sd = _strip(sd, 'module.')
  if 'patch_embed.proj.weight' not in sd:
    raise InteropError(
        'not a ViT state dict of a known layout: no "patch_embed.proj.weight" (timm, MAE) nor '
        f'"module.base_encoder.*" (MoCo v3); its first keys are {keys[:5]}')
  decoder = {k: v for k, v in sd.items() if k.startswith('decoder_') or k == 'mask_token'}
  encoder = {k: v for k, v in sd.items() if k not in decoder}
  parts = {'online': encoder}
  if decoder:
    parts['decoder'] = decoder
  return ('mae' if decoder else 'timm'), parts


def _strip(sd, prefix):
  return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------ checks
def _get(sd, key, shape, field, where):
  """sd[key] as float32, checked against the expected torch-layout `shape`."""
  if key not in sd:
    raise InteropError(f'{where}: tensor "{key}" is missing (expected shape {tuple(shape)})')
  x = np.asarray(sd[key], np.float32)
  if tuple(x.shape) != tuple(shape):
    raise InteropError(f'{where}: tensor "{key}" has shape {tuple(x.shape)} but the config expects '
                       f'{tuple(shape)}; change config.{field} to match the file')
  return x


def _first_dim_mismatch(sd, key, shape):
  return key in sd and tuple(np.shape(sd[key])) != tuple(shape)


def _depth_of(sd, prefix='blocks.'):
  ids = {int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r'(\d+)\.', k)] if m}
  return max(ids) + 1 if ids else 0


# ------------------------------------------------------------------------------------ encoder
def sincos_with_cls(width: int, grid: int) -> np.ndarray:
  """Our position embeddings in timm's layout [1, 1 + grid², D], zero at the cls position."""
  return np.concatenate([np.zeros((1, width), np.float32), models.sincos_2d(width, grid)])[None]


def _residual_permutation(pos: np.ndarray, width: int, where: str) -> np.ndarray:
  """The channel order that maps the file's sin-cos table onto ours (identity for MAE's order)."""
  grid = int(round(math.sqrt(pos.shape[0])))
  ours = models.sincos_2d(width, grid)
  half = width // 2
  candidates = {'ours': np.arange(width),
                'row-first (MoCo v3)': np.concatenate([np.arange(half, width), np.arange(half)])}
  errors = {}
  for name, perm in candidates.items():
    errors[name] = float(np.abs(pos[:, perm] - ours).max())
    if errors[name] < 1e-4:
      return perm
  raise InteropError(
      f'{where}: "pos_embed" is not a fixed 2-D sin-cos table (max difference {errors}); this '
      'encoder has fixed sin-cos position embeddings, so a ViT with learned ones cannot be imported')


def encoder_from_timm(sd: dict, dims: dict, image_size: int, *, interpolate_pos: bool = False,
                      where: str = 'encoder') -> tuple[dict, np.ndarray]:
  """A timm-named encoder → (flax params of models.Encoder with unscanned blocks, channel perm).

  `perm` (identity unless the file is MoCo v3's) maps the file's residual channels to ours:
  our_feature = file_feature[perm]; heads reading the encoder's output use it (head_from_moco).
  """
  d, p, m = dims['width'], dims['patch_size'], dims['mlp_dim']
  if _first_dim_mismatch(sd, 'patch_embed.proj.weight', (d, 3, p, p)):
    shape = tuple(np.shape(sd['patch_embed.proj.weight']))
    field = 'model.width' if shape[0] != d else 'model.variant (its patch size)'
    _get(sd, 'patch_embed.proj.weight', (d, 3, p, p), field, where)
  conv = _get(sd, 'patch_embed.proj.weight', (d, 3, p, p), 'model.variant', where)
  conv_b = _get(sd, 'patch_embed.proj.bias', (d,), 'model.width', where)
  cls = _get(sd, 'cls_token', (1, 1, d), 'model.width', where)[0, 0]
  grid = image_size // p
  n = grid * grid
  pos = np.asarray(sd.get('pos_embed', np.zeros((0,))), np.float32)
  if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != d:
    _get(sd, 'pos_embed', (1, 1 + n, d), 'model.width', where)
  pos = pos[0]
  file_n = pos.shape[0] - 1 if int(round(math.sqrt(pos.shape[0] - 1))) ** 2 == pos.shape[0] - 1 \
      else pos.shape[0]
  if pos.shape[0] == file_n + 1:  # timm's default: a cls position, folded into the cls token
    cls, pos = cls + pos[0], pos[1:]
  if file_n != n and not interpolate_pos:
    file_grid = int(round(math.sqrt(file_n)))
    raise InteropError(
        f'{where}: tensor "pos_embed" has shape {tuple(np.shape(sd["pos_embed"]))} (a {file_grid}² '
        f'grid) but config.image_size={image_size} with patch {p} expects {(1, 1 + n, d)} (a '
        f'{grid}² grid); change config.image_size to {file_grid * p}, or set '
        f'config.init_interpolate_pos=True to use the sin-cos table of the new grid')
  perm = _residual_permutation(pos, d, where)

  depth = _depth_of(sd)
  if depth != dims['depth']:
    raise InteropError(f'{where}: the file has {depth} blocks ("blocks.0." … "blocks.{depth - 1}.") '
                       f'but the config has {dims["depth"]}; change config.model.depth to {depth}')
  params = {
      # Conv [D, C, p, q] → Dense kernel [(p q C), D], the order models.patchify flattens patches in.
      'embedding': {'kernel': conv[perm].transpose(2, 3, 1, 0).reshape(p * p * 3, d),
                    'bias': conv_b[perm]},
      'cls': cls[perm][None, None],
      'transformer': {'norm': _norm(sd, 'norm', d, perm, where)},
  }
  for i in range(depth):
    b = f'blocks.{i}.'
    params['transformer'][f'block{i:02d}'] = {
        'LayerNorm_0': _norm(sd, b + 'norm1', d, perm, where),
        'attn': {'qkv': _linear(sd, b + 'attn.qkv', 3 * d, d, 'model.width', where, in_perm=perm),
                 'out': _linear(sd, b + 'attn.proj', d, d, 'model.width', where, out_perm=perm)},
        'LayerNorm_1': _norm(sd, b + 'norm2', d, perm, where),
        'mlp_in': _linear(sd, b + 'mlp.fc1', m, d, 'model.mlp_dim', where, in_perm=perm),
        'mlp_out': _linear(sd, b + 'mlp.fc2', d, m, 'model.mlp_dim', where, out_perm=perm),
    }
  known = re.compile(r'(patch_embed\.proj|cls_token|pos_embed|norm\.|blocks\.\d+\.(norm1|norm2|'
                     r'attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.|head\.|fc_norm\.(weight|bias)$)')
  unknown = sorted(k for k in sd if not known.match(k))
  if unknown:
    raise InteropError(f'{where}: tensors with no counterpart in this ViT: {unknown[:6]} (layer '
                       'scale, registers, q/k norms and pre-norms are not supported)')
  if 'fc_norm.weight' in sd:
    raise InteropError(f'{where}: "fc_norm" (a LayerNorm after mean pooling, timm\'s global_pool='
                       "'avg') has no counterpart here: this encoder norms the tokens before pooling")
  return params, perm


def _norm(sd, name, d, perm, where):
  return {'scale': _get(sd, name + '.weight', (d,), 'model.width', where)[perm],
          'bias': _get(sd, name + '.bias', (d,), 'model.width', where)[perm]}


def _linear(sd, name, out, inp, field, where, in_perm=None, out_perm=None, bias=True):
  w = _get(sd, name + '.weight', (out, inp), field, where)
  if in_perm is not None:
    w = w[:, in_perm]
  if out_perm is not None:
    w = w[out_perm]
  p = {'kernel': w.T.copy()}
  if bias:
    b = _get(sd, name + '.bias', (out,), field, where)
    p['bias'] = b if out_perm is None else b[out_perm]
  return p


def block_to_timm(block: dict, prefix: str) -> dict[str, np.ndarray]:
  """One transformer block's flax params → timm's Block keys under `prefix` (torch layout)."""
  sd = {}
  for ours, theirs in (('LayerNorm_0', 'norm1'), ('LayerNorm_1', 'norm2')):
    sd[prefix + theirs + '.weight'] = np.asarray(block[ours]['scale'])
    sd[prefix + theirs + '.bias'] = np.asarray(block[ours]['bias'])
  for ours, theirs in ((block['attn']['qkv'], 'attn.qkv'), (block['attn']['out'], 'attn.proj'),
                       (block['mlp_in'], 'mlp.fc1'), (block['mlp_out'], 'mlp.fc2')):
    sd[prefix + theirs + '.weight'] = np.asarray(ours['kernel']).T
    sd[prefix + theirs + '.bias'] = np.asarray(ours['bias'])
  return sd


def encoder_to_timm(params: dict, dims: dict, image_size: int) -> dict[str, np.ndarray]:
  """Flax encoder params (scanned or not) → timm VisionTransformer state dict (numpy)."""
  d, p = dims['width'], dims['patch_size']
  t = params['transformer']
  blocks = unstack_blocks(t)
  sd = {
      'cls_token': np.asarray(params['cls'], np.float32).reshape(1, 1, d),
      'pos_embed': sincos_with_cls(d, image_size // p),
      'patch_embed.proj.weight':
          np.asarray(params['embedding']['kernel']).reshape(p, p, 3, d).transpose(3, 2, 0, 1),
      'patch_embed.proj.bias': np.asarray(params['embedding']['bias']),
  }
  for i, b in enumerate(blocks):
    sd.update(block_to_timm(b, f'blocks.{i}.'))
  sd['norm.weight'] = np.asarray(t['norm']['scale'])
  sd['norm.bias'] = np.asarray(t['norm']['bias'])
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def timm_kwargs(dims: dict, image_size: int, pool: str) -> dict[str, Any]:
  """Keyword arguments of timm's VisionTransformer that compute what our Encoder + pool compute."""
  return dict(img_size=image_size, patch_size=dims['patch_size'], in_chans=3, num_classes=0,
              embed_dim=dims['width'], depth=dims['depth'], num_heads=dims['num_heads'],
              mlp_ratio=dims['mlp_dim'] / dims['width'], qkv_bias=True, class_token=True,
              no_embed_class=False, global_pool='token' if pool == 'cls' else 'avg',
              fc_norm=False)


def unstack_blocks(t: dict) -> list[dict]:
  """A Transformer's blocks as a list, from either layout ('block00'... or scanned 'blocks')."""
  if 'blocks' in t:
    depth = len(np.asarray(_first_leaf(t['blocks'])))
    return [_tree_map(lambda x, i=i: np.asarray(x)[i], t['blocks']) for i in range(depth)]
  return [t[k] for k in sorted(k for k in t if re.fullmatch(r'block\d+', k))]


def stack_if_scanned(params: dict, scan: bool) -> dict:
  """Puts 'block00'... into the scanned layout ('blocks' with a leading depth axis) if `scan`."""
  out = {}
  for k, v in params.items():
    if k == 'transformer' and scan:
      blocks = unstack_blocks(v)
      v = {'norm': v['norm'], 'blocks': _tree_map(lambda *xs: np.stack(xs), *blocks)}
    elif isinstance(v, dict):
      v = stack_if_scanned(v, scan)
    out[k] = v
  return out


def _first_leaf(tree):
  while isinstance(tree, dict):
    tree = next(iter(tree.values()))
  return tree


def _tree_map(fn, *trees):
  if isinstance(trees[0], dict):
    return {k: _tree_map(fn, *(t[k] for t in trees)) for k in trees[0]}
  return fn(*trees)


# ------------------------------------------------------------------------------------ heads
def head_from_moco(sd: dict, num_layers: int, dims: tuple[int, int, int], in_perm: np.ndarray,
                   fields: tuple[str, str], where: str) -> tuple[dict, dict]:
  """MoCo v3's `_build_mlp` Sequential → (params, batch_stats) of models.MLPHead.

  Its indices: (Linear 3i, BatchNorm 3i+1, ReLU 3i+2) per hidden layer, then Linear, BatchNorm
  without affine. dims = (input, hidden, output); `in_perm` reorders the input channels.
  """
  inp, hidden, out = dims
  params, stats = {}, {}
  for i in range(num_layers):
    last = i == num_layers - 1
    rows = out if last else hidden
    cols = inp if i == 0 else hidden
    field = fields[1] if last else fields[0]
    params[f'dense{i}'] = _linear(sd, str(3 * i), rows, cols, field, where,
                                  in_perm=in_perm if i == 0 else None, bias=False)
    bn = str(3 * i + 1)
    stats[f'bn{i}'] = {'mean': _get(sd, bn + '.running_mean', (rows,), field, where),
                       'var': _get(sd, bn + '.running_var', (rows,), field, where)}
    if not last:
      params[f'bn{i}'] = {'scale': _get(sd, bn + '.weight', (rows,), field, where),
                          'bias': _get(sd, bn + '.bias', (rows,), field, where)}
  return params, stats


def head_to_moco(params: dict, stats: dict, num_layers: int) -> dict[str, np.ndarray]:
  """models.MLPHead → MoCo v3's `_build_mlp` state dict (the inverse of head_from_moco)."""
  sd = {}
  for i in range(num_layers):
    sd[f'{3 * i}.weight'] = np.asarray(params[f'dense{i}']['kernel']).T
    bn = f'{3 * i + 1}.'
    sd[bn + 'running_mean'] = np.asarray(stats[f'bn{i}']['mean'])
    sd[bn + 'running_var'] = np.asarray(stats[f'bn{i}']['var'])
    if i < num_layers - 1:
      sd[bn + 'weight'] = np.asarray(params[f'bn{i}']['scale'])
      sd[bn + 'bias'] = np.asarray(params[f'bn{i}']['bias'])
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


# ------------------------------------------------------------------------------------ decoder
def decoder_from_mae(sd: dict, config, in_perm: np.ndarray, out_dim: int,
                     where: str = 'decoder') -> dict:
  """MAE's decoder keys → flax params of models.Decoder (unscanned)."""
  m = config.model
  dd, de = m.decoder_width, models.vit_dims(m)['width']
  depth = _depth_of(sd, 'decoder_blocks.')
  if depth != m.decoder_depth:
    raise InteropError(f'{where}: the file has {depth} decoder blocks but the config has '
                       f'{m.decoder_depth}; change config.model.decoder_depth to {depth}')
  num_patches = (config.image_size // models.vit_dims(m)['patch_size']) ** 2
  pos = sd.get('decoder_pos_embed')
  if pos is not None:
    want = sincos_with_cls(dd, int(round(math.sqrt(num_patches))))
    _get(sd, 'decoder_pos_embed', want.shape, 'image_size', where)
    if np.abs(np.asarray(pos) - want).max() > 1e-4:
      raise InteropError(f'{where}: "decoder_pos_embed" is not the fixed sin-cos table (with a zero '
                         'cls row) this decoder uses')
  ident = np.arange(dd)
  t = {'norm': _norm(sd, 'decoder_norm', dd, ident, where)}
  for i in range(depth):
    b = f'decoder_blocks.{i}.'
    t[f'block{i:02d}'] = {
        'LayerNorm_0': _norm(sd, b + 'norm1', dd, ident, where),
        'attn': {'qkv': _linear(sd, b + 'attn.qkv', 3 * dd, dd, 'model.decoder_width', where),
                 'out': _linear(sd, b + 'attn.proj', dd, dd, 'model.decoder_width', where)},
        'LayerNorm_1': _norm(sd, b + 'norm2', dd, ident, where),
        'mlp_in': _linear(sd, b + 'mlp.fc1', 4 * dd, dd, 'model.decoder_width', where),
        'mlp_out': _linear(sd, b + 'mlp.fc2', dd, 4 * dd, 'model.decoder_width', where),
    }
  return {
      'embed': _linear(sd, 'decoder_embed', dd, de, 'model.decoder_width', where, in_perm=in_perm),
      'mask_token': _get(sd, 'mask_token', (1, 1, dd), 'model.decoder_width', where),
      'transformer': t,
      'pred': _linear(sd, 'decoder_pred', out_dim, dd, 'model.variant (its patch size)', where),
  }


def decoder_to_mae(params: dict, num_patches: int) -> dict[str, np.ndarray]:
  """Flax models.Decoder params → MAE's decoder keys (numpy)."""
  t = params['transformer']
  dd = np.asarray(params['embed']['kernel']).shape[1]
  sd = {'decoder_embed.weight': np.asarray(params['embed']['kernel']).T,
        'decoder_embed.bias': np.asarray(params['embed']['bias']),
        'mask_token': np.asarray(params['mask_token']),
        'decoder_pos_embed': sincos_with_cls(dd, int(round(math.sqrt(num_patches)))),
        'decoder_norm.weight': np.asarray(t['norm']['scale']),
        'decoder_norm.bias': np.asarray(t['norm']['bias']),
        'decoder_pred.weight': np.asarray(params['pred']['kernel']).T,
        'decoder_pred.bias': np.asarray(params['pred']['bias'])}
  for i, b in enumerate(unstack_blocks(t)):
    sd.update(block_to_timm(b, f'decoder_blocks.{i}.'))
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


# ------------------------------------------------------------------------------------ whole models
PARTS = ('encoder', 'projector', 'predictor', 'decoder')


def variables_from_state_dict(sd: dict, config, *, encoder: str = 'online',
                              interpolate_pos: bool = False, where: str = 'checkpoint',
                              parts: tuple[str, ...] = PARTS) -> dict:
  """A flat state dict of any known layout → {'params': {...}, 'batch_stats': {...}} for `config`.

  `encoder` picks MoCo v3's base ('online') or momentum encoder. Always has params['encoder'];
  'projector' (with its batch_stats) when the chosen encoder has MoCo v3's head, 'predictor' when
  the file has one, 'decoder' for MAE files; only those in `parts` are converted (and checked).
  Blocks are laid out as config.model.scan wants.
  """
  layout, layout_parts = split_layout(sd)
  if encoder not in layout_parts:
    raise InteropError(f'{where}: a {layout} file has no {encoder} encoder (it has: '
                       f'{", ".join(sorted(layout_parts))})')
  dims = models.vit_dims(config.model)
  enc_sd = layout_parts[encoder]
  head = _strip(enc_sd, 'head.')
  params, stats = {}, {}
  params['encoder'], perm = encoder_from_timm(enc_sd, dims, config.image_size,
                                              interpolate_pos=interpolate_pos,
                                              where=f'{where} ({layout}, {encoder} encoder)')
  m = config.model
  if layout == 'mocov3' and head and 'projector' in parts:
    params['projector'], stats['projector'] = head_from_moco(
        head, 3, (dims['width'], m.proj_hidden, m.proj_dim), perm,
        ('model.proj_hidden', 'model.proj_dim'), f'{where} ({encoder} encoder head)')
  if 'predictor' in layout_parts and 'predictor' in parts:
    params['predictor'], stats['predictor'] = head_from_moco(
        layout_parts['predictor'], 2, (m.proj_dim, m.pred_hidden, m.proj_dim), np.arange(m.proj_dim),
        ('model.pred_hidden', 'model.proj_dim'), f'{where} (predictor)')
  if 'decoder' in layout_parts and 'decoder' in parts:
    params['decoder'] = decoder_from_mae(layout_parts['decoder'], config, perm,
                                         dims['patch_size'] ** 2 * 3, f'{where} (decoder)')
  return {'params': stack_if_scanned(params, bool(m.scan)), 'batch_stats': stats}


def mocov3_state_dict(online: dict, momentum: dict | None, config) -> dict[str, np.ndarray]:
  """Our mocov3 variables → MoCo v3's `state_dict` (what a MoCo v3 `.pth.tar` holds)."""
  dims = models.vit_dims(config.model)
  sd = {}
  for name, v in (('base_encoder', online), ('momentum_encoder', momentum)):
    if v is None:
      continue
    enc = encoder_to_timm(v['params']['encoder'], dims, config.image_size)
    enc.update({f'head.{k}': x for k, x in head_to_moco(
        v['params']['projector'], v['batch_stats']['projector'], 3).items()})
    sd.update({f'module.{name}.{k}': x for k, x in enc.items()})
  if 'predictor' in online['params']:
    sd.update({f'module.predictor.{k}': x for k, x in head_to_moco(
        online['params']['predictor'], online['batch_stats']['predictor'], 2).items()})
  return sd
