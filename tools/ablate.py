"""Ablation: pre-train several methods/variants at one budget, probe each, write Markdown + JSON.

  python tools/ablate.py --config=configs/digits.py --out=results/digits
  python tools/ablate.py --config=configs/tiny_imagenet.py --out=results/tin10_32px \
      --config.manual_dir=../shared/data/tiny-imagenet-10 --config.num_classes=10 \
      --config.image_size=32 --config.model.variant=mu/4 --config.total_steps=1500
  python tools/ablate.py --out=results/digits --report_only   # re-render the tables from the JSON

Runs (`--runs`, comma-separated names): the methods macrl, mae, mocov3, mimco (whose teacher is this
ablation's mocov3 run, so mimco costs two budgets), and macrl design choices written NAME=a=b;c=d in
--variants. Each run pre-trains into OUT/runs/NAME (rerunning resumes an unfinished run and skips a
finished one already in OUT/results.json; delete its row to probe it again), then is probed on frozen features: weighted kNN (k 20, T 0.07), linear probe (BatchNorm without affine +
linear, mean over seeds) on all labels and on `--shots` labels per class. Raw pixels (logistic
regression, 20-NN by cosine and Euclidean distance) and the randomly initialised encoder are the
baselines. Results go to
OUT/results.json and OUT/results.md; `--readme` also replaces the block between
`<!-- ablation:NAME -->` and `<!-- /ablation:NAME -->` in README.md.
"""

import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'Pre-training config (and overrides).',
                                lock_config=False)
flags.DEFINE_string('out', None, 'Output folder (runs/, results.json, results.md).', required=True)
flags.DEFINE_list('runs', ['macrl', 'mae', 'mocov3', 'mimco'], 'Methods and variant names to run.')
flags.DEFINE_list('variants', [], 'Design-choice runs of macrl: NAME=field=value;field=value.')
flags.DEFINE_integer('shots', 10, 'Labelled examples per class for the low-shot probe.')
flags.DEFINE_integer('seeds', 3, 'Seeds of each linear probe (low-shot: each draws its own shots).')
flags.DEFINE_integer('probe_epochs', 100, 'Epochs of the linear probe on cached features.')
flags.DEFINE_bool('report_only', False, 'Only re-render results.md (and README) from results.json.')
flags.DEFINE_string('readme', None, 'Name of the README block to replace with the table.')
FLAGS = flags.FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_variants(specs):
  """['qm=key_mask=same;queue_size=4096'] -> {'qm': {'key_mask': 'same', 'queue_size': 4096}}."""
  out = {}
  for spec in specs:
    name, _, fields = spec.partition('=')
    out[name] = {}
    for item in filter(None, fields.split(';')):
      key, value = item.split('=', 1)
      out[name][key] = json.loads(value) if value[:1] in '-0123456789[{tfn' else value
  return out


def run_config(base, name, variants, teacher_dir):
  from macrl_jax import presets
  config = copy.deepcopy(base)
  if name in presets.METHODS:
    presets.apply_method(config, name)
    if name == 'mimco':
      config.teacher.workdir = teacher_dir
  else:
    presets.apply_method(config, 'macrl')
    for key, value in variants[name].items():
      target = config
      *parents, leaf = key.split('.')
      for p in parents:
        target = target[p]
      target[leaf] = value
  return config


def pixel_baselines(config):
  """Logistic regression and 20-NN on the eval pipeline's normalised pixels.

  20-NN both by cosine (as the encoder's kNN probe) and by Euclidean distance; logistic regression
  on standardised pixels with its C chosen by 3-fold cross-validation on the train split (at
  scikit-learn's default C=1 it overfits 3,072 pixels: 19.0 % on tiny-imagenet-10 at 32 px).
  """
  from sklearn.linear_model import LogisticRegressionCV
  from sklearn.neighbors import KNeighborsClassifier
  from sklearn.preprocessing import StandardScaler

  from macrl_jax import input_pipeline
  import numpy as np

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
          'linear_C': float(np.ravel(logreg.C_)[0]),  # one C for all classes (multinomial)
          'knn_top1': float(knn['cosine']), 'knn_euclidean_top1': float(knn['euclidean'])}


def probe(restored):
  from macrl_jax import evaluation, knn, probe as probe_lib
  c = restored.config
  train_x, train_y = evaluation.split_features(restored, c.train_split)
  test_x, test_y = evaluation.split_features(restored, c.test_split)
  kw = dict(seeds=FLAGS.seeds, epochs=FLAGS.probe_epochs)
  full = probe_lib.linear_probe(train_x, train_y, test_x, test_y, c.num_classes, **kw)
  few = probe_lib.linear_probe(train_x, train_y, test_x, test_y, c.num_classes, shots=FLAGS.shots,
                               **kw)
  return {'knn_top1': knn.knn_top1(train_x, train_y, test_x, test_y, c.num_classes,
                                   c.knn.k, c.knn.temperature),
          'linear_top1': full['top1'], 'linear_top1_std': full['top1_std'],
          f'linear_{FLAGS.shots}shot_top1': few['top1'],
          f'linear_{FLAGS.shots}shot_top1_std': few['top1_std']}


def render(results) -> str:
  shots = results['shots']
  cols = ['knn_top1', 'linear_top1', f'linear_{shots}shot_top1']
  lines = [f'Budget: {results["budget"]}. Probes: kNN k=20 T=0.07; linear (BN + linear) mean ± std '
           f'over {results["seeds"]} seeds; {shots}-shot linear over {results["seeds"]} draws.',
           '', '| run | overrides | kNN top-1 | linear top-1 | %d-shot linear top-1 | pre-train min |'
           % shots, '| --- | --- | --- | --- | --- | --- |']

  def pct(row, key):
    if key not in row:
      return '–'
    std = row.get(f'{key}_std')
    text = f'{100 * row[key]:.1f}' + (f' ± {100 * std:.1f}' if std is not None else '')
    if key == 'knn_top1' and 'knn_euclidean_top1' in row:  # the pixel baseline
      text += f' (Euclidean: {100 * row["knn_euclidean_top1"]:.1f})'
    if key == 'linear_top1' and 'linear_C' in row:
      text += f' (logistic regression, C={row["linear_C"]:g})'
    return text

  first = ['pixels', 'random init', 'macrl', 'mae', 'mocov3', 'mimco']  # then the variants
  names = [n for n in first if n in results['rows']]
  for name in names + [n for n in results['rows'] if n not in first]:
    row = results['rows'][name]
    minutes = f'{row["pretrain_seconds"] / 60:.1f}' if row.get('pretrain_seconds') else '–'
    overrides = ', '.join(f'{k}={v}' for k, v in row.get('overrides', {}).items()) or '–'
    lines.append(f'| {name} | {overrides} | ' + ' | '.join(pct(row, k) for k in cols) +
                 f' | {minutes} |')
  lines += ['', f'Command: `{results["command"]}`']
  return '\n'.join(lines) + '\n'


def write_outputs(results):
  with open(os.path.join(FLAGS.out, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)  # rows in the order they ran
  table = render(results)
  with open(os.path.join(FLAGS.out, 'results.md'), 'w') as f:
    f.write(table)
  if FLAGS.readme:
    path = os.path.join(REPO, 'README.md')
    text = open(path).read()
    start, end = f'<!-- ablation:{FLAGS.readme} -->', f'<!-- /ablation:{FLAGS.readme} -->'
    if start in text and end in text:
      head, rest = text.split(start, 1)
      text = head + start + '\n' + table + end + rest.split(end, 1)[1]
      open(path, 'w').write(text)
    else:
      logging.warning('README.md has no %s ... %s block; table left in %s', start, end, FLAGS.out)
  print(table)


def main(argv):
  del argv
  os.makedirs(FLAGS.out, exist_ok=True)
  path = os.path.join(FLAGS.out, 'results.json')
  if FLAGS.report_only:
    write_outputs(json.load(open(path)))
    return
  from macrl_jax import restore, train

  base = FLAGS.config
  variants = parse_variants(FLAGS.variants)
  results = json.load(open(path)) if os.path.exists(path) else {'rows': {}}
  results.update(shots=FLAGS.shots, seeds=FLAGS.seeds, command=' '.join(['python'] + sys.argv),
                 budget=f'{base.total_steps} steps × batch {base.batch_size}, '
                        f'{base.dataset} at {base.image_size} px, variant {base.model.variant}')
  if 'pixels' not in results['rows']:
    results['rows']['pixels'] = pixel_baselines(base)
  if 'random init' not in results['rows']:
    results['rows']['random init'] = probe(restore.random_init(run_config(base, 'macrl', {}, None)))
  write_outputs(results)

  names = list(FLAGS.runs) + [v for v in variants if v not in FLAGS.runs]
  if 'mimco' in names and 'mocov3' not in names:
    names.insert(names.index('mimco'), 'mocov3')  # the teacher
  if 'mimco' in names:  # train the teacher first
    names.remove('mimco')
    names.insert(names.index('mocov3') + 1, 'mimco')
  for name in names:
    workdir = os.path.join(FLAGS.out, 'runs', name)
    config = run_config(base, name, variants, os.path.join(FLAGS.out, 'runs', 'mocov3'))
    if name in results['rows'] and config.total_steps in restore.available_steps(workdir):
      continue  # pre-trained and probed by an earlier call
    start = time.time()
    train.train_and_evaluate(config, workdir)
    seconds = time.time() - start
    row = probe(restore.load_workdir(workdir))
    row['overrides'] = variants.get(name, {})
    previous = results['rows'].get(name, {})
    row['pretrain_seconds'] = previous.get('pretrain_seconds') if seconds < 60 and previous else seconds
    results['rows'][name] = row
    write_outputs(results)


if __name__ == '__main__':
  app.run(main)
