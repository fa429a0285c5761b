"""In-training evaluations: each has a name, a period in steps and `run(step, state)`, which returns
the metrics to log with that step. config.evals lists them with their periods; pre-training runs
those due at a step (and all of them at the last step) after saving it.

  knn             the kNN monitor: online-encoder features, the train split as memory, the whole
                  test split as queries → knn_top1
  reconstruction  masked test images and their reconstructions, as pictures for TensorBoard
                  (methods with a pixel decoder)
  masked_mse      the decoder's mean squared error on the masked patches of the first
                  `num_images` test images, in normalised pixels → heldout_masked_mse

`every_steps`: None follows config.eval_every_steps; 0 turns an evaluation off.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Protocol, Sequence

import jax

from macrl_jax import sharding
from macrl_jax.config import schema
from macrl_jax.evals import features, knn, reconstruction


class Evaluator(Protocol):
  name: ClassVar[str]
  every_steps: int

  def run(self, step: int, state: dict) -> dict[str, float]:
    ...


@dataclasses.dataclass
class Knn:
  name: ClassVar[str] = 'knn'
  every_steps: int
  config: Any
  mesh: Any
  encoder: Any

  def run(self, step: int, state: dict) -> dict[str, float]:
    c, params = self.config, state['params']['encoder']
    (train_f, train_y), (test_f, test_y) = (
        features.split_features(c, self.mesh, self.encoder, params, split)
        for split in (c.train_split, c.test_split))
    return {'knn_top1': knn.evaluate(train_f, train_y, test_f, test_y, c.num_classes, c.knn.k,
                                     c.knn.temperature)['top1']}


@dataclasses.dataclass
class ReconstructionPictures:
  """Run by every process (with sharding.fsdp, gathering the parameters is a collective);
  `write_images` writes on process 0 only."""
  name: ClassVar[str] = 'reconstruction'
  every_steps: int
  config: Any
  modules: Any
  write_images: Callable[[int, dict], None]
  num_images: int = 8

  def run(self, step: int, state: dict) -> dict[str, float]:
    from macrl_jax.data import input_pipeline  # TensorFlow
    c, params = self.config, sharding.to_host(state['params'])
    images = _test_images(c, self.num_images)
    out = {}
    for v, ratio in enumerate(schema.view_mask_ratios(c)):
      if ratio > 0:
        p = reconstruction.panels(self.modules, params, images, ratio, jax.random.PRNGKey(v),
                                  c.norm_pix_loss)
        out[f'reconstruction/view{v + 1}'] = reconstruction.grid(
            p, input_pipeline.MEAN, input_pipeline.STD)[None]
    self.write_images(step, out)
    return {}


@dataclasses.dataclass
class MaskedMse:
  name: ClassVar[str] = 'masked_mse'
  every_steps: int
  config: Any
  modules: Any
  num_images: int = 256

  def run(self, step: int, state: dict) -> dict[str, float]:
    c = self.config
    params = sharding.to_host(state['params'])
    images = _test_images(c, self.num_images)
    ratio = schema.view_mask_ratios(c)[0]
    return {'heldout_masked_mse': reconstruction.masked_mse(
        self.modules, params, images, ratio, jax.random.PRNGKey(0), c.norm_pix_loss)}


EVALUATORS = {e.name: e for e in (Knn, ReconstructionPictures, MaskedMse)}


def _test_images(config, num: int):
  from macrl_jax.data import input_pipeline  # TensorFlow
  batch = next(iter(input_pipeline.create_eval_iterator(
      config, config.test_split, batch_size=num, process_index=0, process_count=1)))
  return batch['image'][batch['mask']]


def make(config, mesh, modules, write_images: Callable[[int, dict], None]) -> list[Evaluator]:
  """The evaluations config.evals turns on, in its order; the pictures and the held-out error
  only for a method with a pixel decoder."""
  out = []
  for name, spec in config.evals.items():
    every = config.eval_every_steps if spec.every_steps is None else spec.every_steps
    if not every:
      continue
    if name == 'knn':
      out.append(Knn(every, config, mesh, modules.encoder))
    elif schema.uses_reconstruction(config):  # (MimCo's decoder predicts features, not pixels)
      kind = EVALUATORS[name]
      extra = {'write_images': write_images} if kind is ReconstructionPictures else {}
      out.append(kind(every, config, modules, num_images=spec.num_images, **extra))
  return out


def every_steps(evaluators: Sequence[Evaluator]) -> int:
  """The period at which some evaluation may be due: the greatest common divisor of theirs."""
  return math.gcd(*[e.every_steps for e in evaluators]) if evaluators else 0


def run_due(evaluators: Sequence[Evaluator], step: int, last: bool, state: dict) -> dict:
  """The metrics of the evaluations due at `step` (all of them at the last step)."""
  metrics = {}
  for e in evaluators:
    if last or step % e.every_steps == 0:
      metrics.update(e.run(step, state))
  return metrics
