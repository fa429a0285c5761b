"""The input: datasets (datasets/), augmentation, the tf.data pipelines, mixup, device prefetch.

TensorFlow is imported only under this package."""
