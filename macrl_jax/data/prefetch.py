"""Keeps the next global batches on their way to the devices while the current step runs."""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Iterator

import jax

from macrl_jax import sharding


def prefetch_to_mesh(iterator: Iterable[dict], mesh: jax.sharding.Mesh,
                     size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Yields `sharding.make_global_batch(b, mesh)` for each process-local batch b of `iterator`.

  `size` batches are in flight: handing out batch i first issues the transfer of batch i + size − 1,
  which happens right after step i − 1 was dispatched (steps run asynchronously), so reading the
  next batch and copying it to the devices overlap the running step instead of following it. Like
  flax.jax_utils.prefetch_to_device, for a mesh.
  """
  iterator = iter(iterator)
  queue = collections.deque()

  def enqueue(n):
    for batch in itertools.islice(iterator, n):
      queue.append(sharding.make_global_batch(batch, mesh))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)
