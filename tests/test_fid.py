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
