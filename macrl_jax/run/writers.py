"""Where a training run's metrics go: clu's default writers (TensorBoard and the log),
metrics.jsonl, one JSON object per logged step, which the tests and the ablation read, and, for
main.py, one compact line per logged step on the terminal.

Only process 0 writes files and prints; the other processes log only.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import Any, Mapping

from clu import metric_writers


class ScalarsOnly(metric_writers.MetricWriter):
  """A writer of scalars alone: the other kinds of summary (images, texts, ...) are dropped."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    raise NotImplementedError

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


class JsonlWriter(ScalarsOnly):
  """Appends each write_scalars(step, scalars) to a .jsonl file as one row {'step': step, ...}
  with sorted keys."""

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



class ConsoleWriter(ScalarsOnly):
  """One line per logged step on stdout: step/total, the loss and its terms, images/s, the time
  left at that rate (evaluations not counted), and the kNN monitor when it ran."""

  def __init__(self, total_steps: int, batch_size: int, stream=None):
    self.total_steps, self.batch_size = total_steps, batch_size
    self.stream = stream or sys.stdout

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if 'loss' not in scalars and 'knn_top1' not in scalars:
      return  # clu's progress figures (steps_per_sec, uptime) go to the log only
    width = len(str(self.total_steps))
    parts = [f'step {step:>{width}}/{self.total_steps}']
    if 'loss' in scalars:
      terms = ', '.join(f'{k[5:]} {float(v):.3f}' for k, v in sorted(scalars.items())
                        if k.startswith('loss_'))
      parts.append(f'loss {float(scalars["loss"]):.4f}' + (f' ({terms})' if terms else ''))
    rate = float(scalars.get('images_per_sec', 0.0))
    if rate > 0:
      left = (self.total_steps - step) * self.batch_size / rate
      parts.append(f'{rate:,.0f} img/s, {datetime.timedelta(seconds=round(left))} left')
    if 'knn_top1' in scalars:
      parts.append(f'kNN top-1 {100 * float(scalars["knn_top1"]):.1f} %')
    print('  '.join(parts), file=self.stream, flush=True)


def _parse_row(line: str) -> dict | None:
  try:
    row = json.loads(line)
  except ValueError:
    return None
  return row if isinstance(row, dict) and isinstance(row.get('step'), int) else None


def create(logdir: str, is_main: bool, resumed_step: int, console: ConsoleWriter | None = None
           ) -> tuple[metric_writers.MetricWriter, metric_writers.MetricWriter]:
  """(writer, default): `writer` sends to the default writers, to logdir/metrics.jsonl, whose
  rows after `resumed_step` are dropped first, and to `console` on process 0; `default` is clu's
  alone (TensorBoard and the log), for what does not belong in metrics.jsonl (the steps/s of
  periodic_actions.ReportProgress)."""
  default = metric_writers.create_default_writer(logdir, just_logging=not is_main)
  jsonl = JsonlWriter(os.path.join(logdir, 'metrics.jsonl'), enabled=is_main)
  jsonl.truncate_after(resumed_step)
  writers = [default, jsonl] + ([console] if console and is_main else [])
  return metric_writers.MultiWriter(writers), default
