"""The program's log: INFO lines of this package, but only warnings from the libraries that log
every file they touch (Orbax, TFDS, TensorStore), without JAX's notes on the backends a machine
lacks or Orbax's notice that it registers its jax.Array handler again, and without the thread tracebacks of a checkpoint save whose failure is
reported in one line."""

import logging as py_logging

NOISY = ('/orbax/', '/tensorflow_datasets/', '/tensorstore/')


def _keep(record) -> bool:
  if 'type_handler_registry' in record.pathname:
    return False
  return record.levelno >= py_logging.WARNING or not any(n in record.pathname for n in NOISY)


def _not_a_reported_save_failure(record) -> bool:
  from macrl_jax.run import checkpoint  # imported by then: only a save logs such a record
  return not checkpoint.is_reported_save_failure(record)


def quiet_libraries() -> None:
  py_logging.getLogger('absl').addFilter(_keep)
  # "Unable to initialize backend 'tpu'" and the like, on every machine without one.
  py_logging.getLogger('jax._src.xla_bridge').setLevel(py_logging.WARNING)
  for name in ('absl', 'asyncio'):
    py_logging.getLogger(name).addFilter(_not_a_reported_save_failure)
