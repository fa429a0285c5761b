"""Reading and writing PyTorch-side files: .safetensors, .pth / .pth.tar (torch.load).

Imported only when such a file is given, so that the rest of the codebase never needs torch.
Safetensors files are read and written with numpy alone; .pth files need torch. A missing package
fails with one line naming requirements-interop.txt.

  variables = torch_files.load_variables('vit-s-300ep.pth.tar', config)   # MoCo v3, MAE, timm
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from macrl_jax.interop import state_dicts
from macrl_jax.interop.timm_vit import InteropError
from macrl_jax.models import vit

INSTALL = 'pip install -r requirements-interop.txt'
TORCH_SUFFIXES = ('.pth', '.pth.tar', '.pt', '.tar', '.bin', '.ckpt')


def _require(module: str, why: str):
  try:
    return __import__(module, fromlist=['_'])
  except ImportError:
    raise InteropError(f'{why} needs the optional package {module.split(".")[0]}: {INSTALL}') from None


def meta_path(path: str) -> str:
  """The JSON of timm keyword arguments written beside F.safetensors: F.json."""
  return os.path.splitext(path)[0] + '.json'


def read_state_dict(path: str) -> tuple[dict[str, np.ndarray], dict | None]:
  """(flat state dict as numpy, the JSON beside it or None). Unwraps MoCo v3's 'state_dict' and
  MAE's 'model'. Pickles are read with weights_only=True: nothing but tensors, plain Python values
  and argparse.Namespace (MAE's 'args') is unpickled."""
  if not os.path.isfile(path):
    raise InteropError(f'{path}: no such file')
  meta = None
  if os.path.isfile(meta_path(path)) and meta_path(path) != path:
    with open(meta_path(path)) as f:
      meta = json.load(f)
  if path.endswith('.safetensors'):
    st = _require('safetensors.numpy', 'reading .safetensors')
    try:
      return dict(st.load_file(path)), meta
    except Exception as e:  # a truncated or foreign file: safetensors' own message says which
      raise InteropError(f'{path}: not a readable safetensors file ({e})') from None
  if not path.endswith(TORCH_SUFFIXES):
    raise InteropError(f'{path}: unknown file type; expected .safetensors or a torch file '
                       f'({", ".join(TORCH_SUFFIXES)})')
  torch = _require('torch', 'reading a .pth file')
  try:
    # MAE's training checkpoints keep their argparse.Namespace under 'args': that class, and no
    # other, may be unpickled besides tensors and plain Python values.
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:
    raise InteropError(f'{path}: torch.load(weights_only=True) cannot read it, so it is not a plain '
                       f'checkpoint of tensors ({type(e).__name__}: {_reason(e)})') from None
  if isinstance(obj, dict):
    for key in ('state_dict', 'model'):  # MoCo v3, MAE
      if isinstance(obj.get(key), dict):
        obj = obj[key]
        break
  if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
    kind = type(obj).__name__ if not isinstance(obj, dict) else (
        f'a dict with keys {list(obj)[:5]}, not all tensors')
    raise InteropError(f'{path}: not a state dict (it holds {kind}); expected a dict of tensors, '
                       "or one under 'state_dict' (MoCo v3) or 'model' (MAE)")
  return {k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy()
          for k, v in obj.items()}, meta


def _reason(error: Exception) -> str:
  """The line of torch.load's message that says why: the unsupported global, if that is why."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  named = [line for line in lines if 'Unsupported global' in line]
  return (named or lines or [type(error).__name__])[0]


def load_variables(path: str, config, *, encoder: str = 'online', interpolate_pos: bool = False,
                   parts: tuple[str, ...] = state_dicts.PARTS) -> dict:
  """The file's variables for `config` ({'params', 'batch_stats'}, numpy; see
  state_dicts.variables_from_state_dict)."""
  sd, meta = read_state_dict(path)
  if meta and 'num_heads' in meta:
    heads = vit.vit_dims(config.model)['num_heads']
    if int(meta['num_heads']) != heads:
      raise InteropError(f'{path}: {meta_path(path)} says num_heads={meta["num_heads"]} but the config '
                         f'has {heads}; change config.model.num_heads to {meta["num_heads"]}')
  return state_dicts.variables_from_state_dict(
      sd, config, encoder=encoder, interpolate_pos=interpolate_pos, where=path, parts=parts)


def write_safetensors(path: str, sd: dict[str, np.ndarray], meta: dict | None = None) -> None:
  st = _require('safetensors.numpy', 'writing .safetensors')
  st.save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, path)
  if meta is not None:
    with open(meta_path(path), 'w') as f:
      json.dump(meta, f, indent=2, sort_keys=True)


def write_torch(path: str, obj) -> None:
  """torch.save of nested dicts and lists whose numpy arrays become tensors (other values, such as
  numbers and strings, are saved as they are)."""
  torch = _require('torch', 'writing a .pth file')

  def convert(x):
    if isinstance(x, dict):
      return {k: convert(v) for k, v in x.items()}
    if isinstance(x, list):
      return [convert(v) for v in x]
    if hasattr(x, 'shape'):  # numpy or jax arrays
      return torch.from_numpy(np.array(x))  # a writable copy
    return x
  torch.save(convert(obj), path)


def initialise(state: dict, config, shardings) -> dict:
  """The train state `state` with the parts of config.init's file that the method has: the encoder
  always; projector, predictor (MoCo v3 files) and decoder (MAE files) for the methods that train
  them. The momentum networks take the file's momentum encoder if it has one, else the online one
  (MoCo starts them as copies)."""
  from macrl_jax.config import schema  # noqa: E402
  parts = ['encoder']
  if schema.uses_contrastive(config):
    parts += ['projector', 'predictor']
  if schema.uses_reconstruction(config):
    parts.append('decoder')
  kw = dict(interpolate_pos=config.init_interpolate_pos, parts=tuple(parts))
  loaded = load_variables(config.init, config, **kw)
  state = dict(state, params=dict(state['params']), batch_stats=dict(state['batch_stats']))
  _put(state, 'params', loaded['params'], config.init)
  _put(state, 'batch_stats', loaded['batch_stats'], config.init)
  if 'ema_params' in state:
    try:
      momentum = load_variables(config.init, config, encoder='momentum', **kw)
    except InteropError:  # no momentum encoder in the file: copies of the online networks
      momentum = loaded
    state['ema_params'], state['ema_batch_stats'] = dict(state['ema_params']), dict(
        state['ema_batch_stats'])
    _put(state, 'ema_params', {k: v for k, v in momentum['params'].items()
                               if k in ('encoder', 'projector')}, config.init)
    _put(state, 'ema_batch_stats', {k: v for k, v in momentum['batch_stats'].items()
                                    if k == 'projector'}, config.init)
  import jax  # noqa: PLC0415
  return jax.device_put(state, shardings)


def _put(state, collection, loaded, path):
  import jax  # noqa: PLC0415
  for part, tree in loaded.items():
    want = state[collection][part]
    if jax.tree.structure(want) != jax.tree.structure(tree):
      raise InteropError(f'{path}: its {part} does not have the layout of this config\'s {part}')
    for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(tree)):
      if a.shape != b.shape:
        raise InteropError(f'{path}: {part}{jax.tree_util.keystr(p)} has shape {b.shape} in the '
                           f'file but {a.shape} in this config')
    state[collection][part] = jax.tree.map(lambda a, b: np.asarray(b, a.dtype), want, tree)
