"""The training program: the default command, resume, broken and foreign checkpoints, NaN, configs."""

import functools
import glob
import hashlib
import json
import io
import logging
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from helpers import REPO, SHARED_DATA, digits_config, load_config, override
from macrl_jax import sharding
from macrl_jax.evals import features, knn
from macrl_jax.methods import build
from macrl_jax.run import checkpoint, loop, teacher, train, writers

MAIN = str(REPO / 'main.py')


def flags_of(config_overrides: dict) -> list[str]:
  return [f'--config.{k}={v}' for k, v in config_overrides.items()]


def restore_params(config, workdir, step=None):
  abstract = build.build(config, sharding.make_mesh()).abstract_state
  mngr = checkpoint.manager(workdir)
  state, meta = checkpoint.restore_latest(mngr, abstract, step)
  mngr.close()
  return jax.device_get(state), meta


def random_init_knn(config) -> float:
  mesh = sharding.make_mesh()
  teacher.resolve(config)  # mimco
  built = build.build(config, mesh)
  params = built.init_state()['params']['encoder']
  feats = {split: features.split_features(config, mesh, built.modules.encoder, params, split)
           for split in (config.train_split, config.test_split)}
  return knn.evaluate(*feats[config.train_split], *feats[config.test_split], config.num_classes,
                      config.knn.k, config.knn.temperature)['top1']


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------- the default
@pytest.mark.slow
def test_default_command_writes_the_workdir_and_beats_random_init(default_run):
  proc, workdir = default_run['proc'], default_run['workdir']
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert str(workdir) in proc.stdout
  config = load_config('digits')
  # The workdir layout.
  assert json.load(open(workdir / 'config.json'))['method'] == 'macrl'
  assert glob.glob(str(workdir / 'events.out.tfevents.*'))
  assert os.path.isdir(workdir / 'checkpoints' / str(config.total_steps))
  records = read_jsonl(workdir / 'metrics.jsonl')
  assert records[-1]['step'] == config.total_steps
  for key in ('loss', 'loss_rec', 'loss_con', 'lr', 'momentum', 'images_per_sec', 'knn_top1'):
    assert key in records[-1], key
  # The pre-trained encoder beats the randomly initialised one on the kNN monitor.
  config.data_dir = default_run['data_dir']
  final, chance = records[-1]['knn_top1'], random_init_knn(config)
  print(f'digits default: {default_run["seconds"]:.0f} s, kNN top-1 {final:.3f} '
        f'(random init {chance:.3f})')
  assert final > chance + 0.02, (final, chance)


# ----------------------------------------------------------------------------------- resume
def run_main(workdir, overrides, **kw):
  cmd = [sys.executable, MAIN, '--config=' + str(REPO / 'configs' / 'digits.py'),
         f'--workdir={workdir}'] + flags_of(overrides)
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def tiny_main_overrides(data_dir, total_steps):
  return {'data_dir': data_dir, 'model.width': 32, 'model.depth': 2, 'model.num_heads': 2,
          'model.mlp_dim': 64, 'model.decoder_width': 32, 'model.decoder_depth': 1,
          'model.decoder_heads': 2, 'model.proj_hidden': 64, 'model.pred_hidden': 64,
          'model.proj_dim': 32, 'batch_size': 64, 'total_steps': total_steps,
          'optim.warmup_steps': 2, 'log_every_steps': 1, 'eval_every_steps': 1000,
          'checkpoint_every_steps': 1000, 'knn.eval_batch_size': 64}


@pytest.mark.accelerator
def test_resume_after_sigterm_equals_an_uninterrupted_run(digits_dir, tmp_path):
  total = 40
  overrides = tiny_main_overrides(digits_dir, total)
  config = override(load_config('digits'), overrides)
  train.train_and_evaluate(config, str(tmp_path / 'full'))  # the reference, here: no signal

  stopped = run_main(tmp_path / 'stopped', overrides)
  metrics = tmp_path / 'stopped' / 'metrics.jsonl'
  deadline = time.time() + 300
  while time.time() < deadline and stopped.poll() is None:
    if metrics.exists() and len(read_jsonl(metrics)) >= total // 2:
      break
    time.sleep(0.2)
  stopped.send_signal(signal.SIGTERM)
  out, _ = stopped.communicate(timeout=300)
  assert stopped.returncode == 0, out[-3000:]
  steps = [int(d) for d in os.listdir(tmp_path / 'stopped' / 'checkpoints') if d.isdigit()]
  assert len(steps) == 1 and total // 2 <= steps[0] < total, steps  # saved where it stopped

  resumed = run_main(tmp_path / 'stopped', overrides)
  out, _ = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, out[-3000:]
  # The terminal: a short header, then one compact line per logged step; the absl INFO lines
  # (library notices, clu's progress) go to the log file only.
  lines = out.splitlines()
  assert f'{tmp_path / "stopped"}: resuming from step {steps[0]}' in out, out[-3000:]
  assert [l for l in lines if l.startswith(f'step {total}/{total}  loss ')], out[-3000:]
  assert not [l for l in lines if re.match(r'[IW]\d{4} ', l)], out[-3000:]
  log = (tmp_path / 'stopped' / 'main.INFO').read_text()
  assert f'Resumed from step {steps[0]}' in log and 'steps_per_sec' in log

  a, _ = restore_params(config, str(tmp_path / 'full'))
  b, meta = restore_params(config, str(tmp_path / 'stopped'))
  assert meta['step'] == total
  for part in ('params', 'ema_params', 'opt_state'):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a[part], b[part])


def test_the_terminal_shows_one_line_per_logged_step():
  out = io.StringIO()
  console = writers.ConsoleWriter(total_steps=600, batch_size=128, stream=out)
  console.write_scalars(100, {'loss': 3.5, 'loss_rec': 0.5, 'loss_con': 3.0, 'lr': 1e-3,
                              'images_per_sec': 256.0})
  console.write_scalars(100, {'steps_per_sec': 2.0})  # clu's progress: the log only
  console.write_scalars(600, {'loss': 3.0, 'knn_top1': 0.5})
  assert out.getvalue().splitlines() == [
      'step 100/600  loss 3.5000 (con 3.000, rec 0.500)  256 img/s, 0:04:10 left',
      'step 600/600  loss 3.0000  kNN top-1 50.0 %']


def test_in_training_evaluations_run_at_their_own_periods(digits_dir, tmp_path):
  """config.evals: the held-out reconstruction error every 2 steps, the kNN monitor every 4,
  the pictures off; each lands in metrics.jsonl at its steps, and the error falls as it learns."""
  config = digits_config(digits_dir, total_steps=8, checkpoint_every_steps=8, log_every_steps=2,
                         **{'evals.knn.every_steps': 4, 'evals.masked_mse.every_steps': 2,
                            'evals.masked_mse.num_images': 64, 'evals.reconstruction.every_steps': 0,
                            'optim.base_lr': 1e-2})
  train.train_and_evaluate(config, str(tmp_path / 'wd'))
  rows = read_jsonl(tmp_path / 'wd' / 'metrics.jsonl')
  mse = {r['step']: r['heldout_masked_mse'] for r in rows if 'heldout_masked_mse' in r}
  assert sorted(mse) == [2, 4, 6, 8] and [r['step'] for r in rows if 'knn_top1' in r] == [4, 8]
  assert mse[8] < mse[2], mse


def test_an_unknown_or_misplaced_evaluation_is_a_config_error(digits_dir):
  from macrl_jax.config import checks
  from macrl_jax.errors import UserError
  config = digits_config(digits_dir, 'mocov3', **{'evals.masked_mse.every_steps': 2})
  with pytest.raises(UserError, match='evals.masked_mse.every_steps: method=mocov3 has no pixel '
                                      'decoder'):
    checks.validate(config)
  config = digits_config(digits_dir, **{'evals.knn.every_steps': -1})
  with pytest.raises(UserError, match='evals.knn.every_steps: -1 must be >= 0'):
    checks.validate(config)


# ----------------------------------------------------------------------------------- checkpoints
def tree_digest(path) -> str:
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(path)):
    for name in sorted(files):
      h.update(name.encode())
      h.update(open(os.path.join(root, name), 'rb').read())
  return h.hexdigest()


def test_half_written_checkpoint_is_skipped_and_training_resumes(digits_dir, tmp_path, caplog):
  workdir = str(tmp_path / 'wd')
  config = digits_config(digits_dir)  # 8 steps, a checkpoint every 2
  train.train_and_evaluate(config, workdir)
  ckpts = tmp_path / 'wd' / 'checkpoints'
  assert sorted(int(d) for d in os.listdir(ckpts)) == [2, 4, 6, 8]
  # A crash during the save of step 8: its array data is gone. And one that died before renaming.
  for f in glob.glob(str(ckpts / '8' / 'state' / 'd' / '*')):
    os.remove(f)
  os.makedirs(ckpts / '10.orbax-checkpoint-tmp-1234' / 'state')

  with caplog.at_level(logging.WARNING):
    result = train.train_and_evaluate(config, workdir)  # the same command again
  assert result['step'] == 8
  assert 'Checkpoint step 8 cannot be read' in caplog.text
  steps_logged = [r['step'] for r in read_jsonl(tmp_path / 'wd' / 'metrics.jsonl')]
  assert steps_logged == [2, 4, 6, 8], steps_logged  # step 8 logged again, once, after step 6
  moved = glob.glob(str(tmp_path / 'wd' / 'checkpoints_unreadable' / '8-*'))
  assert moved, 'the unreadable checkpoint is kept aside, not deleted'
  assert 8 in [int(d) for d in os.listdir(ckpts) if d.isdigit()]


def test_a_save_on_cpu_devices_writes_each_array_from_one_device(tmp_path):
  """Orbax's default splits the writing of a replicated array over its replicas, compiling a slice
  program per array and device; on host CPU devices (one shared memory) one device writes it."""
  mesh = sharding.make_mesh()
  # Shapes no other test saves, so that no slice program of them is compiled already.
  state = {name: jax.device_put(np.random.RandomState(i).randn(*shape).astype(np.float32),
                                sharding.replicated(mesh))
           for i, (name, shape) in enumerate({'a': (8, 24), 'b': (40,)}.items())}
  traced = []
  recording = [True]
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, _, **kw: traced.append(name) if recording[0] and name.endswith(
          'jaxpr_trace_duration') else None)
  mngr = checkpoint.manager(str(tmp_path))
  try:
    checkpoint.save(mngr, 1, state, {})
    mngr.wait_until_finished()
  finally:
    recording[0] = False
  assert traced == [], f'the save compiled {len(traced)} programs'
  restored, meta = checkpoint.restore_latest(mngr, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
  mngr.close()
  assert meta['step'] == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))


def test_checkpoint_of_another_model_fails_naming_both_shapes(digits_dir, tmp_path):
  workdir = str(tmp_path / 'wd')
  train.train_and_evaluate(digits_config(digits_dir), workdir)
  before = tree_digest(workdir)
  wider = digits_config(digits_dir, **{'model.width': 128, 'model.mlp_dim': 128})
  with pytest.raises(checkpoint.CheckpointMismatchError) as e:
    train.train_and_evaluate(wider, workdir)
  message = str(e.value)
  assert re.search(r'has shape \(.*64\) there, but the config builds \(.*128\)', message), message
  assert 'Nothing was overwritten' in message
  assert tree_digest(workdir) == before


def test_no_checkpoint_at_a_step_lists_the_available_ones(digits_dir, tmp_path):
  workdir = str(tmp_path / 'wd')
  config = digits_config(digits_dir)
  train.train_and_evaluate(config, workdir)
  with pytest.raises(FileNotFoundError, match=r'available steps: \[2, 4, 6, 8\]'):
    restore_params(config, workdir, step=7)


# A learning rate that overflows the parameters at the first step (one program for both tests).
POISONED = {'total_steps': 48, 'log_every_steps': 4, 'optim.base_lr': 1e30}


def test_non_finite_step_is_refused_and_stops_before_any_eval(digits_dir, tmp_path):
  workdir = str(tmp_path / 'wd')
  # 40 steps: the program of test_tools.py's tiny run.
  train.train_and_evaluate(digits_config(digits_dir, total_steps=40, checkpoint_every_steps=20),
                           workdir)
  before = jax.device_get(restore_params(digits_config(digits_dir), workdir)[0]['params'])
  # A learning rate of 1e30 overflows the parameters at the first step: the step is refused on the
  # device and found at the next log step (44), before the eval of that step.
  poisoned = digits_config(digits_dir, **POISONED, eval_every_steps=44)
  with pytest.raises(loop.NonFiniteLossError) as e:
    train.train_and_evaluate(poisoned, workdir)
  message = str(e.value)
  assert 'non-finite param_norm at step 41 (the step was not applied' in message, message
  assert 'learning rate' in message and 'the last good checkpoint is step 40' in message
  steps = sorted(int(d) for d in os.listdir(tmp_path / 'wd' / 'checkpoints') if d.isdigit())
  assert steps == [20, 40], steps
  logged = [r['step'] for r in read_jsonl(tmp_path / 'wd' / 'metrics.jsonl')]
  assert logged == list(range(2, 41, 2)), logged  # nothing after step 40: no eval
  state, _ = restore_params(poisoned, workdir)
  jax.tree.map(np.testing.assert_array_equal, state['params'], before)


def test_non_finite_without_any_checkpoint_says_so(digits_dir, tmp_path):
  poisoned = digits_config(digits_dir, **POISONED)
  with pytest.raises(loop.NonFiniteLossError, match='there is no checkpoint to go back to'):
    train.train_and_evaluate(poisoned, str(tmp_path / 'wd'))


def test_a_finite_step_is_unchanged_by_the_guard_and_a_bad_one_is_refused(make_config):
  from helpers import fixed_batch
  config = make_config('macrl')
  mesh = sharding.make_mesh(jax.devices()[:1])  # the step of test_train_step's one-device tests
  built = build.build(config, mesh)
  batch = sharding.make_global_batch(fixed_batch(config), mesh)
  state = built.init_state()
  before = jax.device_get(state)
  state, metrics = built.step(state, batch)
  assert float(metrics['skipped']) == 0.0 and int(state['step']) == 1
  bad = dict(batch, view1=batch['view1'] * np.nan)
  after_good = jax.device_get(state)
  state, metrics = built.step(state, bad)
  assert float(metrics['skipped']) == 1.0 and not np.isfinite(float(metrics['loss']))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), after_good)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before['params']),
                                                      jax.tree.leaves(after_good['params'])))


# ----------------------------------------------------------------------------------- configs
# configs/digits.py runs through main.py in the resume test and through tools/ablate.py.
CONFIGS = ['cifar10', 'cifar100', 'tiny_imagenet', 'imagenet100', 'imagenette']


@pytest.mark.parametrize('name', CONFIGS)
def test_each_config_builds_and_runs_two_steps(name, tmp_path, monkeypatch):
  # mock_data swaps the process's file functions for its own while it opens a dataset, which the
  # evaluation after a save does; a save still being written in the background would go there.
  monkeypatch.setattr(checkpoint, 'manager', functools.partial(checkpoint.manager,
                                                               async_save=False))
  config = load_config(name, 'method=macrl')
  patch = int(config.model.variant.split('/')[1])
  override(config, {'model.variant': f'mu/{patch}', 'model.depth': 1, 'model.decoder_depth': 1,
                    'model.proj_hidden': 64, 'model.pred_hidden': 64, 'model.proj_dim': 32,
                    'batch_size': 16, 'total_steps': 2, 'optim.warmup_steps': 1,
                    'log_every_steps': 1, 'eval_every_steps': 2, 'checkpoint_every_steps': 2,
                    'knn.eval_batch_size': 16, 'dtype': 'float32'})
  if name == 'tiny_imagenet':
    tiny = SHARED_DATA / 'tiny-imagenet-10'
    if not tiny.is_dir():
      pytest.skip(f'{tiny} is absent')
    override(config, {'manual_dir': str(tiny), 'num_classes': 10,
                      'data_dir': str(tmp_path / 'tfds')})
  if name == 'imagenet100':
    # Its pre-check wants the archive in the manual dir before mock_data's no-op preparation.
    (tmp_path / 'manual').mkdir()
    (tmp_path / 'manual' / 'ILSVRC2012_img_train.tar').touch()
    # TFDS's mock of ArrayRecord sources has no batched reads; the disk path is tested with a
    # fake archive in test_input_pipeline.py.
    override(config, {'manual_dir': str(tmp_path / 'manual'), 'data_dir': str(tmp_path / 'tfds'),
                      'data.file_format': 'tfrecord'})
  with tfds.testing.mock_data(num_examples=32):
    result = train.train_and_evaluate(config, str(tmp_path / 'wd'))
  assert result['step'] == 2 and np.isfinite(result['loss'])
  assert 0.0 <= result['knn_top1'] <= 1.0
  # Both logged steps have both of macrl's losses; the config that ran is the one written, at this
  # config's image size and patch; its one checkpoint holds the patch embedding of that patch.
  rows = read_jsonl(tmp_path / 'wd' / 'metrics.jsonl')
  assert [r['step'] for r in rows] == [1, 2], rows
  assert all(np.isfinite(r['loss_rec']) and np.isfinite(r['loss_con']) for r in rows), rows
  written = json.loads((tmp_path / 'wd' / 'config.json').read_text())
  assert (written['dataset'], written['image_size'], written['model']['variant']) == (
      config.dataset, config.image_size, f'mu/{patch}')
  assert checkpoint.steps(str(tmp_path / 'wd')) == [2]
  state, _ = restore_params(config, str(tmp_path / 'wd'))
  kernel = state['params']['encoder']['embedding']['kernel']
  assert kernel.shape == (patch * patch * 3, 64), kernel.shape
