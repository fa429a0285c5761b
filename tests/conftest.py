"""Test-session setup: 8 host CPU devices (set before anything imports jax) and tiny configs."""

import os
import sys
from pathlib import Path

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'


def tiny_config(method: str = 'macrl', **overrides):
  """A config small enough for a CPU test: ViT 'mu' (width 64, 4 blocks) on 16 px, patch 4."""
  from macrl_jax import presets
  c = presets.base_config()
  presets.apply_method(c, method)
  c.image_size = 16
  c.batch_size = 16
  c.total_steps = 100
  c.optim.warmup_steps = 0
  c.model.variant = 'mu/4'
  c.model.decoder_width = 32
  c.model.decoder_depth = 1
  c.model.decoder_heads = 2
  c.model.proj_hidden = 64
  c.model.pred_hidden = 64
  c.model.proj_dim = 32
  return override(c, overrides)


def override(config, overrides: dict):
  """Sets dotted fields ('model.variant') as --config.FIELD=VALUE would. Returns config."""
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


@pytest.fixture
def make_config():
  return tiny_config
