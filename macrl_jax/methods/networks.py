"""A method's networks built from its config: the encoder, and the decoder, heads and feature
decoder that the method uses, with their initial variables."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from macrl_jax.config import schema
from macrl_jax.models import decoders, heads, vit


class Modules(NamedTuple):
  """The modules of a method; None where the method has no such part."""
  encoder: vit.Encoder
  decoder: decoders.Decoder | None
  projector: heads.MLPHead | None
  predictor: heads.MLPHead | None
  feature_decoder: decoders.FeatureDecoder | None = None  # macrl with model.feature_decoder_depth > 0


def make_modules(config) -> Modules:
  dims = vit.vit_dims(config.model)
  dtype = jnp.dtype(config.dtype)
  m = config.model
  encoder = vit.Encoder(dims['patch_size'], dims['width'], dims['depth'], dims['num_heads'],
                        dims['mlp_dim'], m.drop_path, dtype, m.remat, m.scan, m.cls_init_std)
  num_patches = (config.image_size // dims['patch_size']) ** 2
  decoder = projector = predictor = None
  if schema.uses_reconstruction(config):
    decoder = decoders.Decoder(num_patches, m.decoder_width, m.decoder_depth, m.decoder_heads,
                          dims['patch_size'] ** 2 * 3, dtype, m.scan)
  if schema.uses_contrastive(config):
    projector = heads.MLPHead(m.proj_hidden, m.proj_dim, 3, dtype)
    predictor = heads.MLPHead(m.pred_hidden, m.proj_dim, 2, dtype)
  feature_decoder = None
  if schema.uses_feature_decoder(config):
    feature_decoder = decoders.FeatureDecoder(num_patches, m.feature_decoder_depth,
                                         dims['num_heads'], dims['mlp_dim'], dtype)
  return Modules(encoder, decoder, projector, predictor, feature_decoder)


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
  if modules.feature_decoder is not None:
    enc_tokens = jnp.zeros((2, 2, modules.encoder.width), jnp.float32)
    ids_restore = jnp.tile(jnp.arange(modules.feature_decoder.num_patches), (2, 1))
    params['feature_decoder'] = modules.feature_decoder.init(
        jax.random.fold_in(rng, 5), enc_tokens, ids_restore)['params']
  for name in ('projector', 'predictor'):
    head = getattr(modules, name)
    if head is not None:
      v = head.init(rngs[name], feats)
      params[name], batch_stats[name] = v['params'], v['batch_stats']
      feats = jnp.zeros((2, head.out), jnp.float32)
  return {'params': params, 'batch_stats': batch_stats}
