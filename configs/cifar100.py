"""CIFAR-100 (TFDS), 32 px, ViT-S/4 (64 tokens): configs/cifar10.py with the 100 classes.

  python main.py --config=configs/cifar100.py:method=macrl --workdir=workdirs/cifar100_macrl

TFDS downloads CIFAR-100 on first use (~160 MB) unless it is prepared in --config.data_dir already.
Expected result: not yet measured with this codebase (README "Results" lists what has been run).
"""

from configs import cifar10


def get_config(arg=None):
  return cifar10.get_config(arg, dataset='cifar100', num_classes=100)
