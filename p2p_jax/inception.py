"""The FID Inception-v3 in flax (NHWC) and its weights from pytorch-fid's ``.pth`` file.

This is the network that pytorch-fid ports from TensorFlow's 2015-12-05 Inception graph
(``pytorch_fid.inception.fid_inception_v3``): torchvision's Inception3 with ``FIDInceptionA``
(5b-5d), ``FIDInceptionC`` (6b-6e), ``FIDInceptionE_1`` (7b) and ``FIDInceptionE_2`` (7c), cut
after the final average pool (the 2048-d features). The FID blocks average-pool without
counting the padding (as TensorFlow does), and 7c's pool branch max-pools.

Module and parameter names follow the torch state_dict, so ``Mixed_5b.branch1x1.conv.weight``
is ``params['Mixed_5b']['branch1x1']['conv']['kernel']`` (OIHW -> HWIO). The weights are read
without torch from the file the user gives; nothing is downloaded.
"""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from p2p_jax import pth

WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
               + WEIGHTS_FILE)
INPUT_SIZE = 299
FEATURE_DIM = 2048
# Full float32 convolutions: TF32 on GPUs would shift the features away from pytorch-fid's.
_PRECISION = jax.lax.Precision.HIGHEST


class WeightsError(ValueError):
  """An Inception weights file that is not pytorch-fid's."""


class BasicConv(nn.Module):
  """torchvision's ``BasicConv2d``: conv (no bias), batch norm (eps 1e-3, running stats), ReLU."""
  features: int
  kernel: tuple = (1, 1)
  strides: int = 1
  padding: tuple = (0, 0)

  @nn.compact
  def __call__(self, x):
    pad_h, pad_w = self.padding
    x = nn.Conv(self.features, self.kernel, self.strides, ((pad_h, pad_h), (pad_w, pad_w)),
                use_bias=False, precision=_PRECISION, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  """3x3 stride-1 average pool that ignores the padding (TF's, ``count_include_pad=False``)."""
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), (2, 2))


class FIDInceptionA(nn.Module):
  """Mixed_5b-5d."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, name='branch1x1')(x)
    b5 = BasicConv(48, name='branch5x5_1')(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = BasicConv(64, name='branch3x3dbl_1')(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = BasicConv(self.pool_features, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (torchvision's, unchanged by pytorch-fid)."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), 2, name='branch3x3')(x)
    bd = BasicConv(64, name='branch3x3dbl_1')(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = BasicConv(96, (3, 3), 2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
  """Mixed_6b-6e."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, name='branch1x1')(x)
    b7 = BasicConv(c7, name='branch7x7_1')(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = BasicConv(c7, name='branch7x7dbl_1')(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = BasicConv(192, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (torchvision's, unchanged by pytorch-fid)."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, name='branch3x3_1')(x)
    b3 = BasicConv(320, (3, 3), 2, name='branch3x3_2')(b3)
    b7 = BasicConv(192, name='branch7x7x3_1')(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv(192, (3, 3), 2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(nn.Module):
  """Mixed_7b (``FIDInceptionE_1``: average pool) and 7c (``FIDInceptionE_2``: max pool)."""
  max_pool: bool

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, name='branch1x1')(x)
    b3 = BasicConv(384, name='branch3x3_1')(x)
    b3 = jnp.concatenate([
        BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
        BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3)], axis=-1)
    bd = BasicConv(448, name='branch3x3dbl_1')(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([
        BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
        BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd)], axis=-1)
    if self.max_pool:  # pytorch-fid keeps the TF graph's max pool here, for comparable scores.
      pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = BasicConv(192, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """``(N, 299, 299, 3)`` in [-1, 1] -> ``(N, 2048)`` pool features (pytorch-fid's block 3)."""

  @nn.compact
  def __call__(self, x):
    x = BasicConv(32, (3, 3), 2, name='Conv2d_1a_3x3')(x)
    x = BasicConv(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3_s2(x)
    x = BasicConv(80, name='Conv2d_3b_1x1')(x)
    x = BasicConv(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = _max_pool_3x3_s2(x)
    x = FIDInceptionA(32, name='Mixed_5b')(x)
    x = FIDInceptionA(64, name='Mixed_5c')(x)
    x = FIDInceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    for name, channels in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160),
                           ('Mixed_6e', 192)):
      x = FIDInceptionC(channels, name=name)(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = FIDInceptionE(max_pool=False, name='Mixed_7b')(x)
    x = FIDInceptionE(max_pool=True, name='Mixed_7c')(x)
    return x.mean(axis=(1, 2))


# Torch state_dict suffix of each (flax collection, layer, leaf) of a BasicConv.
_TORCH_SUFFIXES = {('params', 'conv', 'kernel'): 'conv.weight',
                   ('params', 'bn', 'scale'): 'bn.weight',
                   ('params', 'bn', 'bias'): 'bn.bias',
                   ('batch_stats', 'bn', 'mean'): 'bn.running_mean',
                   ('batch_stats', 'bn', 'var'): 'bn.running_var'}
# Entries of the file that the pool features do not use: the 1008-way classifier.
UNUSED_KEYS = ('fc.weight', 'fc.bias')


def expected_shapes() -> dict:
  """``{torch state_dict key: torch shape}`` of every tensor the features need."""
  abstract = jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), np.float32))
  shapes = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    collection, *modules, layer, leaf_name = [p.key for p in path]
    key = '.'.join(modules) + '.' + _TORCH_SUFFIXES[(collection, layer, leaf_name)]
    shape = leaf.shape
    shapes[key] = (shape[3], shape[2], shape[0], shape[1]) if leaf_name == 'kernel' else shape
  return shapes


def weights_help(source: str) -> str:
  """Where the weights come from and how to pass them; ends every weights error."""
  return (f'{source}: expected pytorch-fid\'s Inception weights {WEIGHTS_FILE} (the file '
          f'pytorch-fid and torch-fidelity download; get it from {WEIGHTS_URL}) and pass its '
          'path as --config.eval.inception_path (or --inception_path for python -m p2p_jax.fid).')


def check_path(path: str) -> None:
  """Raises FileNotFoundError (naming the file and where to get it) unless ``path`` is a file."""
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f'No Inception weights file at {path!r}. ' + weights_help(repr(path)))


def variables_from_state_dict(state_dict: dict, source: str = 'state_dict') -> dict:
  """Converts pytorch-fid's Inception state_dict to ``FIDInceptionV3`` variables.

  Args:
    state_dict: ``{torch key: np.ndarray}`` (``pth.read_state_dict`` of the weights file).
    source: names the file in errors.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` of float32 numpy arrays.

  Raises:
    WeightsError: a key is missing or unexpected, or a shape differs.
  """
  expected = expected_shapes()
  unexpected = [k for k in state_dict if k not in expected and k not in UNUSED_KEYS
                and not k.endswith('.num_batches_tracked')]
  missing = [k for k in expected if k not in state_dict]
  wrong = [f'{k} {tuple(state_dict[k].shape)} (expected {expected[k]})' for k in expected
           if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])]
  if missing or unexpected or wrong:
    details = '; '.join(part for part in (
        missing and f'{len(missing)} missing keys (e.g. {missing[:3]})',
        unexpected and f'{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})',
        wrong and f'shapes differ: {wrong[:3]}') if part)
    raise WeightsError(f'Not the FID Inception weights ({details}). ' + weights_help(source))
  leaf_of_suffix = {suffix: key for key, suffix in _TORCH_SUFFIXES.items()}
  variables = {'params': {}, 'batch_stats': {}}
  for key in expected:
    *modules, layer, torch_leaf = key.split('.')
    collection, _, leaf_name = leaf_of_suffix[f'{layer}.{torch_leaf}']
    value = np.asarray(state_dict[key], np.float32)
    if leaf_name == 'kernel':
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO.
    node = variables[collection]
    for name in modules + [layer]:
      node = node.setdefault(name, {})
    node[leaf_name] = value
  return variables


def load_variables(path: str) -> dict:
  """Reads and converts the weights file at ``path`` (no download, no torch).

  Args:
    path: path of ``pt_inception-2015-12-05-6726825d.pth``.

  Returns:
    The ``FIDInceptionV3`` variables.

  Raises:
    FileNotFoundError: no file at ``path``.
    WeightsError: the file is unreadable or not the FID Inception weights.
  """
  check_path(path)
  try:
    state_dict = pth.read_state_dict(path)
  except (pth.PthError, OSError) as e:
    raise WeightsError(f'Cannot read {path} ({e}). ' + weights_help(path)) from e
  return variables_from_state_dict(state_dict, path)
