"""Test set-up: 8 forced CPU devices so sharded code paths run in every test.

The flag must be set before jax is imported anywhere, hence here at collection time.
"""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
# gcsfs reads this at import: its bucket-type probe (a gRPC call with a 60 s timeout) cannot reach
# the storage emulator of tests/test_storage.py.
os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')

import gc  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402

# One persistent compilation cache for the session: the CLI tests run the same jitted steps in
# several "processes" (train, resume, eval), as a researcher's runs would.
jax.config.update('jax_compilation_cache_dir', tempfile.mkdtemp(prefix='rest_jax_jit_cache_'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)

import gin  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _empty_gin_config():
  """Every test starts and ends with no gin bindings.

  The CLI and loop tests parse real gin files in this one process; without this, their bindings
  (e.g. `train_reward_model.oracle = 'chrf+ter'`) silently reached later tests' fixtures that call
  the same configurables with their Python defaults.
  """
  gin.clear_config()
  yield
  gin.clear_config()


# Every compiled XLA:CPU executable holds about 3 memory mappings for its code until jax's caches
# drop it, and the suite compiles thousands in this one process: past the kernel's
# vm.max_map_count (65,530 by default) the next compile or compilation-cache read segfaults (CI,
# 2026-12-08: at 80% of the suite, inside backend_compile_and_load; /proc/<pid>/maps had grown
# to 46,704 at 56%). Between tests, past this many mappings, jax's caches are cleared.
MAX_MAPPINGS = 20_000


def _mappings() -> int:
  try:
    with open('/proc/self/maps') as f:
      return sum(1 for _ in f)
  except OSError:  # Not Linux: no limit to guard.
    return 0


@pytest.fixture(autouse=True)
def _bounded_memory_mappings():
  yield
  if _mappings() > MAX_MAPPINGS:
    jax.clear_caches()
    gc.collect()
