"""grain pipelines: batches, jitter, epochs, checkpointable state, sharding, bad files."""
import json
import os

import jax
import numpy as np
import pytest
from absl import logging
from PIL import Image

from conftest import set_field
from p2p_jax import datasets, input_pipeline, parallel


def _ids(batch):
  """The source index of each example: blue is 16 * index in every pixel (see conftest)."""
  blue = batch['A'][..., 2].astype(np.float64).mean(axis=(1, 2))
  return [int(round(b / 16)) for b in blue]


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a['A'], b['A'])
    np.testing.assert_array_equal(a['B'], b['B'])


def test_train_batches_have_the_host_batch_shape_dtype_and_range(aligned_config):
  aligned_config.data.input_nc = 1
  batch = next(input_pipeline.create_train_iterator(aligned_config, seed=0))
  assert set(batch) == {'A', 'B'}
  assert batch['A'].shape == (2, 32, 32, 1) and batch['B'].shape == (2, 32, 32, 3)
  assert batch['A'].dtype == batch['B'].dtype == np.uint8  # The train step maps to [-1, 1].
  assert batch['B'].min() < 15 and batch['B'].max() > 240


def test_each_epoch_covers_every_example_once_in_a_new_order(aligned_config):
  aligned_config.data.batch_size = 1
  iterator = input_pipeline.create_train_iterator(aligned_config, seed=0)
  epochs = [[_ids(b)[0] for b in _take(iterator, 6)] for _ in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(6))
  assert len({tuple(e) for e in epochs}) == 3


def test_the_seed_alone_decides_the_batches(aligned_config):
  first = _take(input_pipeline.create_train_iterator(aligned_config, seed=1), 4)
  again = _take(input_pipeline.create_train_iterator(aligned_config, seed=1), 4)
  other = _take(input_pipeline.create_train_iterator(aligned_config, seed=2), 4)
  _assert_same_batches(first, again)
  assert any(not np.array_equal(a['A'], b['A']) for a, b in zip(first, other))


@pytest.mark.parametrize('num_workers', [0, 1])
def test_restored_iterator_yields_exactly_the_same_batches(aligned_config, num_workers):
  aligned_config.data.num_workers = num_workers
  iterator = input_pipeline.create_train_iterator(aligned_config, seed=0)
  _take(iterator, 4)  # Into the second epoch.
  state = json.loads(json.dumps(iterator.get_state()))  # As the checkpoint stores it.
  expected = _take(iterator, 5)
  restored = input_pipeline.create_train_iterator(aligned_config, seed=0)
  restored.set_state(state)
  _assert_same_batches(expected, _take(restored, 5))
  for it in (iterator, restored):
    it.close()


def test_jitter_crops_and_flips_a_and_b_identically_and_does_flip(aligned_config):
  # The halves of every test image are equal, so any difference comes from the jitter.
  iterator = input_pipeline.create_train_iterator(aligned_config, seed=0)
  batches = _take(iterator, 12)
  for batch in batches:
    np.testing.assert_array_equal(batch['A'], batch['B'])
  red_slope = [np.sign(int(a[0, -1, 0]) - int(a[0, 0, 0])) for b in batches for a in b['A']]
  assert set(red_slope) == {-1, 1}  # Red ramps up left to right unless flipped.
  offsets = {a[0, 0, 1] for b in batches for a in b['A']}  # Green at the top: crop y.
  assert len(offsets) > 1


def test_no_flip_keeps_orientation(aligned_config):
  aligned_config.data.flip = False
  batch = next(input_pipeline.create_train_iterator(aligned_config, seed=0))
  assert (batch['A'][:, 0, -1, 0] > batch['A'][:, 0, 0, 0]).all()


@pytest.mark.parametrize('preprocess,load_size,shape', [
    ('resize_and_crop', 36, (32, 32)),
    ('crop', 36, (24, 24)),
    ('scale_width', 40, (40, 40)),
    ('scale_width_and_crop', 40, (24, 24)),
    ('none', 36, (32, 32)),
])
def test_preprocess_options_give_the_official_sizes(aligned_config, preprocess, load_size,
                                                    shape):
  aligned_config.data.preprocess = preprocess
  aligned_config.data.load_size = load_size
  aligned_config.data.crop_size = 24 if 'crop' in preprocess and preprocess != 'resize_and_crop' else 32
  batch = next(input_pipeline.create_train_iterator(aligned_config, seed=0))
  assert batch['A'].shape == (2, *shape, 3)


def test_crop_larger_than_the_image_is_an_error(aligned_config):
  aligned_config.data.preprocess = 'crop'
  aligned_config.data.crop_size = 48
  with pytest.raises(datasets.BadImageError, match='smaller than crop_size=48'):
    next(input_pipeline.create_train_iterator(aligned_config, seed=0))


def test_eval_dataset_is_deterministic_resized_and_named(aligned_config):
  aligned_config.data.crop_size = 16
  aligned_config.data.input_nc = 1
  dataset = input_pipeline.create_eval_dataset(aligned_config, 'val')
  assert len(dataset) == input_pipeline.num_examples(aligned_config, 'val') == 2
  example = dataset[1]
  assert example['name'] == '001'
  assert example['A'].shape == (16, 16, 1) and example['B'].shape == (16, 16, 3)
  expected = Image.open(os.path.join(aligned_config.data.data_dir, 'val', '001.png'))
  expected = expected.crop((32, 0, 64, 32)).resize((16, 16), Image.Resampling.BICUBIC)
  np.testing.assert_allclose(example['B'], np.asarray(expected) / 127.5 - 1, atol=1e-6)
  np.testing.assert_array_equal(dataset[1]['B'], example['B'])


@pytest.mark.parametrize('option,value,match', [
    ('data.preprocess', 'resize', 'config.data.preprocess=.*must be one of'),
    ('data.direction', 'AtoC', 'config.data.direction=.*AtoB'),
    ('data.input_nc', 2, 'config.data.input_nc=2'),
    ('data.batch_size', 0, 'config.data.batch_size=0'),
    ('data.num_workers', -1, 'config.data.num_workers=-1'),
    ('data.crop_size', 64, 'config.data.crop_size=64: must be <= config.data.load_size'),
])
def test_invalid_options_are_errors_naming_the_option(aligned_config, option, value, match):
  set_field(aligned_config, option, value)
  with pytest.raises(ValueError, match=match):
    input_pipeline.create_train_iterator(aligned_config, seed=0)


def test_processes_read_contiguous_slices_of_the_single_process_global_batches(
    aligned_config, monkeypatch):
  # Global batches of 4 from 6 examples: the slices run across epoch boundaries.
  aligned_config.data.batch_size = 4
  single = _take(input_pipeline.create_train_iterator(aligned_config, seed=0), 4)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  slices = []
  for index in (0, 1):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    slices.append(_take(input_pipeline.create_train_iterator(aligned_config, seed=0), 4))
  assert slices[1][0]['A'].shape[0] == 2
  joined = [{k: np.concatenate([first[k], second[k]]) for k in first}
            for first, second in zip(*slices)]
  _assert_same_batches(single, joined)
  aligned_config.data.batch_size = 3
  with pytest.raises(ValueError, match='config.data.batch_size=3.*2 processes'):
    input_pipeline.create_train_iterator(aligned_config, seed=0)


def test_start_step_resumes_at_that_global_batch(aligned_config):
  batches = _take(input_pipeline.create_train_iterator(aligned_config, seed=0), 5)
  started = input_pipeline.create_train_iterator(aligned_config, seed=0, start_step=3)
  _assert_same_batches(batches[3:], _take(started, 2))


def _corrupt(config, name='003.png'):
  path = os.path.join(config.data.data_dir, 'train', name)
  with open(path, 'wb') as f:
    f.write(b'not a png')
  return path


def test_a_bad_file_is_an_error_naming_it_by_default(aligned_config):
  path = _corrupt(aligned_config)
  with pytest.raises(datasets.BadImageError, match=f'{path}: not an image'):
    input_pipeline.create_train_iterator(aligned_config, seed=0)  # Building the cache.
  aligned_config.data.cache = False
  iterator = input_pipeline.create_train_iterator(aligned_config, seed=0)
  with pytest.raises(datasets.BadImageError, match=f'{path}: not an image'):
    _take(iterator, 3)


def test_a_bad_file_is_an_error_naming_it_from_a_worker_process(aligned_config):
  path = _corrupt(aligned_config)
  aligned_config.data.num_workers = 1
  aligned_config.data.cache = False  # Decoded in the worker.
  iterator = input_pipeline.create_train_iterator(aligned_config, seed=0)
  with pytest.raises(datasets.BadImageError, match=f'{path}: not an image'):
    _take(iterator, 3)
  iterator.close()


def test_skip_bad_images_skips_them_and_logs_each_once(aligned_config, monkeypatch):
  path = _corrupt(aligned_config)
  aligned_config.data.skip_bad_images = True
  aligned_config.data.batch_size = 1
  aligned_config.data.cache = False  # Skipped as the shuffle reaches it (see test_data_cache).
  warnings = []
  monkeypatch.setattr(logging, 'warning', lambda msg, *args: warnings.append(msg % args))
  iterator = input_pipeline.create_train_iterator(aligned_config, seed=0)
  ids = [_ids(b)[0] for b in _take(iterator, 15)]  # Three epochs of the five good files.
  assert sorted(ids) == sorted([0, 1, 2, 4, 5] * 3)
  assert len(warnings) == 1 and path in warnings[0] and '1 of 6 files skipped' in warnings[0]
  evaluation = input_pipeline.create_eval_dataset(aligned_config, 'train')
  assert evaluation[3] is None and len(list(evaluation.to_iter_dataset())) == 5


def test_skip_bad_images_with_only_bad_files_is_an_error_not_a_hang(aligned_config):
  aligned_config.data.skip_bad_images = True
  for name in sorted(os.listdir(os.path.join(aligned_config.data.data_dir, 'train'))):
    _corrupt(aligned_config, name)
  with pytest.raises(datasets.BadImageError, match='All 6 images are bad'):
    next(input_pipeline.create_train_iterator(aligned_config, seed=0))


def test_demo_dataset_trains_through_the_aligned_loader(demo_dir, aligned_config):
  aligned_config.data.name = 'demo'
  aligned_config.data.data_dir = demo_dir
  assert input_pipeline.num_examples(aligned_config, 'train') == 600
  batch = next(input_pipeline.create_train_iterator(aligned_config, seed=0))
  assert batch['A'].shape == (2, 32, 32, 3)


def test_device_prefetch_yields_the_batches_and_saves_the_position_of_those_handed_out(
    aligned_config):
  mesh = parallel.create_mesh()
  expected = _take(input_pipeline.create_train_iterator(aligned_config, seed=0), 6)
  batches = input_pipeline.DevicePrefetch(
      input_pipeline.create_train_iterator(aligned_config, seed=0), mesh, size=2)
  first = [jax.device_get(b) for b in _take(batches, 3)]  # 5 pulled, 3 handed out.
  state = json.loads(json.dumps(batches.get_state()))
  restored = input_pipeline.create_train_iterator(aligned_config, seed=0)
  restored.set_state(state)
  _assert_same_batches(expected, first + _take(restored, 3))
  assert isinstance(next(batches)['A'], jax.Array)
  batches.close()
