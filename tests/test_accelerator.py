"""The step's numerics that an accelerator can change (bf16, determinism), and the accelerator
check's dry run.

The tests marked `accelerator` are the ones benchmarks/accelerator_check.py runs on the device
(`pytest -m accelerator`); here they run on CPU like the rest of the suite. None of them imports
TensorFlow, which an accelerator machine may lack.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import REPO, fitting_config, fixed_batch
from macrl_jax import sharding
from macrl_jax.methods import build
from macrl_jax.run import checkpoint
from test_train_step import run_steps

# bf16 keeps 8 bits of mantissa. On the first step both runs start from the same parameters, so the
# losses differ by the forward pass's rounding alone (measured on CPU: under 0.1 %). The runs then
# drift apart by the rounding of each update, more where the step size is large: over 20 steps of
# fitting_config's learning rate, at most 3.6 % on the loss and 5.8 % on the contrastive term
# (CPU). The bounds leave room for an accelerator's own bf16 kernels, not for a broken step.
BF16_FIRST_STEP_RTOL = 0.01
BF16_RTOL = 0.15


@pytest.mark.accelerator
@pytest.mark.slow  # compiles two steps; on the device the check runs it with the marker above
def test_bf16_step_stays_finite_and_near_the_float32_step_over_20_steps():
  config = fitting_config('macrl')  # its float32 program is test_train_step's fitting test's
  _, f32 = run_steps(config, jax.devices()[:1], num_steps=20)
  config.dtype = 'bfloat16'
  _, bf16 = run_steps(config, jax.devices()[:1], num_steps=20)
  for step, (a, b) in enumerate(zip(f32, bf16)):
    for key in ('loss', 'loss_con', 'loss_rec'):
      assert np.isfinite(b[key]), (step, key, b[key])
      rtol = BF16_FIRST_STEP_RTOL if step == 0 else BF16_RTOL
      np.testing.assert_allclose(b[key], a[key], rtol=rtol, err_msg=f'{key}, step {step}')
  first, last = (np.mean([m['loss'] for m in ms]) for ms in (bf16[:3], bf16[-3:]))
  assert last < 0.9 * first, (first, last)  # it learns, as the float32 step does


@pytest.mark.accelerator
def test_a_restored_state_continues_bit_identically(tmp_path):
  """Four steps after restoring a checkpoint equal the same four steps of the run that saved it,
  bit for bit: the state round-trips through Orbax exactly and the step is deterministic on the
  device (a resumed run equals an uninterrupted one; tests/test_train.py checks the whole program
  on the real input pipeline)."""
  config = fitting_config('macrl')  # the program of the test above and of the dry run below
  mesh = sharding.make_mesh(jax.devices()[:1])
  built = build.build(config, mesh)
  batches = [sharding.make_global_batch(fixed_batch(config, seed), mesh) for seed in range(8)]
  state = built.init_state()
  for batch in batches[:4]:
    state, _ = built.step(state, batch)
  mngr = checkpoint.manager(str(tmp_path), async_save=False)
  checkpoint.save(mngr, 4, state, {})
  checkpoint.finish(mngr)
  for batch in batches[4:]:
    state, _ = built.step(state, batch)
  uninterrupted = jax.device_get(state)

  mngr = checkpoint.manager(str(tmp_path), async_save=False, create=False)
  resumed, meta = checkpoint.restore_latest(mngr, built.abstract_state)
  mngr.close()
  assert meta['step'] == 4
  for batch in batches[4:]:
    resumed, _ = built.step(resumed, batch)
  jax.tree.map(np.testing.assert_array_equal, uninterrupted, jax.device_get(resumed))


# What the dry run must report, section by section: a section or figure that goes missing fails.
DRY_RUN_REPORT = {
    'environment': ('platform', 'device_kind', 'device_count', 'versions', 'cpu_count'),
    'numerics': ('tests', 'counts'),
    'macrl_step': ('compile_s', 'step_ms', 'images_per_sec', 'flops_per_step', 'achieved_tflops',
                   'peak_tflops', 'measured_matmul_tflops', 'mfu', 'mfu_vs_measured_matmul',
                   'peak_memory_bytes'),
    'torch': ('images_per_sec', 'ratio_vs_torch_eager', 'ratio_vs_torch_compile'),
    'input': ('prepare_s', 'compile_s', 'input_images_per_sec', 'step_fed_images_per_sec',
              'step_resident_images_per_sec', 'input_keeps_up'),
}


def test_accelerator_check_dry_run_reports_every_section(tmp_path):
  out = tmp_path / 'check.json'
  # With this session's settings (tests/conftest.py) the dry run compiles the programs of the tests
  # above, or finds them in the compilation cache.
  proc = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'accelerator_check.py'),
                         '--dry_run', f'--out={out}'], cwd=REPO, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report['failed_sections'] == [] and report['dry_run']
  assert {k for k, v in report.items() if isinstance(v, dict)} == set(DRY_RUN_REPORT)
  # Without the optional PyTorch requirements the torch section says so and is skipped (CI installs
  # them and checks that they import, so there it runs).
  torch_missing = report['torch'].get('skipped', '').startswith('PyTorch is not installed')
  for section, keys in DRY_RUN_REPORT.items():
    if section == 'torch' and torch_missing:
      continue
    for key in keys:
      value = report[section].get(key)
      assert value not in (None, {}, ''), (section, key, report[section])
      if not isinstance(value, (bool, str, dict)):
        assert value > 0, (section, key, value)
  assert [t['outcome'] for t in report['numerics']['tests'].values()] == ['passed']
  if not torch_missing:
    assert report['torch']['images_per_sec'].keys() == {'ours', 'torch eager', 'torch.compile'}
  for row in ('platform', 'numerics', 'macrl step', 'MFU', 'peak memory', 'torch', 'input'):
    assert f'\n{row} ' in proc.stdout or f'\n  {row} ' in proc.stdout, row
