"""The projector and predictor heads of MoCo v3: Linear, BatchNorm (PyTorch's numerics), ReLU."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# PyTorch's nn.Linear default, kaiming_uniform(a=√5): U(±1/√fan_in).
TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm1d over axis 0: normalises with the biased batch variance and tracks the
  unbiased one in its running variance (flax's nn.BatchNorm tracks the biased one). Same variable
  names as nn.BatchNorm ('scale', 'bias'; 'mean', 'var')."""
  use_running_average: bool
  momentum: float = 0.9  # of the running average: torch's momentum 0.1
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      x32 = x.astype(jnp.float32)
      mean, var = x32.mean(axis=0), x32.var(axis=0)
      if not self.is_initializing():
        n = x.shape[0]
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var * (n / max(n - 1, 1))
    y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      y = y * self.param('scale', nn.initializers.ones, (features,))
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (features,))
    return y.astype(self.dtype)


class MLPHead(nn.Module):
  """MoCo v3 projector/predictor: (Linear-BN-ReLU)×(L−1) then Linear-BN without affine.

  BatchNorm statistics are those of the global batch (the step is one jit over the mesh, so XLA
  reduces across devices, as SyncBN does). The linear layers keep PyTorch's default nn.Linear
  initialisation, U(±1/√fan_in), as MoCo v3's heads do.
  """
  hidden: int
  out: int
  num_layers: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    bn = lambda **kw: BatchNorm(use_running_average=not train, dtype=self.dtype, **kw)
    dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=self.dtype, name=name,
                                            kernel_init=TORCH_LINEAR_INIT)
    for i in range(self.num_layers - 1):
      x = nn.relu(bn(name=f'bn{i}')(dense(self.hidden, f'dense{i}')(x)))
    x = dense(self.out, f'dense{self.num_layers - 1}')(x)
    return bn(use_scale=False, use_bias=False, name=f'bn{self.num_layers - 1}')(x).astype(jnp.float32)
