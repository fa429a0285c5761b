"""The loss terms: masked-patch reconstruction (MAE) and InfoNCE (MoCo v3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def reconstruction_loss(pred: jax.Array, target: jax.Array, mask: jax.Array, *,
                        norm_pix: bool = True, kind: str = 'l1') -> jax.Array:
  """Mean error on the masked patches only.

  pred, target: [B, N, P] (target = patchify(images)); mask: [B, N], 1 on masked patches.
  With `norm_pix` each target patch is normalised by its own mean and unbiased variance, as MAE's
  `torch.var` computes it (the biased one would make every target √(P/(P−1)) too large).
  """
  if norm_pix:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, ddof=1, keepdims=True)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  diff = pred - target
  err = jnp.abs(diff) if kind == 'l1' else jnp.square(diff)
  per_patch = err.mean(axis=-1)
  return (per_patch * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def infonce(q: jax.Array, k: jax.Array, temperature: float,
            queue: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """MoCo v3 contrastive loss of queries q [B, C] against keys k [B, C] (+ a bank [Q, C]).

  The positive of q_i is k_i; the negatives are every other key of the global batch (the arrays are
  global under jit, so no explicit all-gather is needed) and the bank's keys. The loss is scaled by
  2τ as in MoCo v3. Returns (loss, top-1 accuracy of finding the positive).
  """
  q = q / jnp.linalg.norm(q, axis=-1, keepdims=True).clip(1e-12)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True).clip(1e-12)
  logits = q @ k.T
  if queue is not None:
    logits = jnp.concatenate([logits, q @ queue.T], axis=1)
  logits = logits / temperature
  labels = jnp.arange(q.shape[0])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  acc = (logits.argmax(axis=-1) == labels).mean()
  return 2 * temperature * loss, acc


def enqueue(queue: jax.Array, ptr: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """FIFO memory bank: writes the L2-normalised keys at ptr (wrapping around) and advances ptr."""
  keys = keys / jnp.linalg.norm(keys, axis=-1, keepdims=True).clip(1e-12)
  idx = (ptr + jnp.arange(keys.shape[0])) % queue.shape[0]
  return queue.at[idx].set(keys.astype(queue.dtype)), (ptr + keys.shape[0]) % queue.shape[0]


def patch_infonce(pred: jax.Array, target: jax.Array, ids_masked: jax.Array, temperature: float,
                  negatives: str = 'image') -> tuple[jax.Array, jax.Array]:
  """MimCo's patch-level loss: each masked position's prediction against the teacher's tokens.

  pred, target: [B, N, C]; ids_masked: [B, M] the masked positions. The positive of a prediction is
  the teacher's token at its position; the negatives are the teacher's tokens at the other masked
  positions of the same image ('image') or of the whole batch ('batch'). Plain InfoNCE (no 2τ
  factor). Returns (loss, top-1 accuracy).
  """
  def masked(x):
    x = jnp.take_along_axis(x, ids_masked[..., None], axis=1)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)

  p, t = masked(pred), masked(target)
  if negatives == 'batch':
    p, t = p.reshape(1, -1, p.shape[-1]), t.reshape(1, -1, t.shape[-1])
  logits = jnp.einsum('bmc,bnc->bmn', p, t) / temperature
  labels = jnp.broadcast_to(jnp.arange(logits.shape[1]), logits.shape[:2])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  acc = (logits.argmax(axis=-1) == labels).mean()
  return loss, acc
