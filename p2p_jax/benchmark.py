"""Step and input-pipeline benchmarks; each result is one JSON line on stdout.

  python -m p2p_jax.benchmark --what=step --config=configs/cityscapes.py --batch_size=4
  python -m p2p_jax.benchmark --what=input --config=configs/facades.py \
      --config.data.data_dir=/path/to/facades  # Without and with the decoded cache.
  python -m p2p_jax.benchmark --what=dot  # The machine's large-matmul GFLOP/s, for scale.
  python -m p2p_jax.benchmark --what=compare --config=configs/default.py \
      --torch_python=/path/to/torch/venv/bin/python

``step`` builds the real train state and the jitted, donated step on random data at the
config's resolution. ``compare`` times that step and the PyTorch reference step in the same
sitting, alternating rounds, and reports the median of each and their ratio. The PyTorch
reference runs with each of ``--torch_threads`` (under load, OpenMP's 2-thread barriers can
make it several times slower than 1 thread) and the fastest setting is the one compared.
On CPU both processes get the same glibc malloc settings (:mod:`p2p_jax.host_memory`).
docs/performance.md has the method and the current figures.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from p2p_jax import host_memory, layers, models, parallel, train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WHAT = flags.DEFINE_enum('what', 'step', ['step', 'input', 'dot', 'compare'],
                          'What to benchmark.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', None, 'Overrides config.data.batch_size.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (per round for compare).')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
_INPUT_IMAGES = flags.DEFINE_integer('input_images', 512,
                                     'input: images timed per configuration.')
_INPUT_WORKERS = flags.DEFINE_list('input_workers', ['0', '1', '2'],
                                   'input: the num_workers values to time.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'compare: alternating rounds of ours and torch.')
_TORCH_PYTHON = flags.DEFINE_string('torch_python', None, 'compare: python with torch.')
_TORCH_REF = flags.DEFINE_string(
    'torch_ref', os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              'benchmarks', 'torch_ref.py'),
    'compare: the PyTorch reference step (default: benchmarks/torch_ref.py of this checkout).')
_TORCH_THREADS = flags.DEFINE_list('torch_threads', ['0', '1'],
                                   'compare: torch thread counts to try (0: one per CPU '
                                   'core); the fastest is compared.')


def peak_memory() -> dict:
  """Peak resident host memory of this process, and peak device memory where reported."""
  # ru_maxrss is in KiB on Linux.
  out = {'peak_host_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
  stats = jax.local_devices()[0].memory_stats()  # None on CPU.
  if stats and 'peak_bytes_in_use' in stats:
    out['peak_device_mb'] = round(stats['peak_bytes_in_use'] / 2**20, 1)
  return out


def _devices() -> list[str]:
  return [f'{d.platform}:{d.device_kind}' for d in jax.devices()]


class StepRunner:
  """The compiled train step, its state and a random batch, ready to be timed."""

  def __init__(self, config, batch_size: int):
    mesh = parallel.create_mesh()
    parallel.check_batch_size(batch_size, mesh, '--batch_size')
    pix2pix = train.create_pix2pix(config, steps_per_epoch=1000)
    self.state = train.create_train_state(pix2pix, config, jax.random.PRNGKey(config.seed),
                                          parallel.replicated_sharding(mesh))
    size = config.data.crop_size
    rng = np.random.default_rng(0)
    batch = {'A': rng.uniform(-1, 1, (batch_size, size, size, config.data.input_nc)),
             'B': rng.uniform(-1, 1, (batch_size, size, size, config.data.output_nc))}
    self.batch = jax.device_put(jax.tree.map(lambda x: x.astype(np.float32), batch),
                                parallel.batch_sharding(mesh))
    step_fn = train.make_train_step(pix2pix, mesh, train.lr_schedule(config, 1000))
    start = time.perf_counter()
    self.compiled = step_fn.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - start
    cost = self.compiled.cost_analysis()
    # A dict on recent jax; a one-element list of dicts on older versions.
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.flops = float(cost.get('flops', float('nan'))) if cost else float('nan')

  def run(self, steps: int) -> list[float]:
    """Runs ``steps`` steps; returns each one's seconds (blocking on the state each step)."""
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
      start = time.perf_counter()
      self.state, metrics = self.compiled(self.state, self.batch)
      jax.block_until_ready((self.state, metrics))
      times.append(time.perf_counter() - start)
    # Page faults show whether the step's host buffers are re-mapped every step.
    self.page_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return times


def _step_result(config, runner: StepRunner, batch_size: int, times: list[float]) -> dict:
  median = statistics.median(times)
  return {
      'what': 'step', 'netG': config.model.netG, 'netD': config.model.netD,
      'conv_impl': layers.resolve_impl(config.model.conv_impl, jax.default_backend()),
      'compute_dtype': config.compute_dtype,
      'size': config.data.crop_size, 'batch_size': batch_size, 'steps': len(times),
      'median_s_per_step': round(median, 5), 'images_per_sec': round(batch_size / median, 3),
      'compile_s': round(runner.compile_s, 2), 'step_gflops': round(runner.flops / 1e9, 3),
      'achieved_gflops_per_sec': round(runner.flops / 1e9 / median, 2),
      'page_faults_per_step': runner.page_faults // max(len(times), 1),
      **peak_memory(), 'devices': _devices(),
  }


def benchmark_step(config, batch_size: int, steps: int, warmup: int) -> dict:
  """Compiles and times the real train step on random data.

  Args:
    config: the training config (model, resolution, dtype, conv_impl).
    batch_size: global batch size.
    steps: timed steps.
    warmup: untimed steps after compilation.

  Returns:
    A dict: median seconds per step, images/s, compile seconds, the step's GFLOP (XLA's
    cost analysis), achieved GFLOP/s, peak memory and the devices.
  """
  runner = StepRunner(config, batch_size)
  runner.run(warmup)
  return _step_result(config, runner, batch_size, runner.run(steps))


def benchmark_dot(n: int = 4096, steps: int = 10) -> dict:
  """GFLOP/s of an ``n x n`` float32 ``jnp.dot``: the machine's practical matmul peak."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  jax.block_until_ready(dot(a, a))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(dot(a, a))
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  return {'what': 'dot', 'n': n, 'median_s': round(median, 4),
          'gflops_per_sec': round(2 * n**3 / 1e9 / median, 1), 'devices': _devices()}


def _torch_step(config, batch_size: int, steps: int, threads: int) -> dict:
  """Runs the PyTorch reference in a subprocess; returns its JSON line."""
  num_downs = models.UNET_NAMES[config.model.netG]
  cmd = [_TORCH_PYTHON.value, _TORCH_REF.value, '--size', str(config.data.crop_size),
         '--batch', str(batch_size), '--steps', str(steps), '--threads', str(threads),
         '--num-downs', str(num_downs), '--ngf', str(config.model.ngf)]
  env = {**os.environ, **(host_memory.malloc_env() if jax.default_backend() == 'cpu' else {})}
  out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
  return json.loads(out.strip().splitlines()[-1])


def compare_with_torch(config, batch_size: int, steps: int, rounds: int) -> dict:
  """Times our step and the PyTorch reference alternately, in one sitting.

  Alternating rounds expose both to the same machine load; the ratio of medians is the
  figure to trust on a shared machine, not either absolute time.

  Returns:
    Our step result plus the PyTorch median per thread setting, the best of them, and
    ``ratio_ours_over_torch`` against that best.
  """
  if not _TORCH_PYTHON.value:
    raise app.UsageError('--what=compare needs --torch_python (a python with torch).')
  if not os.path.isfile(_TORCH_REF.value):
    raise app.UsageError(f'--torch_ref={_TORCH_REF.value} is not a file.')
  thread_counts = [int(t) or os.cpu_count() for t in _TORCH_THREADS.value]
  runner = StepRunner(config, batch_size)
  runner.run(_WARMUP.value)
  ours = []
  theirs = {t: [] for t in thread_counts}  # Each round's median of `steps` torch steps.
  torch_version = None
  our_rounds = []  # Each round's median of `steps` of our steps.
  for _ in range(rounds):
    times = runner.run(steps)
    ours += times
    our_rounds.append(round(statistics.median(times), 4))
    for t in thread_counts:
      line = _torch_step(config, batch_size, steps, t)
      theirs[t].append(line['median_s_per_step'])
      torch_version = line.get('torch')
  result = _step_result(config, runner, batch_size, ours)
  torch_medians = {t: statistics.median(v) for t, v in theirs.items()}
  best_threads = min(torch_medians, key=torch_medians.get)
  result.update({
      'what': 'compare', 'torch': torch_version, 'round_medians': our_rounds,
      'torch_median_s_per_step_by_threads': {str(t): round(m, 4)
                                             for t, m in torch_medians.items()},
      'torch_round_medians_by_threads': {str(t): v for t, v in theirs.items()},
      'torch_best_threads': best_threads,
      'torch_median_s_per_step': round(torch_medians[best_threads], 4),
      'ratio_ours_over_torch': round(result['median_s_per_step']
                                     / torch_medians[best_threads], 3)})
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  if host_memory.jax_runs_on_cpu():  # Before JAX creates its CPU client.
    host_memory.keep_freed_memory_mapped()
  what = _WHAT.value
  if what == 'dot':
    print(json.dumps(benchmark_dot()), flush=True)
    return
  config = _CONFIG.value
  if config is None:
    raise app.UsageError(f'--what={what} needs --config.')
  batch_size = _BATCH_SIZE.value or config.data.batch_size
  if what == 'input':
    from p2p_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    for line in input_pipeline.benchmark(
        config, _INPUT_IMAGES.value, tuple(int(n) for n in _INPUT_WORKERS.value)):
      print(json.dumps(line), flush=True)
  elif what == 'step':
    print(json.dumps(benchmark_step(config, batch_size, _STEPS.value, _WARMUP.value)),
          flush=True)
  else:
    print(json.dumps(compare_with_torch(config, batch_size, _STEPS.value, _ROUNDS.value)),
          flush=True)


if __name__ == '__main__':
  app.run(main)
