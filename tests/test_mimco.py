"""MimCo: the patch-level loss, the frozen teacher, and the teacher checks."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, as_a_user_runs_it, digits_config, override
from macrl_jax import sharding
from macrl_jax.methods import build, losses, mimco
from macrl_jax.run import restore, teacher, train


def np_patch_infonce(pred, target, ids_masked, t, negatives):
  pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
  p = np.take_along_axis(pred, ids_masked[..., None], 1)
  q = np.take_along_axis(target, ids_masked[..., None], 1)
  p /= np.linalg.norm(p, axis=-1, keepdims=True)
  q /= np.linalg.norm(q, axis=-1, keepdims=True)
  groups = [(p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1]))] if negatives == 'batch' \
      else list(zip(p, q))
  total, count = 0.0, 0
  for a, b in groups:
    logits = a @ b.T / t
    m = logits.max(1, keepdims=True)
    logz = np.log(np.exp(logits - m).sum(1)) + m[:, 0]
    total += (logz - np.diag(logits)).sum()
    count += len(a)
  return total / count


@pytest.mark.parametrize('negatives', ['image', 'batch'])
def test_patch_infonce_matches_numpy(negatives):
  rs = np.random.RandomState(0)
  pred, target = rs.randn(2, 3, 16, 8).astype(np.float32)
  ids_masked = np.stack([rs.permutation(16)[:12] for _ in range(3)])
  loss, acc = losses.patch_infonce(pred, target, ids_masked, 0.1, negatives)
  np.testing.assert_allclose(loss, np_patch_infonce(pred, target, ids_masked, 0.1, negatives),
                             rtol=1e-5)
  # Perfect predictions at the masked positions find every positive.
  _, acc = losses.patch_infonce(target, target, ids_masked, 0.1, negatives)
  assert acc == 1.0


@pytest.fixture(scope='module')
def teacher_dir(digits_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('teacher'))
  train.train_and_evaluate(digits_config(digits_dir, 'mocov3', total_steps=2), workdir)
  return workdir


def student_config(digits_dir, teacher_dir, **overrides):
  c = digits_config(digits_dir, 'mimco', total_steps=4)
  c.teacher.workdir = teacher_dir
  return override(c, overrides)


def test_teacher_is_frozen_and_gradients_reach_the_student_only(digits_dir, teacher_dir):
  config = student_config(digits_dir, teacher_dir)
  mesh = sharding.make_mesh()  # the program test_mimco_workdir_is_self_contained trains with
  teacher.resolve(config)
  built = build.build(config, mesh)
  state = built.init_state()
  state['teacher'] = jax.device_put(teacher.load(config, mesh), built.shardings['teacher'])
  before = jax.device_get(state)
  assert 'teacher' not in before['opt_state'][0].mu  # no optimizer state for the teacher
  rs = np.random.RandomState(0)
  batch = {'view1': rs.randn(32, 16, 16, 3).astype(np.float32)}

  # d loss / d teacher is exactly zero; d loss / d student is not.
  step_fn = mimco.make_train_step(config, built.modules, built.tx, built.lr_fn)
  grad_teacher = jax.jit(jax.grad(lambda t: step_fn(dict(before, teacher=t), batch)[1]['loss']))(
      before['teacher'])
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grad_teacher))

  for _ in range(3):
    state, metrics = built.step(state, sharding.make_global_batch(batch, mesh))
  after = jax.device_get(state)
  jax.tree.map(np.testing.assert_array_equal, after['teacher'], before['teacher'])  # bit-identical
  for part in ('encoder', 'decoder', 'projector'):  # the student's parts all learn
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b),
                                         after['params'][part], before['params'][part]))
    assert sum(moved) >= 0.9 * len(moved), part
  assert np.isfinite(float(metrics['loss_patch'])) and np.isfinite(float(metrics['loss_img']))


def test_mimco_workdir_is_self_contained(digits_dir, teacher_dir, tmp_path):
  """The student's checkpoint and config.json carry the teacher, so tools need no teacher dir."""
  student = str(tmp_path / 'student')
  config = student_config(digits_dir, teacher_dir)
  result = train.train_and_evaluate(config, student)
  assert result['step'] == 4 and 0 <= result['knn_top1'] <= 1
  import json
  spec = json.load(open(os.path.join(student, 'config.json')))['teacher']['spec']
  assert spec['method'] == 'mocov3' and spec['model']['variant'] == 'mu/4'
  # The student's checkpoint holds the teacher's momentum networks, untouched by the steps.
  saved = jax.device_get(restore.load_workdir(student).state['teacher'])
  jax.tree.map(np.testing.assert_array_equal, saved,
               jax.device_get(teacher.load(config, sharding.make_mesh())))


def test_teacher_trained_with_a_queue_loads_only_what_mimco_needs(digits_dir, tmp_path):
  """The teacher's queue (and optimizer state) are not restored, so their shapes do not matter."""
  teacher_wd = str(tmp_path / 'teacher')
  train.train_and_evaluate(digits_config(digits_dir, 'mocov3', total_steps=2, queue_size=128),
                           teacher_wd)
  config = student_config(digits_dir, teacher_wd)
  result = train.train_and_evaluate(config, str(tmp_path / 'student'))
  assert result['step'] == 4
  loaded = teacher.load(config, sharding.make_mesh())
  assert set(loaded) == {'params', 'batch_stats'} and set(loaded['params']) == {'encoder',
                                                                                'projector'}


def test_a_refused_teacher_leaves_no_student_workdir(digits_dir, teacher_dir, tmp_path):
  config = student_config(digits_dir, teacher_dir, **{'model.variant': 'mu/2'})
  with pytest.raises(ValueError, match='patch size'):
    train.train_and_evaluate(config, str(tmp_path / 'student'))
  assert not (tmp_path / 'student').exists()


def test_teacher_with_another_patch_size_is_refused_naming_both(digits_dir, teacher_dir):
  config = student_config(digits_dir, teacher_dir, **{'model.variant': 'mu/2'})
  with pytest.raises(ValueError, match=r"patch size 4 \(variant 'mu/4'\).*patch size 2 \(variant 'mu/2'\)"):
    teacher.resolve(config)


def test_teacher_errors(digits_dir, teacher_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    teacher.resolve(student_config(digits_dir, str(tmp_path / 'nowhere')))
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'config.json').write_text(open(os.path.join(teacher_dir, 'config.json')).read())
  with pytest.raises(FileNotFoundError, match='has no checkpoint'):
    teacher.resolve(student_config(digits_dir, str(empty)))
  with pytest.raises(ValueError, match='config.image_size'):
    teacher.resolve(student_config(digits_dir, teacher_dir, image_size=32))
  missing = student_config(digits_dir, teacher_dir)
  missing.teacher.workdir = None
  with pytest.raises(ValueError, match='config.teacher.workdir'):
    build.build(missing, sharding.make_mesh())


@pytest.mark.slow
def test_two_stage_recipe_from_the_command_line(tmp_path):
  """Stage 1 mocov3 at the digits default budget, then stage 2 mimco; the student beats random init."""
  from test_train import load_config, random_init_knn, read_jsonl
  env = dict(as_a_user_runs_it(os.environ), TFDS_DATA_DIR=str(tmp_path / 'tfds'))
  teacher, student = tmp_path / 'teacher', tmp_path / 'student'
  for cmd in ([f'--config={REPO}/configs/digits.py:method=mocov3', f'--workdir={teacher}'],
              [f'--config={REPO}/configs/digits.py:method=mimco,teacher={teacher}',
               f'--workdir={student}']):
    proc = subprocess.run([sys.executable, str(REPO / 'main.py'), *cmd], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
  final = read_jsonl(student / 'metrics.jsonl')[-1]['knn_top1']
  config = load_config('digits', f'method=mimco,teacher={teacher}')
  config.data_dir = str(tmp_path / 'tfds')
  chance = random_init_knn(config)
  print(f'mimco on digits: kNN top-1 {final:.3f} (random init {chance:.3f}); teacher '
        f'{read_jsonl(teacher / "metrics.jsonl")[-1]["knn_top1"]:.3f}')
  assert final > chance + 0.02, (final, chance)
