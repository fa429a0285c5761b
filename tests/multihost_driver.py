"""One process of the two-process test in test_multihost.py (not a test module itself).

  python tests/multihost_driver.py PORT PROCESS_ID OUT_DIR DIGITS_DATA_DIR

Each process has 2 CPU devices; jax.distributed joins them over 127.0.0.1 with gloo collectives.
Both phases use helpers.MULTIHOST's config (with sharding.fsdp: parameters split across the
processes), so the second reuses the programs the first compiled.
Phase 1: three steps on a fixed global batch assembled from the process-local halves; writes the
gathered params and losses to OUT_DIR/process<i>.npz and saves a collective checkpoint.
Phase 2: train.train_and_evaluate on digits (per-process data shards, kNN and reconstruction
pictures, process-0-only logs, collective checkpoints).
"""

import os
import sys

# Two devices per process, and the test session's code-generation choice (tests/conftest.py).
os.environ['XLA_FLAGS'] = ('--xla_force_host_platform_device_count=2 '
                           '--xla_cpu_use_fusion_emitters=false')
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from helpers import MULTIHOST, digits_config, fixed_batch  # noqa: E402




def main(port, process_id, out_dir, data_dir):
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=process_id)
  assert jax.device_count() == 4 and jax.local_device_count() == 2
  # Gloo sets up its context at the first collective and gives the other process 30 s to arrive;
  # do it now, while both processes are in step, rather than after compiles of uneven length.
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices('gloo warm-up')

  from macrl_jax import sharding
  from macrl_jax.methods import build
  from macrl_jax.run import checkpoint, train
  config = digits_config(data_dir, **MULTIHOST)
  mesh = sharding.make_mesh()
  built = build.build(config, mesh)
  state = built.init_state()
  full = fixed_batch(config)
  half = config.batch_size // 2
  local = {k: v[process_id * half:(process_id + 1) * half] for k, v in full.items()}
  batch = sharding.make_global_batch(local, mesh)
  # The step's first collective sets up gloo over all 4 devices, again within 30 s of each other:
  # compile first (its length differs between the processes on a loaded machine), then meet.
  step = built.step.lower(state, batch).compile()
  multihost_utils.sync_global_devices('step compiled')
  losses = []
  for _ in range(3):
    state, metrics = step(state, batch)
    losses.append(float(np.asarray(metrics['loss'].addressable_data(0))))
  flat = {jax.tree_util.keystr(p): x
          for p, x in jax.tree_util.tree_leaves_with_path(sharding.to_host(state))}
  np.savez(os.path.join(out_dir, f'process{process_id}.npz'), losses=np.array(losses), **flat)
  mngr = checkpoint.manager(os.path.join(out_dir, 'step_workdir'))
  checkpoint.save(mngr, 3, state, {})
  mngr.wait_until_finished()
  mngr.close()

  # With fsdp no process holds whole parameters: the kNN eval, the reconstruction pictures and the
  # checkpoints must gather or save them collectively.
  result = train.train_and_evaluate(config, os.path.join(out_dir, 'train_workdir'))
  print(f'process {process_id} done: {result}', flush=True)


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
