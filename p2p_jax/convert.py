"""Import of official PyTorch pix2pix checkpoints (junyanz/pytorch-CycleGAN-and-pix2pix).

  python -m p2p_jax.convert --config=configs/default.py --torch_generator=latest_net_G.pth \
      [--torch_discriminator=latest_net_D.pth] --workdir=DIR

writes checkpoint 0 in ``DIR``. ``--mode=eval`` and ``--mode=translate`` restore it; with the
discriminator too it holds a full train state (fresh Adam moments), so training can fine-tune
from it. ``config.model`` (netG, netD, n_layers_D, ngf, ndf, norm, use_dropout) must match the
options the PyTorch model was trained with (``--netG``, ``--netD``, ``--ngf``, ``--norm``,
``--no_dropout``, ...).

Reading needs no torch and runs no code from the file (see ``pth.py``).

The torch module names are derived by numbering the modules exactly as the official
constructors append them to their ``nn.Sequential`` lists (parameter-free modules such as
ReLU, padding, dropout and affine-free InstanceNorm still take an index), rather than from
hard-coded key tables.
"""
import difflib
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import traverse_util
from ml_collections import config_flags

from p2p_jax import checkpointing, models, pth, train


class ConversionError(ValueError):
  """PyTorch weights that do not fit the configured network, or a workdir in use."""


# ----------------------------------------------------------------------------------------------
# The official module trees, numbered as nn.Sequential numbers them.

class _Leaf(NamedTuple):
  """A torch module with weights and the flax module (path in params) that holds them."""
  path: tuple
  kind: str  # 'conv', 'conv_transpose' or 'norm'.


class _Child(NamedTuple):
  """A child module whose own ``nn.Sequential`` is attribute ``attr``."""
  attr: str
  layers: list


# Parameter-free modules (ReLU, LeakyReLU, Tanh, padding, dropout): they only take an index.
_FREE = None


def _conv(*path):
  return _Leaf(path, 'conv')


def _norm(*path):
  return _Leaf(path, 'norm')


def _unet_block(level: int, num_downs: int, use_dropout: bool) -> list:
  """The official ``UnetSkipConnectionBlock.model`` list of U-Net ``level`` (0: outermost)."""
  down, up = _conv(f'down{level}'), _Leaf((f'up{level}',), 'conv_transpose')
  if level == num_downs - 1:  # Innermost: downrelu, downconv, uprelu, upconv, upnorm.
    return [_FREE, down, _FREE, up, _norm(f'up_norm{level}')]
  child = _Child('model', _unet_block(level + 1, num_downs, use_dropout))
  if level == 0:  # Outermost: downconv, submodule, uprelu, upconv, tanh.
    return [down, child, _FREE, up, _FREE]
  # downrelu, downconv, downnorm, submodule, uprelu, upconv, upnorm, [dropout].
  layers = [_FREE, down, _norm(f'down_norm{level}'), child, _FREE, up, _norm(f'up_norm{level}')]
  if use_dropout and level >= 4:  # The num_downs - 5 blocks the official loop adds.
    layers.append(_FREE)
  return layers


def _resnet_layers(n_blocks: int, use_dropout: bool) -> list:
  """The official ``ResnetGenerator.model`` list (reflection padding, 2 down/up-samplings)."""
  layers = [_FREE, _conv('stem'), _norm('stem_norm'), _FREE]  # ReflectionPad2d(3), ..., ReLU.
  for i in range(2):
    layers += [_conv(f'down{i}'), _norm(f'down_norm{i}'), _FREE]
  for i in range(n_blocks):
    block = f'block{i}'
    # ResnetBlock.conv_block: pad, conv, norm, relu, [dropout], pad, conv, norm.
    conv_block = [_FREE, _conv(block, 'conv0'), _norm(block, 'norm0'), _FREE]
    conv_block += [_FREE] * use_dropout
    conv_block += [_FREE, _conv(block, 'conv1'), _norm(block, 'norm1')]
    layers.append(_Child('conv_block', conv_block))
  for i in range(2):
    layers += [_Leaf((f'up{i}',), 'conv_transpose'), _norm(f'up_norm{i}'), _FREE]
  return layers + [_FREE, _conv('head'), _FREE]  # ReflectionPad2d(3), conv, tanh.


def _patchgan_layers(n_layers: int) -> list:
  """The official ``NLayerDiscriminator.model`` list, or ``PixelDiscriminator.net`` for 0."""
  if n_layers == 0:
    return [_conv('conv0'), _FREE, _conv('conv1'), _norm('norm1'), _FREE, _conv('conv2')]
  layers = [_conv('conv0'), _FREE]
  for i in range(1, n_layers + 1):
    layers += [_conv(f'conv{i}'), _norm(f'norm{i}'), _FREE]
  return layers + [_conv(f'conv{n_layers + 1}')]


def _number(prefix: str, layers: list) -> list:
  """``[(torch module name, _Leaf)]`` for the modules with weights, depth first."""
  named = []
  for index, layer in enumerate(layers):
    if isinstance(layer, _Child):
      named += _number(f'{prefix}.{index}.{layer.attr}', layer.layers)
    elif layer is not _FREE:
      named.append((f'{prefix}.{index}', layer))
  return named


def torch_module_names(module) -> list:
  """The official torch module name of each of our modules with weights.

  Args:
    module: a ``models.UNetGenerator``, ``ResnetGenerator`` or ``PatchGANDiscriminator``.

  Returns:
    ``[(torch module name, flax module path tuple, kind)]``, e.g.
    ``('model.model.1.model.1', ('down1',), 'conv')``.
  """
  if isinstance(module, models.UNetGenerator):
    # UnetGenerator.model is the outermost block, whose nn.Sequential is again `.model`.
    named = _number('model.model', _unet_block(0, module.num_downs, module.use_dropout))
  elif isinstance(module, models.ResnetGenerator):
    named = _number('model', _resnet_layers(module.n_blocks, module.use_dropout))
  elif isinstance(module, models.PatchGANDiscriminator):
    prefix = 'net' if module.n_layers == 0 else 'model'
    named = _number(prefix, _patchgan_layers(module.n_layers))
  else:
    raise TypeError(f'No PyTorch layout for {type(module).__name__}')
  return [(name, leaf.path, leaf.kind) for name, leaf in named]


# ----------------------------------------------------------------------------------------------
# state_dict -> flax variables.

# Per kind: (our collection, our name, torch's name, transpose from torch's layout to ours).
# Conv2d.weight (out, in, kh, kw) -> (kh, kw, in, out); ConvTranspose2d.weight
# (in, out, kh, kw) -> (kh, kw, in, out), unflipped (see layers.py).
_PARAMS = {
    'conv': (('params', 'kernel', 'weight', (2, 3, 1, 0)), ('params', 'bias', 'bias', None)),
    'conv_transpose': (('params', 'kernel', 'weight', (2, 3, 0, 1)),
                       ('params', 'bias', 'bias', None)),
    'norm': (('params', 'scale', 'weight', None), ('params', 'bias', 'bias', None),
             ('batch_stats', 'mean', 'running_mean', None),
             ('batch_stats', 'var', 'running_var', None)),
}
# Torch entries that carry nothing we keep: BatchNorm's step counter, and the running stats
# that InstanceNorm kept before torch 0.4 (the official loader drops them too).
_IGNORED_NORM_PARAMS = ('num_batches_tracked', 'running_mean', 'running_var')


def convert_variables(state_dict: dict, module, input_shape, source: str,
                      hint: str = '') -> dict:
  """Builds ``module``'s flax variables from an official PyTorch ``state_dict``.

  Args:
    state_dict: from ``pth.read_state_dict``.
    module: the flax network the weights are for (its config decides the expected keys).
    input_shape: an NHWC input shape ``module`` accepts (only the parameter shapes matter).
    source: the file name, for error messages.
    hint: appended to mismatch errors (which config fields to check).

  Returns:
    ``{'params', 'batch_stats'}`` of float32 numpy arrays, structured as
    ``models.init_variables`` returns them.

  Raises:
    ConversionError: a torch key is missing, has the wrong shape, or has no place in ``module``.
  """
  target = jax.eval_shape(
      lambda: models.init_variables(module, jax.random.PRNGKey(0), input_shape))
  flat_target = {(col,) + path: leaf for col in ('params', 'batch_stats')
                 for path, leaf in traverse_util.flatten_dict(target[col]).items()}
  converted, used = {}, set()
  for module_name, path, kind in torch_module_names(module):
    for col, ours, theirs, perm in _PARAMS[kind]:
      name = (col,) + path + (ours,)
      if name not in flat_target:  # E.g. no conv bias before a batch norm, no affine IN.
        continue
      key, want = f'{module_name}.{theirs}', flat_target[name]
      if key not in state_dict:
        close = difflib.get_close_matches(key, list(state_dict), n=3)
        raise ConversionError(f"{source}: our {'/'.join(name)} {want.shape} needs torch key "
                              f'{key!r}, which is missing (closest keys: {close}). {hint}')
      value = state_dict[key]
      torch_shape = want.shape if perm is None else tuple(
          want.shape[perm.index(i)] for i in range(len(perm)))
      if value.shape != torch_shape:
        raise ConversionError(f'{source}: torch key {key!r} has shape {value.shape}, but our '
                              f"{'/'.join(name)} {want.shape} needs torch shape {torch_shape}. "
                              f'{hint}')
      converted[name] = np.asarray(value if perm is None else value.transpose(perm),
                                   dtype=want.dtype)
      used.add(key)
    if kind == 'norm':
      used.update(f'{module_name}.{p}' for p in _IGNORED_NORM_PARAMS)
  unexpected = [key for key in state_dict if key not in used]
  if unexpected:
    raise ConversionError(f'{source}: {len(unexpected)} torch key(s) have no place in '
                          f'{type(module).__name__}: {unexpected[:6]}. {hint}')
  missing = set(flat_target) - set(converted)
  if missing:  # Would be a bug in the module numbering above.
    raise ConversionError(f'{source}: no torch weights found for {sorted(missing)}')
  variables = traverse_util.unflatten_dict(converted)
  return {'params': variables.get('params', {}), 'batch_stats': variables.get('batch_stats', {})}


def convert_network(state_dict: dict, config: ml_collections.ConfigDict, net: str,
                    source: str = '') -> dict:
  """Variables of ``config``'s generator or discriminator from official PyTorch weights.

  Args:
    state_dict: from ``pth.read_state_dict`` of a ``latest_net_G.pth`` / ``latest_net_D.pth``.
    config: the run config (``model.*``, ``data.input_nc``, ``output_nc``, ``crop_size``).
    net: ``'generator'`` or ``'discriminator'``.
    source: the file name, for error messages.

  Returns:
    ``{'params', 'batch_stats'}``, as ``models.init_variables`` structures them.
  """
  m, size = config.model, config.data.crop_size
  if net == 'generator':
    module = models.create_generator(m, config.data.output_nc)
    shape = (1, size, size, config.data.input_nc)
    hint = (f'Check that config.model (netG={m.netG!r}, ngf={m.ngf}, norm={m.norm!r}, '
            f'use_dropout={m.use_dropout}) and input_nc/output_nc ({config.data.input_nc}/'
            f'{config.data.output_nc}) match the PyTorch options (--netG, --ngf, --norm, '
            '--no_dropout, --input_nc, --output_nc).')
  elif net == 'discriminator':
    module = models.create_discriminator(m)
    shape = (1, size, size, config.data.input_nc + config.data.output_nc)
    hint = (f'Check that config.model (netD={m.netD!r}, n_layers_D={m.n_layers_D}, '
            f'ndf={m.ndf}, norm={m.norm!r}) matches the PyTorch options (--netD, --n_layers_D, '
            '--ndf, --norm).')
  else:
    raise ValueError(f"net must be 'generator' or 'discriminator', got {net!r}")
  return convert_variables(state_dict, module, shape, source or net, hint)


def convert_checkpoint(config: ml_collections.ConfigDict, workdir: str, torch_generator: str,
                       torch_discriminator: Optional[str] = None) -> None:
  """Converts official PyTorch weights into checkpoint 0 of ``workdir``.

  Args:
    config: the config the converted model will run with.
    workdir: where to write; must not hold checkpoints yet.
    torch_generator: path of a ``latest_net_G.pth``.
    torch_discriminator: path of the matching ``latest_net_D.pth``, or None. Training in
      ``workdir`` (or with ``config.init_from`` pointing at it) starts a new run from the
      weights: with this D, or else a fresh one.

  Raises:
    pth.PthError: a file that is not a plain state_dict.
    ConversionError: weights that do not fit ``config``, or ``workdir`` already has checkpoints.
  """
  directory = checkpointing.checkpoint_dir(workdir)
  if directory.is_dir() and any(directory.iterdir()):
    raise ConversionError(f'{directory} already holds checkpoints; converting into it would '
                          'overwrite or mix runs. Use a fresh --workdir.')
  g_vars = convert_network(pth.read_state_dict(torch_generator), config, 'generator',
                           torch_generator)
  logging.info('Converted %s: %d generator parameters.', torch_generator,
               models.count_params(g_vars['params']))
  g_vars = jax.tree.map(jnp.asarray, g_vars)
  if torch_discriminator is None:
    checkpointing.save_generator(workdir, 0, config, g_vars)
  else:
    d_vars = convert_network(pth.read_state_dict(torch_discriminator), config, 'discriminator',
                             torch_discriminator)
    logging.info('Converted %s: %d discriminator parameters.', torch_discriminator,
                 models.count_params(d_vars['params']))
    pix2pix = train.create_pix2pix(config, steps_per_epoch=1)  # The LR schedule is not stored.
    state = train.state_from_variables(pix2pix, g_vars, jax.tree.map(jnp.asarray, d_vars),
                                       jax.random.PRNGKey(config.seed))
    manager = checkpointing.create_manager(workdir)
    checkpointing.save(manager, state, config, force=True)
    manager.wait_until_finished()
    manager.close()
  logging.info('Wrote checkpoint 0 to %s.', directory)


_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                          lock_config=True)
_TORCH_GENERATOR = flags.DEFINE_string('torch_generator', None,
                                       'Official PyTorch generator weights (latest_net_G.pth).')
_TORCH_DISCRIMINATOR = flags.DEFINE_string(
    'torch_discriminator', None, 'Optional discriminator weights (latest_net_D.pth): fine-tuning '
    'starts from them too (else from a fresh discriminator).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where to write the checkpoint (must be new).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    convert_checkpoint(_CONFIG.value, _WORKDIR.value, _TORCH_GENERATOR.value,
                       _TORCH_DISCRIMINATOR.value)
  except (ValueError, FileNotFoundError) as e:  # Incl. ConversionError, PthError, bad config.
    raise SystemExit(f'convert: {e}')  # The message is the whole story; no traceback.


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'torch_generator', 'workdir'])
  app.run(main)
