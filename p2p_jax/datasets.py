"""Data sources: aligned A|B folders, paired A/ B/ folders (paired.py), TFDS Cityscapes, demo.

A ``Source`` is one split: random-access ``records`` and a ``decode`` function turning one
record into ``{'A': PIL image, 'B': PIL image, 'name': str}``. The direction is already
applied ('A' is always the generator input, with ``input_nc`` channels; 'B' the target,
with ``output_nc``). Decoding uses PIL, in grain's worker processes. Every malformed input
raises ``BadImageError`` naming the file and what is wrong with it.

The demo dataset (``demo_data``) is written once, in the aligned format, to
``config.data.data_dir`` or, when that is empty, to ``demo_data.default_demo_dir()``.
"""
import dataclasses
import functools
import io
import os
from typing import Any, Callable, Optional, Sequence

import ml_collections
import numpy as np
from absl import logging
from etils import epath
from PIL import Image

# The demo is read as aligned folders; its writer lives in demo_data.
from p2p_jax.demo_data import default_demo_dir, prepare_demo  # pylint: disable=unused-import

# As the official loader (data/image_folder.py), compared lower-case.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.tif', '.tiff', '.webp')
SPLITS = ('train', 'val', 'test')


class BadImageError(ValueError):
  """An input image that cannot be used; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Source:
  """One split of a dataset.

  Attributes:
    records: random-access records (file paths, or TFDS examples with undecoded images).
    decode: ``record -> {'A': PIL.Image, 'B': PIL.Image, 'name': str}``; raises
      ``BadImageError``. A picklable function, since grain sends it to worker processes.
    files: ``record -> tuple of file paths`` for sources of files (which
      ``file_check`` checks before training), None for others (TFDS).
  """
  records: Sequence[Any]
  decode: Callable[[Any], dict]
  files: Optional[Callable[[Any], tuple]] = None


def get_source(config: ml_collections.ConfigDict, split: str) -> Source:
  """The source of ``split`` for ``config.data.name``.

  Args:
    config: the experiment config; reads ``config.data``.
    split: 'train', 'val' or 'test'.

  Returns:
    The split's ``Source``.
  """
  name = config.data.name
  convert = dict(direction=config.data.direction, input_nc=config.data.input_nc,
                 output_nc=config.data.output_nc)
  if name in ('aligned', 'demo'):
    data_dir = config.data.data_dir
    if name == 'demo':
      data_dir = prepare_demo(data_dir)
    # An optional field: False splits A|B images of any shape at width // 2, as the official
    # loader does, instead of requiring width == 2 * height.
    check_shape = config.data.get('check_ab_shape', True)
    return Source(records=list_aligned_images(data_dir, split),
                  decode=functools.partial(decode_aligned, check_shape=check_shape, **convert),
                  files=one_file)
  if name == 'paired':
    from p2p_jax import paired  # pylint: disable=g-import-not-at-top  (it imports this module)
    return Source(records=paired.list_pairs(config.data.data_dir, split),
                  decode=functools.partial(paired.decode_paired, **convert),
                  files=paired.pair_files)
  if name == 'cityscapes':
    return Source(records=cityscapes_records(config.data.data_dir,
                                             config.data.manual_dir, split),
                  decode=functools.partial(decode_cityscapes, **convert))
  raise ValueError(f"config.data.name must be 'aligned', 'paired', 'cityscapes' or 'demo', "
                   f'got {name!r}')


# ---------------------------------------------------------------------------------------
# Decoding and conversion to the configured channels.


def open_image(data: str | bytes, what: str) -> Image.Image:
  """Fully decodes an image file (a path or its bytes); ``what`` names it in errors.

  A path may be local or a bucket URI (``gs://...``): it is read through ``etils.epath``.
  """
  try:
    if not isinstance(data, bytes):
      data = epath.Path(data).read_bytes()
    image = Image.open(io.BytesIO(data))
    image.load()  # Decode now, so a truncated file fails here and not later.
  except FileNotFoundError as e:
    raise BadImageError(f'{what}: file not found') from e
  except PermissionError as e:
    raise BadImageError(f'{what}: permission denied (cannot read the file)') from e
  except Image.UnidentifiedImageError as e:
    raise BadImageError(f'{what}: not an image file PIL can read (empty or corrupt?)') from e
  except (OSError, SyntaxError, ValueError) as e:
    raise BadImageError(f'{what}: corrupt or truncated image ({e})') from e
  return image


def to_8bit(image: Image.Image, what: str) -> Image.Image:
  """Converts any readable mode to 8-bit 'L' (single channel sources) or 'RGB'.

  Grayscale, RGBA, palette and 16-bit images are all converted; alpha is dropped, as the
  official loader's ``convert('RGB')`` does. 16-bit images are scaled, not clipped.
  """
  mode = image.mode
  if mode in ('L', 'RGB'):
    return image
  if mode in ('1', 'LA', 'La'):
    return image.convert('L')
  if mode.startswith('I'):  # 'I;16*' (16-bit) or 'I' (32-bit, as 16-bit PNGs often open).
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
      raise BadImageError(f'{what}: {mode} image with values outside the 16-bit range '
                          f'[{values.min()}, {values.max()}]; cannot convert to 8 bits')
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), mode='L')
  if mode == 'F':
    raise BadImageError(f'{what}: a floating-point (mode F) image has no defined 8-bit '
                        'range; cannot convert it (save it as 8-bit)')
  if mode in ('P', 'PA'):
    image = image.convert('RGBA')  # Keeps palette transparency from warning in convert.
  try:
    return image.convert('RGB')
  except ValueError as e:
    raise BadImageError(f'{what}: cannot convert a {mode} image to RGB ({e})') from e


def to_channels(image: Image.Image, channels: int) -> Image.Image:
  """An 8-bit image with ``channels`` (1: 'L', 3: 'RGB') channels."""
  mode = {1: 'L', 3: 'RGB'}[channels]
  return image if image.mode == mode else image.convert(mode)


def _apply_direction(a: Image.Image, b: Image.Image, name: str, *, direction: str,
                     input_nc: int, output_nc: int) -> dict:
  if direction == 'BtoA':
    a, b = b, a
  return {'A': to_channels(a, input_nc), 'B': to_channels(b, output_nc), 'name': name}


# ---------------------------------------------------------------------------------------
# Aligned A|B folders (the official pix2pix format).


def list_aligned_images(data_dir: str, split: str) -> list[str]:
  """Sorted image paths of ``data_dir/split``, with clear errors for missing folders.

  Args:
    data_dir: the dataset root, holding ``train/``, ``val/``, ``test/``.
    split: the sub-folder.

  Returns:
    The image paths (non-recursive), sorted.
  """
  if not data_dir:
    raise ValueError('config.data.data_dir is not set: point it at a folder holding '
                     'train/, val/ and test/ folders of A|B images (e.g. facades).')
  # epath: data_dir may also be a bucket URI (gs://...), as on TPU pods.
  root = epath.Path(data_dir)
  if not root.is_dir():
    raise FileNotFoundError(f'config.data.data_dir={data_dir!r} does not exist or is not '
                            'a folder.')
  split_dir = root / split
  if not split_dir.is_dir():
    found = sorted(d.name for d in root.iterdir() if d.is_dir())
    raise FileNotFoundError(f'Split folder {split_dir} does not exist (folders in data_dir: '
                            f'{found or "none"}); expected {data_dir}/{split}/*.jpg.')
  paths = sorted(os.fspath(f) for f in split_dir.iterdir()
                 if f.name.lower().endswith(IMAGE_EXTENSIONS))
  if not paths:
    raise FileNotFoundError(f'Split folder {split_dir} holds no images (looked for '
                            f'{", ".join(IMAGE_EXTENSIONS)}).')
  return paths


def one_file(path: str) -> tuple:
  """The files of an aligned record: the A|B image itself."""
  return (path,)


def decode_aligned(path: str, *, direction: str, input_nc: int, output_nc: int,
                   check_shape: bool = True) -> dict:
  """Decodes one A|B image: A is the left half, B the right half.

  Args:
    path: the image file.
    direction: 'AtoB' or 'BtoA' (swaps the halves).
    input_nc: channels of the returned 'A' (1 or 3).
    output_nc: channels of the returned 'B' (1 or 3).
    check_shape: require width == 2 * height; else split any image at width // 2.

  Returns:
    ``{'A': PIL.Image, 'B': PIL.Image, 'name': file stem}``.
  """
  image = to_8bit(open_image(path, path), path)
  w, h = image.size
  if check_shape and (w % 2 or w != 2 * h):
    raise BadImageError(f'{path}: an A|B image must be twice as wide as high (two square '
                        f'halves side by side), got {w}x{h} (width x height). Set '
                        'config.data.check_ab_shape=False to split it at width // 2.')
  if w < 2:
    raise BadImageError(f'{path}: {w}x{h} is too small to hold two halves')
  half = w // 2
  a, b = image.crop((0, 0, half, h)), image.crop((half, 0, w, h))
  name = os.path.splitext(os.path.basename(path))[0]
  return _apply_direction(a, b, name, direction=direction, input_nc=input_nc,
                          output_nc=output_nc)


# ---------------------------------------------------------------------------------------
# TFDS Cityscapes: label map -> photo, both at 256x256.

CITYSCAPES_TFDS_NAME = 'cityscapes/semantic_segmentation'
CITYSCAPES_ZIPS = ('leftImg8bit_trainvaltest.zip', 'gtFine_trainvaltest.zip')
CITYSCAPES_SIZE = 256
_CITYSCAPES_SPLITS = {'train': 'train', 'val': 'validation', 'test': 'test'}

# The official colour of label ids 0..33 (cityscapesScripts helpers/labels.py); others black.
_CITYSCAPES_COLORS = (
    (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (111, 74, 0), (81, 0, 81),
    (128, 64, 128), (244, 35, 232), (250, 170, 160), (230, 150, 140), (70, 70, 70),
    (102, 102, 156), (190, 153, 153), (180, 165, 180), (150, 100, 100), (150, 120, 90),
    (153, 153, 153), (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35),
    (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 0, 90), (0, 0, 110), (0, 80, 100), (0, 0, 230), (119, 11, 32))
CITYSCAPES_PALETTE = np.zeros((256, 3), np.uint8)
CITYSCAPES_PALETTE[:len(_CITYSCAPES_COLORS)] = _CITYSCAPES_COLORS


def cityscapes_records(data_dir: str, manual_dir: str, split: str) -> Sequence[Any]:
  """The TFDS Cityscapes split as a random-access ``tfds.data_source``, built if needed.

  The first call builds ``cityscapes/semantic_segmentation`` (array_record) into
  ``data_dir`` from the manual downloads in ``manual_dir``. Images stay undecoded (PNG
  bytes) so that grain workers decode them with PIL, without TensorFlow.

  Args:
    data_dir: the TFDS data dir ('' for TFDS's default, ~/tensorflow_datasets).
    manual_dir: where the zips are ('' for TFDS's default, DATA_DIR/downloads/manual).
    split: 'train', 'val' or 'test' (TFDS 'validation' is our 'val').

  Returns:
    A sequence of ``{'image_id', 'image_left', 'segmentation_label'}`` records.
  """
  if split not in _CITYSCAPES_SPLITS:
    raise ValueError(f'Cityscapes has splits {list(_CITYSCAPES_SPLITS)}, got {split!r}')
  import tensorflow_datasets as tfds  # Lazy: only this source needs TFDS.
  builder = tfds.builder(CITYSCAPES_TFDS_NAME, data_dir=data_dir or None,
                         file_format='array_record')
  if not builder.is_prepared():
    _build_cityscapes(builder, manual_dir)
  skip = tfds.decode.SkipDecoding()
  return builder.as_data_source(split=_CITYSCAPES_SPLITS[split],
                                decoders={'image_left': skip, 'segmentation_label': skip})


def _build_cityscapes(builder, manual_dir: str) -> None:
  manual_dir = manual_dir or os.path.join(builder.data_dir_root, 'downloads', 'manual')
  missing = [z for z in CITYSCAPES_ZIPS if not os.path.isfile(os.path.join(manual_dir, z))]
  if missing:
    raise FileNotFoundError(
        f'TFDS Cityscapes is not built in {builder.data_dir_root} and building it needs the '
        f'manual downloads {" and ".join(CITYSCAPES_ZIPS)} in {manual_dir} '
        f'(config.data.manual_dir); missing: {", ".join(missing)}. Download them from '
        'https://www.cityscapes-dataset.com/downloads/ (free registration).')
  import tensorflow as tf
  import tensorflow_datasets as tfds
  try:  # TF only serialises examples here; it must never claim accelerator memory.
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF already initialised its devices elsewhere; nothing to change.
    pass
  logging.info('Building TFDS %s into %s from %s (once).', CITYSCAPES_TFDS_NAME,
               builder.data_dir_root, manual_dir)
  tfds.disable_progress_bar()
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


def decode_cityscapes(record: dict, *, direction: str, input_nc: int, output_nc: int) -> dict:
  """Decodes one TFDS Cityscapes record into a coloured label map (A) and the photo (B).

  Both are resized to 256x256: the photo bicubic, the label ids nearest-neighbour (then
  coloured with the official palette, so the input holds only palette colours).

  Args:
    record: a record of ``cityscapes_records``.
    direction: 'AtoB' (labels -> photo, the paper's task) or 'BtoA'.
    input_nc: channels of the returned 'A'.
    output_nc: channels of the returned 'B'.

  Returns:
    ``{'A': PIL.Image, 'B': PIL.Image, 'name': the Cityscapes image id}``.
  """
  image_id = record['image_id']
  image_id = image_id.decode() if isinstance(image_id, bytes) else str(image_id)
  what = f'TFDS {CITYSCAPES_TFDS_NAME} example {image_id}'
  size = (CITYSCAPES_SIZE, CITYSCAPES_SIZE)
  photo = to_8bit(open_image(record['image_left'], f'{what} (image_left)'), what)
  photo = photo.convert('RGB').resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
  ids = open_image(record['segmentation_label'], f'{what} (segmentation_label)')
  if ids.mode not in ('L', 'P'):
    raise BadImageError(f'{what}: segmentation_label must hold 8-bit label ids, got mode '
                        f'{ids.mode}')
  ids = np.asarray(ids.resize(size, Image.Resampling.NEAREST))
  labels = Image.fromarray(CITYSCAPES_PALETTE[ids], mode='RGB')
  return _apply_direction(labels, photo, image_id, direction=direction, input_nc=input_nc,
                          output_nc=output_nc)
