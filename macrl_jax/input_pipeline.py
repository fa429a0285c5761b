"""The tf.data input pipelines: augmented views for pre-training, plain batches for evaluation.

This is the only module of the package that imports TensorFlow (it hides the accelerators from it,
so that they stay JAX's). Everything is returned as numpy.

Datasets: `config.dataset` is one of `known_datasets()`: cifar10, cifar100, imagenette
(TFDS catalogue; a catalogue config may follow, e.g. 'imagenette/160px-v2'), digits, tiny_imagenet,
imagenet100 (builders in macrl_jax/datasets/) or 'folder:/path' (an image folder). `get_builder`
prepares a dataset once into `config.data_dir` (default ~/tensorflow_datasets) and reuses it.

Determinism and resume. Nothing here has state: the batch of step s is a pure function of
(config, s, process_index, process_count).
- This process reads the contiguous shard [n·p/P, n·(p+1)/P) of the split (p, P: process index and
  count), so the shards are disjoint and cover the split.
- Example position t = s·b + i (b: per-process batch) of the process's stream is item t mod m of
  epoch ⌊t / m⌋ (m: shard size); the item is `index_shuffle(t mod m)`, a stateless permutation keyed
  by (seed, process, epoch) that is computed per item, never materialised.
- Augmentation uses only tf.random.stateless_* / tf.image.stateless_* ops keyed by (seed, global
  example number s·B + p·b + i) (B: global batch), split per view and per op.
So an iterator created with `start_step=s` starts computing at step s: the examples of the steps it
skips are never read, decoded or augmented, and a checkpoint needs only the step as data position.
The order depends on the process count: resuming on another number of processes is valid but sees
other batches.

Augmentations (fields of presets.view_aug()), per example and view: RandomResizedCrop
(tf.image's box sampler: area `crop_scale`, aspect `crop_ratio`, whole image after 10 failed tries;
JPEGs decode only the box), horizontal flip, colour jitter with torchvision's semantics (brightness
as a factor, then contrast, saturation, hue, in this fixed order), grayscale, Gaussian blur (σ drawn
from `blur_sigma`, given at `aug.blur_reference_size` px, times image_size / that) and solarize, each applied with its
probability; then the MEAN/STD normalisation.

Preparation is not coordinated between processes: on a multi-host run, prepare the dataset first
(`python -m macrl_jax.input_pipeline --config=...`) or let process 0 do it before the others start.

Random access, and its memory cost. The pipeline gathers examples by index, so each shard needs
random access:
- Datasets stored as TFRecord (the default for all but imagenet100) are held in host memory, one
  shard per process, loaded once per process and split (cached; `clear_cache()` frees them).
  Images of a fixed size are held decoded (uint8): digits 1.4k·8·8·3 B ≈ 0.3 MB, cifar10/100
  50k·32·32·3 B ≈ 150 MB, tiny_imagenet 100k·64·64·3 B ≈ 1.2 GB (10-class subset: 61 MB). Images
  of varying size (imagenette, image folders) are held as their encoded bytes and decoded per use:
  imagenette full-size ≈ 1.3 GB, 320px ≈ 0.3 GB, 160px ≈ 0.1 GB. The loader reads through
  `builder.as_dataset`, so `tfds.testing.mock_data` works.
- Datasets stored as ArrayRecord (imagenet100 by default, ~14 GB; any dataset prepared with
  `config.data.file_format='array_record'`) are read from disk through `tfds.data_source`, one call
  per batch, with JPEG bytes decoded by TF; memory use is then small (the file index).
The format is the one the dataset was prepared in (see `config.data.file_format`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from macrl_jax import datasets as ds_lib
from macrl_jax.datasets import image_folder as folder_lib
from macrl_jax.datasets import imagenet100 as imagenet100_lib
from macrl_jax.datasets import tiny_imagenet as tiny_lib
from macrl_jax.errors import MissingFileError, UserError

try:  # TF must not reserve GPU memory that JAX needs; this fails only if TF already ran something.
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:
  pass

# ImageNet per-channel RGB statistics, for images scaled to [0, 1].
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)

CATALOGUE = ('cifar10', 'cifar100', 'imagenette')
FOLDER_PREFIX = 'folder:'
_PREPARE_HINT = ('python -m macrl_jax.input_pipeline --config=<your config> '
                 '[--config.FIELD=VALUE ...]')


def known_datasets() -> list[str]:
  return ['cifar10', 'cifar100', 'digits', 'imagenet100', 'imagenette', 'tiny_imagenet',
          f'{FOLDER_PREFIX}<path>']


# ---------------------------------------------------------------------------------------------
# Builders.


def _data_dir(config) -> str:
  return os.path.expanduser(config.get('data_dir') or tfds.core.constants.DATA_DIR)


def _manual_dir(config, data_dir: str) -> str:
  manual_dir = config.get('manual_dir') or os.path.join(data_dir, 'downloads', 'manual')
  return os.path.expanduser(manual_dir)


def _data_option(config, name: str, default):
  data = config.get('data')
  value = data.get(name) if data is not None else None
  return default if value is None else value


def _make_builder(config, data_dir: str, manual_dir: str) -> tfds.core.DatasetBuilder:
  """The (maybe unprepared) builder of `config.dataset`; raises for an unknown name."""
  name = config.dataset
  file_format = _data_option(config, 'file_format', None)
  kwargs = dict(data_dir=data_dir)
  if file_format:
    kwargs['file_format'] = file_format
  if name.startswith(FOLDER_PREFIX):
    return ds_lib.ImageFolder(config=ds_lib.folder_config(name[len(FOLDER_PREFIX):]), **kwargs)
  base = name.split('/')[0]
  if base == 'digits':
    return ds_lib.Digits(**kwargs)
  if base == 'tiny_imagenet':
    return _tiny_imagenet_builder(config, data_dir, manual_dir, kwargs)
  if base == 'imagenet100':
    kwargs.setdefault('file_format', imagenet100_lib.FILE_FORMAT)
    return ds_lib.Imagenet100(**kwargs)
  if base in CATALOGUE:
    return tfds.builder(name, **kwargs)
  raise UserError(f'config.dataset: unknown dataset {name!r}; known: '
                   f'{", ".join(known_datasets())}')


def _tiny_imagenet_builder(config, data_dir, manual_dir, kwargs):
  """Tiny ImageNet from the manual dir, else its one prepared copy of config.num_classes classes."""
  source = tiny_lib.find_source(manual_dir)
  if source is not None:
    return ds_lib.TinyImagenet(config=tiny_lib.source_config(source), **kwargs)
  prepared = [c for c in tiny_lib.prepared_configs(data_dir)
              if c.startswith(f'c{config.get("num_classes")}_')]
  if len(prepared) == 1:
    return ds_lib.TinyImagenet(config=tiny_lib.TinyImagenetConfig(name=prepared[0]), **kwargs)
  raise MissingFileError(
      f'dataset tiny_imagenet is not prepared in {data_dir}/{tiny_lib.NAME} and '
      f'{tiny_lib.missing_source_message(manual_dir)}; it is prepared on first use (or with '
      f'`{_PREPARE_HINT}`)')


def _check_can_prepare(builder, config, data_dir: str, manual_dir: str) -> None:
  """Raises a clear error when the manual files that preparation needs are missing."""
  name = builder.name
  if name == 'imagenet100':
    train = os.path.join(manual_dir, imagenet100_lib.ARCHIVES[0])
    if not os.path.isfile(train):
      raise MissingFileError(
          f'dataset imagenet100 is not prepared in {data_dir}/imagenet100: put '
          f'{" and ".join(imagenet100_lib.ARCHIVES)} (ImageNet 2012, from '
          f'https://image-net.org/download-images) in the manual dir {manual_dir} (or set '
          f'config.manual_dir), then run `{_PREPARE_HINT}` (reads ~150 GB once)')
  if name == 'image_folder':
    root = builder.builder_config.root
    if not os.path.isdir(os.path.join(root, 'train')):
      raise MissingFileError(
          f'dataset {config.dataset!r} is not prepared in {data_dir}/image_folder and {root}/train '
          'does not exist: the folder needs train/<class>/<image> (and val/ or test/ likewise)')


def get_builder(config) -> tfds.core.DatasetBuilder:
  """The prepared builder of `config.dataset`, preparing it into the data dir on first use."""
  data_dir = _data_dir(config)
  manual_dir = _manual_dir(config, data_dir)
  builder = _make_builder(config, data_dir, manual_dir)
  folder = builder.name == 'image_folder'
  if folder and builder.is_prepared() and folder_lib.is_stale(builder):
    logging.warning('%s changed since it was prepared in %s; preparing it again.',
                    builder.builder_config.root, builder.data_dir)
    shutil.rmtree(builder.data_dir)
    builder = _make_builder(config, data_dir, manual_dir)
  if not builder.is_prepared():
    _check_can_prepare(builder, config, data_dir, manual_dir)
    try:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except ds_lib.CorruptImageError:
      raise  # already names the file
    except Exception as e:
      if builder.name not in CATALOGUE:
        raise
      raise UserError(
          f'dataset {config.dataset!r} is not prepared in {data_dir} and could not be downloaded '
          f'({type(e).__name__}: {e}). Prepare it where there is internet access: `tfds build '
          f'{config.dataset} --data_dir={data_dir}` (or `{_PREPARE_HINT}`), then copy '
          f'{data_dir}/{builder.name} here') from e
    if folder:
      folder_lib.record_fingerprint(builder)
  _check_num_classes(builder, config)
  return builder


def _check_num_classes(builder, config) -> None:
  n = builder.info.features['label'].num_classes
  expected = config.get('num_classes')
  if expected is not None and n is not None and n != expected:
    raise UserError(f'config.num_classes: {expected}, but dataset {config.dataset!r} has {n} '
                     f'classes; set --config.num_classes={n}')


def _is_random_access(builder) -> bool:
  return builder.info.file_format == tfds.core.file_adapters.FileFormat.ARRAY_RECORD


def _split_size(builder, split: str) -> int:
  if _is_random_access(builder):
    return len(builder.as_data_source(split=split))
  # The cardinality of a TFDS dataset is known without reading it (also under mock_data, whose
  # example count differs from the recorded split sizes).
  n = int(builder.as_dataset(split=split).cardinality())
  return n if n >= 0 else sum(1 for _ in builder.as_dataset(split=split))


def num_examples(config, split: str) -> int:
  builder = get_builder(config)
  stored, indices = _split_indices(builder, config, split)
  return _split_size(builder, stored) if indices is None else len(indices)


# ---------------------------------------------------------------------------------------------
# The held-out part of the train split, for choosing hyperparameters.

HOLDOUT = 'holdout'
_HOLDOUTS: dict[tuple, np.ndarray] = {}


def _split_indices(builder, config, split: str) -> tuple[str, np.ndarray | None]:
  """The stored split that `split` names, and the indices into it (None: all of it)."""
  fraction = _data_option(config, 'holdout_fraction', 0.0)
  if split == HOLDOUT and not fraction:
    raise ValueError(f"split {HOLDOUT!r} is the part of train_split held out by "
                     "config.data.holdout_fraction, which is 0; set e.g. "
                     "--config.data.holdout_fraction=0.1")
  if not fraction or split not in (HOLDOUT, config.train_split):
    return split, None
  stored = config.train_split
  held = _holdout(builder, stored, fraction)
  if split == HOLDOUT:
    return stored, held
  return stored, np.setdiff1d(np.arange(_split_size(builder, stored)), held)


def _holdout(builder, split: str, fraction: float) -> np.ndarray:
  """round(fraction · n_c) examples of each class c, drawn with a fixed seed: sorted indices."""
  key = (os.fspath(builder.data_path), split, fraction)
  if key not in _HOLDOUTS:
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders={'image': tfds.decode.SkipDecoding()})
    labels = np.concatenate(list(ds.map(lambda ex: ex['label']).batch(4096).as_numpy_iterator()))
    rng = np.random.default_rng(0)  # the same held-out images for every run and seed
    held = [rng.permutation(np.flatnonzero(labels == c))[:round(fraction * np.sum(labels == c))]
            for c in np.unique(labels)]
    _HOLDOUTS[key] = np.sort(np.concatenate(held))
  return _HOLDOUTS[key]


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
  _HOLDOUTS.clear()


def _shard(n: int, process_index: int, process_count: int) -> tuple[int, int]:
  return n * process_index // process_count, n * (process_index + 1) // process_count


def _get_source(builder, config, split: str, process_index: int, process_count: int) -> _Source:
  stored, indices = _split_indices(builder, config, split)
  n = _split_size(builder, stored) if indices is None else len(indices)
  lo, hi = _shard(n, process_index, process_count)
  if indices is None:
    rows, key = np.arange(lo, hi), (os.fspath(builder.data_path), stored, lo, hi)
  else:
    rows = indices[lo:hi]
    key = (os.fspath(builder.data_path), stored, split, _data_option(config, 'holdout_fraction', 0),
           lo, hi)
  if key not in _CACHE:
    load = _disk_source if _is_random_access(builder) else _memory_source
    if len(_CACHE) >= _CACHE_SIZE:
      _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = load(builder, stored, rows)
  return _CACHE[key]


def _decode(image: tf.Tensor) -> tf.Tensor:
  """Encoded bytes → uint8 [h, w, 3]; grayscale and CMYK JPEGs become RGB."""
  return tf.io.decode_image(image, channels=3, expand_animations=False)


def _memory_source(builder, split: str, rows: np.ndarray) -> _Source:
  """Loads the examples `rows` (sorted) of the split into memory (decoded if of one size)."""
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
      image = tf.ensure_shape(_decode(image), shape)
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
# Augmentations, on one example; `key` is a stateless seed, int64 [2].


def _split(key: tf.Tensor, n: int) -> list[tf.Tensor]:
  return tf.unstack(tf.random.experimental.stateless_split(key, n))


def _random_crop_window(shape: tf.Tensor, key, scale, ratio) -> tuple[tf.Tensor, tf.Tensor]:
  """RandomResizedCrop's box for an image of `shape` [h, w, c]: (offset [y, x], size [h, w])."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=key,
      min_object_covered=0.0, aspect_ratio_range=tuple(ratio), area_range=tuple(scale),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  return begin[:2], size[:2]


def _decode_and_random_crop(image: tf.Tensor, key, scale, ratio) -> tf.Tensor:
  """Crops a random box; encoded JPEGs decode only the box (much cheaper for large images)."""

  def crop(decoded):
    begin, size = _random_crop_window(tf.shape(decoded), key, scale, ratio)
    return tf.slice(decoded, tf.concat([begin, [0]], 0), tf.concat([size, [3]], 0))

  if image.dtype != tf.string:
    return crop(image)

  def crop_jpeg():
    begin, size = _random_crop_window(tf.image.extract_jpeg_shape(image), key, scale, ratio)
    return tf.image.decode_and_crop_jpeg(image, tf.concat([begin, size], 0), channels=3)

  return tf.cond(tf.io.is_jpeg(image), crop_jpeg, lambda: crop(_decode(image)))


def _random_apply(fn, prob: float, x: tf.Tensor, key) -> tf.Tensor:
  """fn(x, key') with probability `prob` (decided by `key`), else x."""
  if prob <= 0:
    return x
  coin_key, fn_key = _split(key, 2)
  if prob >= 1:
    return fn(x, fn_key)
  apply = tf.random.stateless_uniform([], coin_key) < prob
  return tf.cond(apply, lambda: fn(x, fn_key), lambda: x)


def _color_jitter(x: tf.Tensor, key, aug) -> tf.Tensor:
  """torchvision ColorJitter semantics, fixed order (brightness, contrast, saturation, hue)."""
  keys = _split(key, 4)
  if aug.brightness > 0:  # a factor, as torchvision (tf.image's brightness is additive)
    x *= tf.random.stateless_uniform([], keys[0], max(0.0, 1 - aug.brightness), 1 + aug.brightness)
    x = tf.clip_by_value(x, 0.0, 1.0)
  if aug.contrast > 0:
    x = tf.image.stateless_random_contrast(x, max(0.0, 1 - aug.contrast), 1 + aug.contrast, keys[1])
    x = tf.clip_by_value(x, 0.0, 1.0)
  if aug.saturation > 0:
    x = tf.image.stateless_random_saturation(x, max(0.0, 1 - aug.saturation), 1 + aug.saturation,
                                             keys[2])
    x = tf.clip_by_value(x, 0.0, 1.0)
  if aug.hue > 0:
    x = tf.image.stateless_random_hue(x, aug.hue, keys[3])
  return x


def _grayscale(x: tf.Tensor, key) -> tf.Tensor:
  del key
  return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(x))


def _gaussian_blur(x: tf.Tensor, key, sigma_range, scale: float) -> tf.Tensor:
  """Separable Gaussian blur, σ ~ U(sigma_range) · scale (scale: image size / reference size)."""
  lo, hi = (s * scale for s in sigma_range)
  sigma = tf.random.stateless_uniform([], key, lo, hi)
  radius = max(1, math.ceil(3 * hi))  # static, so that the graph has one kernel size
  t = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-0.5 * tf.square(t / sigma))
  kernel = tf.tile((kernel / tf.reduce_sum(kernel))[:, None, None, None], [1, 1, 3, 1])
  x = tf.pad(x[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode='REFLECT')
  x = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], 'VALID')  # vertical
  x = tf.nn.depthwise_conv2d(x, tf.reshape(kernel, [1, -1, 3, 1]), [1, 1, 1, 1], 'VALID')
  return x[0]


def _solarize(x: tf.Tensor, key) -> tf.Tensor:
  del key
  return tf.where(x < 0.5, x, 1.0 - x)


def _normalize(x: tf.Tensor) -> tf.Tensor:
  return (x - MEAN) / STD


def augment(image: tf.Tensor, key: tf.Tensor, aug, image_size: int,
            blur_reference_size: int = 224) -> tuple[tf.Tensor, tf.Tensor]:
  """One view: uint8 [h, w, 3] or encoded bytes → (view, clean), normalised float32 [S, S, 3].

  `view` is the augmented image; `clean` is the same crop and flip before the photometric
  distortions (a reconstruction target). `aug` has the fields of presets.view_aug(); `key` is a
  stateless seed (int64 [2]). Blur σ is given at `blur_reference_size` px.
  """
  keys = _split(key, 6)
  x = _decode_and_random_crop(image, keys[0], aug.crop_scale, aug.crop_ratio)
  x = tf.image.resize(x, [image_size, image_size], method='bilinear', antialias=True) / 255.0
  x = tf.clip_by_value(x, 0.0, 1.0)
  if aug.flip:
    x = tf.image.stateless_random_flip_left_right(x, keys[1])
  clean = x
  x = _random_apply(lambda x, k: _color_jitter(x, k, aug), aug.color_jitter_prob, x, keys[2])
  x = _random_apply(_grayscale, aug.grayscale_prob, x, keys[3])
  blur_scale = image_size / blur_reference_size
  x = _random_apply(lambda x, k: _gaussian_blur(x, k, aug.blur_sigma, blur_scale), aug.blur_prob,
                    x, keys[4])
  x = _random_apply(_solarize, aug.solarize_prob, x, keys[5])
  return _normalize(x), _normalize(clean)


def eval_preprocess(image: tf.Tensor, image_size: int, crop_fraction: float = 1.0) -> tf.Tensor:
  """Resize the shorter side to image_size / crop_fraction, center crop, normalise."""
  x = _decode(image) if image.dtype == tf.string else image
  hw = tf.cast(tf.shape(x)[:2], tf.float32)
  target = round(image_size / crop_fraction)
  new_hw = tf.cast(tf.round(hw * target / tf.reduce_min(hw)), tf.int32)
  new_hw = tf.maximum(new_hw, image_size)  # guards rounding below the crop
  x = tf.image.resize(x, new_hw, method='bilinear', antialias=True)
  top, left = (new_hw[0] - image_size) // 2, (new_hw[1] - image_size) // 2
  x = tf.image.crop_to_bounding_box(x, top, left, image_size, image_size)
  return _normalize(tf.clip_by_value(x / 255.0, 0.0, 1.0))


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
  with config.aug.view<k>. With config.rec_target == 'clean', 'view<k>_target' holds each view
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
    keys = _split(key, len(views))
    out = {'label': ex['label']}
    for k, view in enumerate(views):
      out[f'view{k + 1}'], clean = augment(ex['image'], keys[k], view, config.image_size,
                                           blur_reference_size)
      if clean_targets:
        out[f'view{k + 1}_target'] = clean
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
  crop_fraction = _data_option(config, 'eval_crop_fraction', 1.0)

  def batch_examples(position):
    mask = position < source.size
    return {'mask': mask, **source.fetch(tf.minimum(position, source.size - 1))}

  def preprocess(ex):
    return {'image': eval_preprocess(ex['image'], size, crop_fraction), 'label': ex['label'],
            'mask': ex['mask']}

  ds = tf.data.Dataset.range(num_batches * batch_size).batch(batch_size)
  ds = ds.map(batch_examples).unbatch()
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
  return _with_options(ds).as_numpy_iterator()


# ---------------------------------------------------------------------------------------------
# `python -m macrl_jax.input_pipeline --config=configs/NAME.py`: prepares the config's dataset.


def _prepare(config) -> None:
  builder = get_builder(config)
  print(f'{config.dataset}: prepared in {builder.data_path}')
  for split in builder.info.splits:
    print(f'  {split}: {_split_size(builder, split)} examples')
  if _data_option(config, 'holdout_fraction', 0.0):
    for split in (config.train_split, HOLDOUT):
      print(f'  {split} with holdout_fraction: {num_examples(config, split)} examples')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/cifar10.py')
  app.run(lambda argv: _prepare(_CONFIG.value))
