"""The 32-px study of tiny-imagenet-10 (10 Tiny ImageNet classes: 5,000 train / 500 validation).

The setting of the README's method comparison: a 4-block ViT of width 64 with patch 4 (64 tokens)
on 32 px images, batch 128, on a 2-core CPU.
  python main.py --config=configs/tiny_imagenet_10.py:method=macrl --workdir=workdirs/tin10_macrl \
      --config.manual_dir=../shared/data/tiny-imagenet-10
  python tools/ablate.py --config=configs/tiny_imagenet_10.py \
      --config.manual_dir=../shared/data/tiny-imagenet-10 --out=results/tiny_imagenet_10 ...
The manual dir is a folder in Tiny ImageNet's official layout (wnids.txt, train/, val/) holding
these 10 classes. Each method's hyperparameters (METHOD_TUNED below) were chosen on the held-out
selection split (`data.holdout_fraction`), never on the validation split.

Expected on the 500 validation images (the README's "Results", from
results/tiny_imagenet_10/final/results.json, mean of 3 seeds): linear probe 39.1 % for macrl,
40.6 % for mocov3, 37.9 % for mae (39.9 % with 1914 steps, macrl's wall-clock), 30-37 % for the
randomly initialised encoder (it varies with the seed), 30.6 % for raw pixels. Time on a quiet 2-core CPU: a compiled step takes 0.63 s (macrl), 0.62 s (mocov3), 0.20 s
(mae), so 600 steps are about 6.5, 6 and 2 minutes, plus about a minute of compiling and probing.
"""

from macrl_jax.config import recipes, schema

# Per method, the best of its six trials on the selection split (linear probe on the held-out
# tenth of train; results/tiny_imagenet_10/selection/results.json); the rest is the method's recipe.
METHOD_TUNED = {
    'macrl': {'optim.base_lr': 3e-3, 'lambda_rec': 0.5},
    'mae': {'optim.base_lr': 1.5e-3, 'mask_ratio_strong': 0.75},
    'mocov3': {'optim.base_lr': 1.5e-3, 'temperature': 0.2},
    'mimco': {},
}


def get_config(arg=None):
  c = schema.base_config()
  c.dataset = 'tiny_imagenet'
  c.test_split = 'validation'
  c.num_classes = 10
  c.image_size = 32
  c.batch_size = 128
  c.total_steps = 600  # 17 epochs of the 4,500 images left by the selection split
  recipes.small_cpu_vit(c)
  c.optim.base_lr = 1.5e-3
  c.optim.warmup_steps = 60
  c.log_every_steps = 50
  c.eval_every_steps = 600
  c.checkpoint_every_steps = 200
  c.knn.eval_batch_size = 256
  c = schema.configure(c, arg)
  for field, value in METHOD_TUNED[c.method].items():
    schema.set_field(c, field, value)
  return c
