"""ImageNet-100 (the CMC 100-class subset of ImageNet-1k; list in macrl_jax/datasets/imagenet100.py),
224 px, ViT-B/16 (196 tokens).

Needs ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in the TFDS manual dir (TFDS imagenet2012
instructions); prepared once into --config.data_dir:
  python main.py --config=configs/imagenet100.py:method=macrl --workdir=gs://BUCKET/in100_macrl \
      --config.manual_dir=/path/to/imagenet/tars
Expected result: not yet measured with this codebase (needs accelerators).
"""

from macrl_jax.config import schema


def get_config(arg=None):
  c = schema.base_config()
  c.dataset = 'imagenet100'
  c.test_split = 'validation'
  c.num_classes = 100
  c.image_size = 224
  c.batch_size = 1024
  c.total_steps = 200 * 126_689 // 1024  # 200 epochs
  c.model.variant = 'B/16'
  c.model.decoder_width = 512
  c.model.decoder_depth = 8
  c.model.decoder_heads = 16
  c.model.proj_hidden = 4096
  c.model.pred_hidden = 4096
  c.dtype = 'bfloat16'
  c.optim.warmup_steps = 20 * 126_689 // 1024
  c.log_every_steps = 100
  c.eval_every_steps = 2500
  c.checkpoint_every_steps = 1000
  c.knn.eval_batch_size = 1024
  return schema.configure(c, arg)
