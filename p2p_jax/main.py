"""Entry point: ``python -m p2p_jax.main --config=configs/<dataset>.py --workdir=DIR``.

The same command runs on one CPU, on a multi-GPU host, and on every host of a TPU pod slice or
GPU cluster (see launch/README.md). ``--mode=eval`` and ``--mode=translate`` restore the
generator from the workdir's checkpoints. Override any config field with
``--config.<field>=<value>``; unknown fields are an error.
"""
import errno
import gc
import logging as std_logging
import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

# Config files import `configs.default`: the repository root must be importable from any cwd.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(1, REPO_ROOT)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, TensorBoard events and results go here.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'translate'],
                  'train: train (resuming from the latest checkpoint in --workdir); eval: '
                  'translate and score a split; translate: translate a folder of images.')
flags.DEFINE_bool('accept_config_changes', False, 'Resume even where the config differs from '
                  "the checkpoint's in fields that change the training trajectory.")
# Launch settings (launch/ sets them, or their P2P_* environment variables); not saved.
flags.DEFINE_bool('distributed', False, 'Join jax.distributed, detecting the coordinator, '
                  'process count and id (TPU pods, SLURM, Open MPI).')
flags.DEFINE_string('coordinator_address', '', 'host:port of process 0; joins jax.distributed.')
flags.DEFINE_integer('num_processes', -1, 'Processes in the job (-1: environment or detected).')
flags.DEFINE_integer('process_id', -1, 'This process (-1: environment or detected).')
flags.DEFINE_integer('heartbeat_timeout_seconds', 100, 'A process silent this long counts as '
                     'dead, and all the others then exit with an error.')
flags.mark_flags_as_required(['config', 'workdir'])

LOG_FILE = 'log.txt'
# Whether this process joined jax.distributed (set by run): an error then exits at once.
_JOINED_DISTRIBUTED = [False]
# Expected failures: a message that names the option, file or checkpoint is the whole story.
_EXPECTED_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
                    PermissionError, FloatingPointError)


def _hide_accelerators_from_tensorflow():
  """clu's writers and tfds import TensorFlow: it must never claim accelerator memory."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TF only writes summaries here.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (seconds to import)
  tf.config.set_visible_devices([], 'GPU')


class _QuietOrbaxInfo:
  """Orbax logs a dozen INFO lines per save; keep the console to our progress lines."""

  def filter(self, record) -> bool:
    return record.levelno > std_logging.INFO or '/orbax/' not in record.pathname


def _is_disk_full(error: BaseException) -> bool:
  return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def _expected_error(error: BaseException):
  """The error to report in one line, or None for a bug (which keeps its traceback).

  A full disk is found anywhere in the chain: a writer flushed on the way out may raise over it.
  """
  from p2p_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  if isinstance(error, (*_EXPECTED_ERRORS, workdir_lock.WorkdirLockedError)):
    return error
  cause = error
  while cause is not None:
    if _is_disk_full(cause):
      return cause
    cause = cause.__cause__ or cause.__context__
  return None


def _log_to_workdir(path: str, config) -> None:
  """Appends this run's log (and its full config) to ``path``."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  handler = std_logging.FileHandler(path)
  handler.setFormatter(logging.PythonFormatter())  # The console's absl line format.
  handler.addFilter(_QuietOrbaxInfo())
  std_logging.getLogger().addHandler(handler)
  with open(path, 'a') as f:
    f.write(f'\n=== {" ".join(sys.argv)}\nConfig:\n{config}\n')


def run(config, workdir: str, mode: str, log_path: str) -> None:
  """Joins the distributed runtime (if asked), then trains, evaluates or translates."""
  if config.eval.inception_path:  # A missing file fails now, not after training or eval.
    from p2p_jax import inception  # pylint: disable=g-import-not-at-top
    inception.check_path(config.eval.inception_path)
  from p2p_jax import host_memory  # pylint: disable=g-import-not-at-top
  if host_memory.jax_runs_on_cpu():  # Before JAX creates its CPU client.
    host_memory.keep_freed_memory_mapped()
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # No probing for absent accelerators.
  logging.get_absl_handler().addFilter(_QuietOrbaxInfo())
  # Before any other JAX call: multi-host runs join the distributed runtime here.
  from p2p_jax import parallel  # pylint: disable=g-import-not-at-top
  settings = parallel.distributed_settings(FLAGS.coordinator_address, FLAGS.num_processes,
                                           FLAGS.process_id)
  parallel.initialize_distributed(FLAGS.distributed, settings, FLAGS.heartbeat_timeout_seconds)
  _JOINED_DISTRIBUTED[0] = FLAGS.distributed or bool(settings['coordinator_address'])

  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0 and '://' not in log_path:
    _log_to_workdir(log_path, config)
  _hide_accelerators_from_tensorflow()
  logging.info('Process %d of %d; %d local / %d global devices: %s', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.local_devices())
  if mode == 'train':
    from p2p_jax import train, workdir_lock  # pylint: disable=g-import-not-at-top
    if jax.process_index() == 0:  # The other processes are part of the same run.
      with workdir_lock.WorkdirLock(workdir):
        train.train_and_evaluate(config, workdir, FLAGS.accept_config_changes)
    else:
      train.train_and_evaluate(config, workdir, FLAGS.accept_config_changes)
  else:
    from p2p_jax import evaluate  # pylint: disable=g-import-not-at-top
    (evaluate.evaluate if mode == 'eval' else evaluate.translate)(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  workdir = os.path.expanduser(FLAGS.workdir)
  log_path = os.path.join(workdir, LOG_FILE)
  try:
    run(FLAGS.config, workdir, FLAGS.mode, log_path)
  except Exception as e:  # pylint: disable=broad-except
    expected = _expected_error(e)
    if expected is None:
      raise
    logged = os.path.isfile(log_path)
    if logged:
      try:
        with open(log_path, 'a') as f:
          traceback.print_exc(file=f)
      except OSError:  # The log's disk may be the full one.
        logged = False
    where = f' (details: {log_path})' if logged else ''
    sys.stdout.flush()
    print(f'ERROR: {expected}{where}', file=sys.stderr, flush=True)
    if _JOINED_DISTRIBUTED[0]:  # Exiting normally would wait on the other processes.
      os._exit(1)  # pylint: disable=protected-access
    # The failed frames hold the last batch, whose shared memory grain unlinks when it is
    # freed; a normal exit then also releases the workers' semaphores (no 'leaked' warning).
    traceback.clear_frames(e.__traceback__)
    del e, expected
    gc.collect()
    sys.exit(1)


def _check_config_path(argv: list) -> list:
  """A ``--config`` file that does not exist is one clear line, before absl tries to load it.

  A relative path that is missing from the current directory but exists in the repository
  (``configs/demo.py`` run from elsewhere) is taken from the repository.
  """
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      path = arg.split('=', 1)[1]
      if os.path.isfile(path.split(':', 1)[0]):
        return argv
      in_repo = os.path.join(REPO_ROOT, path)
      if not os.path.isabs(path) and os.path.isfile(in_repo.split(':', 1)[0]):
        return argv[:i] + [f'--config={in_repo}'] + argv[i + 1:]
      sys.exit(f'ERROR: --config={path}: no such file (looked in {os.getcwd()} and in '
               f'{REPO_ROOT}).')
  return argv


if __name__ == '__main__':
  app.run(main, argv=_check_config_path(sys.argv))
