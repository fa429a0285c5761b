"""Method comparison: pre-train trials over seeds at equal epochs or equal time, probe, tabulate.

  # 1. choose hyperparameters on the held-out selection split (10 % of each train class)
  python tools/ablate.py --config=configs/tiny_imagenet_10.py \
      --config.manual_dir=../shared/data/tiny-imagenet-10 \
      --trials=results/tiny_imagenet_10/selection_trials.json --protocol=selection --seeds=0 \
      --out=results/tiny_imagenet_10/selection
  # 2. the chosen trials on the validation split, 3 pre-training seeds, both budgets
  python tools/ablate.py --config=configs/tiny_imagenet_10.py \
      --config.manual_dir=../shared/data/tiny-imagenet-10 \
      --trials=results/tiny_imagenet_10/final_trials.json --protocol=final --seeds=0,1,2 \
      --budgets=epochs,time --out=results/tiny_imagenet_10/final
  python tools/ablate.py ... --report_only   # re-render results.md from results.json

Trials (a JSON file): {"NAME": {"method": "macrl", "overrides": {"optim.base_lr": 3e-3}}, ...};
a mimco trial names its teacher trial ("teacher": "mocov3"), whose run of the same seed and budget
is its teacher. A trial's config is the --config file built for its method (`:method=M`, so with
the file's values for M), then the command's --config.FIELD overrides, then the trial's.

Protocols: `selection` pre-trains on the train split less `--holdout_fraction` of each class and
evaluates on that held-out part (the split 'holdout'); `final` pre-trains on the whole train split
and evaluates on config.test_split. Choose on `selection`, report `final`.

Budgets: `epochs` runs every trial for config.total_steps; `time` gives each trial the step time of
the `--reference` trial's total_steps: its steps are total_steps × t_reference / t_trial, with the
step times t measured here alternately (`--timing_rounds` rounds of compiled steps on a random
batch), so that a cheaper method gets more steps (warm-up, kNN monitor points and checkpoints
scaled alike). Trials added to the file later are timed with the reference again and scaled to
its first timing. At equal time a mimco trial's budget includes its teacher: `teacher_share` (0.5)
of the reference's seconds pre-train a teacher of its own (OUT/runs/TEACHER/teacher<steps>/seedS,
shared by mimco trials with the same teacher), the rest the student. At equal epochs its teacher is
the teacher trial's own run.

Probes of every (trial, budget, seed): weighted kNN (k, T of config.knn) and the linear probe (BN
without affine + linear, SGD, `--probe_epochs`) on frozen features; the row keeps each seed's
figures (`*_per_seed`) and their mean and std. Baselines: raw pixels (logistic regression with C
chosen by 3-fold cross-validation on the train split, 20-NN by cosine and Euclidean distance) and
the randomly initialised encoder of each seed. With --finetune, a third metric: the encoder
fine-tuned with the recipe of config.finetune (one for every method; `label_fraction` of each class
of the train split, the same examples for every method and seed; the random encoder at layer_decay
1), into RUN/finetune_metric, seeded by the pre-training seed; a finished row that lacks it gets it
on a rerun with the flag. Each run pre-trains into OUT/runs/NAME/BUDGET/seedS
and is skipped once its row holds that seed, so rerunning the command resumes. Results:
OUT/results.json and OUT/results.md (`--readme=NAME` also replaces the README block between
`<!-- ablation:NAME -->` and `<!-- /ablation:NAME -->`).
"""

import json
import os
import sys
import time


from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from macrl_jax import errors  # noqa: E402
from macrl_jax.errors import UserError  # noqa: E402
from macrl_jax.run import comparison  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'Pre-training config (and overrides).',
                                lock_config=False)
flags.DEFINE_string('out', None, 'Output folder (runs/, results.json, results.md).', required=True)
flags.DEFINE_string('trials', None, 'JSON file of the trials: {NAME: {method, overrides}}.')
flags.DEFINE_list('runs', [], 'Only these trials (default: all of the file).')
flags.DEFINE_enum('protocol', 'selection', ['selection', 'final'],
                  'selection: evaluate on the held-out part of train; final: on the test split.')
flags.DEFINE_float('holdout_fraction', 0.1, 'Per-class fraction of train held out (selection).')
flags.DEFINE_list('seeds', ['0'], 'Pre-training seeds.')
flags.DEFINE_list('budgets', ['epochs'], 'epochs and/or time (see the module docstring).')
flags.DEFINE_string('reference', 'macrl', 'The trial whose step time sets the time budget.')
flags.DEFINE_integer('timing_rounds', 3, 'Alternating rounds of step timing (time budget).')
flags.DEFINE_integer('probe_epochs', 100, 'Epochs of the linear probe on cached features.')
flags.DEFINE_bool('finetune', False, 'Also fine-tune every run with the recipe of config.finetune '
                  '(its label_fraction of train, the same examples for all): a third metric.')
flags.DEFINE_bool('pixels', True, 'Also the raw-pixel baselines (a logistic regression on all pixels: '
                  'minutes on a large train split).')
flags.DEFINE_bool('report_only', False, 'Only re-render results.md (and README) from results.json.')
flags.DEFINE_string('readme', None, 'Name of the README block to replace with the table.')
FLAGS = flags.FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------- configs
def method_config(method: str):
  """The --config file built for `method` (its own tuned values), then the command's overrides."""
  import importlib.util

  from macrl_jax.config import schema
  path, _, _ = config_flags.get_config_filename(FLAGS['config']).partition(':')
  spec = importlib.util.spec_from_file_location('ablate_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f'method={method}')
  for field, value in config_flags.get_override_values(FLAGS['config']).items():
    schema.set_field(config, field, value)
  if FLAGS.protocol == 'selection':
    config.data.holdout_fraction = FLAGS.holdout_fraction
    config.test_split = 'holdout'
  return config


def trial_config(trial: dict, seed: int, steps: int | None = None):
  """The trial's config for `seed`; with `steps`, the warm-up scaled to that length and as many
  kNN monitor points and checkpoints as the config's own length has."""
  from macrl_jax.config import schema
  config = method_config(trial['method'])
  for field, value in trial.get('overrides', {}).items():
    schema.set_field(config, field, value)
  config.seed = seed
  if steps is not None and steps != config.total_steps:
    file_config = config.copy_and_resolve_references()
    config.total_steps = steps
    schema.follow_the_user(config, file_config, {'total_steps'})
    for every in ('eval_every_steps', 'checkpoint_every_steps'):
      points = max(1, file_config.total_steps // file_config[every])
      config[every] = -(-steps // points)
  return config


def timing_config(trials: dict, name: str):
  """A trial's config to time its step; a mimco trial's teacher is its teacher trial's
  architecture (random weights time alike)."""
  import ml_collections
  config = trial_config(trials[name], 0)
  if config.method == 'mimco':
    teacher = trial_config(trials[trials[name]['teacher']], 0)
    config.teacher.spec = ml_collections.ConfigDict(dict(
        method=teacher.method, image_size=teacher.image_size, model=teacher.model.to_dict()))
  return config


def step_seconds(known: dict, trials: dict, names: list) -> dict:
  """Each trial's step seconds, timed alternately with the reference's. Trials that a later run
  adds are timed with the reference again and scaled by its first timing, so that one reference
  time sets every budget."""
  from macrl_jax.run import step_timing
  missing = [n for n in names if n not in known]
  if not missing:
    return known
  timed = [FLAGS.reference] + [n for n in missing if n != FLAGS.reference]
  seconds = step_timing.alternating_step_seconds({n: timing_config(trials, n) for n in timed},
                                                 rounds=FLAGS.timing_rounds)
  scale = known[FLAGS.reference] / seconds[FLAGS.reference] if FLAGS.reference in known else 1.0
  return dict(known, **{n: seconds[n] * scale for n in timed if n not in known})


def budget_steps(results: dict, trials: dict, name: str, budget: str, base) -> tuple:
  """(steps, teacher steps): at equal epochs every trial runs total_steps (a mimco trial after its
  teacher trial's own run); at equal time each gets the reference's seconds, and a mimco trial
  spends `teacher_share` of them (0.5 by default) on a teacher of its own and the rest on itself
  (mimco trials whose teachers are the same trial and length share that teacher's run)."""
  trial = trials[name]
  if budget == 'epochs':
    return base.total_steps, None
  t = results['step_seconds']
  seconds = base.total_steps * t[FLAGS.reference]
  if trial['method'] != 'mimco':
    return round(seconds / t[name]), None
  share = trial.get('teacher_share', 0.5)
  return round((1 - share) * seconds / t[name]), round(share * seconds / t[trial['teacher']])


def probe(restored, seed: int) -> dict:
  """kNN and linear-probe top-1 of the encoder, as tools/knn_eval.py and linear_probe.py compute
  them (one probe run, seeded by the pre-training seed)."""
  from macrl_jax.evals import features, knn, probe as probe_lib
  c = restored.config
  train_x, train_y = features.restored_features(restored, c.train_split)
  test_x, test_y = features.restored_features(restored, c.test_split)
  linear = probe_lib.linear_probe(train_x, train_y, test_x, test_y, c.num_classes, seeds=[seed],
                                  epochs=FLAGS.probe_epochs)
  return {'knn_top1': knn.evaluate(train_x, train_y, test_x, test_y, c.num_classes, c.knn.k,
                                   c.knn.temperature)['top1'],
          'linear_top1': linear['top1']}


def knn_curve(run_dir: str) -> list[list[float]]:
  """[[step, kNN top-1], ...]: the run's kNN monitor as its metrics.jsonl logged it."""
  path = os.path.join(run_dir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [[row['step'], row['knn_top1']] for row in rows if 'knn_top1' in row]


def needs_finetune(row: dict, seed: int) -> bool:
  """Whether --finetune asks for a figure that the row lacks for `seed`."""
  if not FLAGS.finetune:
    return False
  seeds, values = row.get('seeds', []), row.get('finetune_top1_per_seed', [])
  return seed not in seeds or seeds.index(seed) >= len(values) or values[seeds.index(seed)] is None


def record_finetune(row: dict, seed: int, restored, from_scratch: bool = False) -> bool:
  """Fine-tunes the restored encoder into the row; False when stopped (a rerun resumes it)."""
  top1 = comparison.finetune_top1(restored, seed, from_scratch)
  if top1 is None:
    logging.warning('Stopped while fine-tuning %s; rerun the same command to resume.',
                    restored.workdir)
    return False
  comparison.record(row, seed, {'finetune_top1': top1})
  return True


def finetune_description(config) -> str:
  """The fine-tuning metric's recipe, for the table's header."""
  f = config.finetune
  return (f'{100 * f.label_fraction:g} % of the train labels (label_seed {f.label_seed}), '
          f'{f.epochs:g} epochs, batch {f.batch_size}, base_lr {f.base_lr:g}, layer_decay '
          f'{f.layer_decay:g} (random init: 1), drop_path {f.drop_path:g}, mixup {f.mixup:g}, '
          f'cutmix {f.cutmix:g}')


def dataset_name(config) -> str:
  """The dataset as the table names it: an image folder by its folder's name, not its path."""
  name = config.dataset
  if name.startswith('folder:'):
    return f'{os.path.basename(name.rstrip("/"))} (image folder)'
  return name


def write_outputs(results):
  with open(os.path.join(FLAGS.out, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  table = comparison.render(results)
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


def pretrain(config, run_dir: str) -> tuple[float, bool]:
  """(seconds, stopped): pre-trains into run_dir (resuming it); stopped by SIGTERM or Ctrl-C, the
  run has saved its state and nothing is recorded."""
  from macrl_jax.run import train
  start = time.time()
  outcome = train.train_and_evaluate(config, run_dir)
  if outcome.get('preempted'):
    logging.warning('Stopped during %s; rerun the same command to resume.', run_dir)
    return time.time() - start, True
  return time.time() - start, False


# ----------------------------------------------------------------------------------------- main
def main(argv):
  del argv
  os.makedirs(FLAGS.out, exist_ok=True)
  path = os.path.join(FLAGS.out, 'results.json')
  if FLAGS.report_only:
    write_outputs(json.load(open(path)))
    return
  from macrl_jax.run import restore

  if not FLAGS.trials:
    raise UserError('--trials=FILE is required (a JSON object of trials)')
  with open(FLAGS.trials) as f:
    trials = json.load(f)
  names = FLAGS.runs or list(trials)
  unknown = sorted(set(names) - set(trials))
  if unknown:
    raise UserError(f'--runs: {unknown} are not trials of {FLAGS.trials}: {sorted(trials)}')
  for name in list(names):  # a mimco trial's teacher trains before it
    teacher = trials[name].get('teacher')
    if trials[name]['method'] == 'mimco' and teacher not in trials:
      raise UserError(f'trial {name!r}: its "teacher" {teacher!r} is not a trial')
    if teacher and teacher not in names[:names.index(name)]:
      if teacher in names:
        names.remove(teacher)
      names.insert(names.index(name), teacher)
  if 'time' in FLAGS.budgets and FLAGS.reference not in names:
    raise UserError(f'--reference={FLAGS.reference!r} (whose step time sets the time budget) '
                         f'is not among the trials run: {names}')
  for budget in FLAGS.budgets:
    if budget not in ('epochs', 'time'):
      raise UserError(f'--budgets: {budget!r} is not one of epochs, time')
  seeds = [int(s) for s in FLAGS.seeds]
  base = method_config('macrl')
  results = json.load(open(path)) if os.path.exists(path) else {'rows': {}}
  results.update(protocol=FLAGS.protocol, eval_split=base.test_split, reference=FLAGS.reference,
                 command=' '.join(
      ['python'] + sys.argv), seeds=sorted(set(results.get('seeds', [])) | set(seeds)),
      budget=f'{base.total_steps} steps × batch {base.batch_size} (epochs), {dataset_name(base)} '
             f'at {base.image_size} px, variant {base.model.variant}')
  rows = results['rows']

  if FLAGS.pixels and 'pixels' not in rows:
    rows['pixels'] = comparison.pixel_baselines(base)
  if 'time' in FLAGS.budgets:
    results['step_seconds'] = step_seconds(results.get('step_seconds', {}), trials, names)
  write_outputs(results)

  if FLAGS.finetune:
    results['finetune'] = finetune_description(base)

  for seed in seeds:
    random_row = rows.setdefault('random init', {'trial': 'random init'})
    if seed not in random_row.get('seeds', []) or needs_finetune(random_row, seed):
      restored = restore.random_init(trial_config({'method': 'macrl'}, seed))
      if seed not in random_row.get('seeds', []):
        comparison.record(random_row, seed, probe(restored, seed))
        write_outputs(results)
      # Its fine-tuning checkpoints go beside the runs' (a random init has no workdir).
      restored = restored._replace(
          workdir=os.path.join(FLAGS.out, 'runs', 'random_init', f'seed{seed}'))
      if needs_finetune(random_row, seed):
        if not record_finetune(random_row, seed, restored, from_scratch=True):
          return
        write_outputs(results)
    for asked in FLAGS.budgets:
      for name in names:
        trial, budget = trials[name], asked
        if budget == 'time' and name == FLAGS.reference:
          if 'epochs' in FLAGS.budgets:
            continue  # its time budget is its epochs budget: the same run, made there
          budget = 'epochs'
        steps, teacher_steps = budget_steps(results, trials, name, budget, base)
        key = name if budget == 'epochs' else f'{name} (equal time)'
        row = rows.setdefault(key, {'trial': name, 'method': trial['method'], 'budget': budget,
                                    'overrides': trial.get('overrides', {}), 'steps': steps})
        if teacher_steps:
          row.update(teacher=trial['teacher'], teacher_steps=teacher_steps)
        run_dir = os.path.join(FLAGS.out, 'runs', name, budget, f'seed{seed}')
        if seed not in row.get('seeds', []):
          seconds = 0.0
          config = trial_config(trial, seed, steps)
          if trial['method'] == 'mimco':
            config.teacher.workdir = os.path.join(FLAGS.out, 'runs', trial['teacher'], budget,
                                                  f'seed{seed}')
            if teacher_steps:  # its own teacher, within its time (one for equal teachers)
              config.teacher.workdir = os.path.join(FLAGS.out, 'runs', trial['teacher'],
                                                    f'teacher{teacher_steps}', f'seed{seed}')
              seconds, stopped = pretrain(trial_config(trials[trial['teacher']], seed,
                                                       teacher_steps), config.teacher.workdir)
              if stopped:
                return
          more, stopped = pretrain(config, run_dir)
          if stopped:
            return
          comparison.record(row, seed, dict(probe(restore.load_workdir(run_dir), seed),
                                            pretrain_seconds=seconds + more,
                                            knn_curve=knn_curve(run_dir)))
          write_outputs(results)
        if needs_finetune(row, seed):  # also for a run probed before --finetune was given
          if not record_finetune(row, seed, restore.load_workdir(run_dir)):
            return
          write_outputs(results)


if __name__ == '__main__':
  errors.run(main)
