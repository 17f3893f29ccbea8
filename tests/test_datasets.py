"""Sources: aligned A|B decoding, bad-input errors, TFDS Cityscapes from fake zips, the demo."""
import concurrent.futures
import io
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from conftest import load_config, write_aligned_dataset
from p2p_jax import datasets

RED, GREEN = (255, 0, 0), (0, 255, 0)


def _write_pair(path, left=RED, right=GREEN, size=(16, 8), mode='RGB'):
  w, h = size
  image = Image.new('RGB', (w, h), right)
  image.paste(Image.new('RGB', (w // 2, h), left), (0, 0))
  if mode != 'RGB':
    image = image.convert(mode)
  image.save(path)
  return str(path)


def _decode(path, direction='AtoB', input_nc=3, output_nc=3, check_shape=True):
  return datasets.decode_aligned(str(path), direction=direction, input_nc=input_nc,
                                 output_nc=output_nc, check_shape=check_shape)


def _colour(image):
  return tuple(np.asarray(image.convert('RGB'))[0, 0])


def test_aligned_left_half_is_a_right_half_is_b_and_btoa_swaps(tmp_path):
  path = _write_pair(tmp_path / 'x.png')
  example = _decode(path)
  assert (_colour(example['A']), _colour(example['B'])) == (RED, GREEN)
  assert example['A'].size == example['B'].size == (8, 8)
  assert example['name'] == 'x'
  swapped = _decode(path, direction='BtoA')
  assert (_colour(swapped['A']), _colour(swapped['B'])) == (GREEN, RED)


def test_aligned_channels_follow_input_nc_and_output_nc_after_the_swap(tmp_path):
  example = _decode(_write_pair(tmp_path / 'x.png'), direction='BtoA', input_nc=1, output_nc=3)
  assert example['A'].mode == 'L' and example['B'].mode == 'RGB'


@pytest.mark.parametrize('mode', ['L', 'RGBA', 'P', '1', 'LA', 'CMYK'])
def test_other_image_modes_convert_to_the_configured_channels(tmp_path, mode):
  ext = '.tif' if mode == 'CMYK' else '.png'
  path = _write_pair(tmp_path / f'x{ext}', left=(255, 255, 255), right=(0, 0, 0), mode=mode)
  for nc, expected in ((3, 'RGB'), (1, 'L')):
    example = _decode(path, input_nc=nc, output_nc=nc)
    assert example['A'].mode == example['B'].mode == expected
    assert np.asarray(example['A']).min() > 200 and np.asarray(example['B']).max() < 50


def test_16_bit_images_are_scaled_to_8_bits_not_clipped(tmp_path):
  values = np.zeros((8, 16), np.uint16)
  values[:, :8] = 65535
  values[:, 8:] = 32896  # 128 * 257.
  path = str(tmp_path / 'x.png')
  Image.fromarray(values).save(path)
  assert Image.open(path).mode.startswith('I')
  example = _decode(path, output_nc=1)
  assert _colour(example['A']) == (255, 255, 255)
  assert np.asarray(example['B']).max() == 128


def test_float_image_that_cannot_be_converted_is_an_error_naming_the_file(tmp_path):
  path = str(tmp_path / 'float.tif')
  Image.fromarray(np.full((8, 16), 1e6, np.float32)).save(path)
  with pytest.raises(datasets.BadImageError, match='float.tif: a floating-point.*cannot convert'):
    _decode(path)


def test_corrupt_image_is_an_error_naming_the_file(tmp_path):
  path = tmp_path / 'corrupt.jpg'
  path.write_bytes(b'this is not a jpeg')
  with pytest.raises(datasets.BadImageError, match='corrupt.jpg: not an image'):
    _decode(path)


@pytest.mark.parametrize('ext', ['.jpg', '.png'])
def test_truncated_image_is_an_error_naming_the_file(tmp_path, ext):
  full = _write_pair(tmp_path / f'full{ext}', size=(64, 32))
  data = open(full, 'rb').read()
  path = tmp_path / f'truncated{ext}'
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(datasets.BadImageError, match=f'truncated{ext}: corrupt or truncated'):
    _decode(path)


@pytest.mark.parametrize('size', [(20, 8), (15, 8)])
def test_ab_image_must_be_twice_as_wide_as_high(tmp_path, size):
  path = _write_pair(tmp_path / 'odd.png', size=size)
  with pytest.raises(datasets.BadImageError, match=rf'odd.png: .*got {size[0]}x{size[1]}'):
    _decode(path)
  example = _decode(path, check_shape=False)  # Split at width // 2, as the official loader.
  assert example['A'].size == (size[0] // 2, 8)


def test_missing_data_dir_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='data_dir=.*nowhere.*does not exist'):
    datasets.list_aligned_images(str(tmp_path / 'nowhere'), 'train')
  with pytest.raises(ValueError, match='data_dir is not set'):
    datasets.list_aligned_images('', 'train')


def test_missing_or_empty_split_folder_is_an_error(tmp_path):
  root = write_aligned_dataset(str(tmp_path), counts=(('train', 1),))
  with pytest.raises(FileNotFoundError,
                     match=r"val does not exist \(folders in data_dir: \['train'\]"):
    datasets.list_aligned_images(root, 'val')
  os.makedirs(tmp_path / 'test')
  (tmp_path / 'test' / 'notes.txt').write_text('not an image')
  with pytest.raises(FileNotFoundError, match='test holds no images'):
    datasets.list_aligned_images(root, 'test')


def test_aligned_lists_images_sorted_and_ignores_other_files(tmp_path):
  root = write_aligned_dataset(str(tmp_path), counts=(('train', 3),))
  (tmp_path / 'train' / 'README').write_text('')
  paths = datasets.list_aligned_images(root, 'train')
  assert [os.path.basename(p) for p in paths] == ['000.png', '001.png', '002.png']


# ---------------------------------------------------------------------------------------
# TFDS Cityscapes, built offline from tiny zips in the real layout.


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


def _write_cityscapes_zips(manual_dir, counts=(('train', 2), ('val', 1), ('test', 1))):
  os.makedirs(manual_dir, exist_ok=True)
  photo = np.zeros((1024, 2048, 3), np.uint8)
  photo[:] = (10, 200, 30)
  label_ids = np.full((1024, 2048), 7, np.uint8)  # Road above ...
  label_ids[512:] = 26  # ... car below.
  photo_png, label_png = _png(photo), _png(label_ids)
  with zipfile.ZipFile(os.path.join(manual_dir, 'leftImg8bit_trainvaltest.zip'), 'w') as left, \
       zipfile.ZipFile(os.path.join(manual_dir, 'gtFine_trainvaltest.zip'), 'w') as fine:
    for split, count in counts:
      for i in range(count):
        stem = f'bonn_{i:06d}_000019'
        left.writestr(f'leftImg8bit/{split}/bonn/{stem}_leftImg8bit.png', photo_png)
        fine.writestr(f'gtFine/{split}/bonn/{stem}_gtFine_labelIds.png', label_png)


def _cityscapes_config(tmp_path):
  config = load_config('default')
  config.data.name = 'cityscapes'
  config.data.data_dir = str(tmp_path / 'tfds')
  config.data.manual_dir = str(tmp_path / 'manual')
  return config


def test_cityscapes_without_manual_zips_names_the_files_and_folder(tmp_path):
  config = _cityscapes_config(tmp_path)
  with pytest.raises(FileNotFoundError) as error:
    datasets.get_source(config, 'train')
  message = str(error.value)
  assert 'leftImg8bit_trainvaltest.zip' in message and 'gtFine_trainvaltest.zip' in message
  assert str(tmp_path / 'manual') in message


def test_cityscapes_builds_from_zips_and_decodes_colour_labels_and_photo(tmp_path):
  config = _cityscapes_config(tmp_path)
  _write_cityscapes_zips(config.data.manual_dir)
  source = datasets.get_source(config, 'train')
  assert len(source.records) == 2
  assert len(datasets.get_source(config, 'val').records) == 1
  example = source.decode(source.records[0])
  assert example['name'].startswith('bonn_0000')
  labels, photo = np.asarray(example['A']), np.asarray(example['B'])
  assert labels.shape == photo.shape == (256, 256, 3)
  np.testing.assert_array_equal(labels[0, 0], (128, 64, 128))  # Road.
  np.testing.assert_array_equal(labels[-1, -1], (0, 0, 142))  # Car.
  assert set(map(tuple, labels.reshape(-1, 3))) == {(128, 64, 128), (0, 0, 142)}
  np.testing.assert_allclose(photo[128, 128], (10, 200, 30), atol=1)
  swapped = datasets.decode_cityscapes(source.records[0], direction='BtoA', input_nc=3,
                                       output_nc=1)
  assert swapped['B'].mode == 'L' and _colour(swapped['A']) == tuple(photo[0, 0])


# ---------------------------------------------------------------------------------------
# The demo dataset.


def test_demo_pairs_are_label_maps_and_photos_with_heldout_layouts_unseen_in_train(demo_dir):
  from p2p_jax import demo_data
  splits = {s: datasets.list_aligned_images(demo_dir, s) for s in datasets.SPLITS}
  assert [len(splits[s]) for s in datasets.SPLITS] == [600, 16, 32]
  example = _decode(splits['test'][0])
  assert example['A'].size == example['B'].size == (demo_data.DEMO_SIZE,) * 2
  colours = {tuple(c) for c in np.asarray(example['A']).reshape(-1, 3)}
  assert colours <= set(demo_data.LABELS.values())  # A holds label colours only.
  train_a, _ = demo_data.read_pairs(os.path.join(demo_dir, 'train'))
  test_a, test_b = demo_data.read_pairs(os.path.join(demo_dir, 'test'))
  train_layouts = {a.tobytes() for a in train_a}
  assert not train_layouts & {a.tobytes() for a in test_a}
  scores = demo_data.baselines(test_a, test_b)
  # The labels say much about the photo, but not everything: a model has room to beat them.
  assert 0.1 < scores['per_label_mean_colour'] < 0.8 * scores['mean_colour'] < scores['input']


def test_prepare_demo_is_idempotent_and_safe_when_called_concurrently(tmp_path):
  target = str(tmp_path / 'demo')
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    results = list(pool.map(datasets.prepare_demo, [target] * 3))
  assert results == [target] * 3
  assert sorted(os.listdir(tmp_path)) == ['demo']  # No temporary folders left behind.
  mtime = os.path.getmtime(os.path.join(target, 'train'))
  assert datasets.prepare_demo(target) == target
  assert os.path.getmtime(os.path.join(target, 'train')) == mtime


def test_prepare_demo_fills_an_empty_folder_and_refuses_a_foreign_one(tmp_path):
  os.makedirs(tmp_path / 'empty')
  assert datasets.prepare_demo(str(tmp_path / 'empty')) == str(tmp_path / 'empty')
  assert len(datasets.list_aligned_images(str(tmp_path / 'empty'), 'test')) == 32
  (tmp_path / 'mine.txt').write_text('')
  with pytest.raises(FileExistsError, match='not empty'):
    datasets.prepare_demo(str(tmp_path))


def test_demo_report_command_prints_baselines_and_writes_the_figure(tmp_path, demo_dir):
  import json
  import subprocess
  import sys
  from conftest import REPO_ROOT
  from p2p_jax import demo_data
  eval_dir = tmp_path / 'eval' / '7'
  os.makedirs(eval_dir / 'images')
  (eval_dir / 'metrics.json').write_text(json.dumps({'split': 'test', 'L1': 0.05}))
  for name in ('x', 'y'):
    for kind, value in (('real_A', 0), ('fake_B', 128), ('real_B', 255)):
      Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(
          eval_dir / 'images' / f'{name}_{kind}.png')
  figure = tmp_path / 'figure.png'
  result = subprocess.run([sys.executable, '-m', 'p2p_jax.demo_data', f'--eval_dir={eval_dir}',
                           f'--data_dir={demo_dir}', f'--figure={figure}'], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  scores = json.loads(result.stdout)
  expected = demo_data.baselines(*demo_data.read_pairs(os.path.join(demo_dir, 'test')))
  assert scores['per_label_mean_colour'] == pytest.approx(expected['per_label_mean_colour'])
  assert scores['model_over_best_baseline'] == pytest.approx(0.05 / min(expected.values()))
  pixels = np.asarray(Image.open(figure))
  assert pixels.shape == (16, 24, 3)  # Two rows of input | output | target.
  assert (pixels[:, :8] == 0).all() and (pixels[:, 8:16] == 128).all()
