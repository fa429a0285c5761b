r"""Where the train step's time goes: a jax.profiler trace of a few steps, summed by XLA op kind.

  python benchmarks/profile_step.py --config=configs/cifar100.py --config.batch_size=64 [--steps=3]

Traces `--steps` steps of the compiled step on one random batch (after two untimed ones), then sums
the time of every XLA operation on the CPU's compute threads by its kind (the name without its
number: `ynn_fusion` are matmuls with their fused neighbours, `copy_bitcast_fusion` and
`transpose_copy_fusion` are layout copies, ...) and prints each kind's share of the thread time as
a table and one JSON line. The trace stays in --trace_dir for TensorBoard's profile plugin.
Shares only: on a shared CPU the absolute times include waiting for other processes.
"""

import collections
import glob
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from macrl_jax import errors, sharding  # noqa: E402
from macrl_jax.methods import build  # noqa: E402
from macrl_jax.run.step_timing import random_local_batch  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=False)
_STEPS = flags.DEFINE_integer('steps', 3, 'Traced steps.')
_TRACE_DIR = flags.DEFINE_string('trace_dir', '/tmp/macrl_step_trace', 'Where the trace goes.')


def op_times(trace_dir: str) -> collections.Counter:
  """Nanoseconds per op kind over the compute threads of the newest trace in `trace_dir`."""
  from jax._src.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  path = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True))[-1]
  totals = collections.Counter()
  for plane in ProfileData.from_file(path).planes:
    for line in plane.lines:
      if 'XLAEigen' not in line.name:  # XLA's compute threads on CPU
        continue
      for event in line.events:
        kind = re.sub(r'[.\d]+$', '', event.name)
        if kind != 'ThunkExecutor::Execute':  # the executor's span encloses the ops below it
          totals[kind] += event.duration_ns
  return totals


def main(argv):
  del argv
  config = _CONFIG.value
  mesh = sharding.make_mesh()
  built = build.build(config, mesh)
  state = built.init_state()
  batch = sharding.make_global_batch(random_local_batch(config), mesh)
  step = built.step.lower(state, batch).compile()
  for _ in range(2):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  jax.profiler.start_trace(_TRACE_DIR.value)
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  step_ms = (time.perf_counter() - start) / _STEPS.value * 1e3
  jax.profiler.stop_trace()

  totals = op_times(_TRACE_DIR.value)
  whole = sum(totals.values())
  shares = {k: round(v / whole, 4) for k, v in totals.most_common()}
  print(f'step {step_ms:.0f} ms (traced); thread time {whole / 1e6 / _STEPS.value:.0f} ms/step')
  for kind, share in list(shares.items())[:15]:
    print(f'  {kind:<28}{100 * share:5.1f} %')
  print(json.dumps(dict(step_ms=round(step_ms, 1), steps=_STEPS.value,
                        thread_ms_per_step=round(whole / 1e6 / _STEPS.value, 1),
                        shares={k: v for k, v in shares.items() if v >= 0.001},
                        load_avg_1m=round(os.getloadavg()[0], 2))))


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  errors.run(main)
