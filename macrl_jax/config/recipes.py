"""Named recipes that config files and tools share: the fine-tuning metric's hyperparameters and
the small ViT of the CPU method studies."""

import ml_collections


def finetune_recipe() -> ml_collections.ConfigDict:
  """Fine-tuning hyperparameters: tools/finetune.py's flag defaults (MAE's recipe at small
  scale) and config.finetune, the recipe of the ablation's fine-tuning metric."""
  return ml_collections.ConfigDict(dict(
      epochs=50.0,  # over the labelled examples
      batch_size=128,
      base_lr=1e-3,  # scaled by batch_size / 256
      min_lr=1e-6,
      warmup_epochs=5.0,
      weight_decay=0.05,
      b1=0.9,
      b2=0.999,
      layer_decay=0.75,
      drop_path=0.1,
      label_smoothing=0.1,
      mixup=0.0,  # Beta(α, α) of mixup; 0 = off
      cutmix=0.0,  # Beta(α, α) of cutmix; 0 = off
      # A stratified fraction of each class of the train split whose labels are used (1 = all),
      # drawn with label_seed: the same examples whatever the pre-training or fine-tuning seed.
      label_fraction=1.0,
      label_seed=0,
  ))


def small_cpu_vit(c: ml_collections.ConfigDict) -> None:
  """The CPU studies' model (configs/tiny_imagenet_10.py, configs/cifar10_study.py): the 'mu' ViT
  (width 64, 4 blocks, 2 heads) with patch 4, a decoder of width 64 and 2 blocks, and heads of 256
  hidden units and 64 outputs."""
  c.model.variant = 'mu/4'
  c.model.decoder_width = 64
  c.model.decoder_depth = 2
  c.model.decoder_heads = 2
  c.model.proj_hidden = 256
  c.model.pred_hidden = 256
  c.model.proj_dim = 64
