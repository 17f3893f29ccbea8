"""The official pix2pix networks (junyanz/pytorch-CycleGAN-and-pix2pix), in flax.linen, NHWC.

All modules are called as ``module.apply(variables, x, train=..., rngs={'dropout': key})``.
``train=True`` means batch-norm batch statistics and active dropout, as the official
networks in ``.train()`` mode; ``train=False`` is ``.eval()``.

Bias placement follows the official ``use_bias = norm is InstanceNorm2d`` rule: with batch
norm (or no norm) the convolutions followed by a norm carry no bias; the layers the official
code hard-codes (U-Net outermost up-conv, PatchGAN first and last conv, ResNet head) do.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from p2p_jax import layers


def _leaky_relu(x):
  return nn.leaky_relu(x, negative_slope=0.2)


class UNetGenerator(nn.Module):
  """U-Net with skip connections; ``num_downs=8`` is unet_256, ``num_downs=7`` unet_128.

  The official recursive ``UnetSkipConnectionBlock`` unrolled: level ``i`` has a down-conv
  ``down{i}`` (+ ``down_norm{i}``) and an up-conv ``up{i}`` (+ ``up_norm{i}``). Level 0 is
  the outermost block, level ``num_downs - 1`` the innermost. The official blocks apply an
  in-place LeakyReLU to the skip tensor, but the skip is only ever read through the parent's
  ReLU, and ``relu(leaky_relu(x)) == relu(x)``, so a plain concatenation is exact.
  """
  output_nc: int = 3
  ngf: int = 64
  num_downs: int = 8
  norm: str = 'batch'
  use_dropout: bool = True
  conv_impl: str = 'fast'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    if self.num_downs < 5:
      raise ValueError(f'UNetGenerator needs num_downs >= 5, got {self.num_downs}')
    side = 2 ** self.num_downs
    if x.shape[1] % side or x.shape[2] % side:
      raise ValueError(f'UNetGenerator(num_downs={self.num_downs}) needs height and width '
                       f'divisible by {side}, got input shape {x.shape}')
    n = self.num_downs
    use_bias = self.norm == 'instance'
    inner_channels = [self.ngf * min(2 ** i, 8) for i in range(n)]  # Down-conv outputs.
    outer_channels = [self.output_nc] + inner_channels[:-1]  # Up-conv outputs.
    down_conv = functools.partial(layers.Conv, kernel_size=4, stride=2, padding=1,
                                  impl=self.conv_impl, dtype=self.dtype)
    up_conv = functools.partial(layers.ConvTranspose, kernel_size=4, stride=2, padding=1,
                                impl=self.conv_impl, dtype=self.dtype)

    skips = []
    h = x
    for i in range(n):
      if i > 0:
        h = _leaky_relu(h)
      h = down_conv(inner_channels[i], use_bias=use_bias, name=f'down{i}')(h)
      if 0 < i < n - 1:  # No norm on the outermost and on the 1x1 innermost down-conv.
        h = layers.make_norm(self.norm, train, self.dtype, f'down_norm{i}')(h)
      skips.append(h)

    for i in reversed(range(n)):
      if i < n - 1:
        h = jnp.concatenate([skips[i], h], axis=-1)
      h = nn.relu(h)
      if i == 0:
        h = up_conv(outer_channels[0], use_bias=True, name='up0')(h)
        return jnp.tanh(h.astype(jnp.float32))
      h = up_conv(outer_channels[i], use_bias=use_bias, name=f'up{i}')(h)
      h = layers.make_norm(self.norm, train, self.dtype, f'up_norm{i}')(h)
      if self.use_dropout and 4 <= i <= n - 2:  # The ngf*8 blocks between level 3 and the innermost.
        h = nn.Dropout(0.5, deterministic=not train)(h)


class PatchGANDiscriminator(nn.Module):
  """The official NLayerDiscriminator (``n_layers >= 1``) or PixelDiscriminator (``0``).

  Receptive fields: n_layers=0 is the 1x1 PixelGAN, 1 is 16x16, 3 is the paper's 70x70
  (30x30 logits on 256x256 input), 5 is 286x286. Input is ``concat([A, B], -1)``; output is
  one channel of logits per patch.
  """
  ndf: int = 64
  n_layers: int = 3
  norm: str = 'batch'
  conv_impl: str = 'fast'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    use_bias = self.norm == 'instance'
    norm = lambda i: layers.make_norm(self.norm, train, self.dtype, f'norm{i}')
    conv = functools.partial(layers.Conv, impl=self.conv_impl, dtype=self.dtype)
    if self.n_layers == 0:  # PixelDiscriminator: 1x1 convs.
      h = _leaky_relu(conv(self.ndf, 1, name='conv0')(x))
      h = _leaky_relu(norm(1)(conv(2 * self.ndf, 1, use_bias=use_bias, name='conv1')(h)))
      return conv(1, 1, use_bias=use_bias, name='conv2')(h).astype(jnp.float32)

    h = _leaky_relu(conv(self.ndf, 4, stride=2, padding=1, name='conv0')(x))
    for i in range(1, self.n_layers + 1):
      stride = 2 if i < self.n_layers else 1
      features = self.ndf * min(2 ** i, 8)
      h = conv(features, 4, stride=stride, padding=1, use_bias=use_bias, name=f'conv{i}')(h)
      h = _leaky_relu(norm(i)(h))
    i = self.n_layers + 1
    return conv(1, 4, stride=1, padding=1, name=f'conv{i}')(h).astype(jnp.float32)


def _reflect_pad(x, pad):
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='reflect')


class ResnetBlock(nn.Module):
  """Official ResnetBlock with reflection padding: x + conv-norm-relu-(dropout)-conv-norm."""
  norm: str = 'batch'
  use_dropout: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    dim = x.shape[-1]
    use_bias = self.norm == 'instance'
    conv = functools.partial(layers.Conv, dim, 3, use_bias=use_bias, dtype=self.dtype)
    h = conv(name='conv0')(_reflect_pad(x, 1))
    h = nn.relu(layers.make_norm(self.norm, train, self.dtype, 'norm0')(h))
    if self.use_dropout:
      h = nn.Dropout(0.5, deterministic=not train)(h)
    h = conv(name='conv1')(_reflect_pad(h, 1))
    h = layers.make_norm(self.norm, train, self.dtype, 'norm1')(h)
    return x + h


class ResnetGenerator(nn.Module):
  """Official ResnetGenerator: 7x7 stem, 2 stride-2 downs, n residual blocks, 2 ups, 7x7 head."""
  output_nc: int = 3
  ngf: int = 64
  n_blocks: int = 9
  norm: str = 'batch'
  use_dropout: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    if x.shape[1] % 4 or x.shape[2] % 4:
      raise ValueError(f'ResnetGenerator needs height and width divisible by 4, got {x.shape}')
    use_bias = self.norm == 'instance'
    norm = lambda name: layers.make_norm(self.norm, train, self.dtype, name)
    h = layers.Conv(self.ngf, 7, use_bias=use_bias, dtype=self.dtype, name='stem')(
        _reflect_pad(x, 3))
    h = nn.relu(norm('stem_norm')(h))
    for i in range(2):
      h = layers.Conv(self.ngf * 2 ** (i + 1), 3, stride=2, padding=1, use_bias=use_bias,
                      dtype=self.dtype, name=f'down{i}')(h)
      h = nn.relu(norm(f'down_norm{i}')(h))
    for i in range(self.n_blocks):
      h = ResnetBlock(self.norm, self.use_dropout, self.dtype, name=f'block{i}')(h, train)
    for i in range(2):
      # ConvTranspose2d(k3, s2, p1, output_padding=1) exactly doubles the size.
      h = layers.ConvTranspose(self.ngf * 2 ** (1 - i), 3, stride=2, padding=1,
                               output_padding=1, use_bias=use_bias, dtype=self.dtype,
                               name=f'up{i}')(h)
      h = nn.relu(norm(f'up_norm{i}')(h))
    h = layers.Conv(self.output_nc, 7, dtype=self.dtype, name='head')(_reflect_pad(h, 3))
    return jnp.tanh(h.astype(jnp.float32))


# unet_256 and unet_128 are the official names; the smaller ones serve CPU demos and tests.
UNET_NAMES = {'unet_256': 8, 'unet_128': 7, 'unet_64': 6, 'unet_32': 5}


def create_generator(model_config, output_nc: int, dtype: Any = jnp.float32) -> nn.Module:
  """Builds the generator named by ``model_config.netG`` (the official ``--netG`` names)."""
  name = model_config.netG
  common = dict(output_nc=output_nc, ngf=model_config.ngf, norm=model_config.norm,
                use_dropout=model_config.use_dropout, dtype=dtype)
  if name in UNET_NAMES:
    conv_impl = layers.resolve_impl(model_config.conv_impl, jax.default_backend())
    return UNetGenerator(num_downs=UNET_NAMES[name], conv_impl=conv_impl, **common)
  if name in ('resnet_9blocks', 'resnet_6blocks'):
    return ResnetGenerator(n_blocks=9 if name == 'resnet_9blocks' else 6, **common)
  raise ValueError(f'config.model.netG must be one of {sorted(UNET_NAMES)} or '
                   f"'resnet_9blocks', 'resnet_6blocks'; got {name!r}")


def create_discriminator(model_config, dtype: Any = jnp.float32) -> nn.Module:
  """Builds the discriminator named by ``model_config.netD`` ('basic', 'n_layers', 'pixel')."""
  name = model_config.netD
  if name == 'basic':
    n_layers = 3
  elif name == 'n_layers':
    n_layers = model_config.n_layers_D
  elif name == 'pixel':
    n_layers = 0
  else:
    raise ValueError(f"config.model.netD must be 'basic', 'n_layers' or 'pixel'; got {name!r}")
  conv_impl = layers.resolve_impl(model_config.conv_impl, jax.default_backend())
  return PatchGANDiscriminator(ndf=model_config.ndf, n_layers=n_layers,
                               norm=model_config.norm, conv_impl=conv_impl, dtype=dtype)


def init_variables(module: nn.Module, key: jax.Array, input_shape) -> dict:
  """Initialises ``{'params', 'batch_stats'}`` (``batch_stats`` is ``{}`` without batch norm)."""
  variables = module.init({'params': key, 'dropout': key}, jnp.zeros(input_shape, jnp.float32),
                          train=False)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def count_params(params) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def generate(generator: nn.Module, variables: dict, images: jax.Array, rng: jax.Array,
             mode: str = 'paper') -> jax.Array:
  """Translates ``images`` with the test-time behaviour of the official ``test.py``.

  Args:
    generator: the generator module.
    variables: ``{'params', 'batch_stats'}``.
    images: ``(N, H, W, input_nc)`` in [-1, 1].
    rng: dropout key (used in ``'paper'`` mode only).
    mode: ``'paper'`` (the paper's and the official default): batch-norm statistics of this
      test batch and active dropout, so different keys give different samples. ``'eval'``
      (official ``--eval``): running averages and no dropout; deterministic.

  Returns:
    ``(N, H, W, output_nc)`` float32 in [-1, 1].
  """
  check_eval_mode(mode)
  if mode == 'paper':
    # Batch statistics of the test batch; the running averages are left untouched.
    out, _ = generator.apply(variables, images, train=True, mutable=['batch_stats'],
                             rngs={'dropout': rng})
    return out
  return generator.apply(variables, images, train=False)


def check_eval_mode(mode: str) -> None:
  """Raises unless ``mode`` is a test-time mode of :func:`generate`."""
  if mode not in ('paper', 'eval'):
    raise ValueError(f"config.eval.mode must be 'paper' or 'eval', got {mode!r}")


def compute_dtype(name: str):
  """The activation dtype of ``config.compute_dtype`` ('float32' or 'bfloat16')."""
  if name not in ('float32', 'bfloat16'):
    raise ValueError(f"config.compute_dtype must be 'float32' or 'bfloat16', got {name!r}")
  return jnp.dtype(name)


def required_multiple(netG: str) -> int:
  """The factor that input height and width must be multiples of for generator ``netG``."""
  if netG in UNET_NAMES:
    return 2 ** UNET_NAMES[netG]
  return 4  # The ResNet generators: two stride-2 downsamplings.
