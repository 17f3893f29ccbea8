"""Image conversions shared by the input pipeline, the trainer and evaluation.

Pixels are uint8 on disk and float32 in [-1, 1] inside the model (the official
``Normalize((0.5,) * 3, (0.5,) * 3)``).
"""
import numpy as np
from PIL import Image


def to_float(pixels: np.ndarray) -> np.ndarray:
  """uint8 pixels to float32 in [-1, 1]."""
  return pixels.astype(np.float32) * np.float32(2 / 255) - np.float32(1)


def to_uint8(images) -> np.ndarray:
  """Floats in [-1, 1] to uint8 pixels, rounded (the official ``tensor2im`` truncates)."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0,
                 255).astype(np.uint8)


def to_rgb(images: np.ndarray) -> np.ndarray:
  """Images of any channel count as ``(..., 3)``, so that they sit side by side.

  Grey is repeated; 3 channels are kept; 2 channels show as a false colour (red, green and
  their mean as blue); 4 or more show their first three.
  """
  channels = images.shape[-1]
  if channels == 1:
    return np.repeat(images, 3, axis=-1)
  if channels == 2:
    mean = np.mean(images, axis=-1, keepdims=True, dtype=np.float32).astype(images.dtype)
    return np.concatenate([images, mean], axis=-1)
  return images[..., :3]


def to_pil(pixels: np.ndarray) -> Image.Image:
  """An ``(H, W, C)`` uint8 array as a PIL image: 'L' for one channel, else ``to_rgb``'s RGB."""
  return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else to_rgb(pixels))


def grid(rows) -> np.ndarray:
  """Rows of images ``[[image, image, ...], ...]`` (each ``(H, W, C)``, all rows the same width)
  tiled into one ``(sum H, sum W, 3)`` image, each shown through ``to_rgb``."""
  return np.concatenate([np.concatenate([to_rgb(image) for image in row], axis=1)
                         for row in rows], axis=0)
