"""The embedded default: scikit-learn's 8×8 handwritten digits (1,437 train / 360 test), 16 px.

  python main.py                                  # = --config=configs/digits.py (method macrl)
  python main.py --config=configs/digits.py:method=mae --workdir=workdirs/digits_mae

Needs no download. A small ViT (width 128, 4 blocks, patch 4 → 16 tokens) trains for 250 steps of
batch 256 (44 epochs) on a 2-core CPU in about 2.5 minutes; expected kNN top-1 on the test split
0.861, linear probe 0.931 (the randomly initialised encoder: 0.683 and 0.897; README "Results").
"""

from macrl_jax.config import schema


def get_config(arg=None):
  c = schema.base_config()
  c.dataset = 'digits'
  c.num_classes = 10
  c.image_size = 16
  c.batch_size = 256
  c.total_steps = 250
  c.model.variant = 'mu/4'
  c.model.width = 128
  c.model.num_heads = 4
  c.model.mlp_dim = 512
  c.model.decoder_width = 64
  c.model.decoder_depth = 2
  c.model.decoder_heads = 2
  c.model.proj_hidden = 512
  c.model.pred_hidden = 512
  c.model.proj_dim = 128
  c.optim.base_lr = 1e-3
  c.optim.warmup_steps = 25
  c.log_every_steps = 25
  c.eval_every_steps = 125
  c.checkpoint_every_steps = 125
  c.knn.eval_batch_size = 360
  return schema.configure(c, arg)
