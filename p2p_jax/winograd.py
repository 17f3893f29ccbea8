"""``Conv2d(kernel 4, stride 1, padding 1)`` by Winograd F(2x2, 4x4), for XLA:CPU.

For the PatchGAN's stride-1 4x4 layer, the largest of the training step: 25 products per 2x2
output block and channel pair instead of 64, all as matmuls (its gradients too). Exact in exact
arithmetic, float32 rounding aside; it reads the same HWIO kernels as :mod:`p2p_jax.layers` and
is one of the forms :func:`p2p_jax.cpu_convs.conv` chooses on CPU only. Measurements live in
docs/performance.md.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

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


def conv_s1(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``Conv2d(4, 1, 1)`` by Winograd F(2x2, 4x4), float32.

  F(2, 4) along each axis: each 2x2 block of outputs comes from a 5x5 input tile with 25
  products per channel pair instead of 64, as 25 independent ``(tiles, in) @ (in, out)``
  matmuls between the transformed tiles and kernel. Both gradients are matmuls too. Exact in
  exact arithmetic; in float32 the transforms' coefficients add rounding, within a small
  factor of a direct convolution's (the tests bound it against a float64 reference).

  Returns ``(N, H - 1, W - 1, out)``.
  """
  n, h, w, c_in = x.shape
  c_out = kernel.shape[-1]
  ho, wo = h - 1, w - 1
  th, tw = -(-ho // 2), -(-wo // 2)  # 2x2 output tiles; a last odd row/column is cropped.
  dtype = x.dtype
  # Each 1-D transform contracts a leading axis (the columns batched over rows, then the rows
  # batched over images), so only the Winograd-domain products need a transpose either side.
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
