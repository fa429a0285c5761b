"""Reconstruction pictures (original | masked input | reconstruction | reconstruction + visible)
and the reconstruction error on masked patches.

Used by the in-training evaluations (monitors.py: TensorBoard images, held-out error) and
tools/visualize.py (PNG files).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from macrl_jax.methods import networks
from macrl_jax.models import vit


def _predict(modules, params, images, mask_ratio, rng, norm_pix):
  """(patches, mask, the decoder's prediction in the patches' pixel space)."""
  patches = vit.patchify(images, modules.encoder.patch_size)
  mask = vit.random_masking(rng, images.shape[0], patches.shape[1], mask_ratio)
  tokens = modules.encoder.apply({'params': params['encoder']}, images, mask.ids_keep)
  pred = modules.decoder.apply({'params': params['decoder']}, tokens, mask.ids_restore)
  if norm_pix:
    mean = patches.mean(-1, keepdims=True)
    std = jnp.sqrt(patches.var(-1, keepdims=True) + 1e-6)
    pred = pred * std + mean
  return patches, mask, pred


@functools.partial(jax.jit, static_argnums=(0, 3, 5))
def _panels(modules, params, images, mask_ratio, rng, norm_pix):
  p = modules.encoder.patch_size
  patches, mask, pred = _predict(modules, params, images, mask_ratio, rng, norm_pix)
  m = mask.mask[..., None]
  return dict(
      original=images,
      masked=vit.unpatchify(patches * (1 - m), p),
      reconstruction=vit.unpatchify(pred, p),
      reconstruction_visible=vit.unpatchify(pred * m + patches * (1 - m), p),
  )


@functools.partial(jax.jit, static_argnums=(0, 3, 5))
def _masked_mse(modules, params, images, mask_ratio, rng, norm_pix):
  patches, mask, pred = _predict(modules, params, images, mask_ratio, rng, norm_pix)
  per_patch = ((pred - patches) ** 2).mean(-1)
  return (per_patch * mask.mask).sum() / mask.mask.sum()


def panels(modules: networks.Modules, params: dict, images: jax.Array, mask_ratio: float,
           rng: jax.Array, norm_pix: bool) -> dict[str, np.ndarray]:
  """The four panels [B, H, W, 3] in the images' (normalised) pixel space.

  With `norm_pix` the decoder predicts per-patch normalised pixels, so its prediction is mapped back
  with each original patch's mean and std, as MAE's visualisation does.
  """
  out = _panels(modules, params, images, float(mask_ratio), rng, bool(norm_pix))
  return {k: np.asarray(v) for k, v in out.items()}


def masked_mse(modules: networks.Modules, params: dict, images: jax.Array, mask_ratio: float,
               rng: jax.Array, norm_pix: bool) -> float:
  """The mean squared error of the reconstruction on the masked patches, in the images'
  (normalised) pixel space: the error a user sees in the pictures, whatever the loss's target."""
  return float(_masked_mse(modules, params, images, float(mask_ratio), rng, bool(norm_pix)))


def grid(panel_dict: dict[str, np.ndarray], mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """One uint8 picture [B·H, 4·W, 3]: a row per image, a column per panel, un-normalised."""
  cols = [panel_dict[k] for k in ('original', 'masked', 'reconstruction', 'reconstruction_visible')]
  rows = np.concatenate(cols, axis=2)  # [B, H, 4W, 3]
  rows = rows * std + mean
  # Masked patches are 0 in normalised space, so they show as the dataset's mean colour.
  return (np.clip(np.concatenate(list(rows), axis=0), 0, 1) * 255).round().astype(np.uint8)
