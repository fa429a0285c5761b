"""Tiny ImageNet (200 classes, 100k train / 10k validation), 64 px, ViT-S/8 (64 tokens).

Needs tiny-imagenet-200.zip (http://cs231n.stanford.edu/tiny-imagenet-200.zip) or its unpacked
folder in the manual dir:
  python main.py --config=configs/tiny_imagenet.py:method=macrl --workdir=workdirs/tin_macrl \
      --config.manual_dir=/path/to/folder/with/the/zip
The 10-class subset in ../shared (the ablation and tests use it):
  python main.py --config=configs/tiny_imagenet.py --workdir=workdirs/tin10_macrl \
      --config.manual_dir=../shared/data/tiny-imagenet-10 --config.num_classes=10
Expected result: not yet measured on the full set (README "Results" has the tiny-imagenet-10 runs).
"""

from macrl_jax.config import schema


def get_config(arg=None):
  c = schema.base_config()
  c.dataset = 'tiny_imagenet'
  c.test_split = 'validation'
  c.num_classes = 200
  c.image_size = 64
  c.batch_size = 256
  c.total_steps = 200 * 100_000 // 256  # 200 epochs
  c.model.variant = 'S/8'
  c.model.decoder_width = 256
  c.model.decoder_depth = 4
  c.model.decoder_heads = 8
  c.model.proj_hidden = 2048
  c.model.pred_hidden = 2048
  c.optim.warmup_steps = 10 * 100_000 // 256
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 2000
  c.knn.eval_batch_size = 512
  return schema.configure(c, arg)
