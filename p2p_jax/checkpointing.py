"""Orbax checkpoints: what is saved, restore for resume and restore of the generator alone.

A checkpoint (``WORKDIR/checkpoints/<step>/``) holds separate items, so evaluation reads the
generator without touching the rest:

* ``generator`` / ``discriminator``: ``{'params', 'batch_stats'}``;
* ``optimizer``: ``{'generator': adam state, 'discriminator': adam state}``;
* ``state``: ``{'step', 'rng'}``;
* ``data_iterator``: the grain iterator state (one file per process);
* ``config``: the config the run was started with, as JSON.

A checkpoint converted from PyTorch may hold only ``generator`` and ``config``: it restores for
evaluation but not for resuming training. Restores always pass a target tree with this run's
shardings, so a checkpoint saved on N devices restores on M.
"""
import json
import os
from typing import Any, Optional

import grain
from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

TRAIN_ITEMS = ('generator', 'discriminator', 'optimizer', 'state')


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
    data_iterator: the grain train iterator, or None.
    force: save even if the manager's policy would not.

  Returns:
    Whether a save was started.
  """
  items = dict(
      generator=ocp.args.StandardSave(state.generator.variables),
      discriminator=ocp.args.StandardSave(state.discriminator.variables),
      optimizer=ocp.args.StandardSave({'generator': state.generator.opt_state,
                                       'discriminator': state.discriminator.opt_state}),
      state=ocp.args.StandardSave({'step': state.step, 'rng': state.rng}),
      config=ocp.args.JsonSave(config.to_dict()),
  )
  if data_iterator is not None:
    items['data_iterator'] = grain.checkpoint.CheckpointSave(_FrozenIteratorState(data_iterator))
  return manager.save(int(state.step), args=ocp.args.Composite(**items), force=force)


def save_variables(workdir: str, step: int, config: ml_collections.ConfigDict,
                   generator: dict, discriminator: Optional[dict] = None,
                   train_state: Any = None) -> None:
  """Writes a checkpoint from variables (e.g. converted weights) and waits for it.

  With ``train_state`` (a full ``train.TrainState``) the checkpoint also resumes training.
  """
  manager = create_manager(workdir)
  if train_state is not None:
    save(manager, train_state, config, force=True)
  else:
    items = dict(generator=ocp.args.StandardSave(generator),
                 config=ocp.args.JsonSave(config.to_dict()))
    if discriminator is not None:
      items['discriminator'] = ocp.args.StandardSave(discriminator)
    manager.save(step, args=ocp.args.Composite(**items), force=True)
  manager.wait_until_finished()
  manager.close()


def _abstract(tree, sharding):
  """A restore target: shapes and dtypes of ``tree`` placed with ``sharding``."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def saved_items(manager: ocp.CheckpointManager, step: int) -> set:
  return {path.name for path in (manager.directory / str(step)).iterdir()
          if not path.name.startswith('_')}


def restore_train_state(manager: ocp.CheckpointManager, step: int, abstract_state,
                        sharding, data_iterator=None):
  """Restores a ``train.TrainState`` (and the iterator, in place) from checkpoint ``step``.

  Args:
    manager: the run's manager.
    step: the checkpoint step.
    abstract_state: a TrainState of arrays or ShapeDtypeStructs giving structure and dtypes.
    sharding: where to place the restored arrays (replicated over this run's mesh).
    data_iterator: the grain train iterator to restore, or None.

  Returns:
    The restored TrainState.
  """
  path = manager.directory / str(step)
  missing = [name for name in TRAIN_ITEMS if name not in saved_items(manager, step)]
  if missing:
    raise ValueError(f'Checkpoint {path} has no {missing} item(s), so training cannot resume '
                     'from it (a checkpoint converted from PyTorch weights without '
                     '--torch_discriminator only serves evaluation). Use another --workdir.')
  g, d = abstract_state.generator, abstract_state.discriminator
  items = dict(
      generator=ocp.args.StandardRestore(_abstract(g.variables, sharding)),
      discriminator=ocp.args.StandardRestore(_abstract(d.variables, sharding)),
      optimizer=ocp.args.StandardRestore(_abstract(
          {'generator': g.opt_state, 'discriminator': d.opt_state}, sharding)),
      state=ocp.args.StandardRestore(_abstract(
          {'step': abstract_state.step, 'rng': abstract_state.rng}, sharding)),
  )
  if data_iterator is not None:
    if 'data_iterator' not in saved_items(manager, step):
      raise ValueError(f'Checkpoint {path} has no data_iterator item to resume the input '
                       'pipeline from.')
    items['data_iterator'] = grain.checkpoint.CheckpointRestore(_IteratorRestorer(data_iterator))
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  gen, disc, opt = restored['generator'], restored['discriminator'], restored['optimizer']
  logging.info('Restored train state from %s', path)
  return abstract_state.replace(
      step=restored['state']['step'], rng=restored['state']['rng'],
      generator=g.replace(params=gen['params'], batch_stats=gen['batch_stats'],
                          opt_state=opt['generator']),
      discriminator=d.replace(params=disc['params'], batch_stats=disc['batch_stats'],
                              opt_state=opt['discriminator']))


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


def restore_config(workdir: str, step: int) -> dict:
  """The config stored with checkpoint ``step`` (as a dict)."""
  manager = ocp.CheckpointManager(checkpoint_dir(workdir))
  try:
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
  finally:
    manager.close()
