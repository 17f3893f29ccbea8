"""Entry point: ``python -m p2p_jax.main --config=configs/<dataset>.py --workdir=DIR``.

The same command runs on one CPU, on a multi-GPU host, and on every host of a TPU pod slice or
GPU cluster (see launch/README.md). ``--mode=eval`` and ``--mode=translate`` restore the
generator from the workdir's checkpoints. Override any config field with
``--config.<field>=<value>``; unknown fields are an error.
"""
import logging as std_logging

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, TensorBoard events and results go here.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'translate'],
                  'train: train (resuming from the latest checkpoint in --workdir); eval: '
                  'translate and score a split; translate: translate a folder of images.')
# Launch settings (launch/ sets them, or their P2P_* environment variables); not saved.
flags.DEFINE_bool('distributed', False, 'Join jax.distributed, detecting the coordinator, '
                  'process count and id (TPU pods, SLURM, Open MPI).')
flags.DEFINE_string('coordinator_address', '', 'host:port of process 0; joins jax.distributed.')
flags.DEFINE_integer('num_processes', -1, 'Processes in the job (-1: environment or detected).')
flags.DEFINE_integer('process_id', -1, 'This process (-1: environment or detected).')
flags.DEFINE_integer('heartbeat_timeout_seconds', 100, 'A process silent this long counts as '
                     'dead, and all the others then exit with an error.')
flags.mark_flags_as_required(['config', 'workdir'])


def _hide_accelerators_from_tensorflow():
  """clu's writers and tfds import TensorFlow: it must never claim accelerator memory."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (seconds to import)
  tf.config.set_visible_devices([], 'GPU')


class _QuietOrbaxInfo:
  """Orbax logs a dozen INFO lines per save; keep the console to our progress lines."""

  def filter(self, record) -> bool:
    return record.levelno > std_logging.INFO or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  from p2p_jax import host_memory  # pylint: disable=g-import-not-at-top
  if host_memory.jax_runs_on_cpu():  # Before JAX creates its CPU client.
    host_memory.keep_freed_memory_mapped()
  logging.get_absl_handler().addFilter(_QuietOrbaxInfo())
  # Before any other JAX call: multi-host runs join the distributed runtime here.
  from p2p_jax import parallel  # pylint: disable=g-import-not-at-top
  settings = parallel.distributed_settings(FLAGS.coordinator_address, FLAGS.num_processes,
                                           FLAGS.process_id)
  parallel.initialize_distributed(FLAGS.distributed, settings, FLAGS.heartbeat_timeout_seconds)

  import jax  # pylint: disable=g-import-not-at-top
  _hide_accelerators_from_tensorflow()
  logging.info('Config:\n%s', config)
  logging.info('Process %d of %d; %d local / %d global devices: %s', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.local_devices())

  if FLAGS.mode == 'train':
    from p2p_jax import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(config, FLAGS.workdir)
  else:
    from p2p_jax import evaluate  # pylint: disable=g-import-not-at-top
    run = evaluate.evaluate if FLAGS.mode == 'eval' else evaluate.translate
    run(config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
