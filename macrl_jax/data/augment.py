"""One image to one view with tf.image's stateless ops: the pre-training augmentations and the
evaluation resize-and-crop.

A view is a pure function of (image, key, aug): `key` is a stateless seed (int64 [2]) that is split
per op, and every random op is a tf.random.stateless_* / tf.image.stateless_* op. `aug` has the
fields of methods.view_aug(). Views come out as float32 [S, S, 3] in [0, 1]; the input pipeline
normalises them.
"""

from __future__ import annotations

import math

import tensorflow as tf


def decode_image(image: tf.Tensor) -> tf.Tensor:
  """Encoded bytes → uint8 [h, w, 3]; grayscale and CMYK JPEGs become RGB."""
  return tf.io.decode_image(image, channels=3, expand_animations=False)


def split_key(key: tf.Tensor, n: int) -> list[tf.Tensor]:
  return tf.unstack(tf.random.experimental.stateless_split(key, n))


def _random_crop_window(shape: tf.Tensor, key, scale, ratio) -> tuple[tf.Tensor, tf.Tensor]:
  """RandomResizedCrop's box for an image of `shape` [h, w, c]: (offset [y, x], size [h, w]).

  tf.image's box sampler: area fraction in `scale`, aspect ratio in `ratio`, the whole image after
  10 failed tries.
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=key,
      min_object_covered=0.0, aspect_ratio_range=tuple(ratio), area_range=tuple(scale),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  return begin[:2], size[:2]


def _decode_and_random_crop(image: tf.Tensor, key, scale, ratio) -> tf.Tensor:
  """Crops a random box; encoded JPEGs decode only the box (much cheaper for large images)."""

  def crop(decoded):
    begin, size = _random_crop_window(tf.shape(decoded), key, scale, ratio)
    return tf.slice(decoded, tf.concat([begin, [0]], 0), tf.concat([size, [3]], 0))

  if image.dtype != tf.string:
    return crop(image)

  def crop_jpeg():
    begin, size = _random_crop_window(tf.image.extract_jpeg_shape(image), key, scale, ratio)
    return tf.image.decode_and_crop_jpeg(image, tf.concat([begin, size], 0), channels=3)

  return tf.cond(tf.io.is_jpeg(image), crop_jpeg, lambda: crop(decode_image(image)))


def _random_apply(fn, prob: float, x: tf.Tensor, key) -> tf.Tensor:
  """fn(x, key') with probability `prob` (decided by `key`), else x."""
  if prob <= 0:
    return x
  coin_key, fn_key = split_key(key, 2)
  if prob >= 1:
    return fn(x, fn_key)
  apply = tf.random.stateless_uniform([], coin_key) < prob
  return tf.cond(apply, lambda: fn(x, fn_key), lambda: x)


def _color_jitter(x: tf.Tensor, key, aug) -> tf.Tensor:
  """torchvision ColorJitter semantics, fixed order (brightness, contrast, saturation, hue)."""
  keys = split_key(key, 4)
  if aug.brightness > 0:  # a factor, as torchvision (tf.image's brightness is additive)
    x *= tf.random.stateless_uniform([], keys[0], max(0.0, 1 - aug.brightness), 1 + aug.brightness)
    x = tf.clip_by_value(x, 0.0, 1.0)
  if aug.contrast > 0:
    x = tf.image.stateless_random_contrast(x, max(0.0, 1 - aug.contrast), 1 + aug.contrast, keys[1])
    x = tf.clip_by_value(x, 0.0, 1.0)
  if aug.saturation > 0:
    x = tf.image.stateless_random_saturation(x, max(0.0, 1 - aug.saturation), 1 + aug.saturation,
                                             keys[2])
    x = tf.clip_by_value(x, 0.0, 1.0)
  if aug.hue > 0:
    x = tf.image.stateless_random_hue(x, aug.hue, keys[3])
  return x


def _grayscale(x: tf.Tensor, key) -> tf.Tensor:
  del key
  return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(x))


def _gaussian_blur(x: tf.Tensor, key, sigma_range, scale: float) -> tf.Tensor:
  """Separable Gaussian blur, σ ~ U(sigma_range) · scale (scale: image size / reference size)."""
  lo, hi = (s * scale for s in sigma_range)
  sigma = tf.random.stateless_uniform([], key, lo, hi)
  radius = max(1, math.ceil(3 * hi))  # static, so that the graph has one kernel size
  t = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-0.5 * tf.square(t / sigma))
  kernel = tf.tile((kernel / tf.reduce_sum(kernel))[:, None, None, None], [1, 1, 3, 1])
  x = tf.pad(x[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode='REFLECT')
  x = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], 'VALID')  # vertical
  x = tf.nn.depthwise_conv2d(x, tf.reshape(kernel, [1, -1, 3, 1]), [1, 1, 1, 1], 'VALID')
  return x[0]


def _solarize(x: tf.Tensor, key) -> tf.Tensor:
  del key
  return tf.where(x < 0.5, x, 1.0 - x)


def random_view(image: tf.Tensor, key: tf.Tensor, aug, image_size: int,
                blur_reference_size: int = 224) -> tuple[tf.Tensor, tf.Tensor]:
  """uint8 [h, w, 3] or encoded bytes → (view, clean), float32 [S, S, 3] in [0, 1].

  In this order: RandomResizedCrop, horizontal flip, colour jitter, grayscale, Gaussian blur and
  solarize, each distortion applied with its probability in `aug`. `clean` is the same crop and
  flip before the distortions (a reconstruction target). Blur σ is given at `blur_reference_size`
  px and scaled to `image_size`.
  """
  keys = split_key(key, 6)
  x = _decode_and_random_crop(image, keys[0], aug.crop_scale, aug.crop_ratio)
  x = tf.image.resize(x, [image_size, image_size], method='bilinear', antialias=True) / 255.0
  x = tf.clip_by_value(x, 0.0, 1.0)
  if aug.flip:
    x = tf.image.stateless_random_flip_left_right(x, keys[1])
  clean = x
  x = _random_apply(lambda x, k: _color_jitter(x, k, aug), aug.color_jitter_prob, x, keys[2])
  x = _random_apply(_grayscale, aug.grayscale_prob, x, keys[3])
  blur_scale = image_size / blur_reference_size
  x = _random_apply(lambda x, k: _gaussian_blur(x, k, aug.blur_sigma, blur_scale), aug.blur_prob,
                    x, keys[4])
  x = _random_apply(_solarize, aug.solarize_prob, x, keys[5])
  return x, clean


def center_view(image: tf.Tensor, image_size: int, crop_fraction: float = 1.0) -> tf.Tensor:
  """Resize the shorter side to image_size / crop_fraction, center crop: float32 in [0, 1]."""
  x = decode_image(image) if image.dtype == tf.string else image
  hw = tf.cast(tf.shape(x)[:2], tf.float32)
  target = round(image_size / crop_fraction)
  new_hw = tf.cast(tf.round(hw * target / tf.reduce_min(hw)), tf.int32)
  new_hw = tf.maximum(new_hw, image_size)  # guards rounding below the crop
  x = tf.image.resize(x, new_hw, method='bilinear', antialias=True)
  top, left = (new_hw[0] - image_size) // 2, (new_hw[1] - image_size) // 2
  x = tf.image.crop_to_bounding_box(x, top, left, image_size, image_size)
  return tf.clip_by_value(x / 255.0, 0.0, 1.0)
