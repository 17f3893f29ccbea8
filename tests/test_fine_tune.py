"""Fine-tuning from imported weights through the CLIs: convert -> train -> SIGKILL -> resume."""
import os
import shutil
import sys

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, tiny_flags, write_aligned_dataset
from test_train import kill_after_first_save, main_command, restore_item, run, saved_steps

FIXTURES = os.path.join(REPO_ROOT, 'tests', 'fixtures')
NUM_STEPS = 8
# The fixtures' shapes (tests/fixtures/make_torch_fixtures.py): a unet_128 G and basic D.
MODEL = {'model.netG': 'unet_128', 'model.ngf': 8, 'model.ndf': 8, 'data.load_size': 128,
         'data.crop_size': 128}


def _flags(data_dir, **overrides):
  return tiny_flags(**{**MODEL, 'data.data_dir': data_dir, 'optim.num_train_steps': NUM_STEPS,
                       'checkpoint_every_steps': 2, **overrides})


def _trained_steps(workdir):
  return [s for s in saved_steps(workdir) if s > 0]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """convert's output, then an uninterrupted fine-tune of it in its own workdir."""
  root = tmp_path_factory.mktemp('fine_tune')
  data_dir = write_aligned_dataset(str(root / 'data'), side=128)
  converted = str(root / 'converted')
  result = run([sys.executable, '-m', 'p2p_jax.convert', '--config=configs/default.py',
                *tiny_flags(**MODEL), f'--torch_generator={FIXTURES}/unet_128_ngf8.pth',
                f'--torch_discriminator={FIXTURES}/basic_D_ndf8.pth', f'--workdir={converted}'])
  assert result.returncode == 0, result.stderr[-3000:]
  straight = str(root / 'straight')
  shutil.copytree(converted, straight)
  result = run(main_command(straight, 'configs/default.py', *_flags(data_dir)))
  assert result.returncode == 0, result.stderr[-5000:]
  return {'root': root, 'data_dir': data_dir, 'converted': converted, 'straight': straight,
          'stderr': result.stderr}


def _assert_same_final_state(workdir_a, workdir_b):
  for item in ('train_state', 'generator'):
    jax.tree.map(np.testing.assert_array_equal, restore_item(workdir_a, NUM_STEPS, item),
                 restore_item(workdir_b, NUM_STEPS, item))


def test_converted_workdir_trains_as_a_new_run_from_its_weights_and_keeps_them(runs):
  assert 'New run from checkpoint' in runs['stderr']
  assert 'generator weights, discriminator weights from it; fresh Adam moments' in runs['stderr']
  assert saved_steps(runs['straight']) == [0, NUM_STEPS - 2, NUM_STEPS]  # Step 0 is kept.
  state = restore_item(runs['straight'], NUM_STEPS, 'train_state')
  assert int(state['step']) == NUM_STEPS
  # The imported weights moved: the run trained them rather than fresh ones.
  converted = restore_item(runs['converted'], 0, 'generator')
  trained = restore_item(runs['straight'], NUM_STEPS, 'generator')
  assert not np.array_equal(jax.tree.leaves(converted)[0], jax.tree.leaves(trained)[0])


def test_killed_fine_tune_resumes_bit_identically(runs):
  killed = str(runs['root'] / 'killed')
  shutil.copytree(runs['converted'], killed)
  command = main_command(killed, 'configs/default.py', *_flags(runs['data_dir']))
  killed_at = kill_after_first_save(command, lambda: _trained_steps(killed))
  assert killed_at and killed_at[-1] < NUM_STEPS, killed_at  # Killed mid-run, after a save.
  result = run(command)
  assert result.returncode == 0, result.stderr[-5000:]
  assert 'Restored the train state from' in result.stderr
  _assert_same_final_state(runs['straight'], killed)


def test_init_from_another_workdir_starts_the_same_run(runs):
  fresh = str(runs['root'] / 'init_from')
  result = run(main_command(fresh, 'configs/default.py', *_flags(
      runs['data_dir'], init_from=f'{runs["converted"]}:0')))
  assert result.returncode == 0, result.stderr[-5000:]
  assert saved_steps(fresh) == [NUM_STEPS - 2, NUM_STEPS]
  _assert_same_final_state(runs['straight'], fresh)


def test_init_from_errors_name_the_option_and_the_steps_there(runs):
  from p2p_jax import checkpointing
  with pytest.raises(ValueError, match=r"config.init_from='.*:7': no checkpoint for step 7 .*"
                     r"steps there: \[0\]"):
    checkpointing.resolve_init_from(f'{runs["converted"]}:7')
  with pytest.raises(ValueError, match='no checkpoints folder at'):
    checkpointing.resolve_init_from(str(runs['root'] / 'missing'))
  directory, step = checkpointing.resolve_init_from(runs['converted'])
  assert step == 0 and directory.name == 'checkpoints'


def test_a_generator_alone_seeds_a_run_with_a_fresh_discriminator(tmp_path):
  from conftest import make_tiny_config
  from p2p_jax import checkpointing, convert, train
  config = make_tiny_config(**MODEL)
  workdir = str(tmp_path / 'converted')
  convert.convert_checkpoint(config, workdir, f'{FIXTURES}/unet_128_ngf8.pth')
  pix2pix = train.create_pix2pix(config, steps_per_epoch=1)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  init = lambda: train.create_train_state(pix2pix, config, jax.random.PRNGKey(config.seed))
  starts = []
  state, _ = checkpointing.initialize_from(checkpointing.checkpoint_dir(workdir), 0, init,
                                           sharding, starts.append, config)
  fresh = init()
  assert starts == [0] and int(state.step) == 0
  jax.tree.map(np.testing.assert_array_equal, state.discriminator, fresh.discriminator)
  np.testing.assert_array_equal(state.rng, fresh.rng)
  converted = convert.convert_network(convert.pth.read_state_dict(
      f'{FIXTURES}/unet_128_ngf8.pth'), config, 'generator')
  jax.tree.map(np.testing.assert_array_equal, state.generator.variables, converted)
  with pytest.raises(ValueError, match='init_keep_optimizer=True, but checkpoint .* holds no '
                     'optimizer state'):
    checkpointing.initialize_from(checkpointing.checkpoint_dir(workdir), 0, init, sharding,
                                  starts.append, config, keep_optimizer=True)


def test_init_keep_optimizer_keeps_the_adam_moments_and_restarts_the_schedule(runs):
  import optax
  from conftest import make_tiny_config
  from p2p_jax import checkpointing, train
  config = make_tiny_config(**MODEL)
  pix2pix = train.create_pix2pix(config, steps_per_epoch=1)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  init = lambda: train.create_train_state(pix2pix, config, jax.random.PRNGKey(config.seed))
  state, _ = checkpointing.initialize_from(checkpointing.checkpoint_dir(runs['straight']),
                                           NUM_STEPS, init, sharding, lambda s: None, config,
                                           keep_optimizer=True)
  saved = restore_item(runs['straight'], NUM_STEPS, 'train_state')
  assert int(state.step) == 0
  adam, schedule = state.generator.opt_state[0], state.generator.opt_state[1]
  assert isinstance(adam, optax.ScaleByAdamState) and int(adam.count) == NUM_STEPS
  np.testing.assert_array_equal(jax.tree.leaves(adam.mu)[0],
                                jax.tree.leaves(saved['generator']['opt_state']['0']['mu'])[0])
  counts = [x.count for x in jax.tree.leaves(
      schedule, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
      if isinstance(x, optax.ScaleByScheduleState)]
  assert counts and all(int(c) == 0 for c in counts)
