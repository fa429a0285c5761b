"""Frozen features of an encoder on a labelled split, and their .npz cache.

Features are computed on the full, unmasked test-time images, the batch sharded over every device
of the mesh; every process gets every example (gathered across processes), once and in the split's
order: the eval iterator pads the last batch and `extract` drops the padding. The pre-training
monitor, the tools and the ablation all take their features from `split_features`.
"""

from __future__ import annotations

import functools
import logging
import os
import zipfile
from typing import Callable, Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils

from macrl_jax import sharding
from macrl_jax.models import vit


def eval_batch_size(config, mesh, batch_size: int | None = None) -> int:
  """The global eval batch: `batch_size` or config.knn.eval_batch_size, rounded up to a multiple
  of the device count (the batch is split evenly over the mesh)."""
  b = int(batch_size or config.knn.eval_batch_size)
  return -(-b // mesh.size) * mesh.size


@functools.lru_cache(maxsize=None)  # one compilation per encoder, pool and mesh
def make_feature_fn(encoder: vit.Encoder, pool: str, mesh) -> Callable:
  """jit(params, images) -> pooled features of the full, unmasked images, batch sharded on mesh."""

  def features(params, images):
    return vit.pool(encoder.apply({'params': params}, images), pool)

  return jax.jit(features, in_shardings=(None, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.batch_sharding(mesh))


def extract(fn: Callable, params, batches: Iterable[dict], mesh) -> tuple[np.ndarray, np.ndarray]:
  """fn(params, images) and the labels of every valid example of an eval iterator, in order, on
  every process (features here, a classifier's logits in fine-tuning).

  `batches` are process-local numpy dicts {'image', 'label', 'mask'} (padding has mask False).
  """
  outputs, labels, masks = [], [], []
  for batch in batches:
    global_batch = sharding.make_global_batch(batch, mesh)
    out = fn(params, global_batch['image'])
    if jax.process_count() > 1:
      out, lab, m = (multihost_utils.process_allgather(x, tiled=True)
                     for x in (out, global_batch['label'], global_batch['mask']))
    else:
      lab, m = batch['label'], batch['mask']
    outputs.append(np.asarray(out))
    labels.append(np.asarray(lab))
    masks.append(np.asarray(m, bool))
  keep = np.concatenate(masks)
  return np.concatenate(outputs)[keep], np.concatenate(labels)[keep]


def split_features(config, mesh, encoder: vit.Encoder, params, split: str,
                   pool: str | None = None,
                   batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(features [n, D] float32, labels [n] int32) of every example of `split`, in split order."""
  from macrl_jax.data import input_pipeline  # TensorFlow only where data is read
  fn = make_feature_fn(encoder, pool or config.model.pool, mesh)
  local = eval_batch_size(config, mesh, batch_size) // jax.process_count()
  batches = input_pipeline.create_eval_iterator(config, split, batch_size=local)
  feats, labels = extract(fn, params, batches, mesh)
  return feats.astype(np.float32), labels.astype(np.int32)


def save(path: str, features: np.ndarray, labels: np.ndarray, **meta) -> None:
  """An .npz with `features`, `labels` and scalar metadata (split, pool, step, ...).

  Written beside and then renamed, so that a killed run never leaves a truncated cache file.
  """
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    with open(tmp, 'wb') as f:
      np.savez(f, features=features, labels=labels, **{k: np.asarray(v) for k, v in meta.items()})
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):  # a full disk: no partial file is left behind
      os.remove(tmp)


def load(path: str) -> tuple[np.ndarray, np.ndarray]:
  with np.load(path) as f:
    return f['features'], f['labels']


def cache_path(restored, split: str, pool: str) -> str:
  """Where tools/extract_features.py writes a split's features by default, and where the other
  tools look for them before extracting: DIR/eval/features/<split>_<pool>_<params>_step<N>.npz."""
  name = f'{split}_{pool}_{restored.params}_step{restored.step}.npz'
  return os.path.join(restored.workdir, 'eval', 'features', name)


def restored_features(restored, split: str, pool: str | None = None,
                      batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """`split_features` of a workdir.Restored encoder, read from / written to `cache_path` when it
  has a workdir.

  The file name identifies the checkpoint by its step: delete DIR/eval/features/ after pre-training
  a workdir again from scratch.
  """
  pool = pool or restored.config.model.pool
  compute = lambda: split_features(restored.config, restored.mesh, restored.modules.encoder,
                                   restored.encoder_params, split, pool, batch_size)
  if restored.workdir is None:
    return compute()
  path = cache_path(restored, split, pool)
  if os.path.isfile(path):
    try:
      return load(path)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
      logging.warning('The feature cache %s cannot be read (%s); extracting again.', path, e)
  feats, labels = compute()
  if jax.process_index() == 0:
    try:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      save(path, feats, labels, split=split, pool=pool, params=restored.params, step=restored.step)
    except OSError as e:  # a read-only workdir or a full disk: the cache is only a speed-up
      logging.warning('The features could not be cached in %s (%s).', path, e.strerror)
  return feats, labels
