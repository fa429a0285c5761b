r"""Weighted kNN top-1/top-5 of frozen features: the train split as memory, test queries.

  python tools/knn_eval.py --workdir=workdirs/digits_macrl [--k=20] [--temperature=0.07] \
      [--step=N] [--pool=cls|mean] [--params=online|momentum] [--data_dir=TFDS_DIR]
  python tools/knn_eval.py --train_features=train.npz --test_features=test.npz [--num_classes=10]

Features are L2-normalised; the k nearest train features vote for their label with weight
exp(cosine / T) (--uniform: weight 1). Features come from DIR/eval/features/ when
extract_features.py wrote them for the same step, split, pool and encoder, else they are extracted.
Writes DIR/eval/knn.json (or knn.json beside --test_features without --workdir).
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags  # noqa: E402

from macrl_jax.evals import features, knn  # noqa: E402
from macrl_jax.run import tool_io  # noqa: E402

FLAGS = flags.FLAGS

tool_io.define_flags()
_K = flags.DEFINE_integer('k', 20, 'Neighbours.')
_T = flags.DEFINE_float('temperature', 0.07, 'Temperature of the vote weights exp(sim / T).')
_UNIFORM = flags.DEFINE_bool('uniform', False, 'Unweighted (majority) vote.')
_POOL = flags.DEFINE_enum('pool', None, ['cls', 'mean'], "Feature pooling (default: the config's).")
_TRAIN_SPLIT = flags.DEFINE_string('train_split', 'train', 'Memory split.')
_TEST_SPLIT = flags.DEFINE_string('test_split', 'test', 'Query split.')
_TRAIN_NPZ = flags.DEFINE_string('train_features', None, '.npz of extract_features.py (memory).')
_TEST_NPZ = flags.DEFINE_string('test_features', None, '.npz of extract_features.py (queries).')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', None, 'With .npz files: default max label + 1.')
_BATCH = flags.DEFINE_integer('batch_size', None, 'Global extraction batch.')


def main():
  args = dict(k=_K.value, temperature=_T.value, weighted=not _UNIFORM.value)
  if _TRAIN_NPZ.value or _TEST_NPZ.value:
    if not (_TRAIN_NPZ.value and _TEST_NPZ.value):
      raise SystemExit('error: give both --train_features and --test_features')
    train_f, train_y = features.load(_TRAIN_NPZ.value)
    test_f, test_y = features.load(_TEST_NPZ.value)
    num_classes = _NUM_CLASSES.value or int(max(train_y.max(), test_y.max())) + 1
    out = (tool_io.result_path(FLAGS.workdir, 'knn') if FLAGS.workdir else
           os.path.join(os.path.dirname(os.path.abspath(_TEST_NPZ.value)), 'knn.json'))
    source = dict(train_features=_TRAIN_NPZ.value, test_features=_TEST_NPZ.value)
  else:
    if not FLAGS.workdir:
      raise SystemExit('error: give --workdir (or --train_features and --test_features)')
    restored = tool_io.load_from_flags()
    config = restored.config
    pool = _POOL.value or config.model.pool
    train_split = tool_io.split_name(config, _TRAIN_SPLIT.value)
    test_split = tool_io.split_name(config, _TEST_SPLIT.value)
    train_f, train_y = features.restored_features(restored, train_split, pool, _BATCH.value)
    test_f, test_y = features.restored_features(restored, test_split, pool, _BATCH.value)
    num_classes, out = config.num_classes, tool_io.result_path(restored.workdir, 'knn')
    source = dict(step=restored.step, params=restored.params, pool=pool, train_split=train_split,
                  test_split=test_split)
  result = knn.evaluate(train_f, train_y, test_f, test_y, num_classes, **args)
  result.update(args, **source, num_train=int(len(train_y)), num_test=int(len(test_y)))
  tool_io.report(out, result,
                 f'kNN (k={_K.value}, T={_T.value}{", uniform" if _UNIFORM.value else ""}): '
                 f'top-1 {100 * result["top1"]:.2f} %, top-5 {100 * result["top5"]:.2f} % '
                 f'({len(test_y)} test, {len(train_y)} train examples)')


if __name__ == '__main__':
  tool_io.run_tool(main, required=())
