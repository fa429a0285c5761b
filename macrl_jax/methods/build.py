"""The pre-training model, optimizer, state layout and jitted step of a config on a mesh.

The one construction of them: pre-training (run/train.py), the tools' restore (run/restore.py),
the benchmarks, the ablation's step timing and the tests all call `build`.

METHODS says, per method, where its modules, initial state and step come from.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from macrl_jax import sharding
from macrl_jax.config import checks
from macrl_jax.methods import mimco, networks, optim, train_step


class Method(NamedTuple):
  make_modules: Callable  # (config) -> networks.Modules
  init_state: Callable  # (config, modules, tx, rng) -> state
  make_train_step: Callable  # (config, modules, tx, lr_fn) -> step(state, batch)


_TWO_VIEW = Method(networks.make_modules, train_step.init_state, train_step.make_train_step)
METHODS = {
    'macrl': _TWO_VIEW,
    'mae': _TWO_VIEW,
    'mocov3': _TWO_VIEW,
    'mimco': Method(mimco.make_modules, mimco.init_state, mimco.make_train_step),
}


class Built(NamedTuple):
  modules: networks.Modules
  tx: optax.GradientTransformation
  lr_fn: optax.Schedule
  init_state: Callable  # (seed=None) -> the initial state on the mesh (config.init applied)
  abstract_state: Any  # ShapeDtypeStructs carrying `shardings`
  shardings: Any  # a NamedSharding per state array
  step: Callable  # jit(step)(state, batch) -> (state, metrics); donates the state


def build(config, mesh: jax.sharding.Mesh) -> Built:
  """Validates `config` for `mesh`, then builds. A mimco config needs its teacher resolved
  (teacher.resolve): the student's shapes depend on the teacher's."""
  checks.validate(config, num_devices=mesh.size)
  method = METHODS[config.method]
  modules = method.make_modules(config)
  tx, lr_fn = optim.make_optimizer(config, config.total_steps)

  init = functools.partial(method.init_state, config, modules, tx)
  abstract = jax.eval_shape(init, jax.ShapeDtypeStruct((2,), jnp.uint32))
  shardings = sharding.state_shardings(abstract, mesh, config.sharding.fsdp)
  jitted_init, step = jitted(config, mesh, method, modules, tx, lr_fn, shardings)

  def init_state(seed: int | None = None):
    state = jitted_init(jax.random.PRNGKey(config.seed if seed is None else seed))
    if config.get('init'):
      from macrl_jax.interop import torch_files  # only with a file to read (it may need torch)
      state = torch_files.initialise(state, config, shardings)
    return state

  return Built(modules, tx, lr_fn, init_state, sharding.with_shardings(abstract, shardings),
               shardings, step)


# The jitted programs of the last few (method, config, mesh) of this process. A process that builds
# one config again (tools/ablate.py trains its seed-0 trials after timing their steps; the tests)
# reuses their traces and compiled programs: tracing, lowering and loading a step from the
# compilation cache take seconds each time.
_JITTED: dict = {}
_JITTED_KEEP = 8


def jitted(config, mesh, method: Method, modules, tx, lr_fn,
           shardings) -> tuple[Callable, Callable]:
  """(jit(init)(rng) -> state, jit(step)(state, batch) -> (state, metrics)) of `config` on `mesh`,
  laid out by `shardings`; the step donates the state. The same objects for an equal config.

  The programs are pure functions of the config (modules, optimizer and schedule are made from
  it), so a config equal field for field gets the programs made for the first one.
  """
  key = (method, config.to_json_best_effort(sort_keys=True), mesh)
  if key not in _JITTED:
    init = jax.jit(functools.partial(method.init_state, config, modules, tx),
                   out_shardings=shardings)
    step = jax.jit(method.make_train_step(config, modules, tx, lr_fn),
                   in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
    while len(_JITTED) >= _JITTED_KEEP:
      del _JITTED[next(iter(_JITTED))]  # the oldest
    _JITTED[key] = (init, step)
  return _JITTED[key]
