"""glibc settings that keep XLA:CPU's per-step buffers mapped between steps."""
import subprocess
import sys

import pytest

# Touches and frees a 256 MB block; prints whether the settings applied and how much of the
# block is still resident afterwards (MB).
_PROBE = """
import os, sys
import numpy as np
from p2p_jax import host_memory
applied = host_memory.keep_freed_memory_mapped() if sys.argv[1] == 'on' else False
def resident_mb():
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
before = resident_mb()
block = np.ones(64 * 2**20, np.float32)
del block
print(applied, resident_mb() - before)
"""


def _resident_after_free(mode):
  out = subprocess.run([sys.executable, '-c', _PROBE, mode], check=True, capture_output=True,
                       text=True).stdout.split()
  return out[0] == 'True', float(out[1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')
def test_freed_block_stays_mapped_for_reuse():
  applied, kept_mb = _resident_after_free('on')
  _, default_mb = _resident_after_free('off')
  assert applied
  assert default_mb < 32  # By default glibc unmaps a freed large block...
  assert kept_mb > 200  # ...with the settings it stays mapped, ready for the next step.
