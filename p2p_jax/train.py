"""pix2pix training: the state, the LR schedule and the jitted, sharded train step."""
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from p2p_jax import losses, models, parallel


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


def compute_dtype(config: ml_collections.ConfigDict):
  if config.compute_dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"config.compute_dtype must be 'float32' or 'bfloat16', "
                     f'got {config.compute_dtype!r}')
  return jnp.dtype(config.compute_dtype)


def lr_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Callable:
  """The official `--lr_policy linear`: constant for n_epochs, then linear decay to zero.

  As the official ``LambdaLR`` stepped once per epoch, the factor is piecewise constant per
  epoch: ``1 - max(0, epoch + 1 - n_epochs) / (n_epochs_decay + 1)`` for 0-based ``epoch``.
  """
  def schedule(step):
    epoch = step // steps_per_epoch
    decay = jnp.maximum(0, epoch + 1 - config.n_epochs) / float(config.n_epochs_decay + 1)
    return config.optim.lr * jnp.clip(1.0 - decay, 0.0, 1.0)
  return schedule


def create_pix2pix(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Pix2Pix:
  dtype = compute_dtype(config)
  optimizer = optax.adam(lr_schedule(config, steps_per_epoch), b1=config.optim.beta1,
                         b2=config.optim.beta2)
  losses._check_mode(config.loss.gan_mode)
  return Pix2Pix(generator=models.create_generator(config.model, config.output_nc, dtype),
                 discriminator=models.create_discriminator(config.model, dtype),
                 optimizer=optimizer, gan_mode=config.loss.gan_mode,
                 lambda_l1=float(config.loss.lambda_l1))


def create_train_state(pix2pix: Pix2Pix, config: ml_collections.ConfigDict,
                       rng: jax.Array) -> TrainState:
  """Initialises G and D (official N(0, 0.02) init) and their Adam states."""
  size = config.crop_size

  def net_state(module, key, channels):
    variables = models.init_variables(module, key, (1, size, size, channels))
    return NetState(params=variables['params'], batch_stats=variables['batch_stats'],
                    opt_state=pix2pix.optimizer.init(variables['params']))

  @jax.jit  # One compiled init instead of hundreds of eager ops.
  def init(rng):
    g_key, d_key, step_key = jax.random.split(rng, 3)
    return TrainState(
        step=jnp.zeros((), jnp.int32), rng=step_key,
        generator=net_state(pix2pix.generator, g_key, config.input_nc),
        discriminator=net_state(pix2pix.discriminator, d_key,
                                config.input_nc + config.output_nc))

  return init(rng)


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
    batch: ``{'A': (N, H, W, input_nc), 'B': (N, H, W, output_nc)}`` float in [-1, 1].

  Returns:
    The new state and a dict of scalar metrics.
  """
  real_a, real_b = batch['A'], batch['B']
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
  return jax.jit(step_fn, in_shardings=(replicated, parallel.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)
