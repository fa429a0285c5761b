"""PyTorch state dicts <-> this codebase's flax parameters, on numpy arrays (no torch here): the
layouts, the ViT encoder against timm's, and the tensor checks every conversion shares. MoCo v3's
heads, MAE's decoder and whole state dicts are converted in state_dicts.py.

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

from macrl_jax.errors import UserError
from macrl_jax.models import vit


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
    parts = {'online': strip_prefix(sd, 'module.base_encoder.'),
             'momentum': strip_prefix(sd, 'module.momentum_encoder.'),
             'predictor': strip_prefix(sd, 'module.predictor.')}
    return 'mocov3', {k: v for k, v in parts.items() if v}
  if all(k.startswith('module.') for k in keys):  # DistributedDataParallel's prefix
    sd = strip_prefix(sd, 'module.')
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


def strip_prefix(sd, prefix):
  return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------ checks
def get_tensor(sd, key, shape, field, where):
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


def depth_of(sd, prefix='blocks.'):
  ids = {int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r'(\d+)\.', k)] if m}
  return max(ids) + 1 if ids else 0


# ------------------------------------------------------------------------------------ encoder
def sincos_with_cls(width: int, grid: int) -> np.ndarray:
  """Our position embeddings in timm's layout [1, 1 + grid², D], zero at the cls position."""
  return np.concatenate([np.zeros((1, width), np.float32), vit.sincos_2d(width, grid)])[None]


def _residual_permutation(pos: np.ndarray, width: int, where: str) -> np.ndarray:
  """The channel order that maps the file's sin-cos table onto ours (identity for MAE's order)."""
  grid = int(round(math.sqrt(pos.shape[0])))
  ours = vit.sincos_2d(width, grid)
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
  """A timm-named encoder → (flax params of vit.Encoder with unscanned blocks, channel perm).

  `perm` (identity unless the file is MoCo v3's) maps the file's residual channels to ours:
  our_feature = file_feature[perm]; heads reading the encoder's output use it (head_from_moco).
  """
  d, p, m = dims['width'], dims['patch_size'], dims['mlp_dim']
  if _first_dim_mismatch(sd, 'patch_embed.proj.weight', (d, 3, p, p)):
    shape = tuple(np.shape(sd['patch_embed.proj.weight']))
    field = 'model.width' if shape[0] != d else 'model.variant (its patch size)'
    get_tensor(sd, 'patch_embed.proj.weight', (d, 3, p, p), field, where)
  conv = get_tensor(sd, 'patch_embed.proj.weight', (d, 3, p, p), 'model.variant', where)
  conv_b = get_tensor(sd, 'patch_embed.proj.bias', (d,), 'model.width', where)
  cls = get_tensor(sd, 'cls_token', (1, 1, d), 'model.width', where)[0, 0]
  grid = image_size // p
  n = grid * grid
  pos = np.asarray(sd.get('pos_embed', np.zeros((0,))), np.float32)
  if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != d:
    get_tensor(sd, 'pos_embed', (1, 1 + n, d), 'model.width', where)
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

  depth = depth_of(sd)
  if depth != dims['depth']:
    raise InteropError(f'{where}: the file has {depth} blocks ("blocks.0." … "blocks.{depth - 1}.") '
                       f'but the config has {dims["depth"]}; change config.model.depth to {depth}')
  params = {
      # Conv [D, C, p, q] → Dense kernel [(p q C), D], the order vit.patchify flattens patches in.
      'embedding': {'kernel': conv[perm].transpose(2, 3, 1, 0).reshape(p * p * 3, d),
                    'bias': conv_b[perm]},
      'cls': cls[perm][None, None],
      'transformer': {'norm': norm(sd, 'norm', d, perm, where)},
  }
  for i in range(depth):
    b = f'blocks.{i}.'
    params['transformer'][f'block{i:02d}'] = {
        'LayerNorm_0': norm(sd, b + 'norm1', d, perm, where),
        'attn': {'qkv': linear(sd, b + 'attn.qkv', 3 * d, d, 'model.width', where, in_perm=perm),
                 'out': linear(sd, b + 'attn.proj', d, d, 'model.width', where, out_perm=perm)},
        'LayerNorm_1': norm(sd, b + 'norm2', d, perm, where),
        'mlp_in': linear(sd, b + 'mlp.fc1', m, d, 'model.mlp_dim', where, in_perm=perm),
        'mlp_out': linear(sd, b + 'mlp.fc2', d, m, 'model.mlp_dim', where, out_perm=perm),
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


def norm(sd, name, d, perm, where):
  """A LayerNorm's flax params from `name`.weight/.bias, channels reordered by `perm`."""
  return {'scale': get_tensor(sd, name + '.weight', (d,), 'model.width', where)[perm],
          'bias': get_tensor(sd, name + '.bias', (d,), 'model.width', where)[perm]}


def linear(sd, name, out, inp, field, where, in_perm=None, out_perm=None, bias=True):
  """A torch Linear [out, inp] as a flax Dense kernel [inp, out], its input and output channels
  reordered by `in_perm` and `out_perm`."""
  w = get_tensor(sd, name + '.weight', (out, inp), field, where)
  if in_perm is not None:
    w = w[:, in_perm]
  if out_perm is not None:
    w = w[out_perm]
  p = {'kernel': w.T.copy()}
  if bias:
    b = get_tensor(sd, name + '.bias', (out,), field, where)
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
