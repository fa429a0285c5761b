"""Masking, patches, position embeddings and the encoder's cost on visible tokens only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import stack_blocks
from macrl_jax.config import schema
from macrl_jax.methods import networks
from macrl_jax.models import vit


@pytest.mark.parametrize('num_patches,ratio', [(16, 0.75), (64, 0.75), (64, 0.25), (49, 0.6), (10, 0.5)])
def test_masking_keeps_exactly_int_n_visible(num_patches, ratio):
  m = vit.random_masking(jax.random.PRNGKey(0), 32, num_patches, ratio)
  keep = int(num_patches * (1 - ratio))  # truncated, as MAE
  assert m.ids_keep.shape == (32, keep)
  np.testing.assert_array_equal(m.mask.sum(axis=1), num_patches - keep)
  # The visible ids are exactly the unmasked positions, each once.
  mask = np.asarray(m.mask)
  for row, ids in zip(mask, np.asarray(m.ids_keep)):
    assert len(set(ids.tolist())) == keep
    np.testing.assert_array_equal(np.sort(ids), np.flatnonzero(row == 0))


def test_masking_differs_per_example_and_per_view_and_is_deterministic():
  rng = jax.random.PRNGKey(3)
  a = vit.random_masking(jax.random.fold_in(rng, 0), 16, 64, 0.75)
  b = vit.random_masking(jax.random.fold_in(rng, 1), 16, 64, 0.75)
  again = vit.random_masking(jax.random.fold_in(rng, 0), 16, 64, 0.75)
  masks = np.asarray(a.mask)
  assert len({row.tobytes() for row in masks}) == 16, 'every example should get its own mask'
  assert not np.array_equal(a.mask, b.mask), 'the two views should get different masks'
  np.testing.assert_array_equal(a.mask, again.mask)
  np.testing.assert_array_equal(a.ids_restore, again.ids_restore)


def test_ids_restore_unshuffles():
  m = vit.random_masking(jax.random.PRNGKey(1), 4, 16, 0.5)
  tokens = jnp.arange(16)[None].repeat(4, 0)
  kept = jnp.take_along_axis(tokens, m.ids_keep, axis=1)
  rest = jnp.full((4, 8), -1)
  restored = jnp.take_along_axis(jnp.concatenate([kept, rest], 1), m.ids_restore, axis=1)
  np.testing.assert_array_equal(np.where(m.mask == 0, restored, -1), np.where(m.mask == 0, tokens, -1))


@pytest.mark.parametrize('size,patch', [(16, 4), (32, 8), (8, 2)])
def test_patchify_unpatchify_identity(size, patch):
  x = jax.random.normal(jax.random.PRNGKey(0), (3, size, size, 3))
  p = vit.patchify(x, patch)
  assert p.shape == (3, (size // patch) ** 2, patch * patch * 3)
  np.testing.assert_array_equal(vit.unpatchify(p, patch), x)
  # Patch k is the k-th block in row-major order.
  np.testing.assert_array_equal(p[:, 1].reshape(3, patch, patch, 3), x[:, :patch, patch:2 * patch])


def _mae_sincos_reference(embed_dim, grid_size):
  """facebookresearch/mae util/pos_embed.py, transcribed (without the cls row)."""
  def from_grid(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.)
    omega = 1. / 10000 ** omega
    out = np.einsum('m,d->md', pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
  return np.concatenate([from_grid(embed_dim // 2, grid[0]), from_grid(embed_dim // 2, grid[1])], 1)


def test_sincos_matches_mae():
  np.testing.assert_allclose(vit.sincos_2d(64, 7), _mae_sincos_reference(64, 7), atol=1e-6)


def _encoder_flops(encoder, params, images, ratio):
  num_patches = (images.shape[1] // encoder.patch_size) ** 2
  ids = None
  if ratio > 0:
    ids = vit.random_masking(jax.random.PRNGKey(0), images.shape[0], num_patches, ratio).ids_keep
  fn = jax.jit(lambda p, x, i: encoder.apply({'params': p}, x, i))
  cost = fn.lower(params, images, ids).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost['flops']


def test_encoder_flops_fall_with_mask_ratio():
  encoder = vit.Encoder(patch_size=4, width=64, depth=2, num_heads=2, mlp_dim=256)
  images = jnp.zeros((4, 32, 32, 3))
  params = jax.jit(encoder.init)(jax.random.PRNGKey(0), images)['params']
  full, masked = (_encoder_flops(encoder, params, images, r) for r in (0.0, 0.75))
  assert masked <= 0.35 * full, (masked, full, masked / full)


def test_encoder_and_decoder_shapes(make_config):
  c = make_config('macrl')
  mods = networks.make_modules(c)
  variables = jax.eval_shape(lambda: networks.init_variables(mods, c, jax.random.PRNGKey(0)))
  x = jnp.ones((2, 16, 16, 3))
  m = vit.random_masking(jax.random.PRNGKey(1), 2, 16, 0.75)
  z = jax.eval_shape(mods.encoder.apply, {'params': variables['params']['encoder']}, x, m.ids_keep)
  assert z.shape == (2, 1 + 4, 64)
  recon = jax.eval_shape(mods.decoder.apply, {'params': variables['params']['decoder']}, z,
                         m.ids_restore)
  assert recon.shape == (2, 16, 4 * 4 * 3)
  assert jax.eval_shape(lambda t: vit.pool(t, 'mean'), z).shape == (2, 64)


def test_modules_per_method(make_config):
  mae = networks.make_modules(make_config('mae'))
  assert mae.decoder is not None and mae.projector is None and mae.predictor is None
  moco = networks.make_modules(make_config('mocov3'))
  assert moco.decoder is None and moco.projector is not None and moco.predictor is not None


def test_variants():
  c = schema.base_config()
  for variant, width in [('Ti/16', 192), ('S/4', 384), ('B/16', 768), ('L/14', 1024)]:
    c.model.variant = variant
    dims = vit.vit_dims(c.model)
    assert dims['width'] == width and dims['patch_size'] == int(variant.split('/')[1])


@pytest.mark.parametrize('remat', [False, True])
def test_scanned_blocks_compute_the_same_as_the_loop(remat):
  kw = dict(patch_size=4, width=32, depth=3, num_heads=2, mlp_dim=64, drop_path=0.2, remat=remat)
  loop, scanned = vit.Encoder(**kw), vit.Encoder(**kw, scan=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
  params = jax.jit(loop.init)(jax.random.PRNGKey(1), x)['params']
  stacked = jax.eval_shape(scanned.init, jax.random.PRNGKey(1), x)['params']
  assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, stack_blocks(params))
  assert stacked['transformer']['blocks']['mlp_in']['kernel'].shape == (3, 32, 64)
  ids = vit.random_masking(jax.random.PRNGKey(2), 4, 16, 0.5).ids_keep
  np.testing.assert_allclose(jax.jit(scanned.apply)({'params': stack_blocks(params)}, x, ids),
                             jax.jit(loop.apply)({'params': params}, x, ids), atol=1e-5)


def test_scanned_drop_path_increases_per_layer():
  """Under scan each layer gets its own rate: 0 for the first block, drop_path (0.5) for the last."""
  enc = vit.Encoder(patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64, drop_path=0.5,
                       scan=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 8, 8, 3))
  params = jax.jit(enc.init)(jax.random.PRNGKey(1), x)['params']
  last_off = lambda p: jax.tree.map(lambda w: w.at[-1].set(0.0), p)  # the last block's entry zeroed
  blocks = params['transformer']['blocks']
  no_attn = dict(blocks, attn=dict(blocks['attn'], out=last_off(blocks['attn']['out'])))
  no_branch = dict(no_attn, mlp_out=last_off(blocks['mlp_out']))
  with_blocks = lambda b: dict(params, transformer=dict(params['transformer'], blocks=b))
  apply = jax.jit(enc.apply, static_argnames='train')
  run = lambda b, **kw: np.asarray(apply({'params': with_blocks(b)}, x, **kw))
  rngs = {'dropout': jax.random.PRNGKey(3)}
  # Only block 0's branches left: training equals evaluation, so block 0 never drops.
  np.testing.assert_allclose(run(no_branch, train=True, rngs=rngs), run(no_branch), atol=1e-5)
  # Only the last block's MLP branch added: about half of the examples lose it.
  dropped = np.abs(run(no_attn, train=True, rngs=rngs) - run(no_branch)).max(axis=(1, 2)) < 1e-5
  assert 0.25 < dropped.mean() < 0.75, dropped.mean()
