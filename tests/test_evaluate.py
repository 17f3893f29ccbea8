"""--mode=eval and --mode=translate: restore, outputs on disk, metrics, test-time modes, errors.

A tiny ResNet generator (ngf 4, 32 px) keeps compiles short; the checkpoint is written from
init variables with ``checkpointing.save_generator``.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image
from skimage.metrics import structural_similarity

from conftest import (REPO_ROOT, make_tiny_config, save_random_generator, tiny_flags,
                      write_aligned_dataset)
from p2p_jax import checkpointing, evaluate, metrics, models, parallel

SIZE = 32
STEP = 7
NAMES = ('000', '001', '002')  # write_aligned_dataset's test split.


# A ResNet generator at ngf 4: its compiles are shorter than a U-Net's.
EVAL_OVERRIDES = {'model.netG': 'resnet_6blocks', 'model.ngf': 4, 'model.ndf': 4,
                  'data.load_size': SIZE, 'data.crop_size': SIZE, 'data.batch_size': 1,
                  'num_image_examples': 2}


def _config(data_dir=''):
  return make_tiny_config(**EVAL_OVERRIDES, **{'data.data_dir': data_dir})


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A data folder and a checkpointed workdir; ``run.evaluate(**overrides)`` evaluates a copy."""
  root = tmp_path_factory.mktemp('eval')
  data_dir = write_aligned_dataset(str(root / 'data'), (('test', 3), ('val', 2)), SIZE)
  base = str(root / 'base')
  save_random_generator(base, _config(), STEP)

  class Run:
    root_dir = root
    base_workdir = base

    @staticmethod
    def config(**eval_overrides):
      config = _config(data_dir)
      for key, value in eval_overrides.items():
        setattr(config.eval, key, value)
      return config

    @staticmethod
    def workdir(name):
      workdir = str(root / name)
      if not os.path.exists(workdir):
        shutil.copytree(base, workdir)
      return workdir

  return Run


@pytest.fixture(scope='module')
def paper_run(run):
  """Paper mode, seed 0, one sample: (workdir, metrics)."""
  workdir = run.workdir('paper')
  return workdir, evaluate.evaluate(run.config(), workdir)


def _png(path):
  return np.asarray(Image.open(path))


def _images_dir(workdir):
  return os.path.join(workdir, 'eval', str(STEP), 'images')


def test_ssim_matches_scikit_image_and_known_properties():
  rng = np.random.default_rng(0)
  x = rng.random((40, 37, 3))
  assert metrics.ssim(x, x) == pytest.approx(1.0)
  previous = 1.0
  for noise in (0.02, 0.1, 0.3):
    y = np.clip(x + noise * rng.standard_normal(x.shape), 0, 1)
    value = metrics.ssim(x, y)
    expected = structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=1, channel_axis=-1)
    assert value == pytest.approx(expected, abs=1e-4)
    assert value < previous
    previous = value


def test_psnr_is_on_the_uint8_scale_and_finite_for_identical_images():
  x = np.zeros((8, 8, 3), np.uint8)
  y = x + np.uint8(5)  # MSE 25.
  assert metrics.psnr(x, y) == pytest.approx(10 * np.log10(255 ** 2 / 25))
  assert metrics.psnr(x, x) == pytest.approx(100.0)


def test_eval_writes_images_results_page_metrics_and_tensorboard(paper_run):
  workdir, results = paper_run
  out_dir = os.path.join(workdir, 'eval', str(STEP))
  files = sorted(os.listdir(os.path.join(out_dir, 'images')))
  assert files == sorted(f'{n}_{kind}.png' for n in NAMES for kind in ('real_A', 'fake_B', 'real_B'))
  with open(os.path.join(out_dir, 'metrics.json')) as f:
    assert json.load(f) == results
  assert results['step'] == STEP and results['split'] == 'test' and results['mode'] == 'paper'
  assert results['num_images'] == len(NAMES)
  page = open(os.path.join(out_dir, 'index.html'), encoding='utf-8').read()
  for name in NAMES:
    for kind in ('real_A', 'fake_B', 'real_B'):
      assert f'src="images/{name}_{kind}.png"' in page
  assert page.count('<tr>') == len(NAMES) + 1  # Header + a row per example.
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(os.path.join(workdir, 'eval')))


def test_eval_metrics_agree_with_the_written_pngs(paper_run):
  workdir, results = paper_run
  images = _images_dir(workdir)
  l1, psnr, ssim = [], [], []
  for name in NAMES:
    fake = _png(os.path.join(images, f'{name}_fake_B.png'))
    real = _png(os.path.join(images, f'{name}_real_B.png'))
    l1.append(np.mean(np.abs(fake / 127.5 - real / 127.5)))
    psnr.append(metrics.psnr(fake, real))
    ssim.append(metrics.ssim(fake / 255.0, real / 255.0))
  # L1 is on the float outputs: within a quantisation step of the PNGs' L1.
  assert results['L1'] == pytest.approx(np.mean(l1), abs=1 / 127.5)
  assert results['PSNR'] == pytest.approx(np.mean(psnr))
  assert results['SSIM'] == pytest.approx(np.mean(ssim))
  real_b = _png(os.path.join(images, f'{NAMES[0]}_real_B.png'))
  real_a = _png(os.path.join(images, f'{NAMES[0]}_real_A.png'))
  np.testing.assert_array_equal(real_a, real_b)  # What the split holds: equal halves.


def test_paper_samples_are_reproducible_for_a_seed_and_differ_across_samples_and_seeds(
    run, paper_run):
  workdir = run.workdir('samples')
  metrics = evaluate.evaluate(run.config(num_samples=3), workdir)
  assert metrics['num_samples'] == 3
  images = _images_dir(workdir)
  for name in NAMES:
    samples = [_png(os.path.join(images, f'{name}_fake_B_{k}.png')) for k in range(3)]
    # Sample 0 has the keys of the single-sample run with the same seed.
    np.testing.assert_array_equal(
        samples[0], _png(os.path.join(_images_dir(paper_run[0]), f'{name}_fake_B.png')))
    assert not np.array_equal(samples[0], samples[1])
    assert not np.array_equal(samples[1], samples[2])
  page = open(os.path.join(workdir, 'eval', str(STEP), 'index.html')).read()
  assert f'images/{NAMES[0]}_fake_B_2.png' in page

  other_seed = run.config()
  other_seed.seed = 1
  workdir = run.workdir('seed1')
  evaluate.evaluate(other_seed, workdir)
  fake = _png(os.path.join(_images_dir(workdir), f'{NAMES[0]}_fake_B.png'))
  assert not np.array_equal(
      fake, _png(os.path.join(_images_dir(paper_run[0]), f'{NAMES[0]}_fake_B.png')))


def test_eval_mode_is_deterministic_and_differs_from_paper_mode(run, paper_run):
  config = run.config(mode='eval', split='val')
  workdir = run.workdir('eval_mode')
  metrics = evaluate.evaluate(config, workdir)
  assert metrics['mode'] == 'eval' and metrics['split'] == 'val' and metrics['num_images'] == 2
  generator, variables, step = evaluate.restore_generator(config, workdir, parallel.create_mesh())
  assert step == STEP
  fn = evaluate.make_generate_fn(generator, 'eval', 0, parallel.create_mesh())
  images = np.random.default_rng(0).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
  first = np.asarray(fn(variables, images, np.array([[0, 0], [0, 1]], np.int32)))
  second = np.asarray(fn(variables, images[::-1], np.array([[5, 9], [3, 4]], np.int32)))
  # Keys and batch-mates do not matter (dropout or batch statistics would change outputs by
  # orders of magnitude more). Not bit-for-bit: XLA:CPU's convolution kernels may round an
  # example differently at another batch position (seen at 1e-6 relative).
  np.testing.assert_allclose(first, second[::-1], rtol=1e-5, atol=1e-6)
  paper = evaluate.make_generate_fn(generator, 'paper', 0, parallel.create_mesh())
  assert not np.allclose(first, paper(variables, images, np.array([[0, 0], [0, 1]], np.int32)))


def test_eval_num_samples_needs_paper_mode(run):
  with pytest.raises(ValueError, match='num_samples'):
    evaluate.evaluate(run.config(mode='eval', num_samples=2), run.base_workdir)


def test_missing_checkpoint_is_a_clear_error(run, tmp_path):
  with pytest.raises(FileNotFoundError, match='No checkpoints'):
    evaluate.evaluate(run.config(), str(tmp_path))
  with pytest.raises(FileNotFoundError, match=f'available steps: \\[{STEP}\\]'):
    evaluate.evaluate(run.config(step=str(STEP + 1)), run.base_workdir)  # A str field: 'best' too.


def test_corrupt_checkpoint_is_a_clear_error(run, tmp_path):
  workdir = str(tmp_path / 'corrupt')
  shutil.copytree(run.base_workdir, workdir)
  generator_dir = os.path.join(checkpointing.checkpoint_dir(workdir), str(STEP), 'generator')
  for dirpath, _, files in os.walk(generator_dir):
    for name in files:
      with open(os.path.join(dirpath, name), 'wb') as f:
        f.write(b'garbage')
  with pytest.raises(ValueError, match='Could not restore the generator'):
    evaluate.evaluate(run.config(), workdir)


def _write_image(path, size, mode='RGB', seed=0):
  w, h = size
  rng = np.random.default_rng(seed)
  shape = (h, w, 3) if mode == 'RGB' else (h, w)
  Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def test_translate_resizes_to_crop_size_and_back(run):
  in_dir, out_dir = run.root_dir / 'tr_in', run.root_dir / 'tr_out'
  os.makedirs(in_dir / 'subdir')
  _write_image(in_dir / 'wide.jpg', (50, 30))
  _write_image(in_dir / 'grey.png', (20, 44), mode='L')
  _write_image(in_dir / 'square.png', (SIZE, SIZE))
  config = run.config()
  config.translate.input_dir, config.translate.output_dir = str(in_dir), str(out_dir)
  outputs = evaluate.translate(config, run.base_workdir)
  assert outputs == [str(out_dir / f'{s}.png') for s in ('grey', 'square', 'wide')]
  assert sorted(os.listdir(out_dir)) == ['grey.png', 'square.png', 'wide.png']
  for stem, size in (('wide', (50, 30)), ('grey', (20, 44)), ('square', (SIZE, SIZE))):
    image = Image.open(out_dir / f'{stem}.png')
    assert image.size == size and image.mode == 'RGB'


def test_translate_runs_fully_convolutionally_on_multiples_without_resize(run):
  in_dir, out_dir = run.root_dir / 'fc_in', run.root_dir / 'fc_out'
  os.makedirs(in_dir)
  _write_image(in_dir / 'a.png', (36, 20))
  _write_image(in_dir / 'b.png', (36, 20), seed=1)
  _write_image(in_dir / 'c.png', (16, 48))
  config = run.config(mode='eval')
  config.translate.input_dir, config.translate.output_dir = str(in_dir), str(out_dir)
  config.translate.resize = False
  evaluate.translate(config, run.base_workdir)
  assert [Image.open(out_dir / f'{s}.png').size for s in 'abc'] == [(36, 20), (36, 20), (16, 48)]


def test_translate_rejects_a_non_image_file_naming_it(run, tmp_path):
  _write_image(tmp_path / 'ok.png', (SIZE, SIZE))
  (tmp_path / 'notes.txt').write_text('not an image')
  config = run.config()
  config.translate.input_dir, config.translate.output_dir = str(tmp_path), str(tmp_path / 'o')
  with pytest.raises(ValueError, match='notes.txt: not an image file'):
    evaluate.translate(config, run.base_workdir)


def test_translate_rejects_a_size_the_generator_cannot_take_without_resize(run, tmp_path):
  _write_image(tmp_path / 'odd.png', (30, 32))
  config = run.config()
  config.translate.input_dir, config.translate.output_dir = str(tmp_path), str(tmp_path / 'o')
  config.translate.resize = False
  with pytest.raises(ValueError, match=r'odd.png is 30x32.*multiples of 4.*translate.resize'):
    evaluate.translate(config, run.base_workdir)
  assert models.required_multiple('unet_256') == 256
  assert models.required_multiple('unet_128') == 128
  assert models.required_multiple('unet_32') == 32


_TWO_DEVICE_SCRIPT = textwrap.dedent('''
    import sys
    sys.path.insert(0, {tests!r})
    import jax, pytest
    import test_evaluate as t
    from p2p_jax import evaluate
    assert jax.device_count() == 2
    config = t._config({data_dir!r})
    config.eval.batch_size = 3
    with pytest.raises(ValueError, match='config.eval.batch_size=3 is not divisible by the 2'):
      evaluate.evaluate(config, {workdir!r})
    config.eval.batch_size = 2  # 3 images: a padded last batch.
    evaluate.evaluate(config, {workdir!r})
''')


def test_eval_on_two_devices_matches_batch_size_one_and_checks_the_batch_size(run, paper_run):
  workdir = run.workdir('two_devices')
  script = _TWO_DEVICE_SCRIPT.format(tests=os.path.join(REPO_ROOT, 'tests'),
                                     data_dir=str(run.root_dir / 'data'), workdir=workdir)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', script], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  for name in NAMES:  # Paper mode: each example is its own batch, on any device count.
    two = _png(os.path.join(_images_dir(workdir), f'{name}_fake_B.png')).astype(int)
    one = _png(os.path.join(_images_dir(paper_run[0]), f'{name}_fake_B.png')).astype(int)
    assert np.abs(two - one).max() <= 1


def test_cli_translate_matches_eval_outputs_for_the_same_inputs_and_keys(run, paper_run):
  """``--mode=translate`` through main.py: the split's inputs, in the split's order, get the
  same dropout keys and hence the same outputs as ``--mode=eval`` gave them."""
  in_dir, out_dir = run.root_dir / 'cli_in', run.root_dir / 'cli_out'
  os.makedirs(in_dir)
  images = _images_dir(paper_run[0])
  for name in NAMES:
    shutil.copy(os.path.join(images, f'{name}_real_A.png'), in_dir / f'{name}.png')
  flags = tiny_flags(**EVAL_OVERRIDES, **{'translate.input_dir': in_dir,
                                          'translate.output_dir': out_dir})
  result = subprocess.run(
      [sys.executable, '-m', 'p2p_jax.main', '--config=configs/default.py',
       f'--workdir={run.base_workdir}', '--mode=translate'] + flags,
      cwd=REPO_ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True,
      text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(out_dir)) == [f'{name}.png' for name in NAMES]
  for name in NAMES:
    translated = _png(out_dir / f'{name}.png').astype(int)
    evaluated = _png(os.path.join(images, f'{name}_fake_B.png')).astype(int)
    assert np.abs(translated - evaluated).max() <= 1
