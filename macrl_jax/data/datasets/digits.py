"""`digits`: the 8×8 handwritten digits that scikit-learn ships, as a TFDS builder.

The default dataset of the project: it needs no download, because `sklearn.datasets.
load_digits` reads a file installed with scikit-learn. 1,797 images of 10 classes; pixel values
0..16 are scaled to uint8 0..255 and repeated to three (RGB) channels so that every dataset of the
project has the same image layout.

Splits: a fixed, class-stratified split with `train_test_split(test_size=360, random_state=0)`:
'train' 1,437 images, 'test' 360. It is deterministic across machines and scikit-learn versions
that keep that function's algorithm.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

TEST_SIZE = 360
SPLIT_SEED = 0


def _load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 [n, 8, 8, 3], labels int64 [n]) of 'train' or 'test'."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  images = np.repeat(images[..., None], 3, axis=-1)
  x_train, x_test, y_train, y_test = train_test_split(
      images, digits.target, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=digits.target)
  return (x_train, y_train) if split == 'train' else (x_test, y_test)


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8×8 digits (UCI optical recognition of handwritten digits, test part)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 3), encoding_format='png'),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {'train': self._generate_examples('train'), 'test': self._generate_examples('test')}

  def _generate_examples(self, split: str):
    images, labels = _load_split(split)
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': image, 'label': int(label)}
