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
  """Grey ``(..., 1)`` images as ``(..., 3)``, so images of 1 and 3 channels sit side by side."""
  return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def to_pil(pixels: np.ndarray) -> Image.Image:
  """An ``(H, W, 1)`` or ``(H, W, 3)`` uint8 array as a PIL image ('L' or 'RGB')."""
  return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def grid(rows) -> np.ndarray:
  """Rows of images ``[[image, image, ...], ...]`` (each ``(H, W, 1 or 3)``, all rows the same
  width) tiled into one ``(sum H, sum W, 3)`` image, grey shown as RGB."""
  return np.concatenate([np.concatenate([to_rgb(image) for image in row], axis=1)
                         for row in rows], axis=0)
