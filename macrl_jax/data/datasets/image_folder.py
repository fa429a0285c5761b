"""`image_folder`: any folder of class subfolders, as a TFDS builder (`dataset='folder:/path'`).

Layout (the torchvision `ImageFolder` one, one level per split):

    /path/train/<class>/<image>     required; its subfolder names (sorted) are the classes
    /path/val/<class>/<image>       optional, also accepted as validation/ or test/

Each split is named after its folder ('train', 'val', 'validation', 'test'), so a config points
at it with `train_split='train'`, `test_split='val'` (or whichever is there). Files with an image
suffix (.jpg .jpeg .png .bmp .gif .webp .tif .tiff, any case) are read; other files are ignored.

Preparation first decodes every image (PIL) and raises one `CorruptImageError` listing every file
that cannot be read, so a bad file is never silently dropped. JPEG and PNG bytes are stored as they
are (TensorFlow decodes grayscale and CMYK JPEGs to RGB); other formats are re-encoded as PNG.

The prepared copy lives in `<data_dir>/image_folder/<folder name>_<hash of its absolute path>/`,
with a fingerprint of the folder (every file's relative name, size and modification time) beside
it: when the folder has changed since, it is prepared again.
"""

from __future__ import annotations

import hashlib
import io
import os
import re

import tensorflow_datasets as tfds

from macrl_jax.errors import MissingFileError, UserError

SPLIT_DIRS = ('train', 'val', 'validation', 'test')
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')


class CorruptImageError(UserError):
  """An image file that cannot be decoded; the message starts with its path."""


def checked_image_bytes(data: bytes, path: str, size: tuple[int, int] | None = None) -> bytes:
  """Fully decodes `data` and returns bytes TensorFlow can decode to RGB.

  Raises CorruptImageError naming `path` when the file is not a readable image (or, with `size`
  = (width, height), has another size).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()  # open() reads only the header; load() decodes, so truncation shows here
      if size is not None and image.size != size:
        raise CorruptImageError(f'{path}: image is {image.size[0]}×{image.size[1]}, expected '
                                f'{size[0]}×{size[1]}')
      if image.format == 'JPEG' or (image.format == 'PNG' and image.mode in ('L', 'LA', 'P', 'RGB',
                                                                              'RGBA')):
        return data
      out = io.BytesIO()
      image.convert('RGB').save(out, format='PNG')
      return out.getvalue()
  except CorruptImageError:
    raise
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
    raise CorruptImageError(f'{path}: cannot decode image ({type(e).__name__}: {e}); delete or '
                            'replace the file, then prepare the dataset again') from e


def fingerprint(root: str) -> str:
  """A hash of the relative name, size and modification time of every file of the split folders."""
  h = hashlib.sha1()
  for split in SPLIT_DIRS:
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, split)):
      dirnames.sort()
      for name in sorted(filenames):
        st = os.stat(os.path.join(dirpath, name))
        rel = os.path.relpath(os.path.join(dirpath, name), root)
        h.update(f'{rel}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
  return h.hexdigest()


def _fingerprint_path(builder) -> str:
  return os.path.join(builder.data_dir, 'folder_fingerprint.txt')


def record_fingerprint(builder) -> None:
  with open(_fingerprint_path(builder), 'w') as f:
    f.write(fingerprint(builder.builder_config.root))


def is_stale(builder) -> bool:
  """Whether the folder changed since it was prepared (False once the folder is gone)."""
  root = builder.builder_config.root
  if not os.path.isdir(os.path.join(root, 'train')):
    return False
  try:
    with open(_fingerprint_path(builder)) as f:
      return f.read() != fingerprint(root)
  except FileNotFoundError:
    return True


def _is_image(name: str) -> bool:
  return not name.startswith('.') and name.lower().endswith(IMAGE_SUFFIXES)


def _subdirs(path: str) -> list[str]:
  return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith('.'))


class ImageFolderConfig(tfds.core.BuilderConfig):
  """One folder; `class_names` is None once the folder is gone (read from the prepared copy)."""

  def __init__(self, *, root: str, class_names: tuple[str, ...] | None, **kwargs):
    super().__init__(**kwargs)
    self.root = root
    self.class_names = class_names


def folder_config(root: str) -> ImageFolderConfig:
  """The builder config of the folder `root` (its name keys the prepared copy in the data dir)."""
  root = os.path.abspath(os.path.expanduser(root))
  digest = hashlib.sha1(root.encode()).hexdigest()[:8]
  slug = re.sub(r'[^A-Za-z0-9_]', '_', os.path.basename(root.rstrip('/')) or 'root')[:40]
  train = os.path.join(root, 'train')
  class_names = tuple(_subdirs(train)) if os.path.isdir(train) else None
  return ImageFolderConfig(name=f'{slug}_{digest}', root=root, class_names=class_names,
                           description=f'Image folder {root}')


class ImageFolder(tfds.core.GeneratorBasedBuilder):
  """Class-subfolder image dataset; build with `ImageFolder(config=folder_config(path), ...)`."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    names = self.builder_config.class_names if self.builder_config else None
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(names=names) if names else tfds.features.ClassLabel(),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The folder is read in place.
    root = self.builder_config.root
    if not self.builder_config.class_names:
      raise MissingFileError(f'image folder {root}: expected class subfolders in {root}/train')
    split_dirs = [os.path.join(root, s) for s in SPLIT_DIRS if os.path.isdir(os.path.join(root, s))]
    for split_dir in split_dirs:
      self._refuse_empty(split_dir)
    # All corrupt files in one message, rather than one per preparation attempt.
    corrupt = []
    for split_dir in split_dirs:
      for _, path in self._images(split_dir):
        try:
          with open(path, 'rb') as f:
            checked_image_bytes(f.read(), path)
        except CorruptImageError as e:
          corrupt.append(str(e).split('; delete')[0])
    if corrupt:
      raise CorruptImageError(f'{len(corrupt)} image(s) of {root} cannot be decoded; delete or '
                              f'replace them, then run again: ' + ' | '.join(corrupt))
    return {os.path.basename(d): self._generate_examples(d) for d in split_dirs}

  def _refuse_empty(self, split_dir: str) -> None:
    """A class folder of train/ without images would be a class without examples, and a split
    without images fails deep in TFDS: both are refused, naming the folder."""
    if os.path.basename(split_dir) == 'train':
      for class_name in _subdirs(split_dir):
        class_dir = os.path.join(split_dir, class_name)
        if not any(map(_is_image, os.listdir(class_dir))):
          raise UserError(f'{class_dir}: class folder without images (files ending in '
                          f'{" ".join(IMAGE_SUFFIXES)}); add its images or delete the folder')
    if next(self._images(split_dir), None) is None:
      raise UserError(f'{split_dir}: no images in its class subfolders ({split_dir}/<class>/'
                      f'<image>, files ending in {" ".join(IMAGE_SUFFIXES)}); add them or delete '
                      'the folder')

  def _images(self, split_dir: str):
    """(class name, path) of every image of a split, checking its classes against train/'s."""
    names = self.builder_config.class_names
    for class_name in _subdirs(split_dir):
      if class_name not in names:
        train_dir = os.path.join(os.path.dirname(split_dir), 'train')
        raise UserError(f'{split_dir}/{class_name}: class not in {train_dir} (classes there: '
                        f'{", ".join(names)})')
      class_dir = os.path.join(split_dir, class_name)
      for file_name in sorted(filter(_is_image, os.listdir(class_dir))):
        yield class_name, os.path.join(class_dir, file_name)

  def _generate_examples(self, split_dir: str):
    for class_name, path in self._images(split_dir):
      with open(path, 'rb') as f:
        image = checked_image_bytes(f.read(), path)
      key = f'{class_name}/{os.path.basename(path)}'
      yield key, {'image': image, 'label': class_name, 'file_name': key}
