"""macrl's optional variants: each is off by default and, when on, changes the step as it says."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import fixed_batch, tiny_config
from macrl_jax import sharding
from macrl_jax.config import schema
from macrl_jax.methods import build, train_step
from macrl_jax.models import decoders, vit


def test_the_defaults_build_the_step_without_any_variant():
  config = tiny_config('macrl')
  assert (config.model.feature_decoder_depth, config.key_mask, config.lambda_rec_schedule,
          config.mask_ratio_weak, config.queue_size) == (0, 'none', 'constant', 0.25, 0)
  built = build.build(config, sharding.make_mesh(jax.devices()[:1]))
  assert built.modules.feature_decoder is None
  assert 'feature_decoder' not in built.abstract_state['params']
  # Without a masked view (mocov3) there is nothing to complete: no feature decoder.
  mocov3 = tiny_config('mocov3', **{'model.feature_decoder_depth': 1})
  assert not schema.uses_feature_decoder(mocov3)


def test_feature_decoder_puts_the_visible_tokens_at_their_positions():
  n, k, d = 16, 4, 8
  decoder = decoders.FeatureDecoder(num_patches=n, depth=1, num_heads=2, mlp_dim=16)
  mask = vit.random_masking(jax.random.PRNGKey(0), 2, n, 0.75)
  tokens = jax.random.normal(jax.random.PRNGKey(1), (2, 1 + k, d))
  params = decoder.init(jax.random.PRNGKey(2), tokens, mask.ids_restore)['params']
  assert set(params) == {'mask_token', 'transformer'}
  out = decoder.apply({'params': params}, tokens, mask.ids_restore)
  assert out.shape == (2, 1 + n, d)
  # Depth 0 shows the layout the blocks get: visible token i at patch ids_keep[i], the mask token
  # elsewhere, each plus its position embedding (then the final norm).
  layout = decoders.FeatureDecoder(n, 0, 2, 16).apply({'params': params}, tokens, mask.ids_restore)
  want = np.array(np.broadcast_to(params['mask_token'], (2, n, d)))
  np.put_along_axis(want, np.asarray(mask.ids_keep)[..., None], np.asarray(tokens[:, 1:]), axis=1)
  want = np.concatenate([tokens[:, :1], want + vit.sincos_2d(d, 4)[None]], axis=1)
  ln = lambda x: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(layout, ln(want), atol=1e-4)


def test_key_masks_of_each_choice():
  a, b = object(), object()
  assert train_step.key_masks('none', [a, b]) == [None, None]  # the full views
  assert train_step.key_masks('same', [a, b]) == [a, b]  # each view as its own branch sees it
  assert train_step.key_masks('query', [a, b]) == [b, a]  # as the query it meets sees its view
  assert train_step.key_masks('query', [a, None]) == [None, a]  # the weak view unmasked


@pytest.mark.parametrize('schedule, start, middle, end', [
    ('linear_up', 0.0, 0.5, 1.0), ('linear_down', 1.0, 0.5, 0.0),
    ('cosine_up', 0.0, 0.5, 1.0), ('cosine_down', 1.0, 0.5, 0.0)])
def test_lambda_rec_schedules(schedule, start, middle, end):
  f = lambda step: float(train_step.lambda_rec_factor(step, 100, schedule))
  assert (f(0), f(50), f(100), f(200)) == pytest.approx((start, middle, end, end), abs=1e-6)
  if schedule.startswith('cosine'):
    assert abs(f(25) - start) < abs(f(25) - middle) - 0.1  # flat at the ends, unlike linear


def test_every_variant_on_changes_the_step_as_it_says():
  """One compiled step with all the variants on (a program per variant would cost the fast tier
  seconds each), against the default step on the same batch."""
  mesh = sharding.make_mesh(jax.devices()[:1])
  default = tiny_config('macrl')
  variant = tiny_config('macrl', key_mask='query', lambda_rec_schedule='linear_up',
                        mask_ratio_weak=0.0, queue_size=64,
                        **{'model.feature_decoder_depth': 1})

  def one_step(config):
    built = build.build(config, mesh)
    state = built.init_state()
    before = jax.device_get(state['params'])
    state, metrics = built.step(state, sharding.make_global_batch(fixed_batch(config), mesh))
    return before, jax.device_get(state), jax.device_get(metrics)

  _, _, base = one_step(default)
  before, state, metrics = one_step(variant)
  # The feature decoder is trained by the contrastive loss.
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), before['feature_decoder'],
                       state['params']['feature_decoder'])
  assert all(jax.tree.leaves(moved))
  # λ_rec ramps from 0: at step 0 the loss is the contrastive term alone.
  assert float(metrics['lambda_rec']) == 0.0 and 'lambda_rec' not in base
  np.testing.assert_allclose(metrics['loss'], metrics['loss_con'], rtol=1e-6)
  # The weak view is not masked: it reconstructs nothing, so only view 1's loss is left.
  assert float(metrics['loss_rec']) != pytest.approx(float(base['loss_rec']), rel=1e-4)
  # Two views' keys went into the memory bank; its keys joined the negatives.
  assert int(state['queue_ptr']) == 2 * variant.batch_size
  np.testing.assert_allclose(np.linalg.norm(state['queue'], axis=1), 1.0, rtol=1e-5)
  assert float(metrics['loss_con']) != pytest.approx(float(base['loss_con']), rel=1e-3)
