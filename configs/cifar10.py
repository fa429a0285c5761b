"""CIFAR-10 (TFDS), 32 px, ViT-S/4 (64 tokens); configs/cifar100.py is this with CIFAR-100.

  python main.py --config=configs/cifar10.py:method=macrl --workdir=workdirs/cifar10_macrl

TFDS downloads CIFAR-10 on first use (~160 MB) unless it is prepared in --config.data_dir already.
Expected result: not yet measured with this codebase (README "Results" lists what has been run).
"""

from macrl_jax.config import schema


def get_config(arg=None, dataset='cifar10', num_classes=10):
  c = schema.base_config()
  c.dataset = dataset
  c.num_classes = num_classes
  c.image_size = 32
  c.batch_size = 512
  c.total_steps = 200 * 50_000 // 512  # 200 epochs
  c.model.variant = 'S/4'
  c.model.decoder_width = 256
  c.model.decoder_depth = 4
  c.model.decoder_heads = 8
  c.model.proj_hidden = 2048
  c.model.pred_hidden = 2048
  c.optim.warmup_steps = 10 * 50_000 // 512
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 2000
  c.knn.eval_batch_size = 512
  return schema.configure(c, arg)
