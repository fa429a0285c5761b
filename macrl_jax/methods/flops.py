"""Analytic model FLOPs of the train step, by part (for MFU and the benchmark's breakdown).

Counts the matmuls only (2 FLOPs per multiply-add): the patch embedding, attention projections,
the attention scores and their weighted sum, the MLPs, the decoder's embedding and prediction, the
heads and the InfoNCE logits. Norms, activations, softmax, masking gathers and the optimizer are not
model FLOPs (they are in XLA's count, which the benchmark reports beside this one).

A matmul that is differentiated costs 3× its forward (forward, gradient w.r.t. its input, gradient
w.r.t. its weight); one whose input needs no gradient costs 2× (the online patch embedding: pixels
have no gradient); the momentum branch runs forward only (1×).
"""

from __future__ import annotations

from macrl_jax.config import schema
from macrl_jax.models import vit


def dense(tokens: float, d_in: int, d_out: int) -> float:
  return 2.0 * tokens * d_in * d_out


def block(tokens: int, width: int, mlp_dim: int) -> float:
  """One pre-norm transformer block on `tokens` tokens (one example)."""
  projections = dense(tokens, width, 3 * width) + dense(tokens, width, width)
  attention = 2 * dense(tokens, width, tokens)  # q·kᵀ over all heads, then softmax·v
  mlp = dense(tokens, width, mlp_dim) + dense(tokens, mlp_dim, width)
  return projections + attention + mlp


def encoder_forward(config, num_patches: int) -> tuple[float, float]:
  """(patch embedding, transformer) forward FLOPs of one example with `num_patches` visible."""
  d = vit.vit_dims(config.model)
  pixels = d['patch_size'] ** 2 * 3
  tokens = num_patches + 1  # + cls
  return (dense(num_patches, pixels, d['width']),
          d['depth'] * block(tokens, d['width'], d['mlp_dim']))


def decoder_forward(config, visible: int) -> float:
  """Forward FLOPs of the decoder for one example: it embeds the encoder's 1 + K tokens, then runs
  on all N patches + cls whatever the mask ratio."""
  d, m = vit.vit_dims(config.model), config.model
  n = num_patches(config)
  pixels = d['patch_size'] ** 2 * 3
  return (dense(visible + 1, d['width'], m.decoder_width)
          + m.decoder_depth * block(n + 1, m.decoder_width, 4 * m.decoder_width)
          + dense(n, m.decoder_width, pixels))


def projector_forward(config) -> float:
  d, m = vit.vit_dims(config.model), config.model
  return (dense(1, d['width'], m.proj_hidden) + dense(1, m.proj_hidden, m.proj_hidden)
          + dense(1, m.proj_hidden, m.proj_dim))


def predictor_forward(config) -> float:
  m = config.model
  return dense(1, m.proj_dim, m.pred_hidden) + dense(1, m.pred_hidden, m.proj_dim)


def num_patches(config) -> int:
  return (config.image_size // vit.vit_dims(config.model)['patch_size']) ** 2


def step_flops(config) -> dict[str, float]:
  """FLOPs of one train step over the global batch, by part, and their 'total'."""
  n, b = num_patches(config), config.batch_size
  rec, con = schema.uses_reconstruction(config), schema.uses_contrastive(config)
  parts = dict(online_encoder=0.0, momentum_encoder=0.0, decoder=0.0, heads=0.0)
  ratios = schema.view_mask_ratios(config)
  for v, ratio in enumerate(ratios):
    k = vit.num_visible(n, ratio)
    embed, blocks = encoder_forward(config, k)
    parts['online_encoder'] += 2 * embed + 3 * blocks
    if rec and ratio > 0:
      parts['decoder'] += 3 * decoder_forward(config, k)
    if schema.uses_feature_decoder(config) and ratio > 0:  # runs on all N tokens + cls
      d = vit.vit_dims(config.model)
      parts['decoder'] += 3 * config.model.feature_decoder_depth * block(n + 1, d['width'],
                                                                         d['mlp_dim'])
    if con:
      parts['heads'] += 3 * (projector_forward(config) + predictor_forward(config))
      key_patches = {'none': n, 'same': k,
                     'query': vit.num_visible(n, ratios[1 - v])}[config.key_mask]
      parts['momentum_encoder'] += sum(encoder_forward(config, key_patches)) + projector_forward(config)
  if con:
    # Two InfoNCE terms, logits q·kᵀ against the batch's keys and the queue; the keys get no
    # gradient, so forward + gradient w.r.t. q.
    keys = b + config.queue_size
    parts['heads'] += 2 * 2 * dense(1, config.model.proj_dim, keys)
  out = {k: v * b for k, v in parts.items()}
  out['total'] = sum(out.values())
  return out
