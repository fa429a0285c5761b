"""Training checkpoints in the official codes' own formats, from a train state (numpy, no torch).

MoCo v3's `main_moco.py` saves {'epoch', 'arch', 'state_dict', 'optimizer', 'scaler'} and reads it
back with --resume: `model.load_state_dict(state_dict)` (strict, so every parameter and buffer of its
MoCo_ViT, BatchNorm's `num_batches_tracked` included), then `optimizer.load_state_dict(...)`, which
matches optimizer state to parameters by their index in `model.parameters()`. `main_lincls.py` reads
the same file's 'module.base_encoder.*' entries. So the state dict here lists the keys in the order
PyTorch registers them (a module's own parameters, then its children's, in order), and AdamW's state
is numbered by that order with the buffers left out.
"""

from __future__ import annotations

import jax
import numpy as np
import optax

from macrl_jax.interop.state_dicts import head_to_moco
from macrl_jax.interop.timm_vit import encoder_to_timm
from macrl_jax.models import vit

BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked')
# timm's Block registers norm1, attn (qkv, proj), norm2, mlp (fc1, fc2); `ls`/`drop_path` hold none.
_BLOCK_ORDER = ('norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2')
_TOP_ORDER = ('cls_token', 'pos_embed', 'patch_embed', 'blocks', 'norm', 'head')
_TENSOR_ORDER = ('weight', 'bias') + BUFFERS


def _vit_key_order(key: str) -> tuple:
  """Sort key of a timm VisionTransformer state-dict key (with MoCo v3's MLP as `head`)."""
  parts = key.split('.')
  top = _TOP_ORDER.index(parts[0])
  if parts[0] == 'blocks':
    inner = '.'.join(parts[2:-1])
    return top, int(parts[1]), _BLOCK_ORDER.index(inner), _TENSOR_ORDER.index(parts[-1])
  if parts[0] == 'head':
    return top, int(parts[1]), _TENSOR_ORDER.index(parts[-1])
  return (top, 0, 0, _TENSOR_ORDER.index(parts[-1]) if parts[-1] in _TENSOR_ORDER else 0)


def _mlp_key_order(key: str) -> tuple:
  index, tensor = key.split('.')
  return int(index), _TENSOR_ORDER.index(tensor)


def _head(params, stats, num_layers: int, steps: int) -> dict[str, np.ndarray]:
  sd = head_to_moco(params, stats, num_layers)
  for i in range(num_layers):  # BatchNorm1d counts the batches it has seen
    sd[f'{3 * i + 1}.num_batches_tracked'] = np.asarray(steps, np.int64)
  return sd


def _encoder_with_head(encoder, projector, projector_stats, config, steps: int) -> dict:
  dims = vit.vit_dims(config.model)
  sd = encoder_to_timm(encoder, dims, config.image_size)
  if projector is not None:
    sd.update({f'head.{k}': v for k, v in _head(projector, projector_stats, 3, steps).items()})
  return dict(sorted(sd.items(), key=lambda kv: _vit_key_order(kv[0])))


def mocov3_parts(params: dict, stats: dict, ema_params: dict | None, ema_stats: dict | None,
                 config, steps: int = 0) -> dict[str, dict[str, np.ndarray]]:
  """MoCo_ViT's three children, each a state dict in PyTorch's registration order."""
  parts = {'base_encoder': _encoder_with_head(params['encoder'], params.get('projector'),
                                              stats.get('projector'), config, steps)}
  if ema_params is not None:
    parts['momentum_encoder'] = _encoder_with_head(
        ema_params['encoder'], ema_params.get('projector'), (ema_stats or {}).get('projector'),
        config, steps)
  if 'predictor' in params:
    head = _head(params['predictor'], stats['predictor'], 2, steps)
    parts['predictor'] = dict(sorted(head.items(), key=lambda kv: _mlp_key_order(kv[0])))
  return parts


def _adam_state(opt_state):
  """(count, mu, nu) of the optax AdamW inside `opt_state` (alone, or after gradient clipping)."""
  is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)
  adam, = [s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
  return int(np.asarray(adam.count)), adam.mu, adam.nu


def mocov3_checkpoint(state: dict, config, epoch: int, lr: float) -> dict:
  """What MoCo v3's main_moco.py saves, from a mocov3 (or macrl) train state (numpy leaves).

  AdamW's moments are converted as the parameters are (the conversions are linear); the momentum
  encoder and the fixed position table get no optimizer state, as in MoCo v3, where they do not
  require gradients. The GradScaler state is a fresh one's: this codebase's float32/bf16 steps do
  not scale the loss.
  """
  steps = int(np.asarray(state['step']))
  count, mu, nu = _adam_state(state['opt_state'])
  model = mocov3_parts(state['params'], state['batch_stats'], state.get('ema_params'),
                       state.get('ema_batch_stats'), config, steps)
  zero_stats = _zeros_like(state['batch_stats'])
  moments = [mocov3_parts(m, zero_stats, None, None, config) for m in (mu, nu)]

  state_dict, adam, index = {}, {}, 0
  for part, sd in model.items():
    for key, value in sd.items():
      state_dict[f'module.{part}.{key}'] = value
      if key.split('.')[-1] in BUFFERS:
        continue
      if part != 'momentum_encoder' and key != 'pos_embed':
        adam[index] = {'step': np.asarray(float(count), np.float32),
                       'exp_avg': moments[0][part][key], 'exp_avg_sq': moments[1][part][key]}
      index += 1
  o = config.optim
  group = dict(lr=float(lr), betas=(o.b1, o.b2), eps=1e-8, weight_decay=o.weight_decay,
               amsgrad=False, maximize=False, foreach=None, capturable=False, differentiable=False,
               fused=None, params=list(range(index)))
  scaler = dict(scale=65536.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                _growth_tracker=0)
  return dict(epoch=int(epoch), arch=f'vit_{config.model.variant}', state_dict=state_dict,
              optimizer=dict(state=adam, param_groups=[group]), scaler=scaler)


def _zeros_like(tree):
  if isinstance(tree, dict):
    return {k: _zeros_like(v) for k, v in tree.items()}
  return np.zeros_like(np.asarray(tree))
