"""The CPU convolution forms are exact: values and both gradients equal the plain lax ops and
torch. The backend selection runs them on CPU only."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from p2p_jax import cpu_convs
from p2p_jax import layers
from p2p_jax import models
from p2p_jax import winograd

RTOL, ATOL = 1e-4, 1e-5
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')


def _data(x_shape, kernel_shape, seed=0):
  """Unit-scale input and a kernel scaled by 1/sqrt(fan-in), so outputs are unit-scale too."""
  # numpy, not jax.random: each new shape would compile a PRNG program.
  rng = np.random.default_rng(seed)
  fan_in = kernel_shape[0] * kernel_shape[1] * kernel_shape[2]
  return (jnp.asarray(rng.standard_normal(x_shape, np.float32)),
          jnp.asarray(rng.standard_normal(kernel_shape, np.float32) / np.sqrt(fan_in)))


@functools.partial(jax.jit, static_argnums=0)
def _jitted_value_and_grads(fn, x, kernel, cotangent):
  # One program per (fn, shapes), cached across tests: op by op, each of the many small ops
  # would compile on its own.
  y, vjp = jax.vjp(fn, x, kernel)
  return (y, *vjp(cotangent))


def _cotangent(y_shape):
  # Unit-scale gradients: the kernel gradient sums over N * H * W output pixels.
  cotangent = np.random.default_rng(1).standard_normal(y_shape, np.float32)
  return jnp.asarray(cotangent / np.sqrt(np.prod(y_shape[:3])))


def _value_and_grads(fn, x, kernel, cotangent=None):
  """``fn(x, kernel)`` and the gradients of ``sum(fn * cotangent)`` w.r.t. ``x`` and ``kernel``."""
  if cotangent is None:
    cotangent = _cotangent(jax.eval_shape(fn, x, kernel).shape)
  return _jitted_value_and_grads(fn, x, kernel, cotangent)


def _assert_same(fn, reference, x, kernel):
  for got, want, what in zip(_value_and_grads(fn, x, kernel),
                             _value_and_grads(reference, x, kernel), ('y', 'dx', 'dkernel')):
    assert got.shape == want.shape, what
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=what)


def _lax_conv_transpose(x, kernel):
  """``ConvTranspose2d(4, 2, 1)`` by ``lax.conv_transpose``: the gradient of a Conv2d whose
  HWIO kernel is ours with in/out swapped; padding ``k - 1 - p = 2``."""
  return lax.conv_transpose(x, kernel.transpose(0, 1, 3, 2), (2, 2), ((2, 2), (2, 2)),
                            dimension_numbers=layers.DIMENSION_NUMBERS, transpose_kernel=True)


def _plain_up(x, kernel):
  return layers.conv_transpose(x, kernel, 2, 1)


def _plain_down(stride):
  return {1: _plain_down_s1, 2: _plain_down_s2}[stride]


def _plain_down_s1(x, kernel):
  return layers.conv(x, kernel, 1, 1)


def _plain_down_s2(x, kernel):
  return layers.conv(x, kernel, 2, 1)


# (N, H, W, in, out): square and not, batch 1 and more, odd and tiny channel counts, 1x1;
# 128 pixels reach the one-matmul input gradient of the small up-convs.
UP_SHAPES = [(1, 4, 4, 8, 16), (2, 3, 5, 7, 5), (3, 1, 1, 6, 3), (2, 8, 8, 8, 16)]
DOWN_SHAPES = [(1, 8, 8, 8, 16), (2, 6, 10, 7, 5), (3, 2, 2, 6, 3)]


@pytest.mark.parametrize('shape', UP_SHAPES)
def test_plain_conv_transpose_is_lax_conv_transpose(shape):
  n, h, w, c_in, c_out = shape
  x, kernel = _data((n, h, w, c_in), (4, 4, c_in, c_out))
  _assert_same(_plain_up, _lax_conv_transpose, x, kernel)


@pytest.mark.parametrize('shape', UP_SHAPES)
@pytest.mark.parametrize('fn', [cpu_convs._up_conv_subpixel, cpu_convs._up_conv_matmul],
                         ids=['subpixel', 'matmul'])
def test_cpu_up_conv_forms_equal_lax_conv_transpose(fn, shape):
  n, h, w, c_in, c_out = shape
  x, kernel = _data((n, h, w, c_in), (4, 4, c_in, c_out))
  _assert_same(fn, _lax_conv_transpose, x, kernel)


@pytest.mark.parametrize('shape', DOWN_SHAPES)
@pytest.mark.parametrize('stride', [1, 2])
def test_matmul_conv_equals_lax_conv(shape, stride):
  n, h, w, c_in, c_out = shape
  x, kernel = _data((n, h + 1, w, c_in), (4, 4, c_in, c_out))  # Odd H: torch floors.
  _assert_same(functools.partial(cpu_convs._conv_matmul, stride=stride), _plain_down(stride),
               x, kernel)


@pytest.mark.parametrize('shape', DOWN_SHAPES + [(2, 6, 8, 16, 24)])
@pytest.mark.parametrize('fn', [cpu_convs._conv_s2_patches_grads, cpu_convs._conv_s2_row_grads],
                         ids=['patches', 'per_row'])
def test_stride_2_conv_with_its_fast_gradients_equals_lax_conv(fn, shape):
  n, h, w, c_in, c_out = shape
  x, kernel = _data((n, h + 1, w, c_in), (4, 4, c_in, c_out))  # Odd H: torch floors.
  _assert_same(fn, _plain_down_s2, x, kernel)


@pytest.mark.parametrize('shape', DOWN_SHAPES)
@pytest.mark.parametrize('kernel_grad', [cpu_convs._s2_patches_kernel_grad,
                                         cpu_convs._s2_row_kernel_grad], ids=['patches', 'per_row'])
def test_both_stride_2_kernel_gradient_forms_equal_lax(kernel_grad, shape):
  # The dispatch picks one form by channel count; each must hold for any.
  n, h, w, c_in, c_out = shape
  x, kernel = _data((n, h + 1, w, c_in), (4, 4, c_in, c_out))  # Odd H: torch floors.
  cotangent = _cotangent(jax.eval_shape(_plain_down_s2, x, kernel).shape)
  _, _, want = _value_and_grads(_plain_down_s2, x, kernel, cotangent)
  np.testing.assert_allclose(jax.jit(kernel_grad)(x, cotangent), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('shape', DOWN_SHAPES + [(2, 7, 4, 20, 17)])
def test_winograd_conv_equals_lax_conv(shape):
  n, h, w, c_in, c_out = shape
  x, kernel = _data((n, h + 1, w, c_in), (4, 4, c_in, c_out))  # Odd and even output sizes.
  _assert_same(winograd.conv_s1, _plain_down_s1, x, kernel)


def _float64_conv_s1(x, kernel):
  """``Conv2d(4, 1, 1)`` in float64 numpy: the reference both float32 forms are held to."""
  x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  n, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(np.einsum('nhwc,co->nhwo', xp[:, i:i + h - 1, j:j + w - 1], kernel[i, j])
             for i in range(4) for j in range(4))


def test_winograd_error_at_the_patchgan_layer_size_is_near_a_direct_convolution():
  # The PatchGAN's stride-1 layer sums 16 * 256 products per output. The Winograd transforms
  # add rounding; it must stay within a few dozen float32 ulps of the exact result (lax's
  # own error depends on the CPU's convolution kernel, so it is no fixed yardstick).
  x, kernel = _data((1, 32, 32, 256), (4, 4, 256, 64))
  want = _float64_conv_s1(x, kernel)
  winograd_error = np.abs(np.asarray(jax.jit(winograd.conv_s1)(x, kernel)) - want)
  rms = lambda values: np.sqrt(np.mean(np.square(values)))
  assert rms(winograd_error) < 32 * np.finfo(np.float32).eps * rms(want)
  assert winograd_error.max() < 5e-5  # Outputs are unit-scale.


def test_cpu_conv_uses_winograd_in_float32_and_lax_in_bfloat16():
  x, kernel = _data((1, 20, 20, 8), (4, 4, 8, 24))  # 361 output pixels: above the matmul size.
  conv_s1 = functools.partial(cpu_convs.conv, stride=1, padding=1)
  assert 'conv_general_dilated' not in str(jax.make_jaxpr(conv_s1)(x, kernel))
  bf16 = (x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
  assert 'conv_general_dilated' in str(jax.make_jaxpr(conv_s1)(*bf16))


@pytest.mark.parametrize('c_out', [1, 3])
def test_few_output_channel_conv_as_shifted_tap_products_equals_lax_conv(c_out):
  x, kernel = _data((2, 9, 8, 20), (4, 4, 20, c_out))  # Like the PatchGAN's 1-channel head.
  _assert_same(cpu_convs._conv_s1_shifted_taps, _plain_down_s1, x, kernel)


@pytest.mark.parametrize('thresholds', [
    cpu_convs.Thresholds(matmul_max_pixels=0),
    cpu_convs.Thresholds(matmul_max_pixels=0, s2_row_min_channels=10**9),
    cpu_convs.Thresholds(matmul_max_pixels=10**9, one_matmul_dx_min_pixels=0),
    cpu_convs.Thresholds(matmul_max_pixels=10**9, one_matmul_dx_min_pixels=10**9),
], ids=['spatial', 'spatial_s2_patches', 'matmul_one_dx', 'matmul_per_tap_dx'])
def test_cpu_dispatch_equals_plain_on_both_sides_of_each_threshold(thresholds):
  # The thresholds pick the form; every side of them must be exact.
  x, kernel = _data((2, 8, 6, 20), (4, 4, 20, 24))
  for stride in (1, 2):
    _assert_same(functools.partial(cpu_convs.conv, stride=stride, padding=1,
                                   thresholds=thresholds), _plain_down(stride), x, kernel)
  up_conv = functools.partial(cpu_convs.up_conv, thresholds=thresholds)
  _assert_same(up_conv, _plain_up, x, kernel)
  x, kernel = _data((2, 9, 8, 20), (4, 4, 20, 1))  # Few output channels.
  _assert_same(functools.partial(cpu_convs.conv, stride=1, padding=1, thresholds=thresholds),
               _plain_down_s1, x, kernel)
  _assert_same(up_conv, _plain_up, x, kernel)


def test_cpu_conv_leaves_other_kernel_sizes_to_lax():
  x, kernel = _data((1, 6, 6, 4), (3, 3, 4, 5))
  np.testing.assert_array_equal(cpu_convs.conv(x, kernel, 2, 1), layers.conv(x, kernel, 2, 1))


@pytest.mark.parametrize('name, fast, plain', [
    ('down_s2', functools.partial(cpu_convs.conv, stride=2, padding=1), _plain_down_s2),
    ('down_s1', functools.partial(cpu_convs.conv, stride=1, padding=1), _plain_down_s1),
    ('down_s1', winograd.conv_s1, _plain_down_s1),
    ('down_s2', cpu_convs._conv_s2_patches_grads, _plain_down_s2),
    ('down_s2', cpu_convs._conv_s2_row_grads, _plain_down_s2),
    ('up_s2', cpu_convs.up_conv, _plain_up),
    ('up_s2', cpu_convs._up_conv_subpixel, _plain_up),
], ids=['down_s2', 'down_s1', 'down_s1_winograd', 'down_s2_patches_grads', 'down_s2_row_grads',
        'up_s2', 'up_s2_subpixel'])
def test_fast_and_plain_match_torch_conv2d_and_conv_transpose2d(name, fast, plain):
  data = np.load(os.path.join(FIXTURES, 'conv_torch.npz'))
  nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
  # Conv2d.weight is (out, in, kh, kw); ConvTranspose2d.weight is (in, out, kh, kw). Both are
  # stored (kh, kw, in, out), without a flip.
  to_hwio = (2, 3, 1, 0) if name.startswith('down') else (2, 3, 0, 1)
  x, kernel = nhwc(data[f'{name}_x']), jnp.asarray(data[f'{name}_weight'].transpose(to_hwio))
  cotangent = nhwc(data[f'{name}_cotangent'])
  for fn in (fast, plain):
    y, dx, dkernel = _value_and_grads(fn, x, kernel, cotangent)
    np.testing.assert_allclose(y, nhwc(data[f'{name}_y']), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(dx, nhwc(data[f'{name}_dx']), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(dkernel, data[f'{name}_dweight'].transpose(to_hwio),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('module, x_shape', [
    (lambda impl: layers.Conv(1, 4, stride=1, padding=1, impl=impl), (1, 7, 5, 20)),
    (lambda impl: layers.ConvTranspose(3, 4, impl=impl), (2, 2, 3, 20)),
], ids=['conv', 'conv_transpose'])
def test_modules_read_the_same_parameters_in_fast_and_plain_mode(module, x_shape):
  x = jnp.asarray(np.random.default_rng(0).standard_normal(x_shape, np.float32))
  variables = jax.jit(module('fast').init)(jax.random.PRNGKey(1), x)
  plain_variables = jax.eval_shape(module('plain').init, jax.random.PRNGKey(1), x)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, plain_variables)
  np.testing.assert_allclose(jax.jit(module('fast').apply)(variables, x),
                             jax.jit(module('plain').apply)(variables, x), rtol=RTOL, atol=ATOL)


def test_unknown_conv_impl_is_a_clear_error():
  x = jnp.zeros((1, 4, 4, 2))
  with pytest.raises(ValueError, match="conv_impl must be 'fast' or 'plain'"):
    layers.Conv(2, 4, stride=2, padding=1, impl='quick').init(jax.random.PRNGKey(0), x)


def test_module_rejects_auto_unresolved():
  x = jnp.zeros((1, 4, 4, 2))
  with pytest.raises(ValueError, match="resolve 'auto'"):
    layers.ConvTranspose(2, 4, impl='auto').init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize('platform', ['cpu', 'CPU'])
def test_auto_picks_the_cpu_forms_on_cpu(platform):
  assert layers.resolve_impl('auto', platform) == 'fast'


@pytest.mark.parametrize('platform', ['gpu', 'tpu', 'cuda', 'rocm'])
def test_auto_picks_plain_lax_convolutions_off_cpu(platform):
  assert layers.resolve_impl('auto', platform) == 'plain'


@pytest.mark.parametrize('platform', ['cpu', 'gpu', 'tpu'])
@pytest.mark.parametrize('impl', ['fast', 'plain'])
def test_forced_impl_is_kept_on_every_platform(impl, platform):
  assert layers.resolve_impl(impl, platform) == impl


def test_unknown_configured_conv_impl_names_the_option_and_its_values():
  with pytest.raises(ValueError, match=r"config\.model\.conv_impl must be 'auto', 'fast' or "
                                       r"'plain', got 'quick'"):
    layers.resolve_impl('quick', 'cpu')


def _primitives(jaxpr) -> set:
  """Names of all primitives in ``jaxpr``, nested jaxprs (jit, custom_vjp) included."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, 'jaxpr', sub)  # ClosedJaxpr -> Jaxpr.
        if hasattr(sub, 'eqns'):
          names |= _primitives(sub)
  return names


def _traced_primitives(monkeypatch, platform, conv_impl):
  """Primitives of a tiny U-Net's and PatchGAN's forward, built for ``platform``."""
  import ml_collections
  monkeypatch.setattr(jax, 'default_backend', lambda: platform)
  config = ml_collections.ConfigDict(dict(netG='unet_32', netD='basic', n_layers_D=3, ngf=4,
                                          ndf=4, norm='batch', use_dropout=False,
                                          conv_impl=conv_impl))
  names = set()
  for net, channels in ((models.create_generator(config, output_nc=3), 3),
                        (models.create_discriminator(config), 6)):
    x = jax.ShapeDtypeStruct((1, 32, 32, channels), jnp.float32)
    variables = jax.eval_shape(functools.partial(net.init, train=False), jax.random.PRNGKey(0), x)
    apply = functools.partial(net.apply, train=False)
    names |= _primitives(jax.make_jaxpr(apply)(variables, x).jaxpr)
  return names


def _is_plain(names):
  return ('conv_general_dilated' in names and 'dot_general' not in names
          and not any(name.startswith('custom_vjp') for name in names))


def _has_cpu_forms(names):
  return 'dot_general' in names and any(name.startswith('custom_vjp') for name in names)


@pytest.mark.parametrize('platform, conv_impl', [('gpu', 'auto'), ('tpu', 'auto'),
                                                 ('cpu', 'plain')])
def test_models_trace_only_plain_convolutions_off_cpu_or_when_forced(monkeypatch, platform,
                                                                     conv_impl):
  assert _is_plain(_traced_primitives(monkeypatch, platform, conv_impl))


@pytest.mark.parametrize('platform, conv_impl', [('cpu', 'auto'), ('gpu', 'fast')])
def test_models_trace_the_cpu_forms_on_cpu_or_when_forced(monkeypatch, platform, conv_impl):
  assert _has_cpu_forms(_traced_primitives(monkeypatch, platform, conv_impl))
