"""MoCo v3's heads, MAE's decoder and whole state dicts of the three layouts <-> flax variables.

The ViT encoder's conversion, the layouts and how the models differ are in timm_vit.py.
"""

from __future__ import annotations

import math

import numpy as np

from macrl_jax.interop.timm_vit import (block_to_timm, depth_of, encoder_from_timm, encoder_to_timm,
                                        get_tensor, linear, norm, sincos_with_cls, split_layout,
                                        stack_if_scanned, strip_prefix, unstack_blocks,
                                        InteropError)
from macrl_jax.models import vit


# ------------------------------------------------------------------------------------ heads
def head_from_moco(sd: dict, num_layers: int, dims: tuple[int, int, int], in_perm: np.ndarray,
                   fields: tuple[str, str], where: str) -> tuple[dict, dict]:
  """MoCo v3's `_build_mlp` Sequential → (params, batch_stats) of heads.MLPHead.

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
    params[f'dense{i}'] = linear(sd, str(3 * i), rows, cols, field, where,
                                  in_perm=in_perm if i == 0 else None, bias=False)
    bn = str(3 * i + 1)
    stats[f'bn{i}'] = {'mean': get_tensor(sd, bn + '.running_mean', (rows,), field, where),
                       'var': get_tensor(sd, bn + '.running_var', (rows,), field, where)}
    if not last:
      params[f'bn{i}'] = {'scale': get_tensor(sd, bn + '.weight', (rows,), field, where),
                          'bias': get_tensor(sd, bn + '.bias', (rows,), field, where)}
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
  """MAE's decoder keys → flax params of decoders.Decoder (unscanned)."""
  m = config.model
  dd, de = m.decoder_width, vit.vit_dims(m)['width']
  depth = depth_of(sd, 'decoder_blocks.')
  if depth != m.decoder_depth:
    raise InteropError(f'{where}: the file has {depth} decoder blocks but the config has '
                       f'{m.decoder_depth}; change config.model.decoder_depth to {depth}')
  num_patches = (config.image_size // vit.vit_dims(m)['patch_size']) ** 2
  pos = sd.get('decoder_pos_embed')
  if pos is not None:
    want = sincos_with_cls(dd, int(round(math.sqrt(num_patches))))
    get_tensor(sd, 'decoder_pos_embed', want.shape, 'image_size', where)
    if np.abs(np.asarray(pos) - want).max() > 1e-4:
      raise InteropError(f'{where}: "decoder_pos_embed" is not the fixed sin-cos table (with a zero '
                         'cls row) this decoder uses')
  ident = np.arange(dd)
  t = {'norm': norm(sd, 'decoder_norm', dd, ident, where)}
  for i in range(depth):
    b = f'decoder_blocks.{i}.'
    t[f'block{i:02d}'] = {
        'LayerNorm_0': norm(sd, b + 'norm1', dd, ident, where),
        'attn': {'qkv': linear(sd, b + 'attn.qkv', 3 * dd, dd, 'model.decoder_width', where),
                 'out': linear(sd, b + 'attn.proj', dd, dd, 'model.decoder_width', where)},
        'LayerNorm_1': norm(sd, b + 'norm2', dd, ident, where),
        'mlp_in': linear(sd, b + 'mlp.fc1', 4 * dd, dd, 'model.decoder_width', where),
        'mlp_out': linear(sd, b + 'mlp.fc2', dd, 4 * dd, 'model.decoder_width', where),
    }
  return {
      'embed': linear(sd, 'decoder_embed', dd, de, 'model.decoder_width', where, in_perm=in_perm),
      'mask_token': get_tensor(sd, 'mask_token', (1, 1, dd), 'model.decoder_width', where),
      'transformer': t,
      'pred': linear(sd, 'decoder_pred', out_dim, dd, 'model.variant (its patch size)', where),
  }


def decoder_to_mae(params: dict, num_patches: int) -> dict[str, np.ndarray]:
  """Flax decoders.Decoder params → MAE's decoder keys (numpy)."""
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
  dims = vit.vit_dims(config.model)
  enc_sd = layout_parts[encoder]
  head = strip_prefix(enc_sd, 'head.')
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
  dims = vit.vit_dims(config.model)
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
