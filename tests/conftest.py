"""Shared test fixtures: configs loaded from configs/*.py by path, as the CLI does."""
import importlib.util
import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str = 'default'):
  """``get_config()`` of ``configs/<name>.py``."""
  path = os.path.join(REPO_ROOT, 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'configs_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny_config():
  """The default config shrunk for tests: unet_128 with ngf/ndf 8 at 128 px."""
  config = load_config('default')
  config.model.netG = 'unet_128'
  config.model.ngf = 8
  config.model.ndf = 8
  config.load_size = 128
  config.crop_size = 128
  return config


@pytest.fixture
def default_config():
  return load_config('default')
