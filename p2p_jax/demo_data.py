"""The demo dataset: labels -> facade photo, built procedurally from scikit-image's textures.

Each pair is a random facade layout (sky, cornice, brick wall, a grid of windows, a door,
pavement) as a label map in fixed colours (A), and its rendering (B): the regions painted
with crops of scikit-image's bundled brick, gravel and grass photographs, shaded as a facade
is (sky brighter towards the horizon, glass lighter towards the bottom, light window frames,
shadows under the cornice and the sills). Everything but the texture crops follows from the
label map, so a model can learn it and the per-label mean colour cannot. Splits come from
separate seeds, so val and test layouts are never seen in training. Written once in the
aligned A|B format (PNG, so label colours stay exact) and read by the same loader.

  python -m p2p_jax.demo_data --eval_dir=/tmp/p2p_demo/eval/STEP --figure=docs/demo_heldout.png

prints the held-out split's trivial baselines next to the run's eval L1, and writes a figure
of input | output | target rows from eval's images.
"""
import json
import os
import shutil
import tempfile

import numpy as np
from absl import logging
from PIL import Image

DEMO_SIZE = 64
_DEMO_MARKER = 'DEMO_COMPLETE'
_SPLITS = {'train': (0, 600), 'val': (1, 16), 'test': (2, 32)}  # split: (seed, pairs).
# Label colours of the A halves, after the CMP facades palette.
LABELS = {'sky': (0, 0, 170), 'cornice': (255, 85, 0), 'wall': (0, 85, 255),
          'window': (0, 255, 255), 'door': (170, 0, 0), 'pavement': (85, 255, 170)}
_TEXTURES = {'wall': 'brick.png', 'cornice': 'gravel.png', 'pavement': 'gravel.png',
             'door': 'grass.png'}
# Base colours (RGB in [0, 1]) and texture amplitudes of the B halves.
_COLOURS = {'wall': (0.66, 0.36, 0.27), 'cornice': (0.80, 0.77, 0.72),
            'pavement': (0.45, 0.45, 0.47), 'door': (0.40, 0.25, 0.14)}
_AMPLITUDE = {'wall': 0.06, 'cornice': 0.05, 'pavement': 0.08, 'door': 0.06}


def default_demo_dir() -> str:
  """``$XDG_CACHE_HOME/p2p_jax/demo``, by default ``~/.cache/p2p_jax/demo``."""
  cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(cache, 'p2p_jax', 'demo_facades')


def prepare_demo(data_dir: str = '') -> str:
  """Writes the demo dataset (labels -> facade photo) in the aligned A|B format, once.

  600 train, 16 val and 32 test pairs of 64x64 halves (PNG). Idempotent and safe when several
  processes call it at once: each writes a temporary folder and renames it into place; the
  first rename wins.

  Args:
    data_dir: where to write; '' for ``default_demo_dir()``.

  Returns:
    The dataset folder.
  """
  data_dir = os.path.abspath(os.path.expanduser(data_dir or default_demo_dir()))
  if os.path.isfile(os.path.join(data_dir, _DEMO_MARKER)):
    return data_dir
  if os.path.isdir(data_dir) and os.listdir(data_dir):
    raise FileExistsError(f'{data_dir} is not empty and holds no demo dataset (no '
                          f'{_DEMO_MARKER}); use another config.data.data_dir for the demo.')
  parent = os.path.dirname(data_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.demo-', dir=parent)
  try:
    _write_demo(tmp)
    os.rename(tmp, data_dir)  # Atomic; replaces a missing or empty folder, never a full one.
    logging.info('Wrote the demo dataset to %s', data_dir)
  except OSError:
    if not os.path.isfile(os.path.join(data_dir, _DEMO_MARKER)):
      raise
    logging.info('Another process wrote the demo dataset to %s first', data_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return data_dir


def _write_demo(out_dir: str) -> None:
  textures = _load_textures()
  for split, (seed, count) in _SPLITS.items():
    os.makedirs(os.path.join(out_dir, split))
    rng = np.random.default_rng(seed)
    for i in range(count):
      labels = random_layout(rng)
      photo = render(labels, textures, rng)
      pair = np.concatenate([label_image(labels), photo], axis=1)
      Image.fromarray(pair).save(os.path.join(out_dir, split, f'{split}_{i:04d}.png'))
  with open(os.path.join(out_dir, _DEMO_MARKER), 'w') as f:
    f.write('labels -> facade pairs rendered from scikit-image textures (p2p_jax.demo_data)\n')


def _load_textures() -> dict:
  """The bundled grey texture photographs as float arrays in [0, 1]."""
  from skimage import data as skimage_data  # pylint: disable=g-import-not-at-top
  photo_dir = os.path.dirname(skimage_data.__file__)
  return {name: np.asarray(Image.open(os.path.join(photo_dir, name)).convert('L'),
                           np.float32) / 255.0 for name in set(_TEXTURES.values())}


def random_layout(rng: np.random.Generator, size: int = DEMO_SIZE) -> np.ndarray:
  """A facade label map ``(size, size)`` of indices into ``LABELS``."""
  ids = {name: i for i, name in enumerate(LABELS)}
  labels = np.full((size, size), ids['wall'], np.uint8)
  sky = rng.integers(3, 14)
  cornice = sky + rng.integers(3, 6)
  ground = size - rng.integers(4, 9)
  labels[:sky] = ids['sky']
  labels[sky:cornice] = ids['cornice']
  labels[ground:] = ids['pavement']
  door_w, door_h = rng.integers(8, 13), rng.integers(14, 21)
  door_x = rng.integers(2, size - door_w - 2)
  labels[ground - door_h:ground, door_x:door_x + door_w] = ids['door']
  rows, cols = rng.integers(2, 5), rng.integers(2, 6)
  win_w, win_h = rng.integers(5, 10), rng.integers(6, 12)
  left, right = 2 + rng.integers(0, 4), size - 2 - rng.integers(0, 4)
  top, bottom = cornice + 3 + rng.integers(0, 3), ground - door_h - 3
  for y in np.linspace(top, max(top, bottom - win_h), rows).astype(int):
    for x in np.linspace(left, right - win_w, cols).astype(int):
      box = labels[y:y + win_h + 2, x - 1:x + win_w + 1]  # One pixel of wall around it.
      if (box == ids['wall']).all() and y + win_h < ground - 2:
        labels[y:y + win_h, x:x + win_w] = ids['window']
  return labels


def label_image(labels: np.ndarray) -> np.ndarray:
  """A label map as its ``LABELS`` colours, ``(H, W, 3)`` uint8."""
  return np.array(list(LABELS.values()), np.uint8)[labels]


def _texture(textures: dict, name: str, rng: np.random.Generator, size: int) -> np.ndarray:
  """A random crop of texture photo ``name``, resized to ``size``, zero-mean, unit range."""
  photo = textures[name]
  side = rng.integers(size * 2, size * 4)
  y, x = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
  crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size),
                                                               Image.Resampling.BILINEAR)
  crop = np.asarray(crop)
  return (crop - crop.mean()) / max(crop.std(), 1e-3) / 3


def _region_fraction(mask: np.ndarray) -> np.ndarray:
  """For each pixel of ``mask``, its height within its run of rows in its column: 0 at the
  run's top row, 1 at its bottom row (0 for a run of one row)."""
  rows = np.broadcast_to(np.arange(mask.shape[0])[:, None], mask.shape)
  last = mask.shape[0] - 1
  # The nearest row outside the mask above (below) each pixel bounds its run.
  start = np.maximum.accumulate(np.where(mask, -1, rows), axis=0) + 1
  end = last - np.maximum.accumulate(np.where(mask, -1, last - rows)[::-1], axis=0)[::-1] - 1
  length = end - start
  fraction = (rows - start) / np.maximum(length, 1)
  return np.where(mask & (length > 0), fraction, 0).astype(np.float32)


def render(labels: np.ndarray, textures: dict, rng: np.random.Generator) -> np.ndarray:
  """The facade photo of a label map, ``(H, W, 3)`` uint8 (see the module docstring)."""
  ids = {name: i for i, name in enumerate(LABELS)}
  size = labels.shape[0]
  photo = np.zeros((size, size, 3), np.float32)
  for name, texture_file in _TEXTURES.items():
    mask = labels == ids[name]
    shade = np.asarray(_COLOURS[name]) * (1 + _AMPLITUDE[name] * 3 *
                                          _texture(textures, texture_file, rng, size))[..., None]
    photo[mask] = shade[mask]
  # Daylight from above: the wall darkens towards the street.
  wall = labels == ids['wall']
  light = np.linspace(1.2, 0.8, size)[:, None, None]
  photo[wall] = (photo * light)[wall]
  sky = labels == ids['sky']
  t = _region_fraction(sky)[..., None]
  photo[sky] = ((1 - t) * np.array([0.25, 0.45, 0.80]) + t * np.array([0.75, 0.85, 0.95]))[sky]
  window = labels == ids['window']
  t = _region_fraction(window)[..., None]
  glass = (1 - t) * np.array([0.12, 0.16, 0.24]) + t * np.array([0.50, 0.62, 0.72])
  photo[window] = glass[window]
  # Light frames: the window's outer pixel ring.
  inner = window.copy()
  inner[1:-1, 1:-1] = (window[1:-1, 1:-1] & window[:-2, 1:-1] & window[2:, 1:-1]
                       & window[1:-1, :-2] & window[1:-1, 2:])
  photo[window & ~inner] = (0.92, 0.90, 0.85)
  # Shadows on the wall: two rows under the cornice and under each window.
  for casting in (labels == ids['cornice'], window):
    below = np.zeros_like(casting)
    below[1:] |= casting[:-1]
    below[2:] |= casting[:-2]
    shadow = below & wall
    photo[shadow] *= 0.45
  return np.clip(np.round(photo * 255), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# Baselines and a figure of held-out results.


def read_pairs(directory: str) -> tuple[np.ndarray, np.ndarray]:
  """The A and B halves of every PNG in ``directory``, as float arrays in [-1, 1]."""
  names = sorted(f for f in os.listdir(directory) if f.endswith('.png'))
  pairs = np.stack([np.asarray(Image.open(os.path.join(directory, f)).convert('RGB'))
                    for f in names])
  half = pairs.shape[2] // 2
  return (pairs[:, :, :half] / 127.5 - 1, pairs[:, :, half:] / 127.5 - 1)


def baselines(a: np.ndarray, b: np.ndarray) -> dict:
  """L1 (in [-1, 1] units, as eval's) of the trivial answers on a split of label maps ``a``
  and photos ``b``: the input itself, the split's mean colour, and each label's mean colour."""
  label_ids = np.zeros(a.shape[:3], np.int64)
  for i, colour in enumerate(LABELS.values()):
    label_ids[np.all(np.abs((a + 1) * 127.5 - colour) < 1, axis=-1)] = i
  per_label = np.zeros_like(b)
  for i in range(len(LABELS)):
    mask = label_ids == i
    if mask.any():
      per_label[mask] = b[mask].mean(axis=0)
  return {'input': float(np.abs(a - b).mean()),
          'mean_colour': float(np.abs(b.mean(axis=(0, 1, 2)) - b).mean()),
          'per_label_mean_colour': float(np.abs(per_label - b).mean())}


def figure(image_dir: str, names: list) -> np.ndarray:
  """Rows of real_A | fake_B | real_B of eval's images of ``names``, ``(H, W, 3)`` uint8."""
  def load(name, kind):
    return np.asarray(Image.open(os.path.join(image_dir, f'{name}_{kind}.png')).convert('RGB'))
  rows = [np.concatenate([load(n, 'real_A'), load(n, 'fake_B'), load(n, 'real_B')], axis=1)
          for n in names]
  return np.concatenate(rows, axis=0)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  eval_dir = flags.FLAGS.eval_dir
  results = json.load(open(os.path.join(eval_dir, 'metrics.json')))
  data_dir = prepare_demo(flags.FLAGS.data_dir)
  scores = baselines(*read_pairs(os.path.join(data_dir, results['split'])))
  scores['model'] = results['L1']
  best = min(scores['input'], scores['mean_colour'], scores['per_label_mean_colour'])
  scores['model_over_best_baseline'] = results['L1'] / best
  print(json.dumps(scores, indent=2))
  if flags.FLAGS.figure:
    image_dir = os.path.join(eval_dir, 'images')
    names = sorted(f[:-len('_real_A.png')] for f in os.listdir(image_dir)
                   if f.endswith('_real_A.png'))[:flags.FLAGS.figure_rows]
    Image.fromarray(figure(image_dir, names)).save(flags.FLAGS.figure)


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('eval_dir', None, 'WORKDIR/eval/STEP of a --mode=eval run of the demo.',
                      required=True)
  flags.DEFINE_string('data_dir', '', "The demo dataset ('' for the default folder).")
  flags.DEFINE_string('figure', '', 'Where to write the input | output | target PNG.')
  flags.DEFINE_integer('figure_rows', 4, 'Examples in the figure.')
  app.run(main)
