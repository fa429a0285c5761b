"""Timing the compiled train step: wall and CPU seconds, random batches, the matmul peak, memory.

Shared by tools/benchmark.py (one config, in depth), benchmarks/accelerator_check.py and
tools/ablate.py (several configs timed alternately, for the equal wall-clock budget).
"""

import resource
import statistics
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from macrl_jax import sharding
from macrl_jax.methods import build

# Dense bf16 peak FLOP/s by device kind, from the vendors' datasheets (first substring match; the
# longer names first). The SXM parts are named plainly ('NVIDIA H100 80GB HBM3', 'NVIDIA H200').
VENDOR_PEAK_BF16 = (
    ('H100 PCIe', 756e12), ('H100 NVL', 835e12), ('H200 NVL', 835e12),
    ('H200', 989e12), ('H100', 989e12), ('A100', 312e12),
    ('TPU v6 lite', 918e12), ('TPU v6e', 918e12),
    ('TPU v5 lite', 197e12), ('TPU v5e', 197e12), ('TPU v5p', 459e12), ('TPU v5', 459e12),
    ('TPU v4', 275e12),
)


class Timing(NamedTuple):
  wall: float  # seconds
  cpu: float  # CPU seconds of this process, all threads


def timed(fn, *args):
  """Runs fn(*args) and waits for its result; returns (result, Timing)."""
  wall, cpu = time.perf_counter(), time.process_time()
  out = jax.block_until_ready(fn(*args))
  return out, Timing(time.perf_counter() - wall, time.process_time() - cpu)


def median_timing(fn, *args, repeats: int, warmup: int = 1) -> Timing:
  """Median wall and CPU time of fn(*args) (fn must not donate its arguments)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = [timed(fn, *args)[1] for _ in range(repeats)]
  return Timing(statistics.median(t.wall for t in times), statistics.median(t.cpu for t in times))


def random_local_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  """This process's share of a pre-training batch of Gaussian noise (the step's cost does not
  depend on the pixel values)."""
  rs = np.random.RandomState(seed)
  b = config.batch_size // jax.process_count()
  shape = (b, config.image_size, config.image_size, 3)
  batch = {f'view{v + 1}': rs.randn(*shape).astype(np.float32) for v in range(config.num_views)}
  batch['label'] = rs.randint(0, config.num_classes, b).astype(np.int32)
  return batch


def input_only_rate(config, batches: int) -> tuple[float, object]:
  """Images/s of the input pipeline alone; returns the (warm) iterator for the step to use."""
  from macrl_jax.data import input_pipeline  # lazily: timing the step alone needs no TensorFlow
  iterator = input_pipeline.create_pretrain_iterator(config, start_step=0)
  for _ in range(3):
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  local = config.batch_size // jax.process_count()
  return batches * local / (time.perf_counter() - start), iterator


def compile_step(step, state, batch):
  """(the compiled step, its compile seconds): compiled ahead of time so that its compile time and
  XLA's cost analysis can be read."""
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  return compiled, time.perf_counter() - start


def xla_flops(compiled, num_devices: int) -> float | None:
  """XLA's FLOPs of the whole step: its cost analysis is of the per-device (SPMD) program, so
  work every device repeats (the update of replicated parameters) counts once per device."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost['flops'] * num_devices if cost and 'flops' in cost else None


def time_steps(step, state, batches, warmup: int, steps: int):
  """Timings of each step (fetching its batch included); returns (timings, state).

  The state is donated to each step; we wait for the new state only at the timing boundary.
  """
  times = []
  for i in range(warmup + steps):
    (state, metrics), t = timed(lambda s: step(s, next(batches)), state)
    if i >= warmup:
      times.append(t)
  loss = float(metrics['loss'])
  if not np.isfinite(loss):
    raise FloatingPointError(f'the timed step gave loss {loss}')
  return times, state


def repeat(batch):
  while True:
    yield batch


def alternating_step_seconds(configs: dict, rounds: int, steps_per_round: int = 3) -> dict:
  """Median wall seconds of one compiled train step of each config on a random batch, the configs
  timed in turn for `rounds` rounds so that a change in the machine's load weighs on each alike."""
  mesh = sharding.make_mesh()
  runners = {}
  for name, config in configs.items():
    built = build.build(config, mesh)
    batches = repeat(sharding.make_global_batch(random_local_batch(config), mesh))
    _, state = time_steps(built.step, built.init_state(), batches, warmup=1, steps=0)  # compiles
    runners[name] = [built.step, state, batches]
  times = {name: [] for name in configs}
  for _ in range(rounds):
    for name, runner in runners.items():
      step, state, batches = runner
      walls, runner[1] = time_steps(step, state, batches, warmup=0, steps=steps_per_round)
      times[name] += [t.wall for t in walls]
  return {name: statistics.median(t) for name, t in times.items()}


def matmul_probe(device, n: int):
  """A jitted n×n matmul (float32 on CPU, bf16 else); returns a function that runs it once.

  The benchmark runs it before and after the timed steps, in the same process, so that the load of
  other processes on a shared CPU weighs on it as on the steps.
  """
  dtype = jnp.float32 if device.platform == 'cpu' else jnp.bfloat16
  a = jnp.asarray(np.random.RandomState(0).randn(n, n), dtype)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, a))
  return lambda: timed(matmul, a, a)[1]


def peak_flops(device, n: int, probes: list[Timing]) -> dict:
  """The peak that MFU is relative to, where it comes from, and the measured matmul.

  On CPU the peak is the matmul's fastest run: its median falls with other processes' load on a
  shared CPU, and a peak that falls with the load would inflate the MFU.
  """
  flop = 2 * n ** 3
  dtype = 'float32' if device.platform == 'cpu' else 'bf16'
  median = flop / statistics.median(t.wall for t in probes)
  out = dict(measured_matmul_flops=median,
             measured_matmul_flops_best=flop / min(t.wall for t in probes))
  vendor = next((p for kind, p in VENDOR_PEAK_BF16 if kind in device.device_kind), None)
  if device.platform == 'cpu' or vendor is None:
    return dict(out, peak_flops=out['measured_matmul_flops_best'],
                peak_source=f'measured {dtype} matmul {n}x{n}, fastest of {len(probes)} runs '
                'before and after the steps')
  return dict(out, peak_flops=vendor, peak_source=f'vendor dense bf16 ({device.device_kind})')


def peak_memory(device) -> tuple[int, str]:
  """The device's peak bytes in use where the backend reports it, else the process's peak RSS."""
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats and 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'], 'device peak_bytes_in_use'
  # ru_maxrss is in KiB on Linux.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'process peak RSS (host)'
