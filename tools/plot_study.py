"""The figure of a method comparison: the kNN monitor against pre-training time, and the final
metrics as bars with error bars, from tools/ablate.py's results.json alone.

  python tools/plot_study.py --results=results/cifar10/final/results.json \
      --out=results/cifar10/final/study.png

Left: each equal-time run's kNN monitor (config.eval_every_steps) against its pre-training time,
the mean over seeds as a line and their range as a band. The time of a step is the one the ablation
measured for the trial in one process, the trials in turn (results.json's step_seconds), so the
axis does not depend on the machine's load during the runs; evaluations are not counted, and a
mimco run starts after its own teacher's time. Right: linear-probe and fine-tuning top-1 (mean ±
std over seeds) of each row of the chosen budget, with the random encoder and raw pixels.
"""

import json
import os

from absl import app, flags

from macrl_jax.run import comparison

os.environ.setdefault('MPLBACKEND', 'Agg')

flags.DEFINE_string('results', None, 'results.json of tools/ablate.py.', required=True)
flags.DEFINE_string('out', None, 'The PNG (default: study.png beside --results).')
flags.DEFINE_enum('budget', 'time', ['time', 'epochs'], 'The rows whose final metrics are bars.')
FLAGS = flags.FLAGS

METHOD_COLOURS = {'macrl': 'tab:red', 'mae': 'tab:blue', 'mocov3': 'tab:green',
                  'mimco': 'tab:purple'}


def plot(results: dict, path: str) -> None:
  import matplotlib.pyplot as plt
  import numpy as np

  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  for name, row in comparison.time_rows(results).items():
    minutes, per_seed = comparison.curve_minutes(results, row)
    if not per_seed:
      continue
    values = 100 * np.asarray(per_seed)
    colour = METHOD_COLOURS.get(row['method'])
    left.plot(minutes, values.mean(0), marker='o', color=colour, label=f'{name} ({len(values)})')
    if len(values) > 1:
      left.fill_between(minutes, values.min(0), values.max(0), color=colour, alpha=0.2)
  left.set(xlabel='pre-training time (min, at the measured step time)',
           ylabel='kNN top-1 (%)', title='kNN monitor during pre-training (mean, seed range)')
  left.grid(alpha=0.3)
  left.legend(fontsize=8)

  rows = {n: r for n, r in results['rows'].items()
          if r.get('budget') == FLAGS.budget or n in ('random init', 'pixels')
          or (FLAGS.budget == 'time' and n == results.get('reference'))}
  metrics = [('linear_top1', 'linear probe')] + (
      [('finetune_top1', 'fine-tune')] if any('finetune_top1' in r for r in rows.values()) else [])
  x = np.arange(len(rows))
  width = 0.8 / len(metrics)
  for i, (key, label) in enumerate(metrics):
    means = [100 * r.get(key, np.nan) if r.get(key) is not None else np.nan for r in rows.values()]
    stds = [100 * (r.get(f'{key}_std') or 0.0) for r in rows.values()]
    right.bar(x + (i - (len(metrics) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
              label=label)
  right.set_xticks(x, list(rows), rotation=30, ha='right', fontsize=8)
  right.set(ylabel='top-1 (%)', title=f'final metrics, {FLAGS.budget} budget (mean ± std)')
  right.grid(axis='y', alpha=0.3)
  right.legend(fontsize=8)
  fig.suptitle(f'{results["budget"]}; evaluated on {results["eval_split"]}', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  with open(FLAGS.results) as f:
    results = json.load(f)
  path = FLAGS.out or os.path.join(os.path.dirname(FLAGS.results), 'study.png')
  plot(results, path)
  print(f'Wrote {path}')


if __name__ == '__main__':
  app.run(main)
