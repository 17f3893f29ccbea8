"""Device mesh, shardings and host-local -> global batches.

One 1-D mesh over every device of every process, with a single ``data`` axis. The batch is
sharded on ``data``; parameters and optimizer state are replicated. Under ``jit``, XLA's SPMD
partitioner turns batch reductions (batch norm, losses) into cross-device reductions, so the
step computes exactly what one device would on the global batch.
"""
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


def check_batch_size(global_batch_size: int, mesh: Mesh, option: str = 'config.batch_size'):
  """Raises a clear error unless the global batch splits evenly over devices and processes."""
  num_devices = mesh.devices.size
  if global_batch_size % num_devices:
    raise ValueError(
        f'{option}={global_batch_size} is not divisible by the {num_devices} devices of the '
        f'mesh; use a multiple of {num_devices}.')
  if global_batch_size % jax.process_count():
    raise ValueError(f'{option}={global_batch_size} is not divisible by the '
                     f'{jax.process_count()} processes.')


def host_batch_size(global_batch_size: int) -> int:
  """This process's share of the global batch."""
  return global_batch_size // jax.process_count()


def to_global(batch, mesh: Mesh):
  """Assembles each process's host-local numpy batch into global arrays sharded on ``data``."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def initialize_distributed(distributed_config) -> None:
  """Joins JAX's multi-controller runtime when the config asks for it; no-op otherwise.

  Explicit ``coordinator_address`` / ``num_processes`` / ``process_id`` are passed through;
  with ``enabled`` alone, ``jax.distributed.initialize()`` auto-detects TPU pods and SLURM.
  """
  explicit = bool(distributed_config.coordinator_address)
  if not (distributed_config.enabled or explicit):
    return
  kwargs = {}
  if explicit:
    kwargs = dict(coordinator_address=distributed_config.coordinator_address,
                  num_processes=distributed_config.num_processes,
                  process_id=distributed_config.process_id)
  jax.distributed.initialize(**kwargs)


def agree_to_stop(local_request: bool) -> bool:
  """True on every process if any process was asked to stop (e.g. SIGTERM on one host)."""
  if jax.process_count() == 1:
    return local_request
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.asarray(local_request, np.int32))
  return bool(np.any(flags))
