"""FID and KID with the FID Inception (user-supplied weights), and the two-folder CLI.

The protocol is pytorch-fid's: RGB images in [0, 1] are resized to 299x299 bilinearly
(``F.interpolate(mode='bilinear', align_corners=False)``), scaled to [-1, 1] and mapped to
the 2048-d pool features of ``inception.FIDInceptionV3``. FID is the Fréchet distance of the
features' Gaussians (``pytorch_fid.fid_score.calculate_frechet_distance``); KID is the
unbiased MMD^2 with the kernel ``(x.y / d + 1)^3``, mean and std over random subsets, as
torch-fidelity computes it (100 subsets of ``min(1000, n)`` features, numpy seed 2020).

  python -m p2p_jax.fid --inception_path=pt_inception-2015-12-05-6726825d.pth REAL_DIR FAKE_DIR

prints one JSON line: ``{"fid", "kid_mean", "kid_std", "num_real", "num_fake"}``.
"""
import functools
import json
import os
import sys
from typing import Callable, Sequence

import jax
import numpy as np
import scipy.linalg
from absl import app, flags, logging
from etils import epath

from p2p_jax import datasets, inception, parallel

KID_SUBSETS = 100
KID_MAX_SUBSET_SIZE = 1000
KID_SEED = 2020  # torch-fidelity's default rng_seed.
FID_EPS = 1e-6  # pytorch-fid's diagonal offset when sqrtm of the product is singular.


@functools.lru_cache(maxsize=None)
def _resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """``(out_size, in_size)`` weights of torch's bilinear resize, ``align_corners=False``."""
  # float32 source coordinates, as ATen computes them for float images.
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.maximum(scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5))
                   - np.float32(0.5), np.float32(0))
  low = np.minimum(src.astype(np.int64), in_size - 1)
  high = np.minimum(low + 1, in_size - 1)  # At the last pixel both taps are the same one.
  frac = src - low.astype(np.float32)
  matrix = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, low), 1.0 - frac)
  np.add.at(matrix, (rows, high), frac)
  return matrix


def preprocess(image: np.ndarray) -> np.ndarray:
  """An ``(H, W, 3)`` uint8 RGB image -> ``(299, 299, 3)`` float32 in [-1, 1], as pytorch-fid.

  Args:
    image: uint8 RGB pixels (grey ``(H, W, 1)`` is repeated to RGB), any size.

  Returns:
    The Inception input: bilinear resize of ``image / 255`` to 299x299, then ``2 x - 1``.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f'FID images must be (H, W, 1 or 3) uint8, got {image.shape} '
                     f'{image.dtype}')
  x = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
  x = x.astype(np.float32) / np.float32(255)
  size = inception.INPUT_SIZE
  x = np.tensordot(_resize_matrix(x.shape[0], size), x, axes=1)  # Rows: (299, W, 3).
  x = np.matmul(_resize_matrix(x.shape[1], size), x)  # Columns, per row: (299, 299, 3).
  return 2 * x - 1


def make_feature_fn(variables: dict, mesh, batch_size: int) -> Callable:
  """A function from uint8 RGB images to their 2048-d FID features, in jitted batches.

  Args:
    variables: ``FIDInceptionV3`` variables (``inception.load_variables``).
    mesh: the device mesh; each batch is split over its ``data`` axis.
    batch_size: images per call, rounded up to a multiple of the device count.

  Returns:
    ``fn(images) -> (N, 2048) float64``; ``images`` is a sequence of ``(H, W, 1 or 3)`` uint8
    arrays, of any sizes. Every process must pass the same images.
  """
  devices = mesh.devices.size
  batch_size = -(-max(batch_size, 1) // devices) * devices
  replicated = parallel.replicated_sharding(mesh)
  variables = jax.device_put(variables, replicated)
  apply = jax.jit(inception.FIDInceptionV3().apply, out_shardings=replicated)

  def features(images: Sequence[np.ndarray]) -> np.ndarray:
    out = []
    for start in range(0, len(images), batch_size):
      batch = [preprocess(image) for image in images[start:start + batch_size]]
      n = len(batch)
      batch = np.stack(batch + batch[-1:] * (batch_size - n))  # One compiled shape.
      (x,) = parallel.shard_replicated_batch((batch,), mesh)
      out.append(np.asarray(apply(variables, x))[:n])
    if not out:
      return np.zeros((0, inception.FEATURE_DIM))
    return np.concatenate(out).astype(np.float64)

  return features


def load_feature_fn(inception_path: str, mesh, batch_size: int) -> Callable:
  """``make_feature_fn`` with the weights read from ``inception_path`` (see ``inception``)."""
  return make_feature_fn(inception.load_variables(inception_path), mesh, batch_size)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = FID_EPS) -> float:
  """The Fréchet distance of two Gaussians, as ``pytorch_fid.fid_score``'s.

  ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2))``. If the square root is not
  finite (a singular product), ``eps`` is added to both diagonals; an imaginary part that is
  more than numerical noise is an error.

  Raises:
    ValueError: the square root has a significant imaginary component.
  """
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f'FID: statistics of different shapes: {mu1.shape} / {mu2.shape}, '
                     f'{sigma1.shape} / {sigma2.shape}')
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    logging.warning('FID: singular product of covariances; adding %g to their diagonals', eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f'FID: the square root of the covariance product has an imaginary '
                       f'component {np.max(np.abs(covmean.imag))}')
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
  """FID of two ``(N, D)`` feature sets (means and sample covariances, as pytorch-fid)."""
  return frechet_distance(real.mean(0), np.cov(real, rowvar=False),
                          fake.mean(0), np.cov(fake, rowvar=False))


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 of two equal-size sets with the kernel ``k(a, b) = (a.b / d + 1)^3``."""
  m, d = x.shape
  k_xx, k_yy, k_xy = [(a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y))]
  within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
  return float(within - 2 * k_xy.sum() / (m * m))


def kid_from_features(real: np.ndarray, fake: np.ndarray, num_subsets: int = KID_SUBSETS,
                      max_subset_size: int = KID_MAX_SUBSET_SIZE,
                      seed: int = KID_SEED) -> tuple:
  """KID: mean and std of ``polynomial_mmd2`` over random subsets, as torch-fidelity.

  Each subset draws ``min(max_subset_size, len(real), len(fake))`` features without
  replacement from the fakes, then from the reals (torch-fidelity's input1 = generated).

  Returns:
    ``(kid_mean, kid_std)``.
  """
  size = min(max_subset_size, len(real), len(fake))
  rng = np.random.RandomState(seed)
  mmds = []
  for _ in range(num_subsets):
    f = fake[rng.choice(len(fake), size, replace=False)]
    r = real[rng.choice(len(real), size, replace=False)]
    mmds.append(polynomial_mmd2(f, r))
  return float(np.mean(mmds)), float(np.std(mmds))


def scores_from_features(real: np.ndarray, fake: np.ndarray) -> dict:
  """``{'fid', 'kid_mean', 'kid_std', 'num_real', 'num_fake'}`` of two feature sets.

  Raises:
    ValueError: fewer than two features in a set (no covariance, no unbiased MMD).
  """
  if len(real) < 2 or len(fake) < 2:
    raise ValueError(f'FID/KID need at least 2 real and 2 generated images, got {len(real)} '
                     f'and {len(fake)}.')
  kid_mean, kid_std = kid_from_features(real, fake)
  return {'fid': fid_from_features(real, fake), 'kid_mean': kid_mean, 'kid_std': kid_std,
          'num_real': len(real), 'num_fake': len(fake)}


def fid_and_kid(feature_fn: Callable, real_images, fake_images) -> dict:
  """FID and KID of two image sets (uint8 RGB, any sizes); see ``scores_from_features``.

  Args:
    feature_fn: from ``make_feature_fn`` / ``load_feature_fn``.
    real_images, fake_images: sequences of ``(H, W, 1 or 3)`` uint8 arrays.
  """
  return scores_from_features(feature_fn(real_images), feature_fn(fake_images))


def read_folder(folder: str) -> list:
  """Every image file in ``folder`` (sorted; no subfolders, no dot-files) as uint8 RGB."""
  if not epath.Path(folder).is_dir():
    raise NotADirectoryError(f'{folder} is not a directory of images.')
  paths = sorted(os.fspath(p) for p in epath.Path(folder).iterdir()
                 if not p.name.startswith('.') and not p.is_dir())
  return [np.asarray(datasets.to_channels(datasets.to_8bit(datasets.open_image(p, p), p), 3))
          for p in paths]


def main(argv):
  if len(argv) != 3:
    raise app.UsageError('Usage: python -m p2p_jax.fid --inception_path=PATH REAL_DIR FAKE_DIR')
  inception_path, batch_size = flags.FLAGS.inception_path, flags.FLAGS.batch_size
  try:
    inception.check_path(inception_path)
    real, fake = read_folder(argv[1]), read_folder(argv[2])
    feature_fn = load_feature_fn(inception_path, parallel.create_mesh(), batch_size)
    scores = fid_and_kid(feature_fn, real, fake)
  except (ValueError, FileNotFoundError, NotADirectoryError) as e:
    print(f'ERROR: {e}', file=sys.stderr, flush=True)
    sys.exit(1)
  print(json.dumps(scores), flush=True)


if __name__ == '__main__':
  # Defined here, not on import: evaluate imports this module under main.py's flags.
  flags.DEFINE_string('inception_path', '', f'Path of {inception.WEIGHTS_FILE}.')
  flags.DEFINE_integer('batch_size', 16, 'Images per Inception call.')
  app.run(main)
