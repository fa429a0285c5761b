"""`imagenet100`: ImageNet-1k (ILSVRC 2012) restricted to the 100 classes of CMC, as a TFDS builder.

The class list is the "ImageNet-100" of Tian, Krishnan & Isola, "Contrastive Multiview Coding"
(ECCV 2020), as published with their code (github.com/HobbitLong/CMC, imagenet100.txt) and reused
by later self-supervised papers. `IMAGENET100_WNIDS` keeps that file's
order; labels are the index in the *sorted* list (`CLASS_NAMES`), as torchvision's ImageFolder
numbers class folders, which is how CMC and its followers trained.

Preparation reads the ImageNet 2012 archives from the manual directory (`config.manual_dir`, else
`<data_dir>/downloads/manual`), exactly as TFDS's `imagenet2012` does (same CMYK/PNG fixes),
and keeps the 100 classes: ILSVRC2012_img_train.tar (→ 'train', ~126,700 images) and
ILSVRC2012_img_val.tar (→ 'validation', 5,000 images). Get them from
https://image-net.org/download-images (registration needed).
The examples are written as ArrayRecord files (read from disk by index), ~14 GB.
"""

from __future__ import annotations

import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder

IMAGENET100_WNIDS = (
    'n02869837', 'n01749939', 'n02488291', 'n02107142', 'n13037406', 'n02091831', 'n04517823',
    'n04589890', 'n03062245', 'n01773797', 'n01735189', 'n07831146', 'n07753275', 'n03085013',
    'n04485082', 'n02105505', 'n01983481', 'n02788148', 'n03530642', 'n04435653', 'n02086910',
    'n02859443', 'n13040303', 'n03594734', 'n02085620', 'n02099849', 'n01558993', 'n04493381',
    'n02109047', 'n04111531', 'n02877765', 'n04429376', 'n02009229', 'n01978455', 'n02106550',
    'n01820546', 'n01692333', 'n07714571', 'n02974003', 'n02114855', 'n03785016', 'n03764736',
    'n03775546', 'n02087046', 'n07836838', 'n04099969', 'n04592741', 'n03891251', 'n02701002',
    'n03379051', 'n02259212', 'n07715103', 'n03947888', 'n04026417', 'n02326432', 'n03637318',
    'n01980166', 'n02113799', 'n02086240', 'n03903868', 'n02483362', 'n04127249', 'n02089973',
    'n03017168', 'n02093428', 'n02804414', 'n02396427', 'n04418357', 'n02172182', 'n01729322',
    'n02113978', 'n03787032', 'n02089867', 'n02119022', 'n03777754', 'n04238763', 'n02231487',
    'n03032252', 'n02138441', 'n02104029', 'n03837869', 'n03494278', 'n04136333', 'n03794056',
    'n03492542', 'n02018207', 'n04067472', 'n03930630', 'n03584829', 'n02123045', 'n04229816',
    'n02100583', 'n03642806', 'n04336792', 'n03259280', 'n02116738', 'n02108089', 'n03424325',
    'n01855672', 'n02090622',
)
CLASS_NAMES = tuple(sorted(IMAGENET100_WNIDS))
ARCHIVES = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')
FILE_FORMAT = 'array_record'


class Imagenet100(imagenet2012_dataset_builder.Builder):
  """ImageNet 2012 train and validation images of the 100 CMC classes."""

  VERSION = tfds.core.Version('1.0.0')
  SUPPORTED_VERSIONS = []
  RELEASE_NOTES = {'1.0.0': 'Initial release (from imagenet2012 5.1.0 generation code).'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(names=CLASS_NAMES),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/HobbitLong/CMC',
    )

  def _split_generators(self, dl_manager):
    # ImageNet's test split has no labels; it is not needed here.
    splits = super()._split_generators(dl_manager)
    return [s for s in splits if s.name != 'test']

  def _generate_examples(self, archive, validation_labels=None, labels_exist=True):
    keep = set(IMAGENET100_WNIDS)
    if validation_labels:  # validation: a flat archive of images, labels from a table
      archive = ((name, f) for name, f in archive if validation_labels[name] in keep)
    else:  # train: one inner archive per class, named <wnid>.tar
      archive = ((name, f) for name, f in archive if name[:-len('.tar')] in keep)
    yield from super()._generate_examples(archive, validation_labels, labels_exist)
