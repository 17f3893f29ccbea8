"""A decoded uint8 cache of a training split: each file decoded and resized once, not per epoch.

The deterministic part of the official training preprocessing (decode, the resize to
``load_size`` or ``scale_width``) is computed once per file, in parallel, and written to
``CACHE_DIR/<key>/``:

* ``pixels.u8``: every example's A then B pixels, raw, back to back;
* ``index.npy``: ``(N, 10)`` int64, the byte offset, height, width, channels and dtype (0:
  uint8, 1: float32, from paired ``.npy`` files) of A then B (height 0 marks a bad file left
  out under ``skip_bad_images``);
* ``names.json``: the example names;
* ``bad.json``: ``[index, reason]`` of each bad file left out.

``key`` hashes the source's files (path, size, modification time) and every option that
fixes the stored pixels, so an edited dataset or another ``load_size`` gets its own cache and
a stale one is never read. Each epoch then only crops and flips the stored arrays, with the
same crop windows as without the cache, hence the same batches. Concurrent builders (the
processes of a multi-host run on a shared disk) take a file lock: one builds, the others
reuse it.
"""
import concurrent.futures
import fcntl
import hashlib
import json
import os
import shutil
import time
from typing import Callable, Sequence

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from p2p_jax import datasets

_FORMAT_VERSION = 3
_DTYPES = (np.uint8, np.float32)
_COMPLETE = 'complete'  # Written last: a folder without it is an interrupted build.


def default_cache_dir() -> str:
  cache_home = os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache')
  return os.path.join(cache_home, 'p2p_jax', 'decoded')


def cache_key(config: ml_collections.ConfigDict, split: str, source: datasets.Source) -> str:
  """A hash of the split's files (paths, sizes, mtimes) and of the options that fix pixels."""
  data = config.data
  options = {name: data.get(name) for name in (
      'name', 'direction', 'input_nc', 'output_nc', 'preprocess', 'load_size', 'crop_size',
      'check_ab_shape', 'skip_bad_images')}
  digest = hashlib.sha256(json.dumps([_FORMAT_VERSION, split, options]).encode())
  for entry in _fingerprint(config, source):
    digest.update(repr(entry).encode())
  return digest.hexdigest()[:24]


def _fingerprint(config: ml_collections.ConfigDict, source: datasets.Source):
  """``(path, size, mtime_ns)`` of every file the split reads, in record order."""
  if source.files is not None:
    paths = [path for record in source.records for path in source.files(record)]
  else:  # TFDS records: the dataset's files under its data dir.
    root = config.data.data_dir or os.path.expanduser('~/tensorflow_datasets')
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)
    yield len(source.records)
  for path in paths:
    if '://' in path:  # A bucket: etils gives the size and the mtime in seconds.
      stat = epath.Path(path).stat()
      yield path, stat.length, stat.mtime
    else:
      stat = os.stat(path)
      yield path, stat.st_size, stat.st_mtime_ns


def get_or_build(config: ml_collections.ConfigDict, split: str, source: datasets.Source,
                 resize: Callable[[dict], dict]) -> 'CachedPixels':
  """The split's stored, resized arrays, built on first use.

  Args:
    config: the experiment config (``config.data.cache_dir``, ``skip_bad_images``, ...).
    split: the split's name (part of the key).
    source: the split's file source.
    resize: ``decoded example -> {'A': uint8 HWC, 'B': uint8 HWC, 'name'}``, the
      deterministic preprocessing.

  Returns:
    The cache's reader, one example per record of ``source``, in its order.

  Raises:
    BadImageError: naming the first bad file, if any is bad and ``skip_bad_images`` is off,
      or if every file is bad.
  """
  pixels, bad = _get_or_build(config, split, source, resize)
  if pixels is None:
    count = 'All' if len(bad) == len(source.records) else f'{len(bad)} of'
    raise datasets.BadImageError(f'{count} {len(source.records)} images are bad (split '
                                 f'{split!r}; the first: {bad[0][1]})')
  return pixels


def bad_records(config: ml_collections.ConfigDict, split: str, resize: Callable[[dict], dict],
                source: datasets.Source) -> list[tuple[int, str]]:
  """``(index, reason)`` of the split's bad files, found by building (or reading) its cache.

  Building decodes every file as the training pipeline does, so with the cache on it is the
  file check too (``file_check.checked_source``'s ``check``): a first run decodes each file
  once. Without ``skip_bad_images`` a split with bad files gets no cache.
  """
  return _get_or_build(config, split, source, resize)[1]


def _get_or_build(config, split, source, resize):
  """``(CachedPixels or None, bad records)``: None when the build kept no cache."""
  root = config.data.cache_dir or default_cache_dir()
  os.makedirs(root, exist_ok=True)
  directory = os.path.join(root, cache_key(config, split, source))
  with open(directory + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes, also on a crash.
    if os.path.isfile(os.path.join(directory, _COMPLETE)):
      logging.info('Reading decoded %s images from the cache %s', split, directory)
      with open(os.path.join(directory, 'bad.json')) as f:
        bad = [(int(i), str(reason)) for i, reason in json.load(f)]
      return CachedPixels(directory), bad
    bad = _build(directory, source, resize, config.data.skip_bad_images)
  kept = os.path.isfile(os.path.join(directory, _COMPLETE))
  return (CachedPixels(directory) if kept else None), bad


def _build(directory: str, source: datasets.Source, resize: Callable[[dict], dict],
           skip_bad_images: bool) -> list[tuple[int, str]]:
  """Decodes and resizes every record in threads (PIL releases the GIL) into ``directory``.

  Returns the bad records; the folder is kept if there are none, or if ``skip_bad_images``
  leaves them out and some file is good.
  """
  building = f'{directory}.building-{os.getpid()}'
  shutil.rmtree(building, ignore_errors=True)
  os.makedirs(building)
  num_records = len(source.records)
  start = time.time()

  def load(i):
    try:
      return resize(source.decode(source.records[i])), None
    except datasets.BadImageError as e:
      return None, str(e)

  logging.info('Caching %d decoded images in %s (later runs reuse them)', num_records,
               directory)
  try:
    index, names, bad, size = _write_pixels(os.path.join(building, 'pixels.u8'), load,
                                            num_records)
    if bad and (not skip_bad_images or len(bad) == num_records):
      shutil.rmtree(building)
      return bad
    if bad:
      logging.warning('Left out %d bad file(s) of %d (skip_bad_images); the first: %s',
                      len(bad), num_records, bad[0][1])
    np.save(os.path.join(building, 'index.npy'), index)
    with open(os.path.join(building, 'names.json'), 'w') as f:
      json.dump(names, f)
    with open(os.path.join(building, 'bad.json'), 'w') as f:
      json.dump(bad, f)
    open(os.path.join(building, _COMPLETE), 'w').close()
  except BaseException:
    shutil.rmtree(building, ignore_errors=True)
    raise
  shutil.rmtree(directory, ignore_errors=True)  # An interrupted build's leftovers.
  os.rename(building, directory)
  logging.info('Cached %d images (%.1f MiB, %d left out) in %.1f s', num_records - len(bad),
               size / 2**20, len(bad), time.time() - start)
  return bad


def _write_pixels(path: str, load: Callable, num_records: int):
  """Writes ``load(i)``'s arrays in order; returns the index, names, errors and bytes."""
  index = np.zeros((num_records, 10), np.int64)
  names, bad = [], []
  workers = os.cpu_count() or 1
  window = 4 * workers  # Written in order: a bounded window of results bounds memory.
  offset, start, last_report = 0, time.time(), time.time()
  with open(path, 'wb') as pixels, concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for first in range(0, num_records, window):
      done = min(first + window, num_records)
      for i, (example, error) in zip(range(first, done), pool.map(load, range(first, done))):
        if example is None:
          bad.append((i, error))
          names.append('')
          continue
        for column, key in ((0, 'A'), (5, 'B')):
          dtype = np.uint8 if example[key].dtype == np.uint8 else np.float32
          array = np.ascontiguousarray(example[key], dtype)
          index[i, column:column + 5] = (offset, *array.shape, _DTYPES.index(dtype))
          pixels.write(array.tobytes())
          offset += array.nbytes
        names.append(example['name'])
      if time.time() - last_report > 10:
        last_report = time.time()
        logging.info('Cached %d / %d images (%.0f%%), %.0f images/s', done, num_records,
                     100 * done / num_records, done / (last_report - start))
  return index, names, bad, offset


class CachedPixels:
  """A cache folder's examples: their sizes and names (``record``), and read-only views of
  their pixels in the memory map (``views``); picklable for grain's workers.

  The pixels are memory-mapped on first use in each process, so processes share the page
  cache; the training batch is the one copy of them.
  """

  def __init__(self, directory: str):
    self.directory = directory
    self._arrays = None

  def __getstate__(self):
    return {'directory': self.directory, '_arrays': None}

  def _open(self):
    if self._arrays is None:
      map_ = np.memmap(os.path.join(self.directory, 'pixels.u8'), np.uint8, mode='r')
      index = np.load(os.path.join(self.directory, 'index.npy'))
      with open(os.path.join(self.directory, 'names.json')) as f:
        names = json.load(f)
      # A plain array over the map: slicing it skips np.memmap's per-view overhead.
      self._arrays = np.asarray(map_), index, names
    return self._arrays

  def record(self, i: int) -> dict | None:
    """``{'index': i, 'shape_A', 'shape_B': (h, w, c), 'name'}``; None for a bad file left
    out at build time (``skip_bad_images``), as the uncached pipeline skips it."""
    _, index, names = self._open()
    row = index[i]
    if row[1] == 0:
      return None
    return {'index': i, 'shape_A': tuple(int(n) for n in row[1:4]),
            'shape_B': tuple(int(n) for n in row[6:9]), 'name': names[i]}

  def views(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Example ``i``'s A and B pixels (HWC, uint8 or float32), views of the memory map."""
    pixels, index, _ = self._open()

    def view(offset, h, w, c, dtype):
      dtype = _DTYPES[dtype]
      size = h * w * c * np.dtype(dtype).itemsize
      return pixels[offset:offset + size].view(dtype).reshape(h, w, c)

    return view(*index[i, :5]), view(*index[i, 5:])
