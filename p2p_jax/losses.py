"""GAN objectives (the official ``GANLoss`` modes) and the L1 reconstruction term."""
import jax
import jax.numpy as jnp
import optax

GAN_MODES = ('vanilla', 'lsgan', 'hinge')


def check_gan_mode(mode: str) -> None:
  if mode not in GAN_MODES:
    raise ValueError(f'config.loss.gan_mode must be one of {GAN_MODES}, got {mode!r}')


def discriminator_loss(mode: str, logits: jax.Array, is_real: bool) -> jax.Array:
  """The discriminator's loss on one set of patch logits, real or fake."""
  check_gan_mode(mode)
  if mode == 'vanilla':  # BCEWithLogitsLoss against an all-ones / all-zeros target.
    target = jnp.full_like(logits, 1.0 if is_real else 0.0)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, target))
  if mode == 'lsgan':  # MSELoss.
    return jnp.mean(jnp.square(logits - (1.0 if is_real else 0.0)))
  sign = -1.0 if is_real else 1.0  # hinge: relu(1 - D(real)) and relu(1 + D(fake)).
  return jnp.mean(jax.nn.relu(1.0 + sign * logits))


def generator_gan_loss(mode: str, fake_logits: jax.Array) -> jax.Array:
  """The generator's adversarial loss on the discriminator's logits for its fakes."""
  check_gan_mode(mode)
  if mode == 'hinge':
    return -jnp.mean(fake_logits)
  return discriminator_loss(mode, fake_logits, is_real=True)


def l1_loss(fake: jax.Array, target: jax.Array) -> jax.Array:
  return jnp.mean(jnp.abs(fake.astype(jnp.float32) - target.astype(jnp.float32)))
