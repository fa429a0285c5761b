"""The train step's parts, each compiled and timed on its own (tools/benchmark.py --parts).

online encoder fwd+bwd, momentum encoder (+ projector) forward, decoder fwd+bwd, heads fwd+bwd,
over every view: their times beside their shares of the analytic FLOPs show which part runs below
the step's matmul rate.
"""

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from macrl_jax.config import schema  # noqa: E402
from macrl_jax.methods import flops as flops_lib  # noqa: E402
from macrl_jax.models import vit  # noqa: E402
from macrl_jax.run.step_timing import median_timing, Timing  # noqa: E402

PARTS = ('online_encoder', 'momentum_encoder', 'decoder', 'heads')

def part_functions(config, modules, state, batch):
  """Each part of the step as its own function of (params, inputs): online encoder fwd+bwd, the
  momentum encoder (+ projector) forward, decoder fwd+bwd, heads fwd+bwd, over both views."""
  enc, dec, proj, pred = modules[:4]
  n = flops_lib.num_patches(config)
  views = [batch[f'view{v + 1}'] for v in range(config.num_views)]
  masks = [vit.random_masking(jax.random.PRNGKey(v), config.batch_size, n, r) if r > 0 else None
           for v, r in enumerate(schema.view_mask_ratios(config))]
  ids = [None if m is None else m.ids_keep for m in masks]
  params = state['params']
  square = lambda tree: sum(jnp.mean(jnp.square(x)) for x in jax.tree.leaves(tree))

  def encode(p):
    return [enc.apply({'params': p}, x, i) for x, i in zip(views, ids)]

  tokens = jax.jit(encode)(params['encoder'])
  feats = [vit.pool(z, config.model.pool) for z in tokens]
  fns = {'online_encoder': (jax.jit(jax.grad(lambda p: square(encode(p)))), (params['encoder'],))}
  if 'ema_params' in state:
    def momentum(ema, stats):
      return [proj.apply({'params': ema['projector'], 'batch_stats': stats['projector']},
                         vit.pool(enc.apply({'params': ema['encoder']}, x), config.model.pool),
                         mutable=['batch_stats'])[0] for x in views]
    fns['momentum_encoder'] = (jax.jit(momentum), (state['ema_params'], state['ema_batch_stats']))
  if dec is not None:
    def decode(p, zs):
      return square([dec.apply({'params': p}, z, m.ids_restore)
                     for z, m in zip(zs, masks) if m is not None])
    fns['decoder'] = (jax.jit(jax.grad(decode, argnums=(0, 1))), (params['decoder'], tokens))
  if proj is not None:
    def heads(p, stats, fs):
      out = []
      for f in fs:
        h, _ = proj.apply({'params': p['projector'], 'batch_stats': stats['projector']}, f,
                          mutable=['batch_stats'])
        out.append(pred.apply({'params': p['predictor'], 'batch_stats': stats['predictor']}, h,
                              mutable=['batch_stats'])[0])
      return square(out)
    head_params = {k: params[k] for k in ('projector', 'predictor')}
    fns['heads'] = (jax.jit(jax.grad(heads, argnums=(0, 2))),
                    (head_params, state['batch_stats'], feats))
  return fns


def time_parts(config, modules, state, batch, repeats: int) -> dict[str, Timing]:
  return {name: median_timing(fn, *args, repeats=repeats)
          for name, (fn, args) in part_functions(config, modules, state, batch).items()}
