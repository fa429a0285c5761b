"""Linear probe on cached frozen features (MAE protocol).

The classifier is BatchNorm without affine parameters followed by one linear layer (MAE's
`BatchNorm1d(affine=False)` + `Linear`): the BatchNorm only standardises the features, so the model
stays linear, but it removes the differences of scale between encoders that would otherwise make
one learning rate suit one encoder and not another.

Optimiser (SGD with momentum by default; LARS as MAE, or AdamW) with linear warm-up over the first
tenth of the steps and cosine decay. MAE trains with LARS at batch 16,384; its trust ratio
(0.001·‖w‖/‖g‖) makes each step move the weights by ~lr·0.001 of their norm, which at the small
batches (and few steps) of these data sets leaves the layer near its initialisation, hence SGD.

Training on features is cheap: all epochs of one run are one jitted scan (a new permutation per
epoch), compiled once per (examples, batch) shape and reused for every seed.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from macrl_jax.evals.accuracy import topk_accuracy
from macrl_jax.models import heads

OPTIMIZERS = ('sgd', 'lars', 'adamw')


class LinearProbe(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = heads.BatchNorm(use_running_average=not train, use_scale=False, use_bias=False,
                         epsilon=1e-6)(x)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(0.01))(x)


def make_optimizer(name: str, lr: float, weight_decay: float, total_steps: int):
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup_steps=max(total_steps // 10, 1), decay_steps=max(total_steps, 2))
  if name == 'sgd':
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=0.9))
  if name == 'lars':  # no trust ratio nor decay on the bias, as MAE's LARS
    matrices = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    return optax.lars(schedule, weight_decay=weight_decay, weight_decay_mask=matrices,
                      trust_ratio_mask=matrices, momentum=0.9)
  if name == 'adamw':
    return optax.adamw(schedule, weight_decay=weight_decay)
  raise ValueError(f'--optimizer={name!r}: expected one of {", ".join(OPTIMIZERS)}')


@functools.partial(jax.jit, static_argnames=('num_classes', 'epochs', 'batch_size', 'optimizer',
                                             'lr', 'weight_decay'))
def _train(x, y, rng, *, num_classes, epochs, batch_size, optimizer, lr, weight_decay):
  """Trains the probe on (x, y) for `epochs` epochs; returns its variables."""
  n = x.shape[0]
  steps = max(n // batch_size, 1)  # per epoch; each permutation drops a different remainder
  model = LinearProbe(num_classes)
  init_rng, rng = jax.random.split(rng)
  variables = model.init(init_rng, x[:2])
  tx = make_optimizer(optimizer, lr, weight_decay, epochs * steps)
  params, stats = variables['params'], variables['batch_stats']
  opt_state = tx.init(params)

  def loss_fn(params, stats, xb, yb):
    logits, new = model.apply({'params': params, 'batch_stats': stats}, xb, train=True,
                              mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    return loss, new['batch_stats']

  def step(carry, idx):
    params, stats, opt_state = carry
    grads, stats = jax.grad(loss_fn, has_aux=True)(params, stats, x[idx], y[idx])
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), stats, opt_state), None

  def epoch(carry, e):
    perm = jax.random.permutation(jax.random.fold_in(rng, e), n)[:steps * batch_size]
    carry, _ = jax.lax.scan(step, carry, perm.reshape(steps, batch_size))
    return carry, None

  (params, stats, _), _ = jax.lax.scan(epoch, (params, stats, opt_state), jnp.arange(epochs))
  return {'params': params, 'batch_stats': stats}


@functools.partial(jax.jit, static_argnames=('num_classes',))
def _predict(variables, x, *, num_classes):
  return LinearProbe(num_classes).apply(variables, x)


def train_probe(train_x, train_y, num_classes: int, *, epochs: int = 90, batch_size: int = 256,
                lr: float = 0.1, weight_decay: float = 0.0, optimizer: str = 'sgd', seed: int = 0):
  """The trained probe's variables; `batch_size` is capped at the number of examples."""
  if optimizer not in OPTIMIZERS:  # fails here rather than inside jit
    raise ValueError(f'optimizer {optimizer!r}: expected one of {", ".join(OPTIMIZERS)}')
  x = jnp.asarray(train_x, jnp.float32)
  return _train(x, jnp.asarray(train_y, jnp.int32), jax.random.PRNGKey(seed),
                num_classes=num_classes, epochs=epochs, batch_size=min(batch_size, x.shape[0]),
                optimizer=optimizer, lr=float(lr), weight_decay=float(weight_decay))


def predict(variables, x, num_classes: int) -> np.ndarray:
  return np.asarray(_predict(variables, jnp.asarray(x, jnp.float32), num_classes=num_classes))


def few_shot_indices(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
  """`shots` random examples of each class (all of a class that has fewer), sorted."""
  rs = np.random.RandomState(seed)
  picked = [rs.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)]
  return np.sort(np.concatenate(picked))


def linear_probe(train_x, train_y, test_x, test_y, num_classes: int, *, shots: int | None = None,
                 seeds: int | Sequence[int] = 5, **train_kw) -> dict:
  """Top-1/top-5 on the test features over runs of the probe (mean, std and each run): `seeds`
  runs with seeds 0, 1, ..., or one run per seed of a list.

  With `shots`, each seed draws its own N labelled train examples per class; without, the seeds
  differ only in the probe's initialisation and the order of the examples.
  """
  train_y = np.asarray(train_y)
  runs = []
  for seed in (range(seeds) if isinstance(seeds, int) else seeds):
    idx = few_shot_indices(train_y, shots, seed) if shots else np.arange(len(train_y))
    variables = train_probe(train_x[idx], train_y[idx], num_classes, seed=seed, **train_kw)
    logits = predict(variables, test_x, num_classes)
    runs.append({'seed': seed, 'train_examples': int(len(idx)),
                 'top1': topk_accuracy(logits, test_y, 1),
                 'top5': topk_accuracy(logits, test_y, 5)})
  out = {'runs': runs}
  for key in ('top1', 'top5'):
    values = np.array([r[key] for r in runs])
    out[key], out[f'{key}_std'] = float(values.mean()), float(values.std())
  return out
