"""What the evaluation tools share: their workdir flags and the restore those name, where a
result goes and how it is printed, and main() run with user errors as one line.

The flags are defined by `define_flags`, which only the tools call.
"""

from __future__ import annotations

import json
import logging as py_logging
import os
import sys

import jax
from absl import app, flags

from macrl_jax import errors
from macrl_jax.data import tensorflow_import
from macrl_jax.run import logs, restore

FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------------- results
def result_path(path: str, name: str) -> str:
  """DIR/eval/<name>.json: where a tool writes its result."""
  return os.path.join(os.path.abspath(path), 'eval', f'{name}.json')


def write_result(path: str, result: dict) -> str:
  """Writes `result` as JSON (process 0 only), whole or not at all; returns the path."""
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
      json.dump(result, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
  return path


def report(path: str, result: dict, summary: str) -> str:
  """Prints the summary, then writes `result`, with the command line, as JSON to `path`; a workdir
  that cannot be written (read-only, full disk) only costs the file, with a warning."""
  result = dict(result, command=' '.join([os.path.relpath(sys.argv[0])] + sys.argv[1:]))
  print(summary, flush=True)
  try:
    write_result(path, result)
  except OSError as e:
    py_logging.warning('The result is printed above but could not be written to %s (%s).', path,
                       e.strerror)
    return path
  print(f'Written to {path}', flush=True)
  return path


# ----------------------------------------------------------------------------------- tool flags
def define_flags(params: bool = True) -> None:
  """--workdir, --step, --data_dir, --init and (with `params`) --params."""
  flags.DEFINE_string('workdir', None, 'Pre-training workdir (holds config.json and checkpoints/).')
  flags.DEFINE_integer('step', None, 'Checkpoint step to restore (default: the latest).')
  flags.DEFINE_string('data_dir', None, "TFDS data dir, replacing the workdir config's data_dir.")
  if params:
    flags.DEFINE_enum('params', 'online', list(restore.PARAMS),
                      'Which encoder: the online one, or the momentum (EMA) one of macrl/mocov3.')
  flags.DEFINE_string('init', None, 'A PyTorch file (MoCo v3 .pth.tar, MAE .pth, timm ViT, '
                      '.safetensors) to evaluate instead of the workdir\'s checkpoints; the workdir '
                      'still gives the config (config.json) and receives the results.')


def load_from_flags(**kw) -> restore.Restored:
  """The checkpoint (or --init file) the flags of `define_flags` name."""
  params = FLAGS.params if 'params' in FLAGS else 'online'
  if FLAGS.init:
    return restore.load_init_file(FLAGS.workdir, FLAGS.init, params, FLAGS.data_dir, **kw)
  return restore.load_workdir(FLAGS.workdir, FLAGS.step, params, FLAGS.data_dir, **kw)


def split_name(config, split: str) -> str:
  """'train' and 'test' name the config's splits (tiny_imagenet tests on 'validation')."""
  return {'train': config.train_split, 'test': config.test_split}.get(split, split)


def run_tool(main, required=('workdir',)) -> None:
  """absl's app.run(main) with user errors (WorkdirError among them) printed as one line."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  for name in required:
    flags.mark_flag_as_required(name)

  def wrapped(argv):
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    logs.quiet_libraries()
    tensorflow_import.quietly()
    main()

  errors.run(wrapped)
