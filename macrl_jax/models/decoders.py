"""The decoders that complete the encoder's visible tokens to the whole grid: MAE's light pixel
decoder, and the feature decoder of macrl's contrastive branch (CMAE)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from macrl_jax.models.vit import Dtype, Transformer, dense, sincos_2d


class Decoder(nn.Module):
  """MAE decoder: encoder tokens + mask tokens, unshuffled, → one prediction per patch [B, N, out]."""
  num_patches: int
  width: int
  depth: int
  num_heads: int
  out_dim: int
  dtype: Dtype = jnp.float32
  scan: bool = False

  @nn.compact
  def __call__(self, tokens, ids_restore=None):
    x = dense(self.width, self.dtype, 'embed')(tokens)
    cls, vis = x[:, :1], x[:, 1:]
    if ids_restore is not None:
      mask_token = self.param('mask_token', nn.initializers.normal(0.02), (1, 1, self.width))
      n_masked = self.num_patches - vis.shape[1]
      fill = jnp.broadcast_to(mask_token, (x.shape[0], n_masked, self.width)).astype(x.dtype)
      vis = jnp.take_along_axis(jnp.concatenate([vis, fill], 1), ids_restore[..., None], axis=1)
    grid = int(round(np.sqrt(self.num_patches)))
    x = jnp.concatenate([cls, vis + sincos_2d(self.width, grid)[None]], 1)
    x = Transformer(self.depth, self.num_heads, 4 * self.width, 0.0, self.dtype,
                    scan=self.scan, name='transformer')(x)
    return dense(self.out_dim, self.dtype, 'pred')(x[:, 1:]).astype(jnp.float32)


class FeatureDecoder(nn.Module):
  """CMAE's feature decoder: completes a masked view's encoder tokens [B, 1 + K, D] to all N
  positions (a learned mask token at each masked one, unshuffled, plus the position embeddings)
  through `depth` blocks at the encoder's width → [B, 1 + N, D], pooled for the contrastive query.
  """
  num_patches: int
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, ids_restore):
    width = tokens.shape[-1]
    cls, vis = tokens[:, :1], tokens[:, 1:]
    mask_token = self.param('mask_token', nn.initializers.normal(0.02), (1, 1, width))
    fill = jnp.broadcast_to(mask_token, (tokens.shape[0], self.num_patches - vis.shape[1], width))
    x = jnp.take_along_axis(jnp.concatenate([vis, fill.astype(vis.dtype)], 1),
                            ids_restore[..., None], axis=1)
    grid = int(round(np.sqrt(self.num_patches)))
    x = jnp.concatenate([cls, x + sincos_2d(width, grid)[None]], 1)
    x = Transformer(self.depth, self.num_heads, self.mlp_dim, dtype=self.dtype,
                    name='transformer')(x)
    return x.astype(jnp.float32)
