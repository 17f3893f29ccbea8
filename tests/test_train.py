"""The trainer through its CLI, in subprocesses: demo run, exact resume, preemption, errors."""
import glob
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO_ROOT, tiny_flags, write_aligned_dataset


def main_command(workdir, config='configs/default.py', *overrides):
  return [sys.executable, '-m', 'p2p_jax.main', f'--config={config}', f'--workdir={workdir}',
          *overrides]


def tiny_overrides(data_dir, num_steps, checkpoint_every):
  return tiny_flags(**{'data.data_dir': data_dir, 'optim.num_train_steps': num_steps,
                       'checkpoint_every_steps': checkpoint_every})


def run(command, timeout=600):
  result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)
  return result


def saved_steps(workdir):
  """Finalised checkpoint steps (orbax renames a step's tmp folder into place when done)."""
  paths = glob.glob(os.path.join(workdir, 'checkpoints', '*'))
  return sorted(int(os.path.basename(p)) for p in paths if os.path.basename(p).isdigit())


def restore_item(workdir, step, item):
  path = os.path.join(workdir, 'checkpoints', str(step), item)
  return ocp.PyTreeCheckpointer().restore(os.path.abspath(path))


def kill_after_first_save(command, steps) -> list:
  """Runs ``command``, SIGKILLs it once ``steps()`` lists a checkpoint; returns ``steps()``."""
  process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not steps() and time.time() < deadline and process.poll() is None:
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  return steps()


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
  return write_aligned_dataset(str(tmp_path_factory.mktemp('aligned')))


def read_event_tags(logdir):
  from tensorboard.backend.event_processing import event_accumulator
  files = glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))
  assert files, f'no event files in {logdir}'
  acc = event_accumulator.EventAccumulator(logdir, size_guidance={'tensors': 0, 'images': 0})
  acc.Reload()
  return acc


def test_readme_demo_command_trains_and_leaves_checkpoint_and_events(tmp_path, demo_dir):
  workdir = str(tmp_path / 'demo')
  result = run(main_command(workdir, 'configs/demo.py', '--config.optim.num_train_steps=4',
                            f'--config.data.data_dir={demo_dir}'))
  assert result.returncode == 0, result.stderr[-5000:]
  assert saved_steps(workdir) == [4]
  acc = read_event_tags(workdir)
  tags = set(acc.Tags()['tensors'])
  for scalar in ('G_GAN', 'G_L1', 'D_real', 'D_fake', 'lr', 'steps_per_sec', 'heldout_L1'):
    assert scalar in tags, (scalar, tags)
  assert {'train/input_generated_target', 'heldout/input_generated_target'} <= tags
  g_l1 = acc.Tensors('G_L1')[-1]
  assert g_l1.step == 4 and np.isfinite(np.frombuffer(g_l1.tensor_proto.tensor_content,
                                                      np.float32)).all()


def test_killed_run_resumes_bit_identically(tmp_path, tiny_data):
  num_steps = 60
  straight, killed = str(tmp_path / 'straight'), str(tmp_path / 'killed')
  overrides = tiny_overrides(tiny_data, num_steps, checkpoint_every=4)
  result = run(main_command(straight, 'configs/default.py', *overrides))
  assert result.returncode == 0, result.stderr[-5000:]

  killed_at = kill_after_first_save(main_command(killed, 'configs/default.py', *overrides),
                                    lambda: saved_steps(killed))
  assert killed_at and killed_at[-1] < num_steps, killed_at  # Killed mid-run, after a save.

  result = run(main_command(killed, 'configs/default.py', *overrides))
  assert result.returncode == 0, result.stderr[-5000:]
  assert 'Restored the train state from' in result.stderr
  restored_from = [l for l in result.stderr.splitlines() if 'Restored the train state' in l]
  for item in ('train_state', 'generator'):
    a, b = restore_item(straight, num_steps, item), restore_item(killed, num_steps, item)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y, err_msg=f'{item} after '
                                                            f'{killed_at}, {restored_from}'), a, b)


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path, tiny_data):
  workdir = str(tmp_path / 'preempted')
  overrides = tiny_overrides(tiny_data, 1_000_000, checkpoint_every=50)
  process = subprocess.Popen(main_command(workdir, 'configs/default.py', *overrides),
                             cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
  deadline = time.time() + 300
  while not saved_steps(workdir) and time.time() < deadline and process.poll() is None:
    time.sleep(0.05)
  first = saved_steps(workdir)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-5000:]
  steps = saved_steps(workdir)
  assert steps[-1] > first[-1] and steps[-1] % 50 != 0, (first, steps)  # Saved on the signal.
  state = restore_item(workdir, steps[-1], 'train_state')
  assert int(state['step']) == steps[-1]
  assert 'Stopped at step' in stderr
  assert not glob.glob(os.path.join(workdir, 'checkpoints', '*tmp*'))  # Save completed.


def test_non_finite_loss_stops_loudly_and_keeps_the_good_checkpoint(tmp_path, tiny_data):
  workdir = str(tmp_path / 'nan')
  overrides = tiny_overrides(tiny_data, 2, checkpoint_every=1)
  assert run(main_command(workdir, 'configs/default.py', *overrides)).returncode == 0
  good = restore_item(workdir, 2, 'generator')
  # Resume the same run with a learning rate that makes step 3 diverge.
  overrides = tiny_overrides(tiny_data, 50, checkpoint_every=1) + [
      '--config.optim.lr=1e30', '--config.log_every_steps=1', '--accept_config_changes']
  result = run(main_command(workdir, 'configs/default.py', *overrides))
  assert result.returncode != 0
  assert re.search(r'Non-finite loss .* at step 3\. Stopping; the last good checkpoint is step 2 ',
                   result.stderr), result.stderr[-3000:]
  assert saved_steps(workdir) == [1, 2]
  jax.tree.map(np.testing.assert_array_equal, restore_item(workdir, 2, 'generator'), good)


def test_config_typo_is_a_clear_flag_error(tmp_path):
  result = run(main_command(str(tmp_path / 'typo'), 'configs/default.py',
                            '--config.batchsize=2'))
  assert result.returncode != 0
  assert 'batchsize' in result.stderr


def test_a_failing_run_with_a_worker_process_leaves_no_leaked_shared_memory(tmp_path, tiny_data):
  # A run that ends normally with a worker: test_paired's CLI runs assert the same.
  overrides = tiny_overrides(tiny_data, 2, checkpoint_every=2) + [
      '--config.data.num_workers=1', '--config.optim.lr=1e30', '--config.log_every_steps=1']
  result = run(main_command(str(tmp_path / 'run'), 'configs/default.py', *overrides))
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'ERROR: Non-finite loss' in result.stderr  # Diverged, the worker's batches in flight.
  assert 'leaked' not in result.stderr, result.stderr[-3000:]
