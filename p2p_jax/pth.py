"""Reading PyTorch ``.pth`` files (``torch.save`` of a state_dict) without torch, safely.

A ``.pth`` is a zip of a pickle (``<name>/data.pkl``) and raw storages (``<name>/data/<key>``),
or, before torch 1.6, a stream of pickles followed by the raw storages. The pickle is read by a
restricted unpickler that resolves only the few globals a state_dict needs (``OrderedDict``,
the tensor rebuild functions and the storage classes) to inert stand-ins, so loading a file
never runs code from it; any other global is refused. Tensors come back as numpy arrays.
"""
import dataclasses
import math
import pickle
import zipfile

import ml_dtypes
import numpy as np


class PthError(ValueError):
  """A file that is not a plain PyTorch state_dict, or that tries to load other objects."""


# Element type of each storage class that torch pickles (``torch.FloatStorage``, ...).
_STORAGE_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_, 'UntypedStorage': np.uint8,
}
# Legacy (pre-zip) files begin with these two pickled values.
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


@dataclasses.dataclass(frozen=True)
class _StorageClass:
  """Stands in for ``torch.FloatStorage`` & co.: only its element type matters."""
  name: str
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Storage:
  """A storage named in the pickle: ``numel`` elements from ``offset`` of record ``key``."""
  key: str
  dtype: np.dtype
  numel: int
  offset: int = 0


@dataclasses.dataclass(frozen=True)
class _TensorRef:
  """A tensor view of a storage, materialised once all storages are read."""
  storage: _Storage
  offset: int
  size: tuple
  stride: tuple


class _StateDict(dict):
  """Stands in for ``collections.OrderedDict`` (a dict keeps the order too)."""

  def __setstate__(self, state):
    pass  # torch pickles the state_dict's ``_metadata`` (module versions) here; unneeded.


def _is_int_tuple(value) -> bool:
  return isinstance(value, tuple) and all(isinstance(v, int) and v >= 0 for v in value)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """Stands in for ``torch._utils._rebuild_tensor{,_v2}``; ignores requires_grad, hooks."""
  if not (isinstance(storage, _Storage) and isinstance(storage_offset, int)
          and storage_offset >= 0 and _is_int_tuple(size) and _is_int_tuple(stride)
          and len(size) == len(stride)):
    raise pickle.UnpicklingError(f'malformed tensor: offset {storage_offset!r}, size '
                                 f'{size!r}, stride {stride!r}')
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
  """Stands in for ``torch._utils._rebuild_parameter``: a Parameter is its data."""
  return data


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the globals a state_dict needs; any other global is refused."""

  def __init__(self, file, source: str):
    super().__init__(file)
    self.source = source
    self.storages = {}  # key -> _Storage, as named by the pickle's persistent ids.

  def find_class(self, module: str, name: str):
    if (module, name) == ('collections', 'OrderedDict'):
      return _StateDict
    if module == 'torch._utils' and name in ('_rebuild_tensor', '_rebuild_tensor_v2'):
      return _rebuild_tensor
    if (module, name) == ('torch._utils', '_rebuild_parameter'):
      return _rebuild_parameter
    if module in ('torch', 'torch.cuda', 'torch.storage') and name in _STORAGE_DTYPES:
      return _StorageClass(name, np.dtype(_STORAGE_DTYPES[name]))
    raise PthError(f'{self.source}: refusing to load global {module}.{name}: a PyTorch '
                   'state_dict needs only tensors, so this file is not one (or is malicious).')

  def persistent_load(self, pid):
    # Zip format: ('storage', class, key, location, numel); legacy adds view metadata.
    view = pid[5] if isinstance(pid, tuple) and len(pid) == 6 else None
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == 'storage'
            and isinstance(pid[1], _StorageClass) and _is_int_tuple(pid[4:5])
            and (view is None or (isinstance(view, tuple) and len(view) == 3
                                  and _is_int_tuple(view[1:])))):
      raise PthError(f'{self.source}: unexpected persistent id {pid!r}')
    _, storage_class, key, _, numel = pid[:5]
    storage = self.storages.setdefault(str(key), _Storage(str(key), storage_class.dtype, numel))
    if view is not None:  # Legacy storage view: (view key, offset, size) into `storage`.
      view_key, offset, view_numel = view
      storage = _Storage(storage.key, storage.dtype, view_numel, offset)
      self.storages.setdefault(str(view_key), storage)
    return storage


def _materialise(obj, buffers: dict, source: str):
  """Replaces every _TensorRef in ``obj`` (nested dicts/lists/tuples) by a numpy array."""
  if isinstance(obj, dict):
    return {k: _materialise(v, buffers, source) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v, buffers, source) for v in obj)
  if not isinstance(obj, _TensorRef):
    return obj
  data = buffers[obj.storage.key]
  start = obj.storage.offset + obj.offset
  # Bounds-check the view first: as_strided itself would read past the buffer.
  last = start + sum((n - 1) * s for n, s in zip(obj.size, obj.stride))
  if math.prod(obj.size) and last >= min(data.size, obj.storage.offset + obj.storage.numel):
    raise PthError(f'{source}: tensor of size {obj.size} at offset {start} runs past its '
                   f'storage {obj.storage.key!r} ({obj.storage.numel} elements)')
  array = np.lib.stride_tricks.as_strided(
      data[start:], shape=obj.size, strides=[s * data.itemsize for s in obj.stride],
      writeable=False) if math.prod(obj.size) else np.zeros(obj.size, data.dtype)
  return np.array(array, dtype=data.dtype.newbyteorder('='), order='C')  # Keeps 0-d as 0-d.


def _storage_buffer(raw: bytes, storage: _Storage, byteorder: str, source: str) -> np.ndarray:
  dtype = storage.dtype.newbyteorder('<' if byteorder == 'little' else '>')
  if len(raw) < (storage.offset + storage.numel) * dtype.itemsize:
    raise PthError(f'{source}: storage {storage.key!r} has {len(raw)} bytes, fewer than its '
                   f'{storage.numel} {storage.dtype} elements')
  return np.frombuffer(raw, dtype, count=len(raw) // dtype.itemsize)


def _load_zip(path: str):
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith('/data.pkl') and n.count('/') == 1]
    if len(pickles) != 1:
      raise PthError(f'{path}: a zip but not a PyTorch checkpoint (no <name>/data.pkl)')
    prefix = pickles[0][:-len('data.pkl')]
    byteorder = 'little'  # Files without the record predate big-endian support.
    if prefix + 'byteorder' in names:
      byteorder = archive.read(prefix + 'byteorder').decode().strip()
      if byteorder not in ('little', 'big'):
        raise PthError(f'{path}: unknown byte order {byteorder!r}')
    unpickler = _RestrictedUnpickler(archive.open(pickles[0]), path)
    obj = unpickler.load()
    buffers = {}
    for key, storage in unpickler.storages.items():
      record = f'{prefix}data/{storage.key}'
      if record not in names:
        raise PthError(f'{path}: the pickle names storage {storage.key!r}, but there is no '
                       f'record {record}')
      buffers[key] = _storage_buffer(archive.read(record), storage, byteorder, path)
  return _materialise(obj, buffers, path)


def _load_legacy(path: str):
  """The pre-1.6 format: magic, protocol, sys_info, the object, the storage keys, storages."""
  with open(path, 'rb') as f:
    header = [_RestrictedUnpickler(f, path).load() for _ in range(3)]
    if header[0] != _LEGACY_MAGIC or header[1] != _LEGACY_PROTOCOL:
      raise PthError(f'{path}: not a PyTorch checkpoint (neither a zip nor a legacy '
                     'torch.save stream)')
    byteorder = 'little' if header[2].get('little_endian', True) else 'big'
    unpickler = _RestrictedUnpickler(f, path)
    obj = unpickler.load()
    keys = _RestrictedUnpickler(f, path).load()
    roots = {}
    for key in keys:  # Each: int64 element count, then the elements.
      storage = unpickler.storages[str(key)]
      numel = int(np.frombuffer(f.read(8), '<i8' if byteorder == 'little' else '>i8')[0])
      raw = f.read(numel * storage.dtype.itemsize)
      roots[str(key)] = _storage_buffer(raw, _Storage(key, storage.dtype, numel), byteorder,
                                        path)
  buffers = {key: roots[s.key] for key, s in unpickler.storages.items()}
  return _materialise(obj, buffers, path)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a PyTorch ``state_dict`` saved with ``torch.save``, without torch and safely.

  Args:
    path: a ``.pth`` file (zip format, or the legacy pre-1.6 format). A leading ``module.``
      (DataParallel) is stripped from the keys; a dict holding a ``'state_dict'`` is unwrapped.

  Returns:
    ``{torch key: numpy array}`` in file order, with torch's dtypes (float32, int64, ...).

  Raises:
    PthError: the file is not a plain state_dict, or names a global other than
      OrderedDict, the tensor rebuild functions and the storage classes.
  """
  try:
    obj = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
  except PthError:
    raise
  except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, AttributeError, KeyError,
          TypeError, ValueError) as e:
    raise PthError(f'{path}: not a readable PyTorch checkpoint: {e!r}') from e
  if isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict):
    obj = obj['state_dict']
  if not (isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, np.ndarray)
                                        for k, v in obj.items())):
    raise PthError(f'{path}: holds a {type(obj).__name__}, not a state_dict of tensors')
  return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in obj.items()}
