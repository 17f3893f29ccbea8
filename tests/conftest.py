"""Shared test fixtures: configs loaded from configs/*.py by path, as the CLI does."""
import importlib.util
import os
import struct
import tempfile
import zipfile

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The decoded-image cache (and anything else under the user cache) of the tests and of the
# trainers they start goes to a temporary folder, never to the user's home.
os.environ['XDG_CACHE_HOME'] = tempfile.mkdtemp(prefix='p2p_jax_test_cache_')


def load_config(name: str = 'default'):
  """``get_config()`` of ``configs/<name>.py``."""
  path = os.path.join(REPO_ROOT, 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'configs_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.lock()  # As the CLI: a misspelt or removed field is an error, not a new field.
  return config


# The tiny shapes every training test runs at: a 5-level U-Net (unet_32), ngf/ndf 8, 32 px.
TINY = {'model.netG': 'unet_32', 'model.ngf': 8, 'model.ndf': 8, 'data.load_size': 36,
        'data.crop_size': 32, 'data.batch_size': 2, 'data.num_workers': 0,
        'data.prefetch_buffer_size': 2, 'log_every_steps': 5, 'image_every_steps': 1000,
        'max_to_keep': 2}


def make_tiny_config(**overrides):
  """The default config at ``TINY`` shapes, then ``overrides`` (``{'model.ngf': 4}`` style)."""
  config = load_config('default')
  for key, value in {**TINY, **overrides}.items():
    set_field(config, key, value)
  return config


def set_field(config, key: str, value) -> None:
  """Sets the dotted field ``key`` (``'model.ngf'``) of ``config``."""
  *parents, name = key.split('.')
  node = config
  for parent in parents:
    node = node[parent]
  node[name] = value


def tiny_flags(**overrides) -> list:
  """The same settings as ``--config.<field>=<value>`` flags, for the CLI."""
  return [f'--config.{key}={value}' for key, value in {**TINY, **overrides}.items()]


@pytest.fixture
def tiny_config():
  return make_tiny_config()


def write_ab_image(path: str, index: int, side: int = 32) -> None:
  """Writes an A|B test image whose halves are identical, asymmetric and tagged by index.

  Each half holds red = x ramp, green = y ramp, blue = 16 * index (constant), so a crop or
  flip shows in red/green, and blue survives resizing to identify the source file.
  """
  y, x = np.mgrid[:side, :side]
  half = np.stack([x * 255 // (side - 1), y * 255 // (side - 1),
                   np.full_like(x, 16 * index)], axis=-1).astype(np.uint8)
  Image.fromarray(np.concatenate([half, half], axis=1)).save(path)


def write_aligned_dataset(root: str, counts=(('train', 6), ('val', 2), ('test', 2)),
                          side: int = 32, ext: str = '.png') -> str:
  """An aligned dataset of ``write_ab_image`` files: ``root/{split}/{index:03d}{ext}``."""
  for split, count in counts:
    os.makedirs(os.path.join(root, split), exist_ok=True)
    for i in range(count):
      write_ab_image(os.path.join(root, split, f'{i:03d}{ext}'), i, side)
  return root


@pytest.fixture
def aligned_config(tmp_path):
  """The tiny config on a tiny aligned dataset: 32 px halves, load 36, crop 32, batch 2."""
  config = make_tiny_config()
  config.data.data_dir = write_aligned_dataset(str(tmp_path / 'aligned'))
  return config


def save_random_generator(workdir: str, config, step: int) -> None:
  """Random generator variables of ``config``'s structure, saved as a checkpoint at ``step``."""
  import jax
  from p2p_jax import checkpointing, models
  generator = models.create_generator(config.model, config.data.output_nc)
  size = config.data.crop_size
  # Numpy values in the eval_shape structure: an eager flax init compiles op by op (slow).
  abstract = jax.eval_shape(lambda: models.init_variables(
      generator, jax.random.PRNGKey(0), (1, size, size, config.data.input_nc)))
  rng = np.random.default_rng(1)
  variables = {
      'params': jax.tree.map(lambda x: rng.normal(0, 0.1, x.shape).astype(x.dtype),
                             abstract['params']),
      # Non-trivial running statistics, so that 'eval' and 'paper' modes differ.
      'batch_stats': jax.tree.map(lambda x: rng.uniform(0.1, 1, x.shape).astype(x.dtype),
                                  abstract['batch_stats'])}
  checkpointing.save_generator(workdir, step, config, variables)


@pytest.fixture(scope='session')
def demo_dir(tmp_path_factory):
  """The demo dataset, written once per test session."""
  from p2p_jax import datasets
  return datasets.prepare_demo(str(tmp_path_factory.mktemp('demo') / 'demo'))


def _pickle_text(s: str) -> bytes:
  data = s.encode()
  return b'X' + struct.pack('<I', len(data)) + data  # BINUNICODE


def _pickle_ints(values) -> bytes:
  return b'(' + b''.join(b'J' + struct.pack('<i', v) for v in values) + b't'


def write_pth(path: str, state_dict: dict) -> str:
  """Writes ``{key: float32 array}`` as torch.save lays a state_dict out (no torch): a zip of
  a protocol-2 pickle and one little-endian storage per tensor, each contiguous."""
  pkl = b'\x80\x02ccollections\nOrderedDict\n)R('
  with zipfile.ZipFile(path, 'w') as archive:
    for i, (key, value) in enumerate(state_dict.items()):
      value = np.ascontiguousarray(value, '<f4')
      strides = [s // 4 for s in value.strides]
      pid = (b'(' + _pickle_text('storage') + b'ctorch\nFloatStorage\n' + _pickle_text(str(i))
             + _pickle_text('cpu') + b'J' + struct.pack('<i', value.size) + b'tQ')
      pkl += (_pickle_text(key) + b'ctorch._utils\n_rebuild_tensor_v2\n(' + pid
              + b'J\x00\x00\x00\x00' + _pickle_ints(value.shape) + _pickle_ints(strides) + b'\x89)tR')
      archive.writestr(f'archive/data/{i}', value.tobytes())
    archive.writestr('archive/data.pkl', pkl + b'u.')
    archive.writestr('archive/byteorder', 'little')
  return path
