"""The CIFAR-10 study's data: its config, and the fixed labelled subset that fine-tuning reads."""

import collections

import numpy as np
import pytest

from helpers import SHARED_DATA, digits_config, load_config, override
from macrl_jax.config import checks, schema
from macrl_jax.data import input_pipeline
from macrl_jax.data.datasets import splits
from macrl_jax.run import finetune

CIFAR10 = SHARED_DATA / 'cifar10'


@pytest.fixture(autouse=True)
def _fresh_cache():
  input_pipeline.clear_cache()
  yield
  input_pipeline.clear_cache()


def labelled(config):
  builder = input_pipeline.get_builder(config)
  stored, indices = splits.split_indices(builder, config, config.train_split)
  return indices, splits._labels(builder, stored)  # pylint: disable=protected-access


def test_the_labelled_subset_is_stratified_and_the_same_for_every_seed(digits_dir):
  full = digits_config(digits_dir)
  c = digits_config(digits_dir, **{'data.label_fraction': 0.1})
  subset, labels = labelled(c)
  counts = np.bincount(labels[subset], minlength=10)
  np.testing.assert_array_equal(counts, np.round(0.1 * np.bincount(labels, minlength=10)))
  assert input_pipeline.num_examples(c, 'train') == len(subset) == 142  # round(0.1 · n_c)
  assert input_pipeline.num_examples(full, 'train') == 1437
  # Fine-tuning reads exactly this subset whatever the pre-training or fine-tuning seed.
  for seed in (0, 7):
    args = override(finetune.default_args(), {'label_fraction': 0.1, 'seed': seed})
    data = finetune.data_config(override(digits_config(digits_dir), {'seed': seed + 1}), args)
    np.testing.assert_array_equal(labelled(data)[0], subset)
  # Another label_seed draws other examples; with a held-out part, only from the rest.
  other, _ = labelled(override(digits_config(digits_dir), {'data.label_fraction': 0.1,
                                                          'data.label_seed': 1}))
  assert len(other) == len(subset) and set(other) != set(subset)
  held_out = override(digits_config(digits_dir), {'data.label_fraction': 0.1,
                                                  'data.holdout_fraction': 0.1})
  builder = input_pipeline.get_builder(held_out)
  holdout = splits.split_indices(builder, held_out, 'holdout')[1]
  assert not set(labelled(held_out)[0]) & set(holdout)
  # The pipeline reads the subset: one epoch as one batch holds each labelled example once.
  c.batch_size = len(subset)
  batch = next(input_pipeline.create_pretrain_iterator(c, process_index=0, process_count=1))
  assert collections.Counter(batch['label']) == collections.Counter(labels[subset])


def test_label_fraction_must_be_in_0_1():
  c = load_config('cifar10_study', 'method=mae')
  for field in ('data.label_fraction', 'finetune.label_fraction'):
    with pytest.raises(Exception, match=field.replace('.', r'\.')):
      checks.validate(override(load_config('cifar10_study', 'method=mae'), {field: 0.0}))
  checks.validate(c)


@pytest.mark.parametrize('method', ['macrl', 'mae', 'mocov3'])
def test_cifar10_study_config_reads_the_shared_folder(method):
  c = load_config('cifar10_study', f'method={method}')
  assert c.dataset == f'folder:{CIFAR10.resolve()}' and c.method == method
  assert (c.train_split, c.test_split, c.num_classes, c.image_size) == ('train', 'test', 10, 32)
  assert c.finetune.label_fraction == 0.1 and c.data.label_fraction == 1.0  # pre-training: all
  checks.validate(c)
  assert schema.uses_contrastive(c) == (method != 'mae')


@pytest.mark.slow
def test_cifar10_folder_prepares_into_the_study_splits(tmp_path):
  """The real folder, prepared once (about a minute on 2 cores): 50,000 / 10,000 images, the
  5,000 held out for selection and the 10 % labelled subset, 10 classes balanced."""
  if not (CIFAR10 / 'train').is_dir():
    pytest.skip(f'{CIFAR10} is absent')
  c = override(load_config('cifar10_study', 'method=macrl'), {'data_dir': str(tmp_path)})
  assert input_pipeline.num_examples(c, 'train') == 50_000
  assert input_pipeline.num_examples(c, 'test') == 10_000
  c.data.holdout_fraction = 0.1
  assert input_pipeline.num_examples(c, 'holdout') == 5_000
  assert input_pipeline.num_examples(c, 'train') == 45_000
  c.data.label_fraction = 0.1
  subset, labels = labelled(c)
  np.testing.assert_array_equal(np.bincount(labels[subset]), [450] * 10)
  batch = next(input_pipeline.create_pretrain_iterator(c, process_index=0, process_count=1))
  assert batch['view1'].shape == (128, 32, 32, 3)
