"""Tests of the tf.data pipelines and the dataset builders (macrl_jax/data/input_pipeline.py, data/datasets/).

Datasets: digits (prepared into a tmp data dir), cifar10/cifar100 under tfds.testing.mock_data, and
the real JPEGs of ../shared/data/tiny-imagenet-10 (skipped when absent). Error paths use small
folders of generated images.
"""

import collections
import contextlib
import hashlib
import io
import tarfile
import math
import os
import zipfile
from pathlib import Path

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from PIL import Image  # noqa: E402

from helpers import override  # noqa: E402
from macrl_jax.config import schema  # noqa: E402
from macrl_jax.data import input_pipeline  # noqa: E402
from macrl_jax.data.datasets import registry, CorruptImageError  # noqa: E402
from macrl_jax.data.datasets.imagenet100 import CLASS_NAMES  # noqa: E402

TINY_IMAGENET_10 = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'tiny-imagenet-10'
MOCK_EXAMPLES = 50
TINY_FIELDS = {'manual_dir': str(TINY_IMAGENET_10), 'num_classes': 10, 'image_size': 64,
               'test_split': 'validation'}


# ---------------------------------------------------------------------------------------------
# Configs and fixtures.


def make_config(dataset='digits', data_dir=None, **overrides):
  c = schema.base_config()
  c.dataset = dataset
  c.data_dir = data_dir
  c.batch_size = 8
  return override(c, overrides)


def identity_views(c):
  """No randomness: each view is the whole image resized, as the eval pipeline gives it."""
  for view in (c.aug.view1, c.aug.view2):
    view.crop_scale = (1.0, 1.0)
    view.crop_ratio = (1.0, 1.0)
    view.flip = False
    view.color_jitter_prob = view.grayscale_prob = view.blur_prob = view.solarize_prob = 0.0
  return c


@pytest.fixture(autouse=True)
def _fresh_cache():
  # mock_data gives every dataset the same data path: never reuse a shard across tests.
  input_pipeline.clear_cache()
  yield
  input_pipeline.clear_cache()


@pytest.fixture(scope='session')
def tiny_dir(tmp_path_factory):
  if not TINY_IMAGENET_10.is_dir():
    pytest.skip(f'{TINY_IMAGENET_10} is absent')
  data_dir = str(tmp_path_factory.mktemp('tfds_tiny'))
  input_pipeline.get_builder(make_config('tiny_imagenet', data_dir, **TINY_FIELDS))
  return data_dir


@pytest.fixture(params=['digits', 'cifar10', 'cifar100', 'tiny_imagenet'])
def dataset(request):
  """(config factory, context) for each dataset; the context wraps every pipeline call."""
  name = request.param
  if name == 'digits':
    data_dir = request.getfixturevalue('digits_dir')
    return lambda **kw: make_config('digits', data_dir, **kw), contextlib.nullcontext
  if name == 'tiny_imagenet':
    data_dir = request.getfixturevalue('tiny_dir')
    return (lambda **kw: make_config('tiny_imagenet', data_dir, **{**TINY_FIELDS, **kw}),
            contextlib.nullcontext)
  fields = dict(num_classes=10 if name == 'cifar10' else 100, image_size=32)
  return (lambda **kw: make_config(name, None, **{**fields, **kw}),
          lambda: tfds.testing.mock_data(num_examples=MOCK_EXAMPLES))


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def image_hashes(images, mask=None):
  if mask is not None:
    images = images[mask]
  return [hashlib.sha1(x.tobytes()).hexdigest() for x in images]


# ---------------------------------------------------------------------------------------------
# Pre-training and evaluation pipelines on each dataset.


def test_pretrain_batches(dataset):
  config_fn, context = dataset
  c = config_fn()
  with context():
    batches = take(input_pipeline.create_pretrain_iterator(c, process_index=0, process_count=1), 3)
    again = take(input_pipeline.create_pretrain_iterator(c, process_index=0, process_count=1), 1)
    resumed = take(input_pipeline.create_pretrain_iterator(c, start_step=2, process_index=0,
                                                           process_count=1), 1)
    # A far-away step is computed directly, not reached by reading everything before it.
    far = take(input_pipeline.create_pretrain_iterator(c, start_step=10**9, process_index=0,
                                                       process_count=1), 1)
  size = c.image_size
  mean, std = input_pipeline.MEAN, input_pipeline.STD
  lo, hi = (0 - mean) / std, (1 - mean) / std  # normalised 0 and 1
  for batch in batches + far:
    assert set(batch) == {'view1', 'view2', 'label'}
    for view in ('view1', 'view2'):
      assert batch[view].shape == (c.batch_size, size, size, 3)
      assert batch[view].dtype == np.float32
      assert np.all(batch[view] >= lo.min() - 1e-4) and np.all(batch[view] <= hi.max() + 1e-4)
    assert batch['label'].shape == (c.batch_size,) and batch['label'].dtype == np.int32
    assert batch['label'].min() >= 0 and batch['label'].max() < c.num_classes
    assert not np.allclose(batch['view1'], batch['view2'])  # strong vs weak augmentation
  assert not np.allclose(batches[0]['view1'], batches[1]['view1'])
  for got, want in ((again[0], batches[0]), (resumed[0], batches[2])):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_shards_cover_split_and_eval_covers_every_example(dataset):
  config_fn, context = dataset
  c = identity_views(config_fn(num_views=1, batch_size=128))
  split = c.train_split
  with context():
    n = input_pipeline.num_examples(c, split)
    whole = list(input_pipeline.create_eval_iterator(c, split, batch_size=64, process_index=0,
                                                     process_count=1))
    shards, epochs = [], []
    for p in range(2):
      shards.append(list(input_pipeline.create_eval_iterator(c, split, batch_size=64,
                                                             process_index=p, process_count=2)))
      # The first epoch of a process is its shard, permuted.
      m = n * (p + 1) // 2 - n * p // 2
      it = input_pipeline.create_pretrain_iterator(c, process_index=p, process_count=2)
      epoch = take(it, math.ceil(m / (c.batch_size // 2)))
      epochs.append({k: np.concatenate([b[k] for b in epoch])[:m] for k in ('view1', 'label')})

  # Eval: each process yields as many batches; padding is masked; all examples once, in order.
  assert len(shards[0]) == len(shards[1]) == math.ceil(math.ceil(n / 2) / 64)
  for batch in whole + shards[0] + shards[1]:
    assert batch['image'].shape == (64, c.image_size, c.image_size, 3)
    assert batch['mask'].dtype == bool and batch['label'].dtype == np.int32
  cat = lambda batches, k: np.concatenate([b[k] for b in batches])
  assert cat(whole, 'mask').sum() == n
  for k in ('image', 'label'):
    both = np.concatenate([cat(s, k)[cat(s, 'mask')] for s in shards])
    np.testing.assert_array_equal(both, cat(whole, k)[cat(whole, 'mask')])

  # Pre-training: the processes' first epochs are disjoint and together the whole split, with the
  # labels of the eval pipeline.
  labelled = lambda hashes, labels: collections.Counter(zip(hashes, labels.tolist()))
  eval_examples = labelled(image_hashes(cat(whole, 'image'), cat(whole, 'mask')),
                           cat(whole, 'label')[cat(whole, 'mask')])
  per_process = [labelled(image_hashes(e['view1']), e['label']) for e in epochs]
  assert per_process[0] + per_process[1] == eval_examples
  for p in range(2):
    shard = labelled(image_hashes(cat(shards[p], 'image'), cat(shards[p], 'mask')),
                     cat(shards[p], 'label')[cat(shards[p], 'mask')])
    assert per_process[p] == shard


# ---------------------------------------------------------------------------------------------
# Builders.


def test_digits_builder(digits_dir):
  c = make_config('digits', digits_dir)
  assert input_pipeline.num_examples(c, 'train') == 1437
  assert input_pipeline.num_examples(c, 'test') == 360
  builder = input_pipeline.get_builder(c)
  ex = next(iter(builder.as_dataset(split='train')))
  assert ex['image'].shape == (8, 8, 3) and ex['image'].dtype.name == 'uint8'


def test_array_record_gives_the_same_batches(digits_dir, tmp_path):
  """Random access from disk (imagenet100's path) matches the in-memory path exactly."""
  memory = make_config('digits', digits_dir)
  disk = make_config('digits', str(tmp_path), **{'data.file_format': 'array_record'})
  assert registry.is_random_access(input_pipeline.get_builder(disk))
  for c in (memory, disk):
    c.batch_size = 16
  want = take(input_pipeline.create_pretrain_iterator(memory, start_step=5, process_index=1,
                                                      process_count=2), 1)[0]
  got = take(input_pipeline.create_pretrain_iterator(disk, start_step=5, process_index=1,
                                                     process_count=2), 1)[0]
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])
  want = next(input_pipeline.create_eval_iterator(memory, 'test', batch_size=32, process_index=0,
                                                   process_count=1))
  got = next(input_pipeline.create_eval_iterator(disk, 'test', batch_size=32, process_index=0,
                                                 process_count=1))
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])


def test_tiny_imagenet_labels_follow_the_official_files(tiny_dir):
  builder = input_pipeline.get_builder(make_config('tiny_imagenet', tiny_dir, **TINY_FIELDS))
  wnids = (TINY_IMAGENET_10 / 'wnids.txt').read_text().split()
  assert builder.info.features['label'].names == wnids
  assert builder.info.splits['train'].num_examples == 5000
  assert builder.info.splits['validation'].num_examples == 500
  annotations = dict(line.split('\t')[:2] for line in
                     (TINY_IMAGENET_10 / 'val' / 'val_annotations.txt').read_text().splitlines())
  for ex in builder.as_dataset(split='validation').take(50).as_numpy_iterator():
    assert wnids[ex['label']] == annotations[ex['file_name'].decode()]
  for ex in builder.as_dataset(split='train').take(50).as_numpy_iterator():
    assert ex['file_name'].decode().startswith(wnids[ex['label']] + '_')
  # A 10-class copy has its own builder config: it cannot collide with the 200-class dataset.
  assert builder.builder_config.name.startswith('c10_')


def jpeg(color, mode='RGB', size=(64, 64)) -> bytes:
  out = io.BytesIO()
  Image.new('RGB', size, color).convert(mode).save(out, 'JPEG', quality=95)
  return out.getvalue()


def write_tiny_layout(root: Path, corrupt: str | None = None) -> dict[str, bytes]:
  """A 2-class Tiny ImageNet in the official layout (3 train, 1 val image per class)."""
  files = {'wnids.txt': b'n00000001\nn00000002\n'}
  annotations = []
  for c, (wnid, color) in enumerate((('n00000001', (250, 10, 10)), ('n00000002', (10, 10, 250)))):
    for i in range(3):
      files[f'train/{wnid}/images/{wnid}_{i}.JPEG'] = jpeg(color)
    files[f'train/{wnid}/{wnid}_boxes.txt'] = b''
    files[f'val/images/val_{c}.JPEG'] = jpeg(color, mode='L' if c else 'CMYK')  # gray and CMYK
    annotations.append(f'val_{c}.JPEG\t{wnid}\t0\t0\t63\t63')
  files['val/val_annotations.txt'] = '\n'.join(annotations).encode()
  if corrupt:
    files[corrupt] = files[corrupt][:200]  # truncated JPEG
  for name, data in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(data)
  return files


def test_tiny_imagenet_from_zip_with_gray_and_cmyk_jpegs(tmp_path):
  files = write_tiny_layout(tmp_path / 'unzipped')
  manual = tmp_path / 'manual'
  manual.mkdir()
  with zipfile.ZipFile(manual / 'tiny-imagenet-200.zip', 'w') as z:
    for name, data in files.items():
      z.writestr(f'tiny-imagenet-200/{name}', data)
  c = make_config('tiny_imagenet', str(tmp_path / 'tfds'), manual_dir=str(manual), num_classes=2,
                  image_size=64, test_split='validation')
  assert input_pipeline.num_examples(c, 'train') == 6
  batch = next(input_pipeline.create_eval_iterator(c, 'validation', batch_size=4, process_index=0,
                                                   process_count=1))
  assert batch['mask'].tolist() == [True, True, False, False]
  rgb = batch['image'] * input_pipeline.STD + input_pipeline.MEAN  # back to [0, 1]
  by_label = dict(zip(batch['label'][:2].tolist(), rgb[:2].mean(axis=(1, 2))))
  np.testing.assert_allclose(by_label[0], np.array([250, 10, 10]) / 255, atol=0.05)  # was CMYK
  assert np.ptp(by_label[1]) < 0.01  # a grayscale JPEG gives three equal channels


def tar_bytes(members: dict[str, bytes]) -> bytes:
  out = io.BytesIO()
  with tarfile.open(fileobj=out, mode='w') as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return out.getvalue()


def test_imagenet100_keeps_the_100_classes_and_reads_from_disk(tmp_path):
  """A miniature of the ImageNet 2012 archives: 2 of 3 train classes and 2 of 10 val images kept."""
  manual = tmp_path / 'manual'
  manual.mkdir()
  train = {'n01558993': 2, 'n01440764': 1, 'n02869837': 1}  # n01440764 is not an ImageNet-100 class
  (manual / 'ILSVRC2012_img_train.tar').write_bytes(tar_bytes({
      f'{wnid}.tar': tar_bytes({f'{wnid}_{i}.JPEG': jpeg((i * 90, 80, 20), size=(48, 40))
                                for i in range(count)})
      for wnid, count in train.items()}))
  # TFDS's table labels the first ten validation images; #6 (n01735189) and #9 (n03794056) are kept.
  (manual / 'ILSVRC2012_img_val.tar').write_bytes(tar_bytes({
      f'ILSVRC2012_val_{i:08d}.JPEG': jpeg((20, 80, i * 20), size=(40, 56)) for i in range(1, 11)}))
  c = make_config('imagenet100', str(tmp_path / 'tfds'), manual_dir=str(manual), num_classes=100,
                  image_size=32, test_split='validation')
  assert registry.is_random_access(input_pipeline.get_builder(c))  # ArrayRecord by default
  assert input_pipeline.num_examples(c, 'train') == 3
  batch = next(input_pipeline.create_pretrain_iterator(c, process_index=0, process_count=1))
  assert batch['view1'].shape == (8, 32, 32, 3)
  assert {CLASS_NAMES[i] for i in batch['label']} == {'n01558993', 'n02869837'}
  batch = next(input_pipeline.create_eval_iterator(c, 'validation', batch_size=4, process_index=0,
                                                   process_count=1))
  assert batch['mask'].tolist() == [True, True, False, False]
  assert sorted(CLASS_NAMES[i] for i in batch['label'][:2]) == ['n01735189', 'n03794056']


# ---------------------------------------------------------------------------------------------
# Error paths.


def test_unknown_dataset_lists_the_known_ones():
  with pytest.raises(ValueError, match='unknown dataset') as e:
    input_pipeline.get_builder(make_config('imagenet-1k'))
  for name in input_pipeline.known_datasets():
    assert name in str(e.value)


def test_tiny_imagenet_missing_names_the_manual_dir_and_the_zip(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  c = make_config('tiny_imagenet', str(tmp_path / 'tfds'), manual_dir=str(manual), num_classes=200)
  with pytest.raises(FileNotFoundError) as e:
    input_pipeline.get_builder(c)
  message = str(e.value)
  for part in (str(manual), str(tmp_path / 'tfds'), 'tiny-imagenet-200.zip',
               'http://cs231n.stanford.edu/tiny-imagenet-200.zip'):
    assert part in message


def test_corrupt_jpeg_is_reported_by_path(tmp_path):
  bad = 'train/n00000002/images/n00000002_1.JPEG'
  write_tiny_layout(tmp_path / 'tiny', corrupt=bad)
  c = make_config('tiny_imagenet', str(tmp_path / 'tfds'), manual_dir=str(tmp_path / 'tiny'),
                  num_classes=2)
  with pytest.raises(CorruptImageError, match=str(tmp_path / 'tiny' / bad)):
    input_pipeline.get_builder(c)


def test_image_folder_dataset_and_its_corrupt_file(tmp_path):
  root = tmp_path / 'pets'
  for split, count in (('train', 3), ('val', 1)):
    for name, color in (('cat', (200, 100, 0)), ('dog', (0, 100, 200))):
      (root / split / name).mkdir(parents=True)
      for i in range(count):
        (root / split / name / f'{i}.jpg').write_bytes(jpeg(color, size=(40, 30)))
  (root / 'train' / 'cat' / 'notes.txt').write_text('not an image, ignored')
  # Formats the pipeline must decode too: a PNG named .jpg, a CMYK JPEG.
  Image.new('RGB', (20, 30), (0, 100, 200)).save(root / 'train' / 'dog' / '0.jpg', 'PNG')
  (root / 'train' / 'cat' / '1.jpg').write_bytes(jpeg((200, 100, 0), mode='CMYK', size=(40, 30)))
  c = make_config(f'folder:{root}', str(tmp_path / 'tfds'), num_classes=2, image_size=16,
                  test_split='val')
  assert input_pipeline.num_examples(c, 'train') == 6
  assert input_pipeline.num_examples(c, 'val') == 2
  batch = next(input_pipeline.create_pretrain_iterator(c, process_index=0, process_count=1))
  assert batch['view1'].shape == (8, 16, 16, 3)
  labels = next(input_pipeline.create_eval_iterator(c, 'val', batch_size=2, process_index=0,
                                                    process_count=1))['label']
  assert sorted(labels.tolist()) == [0, 1]

  broken = tmp_path / 'broken'
  (broken / 'train' / 'a').mkdir(parents=True)
  (broken / 'train' / 'a' / 'x.png').write_bytes(b'not a png')
  with pytest.raises(CorruptImageError, match=str(broken / 'train' / 'a' / 'x.png')):
    input_pipeline.get_builder(make_config(f'folder:{broken}', str(tmp_path / 'tfds'),
                                           num_classes=1))


def test_num_classes_mismatch_names_the_field(digits_dir):
  with pytest.raises(ValueError, match='config.num_classes'):
    input_pipeline.get_builder(make_config('digits', digits_dir, num_classes=200))


def test_batch_size_must_divide_among_processes(digits_dir):
  with pytest.raises(ValueError, match='config.batch_size'):
    input_pipeline.create_pretrain_iterator(make_config('digits', digits_dir, batch_size=9),
                                            process_index=0, process_count=2)


# ---------------------------------------------------------------------------------------------
# The held-out selection split and the reconstruction targets.


def test_holdout_is_a_fixed_stratified_part_of_train(digits_dir):
  full = make_config('digits', digits_dir)
  c = make_config('digits', digits_dir, **{'data.holdout_fraction': 0.1})

  def labels_and_hashes(config, split, process_index=0, process_count=1):
    batches = list(input_pipeline.create_eval_iterator(
        config, split, batch_size=64, process_index=process_index, process_count=process_count))
    labels = np.concatenate([b['label'][b['mask']] for b in batches])
    return labels, [h for b in batches for h in image_hashes(b['image'], b['mask'])]

  all_labels, all_hashes = labels_and_hashes(full, 'train')
  held, held_hashes = labels_and_hashes(c, 'holdout')
  rest, rest_hashes = labels_and_hashes(c, 'train')
  assert input_pipeline.num_examples(c, 'holdout') == len(held)
  assert input_pipeline.num_examples(c, 'train') == len(rest) == 1437 - len(held)
  for k in range(10):  # round(10 %) of each class
    assert np.sum(held == k) == round(0.1 * np.sum(all_labels == k))
  # Held out and rest partition the train split: every example once.
  assert collections.Counter(held_hashes) + collections.Counter(rest_hashes) == \
      collections.Counter(all_hashes)
  # The same images whatever the seed and the process count.
  c.seed = 7
  input_pipeline.clear_cache()
  parts = [labels_and_hashes(c, 'holdout', p, 2)[1] for p in range(2)]
  assert sorted(parts[0] + parts[1]) == sorted(held_hashes)
  # Pre-training reads only the rest: one epoch as one batch holds exactly its images.
  pretrain = identity_views(override(c, {'batch_size': len(rest)}))
  batch = next(input_pipeline.create_pretrain_iterator(pretrain, process_index=0, process_count=1))
  assert collections.Counter(image_hashes(batch['view1'])) == collections.Counter(rest_hashes)


def test_holdout_split_needs_a_fraction(digits_dir):
  with pytest.raises(ValueError, match='holdout_fraction'):
    input_pipeline.num_examples(make_config('digits', digits_dir), 'holdout')


def test_clean_target_is_the_view_before_photometric_distortion(digits_dir):
  c = make_config('digits', digits_dir, rec_target='clean', image_size=16)
  for view in (c.aug.view1, c.aug.view2):
    view.color_jitter_prob = view.grayscale_prob = view.solarize_prob = 1.0
  plain = make_config('digits', digits_dir, image_size=16)
  for view in (plain.aug.view1, plain.aug.view2):
    view.color_jitter_prob = view.grayscale_prob = view.blur_prob = view.solarize_prob = 0.0
  got = next(input_pipeline.create_pretrain_iterator(c, process_index=0, process_count=1))
  want = next(input_pipeline.create_pretrain_iterator(plain, process_index=0, process_count=1))
  assert set(got) == {'view1', 'view2', 'view1_target', 'view2_target', 'label'}
  for v in ('view1', 'view2'):
    np.testing.assert_allclose(got[f'{v}_target'], want[v], atol=1e-6)  # same crop and flip
    assert not np.allclose(got[v], want[v])  # the view itself is distorted
