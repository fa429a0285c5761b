"""Pre-trains a MACRL / MAE / MoCo v3 / MimCo model.

  python main.py                                   # the embedded digits default, a few minutes on CPU
  python main.py --config=configs/cifar100.py:method=mae --workdir=/tmp/c100_mae \
      --config.batch_size=512
Rerunning the same command resumes from the latest checkpoint in --workdir.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from macrl_jax import errors

REPO = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(REPO, 'configs', 'digits.py')

if __name__ == '__main__':
  # Before the config flag loads the file and applies the overrides, which it reports as chained
  # tracebacks: a missing file or an unknown field ends in one line instead.
  try:
    errors.check_config_args(sys.argv[1:], DEFAULT_CONFIG)
  except errors.UserError as e:
    errors.fail(str(e))

config_flags.DEFINE_config_file(
    'config', DEFAULT_CONFIG,
    'Config file, optionally with arguments: configs/NAME.py:method=mae,variant=S/4.',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints and logs go. Default: workdirs/<dataset>_<method>.')
flags.DEFINE_enum('distributed', 'auto', ['auto', 'yes', 'no'],
                  'Call jax.distributed.initialize(): auto = on a TPU pod slice or in a SLURM job of '
                  'several tasks, or when --coordinator_address is given.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host without SLURM/TPU).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (with --coordinator_address).')
flags.DEFINE_integer('process_id', None, 'This process (with --coordinator_address).')
FLAGS = flags.FLAGS


def _cluster_detected() -> bool:
  slurm = int(os.environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_JOB_ID' in os.environ
  tpu_pod = len(os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1
  return slurm or tpu_pod


def _init_distributed() -> None:
  import jax
  wanted = FLAGS.distributed == 'yes' or (
      FLAGS.distributed == 'auto' and (FLAGS.coordinator_address or _cluster_detected()))
  if not wanted:
    return
  # CPU devices of several processes exchange collectives through gloo (no effect on GPU/TPU).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                             num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def _log_to_file(workdir: str) -> None:
  """The full log (INFO and up) to WORKDIR/main.INFO; on the terminal only warnings and errors
  (--logtostderr keeps everything on the terminal)."""
  logging.get_absl_handler().use_absl_log_file('main', workdir)
  if not FLAGS.alsologtostderr:
    FLAGS.stderrthreshold = 'warning'


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  config = FLAGS.config
  from macrl_jax.config import schema
  schema.follow_the_user(config, errors.file_config(sys.argv[1:], DEFAULT_CONFIG),
                          errors.overridden_fields(sys.argv[1:]))
  dataset = config.dataset.replace(':', '_').replace('/', '_')
  workdir = FLAGS.workdir or os.path.join('workdirs', f'{dataset}_{config.method}')
  # A bad value or a workdir that is a file ends here, in a second: before TensorFlow loads and
  # JAX starts its devices (train.py checks again, with the number of devices).
  from macrl_jax.config import checks
  from macrl_jax.data import tensorflow_import
  from macrl_jax.run import logs, workdirs
  checks.validate(config)
  workdirs.refuse_a_file(workdir)
  logs.quiet_libraries()
  workdirs.prepare(workdir)
  _log_to_file(workdir)  # each process its own file
  tensorflow_import.quietly()
  _init_distributed()
  from macrl_jax.run import train
  train.train_and_evaluate(config, workdir, console=True)


if __name__ == '__main__':
  errors.run(main)
