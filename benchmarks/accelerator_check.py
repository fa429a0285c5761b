r"""Checks and measures an accelerator in one command: what to run when a GPU or TPU is lent.

  python benchmarks/accelerator_check.py              # on the accelerator: at most about 8 minutes
  python benchmarks/accelerator_check.py --dry_run    # every section at tiny shapes on CPU

Sections, in this order. Each records its figures or its error, and the next runs either way; one
that would start with less of the time budget (--budget_s) left than it needs is recorded as
skipped.
- environment: platform, device kind and count, jax/jaxlib/CUDA/driver versions, CPUs.
- numerics: `pytest -m accelerator tests` on the device, each test's outcome: the sharded step
  equals the single-device step (with one accelerator: against 8 host CPU devices), a restored
  state continues bit-identically, the bf16 step stays within a stated tolerance of the float32
  step over 20 steps, the whole program's resume (that one needs TensorFlow). Float32 matmuls run
  at full precision there (GPUs default to TF32, TPUs to bf16 passes; the tolerances are float32's).
- macrl_step: configs/imagenet100.py (macrl, ViT-B/16, 224 px, bf16), --batch_per_device images per
  device, on a device-resident random batch: compile seconds, images/s, model FLOPs, MFU against
  the device's dense bf16 peak (step_timing.VENDOR_PEAK_BF16) and against a bf16 matmul measured
  here, peak device memory.
- torch: benchmarks/torch_step.py, the same step in PyTorch under bf16 autocast, eager and
  torch.compile, timed in turn with ours in this process: images/s and the ratios ours / theirs.
- input: configs/cifar10_study.py fed by the real input pipeline (its image folder, or --data): the
  pipeline's images/s alone on this machine's CPUs, the step's fed by it, and the step's on a
  device-resident batch. The input keeps up when the first is at least the last.

Writes results/accelerator/<device-kind>.json after every section (a run cut short keeps what it
measured), then prints a summary table. Exit status 1 when a section failed or a test did not pass.

--dry_run runs the same sections on CPU at the tests' tiny shapes (tests/helpers.py's config),
on a small generated image folder, with torch.compile's 'eager' backend (it traces but generates no
code: inductor's first compilation takes minutes on a small CPU) and one test of the marker, and
writes to a temporary file unless --out is given. tests/test_accelerator.py runs it, so that the
check still works when a device is lent.
"""

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, 'benchmarks')]
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# JAX takes 75 % of a GPU's memory when it starts unless told otherwise; the pytest process and
# PyTorch's step share the device with this process.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

from absl import flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from macrl_jax import errors, sharding  # noqa: E402
from macrl_jax.data import prefetch  # noqa: E402
from macrl_jax.methods import build, flops  # noqa: E402
from macrl_jax.models import vit  # noqa: E402
from macrl_jax.run.step_timing import (compile_step, input_only_rate, matmul_probe, peak_flops,  # noqa: E402
                                       peak_memory, random_local_batch, repeat, time_steps,
                                       xla_flops)

_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Every section at tiny shapes, on CPU.')
_OUT = flags.DEFINE_string('out', None, 'The JSON file (default: results/accelerator/'
                           '<device-kind>.json; with --dry_run a temporary file).')
_BUDGET_S = flags.DEFINE_integer('budget_s', 480, 'Seconds for the whole check.')
_BATCH_PER_DEVICE = flags.DEFINE_integer('batch_per_device', 256,
                                         'Images per device of the ViT-B/16 step.')
_DATA = flags.DEFINE_string('data', None, 'The CIFAR-10 image folder of the input section '
                            '(default: configs/cifar10_study.py\'s).')

# The test of the `accelerator` marker that the dry run runs (the suite runs them all on CPU).
DRY_RUN_TEST = 'test_a_restored_state_continues_bit_identically'
# Seconds of the budget a section needs to start; the numerics' pytest is stopped after its cap.
NEEDS_S = {'environment': 0, 'numerics': 60, 'macrl_step': 60, 'torch': 30, 'input': 30}
NUMERICS_CAP_S = 240
TORCH_COMPILE_NEEDS_S = 180  # inductor compiles the ViT-B step in a minute or two


# --------------------------------------------------------------------------------------- sections
def environment(check) -> dict:
  device = jax.devices()[0]
  stats = (device.memory_stats() if hasattr(device, 'memory_stats') else None) or {}
  return dict(
      platform=device.platform,
      device_kind=device.device_kind,
      device_count=jax.device_count(),
      process_count=jax.process_count(),
      platform_version=getattr(device.client, 'platform_version', None),
      device_memory_bytes=stats.get('bytes_limit'),
      versions=package_versions(),
      cuda=cuda_versions(),
      nvidia_smi=nvidia_smi(),
      python=platform.python_version(),
      cpu_count=len(os.sched_getaffinity(0)),
      load_avg_1m=round(os.getloadavg()[0], 2),
      xla_flags=os.environ.get('XLA_FLAGS', ''),
      dry_run=check.dry_run,
  )


def package_versions() -> dict:
  names = ('jax', 'jaxlib', 'jax-cuda12-plugin', 'jax-cuda12-pjrt', 'jax-cuda13-plugin',
           'jax-cuda13-pjrt', 'libtpu', 'flax', 'optax', 'orbax-checkpoint', 'ml-collections',
           'numpy', 'torch', 'tensorflow', 'tensorflow-cpu', 'tensorflow-datasets')
  out = {}
  for name in names:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
      out[name] = importlib.metadata.version(name)
  return out


def cuda_versions() -> dict | None:
  """The CUDA runtime, cuDNN and compute capability jaxlib reports (None off CUDA)."""
  try:
    from jax._src.lib import cuda_versions as cv  # pylint: disable=g-import-not-at-top (private)
  except ImportError:
    return None
  if cv is None:
    return None
  out = {}
  for name in ('cuda_runtime_get_version', 'cudnn_get_version', 'cuda_compute_capability'):
    with contextlib.suppress(Exception):  # the names differ between jaxlib versions
      fn = getattr(cv, name)
      out[name] = fn(0) if name == 'cuda_compute_capability' else fn()
  return out


def nvidia_smi() -> str | None:
  if not shutil.which('nvidia-smi'):
    return None
  query = 'name,driver_version,memory.total,clocks.max.sm,power.limit'
  proc = subprocess.run(['nvidia-smi', f'--query-gpu={query}', '--format=csv,noheader'],
                        capture_output=True, text=True, timeout=30, check=False)
  return proc.stdout.strip() or proc.stderr.strip()


def numerics(check) -> dict:
  """`pytest -m accelerator tests` in a subprocess; each test's outcome."""
  env = dict(os.environ)
  if not check.dry_run:
    # Compiled as a user's programs are, not as the CPU suite's (tests/conftest.py: its XLA flags
    # are CPU ones), and the 8 host CPU devices the sharded test compares one accelerator with.
    env.update(XLA_FLAGS='', JAX_NUM_CPU_DEVICES='8', JAX_DISABLE_MOST_OPTIMIZATIONS='0',
               JAX_DEFAULT_MATMUL_PRECISION='highest')
  tests = f'tests/test_accelerator.py::{DRY_RUN_TEST}' if check.dry_run else 'tests'
  cmd = [sys.executable, '-m', 'pytest', '-v', '-rfE', '-p', 'no:cacheprovider', '-m',
         'accelerator', '--continue-on-collection-errors', tests]
  timeout = max(10, min(NUMERICS_CAP_S, check.left() - 120)) if not check.dry_run else None
  try:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    output, returncode = proc.stdout + proc.stderr, proc.returncode
  except subprocess.TimeoutExpired as e:
    output, returncode = (e.stdout or b'').decode(errors='replace'), f'timed out after {timeout} s'
  outcomes = outcomes_of(output)
  tests = {k: v for k, v in outcomes.items() if '::' in k}
  # A module that cannot be imported (no TensorFlow on the machine) may hold marked tests.
  not_collected = {k: v['message'] for k, v in outcomes.items() if '::' not in k}
  counts = {k: sum(1 for t in tests.values() if t['outcome'] == k) for k in
            sorted({t['outcome'] for t in tests.values()})}
  return dict(command=' '.join(['python'] + cmd[1:]), returncode=returncode, counts=counts,
              tests=tests, modules_not_collected=not_collected,
              all_passed=bool(tests) and set(counts) == {'passed'} and not not_collected,
              output_tail=output[-4000:])


def outcomes_of(output: str) -> dict:
  """{test id or module: {outcome, message}} from pytest's -v lines and its -rfE summary."""
  tests = {}
  for line in output.splitlines():
    m = re.match(r'(tests/\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b', line)
    if m:
      tests[m.group(1)] = dict(outcome=m.group(2).lower(), message=None)
    m = re.match(r'(FAILED|ERROR) (tests/\S+)(?: - (.*))?$', line)
    if m:  # a failure's reason, or a module that could not be collected
      tests.setdefault(m.group(2), dict(outcome=m.group(1).lower(), message=None))
      tests[m.group(2)]['message'] = (m.group(3) or '')[:500]
  return tests


def macrl_step(check) -> dict:
  """The bf16 ViT-B/16 224 px macrl step on a device-resident batch."""
  config = load_config('imagenet100', 'method=macrl')
  config.batch_size = _BATCH_PER_DEVICE.value * len(check.devices)
  if check.dry_run:
    config = tiny(config)
  mesh = sharding.make_mesh(check.devices)
  built = build.build(config, mesh)
  state = built.init_state()
  batches = repeat(sharding.make_global_batch(random_local_batch(config), mesh))
  compiled, compile_s = compile_step(built.step, state, next(batches))

  device = jax.devices()[0]
  n = 256 if check.dry_run else 8192
  probe = matmul_probe(device, n)  # bf16 off CPU
  probes = [probe() for _ in range(check.repeats)]
  times, state = time_steps(compiled, state, batches, check.warmup, check.steps)
  probes += [probe() for _ in range(check.repeats)]
  step_s = statistics.median(t.wall for t in times)
  model_flops = flops.step_flops(config)['total']
  xla = xla_flops(compiled, mesh.size)
  peak = peak_flops(device, n, probes)
  memory, memory_kind = peak_memory(device)
  check.shared.update(config=config, step=compiled, state=state, batches=batches)
  return dict(
      config=describe(config),
      compile_s=round(compile_s, 2),
      step_ms=round(1e3 * step_s, 2),
      steps=len(times),
      images_per_sec=round(config.batch_size / step_s, 1),
      flops_per_step=model_flops,
      xla_flops_per_step=xla,
      achieved_tflops=round(model_flops / step_s / 1e12, 3),
      peak_tflops=round(peak['peak_flops'] / 1e12, 3),
      peak_source=peak['peak_source'],
      measured_matmul_tflops=round(peak['measured_matmul_flops'] / 1e12, 3),
      matmul_size=n,
      mfu=round(model_flops / step_s / peak['peak_flops'], 4),
      mfu_vs_measured_matmul=round(model_flops / step_s / peak['measured_matmul_flops'], 4),
      peak_memory_bytes=memory,
      peak_memory_kind=memory_kind,
  )


def torch_section(check) -> dict:
  """benchmarks/torch_step.py's step (bf16 autocast), eager and compiled, in turn with ours."""
  try:
    import torch_step  # pylint: disable=g-import-not-at-top (needs requirements-interop.txt)
  except ImportError as e:
    return dict(skipped=f'PyTorch is not installed ({e}): pip install -r requirements-interop.txt')
  if 'step' not in check.shared:
    raise RuntimeError('the macrl_step section did not build the step to compare with')
  if not check.dry_run and torch_step.device() == 'cpu':  # a TPU: PyTorch would time the host CPU
    return dict(skipped=f'PyTorch sees no GPU here; ours runs on {jax.devices()[0].platform}')
  modes = ['eager', 'compile']
  if not check.dry_run and check.left() < TORCH_COMPILE_NEEDS_S:
    modes = ['eager']
  s = check.shared
  out = torch_step.compare(s['config'], s['step'], s['state'], s['batches'],
                           rounds=1 if check.dry_run else 3, steps=check.steps // 2 or 1,
                           modes=modes, compile_backend='eager' if check.dry_run else 'inductor')
  check.shared.clear()  # the state was donated to the steps timed there
  if 'compile' not in modes:
    out['torch_compile'] = f'not timed: under {TORCH_COMPILE_NEEDS_S} s of the budget were left'
  return out


def input_section(check) -> dict:
  """The CIFAR-10 study config's step fed by the real input pipeline, against the pipeline alone."""
  from macrl_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top (TensorFlow)
  config = load_config('cifar10_study', 'method=macrl')
  if _DATA.value:
    config.dataset = 'folder:' + os.path.abspath(_DATA.value)
  if check.dry_run:
    config.dataset = 'folder:' + small_image_folder(os.path.join(check.tmp, 'images'), classes=2)
    config.num_classes = 2
    config.data_dir = os.path.join(check.tmp, 'tfds')
    config = tiny(config)
  start = time.perf_counter()
  input_pipeline.get_builder(config)  # prepares the folder on first use
  prepare_s = time.perf_counter() - start
  input_rate, iterator = input_only_rate(config, batches=check.steps)

  mesh = sharding.make_mesh(check.devices)
  built = build.build(config, mesh)
  fed = prefetch.prefetch_to_mesh(iterator, mesh, size=2)
  first = next(fed)
  state = built.init_state()
  compiled, compile_s = compile_step(built.step, state, first)
  fed_times, state = time_steps(compiled, state, fed, check.warmup, check.steps)
  resident, _ = time_steps(compiled, state, repeat(first), check.warmup, check.steps)
  rate = lambda times: config.batch_size / statistics.median(t.wall for t in times)
  return dict(
      config=describe(config),
      prepare_s=round(prepare_s, 2),
      compile_s=round(compile_s, 2),
      input_images_per_sec=round(input_rate, 1),
      step_fed_images_per_sec=round(rate(fed_times), 1),
      step_resident_images_per_sec=round(rate(resident), 1),
      input_keeps_up=bool(input_rate >= rate(resident)),
      cpu_count=len(os.sched_getaffinity(0)),
  )


SECTIONS = {'environment': environment, 'numerics': numerics, 'macrl_step': macrl_step,
            'torch': torch_section, 'input': input_section}


# --------------------------------------------------------------------------------------- configs
def load_config(name: str, arg: str | None = None):
  """configs/<name>.py's get_config(arg), as `--config=configs/<name>.py:<arg>` loads it."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny(config):
  """The tests' tiny model and schedule (tests/helpers.py's fitting_config) with `config`'s method,
  dtype and data: the suite compiles the same float32 and bf16 steps (tests/test_accelerator.py),
  so that a dry run after it finds them in the compilation cache."""
  sys.path.insert(0, os.path.join(REPO, 'tests'))
  from helpers import fitting_config  # pylint: disable=g-import-not-at-top
  return fitting_config(config.method, dtype=config.dtype, dataset=config.dataset,
                        data_dir=config.data_dir, train_split=config.train_split,
                        test_split=config.test_split, num_classes=config.num_classes)


def small_image_folder(root: str, classes: int, per_class: int = 16) -> str:
  """train/ and test/ folders of random 16 px JPEGs, in the layout of ../shared/data/cifar10."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rs = np.random.RandomState(0)
  for split, n in (('train', per_class), ('test', 2)):
    for c in range(classes):
      os.makedirs(os.path.join(root, split, f'class{c}'), exist_ok=True)
      for i in range(n):
        pixels = rs.randint(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, split, f'class{c}', f'{i}.jpg'))
  return root


def describe(config) -> dict:
  dims = vit.vit_dims(config.model)
  return dict(method=config.method, dataset=config.dataset, image_size=config.image_size,
              variant=config.model.variant, width=dims['width'], depth=dims['depth'],
              batch_size=config.batch_size, dtype=config.dtype)


# --------------------------------------------------------------------------------------- the run
class Check:
  """The run's settings, its time budget, and what one section hands the next."""

  def __init__(self, dry_run: bool, budget_s: float, tmp: str):
    self.dry_run, self.tmp = dry_run, tmp
    self.deadline = time.monotonic() + budget_s
    self.warmup, self.steps, self.repeats = (1, 2, 2) if dry_run else (3, 20, 10)
    # The dry run's steps are the suite's single-device ones (tiny); on the accelerator, all devices.
    self.devices = jax.devices()[:1] if dry_run else jax.devices()
    self.shared = {}

  def left(self) -> float:
    return self.deadline - time.monotonic()


def run_section(check: Check, name: str) -> dict:
  start = time.monotonic()
  if check.left() < NEEDS_S[name]:
    out = dict(skipped=f'{max(0, check.left()):.0f} s of the budget left; it needs '
                       f'{NEEDS_S[name]} s')
  else:
    try:
      out = SECTIONS[name](check)
    except Exception as e:  # noqa: BLE001 - recorded; the other sections still run
      out = dict(error=f'{type(e).__name__}: {e}'[:2000],
                 traceback=traceback.format_exc()[-3000:])
  out['seconds'] = round(time.monotonic() - start, 1)
  return out


def default_out(device_kind: str) -> str:
  name = re.sub(r'[^a-z0-9]+', '-', device_kind.lower()).strip('-')
  return os.path.join(REPO, 'results', 'accelerator', f'{name}.json')


def write(report: dict, path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    json.dump(report, f, indent=1, default=str)
  os.replace(path + '.tmp', path)


def summary(report: dict) -> list[tuple[str, str]]:
  rows = []
  env = report['environment']
  if 'error' not in env and 'skipped' not in env:
    v = env['versions']
    cuda = env['cuda'] or {}
    rows.append(('platform', f'{env["platform"]}: {env["device_count"]} × {env["device_kind"]}; '
                 f'jax {v.get("jax")}, jaxlib {v.get("jaxlib")}'
                 + (f', CUDA runtime {cuda.get("cuda_runtime_get_version")}' if cuda else '')
                 + f'; {env["cpu_count"]} CPUs'))
    if env['nvidia_smi']:
      rows.append(('nvidia-smi', env['nvidia_smi'].splitlines()[0]))
  n = report['numerics']
  if 'counts' in n:
    rows.append(('numerics', ', '.join(f'{c} {k}' for k, c in n['counts'].items())
                 + f' (pytest -m accelerator, {n["seconds"]} s)'))
    rows += [(f'  {k.split("::")[-1]}',
              t['outcome'] + (f': {t["message"]}' if t['message'] else ''))
             for k, t in n['tests'].items()]
    rows += [(f'  {k}', f'not collected: {v}') for k, v in n['modules_not_collected'].items()]
  m = report['macrl_step']
  if 'images_per_sec' in m:
    c = m['config']
    rows.append(('macrl step', f'{c["variant"]} {c["image_size"]} px {c["dtype"]}, batch '
                 f'{c["batch_size"]}: compile {m["compile_s"]} s, '
                 f'{m["images_per_sec"]:,} images/s'))
    rows.append(('  MFU', f'{100 * m["mfu"]:.1f} % of {m["peak_tflops"]} TFLOP/s '
                 f'({m["peak_source"]}); {100 * m["mfu_vs_measured_matmul"]:.1f} % of the '
                 f'measured matmul, {m["measured_matmul_tflops"]} TFLOP/s'))
    rows.append(('  peak memory', f'{m["peak_memory_bytes"] / 2**30:.2f} GiB '
                 f'({m["peak_memory_kind"]})'))
  t = report['torch']
  if 'images_per_sec' in t:
    rows.append(('torch', ', '.join(f'{k} {v:,} images/s' for k, v in t['images_per_sec'].items())
                 + '; ours / theirs: ' + ', '.join(f'{k[9:]} {v}' for k, v in t.items()
                                                    if k.startswith('ratio_vs_'))))
  i = report['input']
  if 'input_images_per_sec' in i:
    rows.append(('input', f'{i["config"]["dataset"].split("/")[-1]}: pipeline alone '
                 f'{i["input_images_per_sec"]:,} images/s on {i["cpu_count"]} CPUs; step fed by it '
                 f'{i["step_fed_images_per_sec"]:,}, on a resident batch '
                 f'{i["step_resident_images_per_sec"]:,}: input '
                 + ('keeps up' if i['input_keeps_up'] else 'is the bottleneck')))
  for name in SECTIONS:
    for problem in ('error', 'skipped'):
      if problem in report[name]:
        rows.append((name, f'{problem.upper()}: {report[name][problem].splitlines()[0][:300]}'))
  return rows


def main(argv):
  del argv
  dry_run = _DRY_RUN.value
  if dry_run:  # tiny programs run for a few steps: XLA's optimizations cost more than they save
    jax.config.update('jax_disable_most_optimizations', True)
  start = time.monotonic()
  with tempfile.TemporaryDirectory() as tmp:
    check = Check(dry_run, _BUDGET_S.value, tmp)
    device = jax.devices()[0]
    out = _OUT.value or (os.path.join(tempfile.mkdtemp(), 'accelerator_check_dry_run.json')
                         if dry_run else default_out(device.device_kind))
    report = dict(device_kind=device.device_kind, dry_run=dry_run, budget_s=_BUDGET_S.value,
                  started=time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()))
    for name in SECTIONS:
      print(f'--- {name} ({time.monotonic() - start:.0f} s in)', flush=True)
      report[name] = run_section(check, name)
      report['seconds'] = round(time.monotonic() - start, 1)
      write(report, out)
  failed = [name for name in SECTIONS if 'error' in report[name]]
  if 'tests' in report['numerics'] and not report['numerics']['all_passed']:
    failed.append('numerics (tests)')
  report['failed_sections'] = failed
  report['skipped_sections'] = [name for name in SECTIONS if 'skipped' in report[name]]
  write(report, out)
  print()
  for name, value in summary(report):
    print(f'{name:<15} {value}')
  print(f'{"total":<15} {report["seconds"]} s; JSON: {out}')
  if failed:
    sys.exit(1)


if __name__ == '__main__':
  errors.run(main)
