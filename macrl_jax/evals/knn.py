"""The weighted kNN classifier of frozen features (Wu et al. 2018, as in DINO/MoCo monitors).

Cosine similarity between L2-normalised features; the k nearest train features vote for their
label with weight exp(sim / T) (or 1 each, unweighted). `evaluate` is the one entry point: the
pre-training monitor, tools/knn_eval.py and tools/ablate.py all report its figures.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from macrl_jax.evals.accuracy import topk_accuracy


def normalize(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


_topk_similar = jax.jit(lambda bank, queries, k: jax.lax.top_k(queries @ bank.T, k),
                        static_argnums=2)


def class_scores(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray,
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


def evaluate(train_feats, train_labels, test_feats, test_labels, num_classes: int, k: int = 20,
             temperature: float = 0.07, weighted: bool = True) -> dict:
  """Top-1 and top-5 accuracy of the kNN vote on the test features."""
  scores = class_scores(train_feats, train_labels, test_feats, num_classes, k, temperature,
                        weighted=weighted)
  return {'top1': topk_accuracy(scores, test_labels, 1),
          'top5': topk_accuracy(scores, test_labels, 5)}
