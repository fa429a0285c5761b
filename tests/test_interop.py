"""PyTorch interoperability: features are equal across the two frameworks, not just loadable.

Every PyTorch file here is made by the test (timm models with random weights, saved in MoCo v3's
and MAE's layouts); nothing is downloaded. Tiny models: width 64, patch 4 on 16 px images.
"""

import functools
import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import REPO, digits_config, run_tool_in_process, tiny_config
from macrl_jax.interop import state_dicts, timm_vit, torch_files
from macrl_jax.methods import networks
from macrl_jax.models import vit as models_vit
from macrl_jax.run import train

# Triton (the GPU compiler the PyPI torch wheel brings, imported by timm through torchvision)
# segfaults when loaded after TensorFlow, which other test modules import; CPU tests never use it.
sys.modules.setdefault('triton', None)
# requirements-interop.txt; without it these tests skip with the reason (CI installs it and checks
# that it imports, so there they run).
timm = pytest.importorskip('timm', reason='the interop tests need pip install -r requirements-interop.txt')
torch = pytest.importorskip('torch', reason='pip install -r requirements-interop.txt')
nn = torch.nn

TOL = 1e-4


def config_for(method='mocov3', **overrides):
  return tiny_config(method, **{'model.depth': 2, **overrides})


def images(config, n=4, seed=0):
  return np.random.RandomState(seed).randn(n, config.image_size, config.image_size, 3).astype(
      np.float32)


def to_torch(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def randomize_jax(variables, seed=0):
  """Every parameter random (LayerNorm scales around 1), so that no mapping error can hide."""
  rs = np.random.RandomState(seed)

  def one(path, x):
    name = jax.tree_util.keystr(path)
    x = np.asarray(x)
    if name.endswith("['var']"):
      return rs.uniform(0.5, 1.5, x.shape).astype(np.float32)
    base = 1.0 if name.endswith("['scale']") else 0.0
    return (base + 0.1 * rs.randn(*x.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(one, variables)


def randomize_torch(module, seed=0):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      base = 1.0 if name.endswith('weight') and p.ndim == 1 else 0.0
      p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    for name, b in module.named_buffers():
      if name.endswith('running_mean'):
        b.copy_(0.1 * torch.randn(b.shape, generator=g))
      elif name.endswith('running_var'):
        b.copy_(0.5 + torch.rand(b.shape, generator=g))
  return module.eval()


def timm_model(config, pool='cls'):
  kwargs = timm_vit.timm_kwargs(models_vit.vit_dims(config.model), config.image_size, pool)
  return timm.models.VisionTransformer(**kwargs)


def moco_mlp(num_layers, input_dim, mlp_dim, output_dim):
  """MoCo v3's `_build_mlp`: (Linear, BN, ReLU) × (L − 1), Linear, BN(affine=False)."""
  layers = []
  for i in range(num_layers):
    dim1 = input_dim if i == 0 else mlp_dim
    dim2 = output_dim if i == num_layers - 1 else mlp_dim
    layers.append(nn.Linear(dim1, dim2, bias=False))
    if i < num_layers - 1:
      layers += [nn.BatchNorm1d(dim2), nn.ReLU(inplace=True)]
    else:
      layers.append(nn.BatchNorm1d(dim2, affine=False))
  return nn.Sequential(*layers)


def moco_sincos(width, grid):
  """MoCo v3's `build_2d_sincos_position_embedding` (row half first), with its zero cls row."""
  gw, gh = torch.meshgrid(torch.arange(grid, dtype=torch.float32),
                          torch.arange(grid, dtype=torch.float32), indexing='ij')
  omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float32) / (width // 4))
  out_w, out_h = torch.einsum('m,d->md', gw.flatten(), omega), torch.einsum('m,d->md', gh.flatten(),
                                                                            omega)
  pe = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], 1)
  return torch.cat([torch.zeros(1, width), pe])[None]


def make_mocov3_file(path, config, seed=0):
  """A MoCo v3 `.pth.tar` ({'state_dict': module.base_encoder/momentum_encoder/predictor}) of
  random timm ViTs; returns the torch modules (online, momentum, predictor)."""
  m, width = config.model, models_vit.vit_dims(config.model)['width']
  grid = config.image_size // models_vit.vit_dims(config.model)['patch_size']
  encoders = []
  for k in range(2):
    vit = timm_model(config)
    vit.head = moco_mlp(3, width, m.proj_hidden, m.proj_dim)
    randomize_torch(vit, seed + k)
    with torch.no_grad():
      vit.pos_embed.copy_(moco_sincos(width, grid))
    encoders.append(vit)
  predictor = randomize_torch(moco_mlp(2, m.proj_dim, m.pred_hidden, m.proj_dim), seed + 2)
  sd = {}
  for name, module in (('base_encoder', encoders[0]), ('momentum_encoder', encoders[1]),
                       ('predictor', predictor)):
    sd.update({f'module.{name}.{k}': v for k, v in module.state_dict().items()})
  torch.save({'epoch': 300, 'arch': 'vit_small', 'state_dict': sd, 'optimizer': {}}, path)
  return encoders[0], encoders[1], predictor


def init_variables(modules, config, rng):
  """models.init_variables as one compiled program (op by op it compiles hundreds)."""
  return jax.jit(lambda r: networks.init_variables(modules, config, r))(rng)


def encoder_features(encoder, params, x, pool='cls'):
  return np.asarray(jax.jit(lambda p, x: models_vit.pool(encoder.apply({'params': p}, x), pool))(
      params, x))


def jax_features(config, variables, x, pool):
  return encoder_features(networks.make_modules(config).encoder, variables['params']['encoder'], x,
                          pool)


def jax_head(head, variables, name, x):
  return np.asarray(jax.jit(lambda v, x: head.apply(v, x, train=False))(
      {'params': variables['params'][name], 'batch_stats': variables['batch_stats'][name]}, x))


def max_diff(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max())


# ------------------------------------------------------------------------------------ export
@pytest.mark.parametrize('pool', ['cls', 'mean'])
def test_exported_encoder_in_timm_gives_the_same_features(pool, tmp_path):
  config = config_for('macrl', **{'model.pool': pool})
  modules = networks.make_modules(config)
  variables = randomize_jax(init_variables(modules, config, jax.random.PRNGKey(0)))
  dims = models_vit.vit_dims(config.model)
  path = str(tmp_path / 'enc.safetensors')
  torch_files.write_safetensors(path, timm_vit.encoder_to_timm(variables['params']['encoder'],
                                                                dims, config.image_size),
                                  timm_vit.timm_kwargs(dims, config.image_size, pool))
  # What the printed lines do: the JSON's kwargs and a strict load.
  import json

  import safetensors.torch
  model = timm.models.VisionTransformer(**json.load(open(torch_files.meta_path(path)))).eval()
  model.load_state_dict(safetensors.torch.load_file(path), strict=True)
  x = images(config)
  with torch.no_grad():
    theirs = model(to_torch(x)).numpy()
  ours = jax_features(config, variables, x, pool)
  print(f'export {pool}: max abs diff {max_diff(ours, theirs):.2e}')
  assert theirs.shape == ours.shape == (4, 64)
  assert max_diff(ours, theirs) <= TOL
  # And back: export → import is exact.
  back = torch_files.load_variables(path, config)
  jax.tree.map(np.testing.assert_array_equal, back['params']['encoder'],
               jax.device_get(variables['params']['encoder']))


def test_export_and_import_of_scanned_blocks_is_exact():
  config = config_for('macrl', **{'model.scan': True})
  modules = networks.make_modules(config)
  variables = randomize_jax(init_variables(modules, config, jax.random.PRNGKey(1)))
  enc = variables['params']['encoder']
  sd = timm_vit.encoder_to_timm(enc, models_vit.vit_dims(config.model), config.image_size)
  assert 'blocks.1.attn.qkv.weight' in sd and 'blocks.2.attn.qkv.weight' not in sd
  back = state_dicts.variables_from_state_dict(sd, config)['params']['encoder']
  jax.tree.map(np.testing.assert_array_equal, back, jax.device_get(enc))


# ------------------------------------------------------------------------------------ MoCo v3
def test_mocov3_file_imports_with_the_same_outputs(tmp_path):
  config = config_for('mocov3')
  path = str(tmp_path / 'moco.pth.tar')
  online, momentum, predictor = make_mocov3_file(path, config)
  modules = networks.make_modules(config)
  x = images(config)
  for which, vit in (('online', online), ('momentum', momentum)):
    variables = torch_files.load_variables(path, config, encoder=which)
    with torch.no_grad():
      feats = vit.forward_head(vit.forward_features(to_torch(x)), pre_logits=True)
      proj = vit.head(feats)
      pred = predictor(proj)
      tokens = vit.forward_features(to_torch(x))
    # MoCo v3's row-first sin-cos is ours with the two channel halves swapped: the encoder's
    # outputs are the file's in that fixed channel order, the projector's are the file's exactly.
    perm = np.concatenate([np.arange(32, 64), np.arange(32)])
    ours_cls = jax_features(config, variables, x, 'cls')
    ours_mean = jax_features(config, variables, x, 'mean')
    d_cls = max_diff(ours_cls, feats.numpy()[:, perm])
    d_mean = max_diff(ours_mean, tokens[:, 1:].mean(1).numpy()[:, perm])
    ours_proj = jax_head(modules.projector, variables, 'projector', ours_cls)
    d_proj = max_diff(ours_proj, proj.numpy())
    print(f'mocov3 {which}: cls {d_cls:.2e} mean {d_mean:.2e} projector {d_proj:.2e}')
    assert max(d_cls, d_mean, d_proj) <= TOL
    if which == 'online':
      d_pred = max_diff(jax_head(modules.predictor, variables, 'predictor', ours_proj), pred.numpy())
      print(f'mocov3 predictor: {d_pred:.2e}')
      assert d_pred <= TOL


def test_mocov3_export_import_is_exact(tmp_path):
  config = config_for('mocov3')
  modules = networks.make_modules(config)
  online = randomize_jax(init_variables(modules, config, jax.random.PRNGKey(0)), 0)
  momentum = randomize_jax(init_variables(modules, config, jax.random.PRNGKey(0)), 1)
  path = str(tmp_path / 'ours.pth.tar')
  sd = state_dicts.mocov3_state_dict(online, momentum, config)
  torch_files.write_torch(path, {'state_dict': sd})
  for which, want in (('online', online), ('momentum', momentum)):
    got = torch_files.load_variables(path, config, encoder=which)
    parts = ['encoder', 'projector'] + (['predictor'] if which == 'online' else [])
    assert sorted(got['params']) == sorted(parts + (['predictor'] if which != 'online' else []))
    for part in parts:
      jax.tree.map(np.testing.assert_array_equal, got['params'][part], want['params'][part])
    jax.tree.map(np.testing.assert_array_equal, got['batch_stats']['projector'],
                 want['batch_stats']['projector'])


# ------------------------------------------------------------------------------------ MAE
def test_mae_file_imports_with_the_same_encoder_and_decoder_outputs(tmp_path):
  config = config_for('mae')
  dims = models_vit.vit_dims(config.model)
  width, dd, p = dims['width'], config.model.decoder_width, dims['patch_size']
  grid = config.image_size // p
  vit = randomize_torch(timm_model(config), 0)
  with torch.no_grad():
    vit.pos_embed.copy_(torch.from_numpy(timm_vit.sincos_with_cls(width, grid)))  # MAE's table
  decoder = nn.ModuleDict(dict(
      decoder_embed=nn.Linear(width, dd),
      decoder_blocks=nn.ModuleList([timm.models.vision_transformer.Block(
          dd, config.model.decoder_heads, 4.0, qkv_bias=True,
          norm_layer=functools.partial(nn.LayerNorm, eps=1e-6)) for _ in range(config.model.decoder_depth)]),
      decoder_norm=nn.LayerNorm(dd, eps=1e-6),
      decoder_pred=nn.Linear(dd, p * p * 3)))
  randomize_torch(decoder, 1)
  mask_token = torch.randn(1, 1, dd) * 0.1
  dec_pos = torch.from_numpy(timm_vit.sincos_with_cls(dd, grid))
  sd = dict(vit.state_dict(), mask_token=mask_token, decoder_pos_embed=dec_pos,
            **decoder.state_dict())
  path = str(tmp_path / 'mae.pth')
  torch.save({'model': sd, 'epoch': 1}, path)
  variables = torch_files.load_variables(path, config)
  assert sorted(variables['params']) == ['decoder', 'encoder']

  # MAE's forward with a random mask, written out in torch, against ours.
  x = images(config)
  n, keep = grid * grid, 4
  mask = models_vit.random_masking(jax.random.PRNGKey(3), len(x), n, 1 - keep / n)
  ids_keep, ids_restore = np.asarray(mask.ids_keep), np.asarray(mask.ids_restore)
  with torch.no_grad():
    t = vit.patch_embed(to_torch(x)) + vit.pos_embed[:, 1:]
    t = torch.gather(t, 1, torch.from_numpy(ids_keep)[..., None].expand(-1, -1, width))
    t = torch.cat([(vit.cls_token + vit.pos_embed[:, :1]).expand(len(x), -1, -1), t], 1)
    latent = vit.norm(vit.blocks(t))
    y = decoder['decoder_embed'](latent)
    fill = mask_token.expand(len(x), n - keep, -1)
    vis = torch.gather(torch.cat([y[:, 1:], fill], 1), 1,
                       torch.from_numpy(ids_restore)[..., None].expand(-1, -1, dd))
    y = torch.cat([y[:, :1], vis], 1) + dec_pos
    for blk in decoder['decoder_blocks']:
      y = blk(y)
    pred = decoder['decoder_pred'](decoder['decoder_norm'](y))[:, 1:]
  modules = networks.make_modules(config)
  ours_latent = jax.jit(modules.encoder.apply)({'params': variables['params']['encoder']}, x,
                                               ids_keep)
  ours_pred = jax.jit(modules.decoder.apply)({'params': variables['params']['decoder']},
                                             ours_latent, ids_restore)
  d_enc, d_dec = max_diff(ours_latent, latent.numpy()), max_diff(ours_pred, pred.numpy())
  print(f'mae: encoder tokens {d_enc:.2e} decoder predictions {d_dec:.2e}')
  assert d_enc <= TOL and d_dec <= TOL


def test_mae_export_import_is_exact(tmp_path):
  """Our encoder and decoder written in MAE's layout (tools/export.py --decoder) read back exactly."""
  config = config_for('mae')
  modules = networks.make_modules(config)
  want = randomize_jax(init_variables(modules, config, jax.random.PRNGKey(0)), 0)
  dims = models_vit.vit_dims(config.model)
  num_patches = (config.image_size // dims['patch_size']) ** 2
  sd = dict(timm_vit.encoder_to_timm(want['params']['encoder'], dims, config.image_size),
            **state_dicts.decoder_to_mae(want['params']['decoder'], num_patches))
  path = str(tmp_path / 'ours.mae.pth')
  torch_files.write_torch(path, {'model': sd})
  got = torch_files.load_variables(path, config)
  for part in ('encoder', 'decoder'):
    jax.tree.map(np.testing.assert_array_equal, got['params'][part], want['params'][part])


# ------------------------------------------------------------------------------------ timm, errors
def test_timm_learned_cls_position_is_folded_into_the_cls_token():
  config = config_for('macrl')
  vit = randomize_torch(timm_model(config), 5)
  width, grid = 64, 4
  with torch.no_grad():
    vit.pos_embed[:, 1:].copy_(torch.from_numpy(models_vit.sincos_2d(width, grid)))
  assert vit.pos_embed[0, 0].abs().max() > 0  # a learned cls position
  sd = {k: v.numpy() for k, v in vit.state_dict().items()}
  variables = state_dicts.variables_from_state_dict(sd, config)
  x = images(config)
  with torch.no_grad():
    theirs = vit(to_torch(x)).numpy()
  assert max_diff(jax_features(config, variables, x, 'cls'), theirs) <= TOL


def test_bad_files_fail_with_a_message_naming_the_problem(tmp_path):
  config = config_for('mocov3')
  path = str(tmp_path / 'moco.pth.tar')
  make_mocov3_file(path, config)

  def fails(match, cfg=config, file=path, **kw):
    with pytest.raises(timm_vit.InteropError, match=match):
      torch_files.load_variables(file, cfg, **kw)

  # Shapes that do not match the config: the tensor, both shapes and the field.
  fails(r'"patch_embed.proj.weight" has shape \(64, 3, 4, 4\) but the config expects '
        r'\(128, 3, 4, 4\); change config.model.width', config_for('mocov3', **{'model.width': 128}))
  fails(r'"patch_embed.proj.weight" .*\(64, 3, 2, 2\); change config.model.variant',
        config_for('mocov3', **{'model.variant': 'mu/2'}))
  fails(r'"blocks.0.mlp.fc1.weight" has shape \(256, 64\) .*\(128, 64\).*config.model.mlp_dim',
        config_for('mocov3', **{'model.mlp_dim': 128}))
  fails(r'file has 2 blocks .*config.model.depth to 2', config_for('mocov3', **{'model.depth': 3}))
  fails(r'"0.weight" has shape \(64, 64\) .*\(32, 64\).*config.model.proj_hidden',
        config_for('mocov3', **{'model.proj_hidden': 32}))
  # Another position-embedding grid: only with the explicit opt-in.
  bigger = config_for('mocov3', image_size=32)
  fails(r'"pos_embed" has shape \(1, 17, 64\) .*expects \(1, 65, 64\).*init_interpolate_pos', bigger)
  assert torch_files.load_variables(path, bigger, interpolate_pos=True)['params']['encoder']
  # Not a state dict; a pickle of something else; an unknown layout; learned position embeddings.
  torch.save([1, 2, 3], str(tmp_path / 'list.pth'))
  fails('not a state dict', file=str(tmp_path / 'list.pth'))
  with open(tmp_path / 'evil.pth', 'wb') as f:
    pickle.dump({'x': config_for}, f)  # unpickling would import and call code
  fails(r'weights_only=True', file=str(tmp_path / 'evil.pth'))
  torch.save({'model': {'fc.weight': torch.zeros(2, 2)}}, str(tmp_path / 'resnet.pth'))
  fails(r'not a ViT state dict of a known layout', file=str(tmp_path / 'resnet.pth'))
  vit = randomize_torch(timm_model(config))
  torch.save(vit.state_dict(), str(tmp_path / 'learned.pth'))
  fails(r'not a fixed 2-D sin-cos table', file=str(tmp_path / 'learned.pth'))
  fails(r'has no momentum encoder', file=str(tmp_path / 'learned.pth'), encoder='momentum')


# ------------------------------------------------------------------------------------ the programs
@pytest.fixture(scope='module')
def mocov3_workdir(digits_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('mocov3'))
  train.train_and_evaluate(digits_config(digits_dir, 'mocov3', total_steps=2,
                                         checkpoint_every_steps=2), workdir)
  return workdir


def test_export_tool_writes_what_timm_loads_strictly(mocov3_workdir, tmp_path):
  from macrl_jax.run import restore
  out = str(tmp_path / 'enc.safetensors')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'export.py'),
                         f'--workdir={mocov3_workdir}', '--params=momentum', f'--out={out}'],
                        capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  code = lines[lines.index('import json, safetensors.torch, timm'):][:2]
  scope = {}
  exec('\n'.join(code), scope)  # the two printed lines, as a user pastes them
  model = scope['model'].eval()
  restored = restore.load_workdir(mocov3_workdir, params='momentum')
  x = images(restored.config)
  ours = encoder_features(restored.modules.encoder, restored.encoder_params, x)
  with torch.no_grad():
    assert max_diff(ours, model(to_torch(x)).numpy()) <= TOL


def test_mimco_runs_with_a_mocov3_file_as_teacher(digits_dir, tmp_path):
  from macrl_jax.run import restore
  config = digits_config(digits_dir, 'mimco', total_steps=4, checkpoint_every_steps=2)
  path = str(tmp_path / 'moco.pth.tar')
  make_mocov3_file(path, config)
  config.teacher.checkpoint = path
  metrics = train.train_and_evaluate(config, str(tmp_path / 'student'))
  assert np.isfinite(metrics['loss'])
  # The teacher carried in the student's checkpoints is the file's momentum encoder and projector.
  state = restore.load_workdir(str(tmp_path / 'student')).state
  want = torch_files.load_variables(path, mimco_teacher_config(config), encoder='momentum',
                                      parts=('encoder', 'projector'))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state['teacher']), want)


def mimco_teacher_config(config):
  from macrl_jax.methods import mimco
  return mimco.teacher_config(config)


def test_init_loads_the_file_into_the_train_state(tmp_path):
  from macrl_jax import sharding
  from macrl_jax.methods import build
  config = config_for('mocov3')
  path = str(tmp_path / 'moco.pth.tar')
  make_mocov3_file(path, config)
  config.init = path
  state = jax.device_get(build.build(config, sharding.make_mesh()).init_state())
  online = torch_files.load_variables(path, config)
  momentum = torch_files.load_variables(path, config, encoder='momentum')
  for part in ('encoder', 'projector', 'predictor'):
    jax.tree.map(np.testing.assert_array_equal, state['params'][part], online['params'][part])
  for part in ('encoder', 'projector'):
    jax.tree.map(np.testing.assert_array_equal, state['ema_params'][part], momentum['params'][part])
  jax.tree.map(np.testing.assert_array_equal, state['ema_batch_stats']['projector'],
               momentum['batch_stats']['projector'])
  # A method without the heads takes the encoder only (and does not check the heads' shapes).
  mae = config_for('mae', init=path, **{'model.proj_hidden': 8})
  state = jax.device_get(build.build(mae, sharding.make_mesh()).init_state())
  jax.tree.map(np.testing.assert_array_equal, state['params']['encoder'], online['params']['encoder'])


def test_tools_evaluate_a_pytorch_file(mocov3_workdir, tmp_path):
  path = str(tmp_path / 'moco.pth.tar')
  from macrl_jax.run import restore
  config = restore.load_config(mocov3_workdir)
  online, _, _ = make_mocov3_file(path, config)
  out = str(tmp_path / 'feats.npz')
  run_tool_in_process('extract_features', f'--workdir={mocov3_workdir}', f'--init={path}',
                      f'--out={out}')
  feats = np.load(out)['features']
  restored = restore.load_init_file(mocov3_workdir, path)
  x = images(config)
  ours = encoder_features(restored.modules.encoder, restored.encoder_params, x)
  perm = np.concatenate([np.arange(32, 64), np.arange(32)])
  with torch.no_grad():
    theirs = online.forward_head(online.forward_features(to_torch(x)), pre_logits=True).numpy()
  assert max_diff(ours, theirs[:, perm]) <= TOL
  assert feats.shape == (360, 64) and np.isfinite(feats).all()


def test_the_core_does_not_import_torch():
  code = ('import sys; from macrl_jax.run import train, teacher, restore, finetune; '
          'from macrl_jax.methods import build; from macrl_jax.interop import timm_vit; '
          'from macrl_jax.evals import features; bad = [m for m in sys.modules if m.split(".")[0] in '
          '("torch", "timm", "safetensors")]; assert not bad, bad')
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
