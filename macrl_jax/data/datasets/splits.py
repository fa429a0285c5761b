"""Which stored examples a split name means, including the held-out part of the train split.

With `config.data.holdout_fraction` > 0, round(fraction · n_c) examples of each class c of
`config.train_split` (the same ones for every run and seed) form the split named 'holdout', for
choosing hyperparameters without touching the test split; `config.train_split` then means the rest.
With `config.data.label_fraction` < 1, `config.train_split` means round(fraction · n_c) examples of
each class c of that (fine-tuning's labelled subset), drawn with `config.data.label_seed` alone.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from macrl_jax.data.datasets.registry import data_option, is_random_access
from macrl_jax.errors import UserError

HOLDOUT = 'holdout'
_LABELS: dict[tuple, np.ndarray] = {}


def clear_holdouts() -> None:
  _LABELS.clear()


def split_size(builder, split: str) -> int:
  """The number of examples of a stored split."""
  if is_random_access(builder):
    return len(builder.as_data_source(split=split))
  # The cardinality of a TFDS dataset is known without reading it (also under mock_data, whose
  # example count differs from the recorded split sizes).
  n = int(builder.as_dataset(split=split).cardinality())
  return n if n >= 0 else sum(1 for _ in builder.as_dataset(split=split))


def check_names(builder, config) -> None:
  """Raises UserError when config.train_split or config.test_split is not a split of the dataset
  (pre-training evaluates on test_split at its end: this is known before the first step)."""
  stored = sorted(builder.info.splits.keys())
  if not stored:  # a builder that records no splits (tfds.testing.mock_data): nothing to check
    return
  for field in ('train_split', 'test_split'):
    split = config[field]
    if split in stored or (split == HOLDOUT and data_option(config, 'holdout_fraction', 0.0)):
      continue
    where = ''
    if builder.name == 'image_folder':
      where = (f', or add the folder {builder.builder_config.root}/{split}/<class>/<image> (then '
               'it is prepared again)')
    raise UserError(f'config.{field}: dataset {config.dataset!r} has no split {split!r} (its '
                    f'splits: {", ".join(stored)}); set --config.{field} to one of them{where}')


def split_indices(builder, config, split: str) -> tuple[str, np.ndarray | None]:
  """The stored split that `split` names, and the indices into it (None: all of it)."""
  fraction = data_option(config, 'holdout_fraction', 0.0)
  labelled = data_option(config, 'label_fraction', 1.0)
  if split == HOLDOUT and not fraction:
    raise ValueError(f"split {HOLDOUT!r} is the part of train_split held out by "
                     "config.data.holdout_fraction, which is 0; set e.g. "
                     "--config.data.holdout_fraction=0.1")
  if split not in (HOLDOUT, config.train_split) or (not fraction and labelled >= 1):
    return split, None
  stored = config.train_split
  labels = _labels(builder, stored)
  held = (_per_class(labels, np.arange(len(labels)), fraction, seed=0) if fraction
          else np.zeros([0], np.int64))
  if split == HOLDOUT:
    return stored, held
  rest = np.setdiff1d(np.arange(len(labels)), held)
  if labelled < 1:
    rest = _per_class(labels, rest, labelled, seed=data_option(config, 'label_seed', 0))
  return stored, rest


def num_examples(builder, config, split: str) -> int:
  stored, indices = split_indices(builder, config, split)
  return split_size(builder, stored) if indices is None else len(indices)


def _labels(builder, split: str) -> np.ndarray:
  """The label of every example of a stored split, in order (read once per process)."""
  key = (os.fspath(builder.data_path), split)
  if key not in _LABELS:
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders={'image': tfds.decode.SkipDecoding()})
    _LABELS[key] = np.concatenate(
        list(ds.map(lambda ex: ex['label']).batch(4096).as_numpy_iterator()))
  return _LABELS[key]


def _per_class(labels: np.ndarray, indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """round(fraction · n_c) of the `indices` of each class c, drawn with `seed`: sorted indices.

  A function of (labels, indices, fraction, seed) only, so the same examples for every run.
  """
  rng = np.random.default_rng(seed)
  of = labels[indices]
  drawn = [rng.permutation(indices[of == c])[:round(fraction * np.sum(of == c))]
           for c in np.unique(labels)]
  return np.sort(np.concatenate(drawn)).astype(np.int64)
