r"""The macrl train step in PyTorch, written as MAE's and MoCo v3's code write theirs: the reference
that tools/benchmark.py --compare_torch times against ours.

  python benchmarks/torch_step.py --config=configs/cifar100.py --config.batch_size=64 [--compile]

Same model dims, masks, heads, losses, optimizer and EMA as `method=macrl` at the config:
- timm-style pre-norm ViT (LayerNorm eps 1e-6, exact GELU, fused qkv, F.scaled_dot_product_attention)
  that embeds only the visible patches (MAE's gather, here before the patch projection as ours does),
  fixed 2-D sin-cos position embeddings, a cls token, a final norm;
- MAE's decoder (embed, mask tokens unshuffled, sin-cos positions, blocks of width decoder_width,
  prediction of the patch pixels) and its per-patch normalised-pixel loss on the masked patches
  (L1 or MSE as config.rec_loss);
- MoCo v3's projector (3 layers) and predictor (2 layers) with BatchNorm, the last without affine;
  InfoNCE ×2τ over the batch, symmetric over the two views; momentum encoder and projector on the
  whole views (key_mask 'none'), updated as an EMA after the optimizer step;
- AdamW (decoupled weight decay on matmul weights only), the config's learning rate.
It runs on the GPU when PyTorch sees one, else on CPU; with `config.dtype=bfloat16` under bf16
autocast (float32 parameters, bf16 matmuls), as ours.
Prints one JSON line: the median step time and images/s over --steps steps after --warmup.
`compare` times it in turn with our compiled step (tools/benchmark.py --compare_torch,
benchmarks/accelerator_check.py).
Needs the optional requirements (requirements-interop.txt); the product never imports this file.
"""

import copy
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from macrl_jax.errors import UserError  # noqa: E402
from macrl_jax.models import vit  # noqa: E402
from macrl_jax.run.step_timing import time_steps  # noqa: E402


class Attention(nn.Module):

  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, t, d = x.shape
    q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    x = F.scaled_dot_product_attention(q, k, v)
    return self.proj(x.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):

  def __init__(self, dim, heads, mlp_dim):
    super().__init__()
    self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, heads)
    self.fc1, self.fc2 = nn.Linear(dim, mlp_dim), nn.Linear(mlp_dim, dim)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def patchify(images, p):
  """[B, 3, H, W] → [B, N, p·p·3] in (row, col, channel) order, as macrl_jax.models.vit.patchify."""
  b, c, h, w = images.shape
  x = images.reshape(b, c, h // p, p, w // p, p)
  return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


class Encoder(nn.Module):

  def __init__(self, dims, image_size):
    super().__init__()
    self.p, d = dims['patch_size'], dims['width']
    grid = image_size // self.p
    self.embed = nn.Linear(self.p * self.p * 3, d)
    self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
    self.register_buffer('pos', torch.from_numpy(vit.sincos_2d(d, grid)).float()[None])
    self.blocks = nn.ModuleList(Block(d, dims['num_heads'], dims['mlp_dim'])
                                for _ in range(dims['depth']))
    self.norm = nn.LayerNorm(d, eps=1e-6)

  def forward(self, images, ids_keep=None):
    x = patchify(images, self.p)
    pos = self.pos.expand(x.shape[0], -1, -1)
    if ids_keep is not None:
      x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
      pos = torch.gather(pos, 1, ids_keep[..., None].expand(-1, -1, pos.shape[-1]))
    x = self.embed(x) + pos
    x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
    for block in self.blocks:
      x = block(x)
    return self.norm(x)


class Decoder(nn.Module):

  def __init__(self, dims, config, num_patches):
    super().__init__()
    m, d = config.model, config.model.decoder_width
    self.embed = nn.Linear(dims['width'], d)
    self.mask_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
    grid = int(round(math.sqrt(num_patches)))
    self.register_buffer('pos', torch.from_numpy(vit.sincos_2d(d, grid)).float()[None])
    self.blocks = nn.ModuleList(Block(d, m.decoder_heads, 4 * d) for _ in range(m.decoder_depth))
    self.norm = nn.LayerNorm(d, eps=1e-6)
    self.pred = nn.Linear(d, dims['patch_size'] ** 2 * 3)
    self.num_patches = num_patches

  def forward(self, tokens, ids_restore):
    x = self.embed(tokens)
    cls, vis = x[:, :1], x[:, 1:]
    fill = self.mask_token.expand(x.shape[0], self.num_patches - vis.shape[1], -1)
    vis = torch.gather(torch.cat([vis, fill], 1), 1,
                       ids_restore[..., None].expand(-1, -1, x.shape[-1]))
    x = torch.cat([cls, vis + self.pos], 1)
    for block in self.blocks:
      x = block(x)
    return self.pred(self.norm(x))[:, 1:]


def mlp(num_layers, d_in, hidden, d_out):
  """MoCo v3's _build_mlp: (Linear-BN-ReLU)×(L−1), Linear, BN without affine."""
  layers = []
  for i in range(num_layers):
    d1, d2 = d_in if i == 0 else hidden, d_out if i == num_layers - 1 else hidden
    layers.append(nn.Linear(d1, d2, bias=False))
    if i < num_layers - 1:
      layers += [nn.BatchNorm1d(d2), nn.ReLU(inplace=True)]
    else:
      layers.append(nn.BatchNorm1d(d2, affine=False))
  return nn.Sequential(*layers)


class Macrl(nn.Module):

  def __init__(self, config):
    super().__init__()
    self.config = config
    dims = vit.vit_dims(config.model)
    self.num_patches = (config.image_size // dims['patch_size']) ** 2
    m = config.model
    self.encoder = Encoder(dims, config.image_size)
    self.decoder = Decoder(dims, config, self.num_patches)
    self.projector = mlp(3, dims['width'], m.proj_hidden, m.proj_dim)
    self.predictor = mlp(2, m.proj_dim, m.pred_hidden, m.proj_dim)
    self.momentum_encoder = copy.deepcopy(self.encoder)
    self.momentum_projector = copy.deepcopy(self.projector)
    for p in (*self.momentum_encoder.parameters(), *self.momentum_projector.parameters()):
      p.requires_grad = False

  def masking(self, batch, ratio, device):
    keep = vit.num_visible(self.num_patches, ratio)
    noise = torch.rand(batch, self.num_patches, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, self.num_patches, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], ids_restore, torch.gather(mask, 1, ids_restore)

  def reconstruction_loss(self, pred, images, mask):
    target = patchify(images, self.encoder.p)
    if self.config.norm_pix_loss:
      mean, var = target.mean(-1, keepdim=True), target.var(-1, unbiased=False, keepdim=True)
      target = (target - mean) / (var + 1e-6).sqrt()
    err = (pred - target).abs() if self.config.rec_loss == 'l1' else (pred - target) ** 2
    return (err.mean(-1) * mask).sum() / mask.sum()

  def contrastive_loss(self, q, k):
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = q @ k.t() / self.config.temperature
    labels = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, labels) * 2 * self.config.temperature

  def pool(self, tokens):
    return tokens[:, 0] if self.config.model.pool == 'cls' else tokens[:, 1:].mean(1)

  def forward(self, x1, x2):
    c = self.config
    with torch.no_grad():
      keys = [self.momentum_projector(self.pool(self.momentum_encoder(x))) for x in (x1, x2)]
    rec, queries = [], []
    for x, ratio in ((x1, c.mask_ratio_strong), (x2, c.mask_ratio_weak)):
      ids_keep, ids_restore, mask = self.masking(x.shape[0], ratio, x.device)
      z = self.encoder(x, ids_keep)
      rec.append(self.reconstruction_loss(self.decoder(z, ids_restore), x, mask))
      queries.append(self.predictor(self.projector(self.pool(z))))
    loss_rec = sum(rec) / len(rec)
    loss_con = (self.contrastive_loss(queries[0], keys[1])
                + self.contrastive_loss(queries[1], keys[0]))
    return c.lambda_con * loss_con + c.lambda_rec * loss_rec

  @torch.no_grad()
  def update_momentum(self, m):
    for online, ema in ((self.encoder, self.momentum_encoder),
                        (self.projector, self.momentum_projector)):
      for p, q in zip(online.parameters(), ema.parameters()):
        q.mul_(m).add_(p.detach(), alpha=1 - m)


def device() -> str:
  return 'cuda' if torch.cuda.is_available() else 'cpu'


def make_step(config, compile_model: bool = False, compile_backend: str = 'inductor'):
  """Returns (step(x1, x2) -> loss, model): one optimizer step of macrl per call.

  compile_backend='eager' traces the model with torch.compile without generating code (the
  accelerator check's dry run: inductor's first compilation takes minutes on a small CPU).
  """
  torch.manual_seed(config.seed)
  model = Macrl(config).to(device())
  decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1
           and not n.endswith(('cls', 'mask_token'))]
  no_decay = [p for n, p in model.named_parameters() if p.requires_grad and not (
      p.ndim > 1 and not n.endswith(('cls', 'mask_token')))]
  o = config.optim
  optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': o.weight_decay},
                                 {'params': no_decay, 'weight_decay': 0.0}],
                                lr=o.base_lr * config.batch_size / 256, betas=(o.b1, o.b2))
  forward = torch.compile(model, backend=compile_backend) if compile_model else model
  momentum = config.momentum_base
  autocast = torch.autocast(device(), dtype=torch.bfloat16,
                            enabled=config.dtype == 'bfloat16')

  def step(x1, x2):
    with autocast:
      loss = forward(x1, x2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    model.update_momentum(momentum)
    return loss

  return step, model


def time_step(step, config, steps: int, warmup: int) -> list[float]:
  """Wall seconds of `steps` steps after `warmup`, on one fixed random batch."""
  rs = np.random.RandomState(0)
  shape = (config.batch_size, 3, config.image_size, config.image_size)
  x1, x2 = (torch.from_numpy(rs.randn(*shape).astype(np.float32)).to(device()) for _ in range(2))
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    loss = step(x1, x2)
    loss = float(loss.detach())  # waits for the step
    if i >= warmup:
      times.append(time.perf_counter() - start)
  if not math.isfinite(loss):
    raise FloatingPointError(f"the PyTorch step gave loss {loss}")
  return times


def compare(config, step, state, batches, rounds: int, steps: int,
            modes=('eager', 'compile'), compile_backend: str = 'inductor') -> dict:
  """Images/s of our compiled step and of this reference (eager, torch.compile), each timed for
  `steps` steps in turn, `rounds` times, in one process: the ratios are ours / theirs.

  `step` is our compiled step, `batches` an iterator of its batches; `state` is donated.
  """
  builders = {'eager': ('torch eager', lambda: make_step(config)[0]),
              'compile': ('torch.compile', lambda: make_step(
                  config, compile_model=True, compile_backend=compile_backend)[0])}
  unknown = sorted(set(modes) - set(builders))
  if unknown:
    raise UserError(f'--torch_modes: {unknown} are not among {sorted(builders)}')
  runners = {builders[m][0]: builders[m][1]() for m in modes}
  for name, run in runners.items():  # warm-up (torch.compile compiles here)
    time_step(run, config, steps=1, warmup=2)
  times = {'ours': [], **{name: [] for name in runners}}
  for _ in range(rounds):
    walls, state = time_steps(step, state, batches, 1, steps)
    times['ours'] += [t.wall for t in walls]
    for name, run in runners.items():
      times[name] += time_step(run, config, steps=steps, warmup=1)
  rate = {k: config.batch_size / statistics.median(v) for k, v in times.items()}
  ratios = {f'ratio_vs_{k.replace(" ", "_").replace(".", "_")}': round(rate['ours'] / v, 3)
            for k, v in rate.items() if k != 'ours'}
  return dict(images_per_sec={k: round(v, 2) for k, v in rate.items()}, **ratios, rounds=rounds,
              steps_per_round=steps, torch=torch.__version__, torch_device=device(),
              torch_threads=torch.get_num_threads())


def main(argv):
  del argv
  from absl import flags
  config = flags.FLAGS.config
  if config.method != 'macrl':
    raise app.UsageError(f'the PyTorch reference is of method=macrl (got {config.method})')
  step, _ = make_step(config, flags.FLAGS.compile)
  times = time_step(step, config, flags.FLAGS.steps, flags.FLAGS.warmup)
  median = statistics.median(times)
  print(json.dumps(dict(implementation='torch.compile' if flags.FLAGS.compile else 'torch eager',
                        torch=torch.__version__, threads=torch.get_num_threads(),
                        step_ms=round(1e3 * median, 2),
                        images_per_sec=round(config.batch_size / median, 2), steps=len(times))))


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'Config file (method macrl).', lock_config=False)
  flags.DEFINE_bool('compile', False, 'Wrap the model in torch.compile.')
  flags.DEFINE_integer('steps', 10, 'Timed steps (the median is reported).')
  flags.DEFINE_integer('warmup', 3, 'Steps before timing (compilation with --compile).')
  flags.mark_flag_as_required('config')
  app.run(main)
