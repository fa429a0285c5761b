"""The ViT: patches, masking, transformer blocks and the encoder on visible patches.

Everything here is flax.linen and pure: masks are arguments, not hidden state, and modules take
plain values, not configs. Shapes: B batch, N patches per image, K visible patches, D width,
P = patch_size² · 3 pixels per patch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from macrl_jax.errors import UserError

Dtype = Any


# --------------------------------------------------------------------------------------- variants
# ViT sizes (Dosovitskiy et al.; Ti and S from DeiT): width, depth, heads, mlp_dim.
VIT_SIZES = {
    'mu': (64, 4, 2, 256),  # a tiny test/debug size, not a published variant
    'Ti': (192, 12, 3, 768),
    'S': (384, 12, 6, 1536),
    'B': (768, 12, 12, 3072),
    'L': (1024, 24, 16, 4096),
}


def decode_variant(variant: str) -> dict[str, int]:
  """'S/16' → dict(patch_size=16, width=384, depth=12, num_heads=6, mlp_dim=1536)."""
  try:
    size, patch = variant.split('/')
    width, depth, heads, mlp = VIT_SIZES[size]
    patch = int(patch)
  except (ValueError, KeyError):
    raise ValueError(f'unknown variant {variant!r}; expected "<size>/<patch>" with size in '
                     f'{sorted(VIT_SIZES)} (e.g. "S/4", "B/16")') from None
  return dict(patch_size=patch, width=width, depth=depth, num_heads=heads, mlp_dim=mlp)


def vit_dims(model_cfg) -> dict[str, int]:
  """The dims of `model.variant`, where the config's width, depth, num_heads, mlp_dim override."""
  try:
    dims = decode_variant(model_cfg.variant)
  except ValueError as e:
    raise UserError(f'config.model.variant: {e}') from None
  for k in ('width', 'depth', 'num_heads', 'mlp_dim'):
    if model_cfg.get(k) is not None:
      dims[k] = int(model_cfg[k])
  return dims


# --------------------------------------------------------------------------------------- patches
def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] → [B, N, p·p·C], patches in row-major order (MAE's layout)."""
  return einops.rearrange(images, 'b (h p) (w q) c -> b (h w) (p q c)', p=patch_size, q=patch_size)


def unpatchify(patches: jax.Array, patch_size: int, channels: int = 3) -> jax.Array:
  """[B, N, p·p·C] → [B, H, W, C]; the inverse of `patchify` for square images."""
  grid = int(round(np.sqrt(patches.shape[1])))
  return einops.rearrange(patches, 'b (h w) (p q c) -> b (h p) (w q) c',
                          h=grid, w=grid, p=patch_size, q=patch_size, c=channels)


def sincos_2d(width: int, grid: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embeddings [grid², width] (MAE's get_2d_sincos_pos_embed).

  Half of the channels encode the row, half the column; each half is sin/cos of 1/10000^(2i/d).
  """
  if width % 4:
    raise ValueError(f'sin-cos position embeddings need a width divisible by 4, got {width}')
  omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4.0))
  ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64),
                       indexing='ij')

  def embed(pos):
    out = np.einsum('m,d->md', pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  # MAE puts the column (w) embedding first.
  return np.concatenate([embed(xs), embed(ys)], axis=1).astype(np.float32)


# --------------------------------------------------------------------------------------- masking
def num_visible(num_patches: int, mask_ratio: float) -> int:
  """Visible tokens per example: int(N · (1 − ratio)), truncated in float64 as MAE's
  `random_masking` computes it (N = 196, ratio 0.9 → 19)."""
  return int(num_patches * (1.0 - mask_ratio))


class Mask(NamedTuple):
  ids_keep: jax.Array  # [B, K] indices of the visible patches
  ids_restore: jax.Array  # [B, N] unshuffle: position of each patch in [visible, masked] order
  mask: jax.Array  # [B, N] 1 = masked (to reconstruct), 0 = visible


def random_masking(rng: jax.Array, batch: int, num_patches: int, mask_ratio: float) -> Mask:
  """Per-example random mask by argsort of uniform noise (MAE): exactly K = int(N(1−r)) visible."""
  keep = num_visible(num_patches, mask_ratio)
  noise = jax.random.uniform(rng, (batch, num_patches))
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  mask = jnp.ones((batch, num_patches)).at[:, :keep].set(0.0)
  mask = jnp.take_along_axis(mask, ids_restore, axis=1)
  return Mask(ids_shuffle[:, :keep], ids_restore, mask)


# --------------------------------------------------------------------------------------- blocks


def gelu(x: jax.Array) -> jax.Array:
  """The exact GELU, x·Φ(x), as PyTorch's CPU kernel writes it: 0.5·x·(1 + erf(x/√2)). XLA's CPU
  erf is one short polynomial, about 3× faster than the erfc that jax.nn.gelu(approximate=False)
  uses (a branch per element); the two differ by float32 rounding (≤ 1e-6 at |x| ≤ 15)."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476))


def dense(features, dtype, name=None, use_bias=True):
  """nn.Dense with the xavier-uniform kernel that MAE and timm give a ViT's linear layers."""
  return nn.Dense(features, dtype=dtype, use_bias=use_bias, name=name,
                  kernel_init=nn.initializers.xavier_uniform())


class DenseParams(nn.Module):
  """An nn.Dense's parameters ('kernel' [in, out], xavier; 'bias' [out]), for a caller that applies
  them through an einsum over a reshaped kernel."""
  features: int

  @nn.compact
  def __call__(self, in_features: int):
    kernel = self.param('kernel', nn.initializers.xavier_uniform(), (in_features, self.features))
    return kernel, self.param('bias', nn.initializers.zeros, (self.features,))


class Attention(nn.Module):
  """Multi-head self-attention; the qkv kernel's output is laid out (three, heads, head_dim), as
  timm's.

  On CPU the heads are split and merged inside the projections' einsums, so that the attention
  products see [batch, heads, tokens, head_dim] from the start: XLA then needs none of the layout
  copies around a separate split and merge (about a sixth of a small model's step). On
  accelerators jax.nn.dot_product_attention, which may pick a fused kernel.
  """
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d, h = x.shape[-1], self.num_heads
    e = d // h
    w_qkv, b_qkv = DenseParams(3 * d, name='qkv')(d)
    w_out, b_out = DenseParams(d, name='out')(d)
    x, w_qkv, b_qkv, w_out, b_out = (a.astype(self.dtype) for a in (x, w_qkv, b_qkv, w_out, b_out))
    if jax.default_backend() != 'cpu':
      q, k, v = einops.rearrange(x @ w_qkv + b_qkv, 'b t (three h e) -> three b t h e', three=3, h=h)
      out = jax.nn.dot_product_attention(q, k, v)
      return einops.rearrange(out, 'b t h e -> b t (h e)') @ w_out + b_out
    # One product per q, k, v: slicing the kernel costs nothing, slicing a fused output a copy.
    w_qkv, b_qkv = w_qkv.reshape(d, 3, h, e), b_qkv.reshape(3, h, 1, e)
    q, k, v = (jnp.einsum('btd,dhe->bhte', x, w_qkv[:, i]) + b_qkv[i] for i in range(3))
    q = q * (e ** -0.5)
    logits = jnp.einsum('bhqe,bhke->bhqk', q, k)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bhke->bhqe', probs, v)
    return jnp.einsum('bhqe,hed->bqd', out, w_out.reshape(h, e, d)) + b_out


class Block(nn.Module):
  """Pre-norm transformer block with per-example stochastic depth."""
  num_heads: int
  mlp_dim: int
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, drop_path=None):
    # `drop_path` overrides the field: under nn.scan each layer's rate arrives as an array.
    rate = self.drop_path if drop_path is None else drop_path
    y = Attention(self.num_heads, self.dtype, name='attn')(nn.LayerNorm(dtype=self.dtype)(x))
    x = x + self.drop(y, rate, train)
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = dense(self.mlp_dim, self.dtype, 'mlp_in')(y)
    y = dense(x.shape[-1], self.dtype, 'mlp_out')(gelu(y))
    return x + self.drop(y, rate, train)

  def drop(self, y, rate, train: bool):
    """Drops the whole residual branch per example (stochastic depth), rescaling the kept ones."""
    if not train or (isinstance(rate, float) and rate == 0.0):
      return y
    keep = 1.0 - rate
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, (y.shape[0],) + (1,) * (y.ndim - 1))
    return jnp.where(mask, y / keep, 0.0).astype(y.dtype)


class Transformer(nn.Module):
  depth: int
  num_heads: int
  mlp_dim: int
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  remat: bool = False
  scan: bool = False
  final_norm: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    rates = [self.drop_path * i / max(self.depth - 1, 1) for i in range(self.depth)]  # DeiT: linear
    if self.scan:
      x = self.scanned(block, x, rates, train)
    else:
      for i, rate in enumerate(rates):
        x = block(self.num_heads, self.mlp_dim, rate, self.dtype, name=f'block{i:02d}')(x, train)
    return nn.LayerNorm(dtype=self.dtype, name='norm')(x) if self.final_norm else x

  def scanned(self, block, x, rates, train: bool):
    """The blocks as one nn.scan: one block is traced and compiled, then run `depth` times over
    parameters stacked on a leading axis ('blocks': {...: [depth, ...]}), each layer with its rate."""
    use_rates = train and self.drop_path > 0

    def body(module, x, rate):
      return module(x, train, rate if use_rates else None), None

    scan = nn.scan(body, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                   length=self.depth)
    x, _ = scan(block(self.num_heads, self.mlp_dim, 0.0, self.dtype, name='blocks'), x,
                jnp.asarray(rates, jnp.float32))
    return x


# --------------------------------------------------------------------------------------- models
class Encoder(nn.Module):
  """ViT that embeds and runs only the visible patches (plus a cls token).

  Returns the final-normed tokens [B, 1 + K, D] (K = N when `ids_keep` is None), in float32.
  Pre-training keeps the position embeddings the fixed sin-cos table; fine-tuning
  (`learned_pos`) trains them from that table, cls position included, as MAE's fine-tuning does,
  and MAE's global-pool classifier drops the final norm (`final_norm=False`).
  """
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  remat: bool = False
  scan: bool = False
  cls_init_std: float = 0.02  # MAE 0.02, MoCo v3 1e-6
  learned_pos: bool = False
  final_norm: bool = True

  @nn.compact
  def __call__(self, images, ids_keep=None, train: bool = False):
    patches = patchify(images, self.patch_size)
    grid = images.shape[1] // self.patch_size
    cls = self.param('cls', nn.initializers.normal(self.cls_init_std), (1, 1, self.width))
    pos = jnp.asarray(sincos_2d(self.width, grid))[None]
    if self.learned_pos:
      # The cls row starts at zero, as in MAE's table; it is trained with the rest.
      table = self.param('pos_embedding', lambda *_: jnp.concatenate(
          [jnp.zeros((1, 1, self.width)), pos], axis=1))
      cls, pos = cls + table[:, :1], table[:, 1:]
    if ids_keep is not None:
      # Gather before embedding, so that masked patches cost nothing at all.
      patches = jnp.take_along_axis(patches, ids_keep[..., None], axis=1)
      pos = jnp.take_along_axis(jnp.broadcast_to(pos, (ids_keep.shape[0],) + pos.shape[1:]),
                                ids_keep[..., None], axis=1)
    x = dense(self.width, self.dtype, 'embedding')(patches) + pos
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)).astype(x.dtype), x], 1)
    x = Transformer(self.depth, self.num_heads, self.mlp_dim, self.drop_path, self.dtype,
                    self.remat, self.scan, self.final_norm, name='transformer')(x, train)
    return x.astype(jnp.float32)


def pool(tokens: jax.Array, kind: str) -> jax.Array:
  """The image feature: the cls token or the mean of the patch tokens."""
  return tokens[:, 0] if kind == 'cls' else tokens[:, 1:].mean(axis=1)
