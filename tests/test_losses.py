"""The loss terms against plain NumPy references."""

import jax.numpy as jnp
import numpy as np
import pytest

from macrl_jax.methods import losses


def np_reconstruction(pred, target, mask, norm_pix, kind):
  pred, target, mask = (np.asarray(a, np.float64) for a in (pred, target, mask))
  if norm_pix:
    # The unbiased variance, as MAE's torch.var.
    target = (target - target.mean(-1, keepdims=True)) / np.sqrt(
        target.var(-1, ddof=1, keepdims=True) + 1e-6)
  err = np.abs(pred - target) if kind == 'l1' else (pred - target) ** 2
  per_patch = err.mean(-1)
  return (per_patch * mask).sum() / mask.sum()


def np_infonce(q, k, t, queue=None):
  q = np.asarray(q, np.float64)
  k = np.asarray(k, np.float64)
  q = q / np.linalg.norm(q, axis=1, keepdims=True)
  k = k / np.linalg.norm(k, axis=1, keepdims=True)
  logits = q @ k.T
  if queue is not None:
    logits = np.concatenate([logits, q @ np.asarray(queue, np.float64).T], 1)
  logits = logits / t
  logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
  return 2 * t * np.mean(logz - np.diag(logits[:, :len(q)]))


@pytest.mark.parametrize('norm_pix', [True, False])
@pytest.mark.parametrize('kind', ['l1', 'l2'])
def test_reconstruction_matches_numpy(norm_pix, kind):
  rs = np.random.RandomState(0)
  pred, target = rs.randn(2, 4, 16, 12).astype(np.float32)
  mask = (rs.rand(4, 16) < 0.75).astype(np.float32)
  got = losses.reconstruction_loss(pred, target, mask, norm_pix=norm_pix, kind=kind)
  np.testing.assert_allclose(got, np_reconstruction(pred, target, mask, norm_pix, kind), rtol=1e-5)


def test_reconstruction_ignores_visible_patches():
  rs = np.random.RandomState(1)
  pred, target = rs.randn(2, 2, 8, 6).astype(np.float32)
  mask = np.zeros((2, 8), np.float32)
  mask[:, :4] = 1
  base = losses.reconstruction_loss(pred, target, mask)
  pred2 = pred.copy()
  pred2[:, 4:] += 100.0  # change only the visible patches' predictions
  np.testing.assert_allclose(losses.reconstruction_loss(pred2, target, mask), base, rtol=1e-6)


@pytest.mark.parametrize('with_queue', [False, True])
def test_infonce_matches_numpy(with_queue):
  rs = np.random.RandomState(0)
  q, k = rs.randn(2, 8, 5).astype(np.float32)
  queue = rs.randn(12, 5).astype(np.float32) if with_queue else None
  loss, acc = losses.infonce(q, k, 0.2, queue)
  np.testing.assert_allclose(loss, np_infonce(q, k, 0.2, queue), rtol=1e-5)
  assert 0.0 <= acc <= 1.0


def test_infonce_is_minimal_when_q_equals_k():
  """With the same set of keys, pairing every query with itself beats every other pairing."""
  rs = np.random.RandomState(0)
  q = rs.randn(16, 8).astype(np.float32)
  at_q, acc = losses.infonce(q, 3.0 * q, 0.1)  # the keys' scale does not matter
  assert acc == 1.0
  for seed in range(10):
    perm = np.random.RandomState(seed).permutation(16)
    if (perm == np.arange(16)).all():
      continue
    assert losses.infonce(q, q[perm], 0.1)[0] > at_q
    assert losses.infonce(q, rs.randn(16, 8).astype(np.float32), 0.1)[0] > at_q


def test_enqueue_is_fifo_and_wraps():
  queue = jnp.zeros((6, 2))
  ptr = jnp.zeros((), jnp.int32)
  keys = jnp.array([[1., 0], [0, 2], [3, 0], [0, 4]])
  queue, ptr = losses.enqueue(queue, ptr, keys)
  assert int(ptr) == 4
  np.testing.assert_allclose(queue[:4], [[1, 0], [0, 1], [1, 0], [0, 1]])
  queue, ptr = losses.enqueue(queue, ptr, -keys)
  assert int(ptr) == 2
  np.testing.assert_allclose(queue, [[-1, 0], [0, -1], [1, 0], [0, 1], [-1, 0], [0, -1]])
