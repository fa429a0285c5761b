r"""Exports a pre-trained encoder to PyTorch: timm's VisionTransformer naming, as safetensors.

  python tools/export.py --workdir=workdirs/digits_macrl [--step=N] [--params=online|momentum] \
      [--out=FILE.safetensors] [--pool=cls|mean] [--decoder] [--mocov3]

Writes FILE.safetensors (default DIR/export/encoder_<params>_step<N>.safetensors) and FILE.json,
the keyword arguments of timm's VisionTransformer that compute the same features as the JAX encoder
(global_pool 'token' for the cls feature, 'avg' with fc_norm=False for the mean of the patch tokens),
then prints the two lines of Python that load it with strict=True. --decoder also writes
FILE.mae.pth: {'model': encoder + decoder} in MAE's naming, for MAE's visualisation code (torch
needed). --mocov3 (mocov3 and macrl workdirs) also writes FILE.pth.tar, a training checkpoint as
MoCo v3's main_moco.py saves it: online and momentum encoders with their projectors, the predictor,
BatchNorm statistics and AdamW's state, which main_moco.py --resume and main_lincls.py --pretrained
read unchanged. Needs the optional requirements: pip install -r requirements-interop.txt.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402
from absl import flags  # noqa: E402

from macrl_jax.interop import mocov3_files, state_dicts, timm_vit, torch_files
from macrl_jax.methods import optim
from macrl_jax.models import vit
from macrl_jax.run import restore, tool_io

tool_io.define_flags()
_OUT = flags.DEFINE_string('out', None, 'Output .safetensors (default: see above).')
_POOL = flags.DEFINE_enum('pool', None, ['cls', 'mean'], "timm's pooling (default: the config's).")
_DECODER = flags.DEFINE_bool('decoder', False, "Also write FILE.mae.pth in MAE's naming.")
_MOCOV3 = flags.DEFINE_bool('mocov3', False, "Also write FILE.pth.tar, MoCo v3's training checkpoint.")


def main():
  restored = tool_io.load_from_flags()
  config = restored.config
  dims = vit.vit_dims(config.model)
  pool = _POOL.value or config.model.pool
  out = os.path.abspath(_OUT.value or os.path.join(
      restored.workdir, 'export', f'encoder_{restored.params}_step{restored.step}.safetensors'))
  if not out.endswith('.safetensors'):
    raise restore.WorkdirError(f'--out={out}: the file name must end in .safetensors')
  os.makedirs(os.path.dirname(out), exist_ok=True)
  encoder = timm_vit.encoder_to_timm(jax.device_get(restored.encoder_params), dims,
                                    config.image_size)
  kwargs = timm_vit.timm_kwargs(dims, config.image_size, pool)
  try:
    torch_files.write_safetensors(out, encoder, kwargs)
    written = [out, torch_files.meta_path(out)]
    if _DECODER.value:
      restore.require_pixel_decoder(restored)
      num_patches = (config.image_size // dims['patch_size']) ** 2
      decoder = jax.device_get(restored.decoder_params)
      mae = dict(encoder, **state_dicts.decoder_to_mae(decoder, num_patches))
      mae_path = out[:-len('.safetensors')] + '.mae.pth'
      torch_files.write_torch(mae_path, {'model': mae})
      written.append(mae_path)
    if _MOCOV3.value:
      moco_path = out[:-len('.safetensors')] + '.pth.tar'
      torch_files.write_torch(moco_path, mocov3_checkpoint(restored))
      written.append(moco_path)
  except timm_vit.InteropError as e:
    raise restore.WorkdirError(str(e)) from None
  result = dict(out=written, step=restored.step, params=restored.params, pool=pool, timm=kwargs)
  tool_io.report(tool_io.result_path(restored.workdir, 'export'), result,
                 f'Encoder ({restored.params}, step {restored.step}) → {", ".join(written)}\n'
                 'Load it in PyTorch (pip install -r requirements-interop.txt):\n'
                 'import json, safetensors.torch, timm\n'
                 f'model = timm.models.VisionTransformer(**json.load(open({torch_files.meta_path(out)!r}))); '
                 f'model.load_state_dict(safetensors.torch.load_file({out!r}), strict=True)')


def mocov3_checkpoint(restored: restore.Restored) -> dict:
  """The workdir's train state as MoCo v3's main_moco.py saves it (epoch counted from the data)."""
  from macrl_jax.data import input_pipeline  # TensorFlow: the number of training images
  config = restored.config
  if 'predictor' not in restored.state['params']:
    raise restore.WorkdirError(f'--mocov3: {restored.workdir} is a method={config.method} run, '
                               'which has no MoCo v3 heads; export a mocov3 or macrl workdir')
  state = jax.device_get(restored.state)
  epoch = restored.step * config.batch_size // input_pipeline.num_examples(config,
                                                                           config.train_split)
  lr = optim.lr_schedule(config, config.total_steps)(restored.step)
  return mocov3_files.mocov3_checkpoint(state, config, epoch, float(lr))


if __name__ == '__main__':
  tool_io.run_tool(main)
