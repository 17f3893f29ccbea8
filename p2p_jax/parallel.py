"""Device mesh, shardings and host-local -> global batches.

One 1-D mesh over every device of every process, with a single ``data`` axis. The batch is
sharded on ``data``; parameters and optimizer state are replicated. Under ``jit``, XLA's SPMD
partitioner turns batch reductions (batch norm, losses) into cross-device reductions, so the
step computes exactly what one device would on the global batch.
"""
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def create_mesh(devices=None) -> Mesh:
  """A 1-D ``data`` mesh over ``devices`` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  # Auto axis types: Explicit (jax.make_mesh's default) breaks flax convs on sharded inputs.
  return Mesh(np.asarray(devices), (DATA_AXIS,),
              axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh,
                     option: str = 'config.data.batch_size') -> None:
  """Raises a clear error unless the global batch splits evenly over devices and processes."""
  check_batch_splits_over_processes(global_batch_size, option)
  num_devices = mesh.devices.size
  if global_batch_size % num_devices:
    raise ValueError(
        f'{option}={global_batch_size} is not divisible by the {num_devices} devices of the '
        f'mesh; use a multiple of {num_devices}.')


def check_batch_splits_over_processes(global_batch_size: int,
                                      option: str = 'config.data.batch_size') -> None:
  """Raises a clear error unless the global batch is positive and splits over processes."""
  if not isinstance(global_batch_size, int) or global_batch_size <= 0:
    raise ValueError(f'{option}={global_batch_size!r} must be a positive integer.')
  if global_batch_size % jax.process_count():
    raise ValueError(f'{option}={global_batch_size} is not divisible by the '
                     f'{jax.process_count()} processes.')


def to_global(batch, mesh: Mesh):
  """Assembles each process's host-local numpy batch into global arrays sharded on ``data``."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def shard_replicated_batch(batch, mesh: Mesh):
  """A batch that every process holds whole, as global arrays sharded on ``data``."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index]), batch)


# Environment variables for the explicit settings (launch/ sets them); flags win.
ENV_VARS = {'coordinator_address': 'P2P_COORDINATOR_ADDRESS',
            'num_processes': 'P2P_NUM_PROCESSES', 'process_id': 'P2P_PROCESS_ID'}


def distributed_settings(coordinator_address: str = '', num_processes: int = -1,
                         process_id: int = -1) -> dict:
  """The explicit ``coordinator_address`` / ``num_processes`` / ``process_id``.

  Args:
    coordinator_address: ``--coordinator_address`` ('' unset).
    num_processes: ``--num_processes`` (-1 unset).
    process_id: ``--process_id`` (-1 unset).

  Returns:
    Each setting from its argument, else from its ``ENV_VARS`` variable, else None (unset:
    ``jax.distributed.initialize`` then detects it on TPU pods and under SLURM).
  """
  address = coordinator_address or os.environ.get(ENV_VARS['coordinator_address'], '')
  numbers = {}
  for name, value in (('num_processes', num_processes), ('process_id', process_id)):
    if value < 0:
      value = int(os.environ.get(ENV_VARS[name], -1))
    numbers[name] = value if value >= 0 else None
  return dict(coordinator_address=address or None, **numbers)


def initialize_distributed(enabled: bool, settings: dict,
                           heartbeat_timeout_seconds: int = 100) -> None:
  """Joins JAX's multi-controller runtime when asked to; no-op otherwise.

  It is asked for by ``enabled`` (everything auto-detected on TPU pods and under SLURM) or by
  a coordinator address in ``settings``. Must run before any other JAX call.

  Args:
    enabled: ``--distributed``.
    settings: from ``distributed_settings``.
    heartbeat_timeout_seconds: a process silent this long counts as dead, and the
      coordination service then ends all the others instead of leaving them blocked.
  """
  if not (enabled or settings['coordinator_address']):
    return
  jax.distributed.initialize(**settings, heartbeat_timeout_seconds=heartbeat_timeout_seconds)


def agree_to_stop(local_request: bool, step: int) -> bool:
  """True on every process at the same step once any process is asked to stop.

  Call it after every step, with the step count. One process: the local request (our
  SIGTERM handler). Several: the request comes from jax's preemption sync manager, which
  catches SIGTERM on any process and has all of them agree on the next step after the
  furthest one, so the processes stop together a step or two after the signal. Until a
  signal arrives a call costs a lock and a comparison, not a host sync.

  Args:
    local_request: this process's stop request (used with one process only).
    step: the number of steps done; increasing from call to call.

  Returns:
    Whether to save and stop now.
  """
  if jax.process_count() == 1:
    return local_request
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.reached_preemption_sync_point(step)
