"""A pre-training workdir as the tools and MimCo's teacher read it: its config and a restored
checkpoint (tool_io.py holds the tools' flags that name them and where results go).

  restored = restore.load_workdir('workdirs/digits_macrl')            # latest step, online encoder
  restored = restore.load_workdir(DIR, step=250, params='momentum')   # the EMA encoder of step 250

A checkpoint is restored into the state that build.build makes from the workdir's config.json, so a
tool reads exactly what the train program wrote. Only `params['encoder']` (and `params['decoder']`
for pictures) is relied on: every method's state has them. The tools never change the workdir they
read. A workdir they cannot use raises WorkdirError, which a tool's command line prints as one line
(exit status 2).
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import ml_collections

from macrl_jax import errors, sharding
from macrl_jax.config import schema
from macrl_jax.methods import build, networks
from macrl_jax.run import checkpoint

PARAMS = ('online', 'momentum')


class WorkdirError(errors.UserError):
  """A workdir the tools cannot use; the message says why and what to do."""


class Restored(NamedTuple):
  config: ml_collections.ConfigDict
  step: int  # the pre-training step of the checkpoint (0 for a random init)
  modules: networks.Modules
  encoder_params: Any  # the encoder chosen by `params` ('online' or 'momentum')
  decoder_params: Any  # None when the method has no decoder
  state: Any  # the whole train state (jax arrays on `mesh`)
  mesh: jax.sharding.Mesh
  workdir: str | None
  params: str  # 'online' | 'momentum' (which encoder `encoder_params` is)


# ----------------------------------------------------------------------------------- reading
def load_config(path: str) -> ml_collections.ConfigDict:
  """The workdir's config.json as a ConfigDict; fields added to the schema since are defaulted."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise WorkdirError(f'workdir {path} does not exist; pre-train first with '
                       f'python main.py --workdir={path} ...')
  file = os.path.join(path, 'config.json')
  if not os.path.isfile(file):
    raise WorkdirError(f'{path} has no config.json, so it is not a pre-training workdir (the '
                       f'train program writes config.json when it starts); pass the --workdir of '
                       f'a `python main.py` run')
  try:
    with open(file) as f:
      config = ml_collections.ConfigDict(json.load(f))
  except ValueError as e:
    raise WorkdirError(f'{file} cannot be parsed ({e}); it was torn by a crash: rerun the '
                       f'pre-training, python main.py --workdir={path} ..., which writes it '
                       'again') from None
  _fill_missing(config, schema.base_config())
  return config


def _fill_missing(config, defaults) -> None:
  for key, value in defaults.items():
    if key not in config:
      config[key] = value
    elif isinstance(value, ml_collections.ConfigDict) and isinstance(config[key],
                                                                     ml_collections.ConfigDict):
      _fill_missing(config[key], value)


def abstract_state(config, mesh) -> Any:
  """The train state of `config` as ShapeDtypeStructs laid out on `mesh` as pre-training lays it
  out (replicated, or split with sharding.fsdp).

  Built on one device: the checks of the batch against the device count concern pre-training, not
  a reader that may run on another number of devices.
  """
  abstract = build.build(config, sharding.make_mesh(jax.devices()[:1])).abstract_state
  return sharding.with_shardings(abstract,
                                 sharding.state_shardings(abstract, mesh, config.sharding.fsdp))


def restore_state(path: str, abstract: Any, step: int | None = None,
                  partial: bool = False) -> tuple[Any, dict]:
  """(state, meta) of checkpoint `step` (default: the newest readable one) of the workdir `path`,
  read into `abstract`; with `partial`, `abstract` is a part of the saved state and only its
  arrays are read. An unreadable checkpoint is skipped, not moved."""
  mngr = checkpoint.manager(path, async_save=False, create=False)
  try:
    restored = checkpoint.restore_latest(mngr, abstract, step, partial=partial)
  finally:
    mngr.close()
  if restored is None:
    path = os.path.abspath(path)
    raise WorkdirError(f'no readable checkpoint in {os.path.join(path, "checkpoints")} (steps '
                       f'{checkpoint.steps(path)} cannot be read); rerun the pre-training, python '
                       f'main.py --workdir={path} ..., which moves them aside and starts again')
  return restored


def check_state(path: str, part: Any, step: int | None = None) -> None:
  """Raises unless checkpoint `step` (default: the newest) of `path` holds the arrays of `part`
  with their shapes; reads the checkpoint's metadata only."""
  step = max(checkpoint.steps(path)) if step is None else step
  mngr = checkpoint.manager(path, async_save=False, create=False)
  try:
    meta = checkpoint.read_meta(mngr, step)
  finally:
    mngr.close()
  where = os.path.join(os.path.abspath(path), 'checkpoints', str(step))
  checkpoint.check_compatible(meta, where, part, partial=True)


def _no_momentum_encoder(config) -> WorkdirError:
  return WorkdirError(f'--params=momentum: method={config.method} has no momentum encoder (only '
                      f'the contrastive methods macrl and mocov3 keep one); use --params=online')


def _encoder(state, params: str, config):
  if params == 'online':
    return state['params']['encoder']
  ema = state.get('ema_params') or {}
  if 'encoder' not in ema:
    raise _no_momentum_encoder(config)
  return ema['encoder']


def load_workdir(path: str, step: int | None = None, params: str = 'online',
                 data_dir: str | None = None, mesh=None) -> Restored:
  """Restores `step` (default: the latest) of a pre-training workdir; see the module docstring.

  `data_dir` replaces the config's TFDS data dir (e.g. the data were prepared elsewhere).
  """
  path = os.path.abspath(path)
  config = load_config(path)
  if data_dir:
    config.data_dir = data_dir
  if params not in PARAMS:
    raise WorkdirError(f'--params={params!r}: expected one of {", ".join(PARAMS)}')
  # Known before reading any array; other methods (mimco) are checked on the restored state.
  if params == 'momentum' and config.method in ('mae', 'mocov3', 'macrl'):
    if not schema.uses_contrastive(config):
      raise _no_momentum_encoder(config)
  steps = checkpoint.steps(path)
  ckpt_dir = os.path.join(path, 'checkpoints')
  if not steps:
    raise WorkdirError(f'no checkpoint in {ckpt_dir}; pre-train first with '
                       f'python main.py --workdir={path} ...')
  if step is not None and step not in steps:
    raise WorkdirError(f'no checkpoint at step {step} in {ckpt_dir}; available steps: {steps}')

  mesh = mesh or sharding.make_mesh()
  state, meta = restore_state(path, abstract_state(config, mesh), step)
  return Restored(config, int(meta['step']), build.METHODS[config.method].make_modules(config),
                  _encoder(state, params, config), state['params'].get('decoder'), state, mesh,
                  path, params)


def random_init(config, seed: int | None = None, mesh=None) -> Restored:
  """The same model as a workdir of `config` would hold, freshly initialised (the baseline).

  A MimCo state keeps its teacher placeholder: the tools read the student only.
  """
  mesh = mesh or sharding.make_mesh()
  built = build.build(config, sharding.make_mesh(jax.devices()[:1]))
  state = jax.device_put(built.init_state(seed), sharding.replicated(mesh))
  return Restored(config, 0, built.modules, state['params']['encoder'],
                  state['params'].get('decoder'), state, mesh, None, 'online')


def load_init_file(path: str, file: str, params: str = 'online', data_dir: str | None = None,
                   mesh=None) -> Restored:
  """The workdir's config with its model initialised from a PyTorch file (config.init) instead of
  a checkpoint: a public MoCo v3 / MAE / timm ViT evaluated by the tools on this workdir's data."""
  config = load_config(path)
  if data_dir:
    config.data_dir = data_dir
  config.init = os.path.abspath(file)
  try:
    restored = random_init(config, mesh=mesh)
    encoder = _encoder(restored.state, params, config)
  except ValueError as e:  # interop.InteropError: the message names the tensor and the field
    raise WorkdirError(f'--init: {e}') from None
  return restored._replace(encoder_params=encoder, workdir=os.path.abspath(path), params=params)


def require_pixel_decoder(restored: Restored) -> None:
  """Reconstruction pictures need a decoder that predicts pixels (macrl, mae)."""
  if restored.decoder_params is None or not schema.uses_reconstruction(restored.config):
    raise WorkdirError(f'method={restored.config.method} has no pixel decoder to draw '
                       f'reconstructions with (macrl and mae have one)')
