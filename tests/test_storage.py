"""Work directories on cloud storage: a tiny ReST loop whose work directory is a `gs://` URL.

The bucket is a local Cloud Storage emulator (`gcp-storage-emulator`, in memory, on a free
loopback port), reached through the same libraries as a real bucket: `etils.epath` over gcsfs for
records, markers, manifests, settings, reports and TensorBoard files, and orbax over TensorStore's
`gcs` driver for checkpoints. TensorFlow's own GCS client cannot be pointed at an emulator, so
`EPATH_USE_TF=false` (epath's documented switch) sends epath to gcsfs; rest_jax's TFRecord and
event-file writers go through `rest_jax.fileio` either way. Nothing here reaches the network.
"""

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from rest_jax import fileio

from loop_utils import run, strip
from test_multihost import _free_port
from test_rest import TIMING_KEYS, TINY

BUCKET = 'rest-jax-test'


@pytest.fixture
def gcs(monkeypatch, tmp_path):
  """A Cloud Storage emulator with the bucket `BUCKET`; yields its `gs://` root."""
  port = _free_port()
  proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__),
                                                        'gcs_emulator.py'),
                           f'--port={port}', f'--bucket={BUCKET}'],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 30
  while True:
    try:
      socket.create_connection(('127.0.0.1', port), timeout=1).close()
      break
    except OSError:
      if time.time() > deadline or proc.poll() is not None:
        proc.kill()
        raise RuntimeError('the storage emulator did not start')
      time.sleep(0.2)
  url = f'http://127.0.0.1:{port}'
  for k, v in {'EPATH_USE_TF': 'false', 'STORAGE_EMULATOR_HOST': url,
               'TENSORSTORE_GCS_HTTP_URL': url,
               'GCE_METADATA_HOST': '127.0.0.1:1', 'GCE_METADATA_ROOT': '127.0.0.1:1',
               'NO_GCE_CHECK': 'true', 'REST_JAX_CACHE_DIR': str(tmp_path / 'local_cache')}.items():
    monkeypatch.setenv(k, v)
  import fsspec
  from etils.epath import gpath
  fsspec.config.conf.setdefault('gs', {})['token'] = 'anon'
  # epath caches its EPATH_USE_TF decision at the first URL it meets (another test's gs:// path).
  clear = getattr(gpath._is_tf_installed, 'cache_clear', lambda: None)  # noqa: SLF001
  clear()
  try:
    yield f'gs://{BUCKET}'
  finally:
    clear()
    fsspec.config.conf.get('gs', {}).pop('token', None)
    import gcsfs
    gcsfs.GCSFileSystem.clear_instance_cache()
    proc.kill()
    proc.wait()


def test_fileio_on_the_emulator(gcs):
  """The URL paths of `rest_jax.fileio`: atomic writes, listing, local copies, staged writes."""
  d = f'{gcs}/io'
  fileio.write_json(f'{d}/a.json', {'x': 1})
  assert fileio.read_json(f'{d}/a.json') == {'x': 1}
  assert fileio.listdir(d) == ['a.json']  # No temporary object is left.
  with fileio.staged_write(f'{d}/b.bin') as local:
    assert not fileio.is_url(local)
    with open(local, 'wb') as f:
      f.write(b'abc')
  with fileio.local_copy(f'{d}/b.bin') as local, open(local, 'rb') as f:
    assert f.read() == b'abc'
  with pytest.raises(ZeroDivisionError):
    with fileio.staged_write(f'{d}/c.bin'):
      raise ZeroDivisionError  # A failed writer leaves nothing behind.
  assert fileio.listdir(d) == ['a.json', 'b.bin']
  assert fileio.abspath(d + '/') == d and fileio.parent(f'{d}/a.json') == d
  cache = fileio.local_cache_dir(d)
  assert not fileio.is_url(cache) and cache.startswith(os.environ['REST_JAX_CACHE_DIR'])


def test_rest_loop_on_a_bucket_gives_the_local_report(gcs, tmp_path):
  """`rest-jax rest --workdir=gs://...` (metric reward) writes every stage to the bucket and gives
  the report of the same loop on local disk; a second run finds every stage done there."""
  args = TINY + ["--gin.rest.reward='chrf+ter'", '--gin.rest.improve_steps_per_grow=2',
                 '--gin.rest.best_of_n_stages=()']
  local = str(tmp_path / 'local')
  run(['rest', f'--workdir={local}'] + args)
  remote = f'{gcs}/runs/metric'
  run(['rest', f'--workdir={remote}'] + args)
  keys = TIMING_KEYS + ('dir', 'policy_dir', 'workdir', 'rm_dir', 'plots')
  want = strip(fileio.read_json(os.path.join(local, 'report.json')), keys)
  got = strip(fileio.read_json(f'{remote}/report.json'), keys)
  assert got == want
  names = fileio.listdir(remote)
  for name in ('bc', 'grow_1', 'scored_1', 'improve_1_0', 'improve_1_1', 'report.md',
               'report.json'):
    assert name in names, name
  assert 'cache' not in names  # Caches stay on local disk.
  # Checkpoints (orbax, TensorStore's gcs driver) and TensorBoard event files are in the bucket.
  assert any(n.isdigit() for n in fileio.listdir(f'{remote}/bc/best'))
  assert any(n.startswith('events.out.tfevents.') for n in fileio.listdir(f'{remote}/bc'))
  # The Grow's TFRecord chunks, read back from the bucket, equal the local ones.
  from rest_jax import records
  for kind in (records.GROW, ):
    a = records.read_chunked(os.path.join(local, 'grow_1'), kind)
    b = records.read_chunked(f'{remote}/grow_1', kind)
    assert len(a) == len(b) > 0
    for ra, rb in zip(a, b):
      assert ra.keys() == rb.keys()
      for k in ra:
        if isinstance(ra[k], float):
          assert np.isclose(ra[k], rb[k], rtol=1e-6, equal_nan=True), k
        else:
          assert ra[k] == rb[k], k
  # Resume: every stage is found done in the bucket; nothing is redone.
  before = {n: fileio.read_json(f'{remote}/{n}/stage.json') for n in ('bc', 'grow_1')}
  run(['rest', f'--workdir={remote}'] + args)
  assert {n: fileio.read_json(f'{remote}/{n}/stage.json') for n in ('bc', 'grow_1')} == before
  assert strip(fileio.read_json(f'{remote}/report.json'), keys) == want
