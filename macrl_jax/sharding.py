"""The device mesh, how each part of the state is laid out on it, and global batches.

One mesh axis, 'data', spans every device of every process. The batch is split along it. The state
is replicated, or with `sharding.fsdp` each array is split along its largest axis that the device
count divides (ZeRO-3 style: XLA gathers the parameters for each use and reduce-scatters the
gradients).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(devices=None) -> Mesh:
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), ('data',))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], num_shards: int) -> P:
  """Splits the largest axis divisible by `num_shards`; replicates arrays with no such axis."""
  candidates = [i for i in np.argsort(shape)[::-1] if shape[i] % num_shards == 0 and shape[i] > 1]
  if num_shards == 1 or not candidates:
    return P()
  spec = [None] * len(shape)
  spec[candidates[0]] = 'data'
  return P(*spec)


def state_shardings(abstract_state: Any, mesh: Mesh, fsdp: bool) -> Any:
  """A pytree of NamedShardings matching `abstract_state` (from jax.eval_shape)."""
  n = mesh.shape['data']

  def one(x):
    return NamedSharding(mesh, fsdp_spec(x.shape, n) if fsdp else P())

  return jax.tree.map(one, abstract_state)


def with_shardings(abstract_state: Any, shardings: Any) -> Any:
  """`abstract_state` (ShapeDtypeStructs) carrying `shardings`: the target Orbax restores into."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_state, shardings)


def make_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's part of the batch into one global array sharded on 'data'.

  The global batch is the concatenation of the process-local batches in process order.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def to_host(tree: Any) -> Any:
  """The whole value of every array of `tree` as numpy, on every process.

  With sharding.fsdp on several processes no process holds all of an array: gathering it is a
  collective, so every process must call this.
  """
  if all(x.is_fully_addressable for x in jax.tree.leaves(tree)):
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)
