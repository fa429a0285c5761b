"""Two processes × 2 CPU devices, joined by jax.distributed on 127.0.0.1 with gloo collectives."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from helpers import MULTIHOST, REPO, digits_config, fixed_batch, without_gradient_free
from macrl_jax import sharding
from macrl_jax.methods import build
from macrl_jax.run import checkpoint


def tf_summary_tags(workdir) -> set[str]:
  """The tags of every summary in the workdir's TensorBoard event files."""
  import glob  # noqa: PLC0415
  import tensorflow as tf  # noqa: PLC0415
  tags = set()
  for path in glob.glob(str(workdir / 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(v.tag for v in event.summary.value)
  return tags


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(digits_dir, tmp_path):
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  driver = str(REPO / 'tests' / 'multihost_driver.py')
  procs = [subprocess.Popen([sys.executable, driver, str(port), str(i), str(tmp_path), digits_dir],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=900)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]

  # Both processes end with identical parameters.
  a, b = (dict(np.load(tmp_path / f'process{i}.npz')) for i in range(2))
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)

  # And equal the one-process step on the whole batch (4 devices of this process).
  config = digits_config(digits_dir, **MULTIHOST)
  mesh = sharding.make_mesh(jax.devices()[:4])
  built = build.build(config, mesh)
  state = built.init_state()
  losses = []
  for _ in range(3):
    state, metrics = built.step(state, sharding.make_global_batch(fixed_batch(config), mesh))
    losses.append(float(metrics['loss']))
  np.testing.assert_allclose(a['losses'], losses, rtol=1e-5)
  one = {jax.tree_util.keystr(p): np.asarray(x)
         for p, x in jax.tree_util.tree_leaves_with_path(without_gradient_free(jax.device_get(state), 'macrl'))}
  two = without_gradient_free(  # same zeroing, keyed the same way
      {k: v for k, v in a.items() if k != 'losses'}, 'macrl')
  for key, value in one.items():
    np.testing.assert_allclose(two[key], value, rtol=1e-3, atol=2e-5, err_msg=key)

  # Their collective checkpoint restores in a one-process run.
  abstract = built.abstract_state
  mngr = checkpoint.manager(str(tmp_path / 'step_workdir'))
  restored, meta = checkpoint.restore_latest(mngr, abstract)
  assert meta['step'] == 3
  for p, x in jax.tree_util.tree_leaves_with_path(jax.device_get(restored)):
    np.testing.assert_array_equal(x, a[jax.tree_util.keystr(p)])

  # The full program with fsdp: only process 0 wrote logs, with the eval (kNN and pictures) of the
  # last step; one checkpoint per save step, for both processes.
  workdir = tmp_path / 'train_workdir'
  records = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert [r['step'] for r in records] == [2, 4]
  assert 0.0 <= records[-1]['knn_top1'] <= 1.0
  assert sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit()) == [2, 4]
  events = tf_summary_tags(workdir)
  assert {'reconstruction/view1', 'reconstruction/view2'} <= events, events
