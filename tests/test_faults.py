"""Faults made on purpose: torn and unwritable files, a full disk, a second process, signals.

Each ends in one line naming the fix (exit status 2 for a user's mistake) or works, loses nothing
that was saved, and never waits without a deadline: every subprocess runs under a timeout. The fast
tests stop before anything compiles; the ones that train are in the slow tier.
"""

import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

from helpers import MAIN, REPO, as_a_user_runs_it, digits_config, tiny_config
from macrl_jax import errors

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def one_error_line(proc, status=errors.EXIT_USER_ERROR) -> str:
  """The program failed with `status` and one `error:` line, no traceback."""
  assert proc.returncode == status, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


def run_python(code: str, timeout=60, **kw):
  return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        timeout=timeout, cwd=REPO, **kw)


# ----------------------------------------------------------------------------------- the lock
def test_an_old_empty_lock_is_taken_over_at_once(tmp_path):
  from macrl_jax.run import workdirs
  lock = tmp_path / 'lock'
  lock.write_text('')  # what a full disk at start-up left
  os.utime(lock, (time.time() - 60, time.time() - 60))
  start = time.time()
  with workdirs.WorkdirLock(str(tmp_path)):
    assert json.loads(lock.read_text())['pid'] == os.getpid()
  assert time.time() - start < 1 and not lock.exists()


def test_a_new_torn_lock_is_waited_for_then_taken_over(tmp_path, monkeypatch):
  from macrl_jax.run import workdirs
  monkeypatch.setattr(workdirs.WorkdirLock, 'STALE_AFTER_S', 0.5)
  (tmp_path / 'lock').write_text('{"pid": 12')
  start = time.time()
  with workdirs.WorkdirLock(str(tmp_path)):
    pass
  assert 0.4 < time.time() - start < 5


def test_taking_the_lock_gives_up_at_its_deadline_naming_the_file(tmp_path, monkeypatch):
  from macrl_jax.run import workdirs
  monkeypatch.setattr(workdirs.WorkdirLock, 'DEADLINE_S', 0.3)
  monkeypatch.setattr(workdirs.WorkdirLock, '_check_holder', lambda self: time.sleep(0.05))
  (tmp_path / 'lock').write_text('')  # and it never becomes free
  with pytest.raises(errors.UserError, match=f'{tmp_path}/lock could not be taken in 0 s'):
    with workdirs.WorkdirLock(str(tmp_path)):
      pass


def test_a_lock_that_cannot_be_written_leaves_no_lock_behind(tmp_path, monkeypatch):
  from macrl_jax.run import workdirs

  class FullDisk:  # the file is made, the write fails
    def __init__(self, path, mode):
      open(path, mode).close()

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return False

    def write(self, text):
      raise ENOSPC

  monkeypatch.setattr(workdirs, 'open', FullDisk, raising=False)
  with pytest.raises(errors.UserError, match='cannot write .*/lock \\(No space left on device\\)'):
    with workdirs.WorkdirLock(str(tmp_path)):
      pass
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------- config.json
def test_config_json_is_rewritten_by_a_fresh_run_and_kept_by_a_resumed_one(tmp_path, caplog):
  from macrl_jax.run import workdirs
  path = tmp_path / 'config.json'
  workdirs.write_config(tiny_config(num_classes=5), str(tmp_path), fresh=True)
  workdirs.write_config(tiny_config(num_classes=10), str(tmp_path), fresh=True)
  assert json.loads(path.read_text())['num_classes'] == 10
  with caplog.at_level(logging.WARNING):
    workdirs.write_config(tiny_config(num_classes=7), str(tmp_path), fresh=False)
  assert json.loads(path.read_text())['num_classes'] == 10
  assert 'differs from' in caplog.text and 'num_classes' in caplog.text
  path.write_text('{"method": "mac')  # torn
  workdirs.write_config(tiny_config(num_classes=10), str(tmp_path), fresh=False)
  assert json.loads(path.read_text())['num_classes'] == 10


def test_a_failed_check_writes_no_config_json(digits_dir, tmp_path):
  from macrl_jax.run import train
  with pytest.raises(errors.UserError, match='config.num_classes: 5, but dataset'):
    train.train_and_evaluate(digits_config(digits_dir, num_classes=5), str(tmp_path))
  assert not (tmp_path / 'config.json').exists()


def test_a_torn_config_json_is_named_by_the_tools(tmp_path):
  from macrl_jax.run import restore
  (tmp_path / 'config.json').write_text('{"method": ')
  with pytest.raises(restore.WorkdirError, match='config.json cannot be parsed'):
    restore.load_config(str(tmp_path))


# ----------------------------------------------------------------------------------- metrics.jsonl
def test_a_torn_last_row_of_metrics_is_dropped_on_resume(tmp_path):
  from macrl_jax.run import writers
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"loss": 1.0, "step": 2}\n{"loss": 0.9, "step": 4}\n{"loss": 0.8, "st')
  log = writers.JsonlWriter(str(path))
  log.truncate_after(4)
  log.write_scalars(6, {'loss': 0.7})
  assert [json.loads(l)['step'] for l in path.read_text().splitlines()] == [2, 4, 6]


# ----------------------------------------------------------------------------------- evaluation
class FakeManager:
  directory = '/nowhere'

  def all_steps(self):
    return []

  def reached_preemption(self, step):
    return False

  def wait_until_finished(self):
    pass


class ListWriter:
  def __init__(self):
    self.steps = []

  def write_scalars(self, step, scalars):
    self.steps.append(step)


def test_a_failed_evaluation_saves_its_step_first():
  from macrl_jax.run import loop
  saved, writer = [], ListWriter()

  def evaluate(step, state):
    raise RuntimeError('evaluation failed')

  with pytest.raises(RuntimeError, match='evaluation failed'):
    loop.run(lambda state, batch: (state + 1, {'loss': 1.0}), 0, iter(range(100)), start_step=0,
             total_steps=10, every=loop.Every(log=1, checkpoint=5, eval=3), batch_size=1,
             mngr=FakeManager(), save=lambda step, state: saved.append(step), writer=writer,
             hint='', evaluate=evaluate)
  assert saved == [3] and writer.steps == [1, 2, 3]  # its metrics are logged too


def test_a_checkpoint_step_saves_before_it_evaluates():
  from macrl_jax.run import loop
  calls = []
  loop.run(lambda state, batch: (state + 1, {'loss': 1.0}), 0, iter(range(100)), start_step=0,
           total_steps=4, every=loop.Every(log=1, checkpoint=2, eval=2), batch_size=1,
           mngr=FakeManager(), save=lambda step, state: calls.append(('save', step)),
           writer=ListWriter(), hint='', evaluate=lambda step, state: calls.append(('eval', step))
           or {})
  assert calls == [('save', 2), ('eval', 2), ('save', 4), ('eval', 4)]


# ----------------------------------------------------------------------------------- full disk
def test_a_save_that_fails_for_a_full_disk_says_so_in_one_line():
  """Simulated: Orbax raises the full disk deep in a long message (a real one in the slow tier)."""
  from macrl_jax.run import checkpoint

  class Manager(FakeManager):
    def check_for_errors(self):
      try:
        raise ENOSPC
      except OSError as e:
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "params.encoder" in OCDBT database '
                         + 'at local file ' + 'x' * 400) from e

  with pytest.raises(checkpoint.CheckpointSaveError) as e:
    checkpoint.save(Manager(), 2, {}, {})
  assert 'No space left on device' in str(e.value) and '\n' not in str(e.value)
  record = logging.LogRecord('absl', logging.ERROR, '/x/orbax/future.py', 1,
                             'raised an exception: No space left on device', None, None)
  assert checkpoint.is_reported_save_failure(record)


def test_a_full_disk_anywhere_ends_in_one_line():
  proc = run_python('from macrl_jax import errors\n'
                    'def main(argv):\n'
                    '  raise OSError(28, "No space left on device", "/wd/metrics.jsonl")\n'
                    'errors.run(main)')
  assert one_error_line(proc) == (
      'error: No space left on device writing /wd/metrics.jsonl; free disk space, then rerun the '
      'same command (a training resumes from its last checkpoint)')


def test_ctrl_c_before_training_ends_in_one_line():
  proc = run_python('from macrl_jax import errors\n'
                    'def main(argv):\n'
                    '  raise KeyboardInterrupt\n'
                    'errors.run(main)')
  assert 'interrupted (Ctrl-C)' in one_error_line(proc, errors.EXIT_INTERRUPTED)


# ----------------------------------------------------------------------------------- image folders
def write_folder(root, classes=('cat', 'dog'), per_class=2, split='train'):
  from test_input_pipeline import jpeg
  for i, name in enumerate(classes):
    (root / split / name).mkdir(parents=True, exist_ok=True)
    for j in range(per_class):
      (root / split / name / f'{j}.jpg').write_bytes(jpeg((40 * i, 100, 0), size=(20, 20)))


def folder_config(root, data_dir, **overrides):
  fields = {'dataset': f'folder:{root}', 'num_classes': 2, **overrides}
  return digits_config(str(data_dir), **fields)


def test_a_folder_without_the_test_split_is_refused_before_the_first_step(tmp_path):
  from macrl_jax.run import train
  root = tmp_path / 'pets'
  write_folder(root)
  with pytest.raises(errors.UserError,
                     match=f"config.test_split: dataset 'folder:{root}' has no split 'test' "
                           rf"\(its splits: train\); .* or add the folder {root}/test/"):
    train.train_and_evaluate(folder_config(root, tmp_path / 'tfds'), str(tmp_path / 'wd'))
  assert not (tmp_path / 'wd' / 'config.json').exists()
  assert os.listdir(tmp_path / 'wd' / 'checkpoints') == []


def test_an_empty_class_folder_is_refused_naming_it(tmp_path):
  from macrl_jax.data import input_pipeline
  root = tmp_path / 'pets'
  write_folder(root)
  (root / 'train' / 'eel').mkdir()
  with pytest.raises(errors.UserError, match=f'{root}/train/eel: class folder without images'):
    input_pipeline.get_builder(folder_config(root, tmp_path / 'tfds', num_classes=3))


def test_a_split_folder_without_images_is_refused_naming_it(tmp_path):
  from macrl_jax.data import input_pipeline
  root = tmp_path / 'pets'
  write_folder(root)
  (root / 'test' / 'cat').mkdir(parents=True)
  with pytest.raises(errors.UserError, match=f'{root}/test: no images in its class subfolders'):
    input_pipeline.get_builder(folder_config(root, tmp_path / 'tfds'))


def test_a_second_preparation_waits_for_the_first(tmp_path):
  from macrl_jax.data import input_pipeline
  root = tmp_path / 'pets'
  write_folder(root)
  from macrl_jax.data.datasets import image_folder
  config = folder_config(root, tmp_path / 'tfds')
  (tmp_path / 'tfds').mkdir()
  done = []
  # Another process (here: this test) holds the preparation lock of the folder.
  name = f'image_folder_{image_folder.folder_config(str(root)).name}.prepare.lock'
  with open(tmp_path / 'tfds' / name, 'a') as held:
    fcntl.flock(held, fcntl.LOCK_EX)
    worker = threading.Thread(target=lambda: done.append(input_pipeline.get_builder(config)))
    worker.start()
    worker.join(timeout=1)
    assert worker.is_alive() and not done  # waiting for the holder
    fcntl.flock(held, fcntl.LOCK_UN)
  worker.join(timeout=120)
  assert done and done[0].is_prepared()


# ----------------------------------------------------------------------------------- tools
def test_a_tool_prints_its_result_when_the_workdir_cannot_be_written(tmp_path, monkeypatch,
                                                                    capsys, caplog):
  from macrl_jax.run import tool_io

  def read_only(path, result):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

  monkeypatch.setattr(tool_io, 'write_result', read_only)
  with caplog.at_level(logging.WARNING):
    tool_io.report(str(tmp_path / 'eval' / 'knn.json'), {'top1': 0.5}, 'kNN: top-1 50.00 %')
  assert capsys.readouterr().out == 'kNN: top-1 50.00 %\n'
  assert 'could not be written' in caplog.text and 'Permission denied' in caplog.text


def test_the_feature_cache_is_only_a_speed_up(tmp_path, monkeypatch, caplog):
  from macrl_jax.evals import features
  from macrl_jax.run import restore
  restored = restore.Restored(tiny_config(), 8, types.SimpleNamespace(encoder=None), None, None,
                              None, None, str(tmp_path), 'online')
  computed = (np.ones([3, 4], np.float32), np.arange(3, dtype=np.int32))
  monkeypatch.setattr(features, 'split_features', lambda *a: computed)
  path = features.cache_path(restored, 'test', 'cls')
  os.makedirs(os.path.dirname(path))
  with open(path, 'wb') as f:
    f.write(b'PK\x03\x04torn')  # a torn .npz: extracted again
  monkeypatch.setattr(features, 'save', lambda *a, **k: (_ for _ in ()).throw(ENOSPC))
  with caplog.at_level(logging.WARNING):
    feats, labels = features.restored_features(restored, 'test', 'cls')
  assert feats is computed[0] and labels is computed[1]
  assert 'cannot be read' in caplog.text and 'could not be cached' in caplog.text


# ----------------------------------------------------------------------------------- MimCo
def test_a_missing_teacher_file_is_refused_before_anything_loads(make_config, tmp_path):
  from macrl_jax.config import checks
  config = make_config('mimco')
  config.teacher.checkpoint = str(tmp_path / 'vit-s-300ep.pth.tar')
  with pytest.raises(errors.UserError, match='config.teacher.checkpoint: .* does not exist'):
    checks.validate(config)


# ----------------------------------------------------------------------------------- defaults
def test_the_warmup_default_follows_the_length_the_user_set():
  from macrl_jax.config import checks, schema
  file_config = errors.file_config([], str(REPO / 'configs' / 'digits.py'))
  for argv, warmup in ((['--config.total_steps=20'], 2),
                       (['--config.total_steps=1000'], 100),
                       (['--config.total_steps=20', '--config.optim.warmup_steps=5'], 5)):
    config = errors.file_config([], str(REPO / 'configs' / 'digits.py'))
    for arg in argv:
      schema.set_field(config, arg[len('--config.'):].split('=')[0], int(arg.split('=')[1]))
    schema.follow_the_user(config, file_config, errors.overridden_fields(argv))
    assert config.optim.warmup_steps == warmup, argv
    checks.validate(config)
  # Only values the user set can contradict each other.
  config.optim.warmup_steps = 25
  with pytest.raises(errors.UserError, match='optim.warmup_steps: 25 must be in'):
    checks.validate(config)


# =================================================================================== slow tier
def run_main(*args, timeout=600, env=None, **kw):
  env = as_a_user_runs_it(dict(os.environ, **(env or {})))
  return subprocess.run([sys.executable, MAIN, *args], capture_output=True, text=True,
                        timeout=timeout, cwd=REPO, env=env, **kw)


def read_steps(path):
  return [json.loads(l)['step'] for l in open(path)]


@pytest.mark.slow
def test_a_short_run_with_an_empty_lock_left_in_its_workdir(tmp_path):
  """`python main.py --config.total_steps=20`: the warm-up follows, the torn lock is taken over."""
  wd = tmp_path / 'wd'
  wd.mkdir()
  (wd / 'lock').write_text('')
  os.utime(wd / 'lock', (time.time() - 60, time.time() - 60))
  proc = run_main('--config.total_steps=20', f'--workdir={wd}',
                  env={'TFDS_DATA_DIR': str(tmp_path / 'tfds')})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads((wd / 'config.json').read_text())['optim']['warmup_steps'] == 2
  assert read_steps(wd / 'metrics.jsonl')[-1] == 20 and not (wd / 'lock').exists()


@pytest.mark.slow
def test_ctrl_c_during_start_up_ends_in_one_line(tmp_path):
  proc = subprocess.Popen([sys.executable, MAIN, f'--workdir={tmp_path / "wd"}'], cwd=REPO,
                          env=dict(as_a_user_runs_it(os.environ),
                                   TFDS_DATA_DIR=str(tmp_path / 'tfds')),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while not (tmp_path / 'wd' / 'lock').exists() and time.time() < deadline:
    time.sleep(0.05)  # until the workdir is locked: then it prepares the data and compiles
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=120)
  proc.stderr = stderr
  assert 'interrupted (Ctrl-C)' in one_error_line(proc, errors.EXIT_INTERRUPTED)
  assert not (tmp_path / 'wd' / 'lock').exists()


@pytest.mark.slow
def test_two_first_runs_prepare_a_folder_once(tmp_path):
  root = tmp_path / 'pets'
  write_folder(root, per_class=20)
  write_folder(root, per_class=5, split='test')
  command = [sys.executable, str(REPO / 'tools' / 'prepare_dataset.py'),
             '--config=configs/digits.py', f'--config.dataset=folder:{root}',
             '--config.num_classes=2', f'--config.data_dir={tmp_path / "tfds"}']
  procs = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for _ in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_a_full_disk_during_a_save_ends_in_one_line_and_the_rerun_finishes(tmp_path):
  disk = tmp_path / 'disk'
  disk.mkdir()
  mount = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', str(disk)],
                         capture_output=True, text=True)
  if mount.returncode:
    pytest.skip(f'cannot mount a small tmpfs here ({mount.stderr.strip()}); the simulated full '
                'disk of the fast tier covers the message')
  try:
    args = ['--config.total_steps=4', '--config.batch_size=32', '--config.log_every_steps=2',
            '--config.checkpoint_every_steps=2', f'--workdir={disk / "wd"}']
    env = {'TFDS_DATA_DIR': str(tmp_path / 'tfds')}
    line = one_error_line(run_main(*args, env=env))
    assert line.startswith(f'error: saving a checkpoint to {disk}/wd/checkpoints failed (')
    assert 'No space left on device' in line
    subprocess.run(['mount', '-o', 'remount,size=256m', str(disk)], check=True)
    proc = run_main(*args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_steps(disk / 'wd' / 'metrics.jsonl') == [2, 4]
  finally:
    subprocess.run(['umount', str(disk)], capture_output=True)


@pytest.mark.slow
def test_a_failed_evaluation_loses_no_step(digits_dir, tmp_path, monkeypatch):
  from macrl_jax.evals import monitors
  from macrl_jax.run import checkpoint, train

  def knn_fails(*args):
    raise RuntimeError('kNN failed')

  monkeypatch.setattr(monitors.Knn, 'run', knn_fails)
  config = digits_config(digits_dir, eval_every_steps=4, checkpoint_every_steps=1000)
  with pytest.raises(RuntimeError, match='kNN failed'):
    train.train_and_evaluate(config, str(tmp_path / 'wd'))
  assert checkpoint.steps(str(tmp_path / 'wd')) == [4]
  assert read_steps(tmp_path / 'wd' / 'metrics.jsonl') == [2, 4]


@pytest.mark.slow
def test_a_torn_metrics_row_does_not_block_resume(digits_dir, tmp_path):
  from macrl_jax.run import train
  wd = tmp_path / 'wd'
  train.train_and_evaluate(digits_config(digits_dir, total_steps=4), str(wd))
  with open(wd / 'metrics.jsonl', 'a') as f:
    f.write('{"loss": 0.5, "st')  # a crash in the middle of a row
  result = train.train_and_evaluate(digits_config(digits_dir), str(wd))
  assert result['step'] == 8 and read_steps(wd / 'metrics.jsonl') == [2, 4, 6, 8]


@pytest.mark.slow
def test_a_student_resumes_after_its_teacher_moved(digits_dir, tmp_path):
  from macrl_jax.run import train
  teacher_dir = tmp_path / 'teacher'
  train.train_and_evaluate(digits_config(digits_dir, 'mocov3', total_steps=2), str(teacher_dir))
  student = lambda steps: digits_config(digits_dir, 'mimco', total_steps=steps,
                                        **{'teacher.workdir': str(teacher_dir)})
  train.train_and_evaluate(student(4), str(tmp_path / 'student'))
  shutil.move(teacher_dir, tmp_path / 'moved')
  result = train.train_and_evaluate(student(6), str(tmp_path / 'student'))
  assert result['step'] == 6


@pytest.mark.slow
def test_a_tool_on_a_read_only_workdir_prints_its_result(digits_dir, tmp_path):
  from macrl_jax.run import train
  wd = tmp_path / 'wd'
  train.train_and_evaluate(digits_config(digits_dir, total_steps=2), str(wd))
  read_only = tmp_path / 'read_only'
  read_only.mkdir()
  if os.geteuid() != 0:
    shutil.copytree(wd, read_only, dirs_exist_ok=True)
    for dirpath, _, _ in os.walk(read_only):
      os.chmod(dirpath, 0o555)
  else:  # chmod does not stop root: a read-only bind mount does
    bind = subprocess.run(['mount', '--bind', '-o', 'ro', str(wd), str(read_only)],
                          capture_output=True, text=True)
    if bind.returncode:
      pytest.skip(f'running as root and cannot bind-mount read-only ({bind.stderr.strip()})')
  try:
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'knn_eval.py'),
                           f'--workdir={read_only}', f'--data_dir={digits_dir}'],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
  finally:
    if os.geteuid() == 0:
      subprocess.run(['umount', str(read_only)], capture_output=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'kNN (k=20' in proc.stdout and 'could not be written' in proc.stderr
