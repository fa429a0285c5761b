"""The CIFAR-10 method study: CIFAR-10 from the image folder ../shared/data/cifar10, 32 px.

The folder holds train/<class>/*.jpg (50,000) and test/<class>/*.jpg (10,000), 10 classes; it is
prepared once into the TFDS data dir on first use (65 s measured on this 2-core CPU; prepared again
only when the folder changes) and read from there. The default path is the one beside this
repository; --config.dataset=folder:PATH reads another copy.
  python main.py --config=configs/cifar10_study.py:method=macrl --workdir=workdirs/c10_macrl
  python tools/ablate.py --config=configs/cifar10_study.py --trials=TRIALS.json \
      --protocol=selection --seeds=0 --finetune --out=results/cifar10/selection
  python tools/ablate.py --config=configs/cifar10_study.py --trials=TRIALS.json \
      --protocol=final --seeds=0,1,2 --budgets=epochs,time --finetune --out=results/cifar10/final
The selection protocol holds out 10 % of each train class (5,000 images, the same for every run
and seed: `data.holdout_fraction`, as in configs/tiny_imagenet_10.py) and evaluates there; the
test split is for the final protocol only. The three metrics: kNN, linear probe, and fine-tuning
with 10 % of the train labels (`finetune.label_fraction`: a fixed stratified subset drawn with
`finetune.label_seed`, the same for every method and seed; one recipe, `finetune`, for all).

The model (recipes.small_cpu_vit: width 64, 4 blocks, patch 4, 64 tokens; batch 128) was kept after
the selection split's model trials: against a ViT of width 128 with patch 8 (16 tokens) at equal
time, the mean linear top-1 of macrl, mae and mocov3 was 43.9 vs 44.0 % (one seed each), a tie
(results/cifar10/selection). Step times measured alternately on this 2-core CPU: macrl 0.40 s,
mocov3 0.40 s, mae 0.14 s. total_steps 2250 is 15 minutes of macrl (6.4 epochs of the 45,000
images left by the selection split); the selection trials ran 700 steps (4.7 minutes) each.
METHOD_TUNED holds what the selection trials chose for each method.
Expected time: 15 minutes of pre-training per macrl run on this CPU, and about a minute for the
kNN and linear probes. Expected figures at the selection's 700 steps (holdout, one seed): linear
top-1 43.5 % (macrl), 45.8 % (mae), 42.4 % (mocov3), 38.3 % for the random encoder.
"""

import os

from macrl_jax.config import recipes, schema

# The image folder beside this repository (../shared/data/cifar10, from the repository root).
FOLDER = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..',
                                       'shared', 'data', 'cifar10'))

# Per method, the values its selection trials choose (none yet); the rest is the method's recipe.
METHOD_TUNED = {'macrl': {}, 'mae': {}, 'mocov3': {}, 'mimco': {}}


def get_config(arg=None):
  c = schema.base_config()
  c.dataset = f'folder:{FOLDER}'
  c.train_split = 'train'
  c.test_split = 'test'
  c.num_classes = 10
  c.image_size = 32
  c.batch_size = 128
  c.total_steps = 2250  # 15 min at 0.40 s per macrl step
  recipes.small_cpu_vit(c)
  c.optim.base_lr = 1.5e-3
  c.optim.warmup_steps = 225
  c.log_every_steps = 50
  c.eval_every_steps = 450  # the kNN monitor against pre-training time: five points per run
  c.checkpoint_every_steps = 450
  c.knn.eval_batch_size = 256
  # The fine-tuning metric: 10 % of the train labels (450 or 500 per class), one recipe for all;
  # the length is a starting point for the study to choose on the selection split.
  c.finetune.label_fraction = 0.1
  c.finetune.epochs = 30.0
  c.finetune.warmup_epochs = 3.0
  c = schema.configure(c, arg)
  for field, value in METHOD_TUNED[c.method].items():
    schema.set_field(c, field, value)
  return c
