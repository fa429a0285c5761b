"""Helpers the tests share: tiny configs, fixed batches, config loading, parameter layouts."""

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'
MAIN = str(REPO / 'main.py')


def as_a_user_runs_it(env: dict) -> dict:
  """`env` without the test session's settings: one CPU device, full XLA optimization."""
  return {k: v for k, v in env.items() if k not in ('XLA_FLAGS', 'JAX_DISABLE_MOST_OPTIMIZATIONS')}


def tiny_config(method: str = 'macrl', **overrides):
  """A config small enough for a CPU test: ViT 'mu' cut to 2 blocks (width 64) on 16 px, patch 4.

  Two blocks keep what the tests check (a stack of blocks, the layer-wise decay over them) at half
  the compile time of the variant's four.
  """
  from macrl_jax.config import methods, schema
  c = schema.base_config()
  methods.apply_method(c, method)
  c.image_size = 16
  c.batch_size = 16
  c.total_steps = 100
  c.optim.warmup_steps = 0
  c.model.variant = 'mu/4'
  c.model.depth = 2
  c.model.decoder_width = 32
  c.model.decoder_depth = 1
  c.model.decoder_heads = 2
  c.model.proj_hidden = 64
  c.model.pred_hidden = 64
  c.model.proj_dim = 32
  return override(c, overrides)


def fitting_config(method: str = 'macrl', **overrides):
  """tiny_config with a schedule that fits a fixed batch in 40 of its 60 steps (peak lr 1e-3 after 5
  warm-up steps); the step-level tests that do not depend on the schedule use it too, to share its
  compiled programs."""
  config = tiny_config(method, total_steps=60)
  config.optim.base_lr = 1e-3 * 256 / config.batch_size
  config.optim.warmup_steps = 5
  return override(config, overrides)


def override(config, overrides: dict):
  """Sets dotted fields ('model.variant') as --config.FIELD=VALUE would. Returns config."""
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


def stack_blocks(tree):
  """The scan=False parameter layout ('block00', 'block01', ...) → the scan=True one ('blocks')."""
  import jax  # noqa: PLC0415 (jax is imported only after XLA_FLAGS is set)
  import jax.numpy as jnp  # noqa: PLC0415
  if not isinstance(tree, dict):
    return tree
  names = sorted(k for k in tree if k.startswith('block') and k[5:].isdigit())
  out = {k: stack_blocks(v) for k, v in tree.items() if k not in names}
  if names:
    out['blocks'] = jax.tree.map(lambda *xs: jnp.stack(xs), *[tree[k] for k in names])
  return out


def fixed_batch(config, seed=0):
  rs = np.random.RandomState(seed)
  shape = (config.batch_size, config.image_size, config.image_size, 3)
  batch = {'view1': rs.randn(*shape).astype(np.float32)}
  if config.num_views == 2:
    # A second view of the same images: a shifted, noisier copy, so the positives are learnable.
    batch['view2'] = (np.roll(batch['view1'], 1, axis=2) + 0.3 * rs.randn(*shape)).astype(np.float32)
  return batch


def without_gradient_free(tree, method):
  """Zeroes the parameters whose gradient is exactly zero in exact arithmetic.

  Their gradient is rounding noise, which Adam's first steps scale up to about ±lr, differently for
  each reduction order, so they differ between meshes without anything being wrong:
  - the attention key bias: adding b to every key adds q·b to a whole row of logits, which softmax
    ignores;
  - with mocov3, the encoder's final LayerNorm bias: a constant shift of the pooled feature passes the
    projector's first (bias-free) linear layer as a constant, which its BatchNorm removes.
  """
  import jax

  def one(path, x):
    keys = jax.tree_util.keystr(path)
    if "['qkv']['bias']" in keys and x.ndim == 1:
      d = x.shape[0] // 3
      x = np.concatenate([x[:d], np.zeros_like(x[d:2 * d]), x[2 * d:]])
    if method == 'mocov3' and "['encoder']['transformer']['norm']['bias']" in keys:
      x = np.zeros_like(x)
    return x
  return jax.tree_util.tree_map_with_path(one, tree)


def load_config(name, arg=None):
  """configs/<name>.py's get_config(arg), as `--config=configs/<name>.py:<arg>` loads it."""
  import importlib.util  # noqa: PLC0415
  spec = importlib.util.spec_from_file_location(name, REPO / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# The two-process test's config (tests/multihost_driver.py), and its one-process reference. The
# kNN monitor extracts in batches of 512, so that its gathers across the processes are few.
MULTIHOST = {'total_steps': 4, 'queue_size': 128, 'sharding.fsdp': True, 'knn.eval_batch_size': 512}


def digits_config(data_dir: str, method: str = 'macrl', **overrides):
  """tiny_config on the real digits data, with the program's fields set for short runs."""
  c = tiny_config(method, dataset='digits', data_dir=data_dir, num_classes=10, batch_size=32,
                  total_steps=8, log_every_steps=2, eval_every_steps=1000,
                  checkpoint_every_steps=2, keep_checkpoints=5)
  c.knn.eval_batch_size = 64
  return override(c, overrides)


def run_tool_in_process(name: str, *args: str) -> str:
  """`python tools/<name>.py ARGS` run in this process; returns what it printed.

  The tool's flags are parsed by absl from ARGS as on the command line, and removed afterwards, so
  that tools whose flags share names (--workdir, --batch_size) can run one after another here. A
  user error propagates as its exception; the command line around it (exit status 2, one line, no
  traceback) is tested with real subprocesses. In process, a tool reuses the test's imports and
  compiled programs instead of paying for its own (seconds per tool).
  """
  import contextlib  # noqa: PLC0415
  import importlib.util  # noqa: PLC0415
  import io  # noqa: PLC0415
  import sys  # noqa: PLC0415
  from unittest import mock  # noqa: PLC0415

  from absl import flags  # noqa: PLC0415
  path = REPO / 'tools' / f'{name}.py'
  argv = [str(path.relative_to(REPO)), *args]
  defined_before = set(flags.FLAGS)
  out = io.StringIO()
  try:
    spec = importlib.util.spec_from_file_location(f'tools_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the tool's flags
    with mock.patch.object(sys, 'argv', argv), contextlib.redirect_stdout(out):
      flags.FLAGS(argv)  # (the config flag reads its --config.FIELD overrides from sys.argv)
      if module.main.__code__.co_argcount:  # main(argv), as absl's app.run calls it
        module.main(argv)
      else:
        module.main()
  finally:
    for name_ in set(flags.FLAGS) - defined_before:
      delattr(flags.FLAGS, name_)
  return out.getvalue()
