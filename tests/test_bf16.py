"""compute_dtype='bfloat16': bf16 activations, fp32 parameters and optimizer, fp32-like losses."""
import jax
import jax.numpy as jnp
import numpy as np

from conftest import make_tiny_config
from p2p_jax import parallel, train

STEPS = 3


def _config(compute_dtype):
  return make_tiny_config(compute_dtype=compute_dtype)


def _batch():
  rng = np.random.default_rng(0)
  a = np.tanh(np.cumsum(rng.normal(size=(2, 32, 32, 3)), axis=1) / 4).astype(np.float32)
  return {'A': jnp.asarray(a), 'B': jnp.asarray(-a[..., ::-1])}


def _run(compute_dtype, initial_state):
  """A few steps from ``initial_state`` on a fixed batch; returns the state and the losses."""
  config = _config(compute_dtype)
  pix2pix = train.create_pix2pix(config, steps_per_epoch=10)
  step_fn = train.make_train_step(pix2pix, parallel.create_mesh(),
                                  train.lr_schedule(config, 10))
  state = jax.tree.map(jnp.copy, initial_state)  # The step donates its input state.
  batch, history = _batch(), []
  for _ in range(STEPS):
    state, metrics = step_fn(state, batch)
    history.append({k: float(v) for k, v in metrics.items()})
  return pix2pix, state, batch, history


def test_bfloat16_losses_track_float32_over_a_few_steps():
  # The state is float32 in both modes, so both runs start from the very same one.
  config = _config('float32')
  initial_state = train.create_train_state(train.create_pix2pix(config, steps_per_epoch=10),
                                           config, jax.random.PRNGKey(0))
  _, _, _, fp32 = _run('float32', initial_state)
  pix2pix, state, batch, bf16 = _run('bfloat16', initial_state)
  for step, (want, got) in enumerate(zip(fp32, bf16)):
    # bf16 keeps 8 mantissa bits (~0.4% per rounding); a few steps stay within a few percent.
    np.testing.assert_allclose(got['G_L1'], want['G_L1'], rtol=0.03, err_msg=f'step {step}')
    for name in ('G_GAN', 'D_real', 'D_fake'):
      np.testing.assert_allclose(got[name], want[name], rtol=0.05, atol=0.02,
                                 err_msg=f'{name} at step {step}')

  # Parameters, batch statistics and optimizer state stay float32...
  for net in (state.generator, state.discriminator):
    for leaf in jax.tree_util.tree_leaves((net.params, net.batch_stats, net.opt_state)):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == jnp.float32
  # ...while the convolutions run on bfloat16 activations.
  jaxpr = jax.make_jaxpr(lambda v, x: pix2pix.generator.apply(
      v, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.PRNGKey(0)}))(
          state.generator.variables, batch['A'])
  convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ('conv_general_dilated',
                                                                 'dot_general')]
  assert convs and all(e.invars[0].aval.dtype == jnp.bfloat16 for e in convs)
