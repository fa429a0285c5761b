"""ViT encoder on visible patches, light MAE decoder, MoCo v3 projector/predictor, masking.

Everything here is flax.linen and pure: masks are arguments, not hidden state. Shapes:
B batch, N patches per image, K visible patches, D width, P = patch_size² · 3 pixels per patch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from macrl_jax import presets
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
class Mask(NamedTuple):
  ids_keep: jax.Array  # [B, K] indices of the visible patches
  ids_restore: jax.Array  # [B, N] unshuffle: position of each patch in [visible, masked] order
  mask: jax.Array  # [B, N] 1 = masked (to reconstruct), 0 = visible


def random_masking(rng: jax.Array, batch: int, num_patches: int, mask_ratio: float) -> Mask:
  """Per-example random mask by argsort of uniform noise (MAE): exactly K = round(N(1−r)) visible."""
  keep = presets.num_visible(num_patches, mask_ratio)
  noise = jax.random.uniform(rng, (batch, num_patches))
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  mask = jnp.ones((batch, num_patches)).at[:, :keep].set(0.0)
  mask = jnp.take_along_axis(mask, ids_restore, axis=1)
  return Mask(ids_shuffle[:, :keep], ids_restore, mask)


# --------------------------------------------------------------------------------------- blocks
def _dense(features, dtype, name=None, use_bias=True):
  return nn.Dense(features, dtype=dtype, use_bias=use_bias, name=name,
                  kernel_init=nn.initializers.xavier_uniform())


class Attention(nn.Module):
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    qkv = _dense(3 * d, self.dtype, 'qkv')(x)
    q, k, v = einops.rearrange(qkv, 'b t (three h e) -> three b t h e', three=3, h=self.num_heads)
    out = jax.nn.dot_product_attention(q, k, v)  # fused kernel where the backend has one
    return _dense(d, self.dtype, 'out')(einops.rearrange(out, 'b t h e -> b t (h e)'))


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
    y = _dense(self.mlp_dim, self.dtype, 'mlp_in')(y)
    y = _dense(x.shape[-1], self.dtype, 'mlp_out')(nn.gelu(y, approximate=False))
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

  @nn.compact
  def __call__(self, x, train: bool = False):
    block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    rates = [self.drop_path * i / max(self.depth - 1, 1) for i in range(self.depth)]  # DeiT: linear
    if self.scan:
      x = self.scanned(block, x, rates, train)
    else:
      for i, rate in enumerate(rates):
        x = block(self.num_heads, self.mlp_dim, rate, self.dtype, name=f'block{i:02d}')(x, train)
    return nn.LayerNorm(dtype=self.dtype, name='norm')(x)

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

  @nn.compact
  def __call__(self, images, ids_keep=None, train: bool = False):
    patches = patchify(images, self.patch_size)
    grid = images.shape[1] // self.patch_size
    pos = jnp.asarray(sincos_2d(self.width, grid))[None]
    if ids_keep is not None:
      # Gather before embedding, so that masked patches cost nothing at all.
      patches = jnp.take_along_axis(patches, ids_keep[..., None], axis=1)
      pos = jnp.take_along_axis(jnp.broadcast_to(pos, (ids_keep.shape[0],) + pos.shape[1:]),
                                ids_keep[..., None], axis=1)
    x = _dense(self.width, self.dtype, 'embedding')(patches) + pos
    cls = self.param('cls', nn.initializers.normal(0.02), (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)).astype(x.dtype), x], 1)
    x = Transformer(self.depth, self.num_heads, self.mlp_dim, self.drop_path, self.dtype,
                    self.remat, self.scan, name='transformer')(x, train)
    return x.astype(jnp.float32)


def pool(tokens: jax.Array, kind: str) -> jax.Array:
  """The image feature: the cls token or the mean of the patch tokens."""
  return tokens[:, 0] if kind == 'cls' else tokens[:, 1:].mean(axis=1)


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
    x = _dense(self.width, self.dtype, 'embed')(tokens)
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
    return _dense(self.out_dim, self.dtype, 'pred')(x[:, 1:]).astype(jnp.float32)


class MLPHead(nn.Module):
  """MoCo v3 projector/predictor: (Linear-BN-ReLU)×(L−1) then Linear-BN without affine.

  BatchNorm statistics are those of the global batch (the step is one jit over the mesh, so XLA
  reduces across devices, as SyncBN does).
  """
  hidden: int
  out: int
  num_layers: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    bn = lambda **kw: nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype, **kw)
    for i in range(self.num_layers - 1):
      x = _dense(self.hidden, self.dtype, f'dense{i}', use_bias=False)(x)
      x = nn.relu(bn(name=f'bn{i}')(x))
    x = _dense(self.out, self.dtype, f'dense{self.num_layers - 1}', use_bias=False)(x)
    return bn(use_scale=False, use_bias=False, name=f'bn{self.num_layers - 1}')(x).astype(jnp.float32)


# --------------------------------------------------------------------------------------- builders
class Modules(NamedTuple):
  """The modules of a method; None where the method has no such part."""
  encoder: Encoder
  decoder: Decoder | None
  projector: MLPHead | None
  predictor: MLPHead | None


def make_modules(config) -> Modules:
  dims = vit_dims(config.model)
  dtype = jnp.dtype(config.dtype)
  m = config.model
  encoder = Encoder(dims['patch_size'], dims['width'], dims['depth'], dims['num_heads'],
                    dims['mlp_dim'], m.drop_path, dtype, m.remat, m.scan)
  num_patches = (config.image_size // dims['patch_size']) ** 2
  decoder = projector = predictor = None
  if presets.uses_reconstruction(config):
    decoder = Decoder(num_patches, m.decoder_width, m.decoder_depth, m.decoder_heads,
                      dims['patch_size'] ** 2 * 3, dtype, m.scan)
  if presets.uses_contrastive(config):
    projector = MLPHead(m.proj_hidden, m.proj_dim, 3, dtype)
    predictor = MLPHead(m.pred_hidden, m.proj_dim, 2, dtype)
  return Modules(encoder, decoder, projector, predictor)


def init_variables(modules: Modules, config, rng: jax.Array) -> dict:
  """{'params': {...}, 'batch_stats': {...}} keyed by module name (encoder, decoder, ...)."""
  s = config.image_size
  images = jnp.zeros((2, s, s, 3), jnp.float32)
  rngs = dict(zip(('encoder', 'decoder', 'projector', 'predictor'), jax.random.split(rng, 4)))
  params, batch_stats = {}, {}
  tokens = modules.encoder.init(rngs['encoder'], images)['params']
  params['encoder'] = tokens
  feats = jnp.zeros((2, modules.encoder.width), jnp.float32)
  if modules.decoder is not None:
    enc_tokens = jnp.zeros((2, 2, modules.encoder.width), jnp.float32)
    ids_restore = jnp.tile(jnp.arange(modules.decoder.num_patches), (2, 1))
    params['decoder'] = modules.decoder.init(rngs['decoder'], enc_tokens, ids_restore)['params']
  for name in ('projector', 'predictor'):
    head = getattr(modules, name)
    if head is not None:
      v = head.init(rngs[name], feats)
      params[name], batch_stats[name] = v['params'], v['batch_stats']
      feats = jnp.zeros((2, head.out), jnp.float32)
  return {'params': params, 'batch_stats': batch_stats}
