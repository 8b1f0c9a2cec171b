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

import jax  # noqa: E402

# No persistent compilation cache in the tests, nor in the processes they start (the variable is
# inherited): with one shared by the session, reading an entry back segfaulted inside jax's
# compilation_cache.get_executable_and_time in two fresh-clone runs of the suite (2026-12-08, in
# test_rewards and test_storage, after the kill tests' subprocesses had written to it).
os.environ['JAX_ENABLE_COMPILATION_CACHE'] = 'false'
jax.config.update('jax_enable_compilation_cache', False)

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
