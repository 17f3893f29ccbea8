"""Validation during training and the best checkpoint, through the CLI in subprocesses."""
import json
import os

import numpy as np
import pytest

from conftest import make_tiny_config, set_field, tiny_flags, write_aligned_dataset
from test_train import main_command, read_event_tags, run, saved_steps


def scalar_series(acc, tag):
  return {event.step: float(np.frombuffer(event.tensor_proto.tensor_content, np.float32)[0])
          for event in acc.Tensors(tag)}


def test_validation_scores_go_to_tensorboard_and_eval_step_best_restores_the_lowest_val_l1(
    tmp_path):
  data_dir = write_aligned_dataset(str(tmp_path / 'data'),
                                   counts=(('train', 6), ('val', 3), ('test', 2)))
  workdir = str(tmp_path / 'run')
  flags = tiny_flags(**{'data.data_dir': data_dir, 'eval_every_steps': 2,
                        'checkpoint_every_steps': 100, 'max_to_keep': 1,
                        'num_image_examples': 0,  # No image grids: one compile fewer.
                        'optim.lr': 0.02})  # A large LR, so val L1 moves between steps.
  result = run(main_command(workdir, 'configs/default.py', *flags,
                            '--config.optim.num_train_steps=4'))
  assert result.returncode == 0, result.stderr[-5000:]
  # Resumed (after a restart the ranking comes back from the checkpoints' saved metrics).
  result = run(main_command(workdir, 'configs/default.py', *flags,
                            '--config.optim.num_train_steps=8'))
  assert result.returncode == 0, result.stderr[-5000:]

  acc = read_event_tags(workdir)
  series = {tag: scalar_series(acc, tag) for tag in ('val/L1', 'val/PSNR', 'val/SSIM')}
  for tag, values in series.items():
    assert sorted(values) == [2, 4, 6, 8], (tag, values)
    assert all(np.isfinite(v) for v in values.values())
  val_l1 = series['val/L1']
  best = min(val_l1, key=val_l1.get)
  # max_to_keep=1 keeps the latest for resuming, and the best besides it.
  assert saved_steps(workdir) == sorted({8, best})

  result = run(main_command(workdir, 'configs/default.py', *flags, '--mode=eval',
                            '--config.eval.step=best', '--config.eval.split=val'))
  assert result.returncode == 0, result.stderr[-5000:]
  metrics = json.loads(open(os.path.join(workdir, 'eval', str(best), 'metrics.json')).read())
  assert metrics['step'] == best
  # The same path as validation: the same scores of the same checkpoint.
  assert metrics['L1'] == pytest.approx(val_l1[best], rel=1e-5)
  assert metrics['PSNR'] == pytest.approx(series['val/PSNR'][best], rel=1e-5)


def test_eval_step_best_without_validated_checkpoints_is_a_clear_error(tmp_path):
  import jax
  from p2p_jax import checkpointing
  variables = {'params': {'w': np.zeros(3, np.float32)}, 'batch_stats': {}}
  checkpointing.save_generator(str(tmp_path), 0, make_tiny_config(), variables)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with pytest.raises(FileNotFoundError, match='validation metrics.*eval_every_steps'):
    checkpointing.restore_generator(str(tmp_path), abstract, sharding, 'best')
  assert checkpointing.restore_generator(str(tmp_path), abstract, sharding)[1] == 0


@pytest.mark.parametrize('field, value, message', [
    ('eval_every_steps', -1, 'config.eval_every_steps=-1'),
    ('eval.best_metric', 'FID9', "config.eval.best_metric='FID9'"),
    ('eval.max_examples', 0, 'config.eval.max_examples=0'),
    ('eval.batch_size', 0, 'config.eval.batch_size=0'),  # Validation rounds it up, not from 0.
])
def test_invalid_validation_options_are_refused_naming_the_option(field, value, message):
  from p2p_jax import input_pipeline
  config = make_tiny_config()
  set_field(config, field, value)
  with pytest.raises(ValueError, match=message.replace('.', r'\.')):
    input_pipeline.validate_eval_config(config)


def test_eval_step_accepts_latest_best_or_a_step_and_refuses_anything_else():
  from p2p_jax import evaluate
  config = make_tiny_config()
  for value, expected in (('latest', None), ('-1', None), ('best', 'best'), ('12', 12)):
    config.eval.step = value
    assert evaluate.checkpoint_step(config) == expected
  config.eval.step = 'last'
  with pytest.raises(ValueError, match='config.eval.step'):
    evaluate.checkpoint_step(config)
