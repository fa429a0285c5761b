"""Whole training steps of mae and mocov3 against the official codes' steps, written out in PyTorch
on the same weights, images and masks: loss, gradient norm, updated parameters, the momentum
encoder and the BatchNorm statistics after two steps (the first at warm-up lr 0, the second not).
"""

import functools
import sys

import jax
import numpy as np
import pytest

from helpers import fitting_config, fixed_batch
from macrl_jax import sharding
from macrl_jax.interop import timm_vit
from macrl_jax.interop.state_dicts import decoder_to_mae
from macrl_jax.methods import build, train_step
from macrl_jax.models import vit as models_vit

sys.modules.setdefault('triton', None)  # see test_interop.py: never needed on CPU
torch = pytest.importorskip('torch', reason='the parity tests compare against PyTorch: '
                            'pip install -r requirements-interop.txt')
timm = pytest.importorskip('timm', reason='pip install -r requirements-interop.txt')
from test_parity import DDP, MoCoViT, assert_close, mae_forward_loss, to_official  # noqa: E402

nn = torch.nn
STEPS = 2


def run_ours(config):
  """(initial params and state, per-step metrics, final state), on one device."""
  mesh = sharding.make_mesh(jax.devices()[:1])
  built = build.build(config, mesh)
  state = built.init_state()
  first = jax.device_get(state)
  metrics = []
  for t in range(STEPS):
    state, m = built.step(state, sharding.make_global_batch(fixed_batch(config, t), mesh))
    metrics.append(jax.device_get(m))
  return first, metrics, jax.device_get(state), built.lr_fn


def torch_images(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def grad_norm(params):
  return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None)))


def assert_params_close(ours: dict, theirs: dict):
  """Within 1e-5 relative, except the weights whose gradient is zero in exact arithmetic
  (helpers.without_gradient_free): Adam's first steps move them by ±lr on rounding noise."""
  for k, p in theirs.items():
    a, b = np.asarray(ours[k]), p.detach().numpy()
    if k.endswith('attn.qkv.bias'):  # the key bias: softmax ignores it
      d = len(a) // 3
      a, b = np.delete(a, np.s_[d:2 * d]), np.delete(b, np.s_[d:2 * d])
    if k.endswith('encoder.norm.bias'):  # mocov3: the projector's BatchNorm removes a shift
      continue
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=k)


# ------------------------------------------------------------------------------------ MAE
class MAE(nn.Module):
  """MAE's MaskedAutoencoderViT forward (timm blocks) with a given mask."""

  def __init__(self, config, sd):
    super().__init__()
    dims, m = models_vit.vit_dims(config.model), config.model
    self.vit = timm.models.VisionTransformer(**timm_vit.timm_kwargs(dims, config.image_size, 'cls'))
    self.decoder_embed = nn.Linear(dims['width'], m.decoder_width)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, m.decoder_width))
    self.decoder_blocks = nn.ModuleList([timm.models.vision_transformer.Block(
        m.decoder_width, m.decoder_heads, 4.0, qkv_bias=True,
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-6)) for _ in range(m.decoder_depth)])
    self.decoder_norm = nn.LayerNorm(m.decoder_width, eps=1e-6)
    self.decoder_pred = nn.Linear(m.decoder_width, dims['patch_size'] ** 2 * 3)
    self.register_buffer('decoder_pos_embed', torch.zeros(sd['decoder_pos_embed'].shape))
    self.patch = dims['patch_size']
    own = {k: torch.from_numpy(v.copy()) for k, v in sd.items()}
    self.load_state_dict({f'vit.{k}' if not k.startswith(('decoder', 'mask_token')) else k: v
                          for k, v in own.items()}, strict=True)
    self.vit.pos_embed.requires_grad = False  # fixed sin-cos, as in MAE

  def forward(self, x, ids_keep, ids_restore, mask):
    vit, n = self.vit, ids_restore.shape[1]
    t = vit.patch_embed(x) + vit.pos_embed[:, 1:]
    t = torch.gather(t, 1, ids_keep[..., None].expand(-1, -1, t.shape[-1]))
    t = torch.cat([(vit.cls_token + vit.pos_embed[:, :1]).expand(len(x), -1, -1), t], 1)
    y = self.decoder_embed(vit.norm(vit.blocks(t)))
    fill = self.mask_token.expand(len(x), n + 1 - y.shape[1], -1)
    vis = torch.gather(torch.cat([y[:, 1:], fill], 1), 1,
                       ids_restore[..., None].expand(-1, -1, y.shape[-1]))
    y = torch.cat([y[:, :1], vis], 1) + self.decoder_pos_embed
    for blk in self.decoder_blocks:
      y = blk(y)
    pred = self.decoder_pred(self.decoder_norm(y))[:, 1:]
    p, h = self.patch, x.shape[2] // self.patch
    target = x.reshape(len(x), 3, h, p, h, p).permute(0, 2, 4, 3, 5, 1).reshape(len(x), h * h, -1)
    return mae_forward_loss(pred, target, mask)


def test_mae_step_matches_the_official_step():
  config = fitting_config('mae')
  first, metrics, final, lr_fn = run_ours(config)
  model = MAE(config, to_official(first['params'], config))
  named = {k if not k.startswith('vit.') else k[4:]: p for k, p in model.named_parameters()
           if p.requires_grad}
  groups = [{'params': [p for k, p in named.items() if p.ndim == 1 or k.endswith('.bias')],
             'weight_decay': 0.0},
            {'params': [p for k, p in named.items() if not (p.ndim == 1 or k.endswith('.bias'))],
             'weight_decay': config.optim.weight_decay}]
  adamw = torch.optim.AdamW(groups, lr=0.0, betas=(config.optim.b1, config.optim.b2), eps=1e-8)
  n = (config.image_size // 4) ** 2
  for t in range(STEPS):
    # The step's mask, drawn as train_step draws it.
    rng = jax.random.fold_in(first['rng'], t)
    mask = models_vit.random_masking(jax.random.fold_in(rng, 0), config.batch_size, n,
                                 config.mask_ratio_strong)
    x = torch_images(fixed_batch(config, t)['view1'])
    loss = model(x, *(torch.from_numpy(np.array(a)) for a in mask))
    loss.backward()
    assert_close(metrics[t]['loss'], loss.item())
    assert_close(metrics[t]['grad_norm'], grad_norm(named.values()))
    for g in adamw.param_groups:
      g['lr'] = float(lr_fn(t))
    adamw.step()
    adamw.zero_grad()
  ours = to_official(final['params'], config)
  assert_params_close(ours, {k: p for k, p in named.items()})


# ------------------------------------------------------------------------------------ MoCo v3
def moco_v3_loss(q, k, temperature):
  """MoCo v3's contrastive_loss on one process."""
  q, k = nn.functional.normalize(q, dim=1), nn.functional.normalize(k, dim=1)
  logits = torch.einsum('nc,mc->nm', q, k) / temperature
  return nn.CrossEntropyLoss()(logits, torch.arange(len(q))) * (2 * temperature)


def test_mocov3_step_matches_the_official_step():
  config = fitting_config('mocov3')
  first, metrics, final, lr_fn = run_ours(config)
  model = MoCoViT(config)
  DDP(model).load_state_dict({f'module.{k}': v for k, v in _moco_state_dict(first, config).items()},
                             strict=True)
  for vit in (model.base_encoder, model.momentum_encoder):
    vit.pos_embed.requires_grad = False
  adamw = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0,
                            betas=(config.optim.b1, config.optim.b2), eps=1e-8,
                            weight_decay=config.optim.weight_decay)
  model.train()
  for t in range(STEPS):
    m = float(train_step.momentum_at(t, config.total_steps, config.momentum_base))
    with torch.no_grad():  # main_moco: the momentum encoder is updated first, with m(t)
      for pb, pm in zip(model.base_encoder.parameters(), model.momentum_encoder.parameters()):
        pm.data = pm.data * m + pb.data * (1. - m)
    batch = fixed_batch(config, t)
    x1, x2 = torch_images(batch['view1']), torch_images(batch['view2'])
    q1, q2 = model.predictor(model.base_encoder(x1)), model.predictor(model.base_encoder(x2))
    with torch.no_grad():
      k1, k2 = model.momentum_encoder(x1), model.momentum_encoder(x2)
    loss = moco_v3_loss(q1, k2, config.temperature) + moco_v3_loss(q2, k1, config.temperature)
    loss.backward()
    assert_close(metrics[t]['loss'], loss.item())
    assert_close(metrics[t]['grad_norm'], grad_norm(model.parameters()), rtol=2e-5)
    for g in adamw.param_groups:
      g['lr'] = float(lr_fn(t))
    adamw.step()
    adamw.zero_grad()
  m = float(train_step.momentum_at(STEPS, config.total_steps, config.momentum_base))
  with torch.no_grad():  # what main_moco does at the start of the next iteration
    for pb, pm in zip(model.base_encoder.parameters(), model.momentum_encoder.parameters()):
      pm.data = pm.data * m + pb.data * (1. - m)
  ours = _moco_state_dict(final, config)
  theirs = model.state_dict()
  params = {k: p for k, p in model.named_parameters() if not k.endswith('pos_embed')}
  assert_params_close(ours, params)
  momentum = {k: theirs[k] for k in theirs if k.startswith('momentum_encoder.')
              and not k.endswith(('num_batches_tracked', 'pos_embed'))}
  assert_params_close(ours, momentum)
  for k in theirs:
    if k.endswith(('running_mean', 'running_var')):
      assert_close(ours[k], theirs[k].numpy(), rtol=1e-5, atol=1e-6)


def _moco_state_dict(state, config):
  from macrl_jax.interop import mocov3_files
  parts = mocov3_files.mocov3_parts(state['params'], state['batch_stats'],
                                           state['ema_params'], state['ema_batch_stats'], config,
                                           steps=int(state['step']) * 2)
  return {f'{part}.{k}': torch.from_numpy(np.array(v)) for part, sd in parts.items()
          for k, v in sd.items()}
