"""The comparison table: mean ± std over seeds and the verdict against twice the larger std."""

import pathlib

import pytest

from macrl_jax.run import comparison

REPO = pathlib.Path(__file__).resolve().parent.parent


def row(method, linear, budget='epochs', trial=None):
  r = {'trial': trial or method, 'method': method, 'budget': budget, 'overrides': {}, 'steps': 10,
       'linear_top1_per_seed': linear, 'knn_top1_per_seed': [0.1] * len(linear)}
  comparison.summarize(r)
  return r


def results(rows):
  return {'rows': rows, 'protocol': 'final', 'eval_split': 'validation', 'reference': 'macrl',
          'budget': '10 steps', 'seeds': [0, 1, 2], 'command': 'python tools/ablate.py ...'}


def test_summarize_keeps_the_seeds_and_adds_mean_and_population_std():
  r = row('macrl', [0.40, 0.42, 0.44])
  assert r['linear_top1'] == pytest.approx(0.42)
  assert r['linear_top1_std'] == pytest.approx((0.0008 / 3) ** 0.5)
  assert r['linear_top1_per_seed'] == [0.40, 0.42, 0.44]
  assert row('mae', [0.3])['linear_top1_std'] is None  # one seed: no spread


@pytest.mark.parametrize('macrl, verdict', [
    ([0.50, 0.51, 0.52], 'macrl ahead'),
    ([0.41, 0.42, 0.43], 'a tie'),
    ([0.30, 0.31, 0.32], 'macrl behind'),
])
def test_the_verdict_compares_the_gap_with_twice_the_larger_std(macrl, verdict):
  rows = {'macrl': row('macrl', macrl), 'mae': row('mae', [0.38, 0.40, 0.42]),
          'mocov3': row('mocov3', [0.35, 0.35, 0.35])}
  lines = comparison.summary_lines(results(rows))
  line = next(l for l in lines if l.startswith('macrl − mae'))
  assert line.endswith(verdict + '.')


def test_the_time_budget_compares_against_the_reference_epochs_run():
  rows = {'macrl': row('macrl', [0.50, 0.50, 0.50]),
          'mae (equal time)': row('mae', [0.45, 0.46, 0.47], budget='time', trial='mae')}
  lines = comparison.summary_lines(results(rows))
  time_line = next(l for l in lines if 'time budget' in l)
  assert 'macrl: macrl (50.0)' in time_line and 'mae: mae (46.0)' in time_line
  table = comparison.render(results(rows))
  assert '| mae | mae | – | time | 10 |' in table and 'macrl ahead' in table


def test_a_metric_added_later_goes_to_its_seeds_place_and_gets_its_columns():
  r = {'trial': 'macrl', 'method': 'macrl', 'budget': 'epochs', 'overrides': {}, 'steps': 10}
  comparison.record(r, 0, {'linear_top1': 0.40, 'knn_top1': 0.3})
  comparison.record(r, 1, {'linear_top1': 0.44, 'knn_top1': 0.3})
  comparison.record(r, 1, {'finetune_top1': 0.60})  # the fine-tuning metric, seed 1 first
  assert r['finetune_top1_per_seed'] == [None, 0.60] and r['finetune_top1'] == 0.60
  comparison.record(r, 0, {'finetune_top1': 0.50})
  assert r['seeds'] == [0, 1] and r['finetune_top1_per_seed'] == [0.50, 0.60]
  assert r['finetune_top1'] == pytest.approx(0.55) and r['finetune_top1_std'] == pytest.approx(0.05)
  rows = {'macrl': r, 'mae': row('mae', [0.30, 0.30])}
  rows['mae']['finetune_top1_per_seed'] = [0.70, 0.70]
  comparison.summarize(rows['mae'])
  table = comparison.render(dict(results(rows), finetune='10 % of the train labels'))
  assert '| fine-tune top-1 | fine-tune per seed |' in table
  assert '| 55.0 ± 5.0 | 50.0, 60.0 |' in table
  assert 'Fine-tune: 10 % of the train labels.' in table
  assert 'Fine-tuning top-1: macrl − mae: -15.0 points' in table and 'macrl behind' in table
  assert 'fine-tune' not in comparison.render(results({'mae': row('mae', [0.3])}))


def test_the_study_figure_puts_each_run_at_its_pre_training_time(tmp_path):
  """The kNN monitor's x is steps × the trial's measured step seconds (a mimco run after its own
  teacher's); tools/plot_study.py writes the PNG from results.json alone."""
  import json
  import subprocess
  import sys

  rows = {'macrl': dict(row('macrl', [0.45, 0.47]),
                        knn_curve_per_seed=[[[300, 0.35], [600, 0.39]], [[300, 0.36], [600, 0.4]]]),
          'mimco (equal time)': dict(row('mimco', [0.44], budget='time'), teacher='mocov3',
                                     teacher_steps=150, knn_curve_per_seed=[[[200, 0.37]]]),
          'random init': {'trial': 'random init', 'linear_top1': 0.38, 'linear_top1_std': 0.01}}
  res = dict(results(rows), step_seconds={'macrl': 0.5, 'mocov3': 0.4, 'mimco': 0.3})
  minutes, per_seed = comparison.curve_minutes(res, rows['macrl'])
  assert minutes == [2.5, 5.0] and per_seed == [[0.35, 0.39], [0.36, 0.4]]
  assert comparison.curve_minutes(res, rows['mimco (equal time)']) == ([(150 * 0.4 + 60) / 60],
                                                                       [[0.37]])
  (tmp_path / 'results.json').write_text(json.dumps(res))
  proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'plot_study.py'),
                         f'--results={tmp_path / "results.json"}'], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (tmp_path / 'study.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
