"""tools/benchmark.py runs the real step on synthetic batches without TensorFlow, and reports."""

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, run_tool_in_process, tiny_config
from macrl_jax.methods import flops

TINY = '''
import sys
sys.path.insert(0, {tests!r})
from helpers import tiny_config

def get_config():  # test_train_step's sharded macrl config: its 8-device step is compiled once
  return tiny_config('macrl', queue_size=64, **{{'optim.base_lr': 1e-3}})
'''


def test_synthetic_benchmark_reports_without_tensorflow(tmp_path):
  (tmp_path / 'tiny.py').write_text(TINY.format(tests=str(REPO / 'tests')))
  # A `tensorflow` package that fails to import: --synthetic must not need it.
  (tmp_path / 'tensorflow').mkdir()
  (tmp_path / 'tensorflow' / '__init__.py').write_text('raise ImportError("no TensorFlow here")')
  env = dict(os.environ, PYTHONPATH=str(tmp_path))
  proc = subprocess.run(
      [sys.executable, str(REPO / 'tools' / 'benchmark.py'), f'--config={tmp_path / "tiny.py"}',
       '--synthetic', '--steps=2', '--warmup=1', '--parts', '--peak_size=256'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  for key in ('compile_s', 'step_ms', 'images_per_sec', 'flops_per_step', 'xla_flops_per_step',
              'peak_flops', 'mfu'):
    assert result[key] > 0, key
  # XLA counts all ops, and on 8 devices the replicated work (the optimizer update) 8 times.
  assert 1.0 < result['flops_ratio_xla_over_analytic'] < 1.5
  assert set(result['part_ms']) == {'online_encoder', 'momentum_encoder', 'decoder', 'heads'}
  assert abs(sum(result['breakdown'].values()) - 1.0) < 1e-3
  # On CPU the peak is the fastest matmul run, so that a load which slows the matmul does not
  # inflate the MFU.
  assert result['peak_flops'] == result['measured_matmul_flops_best'] >= result['measured_matmul_flops']
  # The figures agree with each other and with the config: its batch per step, the
  # analytic FLOPs of macrl_jax/methods/flops.py, MFU = FLOPs / step time / peak.
  config = tiny_config('macrl', queue_size=64)
  assert result['images_per_sec'] == pytest.approx(config.batch_size / result['step_ms'] * 1e3,
                                                   rel=1e-3)
  assert result['flops_per_step'] == flops.step_flops(config)['total']
  assert result['mfu'] == pytest.approx(
      result['flops_per_step'] / (result['step_ms'] / 1e3) / result['peak_flops'], abs=1e-4)
  assert result['step_ms_min'] <= result['step_ms'] <= result['step_ms_max']
  assert (result['config']['method'], result['config']['queue_size']) == ('macrl', 64)


def test_input_benchmark_on_mock_data_needs_no_download(tmp_path):
  out = run_tool_in_process('input_benchmark', f'--config={REPO / "configs" / "cifar100.py"}',
                            '--mock=64', '--config.batch_size=16', '--warmup=1', '--batches=2',
                            f'--config.data_dir={tmp_path / "empty"}')
  result = json.loads(out.strip().splitlines()[-1])
  assert result['dataset'] == 'cifar100 (mock_data, 64 random examples)'
  assert result['images_per_sec'] > 0 and result['num_views'] == 2 and result['batch_size'] == 16
