r"""Reconstruction pictures: one PNG per masked branch, a row per test image, four panels:
original | masked input | reconstruction | reconstruction with the visible patches pasted back.

  python tools/visualize.py --workdir=workdirs/digits_macrl [--num=8] [--mask_ratio=0.75] \
      [--step=N] [--split=test] [--seed=0] [--scale=4] [--data_dir=TFDS_DIR]

Branches are the pre-training views that were masked (macrl: view 1 at mask_ratio_strong, view 2 at
mask_ratio_weak; mae: view 1); --mask_ratio draws one picture at that ratio instead. With
norm_pix_loss the decoder predicts per-patch normalised pixels, which are shown with each original
patch's mean and std (as MAE's pictures). Writes DIR/eval/reconstruction_<branch>_step<N>.png and
DIR/eval/visualize.json with the mean squared error of the masked and reconstruction panels.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from PIL import Image  # noqa: E402

from macrl_jax.config import schema  # noqa: E402
from macrl_jax.evals import reconstruction  # noqa: E402
from macrl_jax.run import restore, tool_io  # noqa: E402

tool_io.define_flags(params=False)
_NUM = flags.DEFINE_integer('num', 8, 'Test images (rows).')
_MASK_RATIO = flags.DEFINE_float('mask_ratio', None, "Mask ratio (default: each masked view's).")
_SPLIT = flags.DEFINE_string('split', 'test', "'train', 'test' (the config's) or a TFDS split.")
_SEED = flags.DEFINE_integer('seed', 0, 'Masks.')
_SCALE = flags.DEFINE_integer('scale', 4, 'Nearest-neighbour upscaling of the PNG (small images).')


def panel_mse(picture: np.ndarray, num_panels: int = 4) -> list[float]:
  """MSE in [0, 1] pixels of each panel of a grid picture against the first (the original)."""
  panels = np.split(picture.astype(np.float64) / 255.0, num_panels, axis=1)
  return [float(((p - panels[0]) ** 2).mean()) for p in panels]


def main():
  from macrl_jax.data import input_pipeline
  restored = tool_io.load_from_flags()
  config = restored.config
  restore.require_pixel_decoder(restored)
  split = tool_io.split_name(config, _SPLIT.value)
  batch = next(iter(input_pipeline.create_eval_iterator(
      config, split, batch_size=_NUM.value, process_index=0, process_count=1)))
  images = batch['image'][batch['mask']]
  params = jax.device_get({'encoder': restored.state['params']['encoder'],
                           'decoder': restored.decoder_params})
  if _MASK_RATIO.value is not None:
    branches = {f'ratio{_MASK_RATIO.value:g}': _MASK_RATIO.value}
  else:
    branches = {f'view{v + 1}': r for v, r in enumerate(schema.view_mask_ratios(config)) if r > 0}

  result = dict(step=restored.step, split=split, num=int(len(images)), branches={})
  for b, (branch, ratio) in enumerate(branches.items()):
    panels = reconstruction.panels(restored.modules, params, images, ratio,
                                   jax.random.PRNGKey(_SEED.value + b), config.norm_pix_loss)
    picture = reconstruction.grid(panels, input_pipeline.MEAN, input_pipeline.STD)
    mse = panel_mse(picture)
    path = os.path.join(restored.workdir, 'eval',
                        f'reconstruction_{branch}_step{restored.step}.png')
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      Image.fromarray(picture).resize(
          (picture.shape[1] * _SCALE.value, picture.shape[0] * _SCALE.value),
          Image.Resampling.NEAREST).save(path)
    result['branches'][branch] = dict(png=path, mask_ratio=ratio, mse_masked=mse[1],
                                      mse_reconstruction=mse[2], mse_reconstruction_visible=mse[3])
  lines = [f'{k} (mask {v["mask_ratio"]:g}): {v["png"]}  MSE vs original: masked '
           f'{v["mse_masked"]:.4f}, reconstruction {v["mse_reconstruction"]:.4f}, with visible '
           f'{v["mse_reconstruction_visible"]:.4f}' for k, v in result['branches'].items()]
  tool_io.report(tool_io.result_path(restored.workdir, 'visualize'), result, '\n'.join(lines))


if __name__ == '__main__':
  tool_io.run_tool(main)
