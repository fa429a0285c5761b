r"""Linear probe of frozen features (MAE protocol): non-affine BatchNorm + linear layer.

  python tools/linear_probe.py --workdir=workdirs/digits_macrl [--shots=N] [--seeds=5] \
      [--epochs=90] [--lr=0.1] [--optimizer=sgd|lars|adamw] [--step=N] [--pool=cls|mean] \
      [--params=online|momentum] [--data_dir=TFDS_DIR]

The train and test features are extracted once (or read from DIR/eval/features/, see
extract_features.py) and every seed trains on them. --shots=N: each seed draws N labelled train
examples per class. Prints top-1/top-5 on the test split as mean ± std over the seeds and writes
DIR/eval/linear_probe.json (linear_probe_<N>shot.json with --shots).
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags  # noqa: E402

from macrl_jax.evals import features, probe  # noqa: E402
from macrl_jax.run import tool_io  # noqa: E402

tool_io.define_flags()
_SHOTS = flags.DEFINE_integer('shots', None, 'Labelled train examples per class (default: all).')
_SEEDS = flags.DEFINE_integer('seeds', 5, 'Runs (few-shot draws, init and order), for mean ± std.')
_EPOCHS = flags.DEFINE_integer('epochs', 90, 'Epochs over the (few-shot) train features.')
_LR = flags.DEFINE_float('lr', 0.1, 'Peak learning rate (warm-up over 10 % of the steps, cosine).')
_WD = flags.DEFINE_float('weight_decay', 0.0, 'Weight decay.')
_BATCH = flags.DEFINE_integer('batch_size', 256, 'Probe batch (capped at the train examples).')
_OPTIMIZER = flags.DEFINE_enum('optimizer', 'sgd', list(probe.OPTIMIZERS),
                               'sgd (momentum 0.9), lars (MAE, for very large batches) or adamw.')
_POOL = flags.DEFINE_enum('pool', None, ['cls', 'mean'], "Feature pooling (default: the config's).")
_TRAIN_SPLIT = flags.DEFINE_string('train_split', 'train', 'Probe training split.')
_TEST_SPLIT = flags.DEFINE_string('test_split', 'test', 'Evaluation split.')


def main():
  restored = tool_io.load_from_flags()
  config = restored.config
  pool = _POOL.value or config.model.pool
  splits = [tool_io.split_name(config, s) for s in (_TRAIN_SPLIT.value, _TEST_SPLIT.value)]
  (train_f, train_y), (test_f, test_y) = (
      features.restored_features(restored, s, pool) for s in splits)
  args = dict(shots=_SHOTS.value, seeds=_SEEDS.value, epochs=_EPOCHS.value, lr=_LR.value,
              weight_decay=_WD.value, batch_size=_BATCH.value, optimizer=_OPTIMIZER.value)
  result = probe.linear_probe(train_f, train_y, test_f, test_y, config.num_classes, **args)
  result.update(args, step=restored.step, params=restored.params, pool=pool,
                train_split=splits[0], test_split=splits[1], num_test=int(len(test_y)))
  name = f'linear_probe_{_SHOTS.value}shot' if _SHOTS.value else 'linear_probe'
  shots = f'{_SHOTS.value}-shot ' if _SHOTS.value else ''
  tool_io.report(tool_io.result_path(restored.workdir, name), result,
                 f'Linear probe ({shots}{_SEEDS.value} seeds, step {restored.step}): '
                 f'top-1 {100 * result["top1"]:.2f} ± {100 * result["top1_std"]:.2f} %, '
                 f'top-5 {100 * result["top5"]:.2f} ± {100 * result["top5_std"]:.2f} %')


if __name__ == '__main__':
  tool_io.run_tool(main)
