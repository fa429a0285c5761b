"""Mixup and cutmix of a batch of images and their (soft) targets, as timm's Mixup in batch mode."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mix(rng, images, targets, mixup: float, cutmix: float, switch_prob: float = 0.5):
  """timm's Mixup in batch mode: one λ ~ Beta(α, α) per batch, the partner is the reversed batch.

  With both on, each batch is cutmixed with probability `switch_prob`, else mixed up. Cutmix pastes
  a box of area ≈ (1 − λ) and sets λ to the exact unpasted fraction.
  """
  if mixup <= 0 and cutmix <= 0:
    return images, targets
  k_switch, k_mixup, k_cutmix, k_box = jax.random.split(rng, 4)
  other_x, other_t = images[::-1], targets[::-1]
  blend = lambda lam: (lam * images + (1 - lam) * other_x, lam * targets + (1 - lam) * other_t)
  if mixup > 0:
    mixed = blend(jax.random.beta(k_mixup, mixup, mixup))
  if cutmix <= 0:
    return mixed
  h, w = images.shape[1:3]
  lam = jax.random.beta(k_cutmix, cutmix, cutmix)
  cut = jnp.sqrt(1.0 - lam)
  cy, cx = jax.random.uniform(k_box, (2,)) * jnp.array([h, w])
  y0, y1 = (jnp.clip(jnp.round(cy + s * cut * h / 2), 0, h) for s in (-1, 1))
  x0, x1 = (jnp.clip(jnp.round(cx + s * cut * w / 2), 0, w) for s in (-1, 1))
  ys, xs = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  box = ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1))[None, :, :, None]
  lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
  cutmixed = (jnp.where(box, other_x, images), lam * targets + (1 - lam) * other_t)
  if mixup <= 0:
    return cutmixed
  use_cutmix = jax.random.uniform(k_switch) < switch_prob
  return jax.tree.map(lambda a, b: jnp.where(use_cutmix, a, b), cutmixed, mixed)
