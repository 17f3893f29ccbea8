"""grain input pipelines: shard, shuffle, decode, jitter, batch, prefetch in workers.

Training::

  source (MapDataset) -> EpochShuffle (a new order each epoch) -> decode (PIL)
    -> random_map jitter (the official --preprocess and flip, uint8) -> repeat
    -> this process's rows of each global batch -> to_iter_dataset (threaded prefetch)
    -> batch (host share, drop_remainder) -> mp_prefetch (config.data.num_workers processes)

Every process builds the same global sequence (one seed, no process index in it) and reads
only its rows of each global batch: process p of P takes rows [p * B/P, (p + 1) * B/P) of
global batch b. So the global batches are the same whatever the number of processes, and
``parallel.to_global`` puts each process's rows back at their global positions.

Bad files are found before training (``file_check``) and, with ``skip_bad_images``, left out
of the source before shuffling. A file that goes bad later (or a TFDS record) is still
skipped as it is read: batching comes after ``to_iter_dataset`` so that it can drop elements
(grain batches a dataset with holes only as an ``IterDataset``); batches therefore run
across epoch boundaries and no example is ever dropped. Everything random is a function of
the seed and the element's global position, so the iterator's ``get_state()`` fully
describes where it is.
(A skipped file moves a process's later rows up by one, so only runs without skipped files
keep exactly the same global batches on another number of processes.)
Evaluation has no jitter: both images are resized to ``crop_size``.

With ``config.data.cache`` the source is ``data_cache``'s decoded, resized uint8 arrays, built
once per dataset and options, and decode and resize leave the loop. The chain then carries only
each example's crop window (the same draws as ``jitter``'s, so the same batches as without the
cache), and ``CropBatch`` copies the windows' pixels from the cache's memory map into the batch
in the consuming process: with workers, pixels never pass through grain's shared memory.
"""
import collections
import functools
import os
import time
from typing import Any, Optional

import grain
from grain import multiprocessing as grain_multiprocessing
import jax
import ml_collections
import numpy as np
from absl import flags
from absl import logging
from PIL import Image

from p2p_jax import data_cache, datasets, images, paired, parallel

PREPROCESS_OPTIONS = ('resize_and_crop', 'crop', 'scale_width', 'scale_width_and_crop',
                      'none')
_BICUBIC = Image.Resampling.BICUBIC
# Threads decoding ahead in each reading process (PIL releases the GIL while decoding).
# Cached examples are only copied: threads would add GIL hand-offs and no parallelism.
_READ_THREADS = 4
_CACHED_READ_THREADS = 0
_MIN_SHARED_MEMORY_BYTES = 2**16


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ``ValueError`` naming the option when a ``config.data`` option is invalid."""
  data = config.data

  def check(ok, option, message):
    if not ok:
      raise ValueError(f'config.data.{option}={data[option]!r}: {message}')

  check(data.name in ('aligned', 'paired', 'cityscapes', 'demo'), 'name',
        "must be 'aligned', 'paired', 'cityscapes' or 'demo'")
  check(data.direction in ('AtoB', 'BtoA'), 'direction', "must be 'AtoB' or 'BtoA'")
  check(data.preprocess in PREPROCESS_OPTIONS, 'preprocess',
        f'must be one of {", ".join(PREPROCESS_OPTIONS)}')
  for option in ('input_nc', 'output_nc'):
    if data.name == 'paired':  # .npy arrays hold any channel count.
      check(isinstance(data[option], int) and data[option] > 0, option,
            'must be a positive integer')
    else:
      check(data[option] in (1, 3), option, "must be 1 (grayscale) or 3 (RGB) (any count: "
            "config.data.name='paired' with .npy files)")
  for option in ('load_size', 'crop_size', 'batch_size', 'prefetch_buffer_size'):
    check(isinstance(data[option], int) and data[option] > 0, option,
          'must be a positive integer')
  check(isinstance(data.cache, bool), 'cache', 'must be True or False')
  check(isinstance(data.cache_dir, str), 'cache_dir', "must be a folder path ('': default)")
  check(isinstance(data.num_workers, int) and data.num_workers >= 0, 'num_workers',
        'must be a non-negative integer (0: decode in the main process)')
  if data.preprocess in ('resize_and_crop', 'scale_width_and_crop'):
    check(data.crop_size <= data.load_size, 'crop_size',
          f'must be <= config.data.load_size={data.load_size} for preprocess='
          f'{data.preprocess!r}')


def validate_eval_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ``ValueError`` naming the option when a validation / eval option is invalid."""
  from p2p_jax import metrics  # pylint: disable=g-import-not-at-top
  every = config.eval_every_steps
  if not isinstance(every, int) or every < 0:
    raise ValueError(f'config.eval_every_steps={every!r}: must be a non-negative integer '
                     '(0: no validation during training).')
  if config.eval.best_metric not in metrics.LOWER_IS_BETTER:
    raise ValueError(f'config.eval.best_metric={config.eval.best_metric!r}: must be one of '
                     f'{", ".join(metrics.LOWER_IS_BETTER)}.')
  if config.eval.best_metric in ('FID', 'KID_mean') and not config.eval.inception_path:
    raise ValueError(f'config.eval.best_metric={config.eval.best_metric!r} needs '
                     'config.eval.inception_path (the FID Inception weights).')
  batch_size = config.eval.batch_size
  if not isinstance(batch_size, int) or batch_size <= 0:
    raise ValueError(f'config.eval.batch_size={batch_size!r} must be a positive integer.')
  max_examples = config.eval.max_examples
  if not isinstance(max_examples, int) or not (max_examples == -1 or max_examples > 0):
    raise ValueError(f'config.eval.max_examples={max_examples!r}: must be -1 (the whole '
                     'split) or a positive integer.')


def num_examples(config: ml_collections.ConfigDict, split: str) -> int:
  """The number of examples in ``split``, over all processes (bad files included).

  Args:
    config: the experiment config.
    split: 'train', 'val' or 'test'.

  Returns:
    The split's size.
  """
  return len(datasets.get_source(config, split).records)


def create_train_iterator(config: ml_collections.ConfigDict, seed: int, start_step: int = 0,
                          source: Optional[datasets.Source] = None) -> grain.DatasetIterator:
  """The infinite, jittered, checkpointable training iterator of this process.

  Args:
    config: the experiment config (``config.data``: source, preprocessing, the global
      ``batch_size``, ``num_workers``, ...).
    seed: the data seed. Shuffling and jitter are derived from it, the epoch and the
      example's global position, so a run's global batches are a function of the seed
      alone, whatever the number of processes.
    start_step: the global batch to start at: resumes the data position from a step count
      (e.g. after a change of process count, when the saved per-process iterator states no
      longer apply).

  Returns:
    An iterator of host-local batches ``{'A': uint8 (host_batch, crop, crop, input_nc),
    'B': uint8 (host_batch, crop, crop, output_nc)}`` (the train step maps them to [-1, 1],
    so every hop to the device carries a quarter of float32's bytes), host_batch =
    ``batch_size // process_count``. (With preprocess 'scale_width' or 'none' the spatial
    size follows the images.) ``get_state()`` / ``set_state()`` save and restore its
    position exactly; restore with the same config, ``num_workers`` and process count.
  """
  validate_config(config)
  parallel.check_batch_splits_over_processes(config.data.batch_size)
  source = source or datasets.get_source(config, config.data.train_split)
  data = config.data
  resize = training_resize(config)
  window = dict(preprocess=data.preprocess, crop_size=data.crop_size, flip=data.flip)
  if data.cache:  # The chain carries crop windows; CropBatch copies the pixels, once.
    pixels = data_cache.get_or_build(config, data.train_split, source, resize)
    records, decode = list(range(len(source.records))), pixels.record
    draw, threads = functools.partial(cached_crop_window, **window), _CACHED_READ_THREADS
  else:
    records, decode = source.records, source.decode
    draw, threads = functools.partial(jitter, resize=resize, **window), _READ_THREADS
  host_batch = data.batch_size // jax.process_count()
  # The same seed on every process: all build the same global sequence (see HostRows). The
  # derivation is fixed, as every run's batches depend on it.
  seed = int(np.random.SeedSequence([seed, 0]).generate_state(1)[0])
  # .seed() seeds the random_map draws below; EpochShuffle takes the seed itself.
  ds = EpochShuffle(grain.MapDataset.source(records).seed(seed), seed)
  ds = ds.map(DecodeOrSkip(decode, data.skip_bad_images, len(ds)))
  # Cached or not, the same chain (grain derives the draws' seed from its depth in it).
  ds = ds.random_map(draw)
  ds = ds.repeat(None)  # Reseeds the shuffle and the draws with the epoch.
  ds = HostRows(ds, data.batch_size, jax.process_index(), jax.process_count(), start_step)
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=threads,
      prefetch_buffer_size=max(threads, data.prefetch_buffer_size * host_batch)))
  ds = ds.batch(host_batch, drop_remainder=True, batch_fn=None if data.cache else BatchCopy())
  if data.num_workers > 0:
    _mark_absl_flags_parsed()
    if not data.cache:
      ds.enable_shared_memory_output()  # grain does it from 2 workers; 1 would copy again.
    # Small arrays (the crop windows) are pickled: a shared memory segment costs more.
    ds = grain.experimental.WithOptionsIterDataset(
        ds, grain.experimental.DatasetOptions(min_shm_size=_MIN_SHARED_MEMORY_BYTES))
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data.num_workers, per_worker_buffer_size=data.prefetch_buffer_size))
  if data.cache:
    ds = ds.map(CropBatch(pixels, data.preprocess, data.crop_size))
  return iter(ds)


def close_iterator(iterator) -> None:
  """Closes a grain iterator and every iterator it holds: worker processes end and their
  shared memory is unlinked (else Python reports it as leaked at exit).

  grain's ``mp_prefetch`` hands out an interleave of per-worker iterators whose ``close()``
  does not reach them, so they are found (through grain's attributes) and closed here too.
  """
  pending, seen = [iterator], set()
  while pending:
    it = pending.pop()
    if id(it) in seen or not hasattr(it, 'close'):
      continue
    seen.add(id(it))
    pending.extend(getattr(it, '_parents', ()))
    pending.extend(child for child in getattr(it, '_iterators_in_use', ()) if child is not None)
    it.close()
  _free_shared_memory_synchronously()


def _free_shared_memory_synchronously() -> None:
  """Ends grain's background pool that unlinks freed batches' shared memory, after its queued
  work: batches still held (e.g. by an error's frames) are then unlinked when freed, in the
  freeing thread, so none is left to the exit."""
  array_type = grain_multiprocessing.SharedMemoryArray
  pool = getattr(array_type, '_del_thread_pool', None)
  if pool is not None:
    array_type._del_thread_pool = None  # pylint: disable=protected-access
    pool.close()
    pool.join()


def create_eval_dataset(config: ml_collections.ConfigDict, split: str,
                        source: Optional[datasets.Source] = None) -> grain.MapDataset:
  """The deterministic, random-access evaluation dataset of ``split`` (not sharded).

  Args:
    config: the experiment config.
    split: 'train', 'val' or 'test'.
    source: the split's source (e.g. checked); None to list it from the config.

  Returns:
    A ``MapDataset`` of ``{'A': float32 (crop, crop, input_nc), 'B': float32 (crop, crop,
    output_nc), 'name': str}`` in [-1, 1], both images resized to ``crop_size`` (bicubic),
    no jitter. With ``data.skip_bad_images`` a bad file's element is None
    (``to_iter_dataset()`` leaves those out).
  """
  validate_config(config)
  source = source or datasets.get_source(config, split)
  ds = grain.MapDataset.source(source.records)
  ds = ds.map(DecodeOrSkip(source.decode, config.data.skip_bad_images, len(ds)))
  return ds.map(functools.partial(resize_for_eval, crop_size=config.data.crop_size))


class DevicePrefetch:
  """Keeps the next ``size`` global batches on the devices while the current step runs.

  Each batch's transfer starts when it is queued, so a step never waits on host -> device
  copies when the host keeps up. ``get_state()`` is the wrapped iterator's position after the
  batches handed out so far, not after those still queued: a checkpoint resumes at the first
  batch no step has seen.
  """

  def __init__(self, iterator, mesh, size: int = 2):
    self._iterator = iterator
    self._mesh = mesh
    self._size = size
    self._queue = collections.deque()
    self._state = iterator.get_state()

  def __iter__(self):
    return self

  def __next__(self):
    while len(self._queue) <= self._size:
      batch = parallel.to_global(next(self._iterator), self._mesh)
      self._queue.append((batch, self._iterator.get_state()))
    batch, self._state = self._queue.popleft()
    return batch

  def get_state(self):
    return self._state

  def close(self) -> None:
    self._queue.clear()
    close_iterator(self._iterator)


class EpochShuffle(grain.MapDataset):
  """Each epoch of a repeated dataset in its own order: ``numpy``'s permutation of the epoch,
  drawn from ``(seed, epoch)`` once per epoch and process.

  It stands where grain's ``shuffle()`` would: that one computes each index by cycle-walking
  a Feistel network over a fixed domain, whose cost per element grows as the dataset shrinks
  (on 256-400 files it was a quarter to a third of a cached example's CPU time).
  """

  def __init__(self, parent: grain.MapDataset, seed: int):
    super().__init__(parent)
    self._seed = seed
    self._epoch_order = (-1, None)  # (epoch, permutation): one tuple, swapped whole.

  def __len__(self) -> int:
    return len(self._parent)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    length = len(self._parent)
    epoch, position = divmod(index, length)
    cached_epoch, order = self._epoch_order
    if cached_epoch != epoch:
      order = np.random.default_rng([self._seed, epoch]).permutation(length)
      self._epoch_order = (epoch, order)
    return self._parent[epoch * length + int(order[position])]

  def __str__(self) -> str:
    return f'EpochShuffle(seed={self._seed})'


class HostRows(grain.MapDataset):
  """Process ``process_index``'s rows of every global batch of an infinite dataset.

  Local element ``k`` is global element ``(start_batch + k // h) * global_batch +
  process_index * h + k % h``, with ``h = global_batch // process_count``. Batching the
  local elements by ``h`` gives this process its contiguous slice of each global batch, and
  only its own elements are ever decoded.
  """

  def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int,
               process_count: int, start_batch: int = 0):
    super().__init__(parent)
    self._global_batch = global_batch
    self._host_batch = global_batch // process_count
    self._first_row = process_index * self._host_batch
    self._start_batch = start_batch

  def __len__(self) -> int:
    return len(self._parent)  # Infinite (sys.maxsize), as the repeated parent.

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, row = divmod(index, self._host_batch)
    return self._parent[(self._start_batch + batch) * self._global_batch + self._first_row +
                        row]

  def __str__(self) -> str:
    return (f'HostRows(global_batch={self._global_batch}, host_batch={self._host_batch}, '
            f'first_row={self._first_row}, start_batch={self._start_batch})')


# ---------------------------------------------------------------------------------------
# Transforms (run in the grain workers).


class DecodeOrSkip:
  """Decodes a record; with ``skip_bad_images``, logs each bad file once and yields None.

  Each grain worker process holds its own copy, so counts are per process.
  """

  def __init__(self, decode, skip_bad_images: bool, num_records: int):
    self.decode = decode
    self.skip_bad_images = skip_bad_images
    self.num_records = num_records
    self.skipped = set()  # Error messages (they name the file) of the files skipped here.

  def __call__(self, record: Any) -> dict | None:
    try:
      return self.decode(record)
    except datasets.BadImageError as e:
      if not self.skip_bad_images:
        raise
      if str(e) not in self.skipped:
        self.skipped.add(str(e))
        logging.warning('Skipping bad image (%d of %d files skipped so far, process %d): %s',
                        len(self.skipped), self.num_records, os.getpid(), e)
        if len(self.skipped) == self.num_records:  # Else the pipeline would spin forever.
          raise datasets.BadImageError(
              f'All {self.num_records} images are bad (the last: {e})') from e
      return None


def training_resize(config: ml_collections.ConfigDict):
  """``resize_for_training`` with the config's options (what the data cache stores)."""
  return functools.partial(resize_for_training, preprocess=config.data.preprocess,
                           load_size=config.data.load_size, crop_size=config.data.crop_size)


def resize_for_training(example: dict, *, preprocess: str, load_size: int,
                        crop_size: int) -> dict:
  """The deterministic part of the official training ``--preprocess`` (what the cache stores).

  Args:
    example: ``{'A', 'B', 'name'}``, decoded: PIL images, or arrays (paired ``.npy`` files).
    preprocess: 'resize_and_crop' (bicubic resize to load_size x load_size), 'crop' (none),
      'scale_width' and 'scale_width_and_crop' (width to load_size, height keeping the aspect
      ratio but at least crop_size), 'none' (sides rounded to a multiple of 4).
    load_size: the resize target.
    crop_size: the crop side.

  Returns:
    ``{'A': HWC, 'B': HWC, 'name': str}`` arrays (uint8, or float from ``.npy`` files); B at
    A's size.
  """
  a, b = example['A'], example['B']
  if preprocess == 'resize_and_crop':
    a, b = _resize(a, (load_size, load_size)), _resize(b, (load_size, load_size))
  elif preprocess.startswith('scale_width'):
    w, h = _size(a)
    size = (load_size, int(max(load_size * h / w, crop_size)))
    a, b = _resize(a, size), _resize(b, size)
  elif preprocess == 'none':
    w, h = _size(a)  # As the official __make_power_2 with base 4.
    size = (max(4, int(round(w / 4) * 4)), max(4, int(round(h / 4) * 4)))
    a, b = _resize(a, size), _resize(b, size)
  b = _resize(b, _size(a))  # Paired folders' B may differ in size (aligned halves never do).
  return {'A': _to_array(a), 'B': _to_array(b), 'name': example['name']}


def jitter(example: dict, rng: np.random.Generator, *, resize, preprocess: str,
           crop_size: int, flip: bool) -> dict:
  """The official training preprocessing: ``resize``, then one random crop and flip for A, B.

  Args:
    example: ``{'A', 'B', 'name'}``: decoded images (PIL, or arrays from paired ``.npy``
      files).
    rng: grain's per-element generator.
    resize: ``resize_for_training`` with the config's options.
    preprocess: the official option (those with 'crop' crop; the others do not).
    crop_size: the crop side.
    flip: random horizontal flip.

  Returns:
    ``{'A': HWC, 'B': HWC}``: views (cropped, reversed when flipped) of the uint8 pixels,
    or of float ``.npy`` arrays in [-1, 1]; ``BatchCopy`` makes the batch of them.
  """
  example = resize(example)
  a, b = example['A'], example['B']
  window = crop_window(a.shape, b.shape, rng, name=example['name'], preprocess=preprocess,
                       crop_size=crop_size, flip=flip)
  a, b = apply_crop_window(a, b, window, preprocess=preprocess, crop_size=crop_size)
  return {'A': a, 'B': b}


def cached_crop_window(record: dict, rng: np.random.Generator, *, preprocess: str,
                       crop_size: int, flip: bool) -> dict:
  """``jitter``'s draws for a cached example (``data_cache.CachedPixels.record``):
  ``{'index': int, 'window': int (3,)}``, for ``CropBatch`` to apply."""
  window = crop_window(record['shape_A'], record['shape_B'], rng, name=record['name'],
                       preprocess=preprocess, crop_size=crop_size, flip=flip)
  return {'index': np.int64(record['index']), 'window': np.array(window, np.int64)}


def crop_window(shape_a: tuple, shape_b: tuple, rng: np.random.Generator, *, name: str,
                preprocess: str, crop_size: int, flip: bool) -> tuple[int, int, int]:
  """The random crop corner ``(y, x)`` and flip (0 or 1) of one example.

  Drawn in the official order (crop x, crop y, flip), whether or not they are used. Raises
  ``BadImageError`` naming the example when preprocess crops and an image is too small.
  """
  h, w = shape_a[:2]
  x = int(rng.integers(0, max(0, w - crop_size) + 1))
  y = int(rng.integers(0, max(0, h - crop_size) + 1))
  flipped = rng.random() > 0.5 and flip
  if 'crop' in preprocess and min(h, w, *shape_b[:2]) < crop_size:
    raise datasets.BadImageError(f'{name}: {w}x{h} after preprocess={preprocess!r} is '
                                 f'smaller than crop_size={crop_size}')
  return y, x, int(flipped)


def apply_crop_window(a: np.ndarray, b: np.ndarray, window, *, preprocess: str,
                      crop_size: int) -> tuple[np.ndarray, np.ndarray]:
  """A and B cropped (preprocess with 'crop') and flipped by ``crop_window``: views."""
  y, x, flipped = (int(n) for n in window)
  if 'crop' in preprocess:
    a, b = a[y:y + crop_size, x:x + crop_size], b[y:y + crop_size, x:x + crop_size]
  return (a[:, ::-1], b[:, ::-1]) if flipped else (a, b)


class CropBatch:
  """The cached pipeline's last step, in the consuming process: a batch of crop windows
  (``cached_crop_window``) -> ``{'A', 'B'}``, each window's pixels copied once from the
  cache's memory map into the batch (so pixels never cross a process boundary)."""

  def __init__(self, pixels: data_cache.CachedPixels, preprocess: str, crop_size: int):
    self._pixels = pixels
    self._preprocess = preprocess
    self._crop_size = crop_size
    self._copy = BatchCopy()

  def __call__(self, batch: dict) -> dict:
    examples = []
    for index, window in zip(batch['index'], batch['window']):
      a, b = apply_crop_window(*self._pixels.views(int(index)), window,
                               preprocess=self._preprocess, crop_size=self._crop_size)
      examples.append({'A': a, 'B': b})
    return self._copy(examples)


class BatchCopy:
  """grain ``batch_fn``: copies each example's arrays (views: cropped, perhaps reversed, of
  a decoded image or of the cache's memory map) once, into one contiguous batch.

  uint8 stays uint8 (the train step maps it to [-1, 1]); float arrays (``.npy``, in [-1, 1])
  become float32. Under grain's worker processes the batch is written straight into shared
  memory (``enable_shared_memory_output``), so it is not copied again to leave the worker.
  """

  def __init__(self):
    self._shared_memory = False

  def enable_shared_memory_output(self) -> None:
    self._shared_memory = True

  def __call__(self, examples) -> dict:
    return {key: self._stack([example[key] for example in examples]) for key in examples[0]}

  def _stack(self, arrays) -> np.ndarray:
    shape = arrays[0].shape
    if any(array.shape != shape for array in arrays):
      raise ValueError(f'Images of one batch differ in size ({sorted({a.shape for a in arrays})}'
                       '): with a config.data.preprocess that does not crop, every image must '
                       'have the same size (or config.data.batch_size must be 1).')
    dtype = np.uint8 if arrays[0].dtype == np.uint8 else np.float32
    if self._shared_memory:
      out = grain_multiprocessing.SharedMemoryArray((len(arrays),) + shape, dtype)
    else:
      out = np.empty((len(arrays),) + shape, dtype)
    for row, array in zip(out, arrays):
      if array.ndim == 3 and array.strides[1] < 0:
        # A channel at a time: numpy's copy of a reversed row of 3-byte pixels runs its
        # inner loop over the 3 channels, several times slower.
        for channel in range(array.shape[-1]):
          row[..., channel] = array[..., channel]
      else:
        row[...] = array
    return out


def resize_for_eval(example: dict, *, crop_size: int) -> dict:
  """Evaluation preprocessing: both images resized to crop_size (bicubic), in [-1, 1]."""
  size = (crop_size, crop_size)
  return {'A': _to_model(_to_array(_resize(example['A'], size))),
          'B': _to_model(_to_array(_resize(example['B'], size))),
          'name': example['name']}


# Decoded images are PIL images, or (H, W, C) arrays of any channel count (paired .npy files).


def _size(image) -> tuple[int, int]:
  return (image.shape[1], image.shape[0]) if isinstance(image, np.ndarray) else image.size


def _resize(image, size: tuple[int, int]):
  if isinstance(image, np.ndarray):
    return paired.resize(image, size)
  return image if image.size == size else image.resize(size, _BICUBIC)


def _to_array(image) -> np.ndarray:
  array = np.asarray(image)
  return array[..., None] if array.ndim == 2 else array


def _to_model(pixels: np.ndarray) -> np.ndarray:
  """uint8 pixels to float32 in [-1, 1]; float arrays (already in [-1, 1]) as float32."""
  return images.to_float(pixels) if pixels.dtype == np.uint8 else pixels.astype(np.float32)


def _mark_absl_flags_parsed() -> None:
  # grain's worker processes read absl flags. Under absl.app.run they are parsed; elsewhere
  # (notebooks, pytest, scripts) their defaults are what we want.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# ---------------------------------------------------------------------------------------
# Throughput.


def benchmark(config: ml_collections.ConfigDict, num_images: int = 512,
              worker_counts: tuple[int, ...] = (0, 1, 2)) -> list[dict]:
  """Images/s of the training pipeline, without and with the decoded cache, per worker count.

  Measures the config's jitter path (by default 286 -> 256 resize_and_crop) on the config's
  aligned or demo dataset (the demo one in place of Cityscapes). Building the cache, worker
  start-up and the first batches are excluded. ``images_per_sec_per_core`` divides by the CPU
  time the pipeline's processes used (this one and its workers), so it is a per-core rate
  whatever else the machine runs.

  Args:
    config: the experiment config.
    num_images: images timed per configuration (after warm-up).
    worker_counts: the ``num_workers`` values to measure.

  Returns:
    One dict per configuration: ``what``, ``cache``, ``num_workers``, ``images_per_sec``,
    ``images_per_sec_per_core``, ``batch_size`` (host), ``num_images``, ``seconds``,
    ``crop_size``, ``data_dir``.
  """
  config = config.copy_and_resolve_references()
  if config.data.name == 'cityscapes':
    config.data.name, config.data.data_dir = 'demo', ''
  host_batch = config.data.batch_size // jax.process_count()
  num_batches = max(1, num_images // host_batch)
  results = []
  for cache in (False, True):
    for num_workers in worker_counts:
      config.data.cache, config.data.num_workers = cache, num_workers
      iterator = create_train_iterator(config, seed=0)
      for _ in range(max(4, 2 * config.data.prefetch_buffer_size)):  # Fill the buffers.
        next(iterator)
      start, cpu_start = time.perf_counter(), _cpu_seconds()
      for _ in range(num_batches):
        next(iterator)
      seconds, cpu_seconds = time.perf_counter() - start, _cpu_seconds() - cpu_start
      close_iterator(iterator)
      images = num_batches * host_batch
      results.append({'what': 'input', 'cache': cache, 'num_workers': num_workers,
                      'images_per_sec': round(images / seconds, 1),
                      'images_per_sec_per_core': round(images / max(cpu_seconds, 1e-9), 1),
                      'batch_size': host_batch, 'num_images': images,
                      'seconds': round(seconds, 3), 'crop_size': config.data.crop_size,
                      'data_dir': config.data.data_dir or datasets.default_demo_dir()})
      logging.info('Input pipeline, cache=%s, %d workers: %.1f images/s', cache, num_workers,
                   images / seconds)
  return results


def _cpu_seconds() -> float:
  """User + system CPU seconds of this process and its live descendants (Linux /proc)."""
  ticks = os.sysconf('SC_CLK_TCK')
  total, pending = 0.0, [os.getpid()]
  while pending:
    pid = pending.pop()
    try:
      with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime.
      for task in os.listdir(f'/proc/{pid}/task'):
        with open(f'/proc/{pid}/task/{task}/children') as f:
          pending.extend(int(child) for child in f.read().split())
    except (FileNotFoundError, ProcessLookupError):
      pass  # Ended meanwhile.
  return total
