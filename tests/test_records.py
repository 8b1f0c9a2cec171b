"""Record I/O: settings schema 2 (portable paths, host count outside the hash), the migration of
work directories written by the schema-1 code, clear errors on bad files, and the one batched
inference helper."""

import filecmp
import json
import os
import shutil

import jax
import numpy as np
import pytest

from rest_jax import fileio, grow as grow_lib, inference, partitioning, records
from rest_jax.rewards import scoring
import test_grow as tg

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'workdir_v1')


def v1_workdir(dest):
  """The schema-1 fixture at `dest`, its recorded location put back (see make_workdir_v1.py)."""
  shutil.copytree(FIXTURE, dest)
  for root, _, files in os.walk(dest):
    for f in files:
      if f.endswith('.json'):
        p = os.path.join(root, f)
        with open(p) as fh:
          text = fh.read()
        with open(p, 'w') as fh:
          fh.write(text.replace('@WORKDIR@', str(dest)))
  return str(dest)


def grow_args(work, params, **kw):
  args = dict(model=tg.MODEL, policy_dir=os.path.join(work, 'policy'), params=params, task='tiny',
              num_decodes=tg.N, temperature=0.8, max_decode_len=tg.L, chunk_size=tg.CHUNK,
              batch_size=8, seed=3, task_data=tg.DATA, detokenize=tg.detok,
              mesh=partitioning.create_mesh(1))
  args.update(kw)
  return args


def fixture_params():
  shapes = {'encoder_input_tokens': (1, 16), 'decoder_input_tokens': (1, 16)}
  from rest_jax import trainer as trainer_lib
  abstract = trainer_lib.Trainer(tg.MODEL, trainer_lib.make_optimizer(),
                                 partitioning.create_mesh(1)).abstract_state(shapes).params
  return jax.device_get(fileio.load_params_npz(os.path.join(FIXTURE, 'params.npz'), abstract))


def tfrecords(d):
  return sorted(f for f in os.listdir(d) if f.endswith('.tfrecord'))


def test_schema1_work_dirs_resume_as_the_old_code_would_have_finished_them(tmp_path):
  work = v1_workdir(tmp_path / 'work')
  params = fixture_params()
  old = fileio.read_json(os.path.join(work, 'grow_1', 'settings.json'))
  assert 'schema_version' not in old and old['settings']['process_count'] == 1

  manifest = grow_lib.grow(os.path.join(work, 'grow_1'), **grow_args(work, params))
  assert manifest['chunks_resumed'] == 1
  assert manifest['settings_hash'] == old['settings_hash']  # keeps its hash ...
  assert manifest['settings']['record_format'] == 1         # ... and its record format
  assert manifest['settings']['policy_dir'] == 'policy'     # (paths now work-dir relative)
  assert fileio.read_json(os.path.join(work, 'grow_1', 'settings.json')) == old  # not rewritten
  # Chunks 1 and 2, written now, are what the schema-1 code wrote in its uninterrupted run: the
  # same records, log-probs up to float rounding (the fixture was made on another machine, whose
  # XLA CPU kernels round differently; on one machine a resumed Grow is byte-identical,
  # test_grow.py).
  assert tfrecords(os.path.join(work, 'grow_1')) == tfrecords(os.path.join(work, 'grow_full'))
  for f in tfrecords(os.path.join(work, 'grow_full')):
    tg.assert_same_records(records.read_records(os.path.join(work, 'grow_1', f)),
                           records.read_records(os.path.join(work, 'grow_full', f)))
  refs = [r for r in grow_lib.read_grow_records(os.path.join(work, 'grow_1'))
          if r['origin'] == 'reference']
  assert all(r['logprob_sampling'] == r['logprob_policy'] for r in refs)  # format 1

  sargs = dict(grow_dir=os.path.join(work, 'grow_full'), task='tiny', reward='chrf',
               metrics=('chrf',))
  scored = scoring.score(os.path.join(work, 'scored_1'), **sargs)
  assert scored['chunks_resumed'] == 1 and scored['settings']['grow_dir'] == 'grow_full'
  for f in tfrecords(os.path.join(work, 'scored_full')):
    assert filecmp.cmp(os.path.join(work, 'scored_1', f), os.path.join(work, 'scored_full', f),
                       shallow=False), f
  assert scored['counts'] == fileio.read_json(
      os.path.join(work, 'scored_full', 'manifest.json'))['counts']

  # A schema-1 directory still refuses other settings, naming them.
  with pytest.raises(ValueError, match=r'temperature 0\.8 -> 0\.5'):
    grow_lib.grow(os.path.join(work, 'grow_1'), **grow_args(work, params, temperature=0.5))


def test_schema2_settings_are_portable_and_versioned(tmp_path):
  params = fixture_params()
  work = str(tmp_path / 'a')
  with pytest.raises(grow_lib.GrowInterrupted):
    grow_lib.grow(os.path.join(work, 'grow_1'), _stop_after_chunks=1, **grow_args(work, params))
  stored = fileio.read_json(os.path.join(work, 'grow_1', 'settings.json'))
  assert stored['schema_version'] == records.SCHEMA_VERSION == 2
  assert stored['settings']['policy_dir'] == 'policy'
  assert stored['settings']['record_format'] == records.RECORD_FORMAT
  assert 'process_count' not in stored['settings']
  assert stored['location'] == {'output_dir': os.path.join(work, 'grow_1'), 'process_count': 1}
  assert stored['settings_hash'] == records.settings_hash(stored['settings'])
  # The work dir moves (e.g. copied to another disk): it resumes under the same hash.
  moved = str(tmp_path / 'b')
  shutil.move(work, moved)
  manifest = grow_lib.grow(os.path.join(moved, 'grow_1'), **grow_args(moved, params))
  assert manifest['chunks_resumed'] == 1 and manifest['settings_hash'] == stored['settings_hash']
  refs = [r for r in grow_lib.read_grow_records(os.path.join(moved, 'grow_1'))
          if r['origin'] == 'reference']
  assert len(refs) == 12 and all(np.isnan(r['logprob_sampling']) for r in refs)  # format 2
  # A newer schema than the code knows is refused.
  stored['schema_version'] = 3
  fileio.write_json(os.path.join(moved, 'grow_1', 'settings.json'), stored)
  with pytest.raises(ValueError, match='schema 3 is newer'):
    records.pin_settings(os.path.join(moved, 'grow_1'), {}, what='a Grow')


def test_portable_paths():
  assert fileio.portable_path('/w/run/grow_1', '/w/run') == 'grow_1'
  assert fileio.portable_path('/w/run', '/w/run') == '.'
  assert fileio.portable_path('/w/runs/x', '/w/run') == '/w/runs/x'  # outside: as is
  assert fileio.portable_path('gs://b/run/rm', 'gs://b/run') == 'rm'
  assert fileio.portable_path(None, '/w') is None
  assert fileio.resolve_path('grow_1', '/w/run') == '/w/run/grow_1'
  assert fileio.resolve_path('/abs', '/w/run') == '/abs'


def test_bad_files_get_clear_errors(tmp_path):
  p = tmp_path / 'settings.json'
  p.write_text('{"settings": {"a": 1')  # cut short, e.g. by a full disk
  with pytest.raises(ValueError, match='settings.json is not valid JSON'):
    fileio.read_json(str(p))
  rec = dict(source_index=0, source_ids=[3, 1], candidate_ids=[4, 1], length=2, grow_step=1,
             candidate_index=0, num_duplicates=1, logprob_sampling=-1.0, logprob_policy=-1.0,
             source='a', reference='b', candidate='c', origin='sample', key='k')
  good = str(tmp_path / 'grow-00000-of-00001.tfrecord')
  records.write_records(good, [rec, dict(rec, key='k2')])
  assert [r['key'] for r in records.read_records(good)] == ['k', 'k2']
  data = open(good, 'rb').read()
  bad = str(tmp_path / 'cut.tfrecord')
  open(bad, 'wb').write(data[:len(data) - 7])
  with pytest.raises(ValueError, match='cut.tfrecord is corrupt or truncated'):
    records.read_records(bad)
  fileio.write_json(str(tmp_path / 'x.json'), {'b': np.float32(0.5), 'a': np.arange(2)})
  assert json.load(open(tmp_path / 'x.json')) == {'a': [0, 1], 'b': 0.5}
  assert sorted(os.listdir(tmp_path)) == ['cut.tfrecord', 'grow-00000-of-00001.tfrecord',
                                         'settings.json', 'x.json']  # No temporary file left.


def test_run_batched_groupings_and_shapes():
  # 5 rows of lengths 3, 20, 5, 17, 2 (buckets 16, 32, 16, 32, 16).
  lens = [3, 20, 5, 17, 2]
  tokens = np.zeros((5, 40), np.int32)
  for i, l in enumerate(lens):
    tokens[i, :l] = 7
  calls = []

  def step(buckets, batch):
    calls.append((buckets, batch['tokens'].shape))
    t = np.asarray(batch['tokens'])
    # [rows, bucket] output whose width depends on the bucket; and a per-row length.
    return {'wide': t + 1, 'n': (t != 0).sum(1) + 100 * np.asarray(batch['idx'])}
  mesh = partitioning.create_mesh(1)
  out = inference.run_batched(step, {'tokens': tokens, 'idx': np.arange(5)}, trim=('tokens',),
                              batch_size=3, mesh=mesh, grouping='row')
  # Own buckets: {0, 2, 4} in one 16-token batch, {1, 3} in one 32-token batch (padded to 8 rows:
  # the mesh's data axis).
  assert calls == [((16,), (8, 16)), ((32,), (8, 32))]
  np.testing.assert_array_equal(out['n'], np.array(lens) + 100 * np.arange(5))
  assert out['wide'].shape == (5, 32)  # zero-padded to the widest batch
  np.testing.assert_array_equal(out['wide'][0, :16], np.where(tokens[0, :16] > 0, 8, 1))
  assert (out['wide'][0, 16:] == 0).all()
  calls.clear()
  out = inference.run_batched(step, {'tokens': tokens, 'idx': np.arange(5)}, trim=('tokens',),
                              batch_size=3, mesh=None, grouping='sorted')
  # Sorted by length: rows 4, 0, 2 (longest 5 -> 16), then 3, 1 (longest 20 -> 32).
  assert calls == [((16,), (3, 16)), ((32,), (3, 32))]
  np.testing.assert_array_equal(out['n'], np.array(lens) + 100 * np.arange(5))
  with pytest.raises(ValueError, match='unknown grouping'):
    inference.run_batched(step, {'tokens': tokens}, trim=('tokens',), grouping='longest')
  # 'row' batches hold one bucket each, rows ordered by length inside it (stable on ties).
  keys = np.array([16, 32, 16, 32, 16, 16])
  plan = inference.plan_batches(keys, 2, 'row', lengths=np.array([3, 20, 5, 17, 2, 3]))
  assert [list(b) for b in plan] == [[4, 0], [5, 2], [3, 1]]
  assert [list(b) for b in inference.plan_batches(keys, 2, 'row')] == [[0, 2], [4, 5], [1, 3]]
