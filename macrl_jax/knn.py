"""Frozen features of a labelled split and the weighted kNN classifier.

kNN (Wu et al. 2018, as in DINO/MoCo monitors): cosine similarity between L2-normalised features,
the k nearest train features vote for their label with weight exp(sim / T); top-1 of the votes.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from macrl_jax import models, sharding


def make_feature_fn(encoder: models.Encoder, pool: str, mesh) -> Callable:
  """jit(params, images) -> pooled features of the full, unmasked images, batch sharded on mesh."""

  def features(params, images):
    return models.pool(encoder.apply({'params': params}, images), pool)

  return jax.jit(features, in_shardings=(None, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.batch_sharding(mesh))


def extract(feature_fn: Callable, params, batches: Iterable[dict], mesh) -> tuple[np.ndarray, np.ndarray]:
  """Features and labels of every valid example of an eval iterator, in order, on every process.

  `batches` are process-local numpy dicts {'image', 'label', 'mask'} (padding has mask False).
  """
  feats, labels, masks = [], [], []
  for batch in batches:
    global_batch = sharding.make_global_batch(batch, mesh)
    f = feature_fn(params, global_batch['image'])
    if jax.process_count() > 1:
      f, lab, m = (multihost_utils.process_allgather(x, tiled=True)
                   for x in (f, global_batch['label'], global_batch['mask']))
    else:
      lab, m = batch['label'], batch['mask']
    feats.append(np.asarray(f))
    labels.append(np.asarray(lab))
    masks.append(np.asarray(m, bool))
  keep = np.concatenate(masks)
  return np.concatenate(feats)[keep], np.concatenate(labels)[keep]


def normalize(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


_topk_similar = jax.jit(lambda bank, queries, k: jax.lax.top_k(queries @ bank.T, k),
                        static_argnums=2)


def knn_predict(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray,
                num_classes: int, k: int = 20, temperature: float = 0.07,
                weighted: bool = True, chunk: int = 1024) -> np.ndarray:
  """Class scores [num_test, num_classes] of the (weighted) k-nearest-neighbour vote."""
  bank = jnp.asarray(normalize(np.asarray(train_feats, np.float32)))
  k = min(k, bank.shape[0])
  scores = []
  for i in range(0, len(test_feats), chunk):
    q = jnp.asarray(normalize(np.asarray(test_feats[i:i + chunk], np.float32)))
    sims, idx = _topk_similar(bank, q, k)
    weights = jnp.exp(sims / temperature) if weighted else jnp.ones_like(sims)
    onehot = jax.nn.one_hot(jnp.asarray(train_labels)[idx], num_classes)
    scores.append(np.asarray((onehot * weights[..., None]).sum(axis=1)))
  return np.concatenate(scores)


def knn_top1(train_feats, train_labels, test_feats, test_labels, num_classes: int,
             k: int = 20, temperature: float = 0.07) -> float:
  scores = knn_predict(train_feats, train_labels, test_feats, num_classes, k, temperature)
  return float((scores.argmax(axis=1) == np.asarray(test_labels)).mean())
