"""The tf.data pipelines: augmented views for pre-training, plain batches for evaluation.

Everything is returned as numpy, normalised with MEAN and STD. Nothing here has state: the batch of
step s is a pure function of (config, s, process_index, process_count), so an iterator created with
`start_step=s` computes nothing for the steps before s, and a checkpoint needs only the step as its
data position (README, "Datasets": sharding, shuffling and the in-memory shards).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from macrl_jax.data import augment
from macrl_jax.data.datasets import splits
from macrl_jax.data.datasets.registry import data_option, is_random_access
# The rest of the program reaches the datasets through this module, which keeps TensorFlow off the
# GPUs before any TF op runs.
from macrl_jax.data.datasets.registry import get_builder, known_datasets  # noqa: E402
from macrl_jax.errors import UserError  # noqa: E402

try:  # TF must not reserve GPU memory that JAX needs; this fails only if TF already ran something.
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:
  pass

# ImageNet per-channel RGB statistics, for images scaled to [0, 1].
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _normalize(x: tf.Tensor) -> tf.Tensor:
  return (x - MEAN) / STD


def num_examples(config, split: str) -> int:
  return splits.num_examples(get_builder(config), config, split)


def check_splits(config) -> None:
  """Prepares the dataset (or says how to) and checks that it has the config's splits."""
  splits.check_names(get_builder(config), config)


# ---------------------------------------------------------------------------------------------
# Random access to a process's shard of a split.


@dataclasses.dataclass(frozen=True)
class _Source:
  """This process's shard of a split; `fetch` maps int64 positions [k] in it to a batch."""
  size: int
  fetch: Callable[[tf.Tensor], dict[str, tf.Tensor]]


_CACHE: dict[tuple, _Source] = {}
_CACHE_SIZE = 4  # the train and test split, with room for one more dataset


def clear_cache() -> None:
  """Drops the in-memory shards (e.g. after re-preparing a dataset, or in tests)."""
  _CACHE.clear()
  splits.clear_holdouts()


def _shard(n: int, process_index: int, process_count: int) -> tuple[int, int]:
  """[n·p/P, n·(p+1)/P): the shards of the processes are disjoint and cover the split."""
  return n * process_index // process_count, n * (process_index + 1) // process_count


def _get_source(builder, config, split: str, process_index: int, process_count: int) -> _Source:
  stored, indices = splits.split_indices(builder, config, split)
  n = splits.split_size(builder, stored) if indices is None else len(indices)
  lo, hi = _shard(n, process_index, process_count)
  if indices is None:
    rows, key = np.arange(lo, hi), (os.fspath(builder.data_path), stored, lo, hi)
  else:
    rows = indices[lo:hi]
    key = (os.fspath(builder.data_path), stored, split, data_option(config, 'holdout_fraction', 0),
           data_option(config, 'label_fraction', 1), data_option(config, 'label_seed', 0), lo, hi)
  if key not in _CACHE:
    load = _disk_source if is_random_access(builder) else _memory_source
    if len(_CACHE) >= _CACHE_SIZE:
      _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = load(builder, stored, rows)
  return _CACHE[key]


def _memory_source(builder, split: str, rows: np.ndarray) -> _Source:
  """Loads the examples `rows` (sorted) of the split into memory (decoded if of one size).

  Reads through `builder.as_dataset`, so that `tfds.testing.mock_data` works.
  """
  shape = builder.info.features['image'].shape
  decode = None not in shape
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(try_autocache=False))
  lo, hi = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)
  ds = ds.skip(lo).take(hi - lo)  # not split slicing: mock_data ignores it

  def prepare(ex):
    image = ex['image']
    if decode:
      image = tf.ensure_shape(augment.decode_image(image), shape)
    return image, tf.cast(ex['label'], tf.int32)

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).batch(4096)
  images, labels = [], []
  for image, label in ds.as_numpy_iterator():
    images.append(image)
    labels.append(label)
  if images:
    keep = rows - lo
    images, labels = np.concatenate(images)[keep], np.concatenate(labels)[keep]
  images = tf.constant(images) if len(images) else tf.zeros([0, *shape[:2], 3], tf.uint8)
  labels = tf.constant(labels) if len(labels) else tf.zeros([0], tf.int32)

  def fetch(positions):
    return {'image': tf.gather(images, positions), 'label': tf.gather(labels, positions)}

  return _Source(size=len(rows), fetch=fetch)


def _disk_source(builder, split: str, rows: np.ndarray) -> _Source:
  """Reads the examples `rows` of an ArrayRecord split from disk, one batch per call."""
  source = builder.as_data_source(split=split, decoders={'image': tfds.decode.SkipDecoding()})

  def read(positions: np.ndarray):
    examples = source.__getitems__([int(rows[i]) for i in positions])
    images = np.array([ex['image'] for ex in examples], dtype=object)
    labels = np.array([ex['label'] for ex in examples], dtype=np.int32)
    return images, labels

  def fetch(positions):
    images, labels = tf.numpy_function(read, [positions], (tf.string, tf.int32), stateful=False)
    return {'image': tf.ensure_shape(images, positions.shape),
            'label': tf.ensure_shape(labels, positions.shape)}

  return _Source(size=len(rows), fetch=fetch)


# ---------------------------------------------------------------------------------------------
# Pipelines.


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise UserError(f'process_index {process_index} is not in [0, process_count={process_count})')
  return process_index, process_count


def _local_batch_size(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise UserError(f'config.batch_size: global batch {batch_size} is not divisible by the '
                     f'{process_count} processes')
  return batch_size // process_count


def _with_options(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True  # parallel maps keep the order: batch s is the same every run
  options.threading.max_intra_op_parallelism = 1  # parallelism comes from the maps
  return ds.with_options(options)


def _shuffled_index(position: tf.Tensor, m: int, seed: int, process_index: int) -> tf.Tensor:
  """Stream positions [k] → shard indices: epoch t // m is a fresh permutation of the m examples.

  Position t = s·b + i of a process's stream (step s, b examples per process) is item t mod m of
  epoch ⌊t / m⌋ of its shard of m examples.

  The permutation of each (seed, process, epoch) is evaluated per item, never materialised. The raw
  op takes that 3-word key directly (TF 2.21's tf.random.experimental.index_shuffle mis-pads
  batched seeds).
  """
  epoch, offset = position // m, position % m
  fill = lambda value: tf.fill(tf.shape(position), tf.constant(value, tf.int64))
  key = tf.stack([fill(seed), fill(process_index), epoch], axis=1)
  return tf.raw_ops.RandomIndexShuffle(index=offset, seed=key, max_index=fill(m - 1), rounds=4)


def create_pretrain_iterator(config, *, start_step: int = 0, process_index: int | None = None,
                             process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator of this process's batches for steps start_step, start_step + 1, ...

  Each batch: {'view1': float32 [b, H, W, 3], 'view2' (when config.num_views == 2), 'label': int32
  [b]} with b = config.batch_size // process_count, H = W = config.image_size; view k is augmented
  with config.aug.view<k>, keyed by (seed, global example number s·B + p·b + i), B the global
  batch. With config.rec_target == 'clean', 'view<k>_target' holds each view
  before its photometric distortions.
  """
  p, num_p = _process(process_index, process_count)
  b = _local_batch_size(config.batch_size, num_p)
  builder = get_builder(config)
  source = _get_source(builder, config, config.train_split, p, num_p)
  if source.size == 0:
    raise UserError(f'process {p} of {num_p} has no examples of split {config.train_split!r} of '
                    f'{config.dataset!r} ({num_examples(config, config.train_split)} examples)')
  views = [config.aug.view1, config.aug.view2][:config.num_views]
  seed = int(config.seed)
  m = source.size

  def step_examples(step):
    """Step → the b examples of this process, with their global example number."""
    position = step * b + tf.range(b, dtype=tf.int64)  # in this process's stream
    index = _shuffled_index(position, m, seed, p)
    example = step * config.batch_size + p * b + tf.range(b, dtype=tf.int64)
    return {'example': example, **source.fetch(index)}

  blur_reference_size = config.aug.get('blur_reference_size', 224)
  clean_targets = config.get('rec_target', 'view') == 'clean'

  def make_views(ex):
    key = tf.stack([tf.constant(seed, tf.int64), ex['example']])
    keys = augment.split_key(key, len(views))
    out = {'label': ex['label']}
    for k, view in enumerate(views):
      x, clean = augment.random_view(ex['image'], keys[k], view, config.image_size,
                                     blur_reference_size)
      out[f'view{k + 1}'] = _normalize(x)
      if clean_targets:
        out[f'view{k + 1}_target'] = _normalize(clean)
    return out

  ds = tf.data.Dataset.counter(start_step)
  ds = ds.map(step_examples, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
  ds = ds.map(make_views, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(b, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return _with_options(ds).as_numpy_iterator()


def create_eval_iterator(config, split: str, *, batch_size: int, process_index: int | None = None,
                         process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Finite iterator over this process's shard of `split`, in order, without augmentation.

  Batches: {'image': float32 [batch_size, H, W, 3], 'label': int32, 'mask': bool}. The last batch
  is padded (mask False); every process yields ceil(ceil(n / P) / batch_size) batches, so that
  collective code runs the same number of steps everywhere, and each example of the split appears
  in exactly one process with mask True.
  """
  p, num_p = _process(process_index, process_count)
  builder = get_builder(config)
  n = num_examples(config, split)
  per_process = -(-n // num_p)  # ceil: the largest shard
  num_batches = -(-per_process // batch_size)
  size = config.image_size
  source = _get_source(builder, config, split, p, num_p)
  if source.size == 0:  # more processes than examples: padding only
    return iter([{'image': np.zeros([batch_size, size, size, 3], np.float32),
                  'label': np.zeros([batch_size], np.int32),
                  'mask': np.zeros([batch_size], bool)}] * num_batches)
  crop_fraction = data_option(config, 'eval_crop_fraction', 1.0)

  def batch_examples(position):
    mask = position < source.size
    return {'mask': mask, **source.fetch(tf.minimum(position, source.size - 1))}

  def preprocess(ex):
    image = _normalize(augment.center_view(ex['image'], size, crop_fraction))
    return {'image': image, 'label': ex['label'], 'mask': ex['mask']}

  ds = tf.data.Dataset.range(num_batches * batch_size).batch(batch_size)
  ds = ds.map(batch_examples).unbatch()
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
  return _with_options(ds).as_numpy_iterator()


