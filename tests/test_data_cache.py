"""The decoded uint8 cache: the same batches as decoding every epoch, built once, never stale."""
import os
import time

import numpy as np
import pytest
from PIL import Image

from p2p_jax import data_cache, datasets, input_pipeline


def _take(config, n, num_workers=0, state=None):
  config.data.num_workers = num_workers
  iterator = input_pipeline.create_train_iterator(config, seed=0)
  if state is not None:
    iterator.set_state(state)
  batches = [next(iterator) for _ in range(n)]
  state = iterator.get_state()
  if hasattr(iterator, 'close'):
    iterator.close()
  return batches, state


def _assert_same(first, second):
  for a, b in zip(first, second, strict=True):
    np.testing.assert_array_equal(a['A'], b['A'])
    np.testing.assert_array_equal(a['B'], b['B'])


def _cache_folders(config):
  root = config.data.cache_dir
  return sorted(f for f in os.listdir(root) if os.path.isdir(os.path.join(root, f)))


@pytest.mark.parametrize('preprocess, load_size', [('resize_and_crop', 36),
                                                   ('scale_width_and_crop', 40)])
def test_cached_batches_are_bit_identical_to_decoding_every_epoch(aligned_config, tmp_path,
                                                                  preprocess, load_size):
  aligned_config.data.preprocess, aligned_config.data.load_size = preprocess, load_size
  aligned_config.data.cache_dir = str(tmp_path / 'cache')
  aligned_config.data.cache = False
  uncached, state = _take(aligned_config, 9)  # 3 epochs: reshuffled and re-jittered.
  aligned_config.data.cache = True
  cached, cached_state = _take(aligned_config, 9)
  _assert_same(uncached, cached)
  # 2 workers read other batches (grain splits the elements between them), the same ones
  # whether the workers send crop windows (cached) or write pixels into shared memory.
  cached_by_two = _take(aligned_config, 9, num_workers=2)[0]
  aligned_config.data.cache = False
  _assert_same(_take(aligned_config, 9, num_workers=2)[0], cached_by_two)
  aligned_config.data.cache = True
  assert len(_cache_folders(aligned_config)) == 1  # Built once, then reused.
  # A position saved without the cache resumes with it (and back).
  aligned_config.data.cache = False
  more_uncached, _ = _take(aligned_config, 3, state=cached_state)
  aligned_config.data.cache = True
  more_cached, _ = _take(aligned_config, 3, state=state)
  _assert_same(more_uncached, more_cached)


def test_an_edited_file_or_option_gets_a_new_cache_and_a_stale_one_is_never_read(
    aligned_config, tmp_path):
  aligned_config.data.cache_dir = str(tmp_path / 'cache')
  _take(aligned_config, 1)
  path = os.path.join(aligned_config.data.data_dir, 'train', '000.png')
  pixels = np.asarray(Image.open(path)).copy()
  pixels[..., 1] = 255 - pixels[..., 1]
  Image.fromarray(pixels).save(path)
  os.utime(path, ns=(time.time_ns() + 10**9,) * 2)
  cached, _ = _take(aligned_config, 6)
  aligned_config.data.cache = False
  uncached, _ = _take(aligned_config, 6)
  _assert_same(uncached, cached)
  aligned_config.data.cache = True
  aligned_config.data.load_size = 40
  _take(aligned_config, 1)
  assert len(_cache_folders(aligned_config)) == 3


def test_a_bad_file_fails_the_build_naming_it_or_is_left_out_as_without_the_cache(
    aligned_config, tmp_path):
  aligned_config.data.cache_dir = str(tmp_path / 'cache')
  bad = os.path.join(aligned_config.data.data_dir, 'train', '003.png')
  with open(bad, 'r+b') as f:
    f.truncate(os.path.getsize(bad) // 2)
  with pytest.raises(datasets.BadImageError, match='003.png'):
    input_pipeline.create_train_iterator(aligned_config, seed=0)  # Before any batch.
  assert _cache_folders(aligned_config) == []  # Nothing half-built is left to be reused.
  aligned_config.data.skip_bad_images = True
  cached, _ = _take(aligned_config, 7)
  aligned_config.data.cache = False
  uncached, _ = _take(aligned_config, 7)
  _assert_same(uncached, cached)


def test_cache_folder_holds_the_resized_pixels_once(aligned_config, tmp_path):
  aligned_config.data.cache_dir = str(tmp_path / 'cache')
  source = datasets.get_source(aligned_config, 'train')
  resize = lambda e: input_pipeline.resize_for_training(e, preprocess='resize_and_crop',
                                                        load_size=36, crop_size=32)
  cached = data_cache.get_or_build(aligned_config, 'train', source, resize)
  a, b = cached.views(2)
  expected = resize(source.decode(source.records[2]))
  np.testing.assert_array_equal(a, expected['A'])
  np.testing.assert_array_equal(b, expected['B'])
  assert cached.record(2) == {'index': 2, 'shape_A': (36, 36, 3), 'shape_B': (36, 36, 3),
                              'name': '002'}
  (folder,) = _cache_folders(aligned_config)
  size = os.path.getsize(os.path.join(aligned_config.data.cache_dir, folder, 'pixels.u8'))
  assert size == 6 * 2 * 36 * 36 * 3


def test_a_first_run_decodes_each_training_file_once_its_cache_build_is_the_file_check(
    aligned_config, tmp_path, monkeypatch):
  from p2p_jax import train  # The trainer's checked source, as main builds it.
  aligned_config.data.cache_dir = str(tmp_path / 'cache')
  decoded = []
  decode = datasets.decode_aligned
  monkeypatch.setattr(datasets, 'decode_aligned',
                      lambda path, **kwargs: decoded.append(path) or decode(path, **kwargs))
  source = train._checked_source(aligned_config, 'train', str(tmp_path / 'run'))
  batch = next(input_pipeline.create_train_iterator(aligned_config, seed=0, source=source))
  assert sorted(decoded) == sorted(source.records) and batch['A'].shape[0] == 2
  assert len(_cache_folders(aligned_config)) == 1
  # A truncated file: listed by the same check, and no cache is kept for the split.
  bad = os.path.join(aligned_config.data.data_dir, 'train', '003.png')
  with open(bad, 'r+b') as f:
    f.truncate(os.path.getsize(bad) // 2)
  with pytest.raises(ValueError, match=r"1 of 6 files of split 'train' cannot be used"):
    train._checked_source(aligned_config, 'train', str(tmp_path / 'run'))
  assert len(_cache_folders(aligned_config)) == 1
