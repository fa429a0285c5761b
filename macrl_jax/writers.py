"""Where a training run's metrics go: clu's default writers (TensorBoard and the log) and
metrics.jsonl, one JSON object per logged step, which the tests and the ablation read.

Only process 0 writes files; the other processes log only.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
  """Appends each write_scalars(step, scalars) to a .jsonl file as one row {'step': step, ...}
  with sorted keys; the writer's other kinds of summary (images, texts, ...) are not written."""

  def __init__(self, path: str, enabled: bool = True):
    self.path = path
    self.enabled = enabled

  def truncate_after(self, step: int) -> None:
    """Drops the rows logged after `step` (by a run that died before its next checkpoint), so that
    the resumed run logs each step once."""
    if not (self.enabled and os.path.exists(self.path)):
      return
    with open(self.path) as f:
      lines = [line for line in f if line.strip()]
    rows = [row for row in map(_parse_row, lines) if row is not None]
    if len(rows) < len(lines):
      logging.warning('Dropped %d unreadable row(s) of %s (a line torn by a crash or a full disk).',
                      len(lines) - len(rows), self.path)
    tmp = f'{self.path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
      f.writelines(json.dumps(row, sort_keys=True) + '\n' for row in rows if row['step'] <= step)
    os.replace(tmp, self.path)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if self.enabled:
      row = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
      with open(self.path, 'a') as f:
        f.write(json.dumps(row, sort_keys=True) + '\n')

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def _parse_row(line: str) -> dict | None:
  try:
    row = json.loads(line)
  except ValueError:
    return None
  return row if isinstance(row, dict) and isinstance(row.get('step'), int) else None


def create(logdir: str, is_main: bool, resumed_step: int) -> tuple[metric_writers.MetricWriter,
                                                                   metric_writers.MetricWriter]:
  """(writer, default): `writer` sends to the default writers and to logdir/metrics.jsonl, whose
  rows after `resumed_step` are dropped first; `default` is clu's alone (TensorBoard and the log),
  for what does not belong in metrics.jsonl (the steps/s of periodic_actions.ReportProgress)."""
  default = metric_writers.create_default_writer(logdir, just_logging=not is_main)
  jsonl = JsonlWriter(os.path.join(logdir, 'metrics.jsonl'), enabled=is_main)
  jsonl.truncate_after(resumed_step)
  return metric_writers.MultiWriter([default, jsonl]), default
