"""The networks are the official pix2pix architectures: counts, shapes, init, layer placement."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p2p_jax import models


def _param_shapes(module, input_shape):
  variables = jax.eval_shape(lambda: models.init_variables(module, jax.random.PRNGKey(0),
                                                           input_shape))
  return variables


def test_unet_256_and_70x70_patchgan_have_the_official_parameter_counts():
  g = _param_shapes(models.UNetGenerator(), (1, 256, 256, 3))
  d = _param_shapes(models.PatchGANDiscriminator(), (1, 256, 256, 6))
  assert models.count_params(g['params']) == 54_413_955
  assert models.count_params(d['params']) == 2_768_705


@pytest.mark.parametrize('n_layers, size, patches', [(3, 256, 30), (0, 256, 256), (1, 256, 126),
                                                     (5, 256, 6)])
def test_patchgan_output_shapes(n_layers, size, patches):
  d = models.PatchGANDiscriminator(n_layers=n_layers)
  variables = _param_shapes(d, (1, size, size, 6))
  out = jax.eval_shape(lambda v, x: d.apply(v, x, train=False), variables,
                       jax.ShapeDtypeStruct((2, size, size, 6), jnp.float32))
  assert out.shape == (2, patches, patches, 1)


def _receptive_field(n_layers):
  """Receptive field of the official NLayerDiscriminator, from its kernel/stride sequence."""
  layers = [(4, 2)] * n_layers + [(4, 1), (4, 1)]
  rf, jump = 1, 1
  for kernel, stride in layers:
    rf += (kernel - 1) * jump
    jump *= stride
  return rf


@pytest.mark.parametrize('n_layers, rf', [(1, 16), (3, 70), (5, 286)])
def test_patchgan_receptive_fields_match_the_paper(n_layers, rf):
  assert _receptive_field(n_layers) == rf
  # The network really is built from that sequence: a 4x4 conv per level, stride 2 but the last two.
  d = models.PatchGANDiscriminator(n_layers=n_layers)
  params = _param_shapes(d, (1, 256, 256, 6))['params']
  convs = sorted(k for k in params if k.startswith('conv'))
  assert convs == [f'conv{i}' for i in range(n_layers + 2)]
  assert all(params[k]['kernel'].shape[:2] == (4, 4) for k in convs)


@pytest.mark.parametrize('name, size', [('unet_256', 256), ('unet_128', 128),
                                        ('resnet_9blocks', 64), ('resnet_6blocks', 64)])
def test_generators_map_images_to_images(name, size):
  g = models.create_generator(_model_config(name), output_nc=3)
  variables = _param_shapes(g, (1, size, size, 1))  # Grayscale input, colour output.
  out = jax.eval_shape(lambda v, x: g.apply(v, x, train=False), variables,
                       jax.ShapeDtypeStruct((2, size, size, 1), jnp.float32))
  assert out.shape == (2, size, size, 3)


def _model_config(net_g, norm='batch'):
  import ml_collections
  return ml_collections.ConfigDict(dict(netG=net_g, netD='basic', n_layers_D=3, ngf=64, ndf=64,
                                        norm=norm, use_dropout=True, conv_impl='fast'))


def test_resnet_9blocks_has_the_official_parameter_count():
  # Official ResnetGenerator(3, 3, 64, InstanceNorm2d, n_blocks=9): 11,378,179 parameters.
  g = models.ResnetGenerator(n_blocks=9, norm='instance')
  assert models.count_params(_param_shapes(g, (1, 256, 256, 3))['params']) == 11_378_179


def test_unet_rejects_sizes_it_cannot_halve_num_downs_times():
  g = models.UNetGenerator(num_downs=7, ngf=8)
  with pytest.raises(ValueError, match='divisible by 128'):
    _param_shapes(g, (1, 64, 64, 3))


def test_init_is_the_official_normal_0_02():
  g = models.UNetGenerator(num_downs=5, ngf=16)
  variables = models.init_variables(g, jax.random.PRNGKey(0), (1, 32, 32, 3))
  params = variables['params']
  kernels = np.concatenate([np.ravel(p['kernel']) for p in params.values() if 'kernel' in p])
  assert abs(kernels.mean()) < 1e-3
  assert abs(kernels.std() - 0.02) < 1e-3
  scales = np.concatenate([np.ravel(p['scale']) for p in params.values() if 'scale' in p])
  assert abs(scales.mean() - 1.0) < 5e-3 and 0.01 < scales.std() < 0.03
  for p in params.values():
    if 'bias' in p:
      assert not np.any(p['bias'])
  assert all(np.all(s['var'] == 1) and np.all(s['mean'] == 0)
             for s in variables['batch_stats'].values())


def test_unet_bias_and_norm_placement_follows_the_official_rules():
  n = 8
  params = _param_shapes(models.UNetGenerator(num_downs=n), (1, 256, 256, 3))['params']
  assert 'bias' in params['up0']  # Outermost up-conv: bias, then tanh.
  convs = [k for k in params if 'norm' not in k]
  assert [k for k in convs if 'bias' in params[k]] == ['up0']  # With batch norm, no other.
  # No norm on the outermost down-conv nor on the 1x1 innermost one; all other levels normed.
  assert {k for k in params if k.startswith('down_norm')} == {f'down_norm{i}'
                                                              for i in range(1, n - 1)}
  assert {k for k in params if k.startswith('up_norm')} == {f'up_norm{i}' for i in range(1, n)}
  # All convolutions are 4x4; the channels double up to ngf * 8.
  assert [params[f'down{i}']['kernel'].shape for i in range(n)] == [
      (4, 4, 3, 64), (4, 4, 64, 128), (4, 4, 128, 256), (4, 4, 256, 512)] + [
          (4, 4, 512, 512)] * 4
  assert params['up7']['kernel'].shape == (4, 4, 512, 512)  # Innermost: no skip to concat.
  assert params['up0']['kernel'].shape == (4, 4, 128, 3)  # concat(skip, up) -> output_nc.

  instance = _param_shapes(models.UNetGenerator(num_downs=n, norm='instance'),
                           (1, 256, 256, 3))['params']
  assert all('bias' in p for p in instance.values())  # Instance norm: every conv has a bias.
  assert not any(k.startswith(('down_norm', 'up_norm')) for k in instance)  # No affine.


def test_patchgan_bias_and_norm_placement_follows_the_official_rules():
  params = _param_shapes(models.PatchGANDiscriminator(), (1, 256, 256, 6))['params']
  assert 'bias' in params['conv0'] and 'norm0' not in params  # First conv: bias, no norm.
  for i in (1, 2, 3):
    assert 'bias' not in params[f'conv{i}'] and f'norm{i}' in params
  assert 'bias' in params['conv4'] and params['conv4']['kernel'].shape == (4, 4, 512, 1)
  assert [params[f'conv{i}']['kernel'].shape[-1] for i in range(5)] == [64, 128, 256, 512, 1]


def test_unet_dropout_follows_the_decoder_blocks_at_4_8_and_16_pixels():
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dropout):
      seen.append(args[0].shape[1])
    return next_fun(*args, **kwargs)

  g = models.UNetGenerator()
  variables = _param_shapes(g, (1, 256, 256, 3))
  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: g.apply(v, x, train=True, rngs={'dropout': jax.random.PRNGKey(0)},
                                        mutable=['batch_stats']),
                   variables, jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))
  assert sorted(seen) == [4, 8, 16]


def _tiny_generator_and_variables():
  g = models.UNetGenerator(num_downs=6, ngf=8)  # Dropout at the 4x4 decoder block.
  variables = models.init_variables(g, jax.random.PRNGKey(0), (1, 64, 64, 3))
  # Non-trivial running statistics, so 'eval' mode differs from batch statistics.
  variables['batch_stats'] = jax.tree.map(lambda s: s + 0.3, variables['batch_stats'])
  images = jax.random.uniform(jax.random.PRNGKey(1), (2, 64, 64, 3), minval=-1, maxval=1)
  return g, variables, images


def test_paper_mode_is_stochastic_across_keys_and_deterministic_for_a_key():
  g, variables, images = _tiny_generator_and_variables()
  a = models.generate(g, variables, images, jax.random.PRNGKey(0), mode='paper')
  b = models.generate(g, variables, images, jax.random.PRNGKey(0), mode='paper')
  c = models.generate(g, variables, images, jax.random.PRNGKey(1), mode='paper')
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


def test_eval_mode_uses_running_statistics_and_is_deterministic():
  g, variables, images = _tiny_generator_and_variables()
  a = models.generate(g, variables, images, jax.random.PRNGKey(0), mode='eval')
  b = models.generate(g, variables, images, jax.random.PRNGKey(1), mode='eval')
  np.testing.assert_array_equal(a, b)
  paper = models.generate(g, variables, images, jax.random.PRNGKey(0), mode='paper')
  assert np.abs(np.asarray(a) - np.asarray(paper)).max() > 1e-3
  with pytest.raises(ValueError, match="'paper' or 'eval'"):
    models.generate(g, variables, images, jax.random.PRNGKey(0), mode='test')
