"""What every tool in tools/ shares: the workdir flags, restoring from them, and running main.

  python tools/NAME.py --workdir=DIR [--step=N] [--params=online|momentum] [--data_dir=TFDS_DIR]
  python tools/NAME.py --workdir=DIR --init=vit-s-300ep.pth.tar   # a PyTorch file instead

A workdir the tools cannot use (WorkdirError), like any user error, ends the program with its
message and exit status 2, not a traceback. The tools never change the workdir they read.
"""

from __future__ import annotations

import logging as py_logging
import os
import sys

from absl import app, flags

from macrl_jax import errors, restore

FLAGS = flags.FLAGS


def define_workdir_flags(params: bool = True) -> None:
  flags.DEFINE_string('workdir', None, 'Pre-training workdir (holds config.json and checkpoints/).')
  flags.DEFINE_integer('step', None, 'Checkpoint step to restore (default: the latest).')
  flags.DEFINE_string('data_dir', None, "TFDS data dir, replacing the workdir config's data_dir.")
  if params:
    flags.DEFINE_enum('params', 'online', list(restore.PARAMS),
                      'Which encoder: the online one, or the momentum (EMA) one of macrl/mocov3.')
  flags.DEFINE_string('init', None, 'A PyTorch file (MoCo v3 .pth.tar, MAE .pth, timm ViT, '
                      '.safetensors) to evaluate instead of the workdir\'s checkpoints; the workdir '
                      'still gives the config (config.json) and receives the results.')


def load(**kw) -> restore.Restored:
  """The checkpoint the workdir flags name."""
  params = FLAGS.params if 'params' in FLAGS else 'online'
  if FLAGS.init:
    return restore.load_init_file(FLAGS.workdir, FLAGS.init, params, FLAGS.data_dir, **kw)
  return restore.load_workdir(FLAGS.workdir, FLAGS.step, params, FLAGS.data_dir, **kw)


def split_name(config, split: str) -> str:
  """'train' and 'test' name the config's splits (tiny_imagenet tests on 'validation')."""
  return {'train': config.train_split, 'test': config.test_split}.get(split, split)


def report(path: str, result: dict, summary: str) -> str:
  """Prints the summary and writes `result`, with the command line, as JSON to `path`
  (restore.result_path(DIR, tool) = DIR/eval/<tool>.json)."""
  result = dict(result, command=' '.join([os.path.relpath(sys.argv[0])] + sys.argv[1:]))
  restore.write_result(path, result)
  print(summary)
  print(f'Written to {path}', flush=True)
  return path


def _quiet_libraries() -> None:
  """Warnings only from Orbax and TFDS, which log every file they touch at INFO."""
  noisy = ('/orbax/', '/tensorflow_datasets/', '/tensorstore/')
  py_logging.getLogger('absl').addFilter(
      lambda r: r.levelno >= py_logging.WARNING or not any(n in r.pathname for n in noisy))


def run(main, required=('workdir',)) -> None:
  """absl's app.run(main) with the workdir errors turned into a one-line message."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  for name in required:
    flags.mark_flag_as_required(name)

  def wrapped(argv):
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    _quiet_libraries()
    main()

  errors.run(wrapped)
