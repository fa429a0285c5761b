"""The datasets: one module per TFDS builder of this project, and the registry.

digits, tiny_imagenet, imagenet100 and image_folder are built here (importing this package
registers them with TFDS); cifar10, cifar100 and imagenette come from the TFDS catalogue.
`registry.get_builder` picks and prepares one from a config; `splits` says which examples a split
name means.
"""

from macrl_jax.data.datasets.digits import Digits
from macrl_jax.data.datasets.image_folder import folder_config, CorruptImageError, ImageFolder
from macrl_jax.data.datasets.imagenet100 import IMAGENET100_WNIDS, Imagenet100
from macrl_jax.data.datasets.tiny_imagenet import TinyImagenet

__all__ = ['CorruptImageError', 'Digits', 'IMAGENET100_WNIDS', 'ImageFolder', 'Imagenet100',
           'TinyImagenet', 'folder_config']
