"""Paired A/ B/ folders (matched by stem, any sizes) and .npy arrays of any channel count."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_flags
from p2p_jax import datasets, images, input_pipeline, paired
from test_train import main_command, run, saved_steps

SPLITS = (('train', 4), ('val', 1), ('test', 2))


def write_paired_dataset(root, a_file, b_file, splits=SPLITS):
  """``root/{A,B}/<split>/<index>.<ext>`` from ``a_file(path_stem, i)`` / ``b_file``."""
  for split, count in splits:
    for side, write in (('A', a_file), ('B', b_file)):
      os.makedirs(os.path.join(root, side, split), exist_ok=True)
      for i in range(count):
        write(os.path.join(root, side, split, f'{i:03d}'), i)
  return root


def _png(side):
  def write(stem, i):
    rng = np.random.default_rng(i)
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(f'{stem}.png')
  return write


def _npy(channels, dtype):
  def write(stem, i):
    rng = np.random.default_rng(i)
    array = (rng.uniform(-1, 1, (40, 40, channels)).astype(dtype) if dtype != np.uint8 else
             rng.integers(0, 256, (40, 40, channels), dtype=np.uint8))
    np.save(f'{stem}.npy', array)
  return write


def _train_and_eval(tmp_path, data_dir, *overrides):
  workdir = str(tmp_path / 'run')
  flags = tiny_flags(**{'data.name': 'paired', 'data.data_dir': data_dir,
                        'optim.num_train_steps': 2, 'data.num_workers': 1}) + list(overrides)
  result = run(main_command(workdir, 'configs/default.py', *flags))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'leaked' not in result.stderr
  assert saved_steps(workdir) == [2]
  result = run(main_command(workdir, 'configs/default.py', *flags, '--mode=eval'))
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, 'eval', '2', 'metrics.json')) as f:
    assert np.isfinite(json.load(f)['L1'])
  return os.path.join(workdir, 'eval', '2', 'images')


def test_paired_folders_of_different_sizes_train_and_evaluate_through_the_cli(tmp_path):
  data_dir = write_paired_dataset(str(tmp_path / 'data'), _png(48), _png(24))
  image_dir = _train_and_eval(tmp_path, data_dir)
  assert Image.open(os.path.join(image_dir, '001_fake_B.png')).size == (32, 32)


def test_four_channel_npy_to_rgb_trains_and_evaluates_with_rgb_previews(tmp_path):
  data_dir = write_paired_dataset(str(tmp_path / 'data'), _npy(4, np.float32),
                                  _npy(3, np.uint8))
  image_dir = _train_and_eval(tmp_path, data_dir, '--config.data.input_nc=4')
  assert Image.open(os.path.join(image_dir, '000_real_A.png')).mode == 'RGB'


def test_unmatched_stems_are_listed_on_each_side(tmp_path, tiny_config):
  data_dir = write_paired_dataset(str(tmp_path / 'data'), _png(8), _png(8),
                                  splits=(('train', 3),))
  os.remove(os.path.join(data_dir, 'A', 'train', '001.png'))
  _png(8)(os.path.join(data_dir, 'A', 'train', 'extra'), 0)
  with pytest.raises(ValueError, match=r'must hold the same names: only in A: extra; only in '
                     r'B: 001\.'):
    paired.list_pairs(data_dir, 'train')


def test_npy_arrays_keep_their_channels_through_the_pipeline_and_bad_ones_name_the_file(
    tmp_path, tiny_config):
  data_dir = write_paired_dataset(str(tmp_path / 'data'), _npy(2, np.float64),
                                  _npy(5, np.uint8), splits=(('train', 2),))
  tiny_config.data.name, tiny_config.data.data_dir = 'paired', data_dir
  tiny_config.data.input_nc, tiny_config.data.output_nc = 2, 5
  batch = next(input_pipeline.create_train_iterator(tiny_config, seed=0))
  assert batch['A'].shape == (2, 32, 32, 2) and batch['B'].shape == (2, 32, 32, 5)
  assert batch['A'].dtype == np.float32 and np.abs(batch['A']).max() <= 1
  assert images.to_rgb(batch['A']).shape[-1] == 3 and images.to_rgb(batch['B']).shape[-1] == 3
  np.save(os.path.join(data_dir, 'A', 'train', '000.npy'), np.full((8, 8, 2), 2.0))
  with pytest.raises(datasets.BadImageError, match=r'000\.npy: float values must be finite '
                     r'and in \[-1, 1\]'):
    datasets.get_source(tiny_config, 'train').decode(
        paired.list_pairs(data_dir, 'train')[0])
  tiny_config.data.name = 'aligned'
  with pytest.raises(ValueError, match=r"config.data.input_nc=2: must be 1 .* config.data.name="
                     r"'paired'"):
    input_pipeline.validate_config(tiny_config)
