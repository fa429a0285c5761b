"""`tiny_imagenet`: Tiny ImageNet (CS231N) from its official folder or zip, as a TFDS builder.

Tiny ImageNet cannot be downloaded by TFDS; put one of these in the manual directory
(`config.manual_dir`, else `<data_dir>/downloads/manual`):

    tiny-imagenet-200.zip     as downloaded from http://cs231n.stanford.edu/tiny-imagenet-200.zip
    tiny-imagenet-200/        the unzipped folder

or point `config.manual_dir` at a folder that itself has the layout (`wnids.txt`, `train/`, `val/`),
e.g. a class subset such as ../shared/data/tiny-imagenet-10, or at the zip file itself.

Layout read: `wnids.txt` (the classes, in label order: the number of classes comes from it),
`train/<wnid>/images/*.JPEG` (labels from the folder names) and `val/images/*.JPEG` with labels
from `val/val_annotations.txt`. Splits: 'train' and 'validation' (the official test split has no
labels). Images are 64×64; the original JPEG bytes are stored (some are grayscale; the input
pipeline decodes them to RGB). Every file is decoded once at preparation: a corrupt one raises
`CorruptImageError` with its path.

Builder config: named after the class list, `c<number of classes>_<hash of wnids.txt>`, so a
10-class subset and the 200-class dataset are prepared side by side in the same data dir
(`<data_dir>/tiny_imagenet/c200_…/1.0.0` and `…/c10_…/1.0.0`) and never overwrite each other.
"""

from __future__ import annotations

import hashlib
import os
import zipfile

import tensorflow_datasets as tfds

from macrl_jax.errors import MissingFileError

from macrl_jax.data.datasets.image_folder import checked_image_bytes

NAME = 'tiny_imagenet'
ZIP_NAME = 'tiny-imagenet-200.zip'
FOLDER_NAME = 'tiny-imagenet-200'
URL = 'http://cs231n.stanford.edu/tiny-imagenet-200.zip'
IMAGE_SIZE = 64


class SourceTree:
  """Read-only access to the dataset folder, either on disk or inside the zip."""

  def __init__(self, path: str):
    self.path = path
    self._zip = None
    self._prefix = ''
    if os.path.isfile(path):
      self._zip = zipfile.ZipFile(path)
      # The official zip holds everything under tiny-imagenet-200/; find where wnids.txt is.
      found = sorted((n for n in self._zip.namelist() if n.endswith('wnids.txt')), key=len)
      if not found:
        raise MissingFileError(f'{path}: no wnids.txt inside; is it the Tiny ImageNet zip?')
      self._prefix = found[0][:-len('wnids.txt')]
      self._names = set(self._zip.namelist())

  def display(self, rel: str) -> str:
    """The path shown in messages (zip members as `archive.zip/member`)."""
    return os.path.join(self.path, self._prefix + rel if self._zip else rel)

  def read(self, rel: str) -> bytes:
    if self._zip:
      return self._zip.read(self._prefix + rel)
    with open(os.path.join(self.path, rel), 'rb') as f:
      return f.read()

  def listdir(self, rel: str) -> list[str]:
    """File names directly inside the folder `rel`, sorted."""
    if not self._zip:
      return sorted(os.listdir(os.path.join(self.path, rel)))
    start = self._prefix + rel.rstrip('/') + '/'
    return sorted(n[len(start):] for n in self._names
                  if n.startswith(start) and '/' not in n[len(start):] and n != start)


def find_source(manual_dir: str) -> str | None:
  """The folder (with wnids.txt) or zip that `manual_dir` holds or is; None if none."""
  candidates = [
      manual_dir,  # a folder with the layout itself, or the zip file itself
      os.path.join(manual_dir, FOLDER_NAME),
      os.path.join(manual_dir, ZIP_NAME),
  ]
  for path in candidates:
    if os.path.isfile(os.path.join(path, 'wnids.txt')):
      return path
    if path.endswith('.zip') and os.path.isfile(path):
      return path
  return None


def missing_source_message(manual_dir: str) -> str:
  return (f'Tiny ImageNet not found in the manual dir {manual_dir}: put {ZIP_NAME} there (download '
          f'from {URL}), or its unzipped {FOLDER_NAME}/ folder, or set config.manual_dir to a '
          'folder with the official layout (wnids.txt, train/, val/)')


def read_wnids(tree: SourceTree) -> list[str]:
  return tree.read('wnids.txt').decode().split()


def source_config(source: str) -> TinyImagenetConfig:
  """The builder config of the dataset at `source` (a folder or zip, see `find_source`)."""
  wnids = read_wnids(SourceTree(source))
  digest = hashlib.sha1(' '.join(wnids).encode()).hexdigest()[:8]
  return TinyImagenetConfig(name=f'c{len(wnids)}_{digest}', source=source, wnids=tuple(wnids),
                            description=f'Tiny ImageNet, {len(wnids)} classes, from {source}')


def prepared_configs(data_dir: str) -> list[str]:
  """Names of the builder configs already prepared in `data_dir`."""
  root = os.path.join(data_dir, NAME)
  if not os.path.isdir(root):
    return []
  version = str(TinyImagenet.VERSION)
  return sorted(c for c in os.listdir(root)
                if os.path.isfile(os.path.join(root, c, version, 'dataset_info.json')))


class TinyImagenetConfig(tfds.core.BuilderConfig):
  """`source` and `wnids` are None when only the prepared copy is at hand."""

  def __init__(self, *, source: str | None = None, wnids: tuple[str, ...] | None = None, **kwargs):
    super().__init__(**kwargs)
    self.source = source
    self.wnids = wnids


class TinyImagenet(tfds.core.GeneratorBasedBuilder):
  """Tiny ImageNet (64×64, 200 classes or a subset given by wnids.txt)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def _info(self) -> tfds.core.DatasetInfo:
    wnids = self.builder_config.wnids if self.builder_config else None
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(names=wnids) if wnids else tfds.features.ClassLabel(),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://www.kaggle.com/c/tiny-imagenet',
    )

  def _split_generators(self, dl_manager):
    source = self.builder_config.source if self.builder_config else None
    if source is None:
      source = find_source(dl_manager.manual_dir)
      if source is None:
        raise MissingFileError(missing_source_message(dl_manager.manual_dir))
    tree = SourceTree(source)
    return {'train': self._generate_examples(tree, 'train'),
            'validation': self._generate_examples(tree, 'validation')}

  def _generate_examples(self, tree: SourceTree, split: str):
    return self._train_examples(tree) if split == 'train' else self._validation_examples(tree)

  def _example(self, tree: SourceTree, rel: str, wnid: str):
    image = checked_image_bytes(tree.read(rel), tree.display(rel), size=(IMAGE_SIZE, IMAGE_SIZE))
    return {'image': image, 'label': wnid, 'file_name': os.path.basename(rel)}

  def _train_examples(self, tree: SourceTree):
    for wnid in read_wnids(tree):
      folder = f'train/{wnid}/images'
      names = [n for n in tree.listdir(folder) if n.upper().endswith('.JPEG')]
      if not names:
        raise MissingFileError(f'{tree.display(folder)}: no training images of class {wnid}, '
                                'which wnids.txt lists')
      for name in names:
        yield name, self._example(tree, f'{folder}/{name}', wnid)

  def _validation_examples(self, tree: SourceTree):
    wnids = set(read_wnids(tree))
    for line in tree.read('val/val_annotations.txt').decode().splitlines():
      if not line.strip():
        continue
      name, wnid = line.split('\t')[:2]
      if wnid not in wnids:
        raise ValueError(f'{tree.display("val/val_annotations.txt")}: {name} has label {wnid}, '
                         'which is not in wnids.txt')
      yield name, self._example(tree, f'val/images/{name}', wnid)
