"""Every fault a user can hit ends in one clear line and loses nothing."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, digits_config
from macrl_jax import errors, presets

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
    presets.validate(config)
  assert expected in str(e.value)


def test_negative_learning_rate_from_the_command_line_is_refused(tmp_path):
  proc = run_main('--config.optim.base_lr=-1', f'--workdir={tmp_path / "wd"}', timeout=300)
  assert 'config.optim.base_lr: -1.0 must be > 0' in one_error_line(proc)
  assert not (tmp_path / 'wd').exists()
