"""A run you cannot lose, through the CLI: the workdir lock, Ctrl-C, damaged checkpoints,
config changes on resume, outputs that spare inputs, and expected errors as one line."""
import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT, tiny_flags, write_aligned_dataset

PYTHON_ERROR_MARKERS = ('Traceback', 'Event loop is closed', 'sys.meta_path is None')


def command(workdir, *overrides, mode='train'):
  return [sys.executable, '-m', 'p2p_jax.main', '--config=configs/default.py',
          f'--workdir={workdir}', f'--mode={mode}', *overrides]


def run(cmd, cwd=REPO_ROOT, timeout=600):
  return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def saved_steps(workdir):
  paths = glob.glob(os.path.join(workdir, 'checkpoints', '*'))
  return sorted(int(os.path.basename(p)) for p in paths if os.path.basename(p).isdigit())


def assert_one_error_line(result, *fragments):
  """Exit 1 and one ``ERROR:`` line holding ``fragments``, with no traceback on the console."""
  assert result.returncode == 1, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('ERROR:')]
  assert len(errors) == 1, result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]
  for marker in PYTHON_ERROR_MARKERS:
    assert marker not in result.stderr, result.stderr[-3000:]
  return errors[0]


def wait_for(predicate, process, seconds=300):
  deadline = time.time() + seconds
  while not predicate():
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.time() < deadline, 'timed out'
    time.sleep(0.05)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return write_aligned_dataset(str(tmp_path_factory.mktemp('data')))


@pytest.fixture(scope='module')
def trained(tmp_path_factory, data_dir):
  """A workdir trained 2 steps (checkpoints 1 and 2), to copy for each test."""
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  result = run(command(workdir, *tiny_flags(**{'data.data_dir': data_dir,
                                               'optim.num_train_steps': 2,
                                               'checkpoint_every_steps': 1})))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def copy_of(trained, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir)
  return workdir


def train_flags(data_dir, steps, **overrides):
  return tiny_flags(**{'data.data_dir': data_dir, 'optim.num_train_steps': steps,
                       'checkpoint_every_steps': 1, **overrides})


@contextlib.contextmanager
def long_run(workdir, data_dir):
  """A trainer that runs until stopped; yields its process once it has saved a checkpoint."""
  process = subprocess.Popen(
      command(workdir, *train_flags(data_dir, 1_000_000, checkpoint_every_steps=1000,
                                    log_every_steps=1)),
      cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    yield process
  finally:
    if process.poll() is None:
      process.kill()
      process.communicate()


def test_second_trainer_exits_at_once_naming_the_holder_and_a_dead_holder_is_taken_over(
    tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  lock = os.path.join(workdir, 'train.lock')
  with long_run(workdir, data_dir) as first:
    wait_for(lambda: os.path.isfile(lock) and str(first.pid) in open(lock).read(), first)
    start = time.time()
    second = run(command(workdir, *train_flags(data_dir, 2)))
    assert_one_error_line(second, 'in use by another trainer', f'pid {first.pid}')
    assert time.time() - start < 60  # Refused before building anything.
    first.kill()
    first.communicate()
  third = run(command(workdir, *train_flags(data_dir, 2)))
  assert third.returncode == 0, third.stderr[-3000:]
  assert 'ended without releasing it' in third.stderr and f'pid {first.pid}' in third.stderr
  assert open(lock).read() == ''  # Released on exit.


def test_first_ctrl_c_saves_and_exits_zero(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  with long_run(workdir, data_dir) as process:
    wait_for(lambda: os.path.isfile(os.path.join(workdir, 'log.txt')) and
             '] [3] ' in open(os.path.join(workdir, 'log.txt')).read(), process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-3000:]
  assert 'resume by running the same command' in stderr
  assert 'KeyboardInterrupt' not in stderr and 'Traceback' not in stderr
  assert saved_steps(workdir) and saved_steps(workdir)[-1] >= 3


def test_damaged_latest_checkpoint_is_set_aside_and_the_previous_one_resumes(
    tmp_path, trained, data_dir):
  workdir = copy_of(trained, tmp_path)
  files = [f for f in glob.glob(os.path.join(workdir, 'checkpoints', '2', 'generator', '**'),
                                recursive=True) if os.path.isfile(f)]
  largest = max(files, key=os.path.getsize)
  with open(largest, 'r+b') as f:
    f.truncate(os.path.getsize(largest) // 2)
  # Eval only reads: it falls back to step 1 and leaves step 2 where it is.
  evaluated = run(command(workdir, *train_flags(data_dir, 3), mode='eval'))
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert os.path.isdir(os.path.join(workdir, 'eval', '1')) and saved_steps(workdir) == [1, 2]
  # Training sets step 2 aside and resumes from step 1.
  result = run(command(workdir, *train_flags(data_dir, 3)))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Checkpoint step 2 could not be restored (item 'generator'" in result.stderr
  assert 'Restored the train state from' in result.stderr and '/checkpoints/1' in result.stderr
  assert glob.glob(os.path.join(workdir, 'checkpoints_set_aside', '2-*', 'generator'))
  assert saved_steps(workdir)[-1] == 3


def test_changed_model_shape_on_resume_is_one_clear_error(tmp_path, trained, data_dir):
  workdir = copy_of(trained, tmp_path)
  result = run(command(workdir, *train_flags(data_dir, 3, **{'model.ngf': 16})))
  assert_one_error_line(result, 'model.ngf: 8 -> 16')
  assert saved_steps(workdir) == [1, 2]


def test_changed_batch_size_on_resume_is_refused_unless_accepted(tmp_path, trained, data_dir):
  workdir = copy_of(trained, tmp_path)
  flags = train_flags(data_dir, 3, **{'data.batch_size': 4})
  assert_one_error_line(run(command(workdir, *flags)), 'data.batch_size: 2 -> 4',
                        '--accept_config_changes')
  accepted = run(command(workdir, *flags, '--accept_config_changes'))
  assert accepted.returncode == 0, accepted.stderr[-3000:]
  assert 'Resuming' in accepted.stderr and 'data.batch_size: 2 -> 4' in accepted.stderr
  assert saved_steps(workdir)[-1] == 3


def test_translate_refuses_to_write_over_its_inputs(tmp_path, trained, data_dir):
  in_dir = tmp_path / 'in'
  in_dir.mkdir()
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(in_dir / 'a.png')
  before = (in_dir / 'a.png').read_bytes()
  flags = train_flags(data_dir, 2, **{'translate.input_dir': in_dir})
  same = run(command(trained, *flags, f'--config.translate.output_dir={in_dir}',
                     mode='translate'))
  assert_one_error_line(same, 'is the input folder')
  out_dir = tmp_path / 'out'
  out_dir.mkdir()
  (out_dir / 'a.png').write_bytes(b'keep me')
  existing = run(command(trained, *flags, f'--config.translate.output_dir={out_dir}',
                         mode='translate'))
  assert_one_error_line(existing, 'already holds 1 of the outputs', 'translate.overwrite')
  assert (in_dir / 'a.png').read_bytes() == before
  assert (out_dir / 'a.png').read_bytes() == b'keep me'
  empty = tmp_path / 'empty'
  empty.mkdir()
  assert_one_error_line(run(command(trained, *train_flags(
      data_dir, 2, **{'translate.input_dir': empty, 'translate.output_dir': out_dir}),
      mode='translate')), 'holds no files to translate')


def test_full_disk_is_one_error_line_and_earlier_checkpoints_stay(tmp_path, trained, data_dir):
  mount_point = tmp_path / 'small_disk'
  mount_point.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=12M', 'tmpfs', str(mount_point)],
                    capture_output=True).returncode != 0:
    pytest.skip('mounting a small tmpfs needs root')
  try:
    workdir = str(mount_point / 'run')
    shutil.copytree(os.path.join(trained, 'checkpoints', '1'),
                    os.path.join(workdir, 'checkpoints', '1'))
    with open(os.path.join(mount_point, 'filler'), 'wb') as f:  # Leave too little for a step.
      free = shutil.disk_usage(mount_point).free
      f.write(b'\0' * max(0, free - 100_000))
    result = run(command(workdir, *train_flags(data_dir, 3)))
    assert_one_error_line(result, 'No space left on device')
    assert saved_steps(workdir) == [1]
    os.remove(os.path.join(mount_point, 'filler'))
    resumed = run(command(workdir, *train_flags(data_dir, 3)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert saved_steps(workdir)[-1] == 3
  finally:
    subprocess.run(['umount', '-l', str(mount_point)], check=False)


@pytest.mark.parametrize('flag, fragment', [
    ('--config.data.batch_size=0', 'config.data.batch_size=0'),
    ('--config.data.preprocess=zoom', 'config.data.preprocess'),
])
def test_bad_option_is_one_error_line_without_the_config_dump(tmp_path, data_dir, flag,
                                                              fragment):
  result = run(command(str(tmp_path / 'run'), *train_flags(data_dir, 2), flag))
  assert_one_error_line(result, fragment)
  assert len(result.stderr.splitlines()) < 15, result.stderr
  assert 'Config:' in open(tmp_path / 'run' / 'log.txt').read()  # The dump went to the log.


def test_eval_batch_size_zero_and_zero_samples_name_the_option(trained, data_dir):
  eval_flags = train_flags(data_dir, 2)
  assert_one_error_line(run(command(trained, *eval_flags, '--config.eval.batch_size=0',
                                    mode='eval')), 'config.eval.batch_size=0')
  assert_one_error_line(run(command(trained, *eval_flags, '--config.eval.num_samples=0',
                                    mode='eval')), 'config.eval.num_samples=0 must be at least 1')


def test_cli_runs_from_another_directory_and_expands_a_tilde_workdir(tmp_path, data_dir):
  home = tmp_path / 'home'
  home.mkdir()
  result = subprocess.run(
      [sys.executable, '-m', 'p2p_jax.main', '--config=configs/default.py',
       '--workdir=~/run', *train_flags(data_dir, 1)],
      cwd=str(tmp_path), capture_output=True, text=True, timeout=600,
      env={**os.environ, 'HOME': str(home), 'PYTHONPATH': REPO_ROOT})
  assert result.returncode == 0, result.stderr[-3000:]
  assert saved_steps(str(home / 'run')) == [1]
  assert not (tmp_path / '~').exists()
  assert "Unable to initialize backend 'tpu'" not in result.stderr
