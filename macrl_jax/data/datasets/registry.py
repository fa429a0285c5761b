"""From `config.dataset` to a prepared TFDS builder, and how its examples are read.

`config.dataset` is one of `known_datasets()`: a name of the TFDS catalogue (a catalogue config may
follow, e.g. 'imagenette/160px-v2'), a builder of this package, or 'folder:/path'. `get_builder`
prepares it once into `config.data_dir` (default ~/tensorflow_datasets) and reuses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import shutil
import time

import tensorflow_datasets as tfds

from macrl_jax.data.datasets import (digits as digits_lib, image_folder as folder_lib,
                                     imagenet100 as imagenet100_lib, tiny_imagenet as tiny_lib)
from macrl_jax.errors import MissingFileError, UserError

CATALOGUE = ('cifar10', 'cifar100', 'imagenette')  # TFDS downloads these itself
FOLDER_PREFIX = 'folder:'
PREPARE_DEADLINE_S = 6 * 3600  # the longest wait for another process's preparation (imagenet100)
_PREPARE_COMMAND = ('python tools/prepare_dataset.py --config=<your config> '
                   '[--config.FIELD=VALUE ...]')


def data_option(config, name: str, default):
  """config.data.<name>, or `default` where it is None or the config predates config.data."""
  data = config.get('data')
  value = data.get(name) if data is not None else None
  return default if value is None else value


def _data_dir(config) -> str:
  return os.path.expanduser(config.get('data_dir') or tfds.core.constants.DATA_DIR)


def _manual_dir(config, data_dir: str) -> str:
  manual_dir = config.get('manual_dir') or os.path.join(data_dir, 'downloads', 'manual')
  return os.path.expanduser(manual_dir)


# ---------------------------------------------------------------------------------------------
# The builder of each dataset family: (config, data dir, manual dir, builder kwargs) → builder.


def _catalogue(config, data_dir, manual_dir, kwargs):
  del data_dir, manual_dir
  return tfds.builder(config.dataset, **kwargs)


def _digits(config, data_dir, manual_dir, kwargs):
  del config, data_dir, manual_dir
  return digits_lib.Digits(**kwargs)


def _tiny_imagenet(config, data_dir, manual_dir, kwargs):
  """Tiny ImageNet from the manual dir, else its one prepared copy of config.num_classes classes."""
  source = tiny_lib.find_source(manual_dir)
  if source is not None:
    return tiny_lib.TinyImagenet(config=tiny_lib.source_config(source), **kwargs)
  prepared = [c for c in tiny_lib.prepared_configs(data_dir)
              if c.startswith(f'c{config.get("num_classes")}_')]
  if len(prepared) == 1:
    return tiny_lib.TinyImagenet(config=tiny_lib.TinyImagenetConfig(name=prepared[0]), **kwargs)
  raise MissingFileError(
      f'dataset tiny_imagenet is not prepared in {data_dir}/{tiny_lib.NAME} and '
      f'{tiny_lib.missing_source_message(manual_dir)}; it is prepared on first use (or with '
      f'`{_PREPARE_COMMAND}`)')


def _imagenet100(config, data_dir, manual_dir, kwargs):
  del config, data_dir, manual_dir
  return imagenet100_lib.Imagenet100(**{'file_format': imagenet100_lib.FILE_FORMAT, **kwargs})


def _image_folder(config, data_dir, manual_dir, kwargs):
  del data_dir, manual_dir
  root = config.dataset[len(FOLDER_PREFIX):]
  return folder_lib.ImageFolder(config=folder_lib.folder_config(root), **kwargs)


_FAMILIES = {
    **{name: _catalogue for name in CATALOGUE},
    'digits': _digits,
    'imagenet100': _imagenet100,
    'tiny_imagenet': _tiny_imagenet,
}


def known_datasets() -> list[str]:
  return sorted(_FAMILIES) + [f'{FOLDER_PREFIX}<path>']


def _make_builder(config, data_dir: str, manual_dir: str) -> tfds.core.DatasetBuilder:
  """The (maybe unprepared) builder of `config.dataset`; raises for an unknown name."""
  name = config.dataset
  file_format = data_option(config, 'file_format', None)
  kwargs = dict(data_dir=data_dir)
  if file_format:
    kwargs['file_format'] = file_format
  if name.startswith(FOLDER_PREFIX):
    make = _image_folder
  else:
    make = _FAMILIES.get(name.split('/')[0])
  if make is None:
    raise UserError(f'config.dataset: unknown dataset {name!r}; known: '
                    f'{", ".join(known_datasets())}')
  return make(config, data_dir, manual_dir, kwargs)


# ---------------------------------------------------------------------------------------------
# Preparation.


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
          f'config.manual_dir), then run `{_PREPARE_COMMAND}` (reads ~150 GB once)')
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
  if not builder.is_prepared() or _folder_changed(builder):
    with _preparation_lock(builder, data_dir):
      # Made again: another process may have prepared it while this one waited.
      builder = _make_builder(config, data_dir, manual_dir)
      builder = _prepare(builder, config, data_dir, manual_dir)
  _check_num_classes(builder, config)
  return builder


def _folder_changed(builder) -> bool:
  return (builder.name == 'image_folder' and builder.is_prepared()
          and folder_lib.is_stale(builder))


@contextlib.contextmanager
def _preparation_lock(builder, data_dir: str):
  """Holds `<data_dir>/<dataset>.prepare.lock` while the dataset is prepared, so that two runs
  started together prepare it once: the second waits for the first (up to PREPARE_DEADLINE_S),
  then reuses its copy. An flock: the system releases it when its process dies. Buckets (gs://)
  have no locks: prepare there ahead of time (tools/prepare_dataset.py)."""
  if '://' in data_dir:
    yield
    return
  name = builder.name + (f'_{builder.builder_config.name}' if builder.builder_config else '')
  path = os.path.join(data_dir, f'{name}.prepare.lock')
  try:
    os.makedirs(data_dir, exist_ok=True)
    lock = open(path, 'a')  # noqa: SIM115 - held for the whole preparation
  except OSError as e:
    raise UserError(f'cannot write to the data dir {data_dir} ({e.strerror}); set '
                    '--config.data_dir to a folder you can write to') from None
  with lock:
    _wait_for(lock, path)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _wait_for(lock, path: str) -> None:
  deadline = time.monotonic() + PREPARE_DEADLINE_S
  for attempt in itertools.count():
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return
    except BlockingIOError:
      pass
    if time.monotonic() > deadline:
      raise UserError(f'another process has been preparing this dataset for '
                      f'{PREPARE_DEADLINE_S // 3600} h (it holds {path}); let it finish, or stop '
                      'it and run again')
    if attempt % 60 == 0:
      logging.warning('Waiting for another process preparing this dataset (it holds %s), at most '
                      '%d h.', path, PREPARE_DEADLINE_S // 3600)
    time.sleep(1.0)


def _prepare(builder, config, data_dir: str, manual_dir: str) -> tfds.core.DatasetBuilder:
  """Prepares `builder` if it is not prepared yet; an image folder changed since its preparation is
  prepared again."""
  folder = builder.name == 'image_folder'
  if _folder_changed(builder):
    logging.warning('%s changed since it was prepared in %s; preparing it again.',
                    builder.builder_config.root, builder.data_dir)
    shutil.rmtree(builder.data_dir)
    builder = _make_builder(config, data_dir, manual_dir)
  if builder.is_prepared():
    return builder
  _check_can_prepare(builder, config, data_dir, manual_dir)
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except UserError:
    raise  # already names the file or folder
  except Exception as e:
    if builder.name not in CATALOGUE:
      raise
    raise UserError(
        f'dataset {config.dataset!r} is not prepared in {data_dir} and could not be downloaded '
        f'({type(e).__name__}: {e}). Prepare it where there is internet access: `tfds build '
        f'{config.dataset} --data_dir={data_dir}` (or `{_PREPARE_COMMAND}`), then copy '
        f'{data_dir}/{builder.name} here') from e
  if folder:
    folder_lib.record_fingerprint(builder)
  return builder


def _check_num_classes(builder, config) -> None:
  n = builder.info.features['label'].num_classes
  expected = config.get('num_classes')
  if expected is not None and n is not None and n != expected:
    raise UserError(f'config.num_classes: {expected}, but dataset {config.dataset!r} has {n} '
                    f'classes; set --config.num_classes={n}')


def is_random_access(builder) -> bool:
  """Whether the prepared dataset is read from disk by index (ArrayRecord), not held in memory."""
  return builder.info.file_format == tfds.core.file_adapters.FileFormat.ARRAY_RECORD
