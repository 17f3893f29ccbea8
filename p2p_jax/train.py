"""pix2pix training: the state, the LR schedule and the jitted, sharded train step."""
import functools
import os
import signal
import sys
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import struct, traverse_util

from p2p_jax import (checkpointing, data_cache, datasets, evaluate, file_check, images,
                     input_pipeline, losses, models, parallel)


class NetState(struct.PyTreeNode):
  """One network's trainable state: parameters, batch-norm statistics, optimizer state."""
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> dict:
    return {'params': self.params, 'batch_stats': self.batch_stats}


class TrainState(struct.PyTreeNode):
  """Everything a step reads and returns. Step randomness is ``fold_in(rng, step)``."""
  step: jax.Array
  rng: jax.Array  # Base key (raw uint32 key data, so it checkpoints as a plain array).
  generator: NetState
  discriminator: NetState


@struct.dataclass
class Pix2Pix:
  """The static parts of training: modules, optimizer and loss settings (not checkpointed)."""
  generator: nn.Module = struct.field(pytree_node=False)
  discriminator: nn.Module = struct.field(pytree_node=False)
  optimizer: optax.GradientTransformation = struct.field(pytree_node=False)
  gan_mode: str = struct.field(pytree_node=False)
  lambda_l1: float = struct.field(pytree_node=False)


def lr_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Callable:
  """The official `--lr_policy linear`: constant for n_epochs, then linear decay to zero.

  As the official ``LambdaLR`` stepped once per epoch, the factor is piecewise constant per
  epoch: ``1 - max(0, epoch + 1 - n_epochs) / (n_epochs_decay + 1)`` for 0-based ``epoch``.
  """
  optim = config.optim

  def schedule(step):
    epoch = step // steps_per_epoch
    decay = jnp.maximum(0, epoch + 1 - optim.n_epochs) / float(optim.n_epochs_decay + 1)
    return optim.lr * jnp.clip(1.0 - decay, 0.0, 1.0)
  return schedule


def create_pix2pix(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Pix2Pix:
  dtype = models.compute_dtype(config.compute_dtype)
  optimizer = optax.adam(lr_schedule(config, steps_per_epoch), b1=config.optim.beta1,
                         b2=config.optim.beta2)
  losses.check_gan_mode(config.loss.gan_mode)
  return Pix2Pix(generator=models.create_generator(config.model, config.data.output_nc, dtype),
                 discriminator=models.create_discriminator(config.model, dtype),
                 optimizer=optimizer, gan_mode=config.loss.gan_mode,
                 lambda_l1=float(config.loss.lambda_l1))


def state_from_variables(pix2pix: Pix2Pix, generator: dict, discriminator: dict,
                         rng: jax.Array) -> TrainState:
  """A step-0 train state holding these networks' variables and fresh Adam moments.

  Args:
    pix2pix: the static training parts (the optimizer).
    generator: G's ``{'params', 'batch_stats'}``.
    discriminator: D's ``{'params', 'batch_stats'}``.
    rng: the base key of the step randomness.
  """
  def net_state(variables):
    return NetState(params=variables['params'], batch_stats=variables['batch_stats'],
                    opt_state=pix2pix.optimizer.init(variables['params']))

  return TrainState(step=jnp.zeros((), jnp.int32), rng=rng, generator=net_state(generator),
                    discriminator=net_state(discriminator))


def create_train_state(pix2pix: Pix2Pix, config: ml_collections.ConfigDict, rng: jax.Array,
                       sharding=None) -> TrainState:
  """Initialises G and D (official N(0, 0.02) init) and their Adam states, in one program.

  Args:
    pix2pix: the static training parts.
    config: the experiment config (``config.data`` sizes and channels).
    rng: the init key.
    sharding: where the state goes (e.g. replicated over the mesh); None for the default.
  """
  data = config.data
  size = data.crop_size

  def init(rng):
    g_key, d_key, step_key = jax.random.split(rng, 3)
    generator = models.init_variables(pix2pix.generator, g_key,
                                      (1, size, size, data.input_nc))
    discriminator = models.init_variables(pix2pix.discriminator, d_key,
                                          (1, size, size, data.input_nc + data.output_nc))
    return state_from_variables(pix2pix, generator, discriminator, step_key)

  init = jax.jit(init, out_shardings=sharding)
  if jax.default_backend() != 'cpu':
    return init(rng)
  # XLA:CPU compiles the init's normal draws much faster without threefry's partitionable
  # mode; the parameters are replicated, so partitioning their random bits buys nothing.
  with jax.threefry_partitionable(False):
    return init(rng)


def to_model_input(pixels: jax.Array) -> jax.Array:
  """uint8 pixels to float32 in [-1, 1], bit for bit as ``images.to_float`` (a table lookup on
  every backend); floats pass through."""
  if pixels.dtype != jnp.uint8:
    return pixels
  return jnp.asarray(images.to_float(np.arange(256, dtype=np.uint8)))[pixels]


def _apply_train(module: nn.Module, params, batch_stats, x, rng=None):
  """Train-mode forward; returns (output, updated batch_stats)."""
  rngs = {'dropout': rng} if rng is not None else {}
  out, updates = module.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                              mutable=['batch_stats'], rngs=rngs)
  return out, updates.get('batch_stats', batch_stats)


def _update(optimizer, net: NetState, grads, batch_stats) -> NetState:
  updates, opt_state = optimizer.update(grads, net.opt_state, net.params)
  return NetState(params=optax.apply_updates(net.params, updates), batch_stats=batch_stats,
                  opt_state=opt_state)


def train_step(pix2pix: Pix2Pix, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
  """One optimisation step in the official pix2pix order.

  1. G forward once, keeping its VJP.
  2. D update on (A, stop_gradient(fake)) and (A, B): two D calls, so batch-norm statistics
     are per call, as in the official ``backward_D``.
  3. G update with GAN + lambda * L1 through the *updated* D, back-propagated through the kept
     VJP (no second G forward). As in the official code, D is in train mode here too, so
     this call also updates D's running statistics.

  Args:
    pix2pix: modules, optimizer and loss settings (static).
    state: the train state.
    batch: ``{'A': (N, H, W, input_nc), 'B': (N, H, W, output_nc)}``, uint8 pixels (as the
      input pipeline ships them) or floats in [-1, 1].

  Returns:
    The new state and a dict of scalar metrics.
  """
  real_a, real_b = to_model_input(batch['A']), to_model_input(batch['B'])
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  g, d = state.generator, state.discriminator
  G, D = pix2pix.generator, pix2pix.discriminator

  def g_forward(g_params):
    return _apply_train(G, g_params, g.batch_stats, real_a, dropout_rng)

  fake_b, g_vjp, g_batch_stats = jax.vjp(g_forward, g.params, has_aux=True)

  def d_loss_fn(d_params):
    fake_ab = jnp.concatenate([real_a, jax.lax.stop_gradient(fake_b)], axis=-1)
    pred_fake, stats = _apply_train(D, d_params, d.batch_stats, fake_ab)
    pred_real, stats = _apply_train(D, d_params, stats, jnp.concatenate([real_a, real_b], -1))
    loss_fake = losses.discriminator_loss(pix2pix.gan_mode, pred_fake, is_real=False)
    loss_real = losses.discriminator_loss(pix2pix.gan_mode, pred_real, is_real=True)
    return 0.5 * (loss_fake + loss_real), (stats, loss_real, loss_fake)

  d_grads, (d_stats, loss_d_real, loss_d_fake) = jax.grad(d_loss_fn, has_aux=True)(d.params)
  d = _update(pix2pix.optimizer, d, d_grads, d_stats)

  def g_loss_fn(fake):
    pred_fake, stats = _apply_train(D, d.params, d.batch_stats,
                                    jnp.concatenate([real_a, fake], axis=-1))
    loss_gan = losses.generator_gan_loss(pix2pix.gan_mode, pred_fake)
    loss_l1 = pix2pix.lambda_l1 * losses.l1_loss(fake, real_b)
    return loss_gan + loss_l1, (stats, loss_gan, loss_l1)

  fake_grad, (d_stats, loss_g_gan, loss_g_l1) = jax.grad(g_loss_fn, has_aux=True)(fake_b)
  (g_grads,) = g_vjp(fake_grad)
  g = _update(pix2pix.optimizer, g, g_grads, g_batch_stats)
  d = d.replace(batch_stats=d_stats)

  metrics = {'G_GAN': loss_g_gan, 'G_L1': loss_g_l1, 'D_real': loss_d_real,
             'D_fake': loss_d_fake}
  new_state = state.replace(step=state.step + 1, generator=g, discriminator=d)
  return new_state, metrics


# XLA:CPU's default copy insertion cannot see that the Adam update may overwrite the donated
# moments in place, and copies the parameters and first moments every step; its region
# analysis proves those copies unnecessary.
CPU_COMPILER_OPTIONS = {'xla_cpu_copy_insertion_use_region_analysis': True}


def make_train_step(pix2pix: Pix2Pix, mesh, lr_fn: Callable):
  """Jits the step over ``mesh``: batch sharded on ``data``, state replicated and donated.

  Args:
    pix2pix: static training parts.
    mesh: the device mesh.
    lr_fn: the schedule, step -> LR, reported as the ``lr`` metric.

  Returns:
    ``step_fn(state, batch) -> (state, metrics)``.
  """
  def step_fn(state, batch):
    lr = lr_fn(state.step)
    state, metrics = train_step(pix2pix, state, batch)
    return state, {**metrics, 'lr': lr}

  replicated = parallel.replicated_sharding(mesh)
  cpu = mesh.devices.flat[0].platform == 'cpu'
  return jax.jit(step_fn, in_shardings=(replicated, parallel.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0,
                 compiler_options=CPU_COMPILER_OPTIONS if cpu else None)


# ---------------------------------------------------------------------------------------
# The training loop.


class _StopRequest:
  """Set by SIGTERM (how TPU VMs and SLURM preempt) or Ctrl-C: finish the step, save, exit 0.

  A second Ctrl-C exits at once: a save in flight is left unfinished, and the manager removes
  it at the next start, so the last complete checkpoint stays the latest. With several
  processes, jax's preemption sync manager catches SIGTERM instead (see
  ``parallel.agree_to_stop``), so no Python handler is installed there.
  """

  def __init__(self):
    self.requested = False
    self._previous = {}
    if jax.process_count() == 1:
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      print('Interrupted again: exiting now, without saving.', file=sys.stderr, flush=True)
      os._exit(130)  # pylint: disable=protected-access
    name = signal.Signals(signum).name
    logging.warning('%s: stopping after this step, with a checkpoint (Ctrl-C again to exit '
                    'without saving).', name)
    self.requested = True

  def restore(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _stop_non_finite(step: int, what, manager) -> None:
  last = manager.latest_step()
  where = (f'the last good checkpoint is step {last} in {manager.directory}' if last is not None
           else 'no checkpoint was saved yet')
  raise FloatingPointError(
      f'Non-finite {what} at step {step}. Stopping; {where} (the bad state was not saved). '
      'Lower config.optim.lr or check the data.')


def _fetch_metrics(pending: list, manager) -> dict:
  """Fetches the metrics of the steps since the last check; stops loudly on a non-finite loss.

  Args:
    pending: ``(step, metrics)`` pairs, metrics still on device; ``step`` counts from 1.
    manager: the checkpoint manager (named in the error).

  Returns:
    The mean of each metric over those steps.
  """
  fetched = [(step, jax.device_get(m)) for step, m in pending]
  for step, metrics in fetched:
    bad = {k: float(v) for k, v in metrics.items() if not np.isfinite(v)}
    if bad:
      _stop_non_finite(step, f'loss {bad}', manager)
  return {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[0][1]} if fetched else {}


def _checked_source(config, split: str, workdir: str, required: bool = True):
  """The split's source with every file checked (see ``file_check``); None if the split has
  no folder and is not ``required``."""
  try:
    source = datasets.get_source(config, split)
  except FileNotFoundError as e:
    if required:
      raise
    logging.warning('No %s images for TensorBoard: %s', split, e)
    return None
  check = None  # Building the training split's data cache decodes every file: the check.
  if config.data.cache and split == config.data.train_split:
    check = functools.partial(data_cache.bad_records, config, split,
                              input_pipeline.training_resize(config))
  return file_check.checked_source(source, config, split, workdir,
                                   is_writer=jax.process_index() == 0, check=check)


def _fixed_examples(config, split: str, source) -> Optional[dict]:
  """The first ``num_image_examples`` of ``source`` (un-jittered), or None if it has none."""
  if source is None:
    return None
  dataset = input_pipeline.create_eval_dataset(config, split, source)
  examples = [dataset[i] for i in range(min(config.num_image_examples, len(dataset)))]
  examples = [e for e in examples if e is not None]
  if not examples:
    return None
  return {'A': np.stack([e['A'] for e in examples]), 'B': np.stack([e['B'] for e in examples])}


def _write_images(writer, state: TrainState, examples: dict, step: int,
                  generate_fn) -> dict:
  """Writes input | generated | target grids; returns the L1 of each set (in [-1, 1] units)."""
  grids, l1 = {}, {}
  for name, ex in examples.items():
    fake = np.asarray(jax.device_get(generate_fn(state.generator.variables, ex['A'],
                                                 state.rng)))
    grid = images.grid(zip(ex['A'], fake, ex['B']))  # Rows of input | generated | target.
    grids[f'{name}/input_generated_target'] = ((grid + 1) / 2)[None]
    l1[f'{name}_L1'] = float(np.mean(np.abs(fake - ex['B'])))
  writer.write_images(step, grids)
  return l1


def _validate(writer, validate, state: TrainState, step: int) -> dict:
  """Scores the held-out split; writes ``val/<metric>`` and returns the metrics."""
  start = time.time()
  scores = validate(state.generator.variables)
  writer.write_scalars(step, {f'val/{key}': value for key, value in scores.items()})
  logging.info('Validation at step %d (%.1f s): %s', step, time.time() - start, scores)
  return scores


def _tracked(iterators: list, iterator):
  iterators.append(iterator)
  return iterator


def _train_loop(config, workdir: str, pix2pix: Pix2Pix, mesh, manager, state: TrainState,
                train_iter, examples: dict, validate, num_train: int, steps_per_epoch: int,
                num_steps: int) -> tuple[TrainState, bool]:
  """Runs the steps from ``state.step`` to ``num_steps``: metrics, images, validation,
  checkpoints.

  ``examples`` maps a name to the fixed ``{'A', 'B'}`` batch shown in TensorBoard;
  ``validate`` is ``evaluate.make_validation``'s function, or None.

  Returns:
    The final state, and whether the run stopped early on request (SIGTERM / Ctrl-C).
  """
  start_step = int(state.step)

  is_chief = jax.process_index() == 0
  # clu imports TensorFlow (seconds); only the training loop needs it.
  from clu import metric_writers, parameter_overview, periodic_actions  # pylint: disable=g-import-not-at-top
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
  if start_step == 0:
    writer.write_hparams(traverse_util.flatten_dict(config.to_dict(), sep='.'))
    for name, net in (('generator', state.generator), ('discriminator', state.discriminator)):
      logging.info('%s parameters:\n%s', name,
                   parameter_overview.get_parameter_overview(net.params))
  logging.info('%d training examples, %d steps per epoch, training steps %d -> %d.',
               num_train, steps_per_epoch, start_step, num_steps)

  train_step_fn = make_train_step(pix2pix, mesh, lr_schedule(config, steps_per_epoch))
  generate_fn = jax.jit(functools.partial(models.generate, pix2pix.generator, mode='paper'))
  hooks = [periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)]
  if config.profile and is_chief:
    hooks.append(periodic_actions.Profile(num_profile_steps=5, logdir=workdir))
  stop = _StopRequest()
  pending = []  # (step, metrics on device) since the last host sync.
  last_log = (time.time(), start_step)
  batches = input_pipeline.DevicePrefetch(train_iter, mesh)
  input_wait = 0.0  # Seconds the loop waited for batches since the last log line.
  try:
    for step in range(start_step, num_steps):
      wait_start = time.perf_counter()
      batch = next(batches)
      input_wait += time.perf_counter() - wait_start
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, metrics = train_step_fn(state, batch)
      pending.append((step + 1, metrics))
      for hook in hooks:
        hook(step + 1)
      stop.requested = parallel.agree_to_stop(stop.requested, step + 1)
      done = step + 1 == num_steps or stop.requested
      if (step + 1) % config.log_every_steps == 0 or done:
        summary = _fetch_metrics(pending, manager)
        pending = []
        now = time.time()
        interval = now - last_log[0]
        steps_per_sec = (step + 1 - last_log[1]) / interval
        last_log = (now, step + 1)
        summary.update(steps_per_sec=steps_per_sec,
                       images_per_sec=steps_per_sec * config.data.batch_size,
                       epoch=(step + 1) / steps_per_epoch,
                       # Near 1: the input pipeline is the bottleneck (add num_workers).
                       input_wait_fraction=input_wait / interval)
        input_wait = 0.0
        writer.write_scalars(step + 1, summary)
      if examples and ((step + 1) % config.image_every_steps == 0 or done):
        writer.write_scalars(step + 1, _write_images(writer, state, examples, step + 1,
                                                     generate_fn))
      val_metrics = None
      if validate is not None and (step + 1) % config.eval_every_steps == 0:
        val_metrics = _validate(writer, validate, state, step + 1)
      if (step + 1) % config.checkpoint_every_steps == 0 or done or val_metrics is not None:
        _fetch_metrics(pending, manager)
        if not bool(_all_finite((state.generator.params, state.discriminator.params))):
          _stop_non_finite(step + 1, 'parameters', manager)
        # A validated step is saved with its scores, so the best one can be kept; the data
        # position saved is that of the batches handed to steps, not of those prefetched.
        checkpointing.save(manager, state, config, batches, force=True, metrics=val_metrics)
      if done:
        break
  finally:
    stop.restore()
    writer.flush()
  return state, stop.requested


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       accept_config_changes: bool = False) -> TrainState:
  """Trains pix2pix, resuming from the latest checkpoint in ``workdir/checkpoints``.

  Args:
    config: the experiment config (configs/*.py).
    workdir: checkpoints, TensorBoard event files and the config go here.
    accept_config_changes: resume even where the config changes the training trajectory
      (see ``checkpointing.check_config_changes``).

  Returns:
    The final train state.
  """
  input_pipeline.validate_config(config)
  input_pipeline.validate_eval_config(config)
  mesh = parallel.create_mesh()
  parallel.check_batch_size(config.data.batch_size, mesh)
  # Every file is decoded once before anything is built (cached across resumes).
  train_source = _checked_source(config, config.data.train_split, workdir)
  heldout_source = _checked_source(config, config.data.eval_split, workdir, required=False)
  examples = {name: ex for name, ex in (
      ('train', _fixed_examples(config, config.data.train_split, train_source)),
      ('heldout', _fixed_examples(config, config.data.eval_split, heldout_source)))
              if ex is not None}
  num_train = len(train_source.records)
  steps_per_epoch = max(1, num_train // config.data.batch_size)
  num_steps = (config.optim.num_train_steps if config.optim.num_train_steps > 0 else
               (config.optim.n_epochs + config.optim.n_epochs_decay) * steps_per_epoch)
  pix2pix = create_pix2pix(config, steps_per_epoch)
  replicated = parallel.replicated_sharding(mesh)
  validating = config.eval_every_steps > 0
  validate = None
  if validating:
    if heldout_source is None:
      logging.warning('No validation during training: split %r has no images.',
                      config.data.eval_split)
    else:
      validate = evaluate.make_validation(config, pix2pix.generator, mesh, heldout_source)

  if config.init_from:  # A bad init_from is found before any data or model is built.
    checkpointing.resolve_init_from(config.init_from)
  manager = checkpointing.create_manager(workdir, config.max_to_keep,
                                         config.eval.best_metric if validating else None)
  iterators = []  # Closed on every way out: grain's workers and their shared memory end.
  try:
    # Initialised straight into the replicated layout: one program over all processes, not
    # one per host followed by a cross-host broadcast.
    state, train_iter = checkpointing.restore_or_initialize(
        manager, lambda: create_train_state(pix2pix, config, jax.random.PRNGKey(config.seed),
                                            replicated),
        replicated,
        lambda start_step: _tracked(iterators, input_pipeline.create_train_iterator(
            config, config.seed, start_step, train_source)),
        config, accept_config_changes)
    state, stopped = _train_loop(config, workdir, pix2pix, mesh, manager, state, train_iter,
                                 examples, validate, num_train, steps_per_epoch, num_steps)
  finally:
    manager.wait_until_finished()  # Never exit with a save half-written.
    manager.close()
    for iterator in iterators:
      input_pipeline.close_iterator(iterator)
  if stopped:
    logging.warning('Stopped at step %d on request; resume by running the same command.',
                    int(state.step))
  return state
