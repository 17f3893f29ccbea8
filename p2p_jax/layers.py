"""Convolution and normalisation building blocks with PyTorch pix2pix semantics.

Parameter layout is canonical flax (HWIO kernels) and never depends on how an op is computed:

* A down-conv stores torch's ``Conv2d.weight`` ``(out, in, kh, kw)`` as ``(kh, kw, in, out)``.
* An up-conv stores torch's ``ConvTranspose2d.weight`` ``(in, out, kh, kw)`` as
  ``(kh, kw, in, out)``: a plain transpose, with *no* spatial flip. The flip that a transposed
  convolution implies happens inside :func:`conv_transpose`, so checkpoints, the PyTorch import
  and any faster formulation all read the same stored kernel.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# cpu_convs imports this module too; each reads the other's names only at call time.
from p2p_jax import cpu_convs

DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')

# The official pix2pix `init_type=normal` with `init_gain=0.02`.
weight_init = nn.initializers.normal(stddev=0.02)


def conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """``torch.nn.Conv2d`` (zero padding) on NHWC input with an HWIO kernel."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      dimension_numbers=DIMENSION_NUMBERS)


def conv_transpose(x: jax.Array, kernel: jax.Array, stride: int, padding: int,
                   output_padding: int = 0) -> jax.Array:
  """``torch.nn.ConvTranspose2d`` on NHWC input, exactly, alignment included.

  PyTorch scatters input pixel ``i`` through kernel tap ``k`` to output ``i*stride - padding
  + k``. That is a stride-1 convolution of the input dilated by ``stride``, padded by
  ``k - 1 - padding`` (plus ``output_padding`` at the end), with the spatially flipped kernel.

  Args:
    x: ``(N, H, W, in)``.
    kernel: ``(kh, kw, in, out)``, torch's ``(in, out, kh, kw)`` transposed, unflipped.
    stride, padding, output_padding: as in torch.

  Returns:
    ``(N, (H-1)*stride - 2*padding + kh + output_padding, ..., out)``.
  """
  kh, kw = kernel.shape[:2]
  pad_h = (kh - 1 - padding, kh - 1 - padding + output_padding)
  pad_w = (kw - 1 - padding, kw - 1 - padding + output_padding)
  return lax.conv_general_dilated(
      x, kernel[::-1, ::-1], window_strides=(1, 1), padding=(pad_h, pad_w),
      lhs_dilation=(stride, stride), dimension_numbers=DIMENSION_NUMBERS)


IMPLS = ('fast', 'plain')


def resolve_impl(impl: str, platform: str) -> str:
  """The convolution implementation for ``config.model.conv_impl`` on ``platform``.

  ``'auto'`` is ``'fast'`` (the :mod:`p2p_jax.cpu_convs` forms) on CPU, where XLA's
  convolution kernels are slow on the pix2pix shapes, and ``'plain'`` on every other platform
  (``'gpu'``, ``'tpu'``, ...), where XLA hands the plain convolutions to cuDNN or the TPU
  convolution emitter. ``'fast'`` and ``'plain'`` are kept as given.

  Args:
    impl: ``'auto'``, ``'fast'`` or ``'plain'``.
    platform: a JAX platform name, e.g. ``jax.default_backend()``.
  """
  if impl == 'auto':
    return 'fast' if platform.lower() == 'cpu' else 'plain'
  if impl in IMPLS:
    return impl
  raise ValueError(f"config.model.conv_impl must be 'auto', 'fast' or 'plain', got {impl!r}")


def _check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f"conv_impl must be 'fast' or 'plain', got {impl!r} "
                     "(resolve 'auto' with layers.resolve_impl first)")


class Conv(nn.Module):
  """``torch.nn.Conv2d`` with zero padding, canonical HWIO kernel, N(0, 0.02) init.

  ``impl='fast'`` runs 4x4 padding-1 layers through :func:`p2p_jax.cpu_convs.conv`;
  ``impl='plain'`` always uses :func:`conv`. Both read the same parameters.
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  use_bias: bool = True
  impl: str = 'fast'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _check_impl(self.impl)
    kernel = self.param('kernel', weight_init,
                        (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
    op = cpu_convs.conv if self.impl == 'fast' else conv
    y = op(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.padding)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return y


class ConvTranspose(nn.Module):
  """``torch.nn.ConvTranspose2d``; kernel stored ``(kh, kw, in, out)``, unflipped.

  ``impl='fast'`` computes the pix2pix 4x4/stride-2/padding-1 case with
  :func:`p2p_jax.cpu_convs.up_conv`; ``impl='plain'`` always uses :func:`conv_transpose`. Both
  read the same parameters and agree to float32 rounding.
  """
  features: int
  kernel_size: int
  stride: int = 2
  padding: int = 1
  output_padding: int = 0
  use_bias: bool = True
  impl: str = 'fast'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', weight_init,
                        (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    _check_impl(self.impl)
    is_4x4_s2_p1 = (self.kernel_size, self.stride, self.padding, self.output_padding) == (4, 2, 1, 0)
    if self.impl == 'fast' and is_4x4_s2_p1:
      y = cpu_convs.up_conv(x, kernel)
    else:
      y = conv_transpose(x, kernel, self.stride, self.padding, self.output_padding)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return y


class BatchNorm(nn.Module):
  """``torch.nn.BatchNorm2d`` (eps 1e-5), statistics in float32.

  Batch statistics are taken over N, H, W of the *global* batch: under ``jit`` with the batch
  sharded over a mesh, XLA inserts the cross-device reduction, so multi-device training
  normalises exactly as one device would. As in PyTorch, the running variance is updated with
  the unbiased batch variance. ``momentum`` follows the flax convention (0.9 == torch's 0.1).
  """
  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param('scale', lambda key, shape: 1.0 + 0.02 * jax.random.normal(key, shape),
                       (features,))
    bias = self.param('bias', nn.initializers.zeros, (features,))
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    x32 = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      mean = jnp.mean(x32, axis=(0, 1, 2))
      var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))
      if not self.is_initializing():
        count = x.shape[0] * x.shape[1] * x.shape[2]
        unbiased_var = var * (count / max(count - 1, 1))
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased_var
    y = (x32 - mean) * (scale * lax.rsqrt(var + self.epsilon)) + bias
    return y.astype(self.dtype)


class InstanceNorm(nn.Module):
  """``torch.nn.InstanceNorm2d`` as pix2pix uses it: no affine parameters, no running stats."""
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=(1, 2), keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2), keepdims=True)
    return ((x32 - mean) * lax.rsqrt(var + self.epsilon)).astype(self.dtype)


def make_norm(norm: str, train: bool, dtype: Any, name: str):
  """Returns a norm layer (a callable) for ``norm`` in {'batch', 'instance', 'none'}."""
  if norm == 'batch':
    return BatchNorm(use_running_average=not train, dtype=dtype, name=name)
  if norm == 'instance':
    return InstanceNorm(dtype=dtype, name=name)
  if norm == 'none':
    return lambda x: x
  raise ValueError(f"norm must be 'batch', 'instance' or 'none', got {norm!r}")
