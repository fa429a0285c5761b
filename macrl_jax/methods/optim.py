"""AdamW with linear warm-up and cosine decay (MAE / MoCo v3 recipe)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def lr_schedule(config, total_steps: int) -> optax.Schedule:
  """Base lr scaled by global batch / 256, linear warm-up, cosine decay to `min_lr`."""
  o = config.optim
  peak = o.base_lr * config.batch_size / 256
  warmup = min(o.warmup_steps, total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=o.min_lr)


def decay_mask(params, which: str = 'kernels'):
  """The parameters that weight decay applies to (a tree of bools like `params`).

  'kernels': matmul kernels only (MAE's fine-tuning: not biases, norms, cls token or position
  embeddings). 'weights': every parameter but biases and norm scales, the rule of timm's
  `param_groups_weight_decay` that MAE pre-trains with (ndim > 1 and not a bias, so cls and mask
  tokens too); decided by name, since nn.scan stacks 1-D parameters into 2-D ones. 'all': MoCo v3.
  """
  def decayed(path, _):
    name = getattr(path[-1], 'key', None)
    if which == 'all':
      return True
    if which == 'weights':
      return name not in ('bias', 'scale')
    return name == 'kernel'

  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  o = config.optim
  schedule = lr_schedule(config, total_steps)
  tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                   mask=lambda params: decay_mask(params, o.decay_params))
  if o.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
  return tx, schedule


def guard_non_finite(new_state, old_state, quantities: dict) -> tuple[Any, jax.Array]:
  """(state, skipped): the new state when every scalar of `quantities` (loss, gradient and
  parameter norms) is finite, else the old one.

  Inside the jitted step, so a bad step costs the host nothing: it is refused on the device and
  counted in the metrics (`skipped`), which the host reads when it syncs anyway. A finite step
  selects the new values exactly, so its numerics are unchanged.
  """
  ok = jnp.all(jnp.isfinite(jnp.stack(list(quantities.values()))))
  state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state, old_state)
  return state, 1.0 - ok.astype(jnp.float32)
