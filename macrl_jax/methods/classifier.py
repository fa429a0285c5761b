"""The fine-tuning classifier and its optimizer, MAE's recipe.

  classifier = encoder (drop path, position embeddings trained from the sin-cos table)
               → pool (cls token, or MAE's global pool: the mean of the patch tokens without the
                 encoder's final norm, then a fresh LayerNorm `fc_norm`) → linear
  AdamW, linear warm-up + cosine, lr = base_lr · batch / 256, layer-wise lr decay (BEiT/MAE: block i
  of depth d gets lr · decay^(d − i), the patch embedding and cls token decay^(d + 1), the final
  norm and the head lr).
"""

from __future__ import annotations

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from macrl_jax.methods import optim
from macrl_jax.models import vit


def finetuning_encoder(encoder: vit.Encoder, pool: str, drop_path: float) -> vit.Encoder:
  """The pre-trained encoder as MAE fine-tunes it: learned position embeddings, and no final norm
  under global (mean) pooling, where `fc_norm` takes its place."""
  return encoder.clone(drop_path=float(drop_path), learned_pos=True, final_norm=pool != 'mean')


def with_pretrained(fresh: dict, pretrained: dict) -> dict:
  """The fine-tuning encoder's params `fresh`, each taken from `pretrained` where it has it: the
  position table (which pre-training keeps fixed) starts from its fresh sin-cos value, and a final
  norm that the classifier dropped is left out."""
  flat_fresh = flax.traverse_util.flatten_dict(fresh)
  flat_pretrained = flax.traverse_util.flatten_dict(pretrained)
  return flax.traverse_util.unflatten_dict(
      {k: flat_pretrained.get(k, v) for k, v in flat_fresh.items()})


class Classifier(nn.Module):
  encoder: vit.Encoder
  num_classes: int
  pool: str = 'cls'

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = vit.pool(self.encoder(images, train=train), self.pool)
    if self.pool == 'mean':  # MAE's global-pool head normalises the averaged tokens
      x = nn.LayerNorm(name='fc_norm')(x)
    # A near-zero head (MAE) starts from uniform predictions without disturbing the encoder.
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(2e-5),
                    name='head')(x)


def layer_multipliers(params, depth: int, decay: float):
  """The lr multiplier of every parameter (same tree): layer-wise decay, see the module docstring.

  Under nn.scan (model.scan) the blocks are one stacked array per parameter; their multiplier is an
  array over the leading (layer) axis.
  """

  def one(path, leaf):
    keys = [getattr(p, 'key', None) for p in path]
    if keys[0] != 'encoder':
      return 1.0  # head, fc_norm
    if 'transformer' not in keys:
      return decay ** (depth + 1)  # patch embedding, cls token
    block = keys[keys.index('transformer') + 1]
    if block == 'blocks':
      per_layer = decay ** (depth - np.arange(depth, dtype=np.float32))
      return jnp.asarray(per_layer.reshape((depth,) + (1,) * (leaf.ndim - 1)))
    if block.startswith('block'):
      return decay ** (depth - int(block[5:]))
    return 1.0  # the encoder's final norm

  return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(args, params, depth: int, total_steps: int, warmup_steps: int):
  peak = args.base_lr * args.batch_size / 256
  schedule = optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, max(total_steps, 2),
                                                end_value=min(args.min_lr, peak))
  multipliers = layer_multipliers(params, depth, args.layer_decay)
  tx = optax.chain(
      optax.adamw(schedule, b1=args.b1, b2=args.b2, weight_decay=args.weight_decay,
                  mask=optim.decay_mask),
      # After AdamW, so that the multiplier scales the decay term too (as PyTorch's param groups).
      optax.stateless(lambda updates, _: jax.tree.map(lambda u, m: u * m, updates, multipliers)))
  return tx, schedule
