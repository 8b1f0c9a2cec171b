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
