r"""Full fine-tuning of the pre-trained encoder; --from_scratch: the random-init baseline.

  python tools/finetune.py --workdir=workdirs/tin10_macrl [--epochs=50] [--batch_size=128] \
      [--base_lr=1e-3] [--layer_decay=0.75] [--drop_path=0.1] [--label_smoothing=0.1] \
      [--mixup=0.8] [--cutmix=1.0] [--pool=cls|mean] [--step=N] [--params=online|momentum] \
      [--label_fraction=0.1]   # a fixed stratified 10 % of the train labels
  python tools/finetune.py --workdir=workdirs/tin10_macrl --from_scratch  # same budget, random init

AdamW, warm-up + cosine, lr = base_lr · batch / 256, layer-wise lr decay, drop path, label
smoothing, optional mixup/cutmix (macrl_jax/run/finetune.py). Checkpoints go to DIR/<name>/checkpoints
(name: finetune, or finetune_scratch with --from_scratch); rerunning the command resumes, SIGTERM
saves and stops. Prints the test top-1/top-5 and writes DIR/eval/<name>.json.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags  # noqa: E402

from macrl_jax.run import finetune, tool_io  # noqa: E402

FLAGS = flags.FLAGS
tool_io.define_flags()
D = finetune.default_args()
flags.DEFINE_float('epochs', D.epochs, 'Epochs over the train split.')
flags.DEFINE_integer('batch_size', D.batch_size, 'Global batch (a multiple of the device count).')
flags.DEFINE_float('base_lr', D.base_lr, 'Peak lr per 256 examples of batch.')
flags.DEFINE_float('min_lr', D.min_lr, 'Final lr of the cosine.')
flags.DEFINE_float('warmup_epochs', D.warmup_epochs, 'Linear warm-up.')
flags.DEFINE_float('weight_decay', D.weight_decay, 'AdamW decay (matmul kernels only).')
flags.DEFINE_float('b1', D.b1, 'AdamW beta1.')
flags.DEFINE_float('b2', D.b2, 'AdamW beta2.')
flags.DEFINE_float('layer_decay', D.layer_decay, 'Layer-wise lr decay (1 = none; default 1 with '
                   '--from_scratch).')
flags.DEFINE_float('drop_path', D.drop_path, 'Stochastic depth of the last block (DeiT: linear).')
flags.DEFINE_float('label_smoothing', D.label_smoothing, 'Label smoothing.')
flags.DEFINE_float('mixup', D.mixup, 'Mixup Beta(a, a) parameter; 0 = off (MAE: 0.8).')
flags.DEFINE_float('cutmix', D.cutmix, 'Cutmix Beta(a, a) parameter; 0 = off (MAE: 1.0).')
flags.DEFINE_float('label_fraction', D.label_fraction, 'Fraction of each class of the train split '
                   'whose labels are used (1 = all), the same examples for every seed.')
flags.DEFINE_integer('label_seed', D.label_seed, 'The seed that draws the labelled examples.')
flags.DEFINE_enum('pool', None, ['cls', 'mean'], "Classifier input (default: the config's pool).")
flags.DEFINE_bool('from_scratch', False, 'Random init instead of the checkpoint (the baseline).')
flags.DEFINE_integer('seed', D.seed, 'Head init, data order, augmentation, drop path.')
flags.DEFINE_integer('log_every_steps', D.log_every_steps, 'DIR/<name>/metrics.jsonl period.')
flags.DEFINE_integer('checkpoint_every_steps', D.checkpoint_every_steps, 'Checkpoint period.')
flags.DEFINE_integer('eval_batch_size', None, 'Test batch (default: config.knn.eval_batch_size).')
_NAME = flags.DEFINE_string('name', None, 'Subfolder of the workdir for checkpoints and logs '
                            '(default: finetune, or finetune_scratch with --from_scratch).')


def main():
  args = finetune.default_args()
  for name in args:
    args[name] = FLAGS[name].value
  if args.from_scratch and not FLAGS['layer_decay'].present:
    args.layer_decay = 1.0  # random layers have no pre-trained features to protect
  restored = tool_io.load_from_flags()
  name = _NAME.value or ('finetune_scratch' if args.from_scratch else 'finetune')
  result = finetune.finetune(restored, args, name)
  result.update(args=args.to_dict(), params=restored.params, name=name)
  if result['preempted']:
    print(f'Stopped at step {result["step"]}/{result["total_steps"]}; rerun the command to resume.')
    return
  init = 'random init' if args.from_scratch else f'pre-training step {restored.step}'
  tool_io.report(tool_io.result_path(restored.workdir, name), result,
                 f'Fine-tuned ({init}, {result["total_steps"]} steps): test top-1 '
                 f'{100 * result["top1"]:.2f} %, top-5 {100 * result["top5"]:.2f} %')


if __name__ == '__main__':
  tool_io.run_tool(main)
