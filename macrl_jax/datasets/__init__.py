"""The TFDS builders of this project (importing this package registers them with TFDS).

digits, tiny_imagenet, imagenet100 and image_folder; cifar10, cifar100 and imagenette come from the
TFDS catalogue. `macrl_jax.input_pipeline.get_builder` picks and prepares them from a config.
"""

from macrl_jax.datasets.digits import Digits
from macrl_jax.datasets.image_folder import CorruptImageError, ImageFolder, folder_config
from macrl_jax.datasets.imagenet100 import IMAGENET100_WNIDS, Imagenet100
from macrl_jax.datasets.tiny_imagenet import TinyImagenet

__all__ = ['CorruptImageError', 'Digits', 'IMAGENET100_WNIDS', 'ImageFolder', 'Imagenet100',
           'TinyImagenet', 'folder_config']
