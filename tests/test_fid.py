"""FID Inception, FID and KID: pytorch-fid's features and distance, the eval hook, the CLI.

The weights are seeded (``fixtures/inception_weights.py``), with batch-norm statistics that
``fixtures/make_inception_fixture.py`` re-estimated in pytorch-fid's own network; the test
writes them as a ``.pth`` without torch and compares with pytorch-fid's saved features.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT, make_tiny_config, save_random_generator, tiny_flags, write_pth
from conftest import write_aligned_dataset
from p2p_jax import evaluate, fid, inception, parallel

FIXTURES = os.path.join(REPO_ROOT, 'tests', 'fixtures')
sys.path.insert(0, FIXTURES)
import inception_weights  # pylint: disable=g-import-not-at-top,wrong-import-position

STEP = 3


@pytest.fixture(scope='module')
def reference():
  return np.load(os.path.join(FIXTURES, 'inception_fid.npz'))


@pytest.fixture(scope='module')
def weights_path(reference, tmp_path_factory):
  """The seeded weights with the fixture's running statistics, as pytorch-fid's file holds."""
  shapes = {**inception.expected_shapes(), 'fc.weight': (1008, 2048), 'fc.bias': (1008,)}
  state_dict = inception_weights.generate(shapes, int(reference['seed']))
  for key in state_dict:
    if key.endswith(('running_mean', 'running_var')):
      state_dict[key] = reference[f'bn/{key}']
  return write_pth(str(tmp_path_factory.mktemp('inception') / inception.WEIGHTS_FILE),
                   state_dict)


@pytest.fixture(scope='module')
def feature_fn(weights_path):
  return fid.load_feature_fn(weights_path, parallel.create_mesh(), batch_size=4)


def test_features_reproduce_pytorch_fid_including_its_resize(reference, feature_fn):
  features = feature_fn(list(reference['inputs']))  # 50x70 uint8: resized to 299 first.
  expected = reference['features']
  error = np.abs(features - expected).max() / np.abs(expected).max()
  assert features.shape == (3, inception.FEATURE_DIM)
  assert error <= 1e-4, error


@pytest.mark.parametrize('case', ['regular', 'singular'])
def test_fid_equals_pytorch_fids_frechet_distance(reference, case):
  a, b = reference[f'fid_a_{case}'], reference[f'fid_b_{case}']
  value = fid.fid_from_features(a, b)
  assert value == pytest.approx(float(reference[f'fid_value_{case}']), rel=1e-4)


def test_fid_of_a_set_with_itself_is_zero_and_both_scores_ignore_order(reference):
  a, b = reference['fid_a_regular'][:40], reference['fid_b_regular']
  assert abs(fid.fid_from_features(a, a)) < 1e-6
  rng = np.random.default_rng(0)
  shuffled_a, shuffled_b = a[rng.permutation(len(a))], b[rng.permutation(len(b))]
  assert fid.fid_from_features(shuffled_a, shuffled_b) == pytest.approx(
      fid.fid_from_features(a, b), rel=1e-9)
  # Subsets of 40 (all of a): each subset of a is a whole, and b's draws are a fixed seed's.
  kid = fid.kid_from_features(a, b[:40], num_subsets=5)
  assert kid == pytest.approx(fid.kid_from_features(shuffled_a, b[:40][::-1], num_subsets=5))
  assert kid[1] == pytest.approx(0, abs=1e-12)


def test_kid_equals_the_direct_unbiased_double_sum():
  rng = np.random.default_rng(1)
  x, y = rng.standard_normal((12, 5)), 0.3 + rng.standard_normal((12, 5))
  d, m = x.shape[1], len(x)
  k = lambda u, v: (u @ v / d + 1) ** 3
  same = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
  cross = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
  expected = same / (m * (m - 1)) - 2 * cross / m ** 2
  assert fid.polynomial_mmd2(x, y) == pytest.approx(expected, rel=1e-10)
  assert fid.kid_from_features(x, y, num_subsets=3)[0] == pytest.approx(expected, rel=1e-10)
  # Subsets smaller than the sets: the mean over subsets of their MMDs, with a fixed seed.
  mean, std = fid.kid_from_features(x, y, num_subsets=20, max_subset_size=6)
  assert (mean, std) == fid.kid_from_features(x, y, num_subsets=20, max_subset_size=6)
  assert std > 0


def test_missing_weights_file_names_the_path_the_file_and_where_to_get_it(tmp_path):
  path = str(tmp_path / 'nowhere.pth')
  with pytest.raises(FileNotFoundError) as error:
    inception.load_variables(path)
  for part in (path, inception.WEIGHTS_FILE, inception.WEIGHTS_URL):
    assert part in str(error.value)


def test_a_file_that_is_not_a_checkpoint_is_refused_naming_it(tmp_path):
  path = str(tmp_path / inception.WEIGHTS_FILE)
  with open(path, 'wb') as f:
    f.write(b'not a checkpoint')
  with pytest.raises(ValueError) as error:
    inception.load_variables(path)
  assert path in str(error.value) and inception.WEIGHTS_URL in str(error.value)


@pytest.mark.parametrize('change', ['missing', 'shape', 'unexpected'])
def test_weights_of_another_network_are_refused_naming_the_key(change):
  key = 'Mixed_6b.branch1x1.conv.weight'
  shapes = dict(inception.expected_shapes())
  if change == 'missing':
    del shapes[key]
  elif change == 'shape':
    shapes[key] = (1, 1, 1, 1)
  else:
    shapes[key.replace('6b', '6f')] = (1,)
  state_dict = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  with pytest.raises(inception.WeightsError) as error:
    inception.variables_from_state_dict(state_dict, 'other.pth')
  message = str(error.value)
  assert 'other.pth' in message and inception.WEIGHTS_URL in message
  assert (key.replace('6b', '6f') if change == 'unexpected' else key) in message


def test_eval_checks_the_inception_path_before_restoring_the_generator(tmp_path):
  config = make_tiny_config(**{'eval.inception_path': str(tmp_path / 'missing.pth')})
  with pytest.raises(FileNotFoundError, match=inception.WEIGHTS_FILE):
    evaluate.evaluate(config, str(tmp_path / 'no_checkpoint'))


def test_folder_images_of_any_size_and_mode_are_read_as_rgb_and_featurised(tmp_path,
                                                                          feature_fn):
  rng = np.random.default_rng(2)
  rgb = rng.integers(0, 256, (30, 20, 3), np.uint8)
  grey = rng.integers(0, 256, (40, 24), np.uint8)
  Image.fromarray(rgb).save(tmp_path / 'a.png')
  Image.fromarray(grey).save(tmp_path / 'b.png')
  Image.fromarray(rgb).convert('RGBA').save(tmp_path / 'c.png')
  images = fid.read_folder(str(tmp_path))
  assert [image.shape for image in images] == [(30, 20, 3), (40, 24, 3), (30, 20, 3)]
  np.testing.assert_array_equal(images[1], np.repeat(grey[..., None], 3, axis=-1))
  together = feature_fn(images)
  alone = np.concatenate([feature_fn([image]) for image in images])
  np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(together[0], together[2], rtol=1e-6)  # Alpha is dropped.


def _run(args, cache_dir):
  # A shared compilation cache: the eval and the folder CLI compile the same Inception.
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  result = subprocess.run([sys.executable, '-m'] + args, cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_cli_eval_and_folder_cli_report_the_same_fid_and_kid(tmp_path, weights_path):
  """``--mode=eval`` writes FID / KID to metrics.json and the page; ``python -m p2p_jax.fid`` on
  the written real_B and fake_B images prints the same scores as one JSON line."""
  overrides = {'model.netG': 'resnet_6blocks', 'model.ngf': 4, 'data.load_size': 32,
               'data.crop_size': 32, 'eval.batch_size': 4}
  data_dir = write_aligned_dataset(str(tmp_path / 'data'), (('test', 3),), 32)
  workdir = str(tmp_path / 'run')
  save_random_generator(workdir, make_tiny_config(**overrides), STEP)
  _run(['p2p_jax.main', '--config=configs/default.py', f'--workdir={workdir}', '--mode=eval']
       + tiny_flags(**overrides, **{'data.data_dir': data_dir,
                                    'eval.inception_path': weights_path}), tmp_path / 'cache')
  out_dir = os.path.join(workdir, 'eval', str(STEP))
  results = json.load(open(os.path.join(out_dir, 'metrics.json')))
  assert results['FID'] > 0
  # 3 images: every subset is all of them, so the subsets differ only in rounding.
  assert results['KID_std'] <= 1e-6 * abs(results['KID_mean'])
  assert f"FID {results['FID']:.4f}" in open(os.path.join(out_dir, 'index.html')).read()

  images = os.path.join(out_dir, 'images')
  for suffix in ('real_B', 'fake_B'):
    os.makedirs(tmp_path / suffix)
    for name in os.listdir(images):
      if name.endswith(f'_{suffix}.png'):
        os.link(os.path.join(images, name), tmp_path / suffix / name)
  result = _run(['p2p_jax.fid', f'--inception_path={weights_path}', '--batch_size=4',
                 str(tmp_path / 'real_B'), str(tmp_path / 'fake_B')], tmp_path / 'cache')
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  assert printed['num_real'] == 3 and printed['num_fake'] == 3
  assert printed['fid'] == pytest.approx(results['FID'], rel=1e-4)
  assert printed['kid_mean'] == pytest.approx(results['KID_mean'], rel=1e-4)
  assert printed['kid_std'] <= 1e-6 * abs(printed['kid_mean'])


def test_main_refuses_a_missing_inception_file_before_training(tmp_path):
  workdir, missing = tmp_path / 'run', str(tmp_path / inception.WEIGHTS_FILE)
  result = subprocess.run(
      [sys.executable, '-m', 'p2p_jax.main', '--config=configs/default.py',
       f'--workdir={workdir}', '--mode=train', f'--config.eval.inception_path={missing}']
      + tiny_flags(), cwd=REPO_ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'),
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if line.startswith('ERROR:')]
  assert len(errors) == 1 and missing in errors[0] and inception.WEIGHTS_URL in errors[0]
  assert not os.path.exists(workdir / 'checkpoints')


_TWO_DEVICE_SCRIPT = '''
import numpy as np, jax
from p2p_jax import fid, parallel
assert jax.device_count() == 2
reference = np.load({npz!r})
feature_fn = fid.load_feature_fn({weights!r}, parallel.create_mesh(), batch_size=1)
np.save({out!r}, feature_fn(list(reference['inputs'])))
'''


def test_features_are_the_same_sharded_over_two_devices(tmp_path, reference, weights_path):
  out = str(tmp_path / 'features.npy')
  script = _TWO_DEVICE_SCRIPT.format(npz=os.path.join(FIXTURES, 'inception_fid.npz'),
                                     weights=weights_path, out=out)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', script], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  expected = reference['features']  # 3 images in batches of 2 (rounded up from 1): padded.
  assert np.abs(np.load(out) - expected).max() / np.abs(expected).max() <= 1e-4
