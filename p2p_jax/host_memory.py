"""glibc malloc settings that keep XLA:CPU's per-step buffers mapped from one step to the next.

XLA:CPU allocates each execution's temporary buffer (hundreds of MB for a 256x256 step) with
``posix_memalign`` from a worker thread. glibc serves a block that large from a fresh ``mmap``
and unmaps it when it is freed, so every step would page-fault the whole buffer in again.
With one arena, no ``mmap`` for large blocks and no trimming, the next step reuses the same
pages; freed host memory stays with the process. Applied on CPU runs only
(:func:`jax_runs_on_cpu`); docs/performance.md has the measurements.
"""
import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import sys

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def jax_runs_on_cpu() -> bool:
  """Whether JAX's default backend will be the CPU, decided before JAX starts.

  ``JAX_PLATFORMS`` decides where it is set; otherwise any installed accelerator plugin (a
  ``jax_plugins`` entry point, as the CUDA and ROCm plugins register, or ``libtpu``) means
  JAX may pick an accelerator, and the CPU-only settings are left alone.
  """
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip().lower() == 'cpu'
  if importlib.metadata.entry_points(group='jax_plugins'):
    return False
  return importlib.util.find_spec('libtpu') is None


def keep_freed_memory_mapped() -> bool:
  """Makes glibc keep freed heap memory for reuse instead of returning it to the OS.

  Call it first thing in a process, before JAX creates its CPU client: threads that have
  already allocated keep their own arenas, whose large blocks are always ``mmap``-ed.

  Returns:
    Whether the settings were applied (False off Linux/glibc, e.g. on macOS or musl).
  """
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
  except OSError:
    return False
  mallopt = getattr(libc, 'mallopt', None)
  if mallopt is None:
    return False
  # One arena: large blocks from a thread's own arena are always mmap-ed. No mmap, and a
  # trim threshold of 2 GiB (mallopt takes an int): freed blocks stay mapped for reuse.
  return bool(mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0)
              and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def malloc_env() -> dict[str, str]:
  """The same settings as environment variables, for a child process (e.g. a reference run)."""
  return {'MALLOC_ARENA_MAX': '1', 'MALLOC_MMAP_MAX_': '0',
          'MALLOC_TRIM_THRESHOLD_': str(2**31 - 1)}
