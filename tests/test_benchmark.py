"""The step benchmark CLI prints one JSON line with the figures the README table is made of."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, write_aligned_dataset


def test_step_benchmark_prints_one_json_line_with_timing_flops_and_memory():
  cmd = [sys.executable, '-m', 'p2p_jax.benchmark', '--what=step',
         f'--config={os.path.join(REPO_ROOT, "configs", "default.py")}',
         '--config.model.netG=unet_32', '--config.model.ngf=8', '--config.model.ndf=8',
         '--config.data.crop_size=32', '--config.data.load_size=32', '--batch_size=2', '--steps=2',
         '--warmup=1']
  out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO_ROOT,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'}).stdout
  lines = [line for line in out.splitlines() if line.startswith('{')]
  assert len(lines) == 1, out
  result = json.loads(lines[0])
  assert result['batch_size'] == 2 and result['size'] == 32 and result['steps'] == 2
  assert result['conv_impl'] == 'fast'  # 'auto' resolved on CPU.
  assert result['images_per_sec'] == pytest.approx(2 / result['median_s_per_step'], rel=0.01)
  # XLA's cost analysis of the compiled step, and the rate it ran at.
  assert result['achieved_gflops_per_sec'] == pytest.approx(
      result['step_gflops'] / result['median_s_per_step'], rel=0.02)
  assert result['step_gflops'] > 0 and result['compile_s'] > 0
  assert result['devices'] == ['cpu:cpu']


def test_compare_defaults_to_the_reference_step_in_the_repository():
  code = ('from absl import flags; from p2p_jax import benchmark; '
          'print(flags.FLAGS["torch_ref"].default)')
  default = subprocess.run([sys.executable, '-c', code], check=True, capture_output=True,
                           text=True, cwd='/').stdout.strip()
  assert default == os.path.join(REPO_ROOT, 'benchmarks', 'torch_ref.py')
  with open(default) as f:
    source = f.read()
  # The reference takes the command line that compare passes it (see the test below).
  assert 'class UnetGenerator' in source and '"--num-downs"' in source


def test_compare_alternates_rounds_with_the_reference_and_reports_the_ratio(tmp_path):
  # A stand-in for torch_ref.py (no torch in CI): it logs its arguments and reports a fixed
  # median. The real reference takes the same command line.
  log = tmp_path / 'calls.txt'
  reference = tmp_path / 'fake_ref.py'
  reference.write_text(
      'import json, sys\n'
      f'open({str(log)!r}, "a").write(" ".join(sys.argv[1:]) + "\\n")\n'
      'print(json.dumps({"median_s_per_step": 2.0, "torch": "stand-in"}))\n')
  cmd = [sys.executable, '-m', 'p2p_jax.benchmark', '--what=compare',
         f'--config={os.path.join(REPO_ROOT, "configs", "default.py")}',
         '--config.model.netG=unet_32', '--config.model.ngf=8', '--config.model.ndf=8',
         '--config.data.crop_size=32', '--config.data.load_size=32', '--batch_size=2', '--steps=2',
         '--warmup=1', '--rounds=3', '--torch_threads=1', f'--torch_python={sys.executable}',
         f'--torch_ref={reference}']
  out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO_ROOT,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'}).stdout
  result = json.loads([line for line in out.splitlines() if line.startswith('{')][-1])
  calls = log.read_text().splitlines()
  assert len(calls) == 3  # One reference run per round.
  assert calls[0].split() == ['--size', '32', '--batch', '2', '--steps', '2', '--threads', '1',
                              '--num-downs', '5', '--ngf', '8']
  assert len(result['round_medians']) == 3 and result['steps'] == 6
  assert result['torch_round_medians_by_threads'] == {'1': [2.0, 2.0, 2.0]}
  assert result['torch'] == 'stand-in' and result['torch_best_threads'] == 1
  assert result['ratio_ours_over_torch'] == pytest.approx(result['median_s_per_step'] / 2.0,
                                                          abs=1e-3)


def test_input_benchmark_prints_a_json_line_per_cache_and_worker_setting(tmp_path):
  data_dir = write_aligned_dataset(str(tmp_path / 'data'), side=32, ext='.jpg')
  cmd = [sys.executable, '-m', 'p2p_jax.benchmark', '--what=input',
         f'--config={os.path.join(REPO_ROOT, "configs", "default.py")}',
         f'--config.data.data_dir={data_dir}', '--config.data.load_size=36',
         '--config.data.crop_size=32', '--config.data.batch_size=2',
         f'--config.data.cache_dir={tmp_path / "cache"}', '--input_images=16',
         '--input_workers=0,1']
  out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO_ROOT).stdout
  results = [json.loads(line) for line in out.splitlines() if line.startswith('{')]
  assert [(r['cache'], r['num_workers']) for r in results] == [
      (cache, workers) for cache in (False, True) for workers in (0, 1)]
  for result in results:
    assert result['what'] == 'input' and result['num_images'] == 16
    assert result['images_per_sec'] > 0 and result['images_per_sec_per_core'] > 0
  assert os.listdir(tmp_path / 'cache')  # The cached rows read the cache it built.
