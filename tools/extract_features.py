r"""Frozen features of a split of the pre-training data set, to an .npz (features, labels).

  python tools/extract_features.py --workdir=workdirs/digits_macrl [--step=N] [--split=test] \
      [--pool=cls|mean] [--params=online|momentum] [--out=FILE.npz] [--data_dir=TFDS_DIR]

The encoder sees the full, unmasked images (the eval preprocessing); the batch is split over all
devices and every example of the split appears once, in the split's order. The default --out is
DIR/eval/features/<split>_<pool>_<params>_step<N>.npz, where knn_eval.py and linear_probe.py look
for features before extracting them again.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags  # noqa: E402

from macrl_jax import errors  # noqa: E402
from macrl_jax.evals import features  # noqa: E402
from macrl_jax.run import tool_io  # noqa: E402

tool_io.define_flags()
_SPLIT = flags.DEFINE_string('split', 'test', "'train', 'test' (the config's) or a TFDS split.")
_POOL = flags.DEFINE_enum('pool', None, ['cls', 'mean'], "Feature pooling (default: the config's).")
_OUT = flags.DEFINE_string('out', None, 'Output .npz (default: see above).')
_BATCH = flags.DEFINE_integer('batch_size', None, 'Global batch (default: knn.eval_batch_size).')


def main():
  restored = tool_io.load_from_flags()
  config = restored.config
  split, pool = tool_io.split_name(config, _SPLIT.value), _POOL.value or config.model.pool
  feats, labels = features.split_features(config, restored.mesh, restored.modules.encoder,
                                         restored.encoder_params, split, pool, _BATCH.value)
  out = os.path.abspath(_OUT.value or features.cache_path(restored, split, pool))
  try:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    features.save(out, feats, labels, split=split, pool=pool, params=restored.params,
                  step=restored.step)
  except OSError as e:
    raise errors.UserError(f'cannot write {out} ({e.strerror}); pass --out=FILE.npz in a folder '
                           'you can write to') from None
  result = dict(out=out, split=split, pool=pool, params=restored.params, step=restored.step,
                num_examples=int(len(labels)), dim=int(feats.shape[1]))
  tool_io.report(tool_io.result_path(restored.workdir, 'extract_features'), result,
                 f'{len(labels)} features of dimension {feats.shape[1]} ({split}, {pool} pool, '
                 f'{restored.params} encoder, step {restored.step}) → {out}')


if __name__ == '__main__':
  tool_io.run_tool(main)
