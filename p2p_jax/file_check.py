"""Every file of a split decoded once before the first step: bad files are found up front.

Each record is decoded exactly as the pipeline will decode it (a full PIL decode, so a
truncated JPEG shows, plus the source's geometry and channel checks), in a pool of threads over
the host's cores. The bad files are an error listing them, or, with
``config.data.skip_bad_images``, left out of the source before shuffling, so that the batches
stay deterministic and the same on every process count. The result is cached in
``WORKDIR/data_check/<split>.json``, keyed by the decode settings and every file's path, size
and modification time, so a resume does not decode the files again. The bad files of a split
are listed in ``WORKDIR/bad_files_<split>.txt``.

With ``config.data.cache`` the training split is checked by building its decoded cache
(``data_cache.bad_records``), which decodes every file the same way: a first run decodes each
file once. TFDS sources (Cityscapes) are checked when TFDS builds them, not here.
"""
import concurrent.futures
import functools
import hashlib
import json
import os
from typing import Callable, Optional

import ml_collections
from absl import logging
from etils import epath

from p2p_jax import datasets

CACHE_DIR = 'data_check'
MAX_LISTED = 20  # Bad files named in the error message; the file lists all of them.


def checked_source(
    source: datasets.Source, config: ml_collections.ConfigDict, split: str,
    workdir: Optional[str], is_writer: bool = True,
    check: Optional[Callable[[datasets.Source], list]] = None) -> datasets.Source:
  """``source`` with every file checked: unchanged, or without its bad files.

  Args:
    source: the split's source; sources without ``files`` (TFDS) are returned as they are.
    config: reads ``config.data.skip_bad_images``.
    split: the split's name, for messages and the cache.
    workdir: where the cache and ``bad_files.txt`` go; None for neither.
    is_writer: whether this process writes them (process 0 of several).
    check: ``source -> [(index, reason)]`` of the bad records; None: ``check_records`` (a
      decode of every file). The training split's data cache build is one too.

  Returns:
    The source, with the bad files left out where ``skip_bad_images`` allows it.

  Raises:
    ValueError: bad files (without ``skip_bad_images``, or when every file is bad).
  """
  if source.files is None:
    return source
  key = _cache_key(source)
  cache = epath.Path(workdir) / CACHE_DIR / f'{split}.json' if workdir else None
  bad = _read_cache(cache, key)
  if bad is None:
    bad = (check or check_records)(source)
    if cache is not None and is_writer:
      _write_atomically(cache, json.dumps({'key': key, 'bad': bad}))
  else:
    logging.info('Files of split %r checked before (%s): %d bad.', split, cache, len(bad))
  if not bad:
    return source
  lines = [_named(source.files(source.records[i]), reason) for i, reason in bad]
  listing = epath.Path(workdir) / f'bad_files_{split}.txt' if workdir else None
  if listing is not None and is_writer:
    _write_atomically(listing, ''.join(f'{line}\n' for line in lines))
  where = f'; all of them are listed in {listing}' if listing is not None else ''
  skip = config.data.skip_bad_images
  if skip and len(bad) < len(source.records):
    logging.warning('Left out %d bad file(s) of %d in split %r (config.data.skip_bad_images)'
                    '%s. The first: %s', len(bad), len(source.records), split, where, lines[0])
    left_out = {i for i, _ in bad}
    return datasets.Source(
        records=[r for i, r in enumerate(source.records) if i not in left_out],
        decode=source.decode, files=source.files)
  shown = '\n  '.join(lines[:MAX_LISTED])
  more = f'\n  ... and {len(lines) - MAX_LISTED} more' if len(lines) > MAX_LISTED else ''
  hint = ('every file is bad' if skip else
          'fix or remove them, or set config.data.skip_bad_images=True to leave them out')
  raise ValueError(f'{len(bad)} of {len(source.records)} files of split {split!r} cannot be '
                   f'used ({hint}){where}:\n  {shown}{more}')


def check_records(source: datasets.Source,
                  num_threads: Optional[int] = None) -> list[tuple[int, str]]:
  """Decodes every record of ``source``; returns ``(index, reason)`` of the bad ones.

  Threads, not processes: PIL decodes without the GIL, so they use every core without a
  process start or pickling per file.

  Args:
    source: a file source.
    num_threads: decoding threads (None: one per core; 0 or 1: this thread).
  """
  records = source.records
  num_threads = (os.cpu_count() or 1) if num_threads is None else num_threads
  if num_threads <= 1:
    reasons = [_reason(source.decode, r) for r in records]
  else:
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      reasons = list(pool.map(functools.partial(_reason, source.decode), records))
  return [(i, reason) for i, reason in enumerate(reasons) if reason is not None]


def _reason(decode, record) -> Optional[str]:
  """What is wrong with ``record`` (the error naming its file), or None if it decodes."""
  try:
    decode(record)
  except datasets.BadImageError as e:
    return str(e)
  return None


def _named(files: tuple, reason: str) -> str:
  """The reason, prefixed with the record's files unless it already names one."""
  return reason if any(path in reason for path in files) else f'{", ".join(files)}: {reason}'


def decode_settings(decode) -> str:
  """The decode function and its arguments, by name (a repr would hold memory addresses)."""
  args = ()
  if isinstance(decode, functools.partial):
    decode, args = decode.func, (decode.args, sorted(decode.keywords.items()))
  return f'{decode.__module__}.{decode.__qualname__}{args}'


def _cache_key(source: datasets.Source) -> str:
  """A hash of the decode settings and each file's path, size and modification time."""
  digest = hashlib.sha256(decode_settings(source.decode).encode())
  for record in source.records:
    for path in source.files(record):
      try:
        stat = os.stat(path) if '://' not in path else None
        digest.update(f'{path}\0{stat and stat.st_size}\0{stat and stat.st_mtime_ns}\n'.encode())
      except OSError:  # A missing file: decoding it names it.
        digest.update(f'{path}\0missing\n'.encode())
  return digest.hexdigest()


def _read_cache(cache: Optional[epath.Path], key: str) -> Optional[list]:
  if cache is None or not cache.exists():
    return None
  try:
    saved = json.loads(cache.read_text())
  except (OSError, ValueError):  # A damaged cache is only a reason to check again.
    return None
  if saved.get('key') != key:
    return None
  return [(int(i), str(reason)) for i, reason in saved['bad']]


def _write_atomically(path: epath.Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f'.{path.name}.{os.getpid()}.tmp'
  tmp.write_text(text)
  tmp.replace(path)
