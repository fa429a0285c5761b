"""A pre-training workdir as the evaluation tools see it: its config, one restored checkpoint, and
the `eval/` folder where every tool writes its result.

  restored = restore.load_workdir('workdirs/digits_macrl')            # latest step, online encoder
  restored = restore.load_workdir(DIR, step=250, params='momentum')   # the EMA encoder of step 250

The checkpoint is restored into the abstract state of the same `train_step.Trainer` that
pre-training builds from the workdir's config.json, so a tool reads exactly what the train program
wrote. Only `params['encoder']` (and `params['decoder']` for pictures) is relied on: every method's
state has them.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import ml_collections

from macrl_jax import checkpoint, models, presets, sharding, train_step
from macrl_jax.errors import UserError

PARAMS = ('online', 'momentum')


class WorkdirError(UserError):
  """A workdir the tools cannot use; the message says why and what to do."""


class Restored(NamedTuple):
  config: ml_collections.ConfigDict
  step: int  # the pre-training step of the checkpoint (0 for a random init)
  modules: models.Modules
  encoder_params: Any  # the encoder chosen by `params` ('online' or 'momentum')
  decoder_params: Any  # None when the method has no decoder
  state: Any  # the whole restored train state (jax arrays on `mesh`)
  mesh: jax.sharding.Mesh
  workdir: str | None
  params: str  # 'online' | 'momentum' (which encoder `encoder_params` is)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The workdir's config.json as a ConfigDict; fields added to the schema since are defaulted."""
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise WorkdirError(f'workdir {workdir} does not exist; pre-train first with '
                       f'python main.py --workdir={workdir} ...')
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise WorkdirError(f'{workdir} has no config.json, so it is not a pre-training workdir (the '
                       f'train program writes config.json when it starts); pass the --workdir of '
                       f'a `python main.py` run')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  _fill_missing(config, presets.base_config())
  return config


def _fill_missing(config, defaults) -> None:
  for key, value in defaults.items():
    if key not in config:
      config[key] = value
    elif isinstance(value, ml_collections.ConfigDict) and isinstance(config[key],
                                                                     ml_collections.ConfigDict):
      _fill_missing(config[key], value)


def available_steps(workdir: str) -> list[int]:
  ckpt_dir = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())


def abstract_state(config, mesh) -> tuple[train_step.Trainer, Any]:
  """The Trainer of `config` and its state as ShapeDtypeStructs laid out on `mesh`.

  The Trainer is built on one device: its checks of the batch against the device count concern
  pre-training, not a tool that may run on another number of devices. The state is then laid out
  on the whole mesh as pre-training would (replicated, or split with sharding.fsdp).
  """
  trainer = train_step.Trainer(config, sharding.make_mesh(jax.devices()[:1]))
  shardings = sharding.state_shardings(trainer.abstract_state, mesh, config.sharding.fsdp)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          trainer.abstract_state, shardings)
  return trainer, abstract


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


def load_workdir(workdir: str, step: int | None = None, params: str = 'online',
                 data_dir: str | None = None, mesh=None) -> Restored:
  """Restores `step` (default: the latest) of a pre-training workdir; see the module docstring.

  `data_dir` replaces the config's TFDS data dir (e.g. the data were prepared elsewhere).
  """
  workdir = os.path.abspath(workdir)
  config = load_config(workdir)
  if data_dir:
    config.data_dir = data_dir
  if params not in PARAMS:
    raise WorkdirError(f'--params={params!r}: expected one of {", ".join(PARAMS)}')
  # Known before reading any array; other methods (mimco) are checked on the restored state.
  if params == 'momentum' and config.method in ('mae', 'mocov3', 'macrl'):
    if not presets.uses_contrastive(config):
      raise _no_momentum_encoder(config)
  steps = available_steps(workdir)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if not steps:
    raise WorkdirError(f'no checkpoint in {ckpt_dir}; pre-train first with '
                       f'python main.py --workdir={workdir} ...')
  if step is not None and step not in steps:
    raise WorkdirError(f'no checkpoint at step {step} in {ckpt_dir}; available steps: {steps}')

  mesh = mesh or sharding.make_mesh()
  trainer, abstract = abstract_state(config, mesh)
  mngr = checkpoint.manager(workdir, async_save=False)
  try:
    restored = checkpoint.restore_latest(mngr, abstract, step)
  finally:
    mngr.close()
  if restored is None:  # every checkpoint was unreadable (the tools leave them where they are)
    raise WorkdirError(f'no readable checkpoint in {ckpt_dir} (steps {steps} cannot be read); '
                       f'rerun the pre-training, python main.py --workdir={workdir} ..., which '
                       f'moves them aside and starts again')
  state, meta = restored
  return Restored(config, int(meta['step']), trainer.modules, _encoder(state, params, config),
                  state['params'].get('decoder'), state, mesh, workdir, params)


def random_init(config, seed: int | None = None, mesh=None) -> Restored:
  """The same model as a workdir of `config` would hold, freshly initialised (the baseline)."""
  mesh = mesh or sharding.make_mesh()
  trainer = train_step.Trainer(config, sharding.make_mesh(jax.devices()[:1]))
  state = trainer.init_state(seed)
  state = jax.device_put(state, sharding.replicated(mesh))
  return Restored(config, 0, trainer.modules, state['params']['encoder'],
                  state['params'].get('decoder'), state, mesh, None, 'online')


def load_init_file(workdir: str, path: str, params: str = 'online', data_dir: str | None = None,
                   mesh=None) -> Restored:
  """The workdir's config with its model initialised from a PyTorch file (config.init) instead of
  a checkpoint: a public MoCo v3 / MAE / timm ViT evaluated by the tools on this workdir's data."""
  config = load_config(workdir)
  if data_dir:
    config.data_dir = data_dir
  config.init = os.path.abspath(path)
  try:
    restored = random_init(config, mesh=mesh)
    encoder = _encoder(restored.state, params, config)
  except ValueError as e:  # interop.InteropError: the message names the tensor and the field
    raise WorkdirError(f'--init: {e}') from None
  return restored._replace(encoder_params=encoder, workdir=os.path.abspath(workdir), params=params)


def require_pixel_decoder(restored: Restored) -> None:
  """Reconstruction pictures need a decoder that predicts pixels (macrl, mae)."""
  if restored.decoder_params is None or not presets.uses_reconstruction(restored.config):
    raise WorkdirError(f'method={restored.config.method} has no pixel decoder to draw '
                       f'reconstructions with (macrl and mae have one)')


def result_path(workdir: str, name: str) -> str:
  """DIR/eval/<name>.json: where a tool writes its result."""
  return os.path.join(os.path.abspath(workdir), 'eval', f'{name}.json')


def write_result(path: str, result: dict) -> str:
  """Writes `result` as JSON (process 0 only); returns the path."""
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      json.dump(result, f, indent=2, sort_keys=True)
  return path
