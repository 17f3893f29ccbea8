"""Paired folders: ``DATA_DIR/A/<split>/NAME.*`` and ``DATA_DIR/B/<split>/NAME.*``.

Files are matched by stem; A and B may differ in size (the preprocessing resizes each). A file
is an image (1 or 3 channels, as the aligned format) or a ``.npy`` array of shape ``(H, W, C)``
(or ``(H, W)``) holding uint8 pixels or floats in [-1, 1]: arrays allow any channel count
(``config.data.input_nc`` / ``output_nc``). Decoded arrays stay numpy (uint8 or float32) and
images stay PIL; the input pipeline resizes both alike.
"""
import os

import numpy as np
from etils import epath
from PIL import Image

from p2p_jax import datasets

EXTENSIONS = datasets.IMAGE_EXTENSIONS + ('.npy',)
MAX_LISTED = 20  # Unmatched stems named per side in the error.


def list_pairs(data_dir: str, split: str) -> list[tuple[str, str]]:
  """The ``(A path, B path)`` pairs of ``split``, sorted by stem.

  Raises:
    ValueError: ``data_dir`` unset, or stems present on one side only (listed per side).
    FileNotFoundError: a missing folder, or no files.
  """
  if not data_dir:
    raise ValueError('config.data.data_dir is not set: point it at a folder holding A/ and B/, '
                     'each with train/, val/ and test/ folders of files matched by name.')
  sides = []
  for side in ('A', 'B'):
    folder = epath.Path(data_dir) / side / split
    if not folder.is_dir():
      raise FileNotFoundError(f'Paired-folder split {folder} does not exist; expected '
                              f'{data_dir}/A/{split}/NAME and {data_dir}/B/{split}/NAME.')
    files = {}
    for f in folder.iterdir():
      if f.name.lower().endswith(EXTENSIONS):
        stem = os.path.splitext(f.name)[0]
        if stem in files:
          raise ValueError(f'{folder}: two files named {stem!r} ({os.path.basename(files[stem])}'
                           f', {f.name}); a stem must name one file per side.')
        files[stem] = os.fspath(f)
    sides.append(files)
  a, b = sides
  only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
  if only_a or only_b:
    show = lambda stems: (', '.join(stems[:MAX_LISTED]) +
                          (f' ... ({len(stems)} in all)' if len(stems) > MAX_LISTED else '')
                          if stems else 'none')
    raise ValueError(f'Paired folders {data_dir}/A/{split} and {data_dir}/B/{split} must hold '
                     f'the same names: only in A: {show(only_a)}; only in B: {show(only_b)}.')
  if not a:
    raise FileNotFoundError(f'{data_dir}/A/{split} holds no files (looked for '
                            f'{", ".join(EXTENSIONS)}).')
  return [(a[stem], b[stem]) for stem in sorted(a)]


def pair_files(record: tuple[str, str]) -> tuple[str, str]:
  """The files of a paired record: both of them."""
  return record


def decode_paired(record: tuple[str, str], *, direction: str, input_nc: int,
                  output_nc: int) -> dict:
  """Decodes one pair.

  Args:
    record: ``(A path, B path)``.
    direction: 'AtoB' or 'BtoA' (which side is the generator input).
    input_nc: channels of the returned 'A'.
    output_nc: channels of the returned 'B'.

  Returns:
    ``{'A', 'B'}`` each a PIL image or an ``(H, W, C)`` uint8/float32 array, and ``'name'``.
  """
  source, target = record if direction == 'AtoB' else record[::-1]
  name = os.path.splitext(os.path.basename(record[0]))[0]
  return {'A': load(source, input_nc, 'input_nc'), 'B': load(target, output_nc, 'output_nc'),
          'name': name}


def load(path: str, channels: int, option: str):
  """One side: an image with ``channels`` (1 or 3), or a ``.npy`` array with ``channels``."""
  if not path.lower().endswith('.npy'):
    if channels not in (1, 3):
      raise datasets.BadImageError(
          f'{path}: an image file gives 1 or 3 channels, but config.data.{option}={channels}; '
          'store this side as .npy arrays of shape (H, W, C).')
    image = datasets.to_8bit(datasets.open_image(path, path), path)
    return datasets.to_channels(image, channels)
  try:
    array = np.load(epath.Path(path).open('rb'), allow_pickle=False)
  except FileNotFoundError as e:
    raise datasets.BadImageError(f'{path}: file not found') from e
  except (OSError, ValueError, EOFError) as e:
    raise datasets.BadImageError(f'{path}: not a readable .npy array ({e})') from e
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] != channels or min(array.shape[:2]) < 1:
    raise datasets.BadImageError(f'{path}: array of shape {array.shape}, expected (H, W, '
                                 f'{channels}) for config.data.{option}={channels}')
  if array.dtype == np.uint8:
    return array
  if not np.issubdtype(array.dtype, np.floating):
    raise datasets.BadImageError(f'{path}: dtype {array.dtype}; .npy files hold uint8 pixels '
                                 'or floats in [-1, 1]')
  array = array.astype(np.float32)
  if not np.all(np.isfinite(array)) or array.min() < -1 or array.max() > 1:
    raise datasets.BadImageError(f'{path}: float values must be finite and in [-1, 1], got '
                                 f'[{np.nanmin(array)}, {np.nanmax(array)}]')
  return array


def resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """An ``(H, W, C)`` array resized to ``size`` = (width, height), bicubic per channel as PIL
  resizes each band of an image (uint8 stays uint8; floats are clipped to [-1, 1])."""
  if (array.shape[1], array.shape[0]) == tuple(size):
    return array
  mode = 'L' if array.dtype == np.uint8 else 'F'
  channels = [np.asarray(Image.fromarray(array[..., c], mode=mode).resize(
      size, Image.Resampling.BICUBIC)) for c in range(array.shape[-1])]
  out = np.stack(channels, axis=-1)
  return out if mode == 'L' else np.clip(out, -1, 1).astype(np.float32)
