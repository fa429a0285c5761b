"""Every fault a user can hit ends in one clear line and loses nothing."""

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, digits_config
from macrl_jax import errors
from macrl_jax.config import checks

MAIN = str(REPO / 'main.py')


def run_main(*args, timeout=300, **kw):
  return subprocess.run([sys.executable, MAIN, *args], capture_output=True, text=True,
                        timeout=timeout, cwd=REPO, **kw)


def one_error_line(proc) -> str:
  """The program failed as a user error: exit 2 and one `error:` line, no traceback."""
  assert proc.returncode == errors.EXIT_USER_ERROR, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


# ----------------------------------------------------------------------------------- config
@pytest.mark.parametrize('args, expected', [
    (['--config=configs/nonexistent.py'],
     'config file configs/nonexistent.py not found; the configs are: configs/cifar10.py'),
    (['--config.no_such_field=1'], 'unknown field config.no_such_field'),
    (['--config.mask_ratio_stron=0.5'],
     'unknown field config.mask_ratio_stron; did you mean config.mask_ratio_strong?'),
    (['--config.optim.base_lrr=1'], 'did you mean config.optim.base_lr?'),
    (['--config=configs/digits.py:method=foo'], "unknown method 'foo'"),
    (['--config.batch_size=abc'], '--config.batch_size=abc'),
])
def test_config_mistakes_end_in_one_line_before_tensorflow_loads(args, expected):
  proc = run_main(*args, '--workdir=/nonexistent/never_made', timeout=120)
  assert expected in one_error_line(proc)
  assert 'tensorflow' not in proc.stderr.lower()


@pytest.mark.parametrize('field, value, expected', [
    ('optim.base_lr', -1.0, 'config.optim.base_lr: -1.0 must be > 0'),
    ('optim.base_lr', float('nan'), 'config.optim.base_lr: nan must be > 0'),
    ('optim.weight_decay', -0.1, 'config.optim.weight_decay: -0.1 must be >= 0'),
    ('optim.warmup_steps', 101, 'must be in [0, total_steps=100]'),
    ('momentum_base', 1.5, 'config.momentum_base: 1.5 is outside [0, 1]'),
    ('optim.b2', 1.0, 'config.optim.b2: 1.0 must be in [0, 1)'),
    ('optim.grad_clip', 0.0, 'config.optim.grad_clip: 0.0 must be > 0'),
    ('checkpoint_every_steps', 0, 'config.checkpoint_every_steps: 0 must be >= 1'),
])
def test_numeric_fields_are_refused_before_compiling(make_config, field, value, expected):
  config = make_config(**{field: value})
  with pytest.raises(errors.UserError) as e:
    checks.validate(config)
  assert expected in str(e.value)


def test_negative_learning_rate_from_the_command_line_is_refused(tmp_path):
  proc = run_main('--config.optim.base_lr=-1', f'--workdir={tmp_path / "wd"}', timeout=300)
  assert 'config.optim.base_lr: -1.0 must be > 0' in one_error_line(proc)
  assert not (tmp_path / 'wd').exists()


# ----------------------------------------------------------------------------------- workdir
def test_workdir_that_is_a_file_or_under_a_file_is_named(digits_dir, tmp_path):
  from macrl_jax.run import train
  a_file = tmp_path / 'file'
  a_file.write_text('')
  with pytest.raises(errors.UserError, match=f'--workdir {a_file} is a file'):
    train.train_and_evaluate(digits_config(digits_dir), str(a_file))
  with pytest.raises(errors.UserError, match=f'cannot write to {a_file}/wd'):
    train.train_and_evaluate(digits_config(digits_dir), str(a_file / 'wd'))


def test_workdir_error_from_the_command_line_is_one_line(tmp_path):
  (tmp_path / 'file').write_text('')
  proc = run_main(f'--workdir={tmp_path / "file"}')
  assert f'--workdir {tmp_path / "file"} is a file' in one_error_line(proc)


def immutable(path):
  """Makes `path` unwritable even for root (chattr +i); skips where the filesystem cannot."""
  if subprocess.run(['chattr', '+i', str(path)], capture_output=True).returncode:
    pytest.skip('chattr +i is not supported here')


def mutable(path):
  subprocess.run(['chattr', '-i', str(path)], capture_output=True)


def test_unwritable_checkpoints_are_refused_before_training(digits_dir, tmp_path):
  from macrl_jax.run import train
  ckpts = tmp_path / 'wd' / 'checkpoints'
  ckpts.mkdir(parents=True)
  immutable(ckpts)
  try:
    with pytest.raises(errors.UserError, match=f'cannot write to {ckpts}'):
      train.train_and_evaluate(digits_config(digits_dir), str(tmp_path / 'wd'))
  finally:
    mutable(ckpts)
  assert not (tmp_path / 'wd' / 'metrics.jsonl').exists()


def test_a_failed_save_stops_the_run_at_once_with_the_reason(digits_dir, tmp_path, monkeypatch):
  import time
  from macrl_jax.run import checkpoint, train, workdirs
  ckpts = tmp_path / 'wd' / 'checkpoints'
  prepare = workdirs.prepare

  def prepare_then_lock(workdir):  # writable at the start, not any more when saving
    prepare(workdir)
    immutable(ckpts)

  monkeypatch.setattr(workdirs, 'prepare', prepare_then_lock)
  start = time.time()
  try:
    with pytest.raises(checkpoint.CheckpointSaveError, match=f'saving a checkpoint to {ckpts} '
                       r'failed \(.*\); the run stopped'):
      train.train_and_evaluate(digits_config(digits_dir, total_steps=8), str(tmp_path / 'wd'))
  finally:
    mutable(ckpts)
  metrics = tmp_path / 'wd' / 'metrics.jsonl'  # a step's row is written after its save
  rows = [json.loads(l) for l in open(metrics)] if metrics.exists() else []
  assert not rows or rows[-1]['step'] <= 4, rows  # stopped at the first or second save
  assert time.time() - start < 240


def test_second_training_in_a_workdir_is_refused_and_a_stale_lock_taken_over(digits_dir, tmp_path):
  import socket
  from macrl_jax.run import train
  workdir = tmp_path / 'wd'
  workdir.mkdir()
  holder = subprocess.Popen(['sleep', '600'])
  try:
    (workdir / 'lock').write_text(json.dumps({'pid': holder.pid, 'host': socket.gethostname()}))
    with pytest.raises(errors.UserError, match=f'workdir {workdir} in use by process '
                       f'{holder.pid} on {socket.gethostname()}'):
      train.train_and_evaluate(digits_config(digits_dir), str(workdir))
    assert not (workdir / 'checkpoints' / '2').exists()
  finally:
    holder.kill()
    holder.wait()
  # The holder is gone: its lock is stale, and is taken over (then released at the end).
  result = train.train_and_evaluate(digits_config(digits_dir), str(workdir))
  assert result['step'] == 8
  assert not (workdir / 'lock').exists()


def test_metrics_rows_after_the_resumed_step_are_dropped(tmp_path):
  from macrl_jax.run import writers
  log = writers.JsonlWriter(str(tmp_path / 'metrics.jsonl'))
  for step in (2, 4, 6, 8):
    log.write_scalars(step, {'loss': 1.0})
  log.truncate_after(4)
  log.write_scalars(6, {'loss': 0.5})
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [2, 4, 6] and rows[-1] == {'loss': 0.5, 'step': 6}


def test_ctrl_c_saves_like_sigterm_then_stops(digits_dir, tmp_path):
  import signal
  import threading
  import time
  from macrl_jax.run import train
  metrics = tmp_path / 'wd' / 'metrics.jsonl'

  def interrupt_after_the_first_log():
    while not (metrics.exists() and metrics.read_text().strip()):
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGINT)

  threading.Thread(target=interrupt_after_the_first_log, daemon=True).start()
  # 40 steps: test_tools.py's tiny run compiles the same program.
  config = digits_config(digits_dir, total_steps=40, log_every_steps=1, checkpoint_every_steps=1000)
  result = train.train_and_evaluate(config, str(tmp_path / 'wd'))
  assert result['preempted'] and result['step'] < 40
  steps = [int(d) for d in os.listdir(tmp_path / 'wd' / 'checkpoints') if d.isdigit()]
  assert steps == [result['step']]


# ----------------------------------------------------------------------------------- out of memory
def test_out_of_memory_names_the_bytes_and_the_fixes(digits_dir, tmp_path, monkeypatch):
  from macrl_jax.methods import build
  from macrl_jax.run import train

  def make_a_step_too_big(*args):
    def step(state, batch):
      raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 30404191616 bytes.')
    return step

  method = build.METHODS['macrl']._replace(make_train_step=make_a_step_too_big)
  monkeypatch.setitem(build.METHODS, 'macrl', method)
  with pytest.raises(errors.UserError) as e:
    train.train_and_evaluate(digits_config(digits_dir), str(tmp_path / 'wd'))
  message = str(e.value)
  assert 'out of memory: the step needs 28.3 GiB' in message
  for fix in ('--config.batch_size', '--config.model.remat=True', 'more devices'):
    assert fix in message


# ----------------------------------------------------------------------------------- tools
def test_tools_never_change_a_workdir_and_name_an_unreadable_step(digits_dir, tmp_path):
  import glob
  from macrl_jax.run import checkpoint, restore, train
  wd = tmp_path / 'wd'
  train.train_and_evaluate(digits_config(digits_dir, checkpoint_every_steps=8), str(wd))
  for f in glob.glob(str(wd / 'checkpoints' / '8' / 'state' / 'd' / '*')):
    os.remove(f)  # torn: its array data is gone
  with pytest.raises(restore.WorkdirError, match='no readable checkpoint'):
    restore.load_workdir(str(wd))
  with pytest.raises(checkpoint.UnreadableCheckpointError) as e:
    restore.load_workdir(str(wd), step=8)
  assert str(e.value).startswith('checkpoint step 8 is unreadable (') and '\n' not in str(e.value)
  # The command line prints that line alone.
  proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'linear_probe.py'),
                         f'--workdir={wd}', '--step=8'], capture_output=True, text=True,
                        timeout=300)
  assert one_error_line(proc).startswith('error: checkpoint step 8 is unreadable (')
  assert (wd / 'checkpoints' / '8').is_dir()
  assert not (wd / 'checkpoints_unreadable').exists()


# ----------------------------------------------------------------------------------- image folders
def write_folder(root, classes=('cat', 'dog'), per_class=3):
  from test_input_pipeline import jpeg
  for i, name in enumerate(classes):
    (root / 'train' / name).mkdir(parents=True, exist_ok=True)
    for j in range(per_class):
      (root / 'train' / name / f'{j}.jpg').write_bytes(jpeg((40 * i, 100, 0), size=(20, 20)))


def folder_config(root, data_dir, **overrides):
  from test_input_pipeline import make_config
  return make_config(f'folder:{root}', str(data_dir), image_size=16, **overrides)


def test_an_edited_image_folder_is_prepared_again(tmp_path):
  from macrl_jax.data import input_pipeline
  root = tmp_path / 'pets'
  write_folder(root)
  c = folder_config(root, tmp_path / 'tfds', num_classes=2)
  assert input_pipeline.num_examples(c, 'train') == 6
  write_folder(root, classes=('cat',), per_class=5)  # two more cats
  assert input_pipeline.num_examples(c, 'train') == 8


def test_num_classes_is_checked_against_the_folder(tmp_path):
  from macrl_jax.data import input_pipeline
  root = tmp_path / 'pets'
  write_folder(root, classes=('cat', 'dog', 'eel'), per_class=1)
  with pytest.raises(errors.UserError, match=r'config.num_classes: 2, .* has 3 classes'):
    input_pipeline.get_builder(folder_config(root, tmp_path / 'tfds', num_classes=2))


def test_every_corrupt_image_is_listed_in_one_message(tmp_path):
  from macrl_jax.data import input_pipeline
  root = tmp_path / 'pets'
  write_folder(root)
  bad = [root / 'train' / 'cat' / 'bad1.jpg', root / 'train' / 'dog' / 'bad2.png']
  for path in bad:
    path.write_bytes(b'not an image')
  with pytest.raises(errors.UserError) as e:
    input_pipeline.get_builder(folder_config(root, tmp_path / 'tfds', num_classes=2))
  assert '2 image(s)' in str(e.value)
  for path in bad:
    assert str(path) in str(e.value)
