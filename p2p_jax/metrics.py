"""Image metrics between generated and real images: L1, PSNR and SSIM."""
import numpy as np

from p2p_jax import images


def _gaussian_filter_valid(x: np.ndarray) -> np.ndarray:
  """Separable 11x11 Gaussian filter over axes 0 and 1, keeping only fully covered pixels.

  This is scikit-image's ``gaussian_filter`` followed by its crop of the 5-pixel border.
  """
  size, sigma = 11, 1.5
  w = np.exp(-0.5 * ((np.arange(size) - size // 2) / sigma) ** 2)
  w /= w.sum()
  h = x.shape[0] - size + 1
  x = sum(w[k] * x[k:k + h] for k in range(size))
  v = x.shape[1] - size + 1
  return sum(w[k] * x[:, k:k + v] for k in range(size))


def ssim(x: np.ndarray, y: np.ndarray) -> float:
  """Structural similarity (Wang et al. 2004) of two images in [0, 1], averaged over channels.

  Gaussian 11x11 window with sigma 1.5, K1 = 0.01, K2 = 0.03, population (co)variances:
  scikit-image's ``structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=-1)``.

  Args:
    x, y: ``(H, W, C)`` arrays in [0, 1], H and W at least 11.

  Returns:
    The mean SSIM.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  c1, c2 = 0.01 ** 2, 0.03 ** 2  # (K1 * L)^2, (K2 * L)^2 with the range L = 1.
  mu_x, mu_y = _gaussian_filter_valid(x), _gaussian_filter_valid(y)
  var_x = _gaussian_filter_valid(x * x) - mu_x ** 2
  var_y = _gaussian_filter_valid(y * y) - mu_y ** 2
  cov = _gaussian_filter_valid(x * y) - mu_x * mu_y
  ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)
              / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)))
  return float(ssim_map.mean())


def psnr(x: np.ndarray, y: np.ndarray) -> float:
  """PSNR in dB of two uint8 images, on the [0, 255] scale (as usually reported).

  An exact match counts as 100 dB rather than infinity, so averages and JSON stay finite.
  """
  mse = np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2)
  return float(10.0 * np.log10(255.0 ** 2 / max(mse, 255.0 ** 2 * 1e-10)))


# Whether lower is better, for each metric a checkpoint can be ranked by (eval.best_metric).
LOWER_IS_BETTER = {'L1': True, 'PSNR': False, 'SSIM': False, 'FID': True, 'KID_mean': True}


def image_metrics(fake: np.ndarray, real: np.ndarray) -> dict:
  """L1 on the [-1, 1] floats (the training L1 term without lambda); PSNR and SSIM on the
  uint8 images as written to disk.

  Args:
    fake, real: ``(H, W, C)`` float in [-1, 1].

  Returns:
    ``{'L1', 'PSNR', 'SSIM'}``.
  """
  fake_u8, real_u8 = images.to_uint8(fake), images.to_uint8(real)
  return {'L1': float(np.mean(np.abs(np.asarray(fake, np.float64) - real))),
          'PSNR': psnr(fake_u8, real_u8),
          'SSIM': ssim(fake_u8 / 255.0, real_u8 / 255.0)}
