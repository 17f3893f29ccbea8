"""Multi-host training with real processes: JAX's distributed runtime on 127.0.0.1.

Each process has 2 fake CPU devices and uses gloo collectives; all runs go through the CLI.
Compilation dominates, so the module starts few runs: one two-process run, preempted with
SIGTERM on one process after a few steps, serves most tests; a second one is killed.
(No persistent compilation cache: on CPU only process 0's programs hit it, and a process that
reaches the first collective 30 s before the other fails gloo's rendezvous.)
"""
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO_ROOT, tiny_flags, write_aligned_dataset
from p2p_jax import parallel

LOSSES = ('D_fake', 'D_real', 'G_GAN', 'G_L1')
TIMEOUT = 420  # Seconds for one run; a run that takes longer is a hang.


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def environment(num_devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={num_devices}'])
  return env


def command(workdir: str, data_dir: str, num_steps: int, *overrides: str) -> list:
  """The CLI on the tiny config: global batch 4, a loss line every step."""
  return [sys.executable, '-m', 'p2p_jax.main', '--config=configs/default.py',
          f'--workdir={workdir}', '--heartbeat_timeout_seconds=10',
          *tiny_flags(**{'data.data_dir': data_dir, 'data.batch_size': 4,
                         'optim.num_train_steps': num_steps, 'log_every_steps': 1,
                         'checkpoint_every_steps': 1000}), *overrides]


class Run:
  """Processes started together, each logging to its own file."""

  def __init__(self, commands: list, env: dict, log_dir: str):
    os.makedirs(log_dir, exist_ok=True)
    self.logs = [os.path.join(log_dir, f'process_{i}.log') for i in range(len(commands))]
    self.processes = []
    for cmd, log in zip(commands, self.logs):
      with open(log, 'w') as f:
        self.processes.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=f,
                                               stderr=subprocess.STDOUT))

  def log(self, index: int) -> str:
    with open(self.logs[index]) as f:
      return f.read()

  def wait(self, timeout: float = TIMEOUT) -> list:
    """Return codes; kills every process and fails if any runs past ``timeout``."""
    deadline = time.time() + timeout
    try:
      return [p.wait(timeout=max(1, deadline - time.time())) for p in self.processes]
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f'Processes still running after {timeout} s:\n' + self.log(0)[-3000:])

  def wait_for_step(self, index: int, step: int, timeout: float = TIMEOUT) -> None:
    """Blocks until process ``index`` has logged the losses of ``step``."""
    deadline = time.time() + timeout
    while step not in losses(self.log(index)):
      if time.time() > deadline or any(p.poll() is not None for p in self.processes):
        self.kill()
        pytest.fail(f'Process {index} never logged step {step}:\n' + self.log(index)[-3000:])
      time.sleep(0.2)

  def kill(self) -> None:
    for p in self.processes:
      if p.poll() is None:
        p.kill()
        p.wait()


def two_processes(workdir, data_dir, num_steps, log_dir, *overrides) -> Run:
  address = f'127.0.0.1:{free_port()}'
  commands = [command(workdir, data_dir, num_steps, *overrides,
                      f'--coordinator_address={address}',
                      '--num_processes=2',
                      f'--process_id={i}') for i in range(2)]
  return Run(commands, environment(2), log_dir)


def one_process(workdir, data_dir, num_steps, num_devices, log_dir) -> Run:
  # No image grids: they compile the generator twice and are not compared.
  return Run([command(workdir, data_dir, num_steps, '--config.num_image_examples=0')],
             environment(num_devices), log_dir)


def losses(log: str) -> dict:
  """``{step: {loss: value}}`` from the clu logging writer's lines."""
  found = {}
  for step, values in re.findall(r'\] \[(\d+)\] (D_fake=.*)', log):
    pairs = dict(pair.split('=') for pair in values.split(', '))
    found[int(step)] = {k: float(pairs[k]) for k in LOSSES}
  return found


def assert_close(first: dict, second: dict, steps) -> None:
  for step in steps:
    for k in LOSSES:  # Logged with 6 significant digits; reduction order may differ.
      np.testing.assert_allclose(first[step][k], second[step][k], rtol=1e-4,
                                 err_msg=f'{k} at step {step}')


def test_distributed_settings_come_from_the_flags_then_the_environment(monkeypatch):
  for variable in parallel.ENV_VARS.values():
    monkeypatch.delenv(variable, raising=False)
  assert parallel.distributed_settings() == dict(
      coordinator_address=None, num_processes=None, process_id=None)  # Auto-detected.
  monkeypatch.setenv('P2P_COORDINATOR_ADDRESS', '10.0.0.1:1234')
  monkeypatch.setenv('P2P_NUM_PROCESSES', '4')
  monkeypatch.setenv('P2P_PROCESS_ID', '0')
  assert parallel.distributed_settings(process_id=3) == dict(
      coordinator_address='10.0.0.1:1234', num_processes=4, process_id=3)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('multihost')
  return {'root': root, 'data': write_aligned_dataset(str(root / 'aligned'))}


@pytest.fixture(scope='module')
def two_process_run(setup):
  """Two processes x 2 devices, SIGTERM to process 1 once it has done two steps."""
  workdir = str(setup['root'] / 'two_processes')
  run = two_processes(workdir, setup['data'], 1000, str(setup['root'] / 'two_process_logs'))
  run.wait_for_step(1, 2)
  run.processes[1].send_signal(signal.SIGTERM)
  returncodes = run.wait()
  stopped = [re.findall(r'Stopped at step (\d+) on request', run.log(i)) for i in range(2)]
  step = int(stopped[0][0]) if stopped[0] else None
  return {'workdir': workdir, 'run': run, 'returncodes': returncodes, 'stopped': stopped,
          'step': step}


@pytest.fixture(scope='module')
def one_process_run(setup, two_process_run):
  """The reference: one process on 4 devices, one step further than the two processes."""
  assert two_process_run['step'], 'the two-process run did not stop on SIGTERM'
  run = one_process(str(setup['root'] / 'one_process'), setup['data'],
                    two_process_run['step'] + 1, 4, str(setup['root'] / 'one_process_logs'))
  (returncode,) = run.wait()
  assert returncode == 0, run.log(0)[-5000:]
  return losses(run.log(0))


def test_two_processes_exit_zero_and_log_identical_losses_at_every_step(two_process_run):
  run = two_process_run['run']
  for i, returncode in enumerate(two_process_run['returncodes']):
    assert returncode == 0, run.log(i)[-5000:]
  assert 'Process 1 of 2; 2 local / 4 global devices' in run.log(1)
  first, second = losses(run.log(0)), losses(run.log(1))
  assert sorted(first) == list(range(1, two_process_run['step'] + 1))
  assert first == second


def test_two_processes_equal_one_process_on_four_devices(two_process_run, one_process_run):
  assert_close(losses(two_process_run['run'].log(0)), one_process_run,
               range(1, two_process_run['step'] + 1))


def test_sigterm_to_one_process_stops_both_at_the_same_step_after_a_save(two_process_run):
  stopped, step = two_process_run['stopped'], two_process_run['step']
  assert stopped[0] == stopped[1] and len(stopped[0]) == 1, stopped
  assert 2 < step < 1000
  checkpoints = os.path.join(two_process_run['workdir'], 'checkpoints')
  assert os.listdir(checkpoints) == [str(step)]  # Finalised: no orbax tmp folder left.
  iterator_states = os.listdir(os.path.join(checkpoints, str(step), 'data_iterator'))
  assert {'process_0-of-2.json', 'process_1-of-2.json'} <= set(iterator_states)


def test_only_process_zero_writes_event_files(two_process_run):
  events = glob.glob(os.path.join(two_process_run['workdir'], '**', '*tfevents*'),
                     recursive=True)
  assert len(events) == 1, events
  # The file name ends in .<hostname>.<pid>.<n>.v2.
  assert events[0].split('.')[-3] == str(two_process_run['run'].processes[0].pid)


def test_two_process_checkpoint_resumes_in_one_process_on_one_device(two_process_run,
                                                                     one_process_run, setup):
  workdir, step = str(setup['root'] / 'resumed'), two_process_run['step']
  shutil.copytree(two_process_run['workdir'], workdir)
  run = one_process(workdir, setup['data'], step + 1, 1, str(setup['root'] / 'resumed_logs'))
  (returncode,) = run.wait()
  log = run.log(0)
  assert returncode == 0, log[-5000:]
  assert 'Process 0 of 1; 1 local / 1 global devices' in log
  assert f'Restored the train state from {workdir}/checkpoints/{step}' in log
  assert f'input pipeline resumes at global batch {step}' in log
  # Same weights, optimizer state and next global batch as the uninterrupted run.
  assert sorted(losses(log)) == [step + 1]
  assert_close(losses(log), one_process_run, [step + 1])


def test_killing_one_process_makes_the_other_exit_with_a_clear_error(setup):
  run = two_processes(str(setup['root'] / 'killed'), setup['data'], 1000,
                      str(setup['root'] / 'killed_logs'), '--config.num_image_examples=0')
  run.wait_for_step(0, 1)
  run.processes[1].send_signal(signal.SIGKILL)
  killed_at = time.time()
  returncode = run.wait(timeout=120)[0]
  elapsed = time.time() - killed_at
  log = run.log(0)
  assert returncode != 0, log[-5000:]
  assert elapsed < 60, elapsed  # Heartbeat timeout 10 s, plus margin for a loaded machine.
  # The coordination service names the cause, whether the survivor was blocked in a collective
  # (gloo fails at once, then the shutdown barrier waits for the heartbeat) or not.
  assert re.search(r'another task died|heartbeat timeout|stopped sending heartbeats',
                   log), log[-5000:]
