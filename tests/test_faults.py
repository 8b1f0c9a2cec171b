"""Faults: the job lock, markers that are checked, corrupt chunks and checkpoints with a way back,
a write that fails part-way (a full disk). The kill-anywhere test of the whole loop is
`test_kill_anywhere.py`."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from rest_jax import fileio, joblock, partitioning, records as records_lib, trainer as trainer_lib
from test_grow import MODEL, SHAPES, chunk_files, policy, run_grow  # noqa: F401  (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the job lock ----------------------------------------------------------------------------------

def _holder(workdir, job_id=None):
  """A separate process holding `workdir`'s lock until killed; returns it once it holds it."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  if job_id:
    env[joblock.JOB_ID_ENV] = job_id
  code = textwrap.dedent(f'''
      import sys, time
      from rest_jax import joblock
      with joblock.hold({str(workdir)!r}, command='rest-jax rest --workdir=w'):
        print('held', flush=True)
        time.sleep(600)
  ''')
  p = subprocess.Popen([sys.executable, '-c', code], env=env, stdout=subprocess.PIPE, text=True)
  assert p.stdout.readline().strip() == 'held'
  return p


def test_a_second_job_is_refused_and_a_killed_holder_releases_the_lock(tmp_path, monkeypatch):
  holder = _holder(tmp_path)
  try:
    with pytest.raises(joblock.JobLockError) as e:
      with joblock.hold(str(tmp_path)):
        pass
    msg = str(e.value)
    assert f'pid {holder.pid} on ' in msg and 'command: rest-jax rest --workdir=w' in msg
    assert 'started 20' in msg
    # A worker of the same job (same REST_JAX_JOB_ID) is admitted, without taking the lock.
    monkeypatch.setenv(joblock.JOB_ID_ENV, 'job-a')
    with pytest.raises(joblock.JobLockError):  # The holder has no job id: not the same job.
      with joblock.hold(str(tmp_path)):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # SIGKILL: the kernel released the lock; the next job runs at once.
  with joblock.hold(str(tmp_path)) as me:
    assert me['role'] == 'holder'
  holder = _holder(tmp_path, job_id='job-a')
  try:
    with joblock.hold(str(tmp_path)) as me:
      assert me['role'] == 'joined'
    monkeypatch.setenv(joblock.JOB_ID_ENV, 'job-b')
    with pytest.raises(joblock.JobLockError, match='job id job-a'):
      with joblock.hold(str(tmp_path)):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()


def test_the_cli_refuses_a_second_job_on_a_work_dir(tmp_path):
  from loop_utils import run
  holder = _holder(tmp_path)
  try:
    with pytest.raises(joblock.JobLockError, match=f'pid {holder.pid}'):
      run(['grow', f'--workdir={tmp_path}', '--gin_file=gin_configs/runs/grow.gin'])
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()


# -- markers, corrupt and missing chunks, --repair -------------------------------------------------

@pytest.fixture(scope='module')
def grown(tmp_path_factory, policy):  # noqa: F811
  """(policy, dir): a finished tiny Grow of 3 chunks (`test_grow`'s settings)."""
  out = tmp_path_factory.mktemp('faults') / 'grow_1'
  run_grow(out, policy)
  return policy, out


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def _flip_byte(path, offset):
  with open(path, 'r+b') as f:
    f.seek(offset)
    b = f.read(1)
    f.seek(offset)
    f.write(bytes([b[0] ^ 0x40]))


def test_markers_record_size_and_sha256(grown):
  _, out = grown
  marker = fileio.read_json(out / 'grow-00001.done')
  path = out / 'grow-00001-of-00003.tfrecord'
  assert marker['_file'] == records_lib.file_digest(str(path))
  assert marker['_file']['bytes'] == os.path.getsize(path)
  assert '_file' not in records_lib.read_marker(str(out), records_lib.GROW, 1)


def test_a_bit_flip_is_named_with_its_file_and_repaired(grown, tmp_path):
  policy, out = grown
  d = _copy(out, tmp_path / 'grow_1')
  bad = d / 'grow-00001-of-00003.tfrecord'
  _flip_byte(bad, os.path.getsize(bad) // 2)
  msg = rf'{bad} differs from its marker .*sha256.*--repair to regenerate chunk 1 only'
  with pytest.raises(records_lib.CorruptChunkError, match=msg):
    run_grow(d, policy)  # The resume checks every chunk the manifest counts.
  with pytest.raises(records_lib.CorruptChunkError, match=msg):  # The reader checks the same.
    records_lib.read_chunked(str(d), records_lib.GROW)
  # Read past the marker check (a chunk written before markers had digests): the record index.
  with pytest.raises(records_lib.CorruptChunkError, match=rf'{bad} is corrupt or truncated at '
                     r'record \d+'):
    records_lib.read_records(str(bad))
  mtime = os.path.getmtime(d / 'grow-00000-of-00003.tfrecord')
  records_lib.set_repair(True)
  try:
    manifest = run_grow(d, policy)
  finally:
    records_lib.set_repair(False)
  assert manifest['chunks_resumed'] == 2  # Only chunk 1 was redone ...
  assert os.path.getmtime(d / 'grow-00000-of-00003.tfrecord') == mtime
  for f in chunk_files(d):  # ... and every chunk equals the uninterrupted Grow's.
    assert open(d / f, 'rb').read() == open(out / f, 'rb').read(), f


def test_truncated_and_missing_chunks_behind_their_markers(grown, tmp_path):
  policy, out = grown
  d = _copy(out, tmp_path / 'grow_1')
  cut = d / 'grow-00002-of-00003.tfrecord'
  os.truncate(cut, os.path.getsize(cut) - 7)
  with pytest.raises(records_lib.CorruptChunkError,
                     match=rf'{cut} has \d+ bytes, its marker records \d+ \(cut short'):
    records_lib.read_chunked(str(d), records_lib.GROW)
  os.remove(cut)
  with pytest.raises(records_lib.CorruptChunkError,
                     match=rf'{cut} is missing behind its completion marker'):
    run_grow(d, policy)
  records_lib.set_repair(True)
  try:
    run_grow(d, policy)
  finally:
    records_lib.set_repair(False)
  assert open(cut, 'rb').read() == open(out / cut.name, 'rb').read()


def test_markers_not_the_manifest_decide_what_is_done(grown, tmp_path):
  # A manifest that survived while a chunk and its marker were removed: the output is not done,
  # the resume redoes that chunk and writes the manifest again.
  policy, out = grown
  d = _copy(out, tmp_path / 'grow_1')
  os.remove(d / 'grow-00001-of-00003.tfrecord')
  os.remove(d / 'grow-00001.done')
  assert records_lib.finished_manifest(str(d), records_lib.GROW) is None
  with pytest.raises(FileNotFoundError, match='has no completion marker'):
    records_lib.read_chunked(str(d), records_lib.GROW)
  manifest = run_grow(d, policy)
  assert manifest['chunks_resumed'] == 2
  assert [open(d / f, 'rb').read() for f in chunk_files(d)] == [
      open(out / f, 'rb').read() for f in chunk_files(out)]


def test_a_loop_stage_is_trusted_only_when_its_outputs_verify(grown, tmp_path):
  from rest_jax import rest as rest_lib
  _, out = grown
  d = _copy(out, tmp_path / 'grow_1')
  fileio.write_json(str(d / rest_lib.STAGE_FILE), {'minutes': 1.0})
  assert rest_lib._stage_done(str(d)) == {'minutes': 1.0}
  _flip_byte(d / 'grow-00000-of-00003.tfrecord', 40)
  with pytest.raises(ValueError, match=r'marked done but its outputs do not verify: .*grow-00000'
                     r'.*--repair'):
    rest_lib._stage_done(str(d))
  records_lib.set_repair(True)
  try:
    assert rest_lib._stage_done(str(d)) is None  # Rerun: Grow then redoes chunk 0 only.
  finally:
    records_lib.set_repair(False)
  assert not (d / rest_lib.STAGE_FILE).exists()


# -- a full disk ---------------------------------------------------------------------------------

def test_a_write_failing_part_way_leaves_nothing_and_the_rerun_completes(grown, tmp_path,
                                                                       monkeypatch):
  policy, out = grown
  d = tmp_path / 'grow_1'
  real = records_lib.to_example
  calls = {'n': 0}
  in_chunk_1 = len(records_lib.read_records(str(out / 'grow-00000-of-00003.tfrecord'))) + 2

  def full_disk(*args, **kwargs):
    calls['n'] += 1
    if calls['n'] == in_chunk_1:  # Inside chunk 1.
      raise OSError(errno.ENOSPC, 'No space left on device')
    return real(*args, **kwargs)
  monkeypatch.setattr(records_lib, 'to_example', full_disk)
  with pytest.raises(OSError, match='No space left'):
    run_grow(d, policy)
  assert sorted(set(os.listdir(d)) - {records_lib.CLAIMS_DIR}) == [
      'grow-00000-of-00003.tfrecord', 'grow-00000.done', 'settings.json']  # No partial chunk,
  # no temporary file (`.claims/` holds the workers' chunk claims, `records.claim_chunks`).
  monkeypatch.setattr(records_lib, 'to_example', real)
  run_grow(d, policy)
  for f in chunk_files(out):
    assert open(d / f, 'rb').read() == open(out / f, 'rb').read(), f

  # The project's JSON / text writes: the same promise.
  target = tmp_path / 'report.json'
  fileio.write_json(str(target), {'old': 1})

  class FullDisk:
    def __init__(self, f):
      self.f = f

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.f.close()

    def write(self, b):
      self.f.write(b[:3])
      raise OSError(errno.ENOSPC, 'No space left on device')
  real_open = fileio.open_file
  monkeypatch.setattr(fileio, 'open_file', lambda p, mode='r': FullDisk(real_open(p, mode)))
  with pytest.raises(OSError, match='No space left'):
    fileio.write_json(str(target), {'new': 2})
  monkeypatch.setattr(fileio, 'open_file', real_open)
  assert fileio.read_json(str(target)) == {'old': 1} and sorted(os.listdir(tmp_path)) == [
      'grow_1', 'report.json']


# -- checkpoints -----------------------------------------------------------------------------------

def _damage_checkpoint(step_dir):
  """Overwrites every file of an orbax checkpoint's array item with garbage of the same size."""
  n = 0
  for root, _, files in os.walk(step_dir):
    for name in files:
      p = os.path.join(root, name)
      if os.path.basename(root) != 'config' and name != 'commit_success.txt' and (
          os.sep + 'state' in root or os.sep + 'params' in root):
        size = os.path.getsize(p)
        with open(p, 'r+b') as f:
          f.write((b'\x00garbage' * (size // 8 + 1))[:size])
        n += 1
  assert n, f'no data files under {step_dir}'


def test_a_damaged_latest_checkpoint_falls_back_and_a_damaged_best_is_refused(tmp_path, caplog):
  t = trainer_lib.Trainer(MODEL, trainer_lib.make_optimizer(), partitioning.create_mesh(1))
  state = t.init_state(SHAPES)
  ckpt = trainer_lib.Checkpointer(str(tmp_path / 'run'), keep=2, best_metric='reward')
  s1 = state.replace(step=np.int32(1))
  s2 = state.replace(step=np.int32(2), params=jax.tree.map(lambda x: x + 1, state.params))
  ckpt.save(s1)
  ckpt.save(s2)
  ckpt.save_best(s2, {'reward': 1.0})
  _damage_checkpoint(tmp_path / 'run' / 'checkpoints' / '2')
  restored = trainer_lib.Checkpointer(str(tmp_path / 'run')).restore_latest(state)
  assert int(restored.step) == 1
  np.testing.assert_array_equal(jax.tree.leaves(restored.params)[0],
                                jax.tree.leaves(s1.params)[0])
  assert 'checkpoints/2 does not restore' in caplog.text
  _damage_checkpoint(tmp_path / 'run' / 'best' / '2')
  with pytest.raises(ValueError, match=r'best/2 \(the best checkpoint of .*run\) does not restore'
                     r'.*rerun the stage that wrote it \(run\)'):
    trainer_lib.restore_params(str(tmp_path / 'run'), state.params)
