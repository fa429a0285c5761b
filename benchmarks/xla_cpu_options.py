r"""The train step compiled with different XLA CPU options, timed alternately, losses compared.

  python benchmarks/xla_cpu_options.py --config=configs/cifar100.py --config.batch_size=64 \
      [--rounds=3 --steps=3] [--variants=default,ynn_off,onednn_dot,xnn_dot,vector_512]

Each variant is the real step (build.build) compiled ahead of time with its `compiler_options`;
every variant starts from the same initial state and runs the same random batch, so their losses
after the first steps must agree within float32 reordering (printed as the largest relative
difference from the default). The variants are then timed in turn, `--steps` steps each, for
`--rounds` rounds, so that a change of the machine's load weighs on each alike. Prints a table and
one JSON line: per variant the median step seconds, its ratio to the default, the seconds its
compilation took (run with the compilation cache off, as by default outside the tests), and the
loss gap.
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from macrl_jax import errors, sharding  # noqa: E402
from macrl_jax.errors import UserError  # noqa: E402
from macrl_jax.methods import build  # noqa: E402
from macrl_jax.run.step_timing import random_local_batch, repeat, time_steps  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=False)
_VARIANTS = flags.DEFINE_list('variants', ['default', 'ynn_off', 'onednn_dot', 'xnn_dot',
                                           'vector_512'], 'Which VARIANTS to time.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Alternating rounds.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps per variant per round.')
_CHECK_STEPS = flags.DEFINE_integer('check_steps', 2, 'Steps whose losses are compared.')

_DOT = 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'
# The matmul paths and code-generation choices this jaxlib's CPU backend offers per compilation.
VARIANTS = {
    'default': {},  # YNNPACK fusions (this jaxlib's default matmul path)
    'ynn_off': {'xla_cpu_experimental_ynn_fusion_type': ''},  # XLA's own (Eigen) dots
    'onednn_dot': {'xla_cpu_experimental_ynn_fusion_type': '',
                   'xla_cpu_experimental_onednn_fusion_type': _DOT},
    'xnn_dot': {'xla_cpu_experimental_ynn_fusion_type': '',
                'xla_cpu_experimental_xnn_fusion_type': _DOT},
    'vector_512': {'xla_cpu_prefer_vector_width': 512},  # AVX-512 for the elementwise fusions
    # What jax_disable_most_optimizations sets (the fast test tier's choice): faster compiles.
    'unoptimized': {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True},
    # XLA's older LLVM IR emitters for the elementwise fusions instead of its MLIR ones.
    'legacy_emitters': {'xla_cpu_use_fusion_emitters': False},
    'unoptimized_legacy_emitters': {'xla_backend_optimization_level': 0,
                                    'xla_llvm_disable_expensive_passes': True,
                                    'xla_cpu_use_fusion_emitters': False},
}


def main(argv):
  del argv
  unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
  if unknown:
    raise UserError(f'--variants: {unknown} are not among {sorted(VARIANTS)}')
  if len(set(_VARIANTS.value)) < len(_VARIANTS.value):  # a repeat would time an in-memory compile
    raise UserError(f'--variants: {_VARIANTS.value} names a variant twice')
  config = _CONFIG.value
  mesh = sharding.make_mesh()
  built = build.build(config, mesh)
  batches = repeat(sharding.make_global_batch(random_local_batch(config), mesh))
  batch = next(batches)

  runners, losses, compile_s = {}, {}, {}
  for name in _VARIANTS.value:
    lowered = built.step.lower(built.abstract_state, batch)
    start = time.perf_counter()
    step = lowered.compile(compiler_options=VARIANTS[name])
    compile_s[name] = time.perf_counter() - start
    state, losses[name] = built.init_state(), []
    for _ in range(_CHECK_STEPS.value):
      state, metrics = step(state, batch)
      losses[name].append(float(metrics['loss']))
    runners[name] = [step, state]
  reference = losses[_VARIANTS.value[0]]
  loss_gap = {n: max(abs(a - b) / abs(b) for a, b in zip(l, reference)) for n, l in losses.items()}

  times = {name: [] for name in runners}
  for _ in range(_ROUNDS.value):
    for name, runner in runners.items():
      walls, runner[1] = time_steps(runner[0], runner[1], batches, warmup=1, steps=_STEPS.value)
      times[name] += [t.wall for t in walls]
  median = {n: statistics.median(t) for n, t in times.items()}
  base = median[_VARIANTS.value[0]]
  result = {n: dict(step_s=round(median[n], 4), ratio_to_first=round(median[n] / base, 3),
                    compile_s=round(compile_s[n], 2), loss_rel_gap=float(f'{loss_gap[n]:.2e}'),
                    options=VARIANTS[n])
            for n in runners}
  for n, r in result.items():
    print(f'{n:<12} {r["step_s"]:8.3f} s/step  ×{r["ratio_to_first"]:.3f}  compile '
          f'{r["compile_s"]:6.2f} s  loss gap {r["loss_rel_gap"]:.1e}')
  print(json.dumps(dict(variants=result, rounds=_ROUNDS.value, steps_per_round=_STEPS.value,
                        batch_size=config.batch_size, load_avg_1m=os.getloadavg()[0])))


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  errors.run(main)
