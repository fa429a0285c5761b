"""prefetch_to_mesh: global batches in order, sharded on 'data', at most `size` read ahead."""

import jax
import numpy as np

from macrl_jax import sharding
from macrl_jax.data import prefetch


def test_prefetch_yields_global_batches_in_order_and_reads_ahead_by_size():
  mesh = sharding.make_mesh()
  read = []

  def batches():
    for i in range(5):
      read.append(i)
      yield {'view1': np.full((8, 2, 2, 3), i, np.float32), 'label': np.arange(8, dtype=np.int32)}

  it = prefetch.prefetch_to_mesh(batches(), mesh, size=2)
  assert read == []  # nothing happens before the first batch is asked for
  out = [next(it)]
  assert read == [0, 1]  # the first batch and the next one, on its way
  out.append(next(it))
  assert read == [0, 1, 2]
  out += list(it)
  assert len(out) == 5
  for i, batch in enumerate(out):
    assert isinstance(batch['view1'], jax.Array)
    assert batch['view1'].sharding.is_equivalent_to(sharding.batch_sharding(mesh), 4)
    assert len(batch['view1'].addressable_shards) == jax.device_count()
    np.testing.assert_array_equal(batch['view1'], i)
    np.testing.assert_array_equal(batch['label'], np.arange(8))
