"""A method comparison's figures and table: the pixel baselines, the fine-tuning metric, mean ± std
over seeds, the verdict.

tools/ablate.py runs the trials and calls these; a row of the results holds each seed's figures
(`linear_top1_per_seed`, ...; in the order of the row's `seeds`) and `summarize` adds their mean
and population std.
"""

import statistics

METRICS = ('knn_top1', 'linear_top1', 'finetune_top1')


def finetune_top1(restored, seed: int, from_scratch: bool = False) -> float | None:
  """Top-1 of fine-tuning the restored encoder with the config's recipe (config.finetune: its
  labelled fraction of the train split, the same examples for every method and seed), seeded by
  `seed`; None when stopped (SIGTERM: it resumes from <workdir>/finetune_metric on the next call).

  `from_scratch` (the random encoder's baseline) trains every layer at the full rate (layer_decay
  1), as tools/finetune.py --from_scratch does: random layers have no features to protect.
  """
  from macrl_jax.run import finetune  # imported here: rendering a table needs no JAX
  args = finetune.default_args()
  args.update(restored.config.finetune.to_dict())
  args.seed = seed
  args.log_every_steps = args.checkpoint_every_steps = 1000
  if from_scratch:
    args.layer_decay = 1.0
  result = finetune.finetune(restored, args, 'finetune_metric')
  return None if result['preempted'] else float(result['top1'])


def record(row: dict, seed: int, scores: dict) -> None:
  """Puts each metric's value of `seed` at the seed's place in the row's per-seed lists."""
  if seed not in row.setdefault('seeds', []):
    row['seeds'].append(seed)
  at = row['seeds'].index(seed)
  for key, value in scores.items():
    values = row.setdefault(f'{key}_per_seed', [])
    values += [None] * (len(row['seeds']) - len(values))
    values[at] = value
  summarize(row)


def pixel_baselines(config):
  """Logistic regression (C by 3-fold cross-validation) and 20-NN on normalised pixels."""
  # Imported here: rendering a table needs neither scikit-learn nor TensorFlow.
  from sklearn.linear_model import LogisticRegressionCV
  from sklearn.neighbors import KNeighborsClassifier
  from sklearn.preprocessing import StandardScaler
  import numpy as np

  from macrl_jax.data import input_pipeline

  def pixels(split):
    xs, ys = [], []
    for b in input_pipeline.create_eval_iterator(config, split, batch_size=256, process_index=0,
                                                 process_count=1):
      xs.append(b['image'][b['mask']].reshape(int(b['mask'].sum()), -1))
      ys.append(b['label'][b['mask']])
    return np.concatenate(xs), np.concatenate(ys)

  (xtr, ytr), (xte, yte) = pixels(config.train_split), pixels(config.test_split)
  scaler = StandardScaler().fit(xtr)
  logreg = LogisticRegressionCV(Cs=[1e-3, 1e-2, 1e-1, 1.0], cv=3, scoring='accuracy', max_iter=2000)
  logreg.fit(scaler.transform(xtr), ytr)
  knn = {metric: KNeighborsClassifier(20, metric=metric).fit(xtr, ytr).score(xte, yte)
         for metric in ('cosine', 'euclidean')}
  return {'linear_top1': float(logreg.score(scaler.transform(xte), yte)),
          'linear_C': float(np.ravel(logreg.C_)[0]),
          'knn_top1': float(knn['cosine']), 'knn_euclidean_top1': float(knn['euclidean'])}


def summarize(row: dict) -> None:
  """Adds the mean and std over seeds of each metric's per-seed list."""
  for key in METRICS:
    values = [v for v in row.get(f'{key}_per_seed', []) if v is not None]
    if values:
      row[key] = statistics.fmean(values)
      row[f'{key}_std'] = statistics.pstdev(values) if len(values) > 1 else None


def summary_lines(results: dict) -> list[str]:
  """Per budget: each method's best trial by mean linear top-1, and macrl against the best of
  mae and mocov3, with twice the larger seed std (a gap smaller than that is a tie)."""
  rows, lines = results['rows'], []
  for budget in ('epochs', 'time'):
    candidates = [(n, r) for n, r in rows.items() if r.get('budget') == budget]
    if budget == 'time' and candidates:  # the reference's time run is its epochs run
      candidates += [(n, r) for n, r in rows.items()
                     if r.get('budget') == 'epochs' and r.get('trial') == results.get('reference')]
    best = {}
    for name, row in candidates:
      method = row['method']
      if 'linear_top1' in row and (method not in best or
                                   row['linear_top1'] > best[method][1]['linear_top1']):
        best[method] = (row.get('trial', name), row)
    if not best:
      continue
    chosen = ', '.join(f'{m}: {t} ({100 * r["linear_top1"]:.1f})' for m, (t, r) in best.items())
    lines += ['', f'Best trial of each method by linear top-1, {budget} budget: {chosen}.']
    rivals = [b for m, b in best.items() if m in ('mae', 'mocov3')]
    if 'macrl' in best and rivals:
      macrl = best['macrl'][1]
      for key, prefix in (('linear_top1', ''), ('finetune_top1', 'Fine-tuning top-1: ')):
        if key not in macrl or any(key not in r for _, r in rivals):
          continue
        rival_name, rival = max(rivals, key=lambda b: b[1][key])
        lines.append(prefix + _verdict(macrl, rival, rival_name, key))
  return lines


def _verdict(macrl: dict, rival: dict, rival_name: str, key: str) -> str:
  """macrl's gap to the rival on `key`, against twice the larger seed std (smaller: a tie)."""
  gap = macrl[key] - rival[key]
  stds = [r.get(f'{key}_std') for r in (macrl, rival)]
  if None in stds:
    return f'macrl − {rival_name}: {100 * gap:+.1f} points (one seed: no spread).'
  bar = 2 * max(stds)
  verdict = 'macrl ahead' if gap > bar else ('macrl behind' if gap < -bar else 'a tie')
  return (f'macrl − {rival_name}: {100 * gap:+.1f} points; twice the larger seed std: '
          f'{100 * bar:.1f}; {verdict}.')


def per_seed_text(row: dict, key: str) -> str:
  values = row.get(f'{key}_per_seed', [])
  return ', '.join('–' if v is None else f'{100 * v:.1f}' for v in values) or '–'


def render(results) -> str:
  seeds = results['seeds']
  # The fine-tuning columns only where a row has the metric: older tables render as they were.
  finetuned = any('finetune_top1' in row for row in results['rows'].values())
  header = ['run', 'method', 'overrides', 'budget', 'steps', 'kNN top-1', 'linear top-1',
            'linear per seed']
  header += ['fine-tune top-1', 'fine-tune per seed'] if finetuned else []
  header += ['pre-train min']
  lines = [f'Protocol: {results["protocol"]} (evaluated on {results["eval_split"]}). Budget: '
           f'{results["budget"]}. Pre-training seeds: {", ".join(map(str, seeds))}; figures are '
           'mean ± std over the seeds (population std), linear = BN + linear probe, kNN k=20 '
           'T=0.07.' + (f' Fine-tune: {results["finetune"]}.'
                        if finetuned and 'finetune' in results else ''),
           '', '| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]

  def pct(row, key):
    if key not in row:
      return '–'
    std = row.get(f'{key}_std')
    text = f'{100 * row[key]:.1f}' + (f' ± {100 * std:.1f}' if std is not None else '')
    if key == 'knn_top1' and 'knn_euclidean_top1' in row:
      text += f' (Euclidean: {100 * row["knn_euclidean_top1"]:.1f})'
    if key == 'linear_top1' and 'linear_C' in row:
      text += f' (logistic regression, C={row["linear_C"]:g})'
    return text

  for name, row in results['rows'].items():
    overrides = ', '.join(f'{k}={v}' for k, v in row.get('overrides', {}).items()) or '–'
    per_seed = per_seed_text(row, 'linear_top1')
    minutes = row.get('pretrain_seconds_per_seed')
    minutes = f'{statistics.fmean(minutes) / 60:.1f}' if minutes else '–'
    finetune = (f'{pct(row, "finetune_top1")} | {per_seed_text(row, "finetune_top1")} | '
                if finetuned else '')
    lines.append(f'| {row.get("trial", name)} | {row.get("method", "–")} | {overrides} | '
                 f'{row.get("budget", "–")} | {row.get("steps", "–")} | {pct(row, "knn_top1")} | '
                 f'{pct(row, "linear_top1")} | {per_seed} | {finetune}{minutes} |')
  lines += summary_lines(results)
  if results.get('step_seconds'):
    lines += ['', 'Step seconds (median, timed alternately in one process): ' + ', '.join(
        f'{k} {v:.3f}' for k, v in results['step_seconds'].items())]
  lines += ['', f'Command: `{results["command"]}`']
  return '\n'.join(lines) + '\n'


# ------------------------------------------------------------------- the kNN monitor over time
def time_rows(results: dict) -> dict:
  """The rows at equal time: each '(equal time)' row, and the reference's own (epochs) row."""
  rows = results['rows']
  return {name: row for name, row in rows.items()
          if row.get('budget') == 'time' or name == results.get('reference')}


def curve_minutes(results: dict, row: dict) -> tuple[list[float], list[list[float]]]:
  """(minutes, [per-seed top-1 at those points]) of a row's kNN monitor."""
  t = results['step_seconds']
  offset = 0.0
  if row.get('teacher_steps'):  # mimco at equal time: after its own teacher
    offset = row['teacher_steps'] * t[row['teacher']]
  curves = [c for c in row.get('knn_curve_per_seed', []) if c]
  steps = [s for s, _ in curves[0]] if curves else []
  per_seed = [[top1 for _, top1 in c] for c in curves if [s for s, _ in c] == steps]
  return [(offset + s * t[row['trial']]) / 60 for s in steps], per_seed
