"""Reference parity: mae and mocov3 compute what the official MAE and MoCo v3 code computes.

Each test computes one piece the official way in PyTorch (torch.var, nn.BatchNorm1d, AdamW over the
official parameter groups, nn.Linear's initialisation, MAE's masking length, timm's global-pool
classifier, the checkpoints main_moco.py and MAE's save_model write) on the same weights and inputs,
and compares within 1e-5 relative.
"""

import argparse
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import fixed_batch, tiny_config
from macrl_jax import sharding
from macrl_jax.config import schema
from macrl_jax.interop import mocov3_files, timm_vit, torch_files
from macrl_jax.methods import build, classifier, losses, networks, optim
from macrl_jax.models import heads, vit as models_vit

sys.modules.setdefault('triton', None)  # see test_interop.py: never needed on CPU
torch = pytest.importorskip('torch', reason='the parity tests compare against PyTorch: '
                            'pip install -r requirements-interop.txt')
timm = pytest.importorskip('timm', reason='pip install -r requirements-interop.txt')
nn = torch.nn

RTOL = 1e-5


def assert_close(ours, theirs, rtol=RTOL, atol=1e-7):
  np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------ losses
def mae_forward_loss(pred, target, mask, kind='l2'):
  """MAE's `forward_loss` with norm_pix_loss, on torch tensors (mean and torch.var per patch)."""
  mean = target.mean(dim=-1, keepdim=True)
  var = target.var(dim=-1, keepdim=True)
  target = (target - mean) / (var + 1.e-6) ** .5
  err = (pred - target) ** 2 if kind == 'l2' else (pred - target).abs()
  return (err.mean(dim=-1) * mask).sum() / mask.sum()


@pytest.mark.parametrize('kind', ['l2', 'l1'])
def test_norm_pix_loss_matches_mae(kind):
  rs = np.random.RandomState(0)
  pred, target = rs.randn(2, 4, 64, 48).astype(np.float32)
  mask = (rs.rand(4, 64) < 0.75).astype(np.float32)
  ours = losses.reconstruction_loss(pred, target, mask, norm_pix=True, kind=kind)
  theirs = mae_forward_loss(*map(torch.from_numpy, (pred, target, mask)), kind=kind)
  assert_close(ours, theirs.item())


@pytest.mark.parametrize('num_patches,ratio', [(196, 0.75), (196, 0.9), (64, 0.6), (16, 0.25),
                                               (64, 0.75), (49, 0.5)])
def test_visible_patches_are_as_many_as_in_mae_random_masking(num_patches, ratio):
  noise = torch.rand(3, num_patches)
  len_keep = int(num_patches * (1 - ratio))  # MAE's random_masking
  ids_keep = torch.argsort(noise, dim=1)[:, :len_keep]
  mask = models_vit.random_masking(jax.random.PRNGKey(0), 3, num_patches, ratio)
  assert mask.ids_keep.shape == tuple(ids_keep.shape)
  assert float(mask.mask.sum()) == 3 * (num_patches - len_keep)


# ------------------------------------------------------------------------------------ BatchNorm
def test_batchnorm_matches_torch_batchnorm1d():
  x = np.random.RandomState(0).randn(8, 6).astype(np.float32) * 3 + 1
  bn = heads.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.PRNGKey(0), x)
  y, updated = bn.apply(variables, x, mutable=['batch_stats'])
  ref = nn.BatchNorm1d(6)
  y_ref = ref(torch.from_numpy(x))
  assert_close(y, y_ref.detach(), atol=1e-6)
  assert_close(updated['batch_stats']['mean'], ref.running_mean)
  assert_close(updated['batch_stats']['var'], ref.running_var)  # the unbiased batch variance
  frozen = heads.BatchNorm(use_running_average=True)
  x2 = x[::-1] * 0.5
  ref.eval()
  assert_close(frozen.apply({**variables, **updated}, x2), ref(torch.from_numpy(x2.copy())).detach(),
               atol=1e-6)


# ------------------------------------------------------------------------------------ optimizer
def official_param_groups(sd: dict, method: str, weight_decay: float):
  """The parameter groups of the official training scripts, over a torch-named state dict."""
  frozen = ('pos_embed', 'decoder_pos_embed')  # requires_grad=False in both codes
  params = {k: nn.Parameter(torch.from_numpy(v.copy())) for k, v in sd.items()
            if k.split('.')[-1] not in frozen}
  if method == 'mocov3':  # main_moco.py: AdamW(model.parameters(), weight_decay=wd)
    return params, [{'params': list(params.values()), 'weight_decay': weight_decay}]
  # MAE: timm's param_groups_weight_decay, no decay for 1-D tensors and biases.
  no_decay = [p for k, p in params.items() if p.ndim == 1 or k.endswith('.bias')]
  decay = [p for k, p in params.items() if not (p.ndim == 1 or k.endswith('.bias'))]
  return params, [{'params': no_decay, 'weight_decay': 0.0},
                  {'params': decay, 'weight_decay': weight_decay}]


def to_official(params: dict, config) -> dict:
  """Our params → one torch-named state dict: MAE's (encoder + decoder) or MoCo v3's (module.*)."""
  if config.method == 'mae':
    from macrl_jax.interop.state_dicts import decoder_to_mae
    dims = models_vit.vit_dims(config.model)
    sd = timm_vit.encoder_to_timm(params['encoder'], dims, config.image_size)
    sd.update(decoder_to_mae(params['decoder'], (config.image_size // dims['patch_size']) ** 2))
    return sd
  stats = {head: {f'bn{i}': {'mean': 0.0, 'var': 0.0} for i in range(layers)}
           for head, layers in (('projector', 3), ('predictor', 2))}
  parts = mocov3_files.mocov3_parts(params, stats, None, None, config)
  return {f'{part}.{k}': v for part, sd in parts.items() for k, v in sd.items()
          if k.split('.')[-1] not in mocov3_files.BUFFERS}


@pytest.mark.parametrize('method', ['mae', 'mocov3'])
def test_adamw_step_matches_the_official_parameter_groups(method):
  """Two AdamW steps with a large lr and weight decay, so that a tensor decayed on one side only
  differs by far more than the tolerance (cls and mask tokens for MAE; biases and norms for MoCo v3)."""
  config = tiny_config(method, **{'optim.weight_decay': 0.5})
  lr = 0.05
  config.optim.base_lr = lr * 256 / config.batch_size
  params = jax.device_get(networks.init_variables(networks.make_modules(config), config,
                                                jax.random.PRNGKey(0))['params'])
  rs = np.random.RandomState(1)
  grads = [jax.tree.map(lambda p: rs.randn(*np.shape(p)).astype(np.float32), params)
           for _ in range(2)]
  tx, _ = optim.make_optimizer(config, total_steps=10 ** 9)  # lr ≈ peak for the first steps
  ours, opt_state = params, tx.init(params)
  for g in grads:
    updates, opt_state = tx.update(g, opt_state, ours)
    ours = jax.tree.map(lambda p, u: np.asarray(p + u), ours, updates)

  named, groups = official_param_groups(to_official(params, config), method, 0.5)
  adamw = torch.optim.AdamW(groups, lr=lr, betas=(config.optim.b1, config.optim.b2), eps=1e-8)
  for g in grads:
    for k, gk in to_official(g, config).items():
      if k in named:
        named[k].grad = torch.from_numpy(gk.copy())
    adamw.step()
  ours_named = to_official(ours, config)
  assert {k for k in named} <= set(ours_named)
  for k, p in named.items():
    assert_close(ours_named[k], p.detach(), atol=1e-6)


# ------------------------------------------------------------------------------------ init
def test_heads_start_as_torch_linear_and_the_cls_token_as_each_method_does():
  head = heads.MLPHead(hidden=512, out=64, num_layers=2)
  params = head.init(jax.random.PRNGKey(0), jnp.zeros((2, 256)))['params']
  ours = np.asarray(params['dense0']['kernel'])
  theirs = nn.Linear(256, 512, bias=False).weight.detach().numpy()
  bound = 1 / math.sqrt(256)  # kaiming_uniform(a=√5)
  for w in (ours, theirs):
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
  assert ours.std() == pytest.approx(theirs.std(), rel=0.03)
  for method, std in (('mocov3', 1e-6), ('mae', 0.02)):
    config = tiny_config(method, **{'model.width': 256, 'model.num_heads': 4})
    cls = networks.make_modules(config).encoder.init(
        jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))['params']['cls']
    assert float(np.std(cls)) == pytest.approx(std, rel=0.15)


# ------------------------------------------------------------------------------------ fine-tuning
def test_global_pool_classifier_matches_timm_with_fc_norm():
  """MAE's global_pool fine-tuning model is timm's VisionTransformer(global_pool='avg'): no final
  norm, fc_norm on the mean of the patch tokens; its position table is a trained parameter."""
  config = tiny_config('mae')
  dims = models_vit.vit_dims(config.model)
  encoder = classifier.finetuning_encoder(networks.make_modules(config).encoder, 'mean', 0.0)
  model = classifier.Classifier(encoder, 5, 'mean')
  x = np.random.RandomState(0).randn(2, 16, 16, 3).astype(np.float32)
  params = jax.device_get(model.init(jax.random.PRNGKey(0), x)['params'])
  assert 'norm' not in params['encoder']['transformer']
  table = np.asarray(params['encoder']['pos_embedding'])
  assert_close(table[0, 1:], models_vit.sincos_2d(dims['width'], 4))
  assert not table[0, 0].any()
  rs = np.random.RandomState(1)
  params = jax.tree.map(lambda p: p + 0.1 * rs.randn(*p.shape).astype(np.float32), params)

  vit = timm.models.VisionTransformer(**dict(timm_vit.timm_kwargs(dims, 16, 'mean'), fc_norm=None,
                                             num_classes=5))
  enc = params['encoder']
  sd = timm_vit.encoder_to_timm(dict(enc, transformer=dict(enc['transformer'], norm={
      'scale': np.ones(dims['width']), 'bias': np.zeros(dims['width'])})), dims, 16)
  del sd['norm.weight'], sd['norm.bias']
  sd['pos_embed'] = np.asarray(enc['pos_embedding'])
  sd.update({'fc_norm.weight': params['fc_norm']['scale'], 'fc_norm.bias': params['fc_norm']['bias'],
             'head.weight': params['head']['kernel'].T, 'head.bias': params['head']['bias']})
  vit.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in sd.items()},
                      strict=True)
  ours = model.apply({'params': params}, x)
  theirs = vit.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).detach()
  assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_pretrained_encoder_fills_the_finetuning_encoder():
  config = tiny_config('mae')
  enc = networks.make_modules(config).encoder
  pretrained = enc.init(jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 3)))['params']
  ft = classifier.finetuning_encoder(enc, 'mean', 0.1)
  fresh = ft.init(jax.random.PRNGKey(2), jnp.zeros((1, 16, 16, 3)))['params']
  merged = classifier.with_pretrained(fresh, pretrained)
  assert_close(merged['cls'], pretrained['cls'])
  assert_close(merged['pos_embedding'], fresh['pos_embedding'])
  assert 'norm' not in merged['transformer']
  assert jax.tree.structure(merged) == jax.tree.structure(fresh)


# ------------------------------------------------------------------------------------ checkpoints
def test_an_mae_training_checkpoint_with_args_imports(tmp_path):
  """MAE's save_model writes {'model', 'optimizer', 'epoch', 'scaler', 'args'}; args is an
  argparse.Namespace, the one global allowed. Any other global is refused, naming it."""
  config = tiny_config('mae')
  params = jax.device_get(networks.init_variables(networks.make_modules(config), config,
                                                jax.random.PRNGKey(0))['params'])
  sd = {k: torch.from_numpy(v.copy()) for k, v in to_official(params, config).items()}
  path = str(tmp_path / 'checkpoint-399.pth')
  args = argparse.Namespace(model='mae_vit_base_patch16', mask_ratio=0.75, norm_pix_loss=True,
                            blr=1.5e-4, output_dir='./output_dir', device='cuda')
  torch.save({'model': sd, 'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 399,
              'scaler': {'scale': 65536.0}, 'args': args}, path)
  loaded, _ = torch_files.read_state_dict(path)
  assert set(loaded) == set(sd)
  variables = torch_files.load_variables(path, config)
  assert_close(variables['params']['decoder']['mask_token'], params['decoder']['mask_token'])

  bad = str(tmp_path / 'other.pth')
  torch.save({'model': sd, 'extra': argparse.ArgumentParser}, bad)
  with pytest.raises(timm_vit.InteropError, match='Unsupported global.*ArgumentParser'):
    torch_files.read_state_dict(bad)


def moco_mlp(num_layers, input_dim, mlp_dim, output_dim):
  """MoCo v3's `_build_mlp` (last BatchNorm without affine)."""
  layers = []
  for i in range(num_layers):
    last = i == num_layers - 1
    layers.append(nn.Linear(input_dim if i == 0 else mlp_dim, output_dim if last else mlp_dim,
                            bias=False))
    layers += [nn.BatchNorm1d(output_dim, affine=False)] if last else [
        nn.BatchNorm1d(mlp_dim), nn.ReLU(inplace=True)]
  return nn.Sequential(*layers)


class MoCoViT(nn.Module):
  """MoCo_ViT's module tree (base and momentum timm ViTs with the projector as head, predictor)."""

  def __init__(self, config):
    super().__init__()
    m, dims = config.model, models_vit.vit_dims(config.model)
    kwargs = dict(timm_vit.timm_kwargs(dims, config.image_size, 'cls'), num_classes=m.proj_hidden)
    for name in ('base_encoder', 'momentum_encoder'):
      vit = timm.models.VisionTransformer(**kwargs)
      vit.head = moco_mlp(3, dims['width'], m.proj_hidden, m.proj_dim)
      setattr(self, name, vit)
    self.predictor = moco_mlp(2, m.proj_dim, m.pred_hidden, m.proj_dim)
    for p in self.momentum_encoder.parameters():
      p.requires_grad = False


class DDP(nn.Module):
  """The 'module.' prefix that DistributedDataParallel gives main_moco.py's state dict."""

  def __init__(self, module):
    super().__init__()
    self.module = module


@pytest.fixture(scope='module')
def mocov3_checkpoint_file(tmp_path_factory):
  """A mocov3 state after two steps (EMA ≠ online, Adam moments set), saved as main_moco.py does."""
  config = tiny_config('mocov3')
  mesh = sharding.make_mesh(jax.devices()[:1])
  built = build.build(config, mesh)
  state = built.init_state()
  for seed in range(2):
    state, _ = built.step(state, sharding.make_global_batch(fixed_batch(config, seed), mesh))
  state = jax.device_get(state)
  path = str(tmp_path_factory.mktemp('moco') / 'checkpoint_0001.pth.tar')
  torch_files.write_torch(path, mocov3_files.mocov3_checkpoint(state, config, 1, 1e-3))
  return config, state, path


def test_mocov3_checkpoint_resumes_in_main_moco(mocov3_checkpoint_file):
  """main_moco.py --resume: strict load_state_dict, AdamW.load_state_dict, GradScaler, epoch."""
  config, state, path = mocov3_checkpoint_file
  checkpoint = torch.load(path, map_location='cpu')  # weights_only, as torch.load now defaults
  model = DDP(MoCoViT(config))
  model.load_state_dict(checkpoint['state_dict'])  # strict
  adamw = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=0.1)
  adamw.load_state_dict(checkpoint['optimizer'])
  torch.amp.GradScaler('cpu').load_state_dict(checkpoint['scaler'])
  assert checkpoint['epoch'] == 1
  with_state = [p for p in model.parameters() if p in adamw.state]
  assert len(with_state) == sum(p.requires_grad for p in model.parameters()) - 1  # no pos_embed
  for p in with_state:
    assert adamw.state[p]['exp_avg'].shape == p.shape and float(adamw.state[p]['step']) == 2
  # The optimizer state of one tensor, looked up as torch does, is ours converted.
  qkv = model.module.base_encoder.blocks[1].attn.qkv.weight
  mu = mocov3_files._adam_state(state['opt_state'])[1]
  assert_close(adamw.state[qkv]['exp_avg'],
               np.asarray(mu['encoder']['transformer']['block01']['attn']['qkv']['kernel']).T)
  assert_close(model.module.momentum_encoder.head[1].running_var,
               state['ema_batch_stats']['projector']['bn0']['var'])


def test_mocov3_checkpoint_loads_in_main_lincls(mocov3_checkpoint_file):
  """main_lincls.py --pretrained: keeps module.base_encoder.* but its head, loads non-strictly and
  asserts that only the new linear head is missing; the features are then ours."""
  config, state, path = mocov3_checkpoint_file
  state_dict = torch.load(path, map_location='cpu')['state_dict']
  prefix = 'module.base_encoder.'
  kept = {k[len(prefix):]: v for k, v in state_dict.items()
          if k.startswith(prefix) and not k.startswith(prefix + 'head')}
  dims = models_vit.vit_dims(config.model)
  vit = timm.models.VisionTransformer(**dict(timm_vit.timm_kwargs(dims, 16, 'cls'), num_classes=10))
  msg = vit.load_state_dict(kept, strict=False)
  assert set(msg.missing_keys) == {'head.weight', 'head.bias'} and not msg.unexpected_keys
  x = np.random.RandomState(0).randn(2, 16, 16, 3).astype(np.float32)
  encoder = networks.make_modules(config).encoder
  ours = models_vit.pool(encoder.apply({'params': state['params']['encoder']}, x), 'cls')
  theirs = vit.eval().forward_head(vit.forward_features(torch.from_numpy(
      x.transpose(0, 3, 1, 2).copy())), pre_logits=True).detach()
  assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_weight_decay_sets_are_what_each_method_names():
  config = tiny_config('macrl')
  params = networks.init_variables(networks.make_modules(config), config,
                                 jax.random.PRNGKey(0))['params']
  decayed = {jax.tree_util.keystr(p) for p, d in jax.tree_util.tree_leaves_with_path(
      optim.decay_mask(params, 'weights')) if d}
  assert "['encoder']['cls']" in decayed and "['decoder']['mask_token']" in decayed
  assert not any(k.endswith("['bias']") or k.endswith("['scale']") for k in decayed)
  assert all(jax.tree.leaves(optim.decay_mask(params, 'all')))
  assert schema.base_config().optim.decay_params == 'weights'
