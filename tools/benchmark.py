"""Speed of the real train step: compile time, step time, images/s, FLOPs, MFU, and where it goes.

  python tools/benchmark.py --config=configs/cifar100.py --synthetic --config.batch_size=64
  python tools/benchmark.py --config=configs/cifar100.py:method=mae --synthetic --parts
  python tools/benchmark.py --config=configs/cifar100.py --synthetic --config.batch_size=64 \
      --compare_torch   # against benchmarks/torch_step.py, eager and torch.compile
  python tools/benchmark.py --config=configs/tiny_imagenet.py \
      --config.manual_dir=../shared/data/tiny-imagenet-10 --config.num_classes=10   # real input

The step is `build.build(config, sharding.make_mesh()).step` (every branch, the EMA update, the
queue), compiled ahead of time so that its compile time and XLA's cost analysis can be read.
`--synthetic` feeds one device-resident random batch (TensorFlow is not imported); otherwise the
input pipeline feeds the step through `prefetch.prefetch_to_mesh`, and its rate alone is reported too.

Figures:
- step_ms: median over --steps steps after --warmup, each timed to `block_until_ready` of the state.
- flops_per_step: analytic model FLOPs (macrl_jax/methods/flops.py, matmuls only); XLA's count of the
  compiled step (cost_analysis, all ops, × devices) beside it, with their ratio (about 1.02 for
  ViT-S; with model.scan XLA counts the scanned block once, so its figure is far lower).
- peak_flops: on CPU, a dense float32 matmul (--peak_size², 2048² by default, jitted) run in this
  process 10 times before and 10 times after the timed steps: the fastest run, what the cores have
  shown they can do (its median, which falls with other processes' load, is reported beside it);
  on GPU/TPU the vendor's dense bf16 peak for the device kind, with the measured bf16 matmul
  (8192²) beside it.
- mfu = flops_per_step / median step time / peak_flops: the median step against the fastest matmul,
  so a load that slows the steps lowers it (it errs low). mfu_best_step: the fastest step instead.
- step_cpu_s: the median CPU seconds (all threads of this process) of a step: other processes on a
  shared CPU change it much less than the wall time, so it is the figure to compare two variants by
  on a busy machine (the thread pools' spin-waiting counts too, so it is not a FLOP count).
- breakdown: each part's share of the analytic FLOPs; with --parts also each part's time, compiled
  and timed on its own (online encoder fwd+bwd, momentum encoder fwd, decoder fwd+bwd, heads fwd+bwd).
- peak memory: the device's peak where the backend reports it, else the process's peak RSS (host).
Prints a table, then one JSON object as the last line of stdout.
"""

import json
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))  # its neighbours: the PyTorch step, the parts
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from macrl_jax import errors, sharding  # noqa: E402
from macrl_jax.config import schema  # noqa: E402
from macrl_jax.data import prefetch  # noqa: E402
from macrl_jax.errors import UserError  # noqa: E402
from macrl_jax.methods import build, flops as flops_lib  # noqa: E402
from macrl_jax.models import vit  # noqa: E402
from macrl_jax.run import teacher  # noqa: E402
from macrl_jax.run.step_timing import (compile_step, input_only_rate, matmul_probe, peak_flops,  # noqa: E402
                                       peak_memory, random_local_batch, repeat, time_steps,
                                       xla_flops)
import step_parts  # noqa: E402  (benchmarks/)

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/cifar100.py', lock_config=False)
_SYNTHETIC = flags.DEFINE_bool('synthetic', False, 'Feed one device-resident random batch.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps (the median is reported).')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Steps before timing.')
_PARTS = flags.DEFINE_bool('parts', False, 'Also compile and time each part of the step alone.')
_COMPARE_TORCH = flags.DEFINE_bool(
    'compare_torch', False, 'Also time the PyTorch reference of the same step (benchmarks/'
    'torch_step.py, eager and torch.compile), alternating with ours, and report the ratios '
    '(needs requirements-interop.txt; --synthetic; method macrl).')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Alternating rounds of --compare_torch.')
_TORCH_MODES = flags.DEFINE_list('torch_modes', ['eager', 'compile'],
                                 'PyTorch variants --compare_torch times: eager, compile.')
_PEAK_SIZE = flags.DEFINE_integer(
    'peak_size', 0, 'Side of the square matmul measuring the peak (0: 2048 on CPU, 8192 else).')


# --------------------------------------------------------------------------------------- report
def describe(config) -> dict:
  dims = vit.vit_dims(config.model)
  return dict(method=config.method, dataset=config.dataset, image_size=config.image_size,
              variant=config.model.variant, width=dims['width'], depth=dims['depth'],
              batch_size=config.batch_size, dtype=config.dtype,
              mask_ratios=schema.view_mask_ratios(config), remat=config.model.remat,
              scan=config.model.get('scan', False), queue_size=config.queue_size)


def print_table(r: dict) -> None:
  g = lambda x: f'{x / 1e9:,.1f} GFLOP'
  rows = [
      ('config', ', '.join(f'{k}={v}' for k, v in r['config'].items())),
      ('devices', f'{r["num_devices"]} × {r["device_kind"]} ({r["cpu_count"]} CPUs, load '
                  f'{r["load_avg_1m"][0]} before, {r["load_avg_1m"][1]} after)'),
      ('input', r['input']),
      ('compile', f'{r["compile_s"]:.1f} s'),
      ('step', f'{r["step_ms"]:.1f} ms median (min {r["step_ms_min"]:.1f}, max '
               f'{r["step_ms_max"]:.1f}) over {r["steps"]} steps; {r["step_cpu_s"]:.2f} CPU s'),
      ('images/s', f'{r["images_per_sec"]:.1f}'),
  ]
  if r.get('input_images_per_sec') is not None:
    rows.append(('input only', f'{r["input_images_per_sec"]:.1f} images/s'))
  rows += [
      ('FLOPs/step', f'{g(r["flops_per_step"])} analytic (matmuls), '
                     f'{g(r["xla_flops_per_step"] or 0)} XLA (all ops), '
                     f'ratio XLA/analytic {r["flops_ratio_xla_over_analytic"]}'
                     + (' (XLA counts a loop body once: model.scan)' if r['config']['scan'] else '')),
      ('achieved', f'{r["achieved_flops"] / 1e9:,.1f} GFLOP/s'),
      ('peak', f'{r["peak_flops"] / 1e9:,.1f} GFLOP/s ({r["peak_source"]}); measured matmul '
               f'{r["measured_matmul_flops"] / 1e9:,.1f} GFLOP/s median, '
               f'{r["measured_matmul_flops_best"] / 1e9:,.1f} fastest'),
      ('MFU', f'{100 * r["mfu"]:.1f} % (median step), {100 * r["mfu_best_step"]:.1f} % (fastest '
              'step)'),
      ('peak memory', f'{r["peak_memory_bytes"] / 2**20:,.0f} MiB ({r["peak_memory_kind"]})'),
  ]
  for name in step_parts.PARTS:
    share = r['breakdown'][name]
    if share:
      extra = ''
      if name in r['part_ms']:
        extra = f', alone {r["part_ms"][name]:.1f} ms, {r["part_cpu_s"][name]:.2f} CPU s'
      rows.append((f'  {name}', f'{100 * share:.1f} % of FLOPs{extra}'))
  for name, value in rows:
    print(f'{name:<18}{value}')


def main(argv):
  del argv
  config = _CONFIG.value
  mesh = sharding.make_mesh()
  device = jax.devices()[0]
  teacher.resolve(config)  # mimco: the student's shapes depend on the teacher's
  built = build.build(config, mesh)
  state = built.init_state()  # (a mimco teacher's values do not change the step's time)

  input_rate = None
  if _SYNTHETIC.value:
    batches = repeat(sharding.make_global_batch(random_local_batch(config), mesh))
  else:
    input_rate, iterator = input_only_rate(config, batches=max(_STEPS.value, 10))
    batches = prefetch.prefetch_to_mesh(iterator, mesh, size=2)
  first = next(batches)
  compiled, compile_s = compile_step(built.step, state, first)
  xla = xla_flops(compiled, mesh.size)

  parts = {}
  if _PARTS.value:  # before the timed steps, while `state` is not yet donated
    parts = step_parts.time_parts(config, built.modules, state, first, repeats=5)

  n = _PEAK_SIZE.value or (2048 if device.platform == 'cpu' else 8192)
  probe = matmul_probe(device, n)
  load_before = os.getloadavg()[0]
  probes = [probe() for _ in range(10)]
  times, state = time_steps(compiled, state, batches, _WARMUP.value, _STEPS.value)
  probes += [probe() for _ in range(10)]
  walls = [t.wall for t in times]
  step_s, step_cpu_s = statistics.median(walls), statistics.median(t.cpu for t in times)
  analytic = flops_lib.step_flops(config)
  total = analytic['total']
  peak = peak_flops(device, n, probes)
  memory, memory_kind = peak_memory(device)

  result = dict(
      compile_s=round(compile_s, 2),
      step_ms=round(1e3 * step_s, 2),
      step_ms_min=round(1e3 * min(walls), 2),
      step_ms_max=round(1e3 * max(walls), 2),
      step_cpu_s=round(step_cpu_s, 3),
      steps=len(walls),
      images_per_sec=round(config.batch_size / step_s, 2),
      input='synthetic (device-resident)' if _SYNTHETIC.value else f'{config.dataset} input pipeline',
      input_images_per_sec=None if input_rate is None else round(input_rate, 1),
      flops_per_step=total,
      xla_flops_per_step=xla,
      flops_ratio_xla_over_analytic=None if not xla else round(xla / total, 3),
      achieved_flops=total / step_s,
      **peak,
      mfu=round(total / step_s / peak['peak_flops'], 4),
      mfu_vs_measured_matmul=round(total / step_s / peak['measured_matmul_flops'], 4),
      mfu_best_step=round(total / min(walls) / peak['peak_flops'], 4),
      breakdown={k: round(analytic[k] / total, 4) for k in step_parts.PARTS},
      part_ms={k: round(1e3 * t.wall, 2) for k, t in parts.items()},
      part_cpu_s={k: round(t.cpu, 3) for k, t in parts.items()},
      peak_memory_bytes=memory,
      peak_memory_kind=memory_kind,
      config=describe(config),
      num_devices=mesh.size,
      device_kind=device.device_kind,
      cpu_count=len(os.sched_getaffinity(0)),
      load_avg_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after the steps
      xla_flags=os.environ.get('XLA_FLAGS', ''),
  )
  if _COMPARE_TORCH.value:
    if not _SYNTHETIC.value or config.method != 'macrl':
      raise UserError('--compare_torch times method=macrl on a random batch: add --synthetic')
    import torch_step  # pylint: disable=g-import-not-at-top (needs requirements-interop.txt)
    result['torch'] = torch_step.compare(config, compiled, state, batches, _ROUNDS.value,
                                         _STEPS.value, _TORCH_MODES.value)
  print_table(result)
  print(json.dumps(result))


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  errors.run(main)
