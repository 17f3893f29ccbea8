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
import numpy as np
from jax import lax

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


# A 4x4 layer whose low-resolution side (the output of a down-conv, the input of an up-conv)
# has at most this many pixels, batch included, runs as matmuls (over im2col patches for a
# down-conv, one per kernel tap for an up-conv), and so do its gradients. There,
# XLA:CPU's convolution kernels cost several times their FLOPs (per-call overhead and kernel
# re-layouts around a few output pixels), while a GEMM streams the kernel once. Above it, the
# convolution kernels win; see the measurements in the README's performance section.
MATMUL_MAX_PIXELS = 256
# With at most this many output channels, XLA:CPU runs a convolution (its kernel gradient
# above all) in a slow generic loop (its fast convolution path wants more than 16 features),
# so such layers are computed with matmuls instead.
MATMUL_MAX_FEATURES = 16


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


def patches_4x4(x: jax.Array, stride: int) -> jax.Array:
  """im2col for a 4x4 kernel with zero padding 1 and the given stride.

  Built from a few large slices rather than 16 strided ones, so that it and its adjoint (the
  col2im of the up-conv and of every gradient) compile to few XLA fusions. With stride 2,
  space-to-depth turns the 4x4 window into a 2x2 window of 2x2 blocks: tap ``kh = 2a + p``
  is block row ``a``, phase ``p``. With stride 1, the four column taps are gathered first,
  then the four row taps.

  Args:
    x: ``(N, H, W, C)``.
    stride: 1 or 2.

  Returns:
    ``(N, Ho, Wo, 16 * C)`` with ``Ho = (H - 2) // stride + 1``; the last axis is ordered
    ``(kh, kw, c)``, as an HWIO kernel reshaped to ``(16 * C, out)``.
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
    raise ValueError(f'patches_4x4 supports stride 1 or 2, got {stride}')
  return taps.reshape(n, ho, wo, 16 * c)


def conv_4x4_matmul(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """``Conv2d(kernel 4, stride, padding 1)`` as im2col patches times the reshaped kernel.

  Its gradients are matmuls too (``patches^T @ dy`` and ``dy @ kernel^T``, then the adjoint of
  im2col, which XLA fuses into one loop), so no kernel flip or re-layout is materialised.
  """
  return jnp.dot(patches_4x4(x, stride), kernel.reshape(-1, kernel.shape[-1]))


def _tap_products_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``(pixels, in)`` times each tap of a ``(16, in, out)`` kernel: ``(pixels, 16, out)``."""
  x16 = jnp.broadcast_to(x[None], (16, *x.shape))
  taps = lax.dot_general(x16, kernel, (((2,), (1,)), ((0,), (0,))))  # (16, pixels, out)
  return taps.transpose(1, 0, 2)


# Above this many pixels, the input gradient of :func:`_tap_products` is one matmul.
TAP_PRODUCTS_MATMUL_DX_MIN_PIXELS = 128


@jax.custom_vjp
def _tap_products(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return _tap_products_forward(x, kernel)


def _tap_products_fwd(x, kernel):
  return _tap_products_forward(x, kernel), (x, kernel)


def _tap_products_bwd(residuals, d_products):
  """Input gradient as one matmul contracting (tap, out) where that pays, else per tap.

  XLA's own input gradient is 16 per-tap products fused with their sum over taps, which
  XLA:CPU runs at about 20 GFLOP/s; one matmul needs the kernel re-laid out (its size in
  copies), which pays from about a hundred pixels on (measured on the U-Net's 4x4 to 16x16
  up-convs).
  """
  x, kernel = residuals
  d_products = d_products.astype(x.dtype)
  if x.shape[0] >= TAP_PRODUCTS_MATMUL_DX_MIN_PIXELS:
    dx = lax.dot_general(d_products, kernel, (((1, 2), (0, 2)), ((), ())))
  else:
    dx = lax.dot_general(d_products.transpose(1, 0, 2), kernel,
                         (((2,), (2,)), ((0,), (0,)))).sum(0)
  x16 = jnp.broadcast_to(x[None], (16, *x.shape))
  dkernel = lax.dot_general(x16, d_products.transpose(1, 0, 2), (((1,), (1,)), ((0,), (0,))))
  return dx, dkernel.astype(kernel.dtype)


_tap_products.defvjp(_tap_products_fwd, _tap_products_bwd)


def _products_per_tap(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``x @ kernel[kh, kw]`` for all 16 taps as one matmul: ``(..., in)`` -> ``(..., 16 * out)``.

  The last axis is ordered ``(kh, kw, out)``. One wide matmul, for layers with few output
  channels; the kernel is re-laid out to ``(in, 16 * out)``, which is cheap there.
  """
  c_in, c_out = kernel.shape[2:]
  return jnp.dot(x, kernel.transpose(2, 0, 1, 3).reshape(c_in, 16 * c_out))


def up_conv_4x4_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``ConvTranspose2d(kernel 4, stride 2, padding 1)`` as matmuls, then col2im.

  Input pixel ``i`` sends ``x[i] @ kernel[k]`` to output ``2i - 1 + k``, which is exactly the
  adjoint of :func:`patches_4x4` with stride 2 (that reads output ``2i - 1 + k`` into patch
  ``(i, k)``). So: the products for all 16 taps, then that adjoint.

  On a few pixels the products are 16 matmuls on the kernel as stored, one per tap (copying
  the small input 16 times is cheaper than re-laying-out a 4x4x1024x512 kernel). On many
  pixels (few output channels) they are one ``(pixels, in) @ (in, 16 * out)`` matmul.
  """
  n, h, w, c_in = x.shape
  c_out = kernel.shape[-1]
  pixels = n * h * w
  if pixels <= MATMUL_MAX_PIXELS:
    cols = _tap_products(x.reshape(pixels, c_in), kernel.reshape(16, c_in, c_out))
  else:
    cols = _products_per_tap(x, kernel)
  cols = cols.reshape(n, h, w, 16 * c_out)
  out = jax.ShapeDtypeStruct((n, 2 * h, 2 * w, c_out), cols.dtype)
  (y,) = jax.linear_transpose(lambda y: patches_4x4(y, 2), out)(cols)
  return y


# Sub-pixel up-conv: output pixel ``2m + r`` (per axis) sees input ``m + offset`` through tap
# ``kh``, with phase ``r = 1 - kh % 2`` and these offsets (taps 3, 1 for ``r = 0``; 2, 0 for
# ``r = 1``).
_SUBPIXEL_INPUT_OFFSET = {3: -1, 1: 0, 2: 0, 0: 1}


def _pixel_shuffle_kernel(kernel: jax.Array) -> jax.Array:
  """The 4x4 up-conv kernel as the 2x2 kernel of :func:`_pixel_shuffle_up_conv`.

  ``(4, 4, in, out)`` to ``(2, 2, in, 4 * out)``: window tap ``d`` and output phase ``q``
  (per axis) read kernel tap ``2 * (1 - d) + q``; channels ordered ``(q_h, q_w, out)``.
  """
  c_in, c_out = kernel.shape[2:]
  k = kernel.reshape(2, 2, 2, 2, c_in, c_out)[::-1, :, ::-1]  # (d_h, q_h, d_w, q_w, in, out)
  return k.transpose(0, 2, 4, 1, 3, 5).reshape(2, 2, c_in, 4 * c_out)


def _pixel_shuffle_up_conv(x: jax.Array, kernel: jax.Array, out_h: int,
                           out_w: int) -> jax.Array:
  """``ConvTranspose2d(kernel 4, stride 2, padding 1)`` as one 2x2 convolution, then
  depth-to-space, cropped to ``(out_h, out_w)`` (at most ``2H + 1``, ``2W + 1``).

  Input ``i`` reaches output ``p = 2i - 1 + k`` through tap ``k``. Writing ``p = 2j - 1 + q``
  (phase ``q``), output ``p`` reads inputs ``j - 1, j`` through taps ``3 - q, 1 - q``: a 2x2
  window over the input padded by 1, the same for both phases, so one stride-1 convolution to
  ``4 * out`` channels computes all four phases of ``H + 1`` by ``W + 1`` positions (the
  sub-pixel convolution, with the phase shift folded into the kernel). Outputs ``-1`` and
  ``2H`` are computed and cropped. Compared with four 2x2 phase convolutions to ``out``
  channels each, the wider matmul runs faster on XLA:CPU (the up-conv 64x64x256->64:
  116 -> 88 ms at batch 4), and as the input gradient of a stride-2 down-conv it is
  1.3-1.8x faster than XLA's own.
  """
  n, h, w, _ = x.shape
  c_out = kernel.shape[-1]
  y = lax.conv_general_dilated(x, _pixel_shuffle_kernel(kernel), window_strides=(1, 1),
                               padding=((1, 1), (1, 1)), dimension_numbers=DIMENSION_NUMBERS)
  y = y.reshape(n, h + 1, w + 1, 2, 2, c_out).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(n, 2 * h + 2, 2 * w + 2, c_out)[:, 1:1 + out_h, 1:1 + out_w]


def _with_grads(forward, kernel_grad, input_grad=None):
  """``forward(x, kernel)`` with ``kernel_grad(x, dy)`` and ``input_grad(dy, kernel, x_shape)``.

  For convolutions whose gradients XLA:CPU computes slowly: each is replaced by an exact form
  that runs faster. Without ``input_grad``, the input gradient stays XLA's.
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

  ``out[t, c, o] = sum_{n,i,j} x_rows[n, i, j + col_offsets[t], c] * dy_taps[t][n, i, j, o]``.
  Shifting the (smaller) ``dy`` instead of the input keeps ``x_rows`` a contiguous slab of
  whole rows: per-tap input windows are strided, and XLA:CPU copies and transposes each one
  before its matmul, which cost more than the matmuls. The shifted ``dy`` keeps its channels
  last, so the matmul contracts the leading (pixel) axis of both operands: XLA fuses ``dy``'s
  producer (the batch norm and ReLU backward) into the shift, and with channels moved first
  that fused loop ran as a strided transpose, 4-8x slower (about 0.3 s a step at batch 4).

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
  """The sub-pixel up-conv's kernel gradient as 4 matmuls, one per kernel row.

  Tap ``(kh, kw)`` multiplies input ``m + offset`` with ``dy`` of the tap's phase at ``m``,
  summed over all input pixels. XLA:CPU computes the kernel gradients of four 2x2 phase
  convolutions 2-4x slower than that, and that of the one 2x2 convolution of
  :func:`_pixel_shuffle_up_conv` about 70x slower (9.5 s for the 64x64x256->64 up-conv at
  batch 4).
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


# ``ConvTranspose2d(kernel 4, stride 2, padding 1)`` as one 2x2 convolution and depth-to-space
# (:func:`_pixel_shuffle_up_conv`). Its input gradient is a stride-2 convolution of ``dy``
# (XLA's forward convolution, faster than XLA's gradient of the 2x2 one), its kernel gradient
# :func:`_subpixel_kernel_grad`.
up_conv_4x4_subpixel = _with_grads(
    lambda x, k: _pixel_shuffle_up_conv(x, k, 2 * x.shape[1], 2 * x.shape[2]),
    _subpixel_kernel_grad,
    lambda dy, k, x_shape: conv(dy, _swap_in_out(k), 2, 1))


def conv_4x4_s1_tap_products(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``Conv2d(kernel 4, stride 1, padding 1)`` for few output channels, as one matmul.

  For the PatchGAN's 1-channel head: one ``(pixels, in) @ (in, 16 * out)`` matmul gives every
  tap's product at every input pixel, and output ``(i, j)`` sums tap ``(kh, kw)``'s product at
  padded input ``(i + kh, j + kw)``: 16 shifted slices of a 16-channel map. Autodiff makes
  both gradients matmuls too (and pads of ``dy``). XLA:CPU's convolution kernels want more
  than 16 features (fwd + both grads of the 31x31x512->1 head at batch 4: 52 ms, 34 ms with
  a matmul kernel gradient, 10 ms this way), and im2col patches would be 16x the input.
  """
  n, h, w, _ = x.shape
  c_out = kernel.shape[-1]
  ho, wo = h - 1, w - 1
  products = _products_per_tap(x, kernel)
  products = jnp.pad(products.reshape(n, h, w, 4, 4, c_out),
                     ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0), (0, 0)))
  return sum(products[:, kh:kh + ho, kw:kw + wo, kh, kw] for kh in range(4) for kw in range(4))


# Winograd F(2, 4) (Lavin & Gray 2016), from Toom-Cook on the points 0, 1, -1, 1/2 and
# infinity: two outputs of a 4-tap correlation from five inputs are
# ``AT @ ((G @ g) * (BT @ d))``. The rows of BT and G are rescaled against each other so that
# the input transform has small integer coefficients (exact); the fractions sit in the
# kernel transform.
_WINOGRAD_BT = np.array([[1, -2, -1, 2, 0], [0, -1, 1, 2, 0], [0, -1, 3, -2, 0],
                         [0, 1, 0, -1, 0], [0, 1, -2, -1, 2]], np.float64)
_WINOGRAD_G = np.array([[1, 0, 0, 0], [1 / 2, 1 / 2, 1 / 2, 1 / 2],
                        [1 / 6, -1 / 6, 1 / 6, -1 / 6], [8 / 3, 4 / 3, 2 / 3, 1 / 3],
                        [0, 0, 0, 1 / 2]], np.float64)
_WINOGRAD_AT = np.array([[1, 1, 1, 1, 0], [0, 1, -1, 1 / 2, 1]], np.float64)


def _winograd_input_map(size: int, tiles: int) -> np.ndarray:
  """``(5, tiles, size)``: row ``(a, t)`` is ``sum_j BT[a, j] * xpad[2t + j]``, zero padding 1.

  The padding and the overlapping 5-wide tiles are folded into this constant, so the input
  transform (and its adjoint, in the input gradient) is a small matmul, not slices and pads.
  """
  out = np.zeros((5, tiles, size), np.float32)
  for t in range(tiles):
    for j in range(5):
      src = 2 * t + j - 1  # Row of the unpadded input.
      if 0 <= src < size:
        out[:, t, src] += _WINOGRAD_BT[:, j]
  return out


def _winograd_output_map(size: int, tiles: int) -> np.ndarray:
  """``(size, 5, tiles)``: output ``2t + r`` is ``sum_a AT[r, a] * m[a, t]``, cropped to ``size``."""
  out = np.zeros((size, 5, tiles), np.float32)
  for t in range(tiles):
    for r in range(2):
      if 2 * t + r < size:
        out[2 * t + r, :, t] = _WINOGRAD_AT[r]
  return out


def _batched_left(matrix: np.ndarray, x: jax.Array) -> jax.Array:
  """``matrix @ x[k]`` for every leading index ``k``: ``(m, r)``, ``(K, r, s)`` -> ``(K, m, s)``."""
  lhs = jnp.broadcast_to(matrix, (x.shape[0], *matrix.shape))
  return lax.dot_general(lhs, x, (((2,), (1,)), ((0,), (0,))))


def conv_4x4_s1_winograd(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``Conv2d(kernel 4, stride 1, padding 1)`` by Winograd F(2x2, 4x4).

  Each 2x2 block of outputs is computed from a 5x5 input tile with 25 products per channel
  pair instead of 64: the input tiles and the kernel go to the Winograd domain, where the
  convolution is 25 independent ``(tiles, in) @ (in, out)`` matmuls, and come back. That is
  2.3x fewer multiply-adds for the PatchGAN's 256->512 stride-1 layer (the step's largest),
  and both gradients are matmuls too. Exact in exact arithmetic; in float32 its error is
  about 2-3x a direct convolution's (the transforms' coefficients add rounding).

  Args:
    x: ``(N, H, W, in)`` float32.
    kernel: ``(4, 4, in, out)``.

  Returns:
    ``(N, H - 1, W - 1, out)``.
  """
  n, h, w, c_in = x.shape
  c_out = kernel.shape[-1]
  ho, wo = h - 1, w - 1
  th, tw = -(-ho // 2), -(-wo // 2)  # 2x2 output tiles; a last odd row/column is cropped.
  dtype = x.dtype
  # Each 1-D transform contracts a leading axis (the columns batched over rows, then the
  # rows batched over images), so only the Winograd-domain products need a transpose on either
  # side (einsums over the middle axes made XLA:CPU transpose twice more).
  in_h = _winograd_input_map(h, th).astype(dtype).reshape(5 * th, h)
  in_w = _winograd_input_map(w, tw).astype(dtype).reshape(5 * tw, w)
  v = _batched_left(in_w, x.reshape(n * h, w, c_in))  # (n h, (b j), in)
  v = _batched_left(in_h, v.reshape(n, h, 5 * tw * c_in))  # (n, (a i), (b j in))
  v = v.reshape(n, 5, th, 5, tw, c_in).transpose(1, 3, 0, 2, 4, 5).reshape(25, n * th * tw, c_in)
  # Kernel transform G g G^T as one matmul on the kernel as stored (16 taps, in * out).
  g2 = np.kron(_WINOGRAD_G, _WINOGRAD_G).astype(dtype)  # (25, 16)
  u = jnp.dot(g2, kernel.reshape(16, c_in * c_out)).reshape(25, c_in, c_out)
  m = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))))  # ((a b), (n i j), out)
  m = m.reshape(5, 5, n, th, tw, c_out).transpose(2, 0, 3, 1, 4, 5)  # (n, a, i, b, j, out)
  out_h = _winograd_output_map(ho, th).astype(dtype).reshape(ho, 5 * th)
  out_w = _winograd_output_map(wo, tw).astype(dtype).reshape(wo, 5 * tw)
  y = _batched_left(out_h, m.reshape(n, 5 * th, 5 * tw * c_out))  # (n, y, (b j out))
  y = _batched_left(out_w, y.reshape(n * ho, 5 * tw, c_out))  # (n y, x, out)
  return y.reshape(n, ho, wo, c_out)


def _s2_patches_kernel_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
  """The kernel gradient of ``Conv2d(kernel 4, stride 2, padding 1)`` as one matmul on im2col.

  For inputs with few channels (the first layers' 3 or 6): there the patches are small (16x
  an input of 3-6 channels, about the size of ``dy``), and one ``(16 * C) x out`` product
  contracting all output pixels keeps the matmul wide. Per-tap products (``C`` rows each)
  ran at about 10 GFLOP/s (D's first layer at batch 4: 57 -> 31 ms), and the per-row
  matmuls of :func:`_s2_row_kernel_grad` would be only ``2 * C`` wide.
  """
  c_in, c_out = x.shape[-1], dy.shape[-1]
  patches = patches_4x4(x, 2).reshape(-1, 16 * c_in)
  dk = lax.dot_general(patches, dy.reshape(-1, c_out), (((0,), (0,)), ((), ())))
  return dk.reshape(4, 4, c_in, c_out)


# Below this many input channels, the stride-2 kernel gradient is computed on im2col patches
# (measured on the first layers: 3 or 6 channels in, 64 out, where ``dy`` is the larger operand).
S2_ROW_MIN_CHANNELS = 16


def _s2_row_kernel_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
  """The kernel gradient of ``Conv2d(kernel 4, stride 2, padding 1)`` as 4 matmuls.

  Tap ``kh = 2a + p`` reads padded row ``2(i + a) + p``: block row ``i + a``, phase ``p``.
  With the column phase ``q`` of ``kw = 2b + q`` moved into the channels (space-to-depth
  along the width), kernel row ``kh``'s four taps are the two column offsets ``b`` of one
  matmul over the rows of phase ``p``. XLA:CPU's own kernel gradient runs 1.2-3x slower on
  the pix2pix down-convs.
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


def _s2_kernel_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
  """The kernel gradient of ``Conv2d(kernel 4, stride 2, padding 1)``, on patches or per row."""
  if x.shape[-1] < S2_ROW_MIN_CHANNELS:
    return _s2_patches_kernel_grad(x, dy)
  return _s2_row_kernel_grad(x, dy)


# ``Conv2d(kernel 4, stride 2, padding 1)``: XLA's forward, the input gradient as an up-conv
# of ``dy`` (:func:`_pixel_shuffle_up_conv`), the kernel gradient as matmuls.
conv_4x4_s2_fast_grads = _with_grads(
    lambda x, k: conv(x, k, 2, 1), _s2_kernel_grad,
    lambda dy, k, x_shape: _pixel_shuffle_up_conv(dy, _swap_in_out(k), *x_shape[1:3]))


def conv_fast(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """:func:`conv`, with 4x4 padding-1 layers in their fastest exact formulation.

  Args:
    x: ``(N, H, W, in)``.
    kernel: ``(kh, kw, in, out)``.
    stride, padding: as in torch.

  Returns:
    The same values as ``conv(x, kernel, stride, padding)``, to float32 rounding.
  """
  n, h, w, _ = x.shape
  if kernel.shape[:2] == (4, 4) and padding == 1 and stride in (1, 2):
    pixels = n * ((h - 2) // stride + 1) * ((w - 2) // stride + 1)
    if pixels <= MATMUL_MAX_PIXELS:
      return conv_4x4_matmul(x, kernel, stride)
    if stride == 1 and kernel.shape[-1] <= MATMUL_MAX_FEATURES:
      return conv_4x4_s1_tap_products(x, kernel)
    if stride == 1 and x.dtype == jnp.float32 and kernel.dtype == jnp.float32:
      # Not in bfloat16: the transforms would add rounding at 8 mantissa bits.
      return conv_4x4_s1_winograd(x, kernel)
    if stride == 2:
      return conv_4x4_s2_fast_grads(x, kernel)
  return conv(x, kernel, stride, padding)


def up_conv_4x4_fast(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``ConvTranspose2d(kernel 4, stride 2, padding 1)``: matmul on small inputs, else sub-pixel.

  Args:
    x: ``(N, H, W, in)``.
    kernel: ``(4, 4, in, out)``, stored as for :func:`conv_transpose`.

  Returns:
    ``(N, 2H, 2W, out)``, equal to ``conv_transpose(x, kernel, 2, 1)`` to float32 rounding.
  """
  n, h, w, _ = x.shape
  if n * h * w <= MATMUL_MAX_PIXELS or kernel.shape[-1] <= MATMUL_MAX_FEATURES:
    return up_conv_4x4_matmul(x, kernel)
  return up_conv_4x4_subpixel(x, kernel)


def _check_impl(impl: str) -> None:
  if impl not in ('fast', 'plain'):
    raise ValueError(f"conv_impl must be 'fast' or 'plain', got {impl!r}")


class Conv(nn.Module):
  """``torch.nn.Conv2d`` with zero padding, canonical HWIO kernel, N(0, 0.02) init.

  ``impl='fast'`` runs 4x4 padding-1 layers through :func:`conv_fast`; ``impl='plain'`` always
  uses ``lax.conv_general_dilated``. Both read the same parameters.
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
    op = conv_fast if self.impl == 'fast' else conv
    y = op(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.padding)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return y


class ConvTranspose(nn.Module):
  """``torch.nn.ConvTranspose2d``; kernel stored ``(kh, kw, in, out)``, unflipped.

  ``impl='fast'`` computes the pix2pix 4x4/stride-2/padding-1 case with
  :func:`up_conv_4x4_fast`; ``impl='plain'`` always uses the dilated formulation. Both read the same
  parameters and agree to float32 rounding.
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
      y = up_conv_4x4_fast(x, kernel)
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
