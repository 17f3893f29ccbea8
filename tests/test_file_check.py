"""Every file checked before the first step: the listed error, skipping, the cache, the CLI."""
import os

import pytest

from conftest import make_tiny_config, tiny_flags, write_aligned_dataset
from p2p_jax import datasets, file_check
from test_train import main_command, run


def _truncate(path):
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) - 100])  # The header stays: only a full decode fails.


@pytest.fixture(scope='module')
def bad_data(tmp_path_factory):
  """Tiny JPEG A|B files, one truncated (only a full decode shows it) and one odd-shaped."""
  root = write_aligned_dataset(str(tmp_path_factory.mktemp('bad')), ext='.jpg')
  _truncate(os.path.join(root, 'train', '002.jpg'))
  return root


def test_every_bad_file_is_listed_with_its_reason_and_written_to_a_file(tiny_config, tmp_path):
  from PIL import Image
  data_dir = write_aligned_dataset(str(tmp_path / 'data'), counts=(('val', 2),))
  odd = os.path.join(data_dir, 'val', 'odd.png')
  Image.new('RGB', (33, 16)).save(odd)
  tiny_config.data.data_dir = data_dir
  source = datasets.get_source(tiny_config, 'val')
  with pytest.raises(ValueError, match=r"(?s)1 of 3 files of split 'val' cannot be used .*"
                     r"\n  \S*odd.png: an A\|B image must be twice as wide"):
    file_check.checked_source(source, tiny_config, 'val', str(tmp_path))
  assert (tmp_path / 'bad_files_val.txt').read_text().startswith(f'{odd}: an A|B image')


def test_threads_find_the_same_bad_files_and_the_cache_skips_a_second_check(
    bad_data, tiny_config, tmp_path, monkeypatch):
  tiny_config.data.data_dir = bad_data
  tiny_config.data.skip_bad_images = True
  source = datasets.get_source(tiny_config, 'train')
  bad = file_check.check_records(source, num_threads=2)
  assert bad == file_check.check_records(source, num_threads=0)
  assert [i for i, _ in bad] == [2] and 'truncated' in bad[0][1]
  checked = file_check.checked_source(source, tiny_config, 'train', str(tmp_path))
  assert [os.path.basename(r) for r in checked.records] == [
      '000.jpg', '001.jpg', '003.jpg', '004.jpg', '005.jpg']
  # The cache key holds names and values only, so another process computes the same one.
  assert file_check.decode_settings(source.decode) == (
      "p2p_jax.datasets.decode_aligned((), [('check_shape', True), ('direction', 'AtoB'), "
      "('input_nc', 3), ('output_nc', 3)])")
  monkeypatch.setattr(file_check, 'check_records', lambda *a: pytest.fail('checked again'))
  assert file_check.checked_source(source, tiny_config, 'train',
                                   str(tmp_path)).records == checked.records


def test_cli_run_with_a_truncated_jpeg_fails_before_step_one_and_trains_when_skipping(
    bad_data, tmp_path):
  overrides = tiny_flags(**{'data.data_dir': bad_data, 'optim.num_train_steps': 2})
  workdir = str(tmp_path / 'run')
  result = run(main_command(workdir, 'configs/default.py', *overrides))
  assert result.returncode == 1
  bad = os.path.join(bad_data, 'train', '002.jpg')
  assert (f"ERROR: 1 of 6 files of split 'train' cannot be used (fix or remove them, or set "
          f'config.data.skip_bad_images=True to leave them out); all of them are listed in '
          f'{workdir}/bad_files_train.txt:\n  {bad}: corrupt or truncated image') in result.stderr
  assert 'training steps 0 ->' not in result.stderr  # Before the model and the first step.
  assert 'leaked' not in result.stderr
  result = run(main_command(workdir, 'configs/default.py', *overrides,
                            '--config.data.skip_bad_images=True'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Left out 1 bad file(s) of 6 in split 'train'" in result.stderr
  assert '5 training examples' in result.stderr
  # The run's cache is valid in another process (this one): a resume does not decode again.
  config = make_tiny_config(**{'data.data_dir': bad_data})
  cache = file_check.epath.Path(workdir) / 'data_check' / 'train.json'
  source = datasets.get_source(config, 'train')
  cached = file_check._read_cache(cache, file_check._cache_key(source))
  assert [i for i, _ in cached] == [2] and cached[0][1].startswith(f'{bad}: corrupt')
