"""Frozen features of a restored encoder, their .npz files, top-k accuracy and the kNN evaluation.

Shared by tools/extract_features.py, knn_eval.py and linear_probe.py. Features are computed on the
full, unmasked test-time images, the batch sharded over every device of the mesh; the eval
iterator pads the last batch and `knn.extract` drops the padding, so each example appears once.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from macrl_jax import knn
from macrl_jax.restore import Restored


def eval_batch_size(config, mesh, batch_size: int | None = None) -> int:
  """The global eval batch: `batch_size` or config.knn.eval_batch_size, rounded up to a multiple
  of the device count (the batch is split evenly over the mesh)."""
  b = int(batch_size or config.knn.eval_batch_size)
  return -(-b // mesh.size) * mesh.size


def split_features(restored: Restored, split: str, pool: str | None = None,
                   batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(features [n, D] float32, labels [n] int32) of every example of `split`, in split order."""
  from macrl_jax import input_pipeline  # TensorFlow only where data is read
  config, mesh = restored.config, restored.mesh
  fn = knn.make_feature_fn(restored.modules.encoder, pool or config.model.pool, mesh)
  local = eval_batch_size(config, mesh, batch_size) // jax.process_count()
  batches = input_pipeline.create_eval_iterator(config, split, batch_size=local)
  feats, labels = knn.extract(fn, restored.encoder_params, batches, mesh)
  return feats.astype(np.float32), labels.astype(np.int32)


def save_features(path: str, features: np.ndarray, labels: np.ndarray, **meta) -> None:
  """An .npz with `features`, `labels` and scalar metadata (split, pool, step, ...).

  Written beside and then renamed, so that a killed run never leaves a truncated cache file.
  """
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'wb') as f:
    np.savez(f, features=features, labels=labels, **{k: np.asarray(v) for k, v in meta.items()})
  os.replace(tmp, path)


def load_features(path: str) -> tuple[np.ndarray, np.ndarray]:
  with np.load(path) as f:
    return f['features'], f['labels']


def features_path(restored: Restored, split: str, pool: str) -> str:
  """Where tools/extract_features.py writes a split's features by default, and where the other
  tools look for them before extracting: DIR/eval/features/<split>_<pool>_<params>_step<N>.npz."""
  name = f'{split}_{pool}_{restored.params}_step{restored.step}.npz'
  return os.path.join(restored.workdir, 'eval', 'features', name)


def cached_split_features(restored: Restored, split: str, pool: str | None = None,
                          batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """`split_features`, read from / written to `features_path` when the model has a workdir.

  The file name identifies the checkpoint by its step: delete DIR/eval/features/ after pre-training
  a workdir again from scratch.
  """
  pool = pool or restored.config.model.pool
  if restored.workdir is None:
    return split_features(restored, split, pool, batch_size)
  path = features_path(restored, split, pool)
  if os.path.isfile(path):
    return load_features(path)
  feats, labels = split_features(restored, split, pool, batch_size)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_features(path, feats, labels, split=split, pool=pool, params=restored.params,
                  step=restored.step)
  return feats, labels


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
  """Fraction of rows whose label is among the k highest scores (ties broken by class index)."""
  scores, labels = np.asarray(scores), np.asarray(labels)
  k = min(k, scores.shape[1])
  top = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  return float((top == labels[:, None]).any(axis=1).mean())


def knn_eval(train_feats, train_labels, test_feats, test_labels, num_classes: int, k: int = 20,
             temperature: float = 0.07, weighted: bool = True) -> dict:
  """Top-1/top-5 of the kNN vote (weighted by exp(sim / T), or uniform)."""
  scores = knn.knn_predict(train_feats, train_labels, test_feats, num_classes, k, temperature,
                           weighted=weighted)
  return {'top1': topk_accuracy(scores, test_labels, 1),
          'top5': topk_accuracy(scores, test_labels, 5)}
