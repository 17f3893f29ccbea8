"""Exact fast forms of the pix2pix 4x4 convolutions, chosen on CPU only.

XLA:CPU's convolution kernels are slow on these shapes (few output pixels, few output
channels, and the kernel gradients above all), so on CPU the 4x4 padding-1 layers run as
im2col and per-tap matmuls, a sub-pixel convolution or Winograd (:mod:`p2p_jax.winograd`),
with custom gradients where XLA's own are the slow part. Each form is the plain convolution's
sum reassociated, so it is exact to float32 rounding, and it reads the same HWIO kernels as
:mod:`p2p_jax.layers`, so parameters never depend on the form. Other platforms run the plain
:func:`p2p_jax.layers.conv` / :func:`p2p_jax.layers.conv_transpose`, which XLA hands to cuDNN
or the TPU convolution emitter (:func:`p2p_jax.layers.resolve_impl` chooses). Measurements
live in docs/performance.md.

Public: :func:`conv` and :func:`up_conv`, tuned by :class:`Thresholds`.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

# layers imports this module too; each reads the other's names only at call time.
from p2p_jax import layers
from p2p_jax import winograd


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """Where :func:`conv` and :func:`up_conv` switch form; every form is exact on either side.

  Attributes:
    matmul_max_pixels: a 4x4 layer whose low-resolution side (a down-conv's output, an
      up-conv's input) has at most this many pixels, batch included, runs as matmuls, and so
      do its gradients: a GEMM streams the kernel once, where XLA:CPU's convolution kernels
      pay per-call overhead and kernel re-layouts around a few output pixels.
    matmul_max_features: layers with at most this many output channels run as matmuls too:
      XLA:CPU's fast convolution path wants more features, below it runs a generic loop.
    one_matmul_dx_min_pixels: from this many input pixels on, the input gradient of the
      small up-conv's per-tap products is one matmul; re-laying out the kernel for it pays
      only on enough pixels.
    s2_row_min_channels: from this many input channels on, a stride-2 down-conv's kernel
      gradient is computed per kernel row; below, one matmul on im2col patches is wider.
  """
  matmul_max_pixels: int = 256
  matmul_max_features: int = 16
  one_matmul_dx_min_pixels: int = 128
  s2_row_min_channels: int = 16


DEFAULT_THRESHOLDS = Thresholds()


def _stride_2_blocks(x: jax.Array) -> jax.Array:
  """``x`` zero-padded by 1 as the 2x2 blocks a 4x4 stride-2 window reads.

  Returns ``(N, Ho + 1, 2, Wo + 1, 2, C)``: block row, row phase, block column, column phase,
  channel, with ``Ho = (H - 2) // 2 + 1``. An odd H leaves one padded row that no window
  reaches; it is cropped.
  """
  n, h, w, c = x.shape
  ho, wo = (h - 2) // 2 + 1, (w - 2) // 2 + 1
  xp = jnp.pad(x, ((0, 0), (1, 2 * ho + 1 - h), (1, 2 * wo + 1 - w), (0, 0)))
  return xp.reshape(n, ho + 1, 2, wo + 1, 2, c)


def _patches(x: jax.Array, stride: int) -> jax.Array:
  """im2col for a 4x4 kernel with zero padding 1 and stride 1 or 2.

  With stride 2, space-to-depth turns the 4x4 window into a 2x2 window of 2x2 blocks: tap
  ``kh = 2a + p`` is block row ``a``, phase ``p``. With stride 1, the four column taps are
  gathered, then the four row taps. A few large slices rather than 16 strided ones, so it and
  its adjoint (the col2im of the up-conv and of the gradients) compile to few fusions.

  Returns ``(N, Ho, Wo, 16 * C)``, ``Ho = (H - 2) // stride + 1``, the last axis ordered
  ``(kh, kw, c)`` as an HWIO kernel reshaped to ``(16 * C, out)``.
  """
  n, h, w, c = x.shape
  if stride == 2:
    ho, wo = (h - 2) // 2 + 1, (w - 2) // 2 + 1
    blocks = _stride_2_blocks(x).transpose(0, 1, 3, 2, 4, 5)  # (n, ho+1, wo+1, p, q, c)
    rows = jnp.stack([blocks[:, a:a + ho] for a in range(2)], axis=3)  # (n, ho, wo+1, a, p, q, c)
    taps = jnp.stack([rows[:, :, b:b + wo] for b in range(2)], axis=5)  # (.., a, p, b, q, c)
  elif stride == 1:
    ho, wo = h - 1, w - 1
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.stack([xp[:, :, kw:kw + wo] for kw in range(4)], axis=3)  # (n, h+2, wo, kw, c)
    taps = jnp.stack([cols[:, kh:kh + ho] for kh in range(4)], axis=3)  # (n, ho, wo, kh, kw, c)
  else:
    raise ValueError(f'4x4 patches need stride 1 or 2, got {stride}')
  return taps.reshape(n, ho, wo, 16 * c)


def _conv_matmul(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """``Conv2d(4, stride, 1)`` as im2col patches times the kernel reshaped to ``(16 * in, out)``.

  Each output is the dot product of its window with the kernel. Autodiff makes both gradients
  matmuls too (``patches^T @ dy``; ``dy @ kernel^T``, then col2im), with no kernel flip.
  """
  return jnp.dot(_patches(x, stride), kernel.reshape(-1, kernel.shape[-1]))


def _tap_products_batched_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``out[p, t] = x[p] @ kernel[t]``: the input broadcast over taps, one batched matmul."""
  x16 = jnp.broadcast_to(x[None], (16, *x.shape))
  taps = lax.dot_general(x16, kernel, (((2,), (1,)), ((0,), (0,))))  # (16, pixels, out)
  return taps.transpose(1, 0, 2)


def _tap_products_batched_fwd(x, kernel, dx_as_one_matmul):
  del dx_as_one_matmul
  return _tap_products_batched_forward(x, kernel), (x, kernel)


def _tap_products_batched_bwd(dx_as_one_matmul, residuals, d_products):
  """``dx = sum_t d_products[:, t] @ kernel[t]^T``: one matmul contracting (tap, out), or one
  matmul per tap and their sum (no kernel re-layout); ``dkernel[t] = x^T @ d_products[:, t]``."""
  x, kernel = residuals
  d_products = d_products.astype(x.dtype)
  if dx_as_one_matmul:
    dx = lax.dot_general(d_products, kernel, (((1, 2), (0, 2)), ((), ())))
  else:
    dx = lax.dot_general(d_products.transpose(1, 0, 2), kernel,
                         (((2,), (2,)), ((0,), (0,)))).sum(0)
  x16 = jnp.broadcast_to(x[None], (16, *x.shape))
  dkernel = lax.dot_general(x16, d_products.transpose(1, 0, 2), (((1,), (1,)), ((0,), (0,))))
  return dx, dkernel.astype(kernel.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _tap_products_batched(x: jax.Array, kernel: jax.Array, dx_as_one_matmul: bool) -> jax.Array:
  """``x @ kernel[t]`` for each of the 16 taps as 16 batched matmuls on the kernel as stored.

  ``(pixels, in)``, ``(16, in, out)`` -> ``(pixels, 16, out)``. On a few pixels, copying the
  input 16 times is cheaper than re-laying out a large kernel. XLA's own input gradient fuses
  the 16 products with their sum, which XLA:CPU runs slowly; see the custom backward.
  """
  return _tap_products_batched_forward(x, kernel)


_tap_products_batched.defvjp(_tap_products_batched_fwd, _tap_products_batched_bwd)


def _tap_products_wide(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``x @ kernel[kh, kw]`` for all 16 taps as one ``(in, 16 * out)`` matmul.

  ``(..., in)`` -> ``(..., 16 * out)``, the last axis ordered ``(kh, kw, out)``. For layers with
  few output channels, where the kernel's re-layout is cheap and one wide matmul beats 16.
  """
  c_in, c_out = kernel.shape[2:]
  return jnp.dot(x, kernel.transpose(2, 0, 1, 3).reshape(c_in, 16 * c_out))


def _up_conv_matmul(x: jax.Array, kernel: jax.Array,
                    thresholds: Thresholds = DEFAULT_THRESHOLDS) -> jax.Array:
  """``ConvTranspose2d(4, 2, 1)`` as the 16 tap products, then col2im.

  Input pixel ``i`` sends ``x[i] @ kernel[k]`` to output ``2i - 1 + k``, exactly the adjoint
  of :func:`_patches` with stride 2 (which reads output ``2i - 1 + k`` into patch ``(i, k)``).
  The products are batched per tap on a few pixels, one wide matmul on many.
  """
  n, h, w, c_in = x.shape
  c_out = kernel.shape[-1]
  pixels = n * h * w
  if pixels <= thresholds.matmul_max_pixels:
    cols = _tap_products_batched(x.reshape(pixels, c_in), kernel.reshape(16, c_in, c_out),
                                 pixels >= thresholds.one_matmul_dx_min_pixels)
  else:
    cols = _tap_products_wide(x, kernel)
  cols = cols.reshape(n, h, w, 16 * c_out)
  out = jax.ShapeDtypeStruct((n, 2 * h, 2 * w, c_out), cols.dtype)
  (y,) = jax.linear_transpose(lambda y: _patches(y, 2), out)(cols)
  return y


# Sub-pixel form: output ``2m + r`` (per axis) reads input ``m + offset`` through tap ``kh``,
# with phase ``r = 1 - kh % 2`` (taps 3, 1 for ``r = 0``; 2, 0 for ``r = 1``).
_SUBPIXEL_INPUT_OFFSET = {3: -1, 1: 0, 2: 0, 0: 1}


def _subpixel_kernel(kernel: jax.Array) -> jax.Array:
  """The 4x4 up-conv kernel as the 2x2 kernel of :func:`_subpixel_conv`.

  ``(4, 4, in, out)`` to ``(2, 2, in, 4 * out)``: window tap ``d`` and output phase ``q``
  (per axis) read kernel tap ``2 * (1 - d) + q``; channels ordered ``(q_h, q_w, out)``.
  """
  c_in, c_out = kernel.shape[2:]
  k = kernel.reshape(2, 2, 2, 2, c_in, c_out)[::-1, :, ::-1]  # (d_h, q_h, d_w, q_w, in, out)
  return k.transpose(0, 2, 4, 1, 3, 5).reshape(2, 2, c_in, 4 * c_out)


def _subpixel_conv(x: jax.Array, kernel: jax.Array, out_h: int, out_w: int) -> jax.Array:
  """``ConvTranspose2d(4, 2, 1)`` as one 2x2 convolution, then depth-to-space, cropped to
  ``(out_h, out_w)`` (at most ``2H + 1``, ``2W + 1``).

  Input ``i`` reaches output ``p = 2i - 1 + k`` through tap ``k``. Writing ``p = 2j - 1 + q``
  (phase ``q``), output ``p`` reads inputs ``j - 1, j`` through taps ``2 + q, q``: a 2x2 window over the input padded by 1, the same for both phases, so one
  stride-1 convolution to ``4 * out`` channels gives all four phases at ``(H + 1) x (W + 1)``
  positions. Outputs ``-1`` and ``2H`` are computed and cropped. One wide convolution runs
  faster on XLA:CPU than four phase convolutions, or than the transposed convolution.
  """
  n, h, w, _ = x.shape
  c_out = kernel.shape[-1]
  y = lax.conv_general_dilated(x, _subpixel_kernel(kernel), window_strides=(1, 1),
                               padding=((1, 1), (1, 1)), dimension_numbers=layers.DIMENSION_NUMBERS)
  y = y.reshape(n, h + 1, w + 1, 2, 2, c_out).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(n, 2 * h + 2, 2 * w + 2, c_out)[:, 1:1 + out_h, 1:1 + out_w]


def _with_grads(forward, kernel_grad, input_grad=None):
  """``forward(x, kernel)`` with gradients ``kernel_grad(x, dy)`` and
  ``input_grad(dy, kernel, x_shape)``, exact forms of its own that run faster on XLA:CPU.

  Without ``input_grad``, the input gradient stays XLA's.
  """
  fn = jax.custom_vjp(forward)

  def fwd(x, kernel):
    return forward(x, kernel), (x, kernel)

  def bwd(residuals, dy):
    x, kernel = residuals
    if input_grad is None:
      _, x_vjp = jax.vjp(lambda x: forward(x, kernel), x)
      (dx,) = x_vjp(dy)
    else:
      dx = input_grad(dy.astype(x.dtype), kernel, x.shape).astype(x.dtype)
    return dx, kernel_grad(x, dy.astype(x.dtype)).astype(kernel.dtype)

  fn.defvjp(fwd, bwd)
  return fn


def _swap_in_out(kernel: jax.Array) -> jax.Array:
  """An HWIO kernel with in and out swapped: a stride-2 conv's adjoint is an up-conv with it."""
  return kernel.transpose(0, 1, 3, 2)


def _row_kernel_grad(x_rows: jax.Array, dy_taps, col_offsets) -> jax.Array:
  """One kernel row's gradient, all its column taps from one matmul over all pixels.

  ``out[t, c, o] = sum_{n,i,j} x_rows[n, i, j + col_offsets[t], c] * dy_taps[t][n, i, j, o]``,
  computed by shifting ``dy`` (zero-padded) instead of the input: ``x_rows`` stays one
  contiguous slab, where strided per-tap input windows would each be copied and transposed.
  The shifted ``dy`` keeps its channels last and the matmul contracts the leading (pixel) axis
  of both, so ``dy``'s producer (batch norm and ReLU backward) fuses into the shift as a
  contiguous loop rather than a strided transpose.

  Args:
    x_rows: ``(N, Ho, W', C)``, the input rows this kernel row reads, all columns.
    dy_taps: ``(N, Ho, Wo, out)`` arrays, one per column tap.
    col_offsets: each tap's first input column.

  Returns:
    ``(len(dy_taps), C, out)``.
  """
  n, ho, width, c = x_rows.shape
  c_out = dy_taps[0].shape[-1]
  shifted = jnp.stack([
      jnp.pad(dy, ((0, 0), (0, 0), (offset, width - dy.shape[2] - offset), (0, 0)))
      for dy, offset in zip(dy_taps, col_offsets)], axis=3)  # (n, ho, W', tap, out)
  shifted = shifted.reshape(n * ho * width, len(dy_taps) * c_out)
  dk = lax.dot_general(x_rows.reshape(n * ho * width, c), shifted, (((0,), (0,)), ((), ())))
  return dk.reshape(c, len(dy_taps), c_out).transpose(1, 0, 2)


def _subpixel_kernel_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
  """The up-conv's kernel gradient as 4 matmuls, one per kernel row.

  Tap ``(kh, kw)``'s gradient is input ``m + offset`` times ``dy`` of the tap's phase at ``m``,
  summed over all input pixels (:data:`_SUBPIXEL_INPUT_OFFSET`). XLA:CPU's kernel gradient of
  the one 2x2 convolution of :func:`_subpixel_conv` is far slower.
  """
  n, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  dy_phases = dy.reshape(n, h, 2, w, 2, dy.shape[-1])
  col_offsets = [1 + _SUBPIXEL_INPUT_OFFSET[kw] for kw in range(4)]
  rows = []
  for kh in range(4):
    row_offset = 1 + _SUBPIXEL_INPUT_OFFSET[kh]
    dy_taps = [dy_phases[:, :, 1 - kh % 2, :, 1 - kw % 2] for kw in range(4)]
    rows.append(_row_kernel_grad(xp[:, row_offset:row_offset + h], dy_taps, col_offsets))
  return jnp.stack(rows)


# ``ConvTranspose2d(4, 2, 1)`` by :func:`_subpixel_conv`. Its input gradient is the adjoint
# of an up-conv: a stride-2 convolution of ``dy`` with in/out swapped (XLA's forward
# convolution, faster than its gradient of the 2x2 one). Its kernel gradient is
# :func:`_subpixel_kernel_grad`.
_up_conv_subpixel = _with_grads(
    lambda x, k: _subpixel_conv(x, k, 2 * x.shape[1], 2 * x.shape[2]),
    _subpixel_kernel_grad,
    lambda dy, k, x_shape: layers.conv(dy, _swap_in_out(k), 2, 1))


def _conv_s1_shifted_taps(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``Conv2d(4, 1, 1)`` for few output channels, as one matmul and 16 shifted slices.

  ``_tap_products_wide`` gives every tap's product at every input pixel; output ``(i, j)``
  is the sum over taps ``(kh, kw)`` of that tap's product at padded input ``(i + kh, j + kw)``.
  Autodiff makes both gradients matmuls (and pads of ``dy``). For the PatchGAN's 1-channel
  head, where im2col patches would be 16x the input.
  """
  n, h, w, _ = x.shape
  c_out = kernel.shape[-1]
  ho, wo = h - 1, w - 1
  products = _tap_products_wide(x, kernel)
  products = jnp.pad(products.reshape(n, h, w, 4, 4, c_out),
                     ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0), (0, 0)))
  return sum(products[:, kh:kh + ho, kw:kw + wo, kh, kw] for kh in range(4) for kw in range(4))


def _s2_patches_kernel_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
  """A stride-2 ``Conv2d(4, 2, 1)``'s kernel gradient as one matmul, ``patches^T @ dy``.

  For inputs with few channels (the first layers' 3 or 6), where the patches are about the
  size of ``dy`` and one ``(16 * C) x out`` product over all output pixels keeps the matmul
  wide; per-tap or per-row products would be only ``C`` or ``2 * C`` wide.
  """
  c_in, c_out = x.shape[-1], dy.shape[-1]
  patches = _patches(x, 2).reshape(-1, 16 * c_in)
  dk = lax.dot_general(patches, dy.reshape(-1, c_out), (((0,), (0,)), ((), ())))
  return dk.reshape(4, 4, c_in, c_out)


def _s2_row_kernel_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
  """A stride-2 ``Conv2d(4, 2, 1)``'s kernel gradient as 4 matmuls, one per kernel row.

  Tap ``kh = 2a + p`` reads padded row ``2(i + a) + p``: block row ``i + a``, phase ``p``.
  With the column phase ``q`` of ``kw = 2b + q`` moved into the channels (space-to-depth
  along the width), kernel row ``kh``'s four taps are the two column offsets ``b`` of one
  :func:`_row_kernel_grad` over the rows of phase ``p``.
  """
  n, _, _, c = x.shape
  _, ho, wo, _ = dy.shape
  blocks = _stride_2_blocks(x).reshape(n, ho + 1, 2, wo + 1, 2 * c)  # (.., p, .., (q, c))
  rows = []
  for kh in range(4):
    a, p = divmod(kh, 2)
    taps = _row_kernel_grad(blocks[:, a:a + ho, p], [dy, dy], [0, 1])  # (b, (q, c), out)
    rows.append(taps.reshape(4, c, dy.shape[-1]))
  return jnp.stack(rows)


def _conv_s2_xla(x, kernel):
  """The forward of a stride-2 down-conv stays XLA's: its convolution kernel is fast there."""
  return layers.conv(x, kernel, 2, 1)


def _s2_input_grad(dy, kernel, x_shape):
  """A stride-2 conv's input gradient is its adjoint, the up-conv of ``dy`` with in/out
  swapped, cropped to the input size."""
  return _subpixel_conv(dy, _swap_in_out(kernel), *x_shape[1:3])


# ``Conv2d(4, 2, 1)``: XLA's forward, the input gradient by :func:`_subpixel_conv`, the kernel
# gradient as matmuls on im2col patches or per kernel row.
_conv_s2_patches_grads = _with_grads(_conv_s2_xla, _s2_patches_kernel_grad, _s2_input_grad)
_conv_s2_row_grads = _with_grads(_conv_s2_xla, _s2_row_kernel_grad, _s2_input_grad)


def conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int,
         thresholds: Thresholds = DEFAULT_THRESHOLDS) -> jax.Array:
  """:func:`p2p_jax.layers.conv`, with 4x4 padding-1 layers in their fastest exact form on CPU.

  Args:
    x: ``(N, H, W, in)``.
    kernel: ``(kh, kw, in, out)``.
    stride, padding: as in torch.
    thresholds: where the forms switch.

  Returns:
    The same values as ``layers.conv(x, kernel, stride, padding)``, to float32 rounding.
  """
  n, h, w, _ = x.shape
  if kernel.shape[:2] == (4, 4) and padding == 1 and stride in (1, 2):
    pixels = n * ((h - 2) // stride + 1) * ((w - 2) // stride + 1)
    if pixels <= thresholds.matmul_max_pixels:
      return _conv_matmul(x, kernel, stride)
    if stride == 1 and kernel.shape[-1] <= thresholds.matmul_max_features:
      return _conv_s1_shifted_taps(x, kernel)
    if stride == 1 and x.dtype == jnp.float32 and kernel.dtype == jnp.float32:
      # Not in bfloat16: the transforms would add rounding at 8 mantissa bits.
      return winograd.conv_s1(x, kernel)
    if stride == 2:
      if x.shape[-1] < thresholds.s2_row_min_channels:
        return _conv_s2_patches_grads(x, kernel)
      return _conv_s2_row_grads(x, kernel)
  return layers.conv(x, kernel, stride, padding)


def up_conv(x: jax.Array, kernel: jax.Array,
            thresholds: Thresholds = DEFAULT_THRESHOLDS) -> jax.Array:
  """``ConvTranspose2d(4, 2, 1)`` in its fastest exact form on CPU: matmuls or sub-pixel.

  Args:
    x: ``(N, H, W, in)``.
    kernel: ``(4, 4, in, out)``, stored as for :func:`p2p_jax.layers.conv_transpose`.
    thresholds: where the forms switch.

  Returns:
    ``(N, 2H, 2W, out)``, equal to ``layers.conv_transpose(x, kernel, 2, 1)`` to float32
    rounding.
  """
  n, h, w, _ = x.shape
  few_features = kernel.shape[-1] <= thresholds.matmul_max_features
  if n * h * w <= thresholds.matmul_max_pixels or few_features:
    return _up_conv_matmul(x, kernel, thresholds)
  return _up_conv_subpixel(x, kernel)
