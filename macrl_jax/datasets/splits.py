"""Which stored examples a split name means, including the held-out part of the train split.

With `config.data.holdout_fraction` > 0, round(fraction · n_c) examples of each class c of
`config.train_split` (the same ones for every run and seed) form the split named 'holdout', for
choosing hyperparameters without touching the test split; `config.train_split` then means the rest.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from macrl_jax.datasets.registry import data_option, is_random_access

HOLDOUT = 'holdout'
_HOLDOUTS: dict[tuple, np.ndarray] = {}


def clear_holdouts() -> None:
  _HOLDOUTS.clear()


def split_size(builder, split: str) -> int:
  """The number of examples of a stored split."""
  if is_random_access(builder):
    return len(builder.as_data_source(split=split))
  # The cardinality of a TFDS dataset is known without reading it (also under mock_data, whose
  # example count differs from the recorded split sizes).
  n = int(builder.as_dataset(split=split).cardinality())
  return n if n >= 0 else sum(1 for _ in builder.as_dataset(split=split))


def split_indices(builder, config, split: str) -> tuple[str, np.ndarray | None]:
  """The stored split that `split` names, and the indices into it (None: all of it)."""
  fraction = data_option(config, 'holdout_fraction', 0.0)
  if split == HOLDOUT and not fraction:
    raise ValueError(f"split {HOLDOUT!r} is the part of train_split held out by "
                     "config.data.holdout_fraction, which is 0; set e.g. "
                     "--config.data.holdout_fraction=0.1")
  if not fraction or split not in (HOLDOUT, config.train_split):
    return split, None
  stored = config.train_split
  held = _holdout(builder, stored, fraction)
  if split == HOLDOUT:
    return stored, held
  return stored, np.setdiff1d(np.arange(split_size(builder, stored)), held)


def num_examples(builder, config, split: str) -> int:
  stored, indices = split_indices(builder, config, split)
  return split_size(builder, stored) if indices is None else len(indices)


def _holdout(builder, split: str, fraction: float) -> np.ndarray:
  """round(fraction · n_c) examples of each class c, drawn with a fixed seed: sorted indices."""
  key = (os.fspath(builder.data_path), split, fraction)
  if key not in _HOLDOUTS:
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders={'image': tfds.decode.SkipDecoding()})
    labels = np.concatenate(list(ds.map(lambda ex: ex['label']).batch(4096).as_numpy_iterator()))
    rng = np.random.default_rng(0)  # the same held-out images for every run and seed
    held = [rng.permutation(np.flatnonzero(labels == c))[:round(fraction * np.sum(labels == c))]
            for c in np.unique(labels)]
    _HOLDOUTS[key] = np.sort(np.concatenate(held))
  return _HOLDOUTS[key]
