"""The jitted train step: official update order, learning, determinism, schedule, sharding."""
import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO_ROOT, make_tiny_config
from p2p_jax import images, losses, parallel, train


def small_config():
  return make_tiny_config(**{'optim.lr': 1e-3})  # Visible learning within a few steps.


def fixed_batch(batch_size=2, size=32, seed=0):
  """A learnable pair: B is a smooth function of A."""
  rng = np.random.RandomState(seed)
  a = np.tanh(np.cumsum(rng.normal(size=(batch_size, size, size, 3)), axis=1) / 4)
  return {'A': jnp.asarray(a, jnp.float32), 'B': jnp.asarray(-a[..., ::-1], jnp.float32)}


def setup(config, steps_per_epoch=10, devices=None):
  pix2pix = train.create_pix2pix(config, steps_per_epoch)
  mesh = parallel.create_mesh(devices)
  step_fn = train.make_train_step(pix2pix, mesh, train.lr_schedule(config, steps_per_epoch))
  return pix2pix, mesh, step_fn


@pytest.fixture(scope='module')
def compiled():
  """One config and one jitted step shared by the tests below (compiling dominates)."""
  config = small_config()
  pix2pix, _, step_fn = setup(config)
  return config, pix2pix, step_fn


def test_a_few_steps_on_a_fixed_batch_lower_the_l1_term(compiled):
  config, pix2pix, step_fn = compiled
  state = train.create_train_state(pix2pix, config, jax.random.PRNGKey(0))
  batch = fixed_batch()
  l1 = []
  for _ in range(15):
    state, metrics = step_fn(state, batch)
    l1.append(float(metrics['G_L1']))
  assert np.isfinite(l1).all()
  assert l1[-1] < 0.9 * l1[0], l1
  assert int(state.step) == 15


def test_same_state_and_batch_give_a_bit_identical_step(compiled):
  config, pix2pix, step_fn = compiled
  batch = fixed_batch()
  outs = []
  for _ in range(2):
    state = train.create_train_state(pix2pix, config, jax.random.PRNGKey(3))
    state, metrics = step_fn(state, batch)
    outs.append((jax.device_get(state), jax.device_get(metrics)))
  jax.tree.map(np.testing.assert_array_equal, outs[0], outs[1])


def test_uint8_batches_train_bit_identically_to_their_float_conversion(compiled):
  config, pix2pix, step_fn = compiled
  pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  np.testing.assert_array_equal(jax.jit(train.to_model_input)(np.arange(256, dtype=np.uint8)),
                                images.to_float(np.arange(256, dtype=np.uint8)))
  outs = []
  for batch in ({'A': pixels, 'B': pixels[:, ::-1]},
                {'A': images.to_float(pixels), 'B': images.to_float(pixels[:, ::-1])}):
    state = train.create_train_state(pix2pix, config, jax.random.PRNGKey(3))
    for _ in range(2):
      state, metrics = step_fn(state, jax.tree.map(jnp.asarray, batch))
    outs.append((jax.device_get(state), jax.device_get(metrics)))
  jax.tree.map(np.testing.assert_array_equal, outs[0], outs[1])


def test_step_follows_the_official_update_order(compiled):
  """Reference: D steps on detached fakes; then G steps through the *updated* D.

  Written the plain way, with a second G forward under the same dropout key, which the real
  step avoids by keeping the VJP of its single G forward.
  """
  config, pix2pix, step_fn = compiled
  state = train.create_train_state(pix2pix, config, jax.random.PRNGKey(0))
  batch = fixed_batch()
  G, D, opt = pix2pix.generator, pix2pix.discriminator, pix2pix.optimizer
  g, d = jax.device_get(state.generator), jax.device_get(state.discriminator)
  key = jax.random.fold_in(state.rng, 0)

  reference_step = jax.jit(functools.partial(_reference_step, G, D, opt))
  d_params, g_params, g_stats = reference_step(g, d, key, batch)
  new_state, _ = step_fn(state, batch)
  tol = dict(rtol=1e-4, atol=1e-5)  # Adam's first step is +-lr (1e-3) wherever grad != 0.
  for actual, expected in [(new_state.discriminator.params, d_params),
                           (new_state.generator.params, g_params),
                           (new_state.generator.batch_stats, g_stats)]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol), actual, expected)


def _reference_step(G, D, opt, g, d, key, batch):

  def g_apply(params):
    return G.apply({'params': params, 'batch_stats': g.batch_stats}, batch['A'], train=True,
                   mutable=['batch_stats'], rngs={'dropout': key})

  fake, g_stats = g_apply(g.params)

  def d_apply(params, stats, b):
    return D.apply({'params': params, 'batch_stats': stats},
                   jnp.concatenate([batch['A'], b], -1), train=True, mutable=['batch_stats'])

  def d_loss(params):
    pf, s = d_apply(params, d.batch_stats, fake)
    pr, s = d_apply(params, s['batch_stats'], batch['B'])
    return 0.5 * (losses.discriminator_loss('vanilla', pf, False) +
                  losses.discriminator_loss('vanilla', pr, True)), s

  d_grads, d_stats = jax.grad(d_loss, has_aux=True)(d.params)
  upd, _ = opt.update(d_grads, d.opt_state, d.params)
  d_params = optax.apply_updates(d.params, upd)

  def g_loss(params):
    f, _ = g_apply(params)
    pf, _ = d_apply(d_params, d_stats['batch_stats'], f)
    return losses.generator_gan_loss('vanilla', pf) + 100 * losses.l1_loss(f, batch['B'])

  upd, _ = opt.update(jax.grad(g_loss)(g.params), g.opt_state, g.params)
  return d_params, optax.apply_updates(g.params, upd), g_stats['batch_stats']


def test_lr_is_constant_then_decays_linearly_per_epoch_like_the_official_schedule():
  config = small_config()
  config.optim.n_epochs, config.optim.n_epochs_decay = 3, 4
  schedule = train.lr_schedule(config, steps_per_epoch=10)
  lr = [float(schedule(epoch * 10 + 5)) for epoch in range(7)]
  base = config.optim.lr
  np.testing.assert_allclose(lr, [base, base, base, base * 4 / 5, base * 3 / 5, base * 2 / 5,
                                  base * 1 / 5], rtol=1e-6)
  assert float(schedule(10)) == float(schedule(19))  # Piecewise constant within an epoch.


SHARDED_SCRIPT = textwrap.dedent('''
    import jax, numpy as np, pytest
    from test_train_step import small_config, fixed_batch, setup
    from p2p_jax import parallel, train
    assert jax.device_count() == 8
    config = small_config()
    batch = fixed_batch(batch_size=8)
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
      pix2pix, mesh, step_fn = setup(config, devices=devices)
      state = train.create_train_state(pix2pix, config, jax.random.PRNGKey(0))
      state, metrics = step_fn(state, parallel.to_global(jax.device_get(batch), mesh))
      state, metrics = step_fn(state, parallel.to_global(jax.device_get(batch), mesh))
      results.append(jax.device_get((state.generator.params, state.generator.batch_stats,
                                     state.discriminator.params, state.discriminator.batch_stats,
                                     metrics)))
      if len(devices) == 8:
        assert len(state.generator.params['down0']['kernel'].sharding.device_set) == 8
    # Adam's update is lr * m / sqrt(v): where a gradient is ~0 its float32 rounding (a
    # different reduction order over 8 devices) moves a parameter by up to a few % of lr.
    params_tol = dict(rtol=1e-4, atol=1e-4)
    for i, tol in enumerate([params_tol, dict(rtol=1e-4, atol=1e-5), params_tol,
                             dict(rtol=1e-4, atol=1e-5), dict(rtol=1e-5, atol=1e-6)]):
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol), results[0][i],
                   results[1][i])
    with pytest.raises(ValueError, match='config.data.batch_size=4 is not divisible by the 8 devices'):
      parallel.check_batch_size(4, parallel.create_mesh())
    print('SHARDED_OK')
''')


def test_step_on_8_devices_equals_the_single_device_step_and_odd_batches_are_refused():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             PYTHONPATH=os.path.join(REPO_ROOT, 'tests'))
  result = subprocess.run([sys.executable, '-c', SHARDED_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600, cwd=REPO_ROOT)
  assert 'SHARDED_OK' in result.stdout, result.stdout + result.stderr


def _state_copies(step_fn, state, batch) -> int:
  hlo = step_fn.lower(state, batch).compile().as_text()
  return sum(' copy(%state' in line for line in hlo.splitlines())


def test_cpu_step_updates_the_donated_state_in_place():
  # With train.CPU_COMPILER_OPTIONS the compiled step writes parameters and Adam moments over
  # the donated state instead of copying them every step.
  config = small_config()
  pix2pix, _, step_fn = setup(config)
  state = train.create_train_state(pix2pix, config, jax.random.PRNGKey(0))
  assert _state_copies(step_fn, state, fixed_batch()) == 0
