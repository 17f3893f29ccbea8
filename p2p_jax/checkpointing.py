"""Orbax checkpoints: save, restore-or-initialise (with the data position), the generator alone.

A checkpoint (``WORKDIR/checkpoints/<step>/``) holds separate items, so evaluation reads the
generator without touching the rest:

* ``generator``: G's ``{'params', 'batch_stats'}``;
* ``train_state``: the rest of the train state (step, RNG key, G's optimizer state, D), as
  the state's own pytree;
* ``data_iterator``: the grain iterator state, one file per process;
* ``config``: the config the run was started with, as JSON;
* ``metrics`` (validated steps only, written by orbax): the step's validation scores, by
  which the best step is kept beside the latest ones and found for ``eval.step=best``.

A checkpoint converted from PyTorch holds no ``data_iterator`` (and, without a discriminator,
no ``train_state``). Restores always pass a target tree with this run's shardings, so a
checkpoint saved on N devices restores on M.

A new run may start from the weights of another checkpoint (``config.init_from``, or a
workdir holding only convert's output): see :func:`initialize_from`. It takes the weights
and nothing else: step 0, this run's seed, data from position 0, the configured schedule.

Resuming compares the checkpoint's config with the run's (:func:`check_config_changes`). A
step that fails to restore is moved to ``WORKDIR/checkpoints_set_aside/`` (never deleted) and
the one before it is tried; evaluation, which only reads, skips to the one before.
"""
import errno
import json
import os
import shutil
import time
from typing import Any, Callable, Optional

import grain
from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import serialization
from flax import traverse_util

from p2p_jax import metrics as metrics_lib

GENERATOR_VARIABLES = ('params', 'batch_stats')
SET_ASIDE_DIR = 'checkpoints_set_aside'
# Config fields that fix the parameters' shapes: a checkpoint cannot restore with others.
SHAPE_FIELDS = ('model.netG', 'model.netD', 'model.n_layers_D', 'model.ngf', 'model.ndf',
                'model.norm', 'data.input_nc', 'data.output_nc')
# Config fields that leave the training trajectory alone (or only bits of its rounding).
NEUTRAL_FIELDS = ('log_every_steps', 'checkpoint_every_steps', 'image_every_steps',
                  'num_image_examples', 'max_to_keep', 'eval_every_steps', 'profile',
                  'optim.num_train_steps', 'data.eval_split', 'data.prefetch_buffer_size',
                  'data.cache', 'data.cache_dir', 'model.conv_impl', 'init_from',
                  'init_keep_optimizer')
NEUTRAL_SECTIONS = ('eval.', 'translate.')


# Steps that are multiples of it are kept whatever max_to_keep says: only step 0 in practice.
_KEEP_STEP_ZERO = 2**62


class ConfigChangeError(ValueError):
  """The run's config differs from the checkpoint's where resuming it would be wrong."""


def checkpoint_dir(workdir: str) -> epath.Path:
  """``WORKDIR/checkpoints``: local paths made absolute, URLs (``gs://...``) kept as they are,
  since orbax reads and writes buckets directly."""
  path = workdir if '://' in workdir else os.path.abspath(workdir)
  return epath.Path(path) / 'checkpoints'


def _best_options(best_metric: str) -> dict:
  """orbax's ranking of steps by their saved ``metrics[best_metric]``."""
  lower = metrics_lib.LOWER_IS_BETTER[best_metric]
  return dict(best_fn=lambda metrics: metrics[best_metric], best_mode='min' if lower else 'max')


def create_manager(workdir: str, max_to_keep: Optional[int] = None,
                   best_metric: Optional[str] = None) -> ocp.CheckpointManager:
  """An async CheckpointManager in ``WORKDIR/checkpoints`` (max_to_keep None keeps all).

  With ``best_metric``, steps saved with metrics are ranked by it, and the best one is kept
  besides the latest ``max_to_keep``, whatever its age. The metrics live in each step's
  folder, so the ranking survives restarts. Half-written steps (a save cut short) are removed
  when it starts.
  """
  policies = ocp.checkpoint_managers
  # Step 0 (convert's output, a run's starting weights) is never removed.
  keep = [policies.EveryNSteps(_KEEP_STEP_ZERO), policies.LatestN(n=max_to_keep)]
  best = {}
  if best_metric is not None:
    best = _best_options(best_metric)
    keep.append(policies.BestN(get_metric_fn=best['best_fn'],
                               reverse=best['best_mode'] == 'min', n=1,
                               keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=True, cleanup_tmp_directories=True,
      preservation_policy=policies.AnyPreservationPolicy(keep), **best)
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
         data_iterator=None, force: bool = False, metrics: Optional[dict] = None) -> bool:
  """Starts an asynchronous save of the train state at ``state.step``.

  Args:
    manager: from ``create_manager``.
    state: a ``train.TrainState``.
    config: the run's config (stored as JSON).
    data_iterator: the grain train iterator, or None (no data position: a run restored from
      it reads its data from the start).
    force: save even if the manager's policy would not.
    metrics: the step's validation metrics (``{'L1': ...}``), ranked by a manager created with
      ``best_metric``.

  Returns:
    Whether a save was started.
  """
  generator, rest = _split_state(state)
  check_free_space(str(manager.directory), (generator, rest), int(state.step))
  items = dict(generator=ocp.args.StandardSave(generator),
               train_state=ocp.args.StandardSave(rest),
               config=ocp.args.JsonSave(config.to_dict()))
  if data_iterator is not None:
    items['data_iterator'] = grain.checkpoint.CheckpointSave(_FrozenIteratorState(data_iterator))
  return manager.save(int(state.step), args=ocp.args.Composite(**items), force=force,
                      metrics=metrics)


def check_free_space(directory: str, tree, step: int) -> None:
  """Refuses a save that cannot fit before orbax writes a byte, so earlier steps stay whole.

  Needs the arrays' bytes plus a margin for OCDBT's index and the metadata; on a shared file
  system each process checks the space it sees. Remote paths (``gs://``) are not checked.
  """
  if '://' in directory:
    return
  existing = directory
  while not os.path.isdir(existing):
    existing = os.path.dirname(existing) or '.'
  needed = int(1.1 * sum(getattr(x, 'nbytes', 0) for x in jax.tree.leaves(tree))) + (1 << 20)
  free = shutil.disk_usage(existing).free
  if free < needed:
    raise OSError(errno.ENOSPC,
                  f'No space left on device for checkpoint {step} in {directory}: '
                  f'{free / 2**20:.1f} MiB free, it needs about {needed / 2**20:.1f} MiB; '
                  'the earlier checkpoints are kept. Free some space and run the same command '
                  'to resume')


def save_generator(workdir: str, step: int, config: ml_collections.ConfigDict,
                   variables: dict) -> None:
  """Writes a checkpoint holding G's variables alone (e.g. converted weights) and waits."""
  manager = create_manager(workdir)
  check_free_space(str(manager.directory), variables, step)
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


def _flat_config(config_dict: dict) -> dict:
  # Through JSON, as the checkpoint stores it (tuples become lists).
  return traverse_util.flatten_dict(json.loads(json.dumps(config_dict)), sep='.')


def check_config_changes(saved: dict, config: ml_collections.ConfigDict, path,
                         accept: bool, has_data_position: bool = True) -> None:
  """Compares the run's config with the one checkpoint ``path`` was saved with.

  Args:
    saved: the checkpoint's config (as a dict).
    config: the run's config.
    path: the checkpoint, for messages.
    accept: resume despite changes to fields that change the training trajectory (they
      are then logged as a warning).
    has_data_position: False for a checkpoint without a data position (converted weights):
      nothing was trained from it yet, so only the shapes must match.

  Raises:
    ConfigChangeError: a field that fixes a shape changed; or, unless ``accept``, a field
      that changes the training trajectory.
  """
  before, after = _flat_config(saved), _flat_config(config.to_dict())
  changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
  describe = lambda keys: ', '.join(f'{k}: {before.get(k, "(unset)")!r} -> '
                                    f'{after.get(k, "(unset)")!r}' for k in keys)
  shape = [k for k in changed if k in SHAPE_FIELDS]
  if shape:
    raise ConfigChangeError(
        f'The config changes the model of checkpoint {path} ({describe(shape)}); its weights '
        'cannot be restored into that model. Resume with the saved values, or start a new run '
        'in another --workdir.')
  neutral = [k for k in changed if k in NEUTRAL_FIELDS or k.startswith(NEUTRAL_SECTIONS)]
  trajectory = [k for k in changed if k not in neutral]
  if neutral:
    logging.info('Config changes since checkpoint %s: %s', path, describe(neutral))
  if trajectory and has_data_position:
    if not accept:
      raise ConfigChangeError(
          f'The config differs from checkpoint {path} in fields that change the training '
          f'({describe(trajectory)}), so the run would not continue as it was. Resume with '
          'the saved values, or pass --accept_config_changes to continue with the new ones.')
    logging.warning('Resuming %s with a changed config: %s', path, describe(trajectory))


def _set_aside(manager: ocp.CheckpointManager, step: int) -> epath.Path:
  """Moves checkpoint ``step`` out of the manager's sight, next to the checkpoints folder."""
  target_dir = manager.directory.parent / SET_ASIDE_DIR
  target_dir.mkdir(parents=True, exist_ok=True)
  target = target_dir / f'{step}-{time.strftime("%Y%m%d-%H%M%S")}'
  (manager.directory / str(step)).rename(target)
  manager.reload()
  return target


def _one_line(error: BaseException) -> str:
  text = ' '.join(str(error).split())
  return f'{type(error).__name__}: {text[:400]}{"..." if len(text) > 400 else ""}'


def _restore_step(manager, step: int, init_state, sharding, create_iterator, config, accept):
  """``restore_or_initialize`` for one step; errors of a damaged step name its item."""
  path = manager.directory / str(step)
  items = _saved_items(manager, step)
  if 'train_state' not in items:
    raise ValueError(f'Checkpoint {path} holds no train state (items: {sorted(items)}), so '
                     'training cannot resume from it; move it out of the workdir, or start '
                     'a new run from its weights with config.init_from.')

  def restore(item, args):
    try:
      return manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]
    except Exception as e:  # Orbax and grain raise many types for damaged files.
      raise _DamagedStep(item, e) from e

  if config is not None and 'config' in items:
    check_config_changes(restore('config', ocp.args.JsonRestore()), config, path, accept,
                         has_data_position='data_iterator' in items)
  abstract_state = jax.eval_shape(init_state)
  abstract_generator, abstract_rest = _split_state(abstract_state)
  generator = restore('generator', ocp.args.StandardRestore(_abstract(abstract_generator,
                                                                      sharding)))
  tree = restore('train_state', ocp.args.StandardRestore(_abstract(abstract_rest, sharding)))
  tree['generator'].update(generator)
  if 'data_iterator' not in items:
    logging.info('Checkpoint %s has no data position: the input pipeline starts at the '
                 'beginning.', path)
    data_iterator = create_iterator(0)
  elif _own_iterator_state_saved(manager, step):
    data_iterator = create_iterator(0)
    restore('data_iterator', grain.checkpoint.CheckpointRestore(_IteratorRestorer(data_iterator)))
  else:
    logging.warning('Checkpoint %s was saved by another number of processes: the input '
                    'pipeline resumes at global batch %d.', path, step)
    data_iterator = create_iterator(step)
  logging.info('Restored the train state from %s', path)
  return serialization.from_state_dict(abstract_state, tree), data_iterator


class _DamagedStep(Exception):
  def __init__(self, item: str, error: BaseException):
    super().__init__(f'item {item!r}: {_one_line(error)}')
    self.item = item


def restore_or_initialize(manager: ocp.CheckpointManager, init_state: Callable[[], Any],
                          sharding, create_iterator: Callable[[int], Any],
                          config: Optional[ml_collections.ConfigDict] = None,
                          accept_config_changes: bool = False) -> tuple[Any, Any]:
  """The train state and the data stream of the latest good checkpoint, or fresh ones.

  Where the data stream starts:

  * no checkpoint: a fresh state (or the weights of ``config.init_from``), data from global
    batch 0;
  * saved by the same number of processes: the restored iterator, exactly where it was;
  * saved by another number: from the checkpoint's step (the global batches do not depend
    on the process count, unless files were skipped);
  * only convert's output (a checkpoint without a data position): a new run from its
    weights, as ``config.init_from`` would start it (:func:`initialize_from`).

  A step that fails to restore is set aside (moved to ``WORKDIR/checkpoints_set_aside``)
  and the previous one is tried.

  Args:
    manager: the run's manager.
    init_state: ``() -> TrainState`` placed with ``sharding``: the fresh state of this
      config (also the base a new run's imported weights go into).
    sharding: where restored arrays go (replicated over this run's mesh).
    create_iterator: ``start_step -> grain iterator``.
    config: the run's config, compared with the checkpoint's (None: not compared).
    accept_config_changes: see :func:`check_config_changes`.

  Returns:
    ``(state, data_iterator)``.
  """
  init_from = config.get('init_from', '') if config is not None else ''
  keep_optimizer = bool(config.get('init_keep_optimizer', False)) if config is not None else False
  set_aside = []
  while (step := manager.latest_step()) is not None:
    if 'data_iterator' not in _saved_items(manager, step):  # Weights only: convert's output.
      if init_from:
        raise ValueError(f'{manager.directory} holds converted weights (checkpoint {step}) '
                         f'and config.init_from={init_from!r} names other ones: start from '
                         'one of them (drop config.init_from, or use another --workdir).')
      return initialize_from(manager.directory, step, init_state, sharding, create_iterator,
                             config, keep_optimizer)
    if init_from:
      logging.info('Resuming the run in %s: config.init_from=%r only seeds a new run.',
                   manager.directory, init_from)
    try:
      return _restore_step(manager, step, init_state, sharding, create_iterator, config,
                           accept_config_changes)
    except _DamagedStep as e:
      if jax.process_count() > 1:  # Setting a step aside needs every process to agree.
        raise ValueError(f'Checkpoint {manager.directory / str(step)} could not be restored '
                         f'({e}); move it out of {manager.directory} and restart.') from e
      set_aside.append(_set_aside(manager, step))
      logging.warning('Checkpoint step %d could not be restored (%s); moved it to %s and '
                      'trying the one before.', step, e, set_aside[-1])
  if set_aside:
    raise ValueError(f'No checkpoint in {manager.directory} could be restored; they are in '
                     f'{set_aside[0].parent}. Run again to start from scratch.')
  if init_from:
    directory, step = resolve_init_from(init_from)
    return initialize_from(directory, step, init_state, sharding, create_iterator, config,
                           keep_optimizer)
  return init_state(), create_iterator(0)


def resolve_init_from(spec: str) -> tuple[epath.Path, int]:
  """``PATH[:STEP]`` (a workdir or its ``checkpoints`` folder) as (checkpoints folder, step).

  Raises:
    ValueError: no such folder, no checkpoint in it, or no such step.
  """
  path, step = spec, None
  head, _, tail = spec.rpartition(':')
  if head and tail.isdigit():
    path, step = head, int(tail)
  path = os.path.expanduser(path)
  directory = checkpoint_dir(path)
  if not directory.is_dir() and epath.Path(path).name == 'checkpoints':
    directory = epath.Path(path if '://' in path else os.path.abspath(path))
  if not directory.is_dir():
    raise ValueError(f'config.init_from={spec!r}: no checkpoints folder at {directory} (give a '
                     'workdir, e.g. a run or convert\'s output, optionally with :STEP).')
  steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  if not steps or (step is not None and step not in steps):
    raise ValueError(f'config.init_from={spec!r}: no checkpoint '
                     f'{"" if step is None else f"for step {step} "}in {directory} '
                     f'(steps there: {steps or "none"}).')
  return directory, steps[-1] if step is None else step


def _reset_schedule(opt_state):
  """The optimizer state with its LR schedule's step count at 0 (the Adam moments kept)."""
  import optax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(
      lambda x: x._replace(count=jax.numpy.zeros_like(x.count))
      if isinstance(x, optax.ScaleByScheduleState) else x,
      opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))


def initialize_from(directory: epath.Path, step: int, init_state: Callable[[], Any], sharding,
                    create_iterator: Callable[[int], Any],
                    config: Optional[ml_collections.ConfigDict] = None,
                    keep_optimizer: bool = False) -> tuple[Any, Any]:
  """A new run (step 0) from the weights of checkpoint ``directory/step``.

  Taken from the checkpoint: G's variables, and D's where it holds a train state; with
  ``keep_optimizer``, also both Adam states (their schedule restarted at step 0). Everything
  else is this run's: step 0, the RNG of ``config.seed``, fresh Adam moments, data from
  global batch 0. Which part came from where is logged.

  Args:
    directory: a ``checkpoints`` folder.
    step: the checkpoint to read.
    init_state: ``() -> TrainState``, the fresh state the weights go into.
    sharding: where restored arrays go.
    create_iterator: ``start_step -> grain iterator``.
    config: the run's config; only its model shapes must match the checkpoint's.
    keep_optimizer: keep the checkpoint's Adam moments (it must hold a train state).

  Returns:
    ``(state, data_iterator)``.

  Raises:
    ValueError: the checkpoint cannot seed this config (other shapes, no optimizer state to
      keep, unreadable).
  """
  path = directory / str(step)
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True))
  try:
    items = _saved_items(manager, step)

    def restore(item, args):
      try:
        return manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]
      except Exception as e:  # Orbax raises many types for damaged or mismatched files.
        raise ValueError(f'Cannot start from checkpoint {path}: item {item!r}: '
                         f'{_one_line(e)}') from e

    if config is not None and 'config' in items:
      check_config_changes(restore('config', ocp.args.JsonRestore()), config, path,
                           accept=True, has_data_position=False)
    if keep_optimizer and 'train_state' not in items:
      raise ValueError(f'config.init_keep_optimizer=True, but checkpoint {path} holds no '
                       'optimizer state (only the generator); set it to False.')
    abstract_state = jax.eval_shape(init_state)
    abstract_generator, abstract_rest = _split_state(abstract_state)
    generator = restore('generator', ocp.args.StandardRestore(
        _abstract(abstract_generator, sharding)))
    rest = (restore('train_state', ocp.args.StandardRestore(_abstract(abstract_rest, sharding)))
            if 'train_state' in items else None)
  finally:
    manager.close()
  tree = serialization.to_state_dict(init_state())
  tree['generator'].update(generator)
  taken = ['generator weights']
  if rest is not None:
    tree['discriminator'].update({k: rest['discriminator'][k] for k in GENERATOR_VARIABLES})
    taken.append('discriminator weights')
    if keep_optimizer:
      for net in ('generator', 'discriminator'):
        tree[net]['opt_state'] = rest[net]['opt_state']
      taken.append('Adam moments (schedule restarted)')
  state = serialization.from_state_dict(jax.eval_shape(init_state), tree)
  if keep_optimizer:
    state = state.replace(generator=state.generator.replace(
        opt_state=_reset_schedule(state.generator.opt_state)),
                          discriminator=state.discriminator.replace(
        opt_state=_reset_schedule(state.discriminator.opt_state)))
  fresh = [part for part, ok in (('discriminator weights', rest is None),
                                 ('Adam moments', not keep_optimizer)) if ok]
  logging.info('New run from checkpoint %s: %s from it; %s; step 0, the RNG of config.seed and '
               'the data from position 0 are this run\'s.', path, ', '.join(taken),
               f'fresh {" and ".join(fresh)}' if fresh else 'nothing else fresh')
  return state, create_iterator(0)


def restore_generator(workdir: str, abstract_variables: dict, sharding, step=None,
                      best_metric: str = 'L1') -> tuple[dict, int]:
  """Restores the generator's ``{'params', 'batch_stats'}`` alone (no optimizer state).

  Read-only, so it may run beside a trainer: for the latest step, a step that fails to
  restore (damaged, or deleted by the trainer's ``max_to_keep`` meanwhile) is skipped for
  the one before, with a warning.

  Args:
    workdir: the run's workdir.
    abstract_variables: structure/dtypes of the generator variables (e.g. from eval_shape).
    sharding: where to place the arrays.
    step: the checkpoint step; None for the latest; 'best' for the best saved with
      validation metrics, by ``best_metric``.
    best_metric: the metric that ranks steps for ``step='best'``.

  Returns:
    (variables, step).
  """
  directory = checkpoint_dir(workdir)
  if not directory.is_dir():
    raise FileNotFoundError(f'No checkpoints in {directory}: train first, or point --workdir '
                            'at a run (or a converted PyTorch checkpoint).')
  best = _best_options(best_metric) if step == 'best' else {}
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True, **best))
  try:
    steps = sorted(manager.all_steps(), reverse=True)
    if step == 'best':
      step = manager.best_step() if steps else None
      if step is None or manager.metrics(step) is None:
        raise FileNotFoundError(
            f'No checkpoint in {directory} was saved with validation metrics, so there is no '
            "best one: train with config.eval_every_steps > 0, or pick config.eval.step.")
      logging.info('The best checkpoint by validation %s is step %d: %s', best_metric, step,
                   manager.metrics(step))
    if step is not None and step not in steps:
      raise FileNotFoundError(f'No checkpoint for step {step} in {directory}; '
                              f'available steps: {sorted(steps)}.')
    candidates = steps if step is None else [step]
    if not candidates:
      raise FileNotFoundError(f'No complete checkpoint in {directory}.')
    target = ocp.args.Composite(
        generator=ocp.args.StandardRestore(_abstract(abstract_variables, sharding)))
    for i, candidate in enumerate(candidates):
      path = directory / str(candidate)
      try:
        return manager.restore(candidate, args=target)['generator'], candidate
      except Exception as e:  # Orbax raises many types; name the checkpoint and the cause.
        error = (f'Could not restore the generator from checkpoint {path} ({_one_line(e)}). '
                 'Is it damaged, or was it trained with a different config.model?')
        if i + 1 == len(candidates):
          raise ValueError(error) from e
        logging.warning('%s Trying step %d.', error, candidates[i + 1])
  finally:
    manager.close()
