r"""Exports a pre-trained encoder to PyTorch: timm's VisionTransformer naming, as safetensors.

  python tools/export.py --workdir=workdirs/digits_macrl [--step=N] [--params=online|momentum] \
      [--out=FILE.safetensors] [--pool=cls|mean] [--decoder]

Writes FILE.safetensors (default DIR/export/encoder_<params>_step<N>.safetensors) and FILE.json,
the keyword arguments of timm's VisionTransformer that compute the same features as the JAX encoder
(global_pool 'token' for the cls feature, 'avg' with fc_norm=False for the mean of the patch tokens),
then prints the two lines of Python that load it with strict=True. --decoder also writes
FILE.mae.pth: {'model': encoder + decoder} in MAE's naming, for MAE's visualisation code (torch
needed). Needs the optional requirements: pip install -r requirements-interop.txt.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402
from absl import flags  # noqa: E402

from macrl_jax import interop, interop_files, interop_state_dicts, models, workdir  # noqa: E402

workdir.define_flags()
_OUT = flags.DEFINE_string('out', None, 'Output .safetensors (default: see above).')
_POOL = flags.DEFINE_enum('pool', None, ['cls', 'mean'], "timm's pooling (default: the config's).")
_DECODER = flags.DEFINE_bool('decoder', False, "Also write FILE.mae.pth in MAE's naming.")


def main():
  restored = workdir.load_from_flags()
  config = restored.config
  dims = models.vit_dims(config.model)
  pool = _POOL.value or config.model.pool
  out = os.path.abspath(_OUT.value or os.path.join(
      restored.workdir, 'export', f'encoder_{restored.params}_step{restored.step}.safetensors'))
  if not out.endswith('.safetensors'):
    raise workdir.WorkdirError(f'--out={out}: the file name must end in .safetensors')
  os.makedirs(os.path.dirname(out), exist_ok=True)
  encoder = interop.encoder_to_timm(jax.device_get(restored.encoder_params), dims,
                                    config.image_size)
  kwargs = interop.timm_kwargs(dims, config.image_size, pool)
  try:
    interop_files.write_safetensors(out, encoder, kwargs)
    written = [out, interop_files.meta_path(out)]
    if _DECODER.value:
      workdir.require_pixel_decoder(restored)
      num_patches = (config.image_size // dims['patch_size']) ** 2
      decoder = jax.device_get(restored.decoder_params)
      mae = dict(encoder, **interop_state_dicts.decoder_to_mae(decoder, num_patches))
      mae_path = out[:-len('.safetensors')] + '.mae.pth'
      interop_files.write_torch(mae_path, {'model': mae})
      written.append(mae_path)
  except interop.InteropError as e:
    raise workdir.WorkdirError(str(e)) from None
  result = dict(out=written, step=restored.step, params=restored.params, pool=pool, timm=kwargs)
  workdir.report(workdir.result_path(restored.workdir, 'export'), result,
                 f'Encoder ({restored.params}, step {restored.step}) → {", ".join(written)}\n'
                 'Load it in PyTorch (pip install -r requirements-interop.txt):\n'
                 'import json, safetensors.torch, timm\n'
                 f'model = timm.models.VisionTransformer(**json.load(open({interop_files.meta_path(out)!r}))); '
                 f'model.load_state_dict(safetensors.torch.load_file({out!r}), strict=True)')


if __name__ == '__main__':
  workdir.run_tool(main)
