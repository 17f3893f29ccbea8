"""Orbax checkpoints: save, restore-or-initialise (with the data position), the generator alone.

A checkpoint (``WORKDIR/checkpoints/<step>/``) holds separate items, so evaluation reads the
generator without touching the rest:

* ``generator``: G's ``{'params', 'batch_stats'}``;
* ``train_state``: the rest of the train state (step, RNG key, G's optimizer state, D), as
  the state's own pytree;
* ``data_iterator``: the grain iterator state, one file per process;
* ``config``: the config the run was started with, as JSON.

A checkpoint converted from PyTorch without a discriminator holds only ``generator`` and
``config``: it serves evaluation and translation. Restores always pass a target tree with this
run's shardings, so a checkpoint saved on N devices restores on M.
"""
import json
import os
from typing import Any, Callable, Optional

import grain
from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import serialization

GENERATOR_VARIABLES = ('params', 'batch_stats')


def checkpoint_dir(workdir: str) -> epath.Path:
  """``WORKDIR/checkpoints``: local paths made absolute, URLs (``gs://...``) kept as they are,
  since orbax reads and writes buckets directly."""
  path = workdir if '://' in workdir else os.path.abspath(workdir)
  return epath.Path(path) / 'checkpoints'


def create_manager(workdir: str, max_to_keep: Optional[int] = None) -> ocp.CheckpointManager:
  """An async CheckpointManager in ``WORKDIR/checkpoints`` (max_to_keep None keeps all)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def _split_state(state) -> tuple[dict, dict]:
  """A train state's pytree as (G's variables, everything else), as nested dicts."""
  tree = serialization.to_state_dict(state)
  generator = {name: tree['generator'].pop(name) for name in GENERATOR_VARIABLES}
  return generator, tree


class _FrozenIteratorState:
  """The iterator state taken *now*: grain's orbax handler calls ``get_state()`` whenever the
  (asynchronous) save gets to it, by which time the live iterator has moved on."""

  def __init__(self, iterator):
    self._state = json.dumps(iterator.get_state()).encode()

  def get_state(self) -> bytes:
    return self._state


class _IteratorRestorer:
  """Feeds a saved state to a live iterator through grain's orbax handler."""

  def __init__(self, iterator):
    self._iterator = iterator

  def set_state(self, state: bytes) -> None:
    self._iterator.set_state(json.loads(state))

  def start_prefetch(self) -> None:
    pass


def save(manager: ocp.CheckpointManager, state, config: ml_collections.ConfigDict,
         data_iterator=None, force: bool = False) -> bool:
  """Starts an asynchronous save of the train state at ``state.step``.

  Args:
    manager: from ``create_manager``.
    state: a ``train.TrainState``.
    config: the run's config (stored as JSON).
    data_iterator: the grain train iterator, or None (no data position: a run restored from
      it reads its data from the start).
    force: save even if the manager's policy would not.

  Returns:
    Whether a save was started.
  """
  generator, rest = _split_state(state)
  items = dict(generator=ocp.args.StandardSave(generator),
               train_state=ocp.args.StandardSave(rest),
               config=ocp.args.JsonSave(config.to_dict()))
  if data_iterator is not None:
    items['data_iterator'] = grain.checkpoint.CheckpointSave(_FrozenIteratorState(data_iterator))
  return manager.save(int(state.step), args=ocp.args.Composite(**items), force=force)


def save_generator(workdir: str, step: int, config: ml_collections.ConfigDict,
                   variables: dict) -> None:
  """Writes a checkpoint holding G's variables alone (e.g. converted weights) and waits."""
  manager = create_manager(workdir)
  manager.save(step, args=ocp.args.Composite(generator=ocp.args.StandardSave(variables),
                                             config=ocp.args.JsonSave(config.to_dict())),
               force=True)
  manager.wait_until_finished()
  manager.close()


def _abstract(tree, sharding):
  """A restore target: shapes and dtypes of ``tree`` placed with ``sharding``."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _saved_items(manager: ocp.CheckpointManager, step: int) -> set:
  return {path.name for path in (manager.directory / str(step)).iterdir()
          if not path.name.startswith('_')}


def _own_iterator_state_saved(manager: ocp.CheckpointManager, step: int) -> bool:
  """Whether checkpoint ``step`` holds this process's iterator state, for this process count.

  grain saves one state per process, as ``process_<index>-of-<count>.json``.
  """
  name = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
  return (manager.directory / str(step) / 'data_iterator' / name).exists()


def restore_or_initialize(manager: ocp.CheckpointManager, init_state: Callable[[], Any],
                          sharding, create_iterator: Callable[[int], Any]) -> tuple[Any, Any]:
  """The train state and the data stream of the latest checkpoint, or fresh ones.

  Where the data stream starts:

  * no checkpoint: a fresh state, data from global batch 0;
  * saved by the same number of processes: the restored iterator, exactly where it was;
  * saved by another number: from the checkpoint's step (the global batches do not depend
    on the process count, unless files were skipped);
  * no data position (e.g. a converted checkpoint): from global batch 0.

  Args:
    manager: the run's manager.
    init_state: ``() -> TrainState`` placed with ``sharding``; only called without a
      checkpoint, and traced (not run) for the restore target otherwise.
    sharding: where restored arrays go (replicated over this run's mesh).
    create_iterator: ``start_step -> grain iterator``.

  Returns:
    ``(state, data_iterator)``.
  """
  step = manager.latest_step()
  if step is None:
    return init_state(), create_iterator(0)
  path = manager.directory / str(step)
  items = _saved_items(manager, step)
  if 'train_state' not in items:
    raise ValueError(f'Checkpoint {path} holds no train state (items: {sorted(items)}), so '
                     'training cannot resume from it. A checkpoint converted from PyTorch '
                     'without --torch_discriminator only serves --mode=eval and translate.')
  abstract_state = jax.eval_shape(init_state)
  abstract_generator, abstract_rest = _split_state(abstract_state)
  restore = dict(generator=ocp.args.StandardRestore(_abstract(abstract_generator, sharding)),
                 train_state=ocp.args.StandardRestore(_abstract(abstract_rest, sharding)))
  if 'data_iterator' not in items:
    logging.info('Checkpoint %s has no data position: the input pipeline starts at the '
                 'beginning.', path)
    data_iterator = create_iterator(0)
  elif _own_iterator_state_saved(manager, step):
    data_iterator = create_iterator(0)
    restore['data_iterator'] = grain.checkpoint.CheckpointRestore(
        _IteratorRestorer(data_iterator))
  else:
    logging.warning('Checkpoint %s was saved by another number of processes: the input '
                    'pipeline resumes at global batch %d.', path, step)
    data_iterator = create_iterator(step)
  restored = manager.restore(step, args=ocp.args.Composite(**restore))
  tree = restored['train_state']
  tree['generator'].update(restored['generator'])
  logging.info('Restored the train state from %s', path)
  return serialization.from_state_dict(abstract_state, tree), data_iterator


def restore_generator(workdir: str, abstract_variables: dict, sharding,
                      step: Optional[int] = None) -> tuple[dict, int]:
  """Restores the generator's ``{'params', 'batch_stats'}`` alone (no optimizer state).

  Args:
    workdir: the run's workdir.
    abstract_variables: structure/dtypes of the generator variables (e.g. from eval_shape).
    sharding: where to place the arrays.
    step: the checkpoint step; None for the latest.

  Returns:
    (variables, step).
  """
  directory = checkpoint_dir(workdir)
  if not directory.is_dir():
    raise FileNotFoundError(f'No checkpoints in {directory}: train first, or point --workdir '
                            'at a run (or a converted PyTorch checkpoint).')
  manager = ocp.CheckpointManager(directory)
  steps = manager.all_steps()
  if step is None:
    if not steps:
      raise FileNotFoundError(f'No complete checkpoint in {directory}.')
    step = max(steps)
  elif step not in steps:
    raise FileNotFoundError(f'No checkpoint for step {step} in {directory}; '
                            f'available steps: {sorted(steps)}.')
  path = manager.directory / str(step)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        generator=ocp.args.StandardRestore(_abstract(abstract_variables, sharding))))
  except Exception as e:  # Orbax raises many types; name the checkpoint and the cause.
    raise ValueError(f'Could not restore the generator from checkpoint {path}: {e}. Is it '
                     'corrupt, or was it trained with a different config.model?') from e
  finally:
    manager.close()
  return restored['generator'], step
