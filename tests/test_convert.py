"""Import of official PyTorch checkpoints: safe .pth reading, key mapping, equivalence, the CLI.

The fixtures were written by real ``torch.save`` (tests/fixtures/make_torch_fixtures.py); this
suite needs no torch.
"""
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, load_config
from p2p_jax import checkpointing, convert, models, pth, train

FIXTURES = os.path.join(REPO_ROOT, 'tests', 'fixtures')


def _fixture(name):
  return os.path.join(FIXTURES, name)


def _config(netG='unet_128', ngf=8, crop_size=128, norm='batch', use_dropout=True,
            netD='basic', ndf=8):
  config = load_config('default')
  config.model.netG, config.model.ngf, config.model.norm = netG, ngf, norm
  config.model.use_dropout, config.model.netD, config.model.ndf = use_dropout, netD, ndf
  config.data.crop_size = crop_size
  return config


def _inputs_and_torch_outputs(name):
  data = np.load(_fixture(f'{name}.npz'))
  return data['input'].astype(np.float32) / 127.5 - 1, data['output']


def _quantise(images):
  """8-bit images as --mode=translate writes them."""
  return np.round((np.clip(images, -1, 1) + 1) * 127.5).astype(np.int32)


def test_read_state_dict_gives_official_keys_shapes_and_dtypes():
  state_dict = pth.read_state_dict(_fixture('unet_128_ngf8.pth'))
  assert list(state_dict)[:3] == ['model.model.0.weight', 'model.model.1.model.1.weight',
                                  'model.model.1.model.2.weight']
  assert state_dict['model.model.0.weight'].shape == (8, 3, 4, 4)  # Conv2d: (out, in, kh, kw).
  assert state_dict['model.model.3.weight'].shape == (16, 3, 4, 4)  # ConvTranspose2d: in, out.
  assert state_dict['model.model.3.bias'].dtype == np.float32
  assert state_dict['model.model.1.model.2.running_var'].shape == (16,)
  counter = state_dict['model.model.1.model.2.num_batches_tracked']
  assert counter.shape == () and counter.dtype == np.int64 and counter > 0
  # 7 levels: 7 down + 7 up convs, 1 bias, 5 down + 6 up batch norms of 5 entries each.
  assert len(state_dict) == 7 + 7 + 1 + 11 * 5


def test_legacy_pre_zip_format_reads_the_same_tensors():
  zipped = pth.read_state_dict(_fixture('pixel_D_ndf8.pth'))
  legacy = pth.read_state_dict(_fixture('pixel_D_ndf8_legacy.pth'))
  assert list(zipped) == list(legacy)
  for key in zipped:
    assert zipped[key].dtype == legacy[key].dtype
    np.testing.assert_array_equal(zipped[key], legacy[key])


def _text(s):
  data = s.encode()
  return b'X' + struct.pack('<I', len(data)) + data  # BINUNICODE


def _int_tuple(values):
  return b'(' + b''.join(b'J' + struct.pack('<i', v) for v in values) + b't'


def _write_pth(path, tensors, storage, byteorder='little'):
  """A zip .pth as torch.save lays it out, from opcodes (no torch): one float32 storage '0'.

  Args:
    tensors: {key: (offset, size, stride)} views of the storage.
  """
  pkl = b'\x80\x02ccollections\nOrderedDict\n)R('
  for key, (offset, size, stride) in tensors.items():
    pid = (b'(' + _text('storage') + b'ctorch\nFloatStorage\n' + _text('0') + _text('cpu')
           + b'J' + struct.pack('<i', storage.size) + b'tQ')
    pkl += (_text(key) + b'ctorch._utils\n_rebuild_tensor_v2\n(' + pid + b'J'
            + struct.pack('<i', offset) + _int_tuple(size) + _int_tuple(stride) + b'\x89)tR')
  pkl += b'u.'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', pkl)
    archive.writestr('archive/byteorder', byteorder)
    archive.writestr('archive/data/0', storage.astype('<f4' if byteorder == 'little' else '>f4')
                     .tobytes())


def test_reader_honours_byte_order_offset_and_strides_and_strips_module_prefix(tmp_path):
  path = str(tmp_path / 'views.pth')
  storage = np.arange(12, dtype=np.float32)
  _write_pth(path, {'module.t': (2, (2, 3), (1, 2)), 'module.scalar': (5, (), ())}, storage,
             byteorder='big')
  state_dict = pth.read_state_dict(path)
  assert list(state_dict) == ['t', 'scalar']
  np.testing.assert_array_equal(state_dict['t'], [[2, 4, 6], [3, 5, 7]])
  assert state_dict['scalar'].shape == () and state_dict['scalar'] == 5


def test_reader_refuses_a_view_past_the_end_of_its_storage(tmp_path):
  path = str(tmp_path / 'overrun.pth')
  _write_pth(path, {'w': (0, (4, 4), (4, 1))}, np.zeros(12, np.float32))
  with pytest.raises(pth.PthError, match='runs past'):
    pth.read_state_dict(path)


class _RunsShell:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'touch {self.marker}',)


@pytest.mark.parametrize('layout', ['zip', 'legacy'])
def test_malicious_pickle_is_refused_without_running_it(tmp_path, layout):
  marker = tmp_path / 'pwned'
  path = str(tmp_path / 'evil.pth')
  payload = pickle.dumps({'model.0.weight': _RunsShell(marker)}, protocol=2)
  if layout == 'zip':
    with zipfile.ZipFile(path, 'w') as archive:
      archive.writestr('archive/data.pkl', payload)
  else:
    with open(path, 'wb') as f:
      f.write(payload)
  with pytest.raises(pth.PthError, match=r'refusing to load global \w+\.system') as e:
    pth.read_state_dict(path)
  assert path in str(e.value)
  assert not marker.exists()


def test_truncated_storage_is_refused(tmp_path):
  path = str(tmp_path / 'truncated.pth')
  with zipfile.ZipFile(_fixture('pixel_D_ndf8.pth')) as source, \
       zipfile.ZipFile(path, 'w') as target:
    for name in source.namelist():
      data = source.read(name)
      target.writestr(name, data[:-4] if name.endswith('/data/0') else data)
  with pytest.raises(pth.PthError, match='fewer than'):
    pth.read_state_dict(path)


# (fixture, config): unet_256 is the 256x256 case, at ngf 4 to keep the file small.
GENERATORS = [
    ('unet_128_ngf8', dict(netG='unet_128', ngf=8, crop_size=128)),
    ('unet_256_ngf4', dict(netG='unet_256', ngf=4, crop_size=256)),
    ('resnet_6blocks_ngf8', dict(netG='resnet_6blocks', ngf=8, crop_size=64)),
    ('resnet_6blocks_ngf4_instance_nodropout',
     dict(netG='resnet_6blocks', ngf=4, crop_size=64, norm='instance', use_dropout=False)),
]


@pytest.mark.parametrize('name, overrides', GENERATORS, ids=[g[0] for g in GENERATORS])
def test_converted_generator_reproduces_torch_eval_outputs(name, overrides):
  config = _config(**overrides)
  variables = convert.convert_network(
      pth.read_state_dict(_fixture(f'{name}.pth')), config, 'generator', name)
  images, torch_out = _inputs_and_torch_outputs(name)
  generator = models.create_generator(config.model, config.data.output_nc)
  out = np.asarray(models.generate(generator, variables, images, jax.random.PRNGKey(0),
                                   mode='eval'))
  assert np.abs(_quantise(out) - _quantise(torch_out)).max() <= 1  # The criterion.
  np.testing.assert_allclose(out, torch_out, rtol=1e-4, atol=1e-5)


DISCRIMINATORS = [('basic_D_ndf8', 'basic'), ('pixel_D_ndf8', 'pixel')]


@pytest.mark.parametrize('name, netD', DISCRIMINATORS, ids=[d[0] for d in DISCRIMINATORS])
def test_converted_discriminator_reproduces_torch_eval_logits(name, netD):
  config = _config(netD=netD, crop_size=64)
  variables = convert.convert_network(
      pth.read_state_dict(_fixture(f'{name}.pth')), config, 'discriminator', name)
  pairs, torch_logits = _inputs_and_torch_outputs(name)
  discriminator = models.create_discriminator(config.model)
  logits = np.asarray(discriminator.apply(variables, pairs, train=False))
  np.testing.assert_allclose(logits, torch_logits, rtol=1e-4, atol=1e-5)


def test_shape_mismatch_names_our_param_and_the_torch_key():
  state_dict = pth.read_state_dict(_fixture('unet_128_ngf8.pth'))
  with pytest.raises(convert.ConversionError) as e:
    convert.convert_network(state_dict, _config(ngf=16), 'generator', 'G.pth')
  message = str(e.value)
  assert "'model.model.0.weight' has shape (8, 3, 4, 4)" in message
  assert 'params/down0/kernel (4, 4, 3, 16)' in message and 'ngf=16' in message


def test_missing_key_names_our_param_and_the_torch_key():
  state_dict = pth.read_state_dict(_fixture('unet_128_ngf8.pth'))
  del state_dict['model.model.1.model.2.running_mean']
  with pytest.raises(convert.ConversionError) as e:
    convert.convert_network(state_dict, _config(), 'generator', 'G.pth')
  assert 'batch_stats/down_norm1/mean' in str(e.value)
  assert "'model.model.1.model.2.running_mean'" in str(e.value)


def test_wrong_dropout_setting_is_reported_as_unplaced_torch_keys():
  # Dropout takes an index in ResnetBlock, so use_dropout shifts the second conv's key.
  state_dict = pth.read_state_dict(_fixture('resnet_6blocks_ngf8.pth'))
  with pytest.raises(convert.ConversionError, match='model.10.conv_block.5.weight') as e:
    convert.convert_network(state_dict,
                            _config(netG='resnet_6blocks', crop_size=64, use_dropout=False),
                            'generator', 'G.pth')
  assert 'use_dropout=False' in str(e.value)


def test_wrong_architecture_is_reported():
  state_dict = pth.read_state_dict(_fixture('resnet_6blocks_ngf8.pth'))
  with pytest.raises(convert.ConversionError, match="netG='unet_128'"):
    convert.convert_network(state_dict, _config(), 'generator', 'G.pth')


def _abstract_generator_variables(config):
  generator = models.create_generator(config.model, config.data.output_nc)
  shape = (1, config.data.crop_size, config.data.crop_size, config.data.input_nc)
  return jax.eval_shape(lambda: models.init_variables(generator, jax.random.PRNGKey(0), shape))


def _assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  jax.tree.map(np.testing.assert_array_equal, actual, expected)


def test_cli_writes_a_checkpoint_that_restore_generator_reads_back(tmp_path):
  workdir = str(tmp_path / 'converted')
  generator_pth = _fixture('unet_128_ngf8.pth')
  subprocess.run([sys.executable, '-m', 'p2p_jax.convert', '--config=configs/default.py',
                  '--config.model.netG=unet_128', '--config.model.ngf=8',
                  '--config.data.crop_size=128', f'--torch_generator={generator_pth}',
                  f'--workdir={workdir}'], cwd=REPO_ROOT, check=True, capture_output=True)
  config = _config()
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  restored, step = checkpointing.restore_generator(
      workdir, _abstract_generator_variables(config), sharding)
  assert step == 0
  expected = convert.convert_network(pth.read_state_dict(generator_pth), config,
                                     'generator')
  _assert_trees_equal(restored, expected)
  with pytest.raises(convert.ConversionError, match='already holds checkpoints'):
    convert.convert_checkpoint(config, workdir, generator_pth)


def test_generator_and_discriminator_give_a_train_state_to_fine_tune_from(tmp_path):
  workdir = str(tmp_path / 'converted')
  config = _config()
  convert.convert_checkpoint(config, workdir, _fixture('unet_128_ngf8.pth'),
                             _fixture('basic_D_ndf8.pth'))
  pix2pix = train.create_pix2pix(config, steps_per_epoch=1)
  manager = checkpointing.create_manager(workdir)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  starts = []
  state, _ = checkpointing.restore_or_initialize(
      manager, lambda: train.create_train_state(pix2pix, config, jax.random.PRNGKey(0)),
      sharding, starts.append)
  manager.close()
  assert starts == [0]  # No data position in a converted checkpoint: data from the start.
  assert int(state.step) == 0
  _assert_trees_equal(state.generator.variables, convert.convert_network(
      pth.read_state_dict(_fixture('unet_128_ngf8.pth')), config, 'generator'))
  _assert_trees_equal(state.discriminator.variables, convert.convert_network(
      pth.read_state_dict(_fixture('basic_D_ndf8.pth')), config, 'discriminator'))
  # Fresh Adam moments: fine-tuning starts like a new run from these weights.
  assert all(not np.any(x) for x in jax.tree.leaves(state.discriminator.opt_state))


def test_translate_in_eval_mode_reproduces_torch_outputs_end_to_end(tmp_path):
  """The issue's criterion through the CLIs: convert, then --mode=translate on 256x256 PNGs."""
  from PIL import Image
  name, workdir = 'unet_256_ngf4', str(tmp_path / 'converted')
  flags = ['--config=configs/default.py', '--config.model.ngf=4', f'--workdir={workdir}']
  run = lambda *args: subprocess.run([sys.executable, '-m', *args], cwd=REPO_ROOT,
                                     capture_output=True, text=True)
  result = run('p2p_jax.convert', *flags, f'--torch_generator={_fixture(name + ".pth")}')
  assert result.returncode == 0, result.stderr[-3000:]
  inputs = np.load(_fixture(f'{name}.npz'))['input']
  in_dir, out_dir = tmp_path / 'in', tmp_path / 'out'
  in_dir.mkdir()
  for i, image in enumerate(inputs):
    Image.fromarray(image).save(in_dir / f'{i}.png')
  result = run('p2p_jax.main', *flags, '--mode=translate', '--config.eval.mode=eval',
               f'--config.translate.input_dir={in_dir}', f'--config.translate.output_dir={out_dir}')
  assert result.returncode == 0, result.stderr[-3000:]
  _, torch_out = _inputs_and_torch_outputs(name)
  ours = np.stack([np.asarray(Image.open(out_dir / f'{i}.png')) for i in range(len(inputs))])
  assert np.abs(ours.astype(np.int32) - _quantise(torch_out)).max() <= 1
