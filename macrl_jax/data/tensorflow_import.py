"""TensorFlow imported without its C++ start-up notices (oneDNN, absl::InitializeLog), which it
writes to file descriptor 2 before any logging is set up; the datasets' preparation then logs its
progress instead of drawing progress bars. For main.py and the tools, before anything imports it."""

import importlib
import os


def quietly() -> None:
  saved = os.dup(2)
  try:
    with open(os.devnull, 'w') as null:
      os.dup2(null.fileno(), 2)
      importlib.import_module('tensorflow')
      import tensorflow_datasets as tfds
  finally:
    os.dup2(saved, 2)
    os.close(saved)
  tfds.disable_progress_bar()
