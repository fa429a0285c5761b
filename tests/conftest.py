"""Test-session setup: 8 host CPU devices (set before anything imports jax) and tiny configs."""

import os
import sys
from pathlib import Path

# A long collective timeout: on a loaded 2-core machine one of the 8 device threads can be starved
# past XLA's default 40 s rendezvous limit, which aborts the whole process. And XLA's LLVM IR
# emitters for elementwise code rather than its MLIR ones: without the backend optimizations (below)
# they compile the tests' step in 3.9-4.4 s instead of 6.1-7.0 s, and it runs 1.01-1.08x as long
# (results/perf/xla_cpu_options.json, `unoptimized_legacy_emitters`). The flag is one of the pinned
# jaxlib's; an unknown XLA flag aborts the process.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
                      '--xla_cpu_collective_call_terminate_timeout_seconds=600 '
                      '--xla_cpu_use_fusion_emitters=false')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Many tests compile the same tiny step: share compiled programs across tests and subprocesses.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', '/tmp/macrl_jax_test_jax_cache')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
# The fast tier compiles some ninety programs that take 0.3 s or more (results/perf/
# test_suite_times.json) and runs each for a few steps, so XLA's backend optimizations cost more
# time than they save: off here and in the subprocesses, which inherit it. Compilation takes a
# third less time (results/perf/xla_cpu_options.json). The slow tier runs fully
# optimized: `slow_tests_run_optimized` below turns the optimizations back on for its in-process
# tests (which keep the emitter choice above, fixed when jax starts), and its commands run as a
# user's do (helpers.as_a_user_runs_it: neither setting).
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import subprocess  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

from helpers import MAIN, as_a_user_runs_it, tiny_config  # noqa: E402


@pytest.fixture(autouse=True)
def slow_tests_run_optimized(request):
  if request.node.get_closest_marker('slow') is None:
    yield
    return
  import jax  # noqa: PLC0415 (imported after XLA_FLAGS is set, above)
  before = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', False)
  yield
  jax.config.update('jax_disable_most_optimizations', before)


@pytest.fixture
def make_config():
  return tiny_config


@pytest.fixture(scope='session')
def digits_dir(tmp_path_factory):
  """A TFDS data dir with the digits dataset prepared (from scikit-learn, under a second)."""
  from macrl_jax.config import schema
  from macrl_jax.data import input_pipeline
  data_dir = str(tmp_path_factory.mktemp('tfds_digits'))
  c = schema.base_config()
  c.data_dir = data_dir
  input_pipeline.get_builder(c)
  return data_dir


@pytest.fixture(scope='session')
def default_run(tmp_path_factory):
  """`python main.py` exactly as a new user types it: no flags, one CPU device, fresh data dir.

  Session-scoped, so that test_train.py and test_tools.py share one run (a few minutes).
  """
  cwd = tmp_path_factory.mktemp('new_user')
  env = as_a_user_runs_it(os.environ)
  env['TFDS_DATA_DIR'] = str(cwd / 'tensorflow_datasets')
  start = time.time()
  proc = subprocess.run([sys.executable, MAIN], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=900)
  return dict(proc=proc, seconds=time.time() - start, workdir=cwd / 'workdirs' / 'digits_macrl',
              data_dir=env['TFDS_DATA_DIR'])


# Files whose tests call functions in-process on small arrays; the others train, restore or run
# the programs in subprocesses.
UNIT_FILES = {'test_comparison.py', 'test_flops.py', 'test_imports.py', 'test_losses.py', 'test_models.py',
              'test_prefetch.py', 'test_train_step.py', 'test_input_pipeline.py',
              'test_macrl_variants.py', 'test_study_data.py'}


# Module-scoped runs that several tests of their module share. With `-n 2 --dist loadgroup` the
# tests that use one go to the same worker, so that each run is made once, not once per worker.
SHARED_RUNS = {'macrl_run', 'mae_run', 'teacher_dir', 'mocov3_workdir'}


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: runs the real default command (minutes)')
  config.addinivalue_line('markers', 'unit: in-process, small arrays (seconds)')
  config.addinivalue_line('markers', 'integration: trains, restores or runs a program')
  config.addinivalue_line('markers', 'accelerator: the numerical checks that '
                          'benchmarks/accelerator_check.py runs on a GPU or TPU')


# The longest tests (a minute or more each on two cores) start first, so that the two workers
# finish together instead of one waiting for the other's last long test.
LONGEST = ['test_two_processes_train_like_one',
           'test_ablate_runs_trials_over_seeds_and_budgets_then_skips_them_on_rerun',
           'test_resume_after_sigterm_equals_an_uninterrupted_run',
           'test_ablate_stopped_mid_trial_records_nothing_and_resumes',
           'test_accelerator_check_dry_run_reports_every_section',
           'test_each_config_builds_and_runs_two_steps']


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if item.get_closest_marker('slow') is None:
      unit = item.path.name in UNIT_FILES
      item.add_marker(pytest.mark.unit if unit else pytest.mark.integration)
    if SHARED_RUNS & set(item.fixturenames):
      item.add_marker(pytest.mark.xdist_group(item.path.name))
  rank = {name: i for i, name in enumerate(LONGEST)}
  items.sort(key=lambda item: rank.get(item.originalname, len(LONGEST)))  # stable: the rest in order
