"""Imagenette (10 easy ImageNet classes, TFDS 'imagenette/160px-v2'), 128 px, ViT-S/16 (64 tokens).

  python main.py --config=configs/imagenette.py:method=macrl --workdir=workdirs/imagenette_macrl

TFDS downloads imagenette 160px (~100 MB) on first use unless prepared in --config.data_dir.
Expected result: not yet measured with this codebase.
"""

from macrl_jax.config import schema


def get_config(arg=None):
  c = schema.base_config()
  c.dataset = 'imagenette/160px-v2'
  c.test_split = 'validation'
  c.num_classes = 10
  c.image_size = 128
  c.batch_size = 256
  c.total_steps = 300 * 9_469 // 256  # 300 epochs
  c.model.variant = 'S/16'
  c.model.decoder_width = 256
  c.model.decoder_depth = 4
  c.model.decoder_heads = 8
  c.model.proj_hidden = 2048
  c.model.pred_hidden = 2048
  c.optim.warmup_steps = 20 * 9_469 // 256
  c.log_every_steps = 50
  c.eval_every_steps = 2000
  c.checkpoint_every_steps = 1000
  c.knn.eval_batch_size = 512
  return schema.configure(c, arg)
