"""Throughput of the pre-training input pipeline (decode, two augmented views, batch).

  python tools/input_benchmark.py --config=configs/tiny_imagenet.py \
      --config.manual_dir=../shared/data/tiny-imagenet-10 --config.num_classes=10

  python tools/input_benchmark.py --config=configs/cifar100.py --mock=5000   # no download

Runs `input_pipeline.create_pretrain_iterator` for --warmup batches (not timed: they include graph
tracing and filling the prefetch buffers), then times --batches batches. Prints a short table and,
as its last line, one JSON object (images_per_sec counts examples, each giving config.num_views
views).
--mock=N reads N random images of the dataset's shapes through `tfds.testing.mock_data` instead of
the prepared dataset: decoding, augmentation and batching cost the same, so it measures the pipeline
of a dataset that is not downloaded here (cifar10/100, imagenette).
The figure depends on the CPU cores the process gets; the 1-minute load average is reported with it.
"""

import json
import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from macrl_jax import errors  # noqa: E402
from macrl_jax.data import input_pipeline  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/tiny_imagenet.py', lock_config=False)
_WARMUP = flags.DEFINE_integer('warmup', 5, 'Batches before timing.')
_BATCHES = flags.DEFINE_integer('batches', 50, 'Timed batches.')
_PROCESS_INDEX = flags.DEFINE_integer('process_index', 0, 'Process to simulate.')
_PROCESS_COUNT = flags.DEFINE_integer('process_count', 1, 'Number of processes to simulate.')
_MOCK = flags.DEFINE_integer('mock', 0, 'Read this many random examples via tfds.testing.mock_data.')


def main(argv):
  del argv
  if _MOCK.value:
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=_MOCK.value):
      return benchmark()
  return benchmark()


def benchmark():
  logging.set_verbosity(logging.WARNING)  # TFDS logs every dataset it opens
  config = _CONFIG.value
  p, num_p = _PROCESS_INDEX.value, _PROCESS_COUNT.value
  local_batch = config.batch_size // num_p

  start = time.perf_counter()
  iterator = input_pipeline.create_pretrain_iterator(config, process_index=p, process_count=num_p)
  next(iterator)
  first = time.perf_counter() - start
  for _ in range(_WARMUP.value):
    next(iterator)
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(iterator)
  seconds = time.perf_counter() - start

  result = dict(
      images_per_sec=round(_BATCHES.value * local_batch / seconds, 1),
      views_per_sec=round(_BATCHES.value * local_batch * config.num_views / seconds, 1),
      batch_size=local_batch,
      global_batch_size=config.batch_size,
      image_size=config.image_size,
      dataset=config.dataset + (f' (mock_data, {_MOCK.value} random examples)' if _MOCK.value else ''),
      num_views=config.num_views,
      method=config.method,
      examples=input_pipeline.num_examples(config, config.train_split),
      batches=_BATCHES.value,
      first_batch_sec=round(first, 2),
      cpu_count=os.cpu_count(),
      load_avg_1m=round(os.getloadavg()[0], 2),
  )
  rows = [
      ('dataset', f'{result["dataset"]} ({config.train_split}: {result["examples"]} examples)'),
      ('method / views', f'{config.method} / {config.num_views}'),
      ('image size', config.image_size),
      ('batch', f'{local_batch} per process (process {p} of {num_p})'),
      ('first batch', f'{first:.2f} s (prepare/load, trace)'),
      ('timed', f'{_BATCHES.value} batches in {seconds:.2f} s after {_WARMUP.value} warm-up'),
      ('images/s', f'{result["images_per_sec"]:.0f} ({result["views_per_sec"]:.0f} views/s)'),
      ('cpu', f'{result["cpu_count"]} cores, load average {result["load_avg_1m"]}'),
  ]
  for name, value in rows:
    print(f'{name:<16}{value}')
  print(json.dumps(result))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  errors.run(main)
