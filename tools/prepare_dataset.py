"""Prepares a config's dataset into the TFDS data dir and prints its split sizes.

  python tools/prepare_dataset.py --config=configs/tiny_imagenet.py [--config.FIELD=VALUE ...]

Training prepares the dataset on first use too; preparing ahead is needed before a multi-host run,
since a shared file system or a bucket may not lock (runs on one machine wait for each other).
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from macrl_jax import errors  # noqa: E402
from macrl_jax.data.datasets import registry, splits  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/cifar10.py')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # TFDS logs every file it opens at INFO
  config = _CONFIG.value
  builder = registry.get_builder(config)
  print(f'{config.dataset}: prepared in {builder.data_path}')
  for split in builder.info.splits:
    print(f'  {split}: {splits.split_size(builder, split)} examples')
  if registry.data_option(config, 'holdout_fraction', 0.0):
    for split in (config.train_split, splits.HOLDOUT):
      print(f'  {split} with holdout_fraction: {splits.num_examples(builder, config, split)} '
            'examples')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  errors.run(main)
