"""The jitted step: sharding equivalence, the momentum update, learning, and config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import fitting_config, fixed_batch, override, tiny_config, without_gradient_free
from macrl_jax import sharding
from macrl_jax.config import checks, methods, schema
from macrl_jax.methods import build, optim, train_step


def run_steps(config, devices, num_steps=1, seed=0):
  mesh = sharding.make_mesh(devices)
  built = build.build(config, mesh)
  state = built.init_state()
  batch = sharding.make_global_batch(fixed_batch(config, seed), mesh)
  metrics = []
  for _ in range(num_steps):
    state, m = built.step(state, batch)
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


def test_eight_host_devices_are_there():
  assert jax.device_count() == 8, 'tests/conftest.py sets XLA_FLAGS before jax is imported'


def sharded_devices():
  """Every device; on a machine with one accelerator, the 8 host CPU devices (XLA_FLAGS), so that
  the accelerator's step is compared with a sharded one (benchmarks/accelerator_check.py)."""
  return jax.devices() if jax.device_count() > 1 else jax.devices('cpu')


@pytest.mark.accelerator
@pytest.mark.parametrize('fsdp', [False, True])
@pytest.mark.parametrize('method', ['macrl', 'mocov3'])
def test_sharded_step_equals_single_device(method, fsdp):
  config = tiny_config(method, queue_size=64 if method == 'macrl' else 0)
  config.optim.base_lr = 1e-3
  one, m1 = run_steps(config, jax.devices()[:1], num_steps=2)
  config.sharding.fsdp = fsdp
  eight, m8 = run_steps(config, sharded_devices(), num_steps=2)
  for a, b in zip(m1, m8):
    np.testing.assert_allclose(a['loss'], b['loss'], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a['grad_norm'], b['grad_norm'], rtol=1e-4)
  assert_equal_but_for_rounding_in_adam(without_gradient_free(one, method),
                                        without_gradient_free(eight, method),
                                        lr_sum=sum(float(m['lr']) for m in m1))


def assert_equal_but_for_rounding_in_adam(a, b, lr_sum: float):
  """Adam moves a weight by up to lr per step whatever the size of its gradient, so where a
  gradient is ~0 the reduction order's rounding can flip its sign: that weight may then differ by
  up to twice the summed lr. Such weights are rare; every other one must agree to rounding."""
  pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  loose = sum(int(np.sum(~np.isclose(x, y, rtol=1e-3, atol=2e-5))) for x, y in pairs)
  assert loose <= 1e-3 * sum(x.size for x, _ in pairs), f'{loose} weights differ beyond rounding'
  for x, y in pairs:
    np.testing.assert_allclose(x, y, rtol=0, atol=2 * lr_sum + 2e-5)


def test_an_equal_config_gets_the_jitted_step_already_made():
  """A process that builds one config again (tools/ablate.py times a trial's step, then trains it)
  reuses the jitted step and its compiled program; a changed field, another mesh or another step
  function gets its own."""
  mesh = sharding.make_mesh()
  first = build.build(tiny_config('macrl'), mesh).step
  assert build.build(tiny_config('macrl'), mesh).step is first
  assert build.build(tiny_config('macrl', total_steps=101), mesh).step is not first
  assert build.build(tiny_config('macrl'), sharding.make_mesh(jax.devices()[:1])).step is not first
  other = build.METHODS['macrl']._replace(make_train_step=lambda *args: lambda state, batch: None)
  assert build.jitted(tiny_config('macrl'), mesh, other, None, None, None, None)[1] is not first


def test_fsdp_shards_params_and_optimizer_state():
  config = tiny_config('mae')
  config.sharding.fsdp = True
  state = build.build(config, sharding.make_mesh()).init_state()
  kernel = state['params']['encoder']['transformer']['block00']['mlp_in']['kernel']
  assert kernel.sharding.spec != jax.sharding.PartitionSpec()
  assert kernel.addressable_shards[0].data.size == kernel.size // 8
  mu = state['opt_state'][0].mu['encoder']['transformer']['block00']['mlp_in']['kernel']
  assert mu.addressable_shards[0].data.size == mu.size // 8


def test_momentum_update_is_ema_of_updated_online():
  config = tiny_config('macrl')  # the program of test_scanned_blocks_give_the_same_step (scan off)
  mesh = sharding.make_mesh(jax.devices()[:1])
  built = build.build(config, mesh)
  state = built.init_state()
  state, _ = built.step(state, sharding.make_global_batch(fixed_batch(config), mesh))  # EMA ≠ online now
  old = jax.device_get(state)
  new, metrics = built.step(state, sharding.make_global_batch(fixed_batch(config, 1), mesh))
  new = jax.device_get(new)
  m = float(metrics['momentum'])
  # The step from 1 to 2 takes m(2): MoCo v3's momentum at the start of its iteration 2.
  np.testing.assert_allclose(m, train_step.momentum_at(2, config.total_steps, config.momentum_base),
                             rtol=1e-6)
  for name in ('encoder', 'projector'):
    expected = jax.tree.map(lambda e, o: m * e + (1 - m) * o, old['ema_params'][name], new['params'][name])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 new['ema_params'][name], expected)
  # And the online encoder moved while the EMA moved only by the (1 − m) share.
  assert not np.allclose(old['params']['encoder']['embedding']['kernel'],
                         new['params']['encoder']['embedding']['kernel'])


def test_momentum_network_gets_no_gradient():
  """The loss's gradient w.r.t. the momentum params is exactly zero (stop_gradient on keys)."""
  config = tiny_config('macrl')
  mesh = sharding.make_mesh(jax.devices()[:1])
  built = build.build(config, mesh)
  state = jax.device_get(built.init_state())
  step_fn = train_step.make_train_step(config, built.modules, built.tx, built.lr_fn)
  batch = fixed_batch(config)

  def loss_of_ema(ema):
    _, metrics = step_fn(dict(state, ema_params=ema), batch)
    return metrics['loss']

  grads = jax.jit(jax.grad(loss_of_ema))(state['ema_params'])  # one program, not op by op
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_momentum_schedule():
  assert float(train_step.momentum_at(0, 100, 0.99)) == pytest.approx(0.99)
  assert float(train_step.momentum_at(50, 100, 0.99)) == pytest.approx(0.995)
  assert float(train_step.momentum_at(100, 100, 0.99)) == pytest.approx(1.0)


@pytest.mark.parametrize('method', ['macrl', 'mae', 'mocov3'])
def test_tiny_model_drives_loss_down_on_a_fixed_batch(method):
  config = fitting_config(method)
  _, metrics = run_steps(config, jax.devices()[:1], num_steps=40)
  first = np.mean([m['loss'] for m in metrics[:3]])
  last = np.mean([m['loss'] for m in metrics[-3:]])
  assert np.isfinite(last)
  assert last < 0.8 * first, (method, first, last)
  assert {'grad_norm', 'param_norm', 'lr', 'loss'} <= set(metrics[0])
  if method != 'mae':
    assert metrics[-1]['con_acc'] > metrics[0]['con_acc']


def test_weight_decay_mask_is_kernels_only():
  config = tiny_config('macrl')
  params = build.build(config, sharding.make_mesh(jax.devices()[:1])).abstract_state['params']
  mask = optim.decay_mask(params)
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat["['encoder']['embedding']['kernel']"]
  assert not flat["['encoder']['embedding']['bias']"]
  assert not flat["['encoder']['cls']"]
  assert not flat["['decoder']['mask_token']"]
  assert not any(v for k, v in flat.items() if 'LayerNorm' in k or "['bn" in k)


def test_learning_rate_scales_with_batch_and_warms_up():
  config = tiny_config('mae', batch_size=512, total_steps=100)
  config.optim.base_lr, config.optim.warmup_steps = 1e-3, 10
  lr = optim.lr_schedule(config, 100)
  assert float(lr(0)) == 0.0
  assert float(lr(10)) == pytest.approx(2e-3)
  assert float(lr(100)) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize('overrides,field', [
    (dict(image_size=18), 'image_size'),
    (dict(mask_ratio_strong=1.0), 'mask_ratio_strong'),
    (dict(mask_ratio_weak=-0.1), 'mask_ratio_weak'),
    (dict(mask_ratio_strong=0.99), 'mask_ratio_strong'),  # 16 patches → no visible patch
    (dict(batch_size=12), 'batch_size'),  # not divisible by 8 devices
    (dict(method='nope'), 'method'),
    (dict(**{'model.variant': 'XL/4'}), 'model.variant'),
    (dict(**{'model.variant': 'S4'}), 'model.variant'),
    (dict(lambda_con=0.0, lambda_rec=0.0), 'lambda_con'),
    (dict(key_mask='other'), 'key_mask'),
    (dict(queue_size=8), 'queue_size'),
])
def test_bad_config_fails_before_compiling(overrides, field):
  config = override(tiny_config('macrl'), overrides)
  with pytest.raises(ValueError, match=f'config.{field}'):
    checks.validate(config, num_devices=8)
  with pytest.raises(ValueError, match=f'config.{field}'):
    build.build(config, sharding.make_mesh())  # validates before tracing anything


@pytest.mark.parametrize('method,overrides,field', [
    ('mae', dict(lambda_con=1.0), 'lambda_con'),
    ('mocov3', dict(lambda_rec=1.0), 'lambda_rec'),
    ('mocov3', dict(mask_ratio_strong=0.5), 'mask_ratio_strong'),
    ('mae', dict(num_views=2), 'num_views'),
    ('macrl', dict(lambda_rec=0.0), 'lambda_rec'),
])
def test_inconsistent_preset_names_the_field(method, overrides, field):
  with pytest.raises(ValueError, match=f'config.{field}'):
    checks.validate(override(tiny_config(method), overrides), num_devices=8)


def test_unknown_method_preset():
  with pytest.raises(ValueError, match='unknown method'):
    methods.apply_method(schema.base_config(), 'simclr')


def test_scanned_blocks_give_the_same_step():
  """model.scan only changes the layout of the block parameters (stacked), not the step's result."""
  from helpers import stack_blocks
  mesh = sharding.make_mesh(jax.devices()[:1])
  batch = sharding.make_global_batch(fixed_batch(tiny_config('macrl')), mesh)
  results = {}
  for scan in (False, True):
    built = build.build(tiny_config('macrl', **{'model.scan': scan}), mesh)
    state = jax.device_get(built.init_state())
    if scan:  # the loop's initial parameters, stacked; the optimizer state starts at zero anyway
      state['params'] = stack_blocks(loop_state['params'])
      state['ema_params'] = stack_blocks(loop_state['ema_params'])
    else:
      loop_state = state
    state = jax.device_put(state, built.shardings)
    state, m1 = built.step(state, batch)
    state, m2 = built.step(state, batch)
    results[scan] = jax.device_get((state['params'], m1['loss'], m2['loss']))
  assert results[True][0]['encoder']['transformer']['blocks']['mlp_in']['kernel'].shape[0] == 2  # depth
  np.testing.assert_allclose(results[True][1:], results[False][1:], rtol=1e-5)

  def close(path, a, b):
    if "['qkv']['bias']" not in jax.tree_util.keystr(path):  # gradient-free: see without_gradient_free
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  jax.tree_util.tree_map_with_path(close, results[True][0], stack_blocks(results[False][0]))


def test_reconstruction_target_is_the_batch_target_when_given():
  """rec_target='clean': the masked view is compared with view<k>_target, not with itself."""
  config = tiny_config('mae')
  mesh = sharding.make_mesh(jax.devices()[:1])
  built = build.build(config, mesh)
  batch = fixed_batch(config, 0)

  def loss_rec(batch):
    state = built.init_state()
    _, metrics = built.step(state, sharding.make_global_batch(batch, mesh))
    return float(metrics['loss_rec'])

  own = loss_rec(batch)
  assert loss_rec(dict(batch, view1_target=batch['view1'])) == own
  flipped = dict(batch, view1_target=np.ascontiguousarray(batch['view1'][:, :, ::-1]))
  assert loss_rec(flipped) != pytest.approx(own, rel=1e-3)
