"""ReST Grow: mesh/batch invariance, exact kill-and-resume, dedup, settings pinning, the reader."""

import filecmp
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from rest_jax import grow as grow_lib
from rest_jax import input_pipeline, partitioning, records as records_lib, trainer as trainer_lib
from rest_jax.models import EncoderDecoderModel, Transformer, TransformerConfig

V, N, L, CHUNK = 32, 4, 8, 5
SHAPES = {'encoder_input_tokens': (8, 24), 'decoder_input_tokens': (8, 12)}


def detok(ids):
  return ' '.join(map(str, ids))


def make_model():
  cfg = TransformerConfig(vocab_size=V, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                          num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0,
                          max_len=64)
  return EncoderDecoderModel(Transformer(cfg))


def make_task_data(n=12):
  """n hand-made pairs; sources of 2..20 tokens (two length buckets), EOS = 1, PAD = 0."""
  rng = np.random.default_rng(7)
  src = np.zeros((n, 24), np.int32)
  tgt = np.zeros((n, 12), np.int32)
  for i in range(n):
    ls = 20 if i in (3, 8) else int(rng.integers(1, 10))
    lt = int(rng.integers(1, 11))
    src[i, :ls], src[i, ls] = rng.integers(3, V, ls), 1
    tgt[i, :lt], tgt[i, lt] = rng.integers(3, V, lt), 1
  arrays = {'encoder_input_tokens': src, 'decoder_target_tokens': tgt,
            'decoder_input_tokens': np.pad(tgt, ((0, 0), (1, 0)))[:, :-1],
            'decoder_loss_weights': (tgt > 0).astype(np.float32)}
  texts = lambda a: [detok(r[:np.flatnonzero(r)[-1] + 1]) for r in a]
  return input_pipeline.TaskData(arrays, texts(src), texts(tgt),
                                 [f'pair-{i}' for i in range(n)], 0)


MODEL = make_model()
DATA = make_task_data()


@pytest.fixture(scope='module')
def policy(tmp_path_factory):
  """(policy_dir, params): a random tiny policy saved as a `rest-jax train` run would."""
  t = trainer_lib.Trainer(MODEL, trainer_lib.make_optimizer(), partitioning.create_mesh(1))
  state = t.init_state(SHAPES)
  policy_dir = str(tmp_path_factory.mktemp('policy'))
  trainer_lib.Checkpointer(policy_dir).save(state)
  return policy_dir, jax.device_get(state.params)


def run_grow(out, policy, **kw):
  args = dict(model=MODEL, policy_dir=policy[0], params=policy[1], task='tiny', num_decodes=N,
              temperature=0.8, max_decode_len=L, chunk_size=CHUNK, batch_size=8, seed=3,
              task_data=DATA, detokenize=detok, mesh=partitioning.create_mesh(1))
  args.update(kw)
  return grow_lib.grow(str(out), **args)


@pytest.fixture(scope='module')
def straight(tmp_path_factory, policy):
  """An uninterrupted Grow on the 8x1 mesh, params restored from the policy's checkpoint."""
  out = tmp_path_factory.mktemp('grow') / 'straight'
  manifest = run_grow(out, policy, params=None)
  return out, manifest


def chunk_files(d):
  return sorted(f for f in os.listdir(d) if f.endswith('.tfrecord'))


def assert_same_records(a, b):
  assert len(a) == len(b)
  for ra, rb in zip(a, b):
    for k in ra:
      if k in records_lib.FLOAT_FIELDS:
        np.testing.assert_allclose(ra[k], rb[k], rtol=1e-5, atol=1e-5)
      else:
        assert ra[k] == rb[k], (k, ra, rb)


def test_records_and_counts(straight, policy):
  out, manifest = straight
  records = grow_lib.read_grow_records(str(out))
  c = manifest['counts']
  assert chunk_files(out) == [f'grow-{k:05d}-of-00003.tfrecord' for k in range(3)]
  assert c['chunks'] == 3 and c['sources'] == 12 and c['samples_drawn'] == 12 * N
  assert c['reference_records'] == 12 and c['records'] == len(records) == 12 + c['samples_kept']
  assert c['samples_kept'] + c['duplicates_removed'] == 12 * N
  assert set(records[0]) == set(grow_lib.RECORD_FIELDS)
  assert [r['source_index'] for r in records if r['origin'] == 'reference'] == list(range(12))
  for r in records:
    i = r['source_index']
    assert r['source'] == DATA.inputs[i] and r['reference'] == DATA.targets[i]
    assert r['source_ids'][-1] == 1 and r['grow_step'] == 1
    assert r['length'] == len(r['candidate_ids'])
    assert r['candidate'] == detok(r['candidate_ids'])
    if r['origin'] == 'sample':
      assert 1 <= r['length'] <= L and 1 not in r['candidate_ids'][:-1]
      assert r['key'] == f'pair-{i}/grow_1/sample_{r["candidate_index"]}'
  # logprob_policy of a sample == the policy's teacher-forced score of it; same for the reference.
  finished = [r for r in records if r['candidate_ids'][-1] == 1]
  done = ([r for r in finished if r['origin'] == 'reference'][:4] +
          [r for r in finished if r['origin'] == 'sample'][:4])
  pad = lambda ids, n: ids + [0] * (n - len(ids))
  enc = np.array([pad(r['source_ids'], 24) for r in done], np.int32)
  tgt = np.array([pad(r['candidate_ids'], 16) for r in done], np.int32)
  scores = jax.jit(MODEL.score_batch)(policy[1], {
      'encoder_input_tokens': enc, 'decoder_target_tokens': tgt,
      'decoder_input_tokens': np.pad(tgt, ((0, 0), (1, 0)))[:, :-1]})
  assert {r['origin'] for r in done} == {'sample', 'reference'}
  np.testing.assert_allclose(scores, [r['logprob_policy'] for r in done], rtol=1e-4, atol=1e-4)
  s = [r for r in records if r['origin'] == 'sample']
  assert all(r['logprob_sampling'] < 0 for r in s)
  # Record format 2: a reference was never sampled, so it has no sampling log-prob.
  assert all(np.isnan(r['logprob_sampling']) for r in records if r['origin'] == 'reference')
  assert manifest['settings']['record_format'] == records_lib.RECORD_FORMAT == 2
  assert any(abs(r['logprob_sampling'] - r['logprob_policy']) > 1e-3 for r in s)  # T != 1


@pytest.mark.parametrize('name,num_partitions,num_devices,batch_size',
                         [('4x2', 2, 8, 8), ('1dev', 1, 1, 3)])
def test_same_records_on_any_mesh_and_batch(straight, policy, tmp_path, name, num_partitions,
                                            num_devices, batch_size):
  mesh = partitioning.create_mesh(num_partitions, devices=jax.devices()[:num_devices])
  run_grow(tmp_path, policy, mesh=mesh, batch_size=batch_size)
  ref = grow_lib.read_grow_records(str(straight[0]))
  got = grow_lib.read_grow_records(str(tmp_path))
  # Same sources, candidates, ids, texts, counts; log-probs equal up to float32 rounding (XLA
  # reduces in a different order for other per-device shapes), so the files are not compared.
  assert_same_records(ref, got)


def test_kill_and_resume_is_byte_identical(straight, policy, tmp_path):
  tmp_path = tmp_path / 'resumed'  # (so the policy lies outside its work dir, as for `straight`)
  with pytest.raises(grow_lib.GrowInterrupted):
    run_grow(tmp_path, policy, _stop_after_chunks=2)
  assert not (tmp_path / 'manifest.json').exists()
  with pytest.raises(FileNotFoundError, match='manifest'):
    grow_lib.read_grow_records(str(tmp_path))
  # What a kill in the middle of chunk 2 leaves: a partial temp file.
  (tmp_path / 'grow-00002-of-00003.tfrecord.tmp').write_bytes(b'partial')
  mtime = os.path.getmtime(tmp_path / 'grow-00000-of-00003.tfrecord')
  manifest = run_grow(tmp_path, policy)
  assert manifest['chunks_resumed'] == 2
  assert os.path.getmtime(tmp_path / 'grow-00000-of-00003.tfrecord') == mtime  # not redone
  assert not (tmp_path / 'grow-00002-of-00003.tfrecord.tmp').exists()
  assert chunk_files(tmp_path) == chunk_files(straight[0])
  for f in chunk_files(tmp_path):
    assert filecmp.cmp(tmp_path / f, straight[0] / f, shallow=False), f
  assert manifest['counts'] == straight[1]['counts']
  assert manifest['settings_hash'] == straight[1]['settings_hash']


def test_greedy_candidates_are_deduplicated(policy, tmp_path):
  manifest = run_grow(tmp_path, policy, temperature=0.0)
  records = grow_lib.read_grow_records(str(tmp_path))
  for i in range(12):
    rs = [r for r in records if r['source_index'] == i]
    assert [r['origin'] for r in rs] == ['reference', 'sample']
    assert rs[1]['num_duplicates'] == N and rs[1]['candidate_index'] == 0
    assert rs[1]['logprob_sampling'] == 0.0  # greedy: a point mass
  c = manifest['counts']
  assert c['samples_kept'] == 12 and c['duplicates_removed'] == 12 * (N - 1)


def test_each_grow_step_samples_afresh(straight, policy, tmp_path):
  # Grow 2 of the same policy: the same references, other samples (its own seed), so a loop whose
  # Improve steps kept the policy does not repeat Grow 1; Grow 1 keeps the seed it was given.
  assert grow_lib.sample_seed(3, 1) == 3 and grow_lib.sample_seed(3, 2) != 3
  assert grow_lib.sample_seed(3, 2) == grow_lib.sample_seed(3, 2) != grow_lib.sample_seed(3, 3)
  manifest = run_grow(tmp_path, policy, grow_step=2)
  assert manifest['settings']['sample_seed'] == grow_lib.sample_seed(3, 2)
  one, two = grow_lib.read_grow_records(str(straight[0])), grow_lib.read_grow_records(str(tmp_path))
  refs = lambda rs: [(r['source_index'], r['candidate_ids'])
                     for r in rs if r['origin'] == 'reference']
  samples = lambda rs: {(r['source_index'], tuple(r['candidate_ids']))
                        for r in rs if r['origin'] == 'sample'}
  assert refs(one) == refs(two) and {r['grow_step'] for r in two} == {2}
  assert samples(one) != samples(two)
  assert 'sample_seed' not in straight[1]['settings']


def test_changed_settings_on_resume_raise(policy, tmp_path):
  with pytest.raises(grow_lib.GrowInterrupted):
    run_grow(tmp_path, policy, _stop_after_chunks=1)
  with pytest.raises(ValueError, match='temperature'):
    run_grow(tmp_path, policy, temperature=0.5)
  with pytest.raises(ValueError, match='chunk_size'):
    run_grow(tmp_path, policy, chunk_size=4, batch_size=4)
  run_grow(tmp_path, policy, batch_size=4)  # batch_size is not a setting: resumes.


def test_reader_refuses_chunk_without_marker(straight, tmp_path):
  d = tmp_path / 'copy'
  shutil.copytree(straight[0], d)
  assert len(grow_lib.read_grow_records(str(d))) == straight[1]['counts']['records']
  os.remove(d / 'grow-00001.done')
  with pytest.raises(FileNotFoundError, match='grow-00001-of-00003.tfrecord has no completion'):
    grow_lib.read_grow_records(str(d))


def test_core_imports_without_tensorflow():
  code = ('import sys; import rest_jax.grow; '
          'assert "tensorflow" not in sys.modules, "TF imported"')
  subprocess.run([sys.executable, '-c', code], check=True,
                 env=dict(os.environ, JAX_PLATFORMS='cpu'))


class _StubPolicy:
  """A policy whose logits depend on the source's first token (a 'shared_' cache leaf), on a
  per-row running sum of the emitted tokens and on the position (EOS grows likelier), so that
  candidates end at many different steps; params: a [V, V] logits table."""

  def init_decode_cache(self, params, encoder_input_tokens, max_decode_len):
    import jax.numpy as jnp
    b = encoder_input_tokens.shape[0]
    return {'shared_first': encoder_input_tokens[:, :1], 'total': jnp.zeros((b, 1), jnp.int32)}

  def make_tokens_to_logits(self, params):
    import jax.numpy as jnp

    def fn(state):
      first = state.cache['shared_first'][:, 0]
      first = jnp.repeat(first, state.cur_token.shape[0] // first.shape[0])
      total = state.cache['total'][:, 0]
      logits = (params[state.cur_token] + 0.5 * jax.nn.one_hot(first % V, V)
                + 0.5 * jax.nn.one_hot(total % V, V)
                + 0.3 * state.cur_index * jax.nn.one_hot(1, V))
      return logits, dict(state.cache, total=state.cache['total'] + state.cur_token[:, None])
    return fn


@pytest.mark.parametrize('num_devices', [1, 8])
def test_compacted_sampling_draws_the_uncompacted_candidates(monkeypatch, num_devices):
  """`sample_candidates` with finished rows compacted away (factors 2 and 4, on 1 and 8 data
  devices) returns exactly the candidates of the uncompacted loop, and compaction did happen."""
  stub, table = _StubPolicy(), np.random.RandomState(0).randn(V, V).astype(np.float32)
  enc = DATA.arrays['encoder_input_tokens']
  calls = []
  programs = grow_lib._sample_programs

  def counted(*args):  # counts the compactions (calls of the jitted compact program)
    init, steps, compact, extend = programs(*args)
    return init, steps, lambda s, rows, n: calls.append(len(rows)) or compact(s, rows, n), extend
  monkeypatch.setattr(grow_lib, '_sample_programs', counted)
  mesh = partitioning.create_mesh(devices=jax.devices()[:num_devices])
  run = lambda f: grow_lib.sample_candidates(
      stub, table, enc, np.arange(len(enc)), seed=5, num_decodes=4, temperature=1.0,
      max_decode_len=16, decode_length_ratio=None, mesh=mesh, batch_size=8, compact_factor=f)
  plain = run(0)
  assert not calls
  lengths = plain['lengths'][plain['lengths'] > 0]
  assert len(np.unique(lengths)) >= 5  # candidates end at many steps
  for factor in (2, 4):
    calls.clear()
    got = run(factor)
    assert calls, 'no batch was compacted'
    assert all(c % num_devices == 0 and c >= 8 for c in calls)
    for k in ('tokens', 'lengths'):
      np.testing.assert_array_equal(got[k], plain[k])
    for k in ('logprob_sampling', 'logprob_policy'):
      np.testing.assert_allclose(got[k], plain[k], rtol=1e-5, atol=1e-5)


def test_compaction_sizes():
  assert grow_lib.compaction_sizes(256, 4) == [256, 64, 16]
  assert grow_lib.compaction_sizes(256, 2, min_rows=32) == [256, 128, 64, 32]
  assert grow_lib.compaction_sizes(96, 4, multiple=8) == [96, 24, 8]
  assert grow_lib.compaction_sizes(64, 0) == [64]
  assert grow_lib.compaction_sizes(8, 4) == [8]


@pytest.mark.parametrize('compact_factor', [0, 2])
def test_windowed_cache_draws_the_full_cache_candidates(policy, monkeypatch, compact_factor):
  """Decoding from a short self-attention cache, extended (4 -> 8 -> 16 positions) as the
  position reaches its length, draws the candidates of a full-length cache: the same tokens,
  log-probs within 1e-5; the cache was extended, with and without compaction."""
  enc = DATA.arrays['encoder_input_tokens']
  extended = []
  programs = grow_lib._sample_programs

  def counted(*args):  # records the lengths the jitted extend program is called with
    init, steps, compact, extend = programs(*args)
    return init, steps, compact, lambda s, n: extended.append(n) or extend(s, n)
  monkeypatch.setattr(grow_lib, '_sample_programs', counted)
  run = lambda w: grow_lib.sample_candidates(
      MODEL, policy[1], enc, np.arange(len(enc)), seed=2, num_decodes=4, temperature=1.0,
      max_decode_len=16, decode_length_ratio=None, mesh=partitioning.create_mesh(1),
      batch_size=8, compact_factor=compact_factor, first_window=w)
  full = run(0)
  assert not extended
  assert full['lengths'].max() > 8  # some candidates need the third window
  got = run(4)
  assert set(extended) == {8, 16}
  for k in ('tokens', 'lengths'):
    np.testing.assert_array_equal(got[k], full[k])
  for k in ('logprob_sampling', 'logprob_policy'):
    np.testing.assert_allclose(got[k], full[k], rtol=1e-5, atol=1e-5)


def test_extend_decode_cache_pads_self_attention_only():
  params = MODEL.get_initial_variables(jax.random.PRNGKey(0), SHAPES)['params']
  cache = MODEL.init_decode_cache(params, DATA.arrays['encoder_input_tokens'][:2], 4)
  longer = MODEL.extend_decode_cache(cache, 12)
  layer, layer_longer = cache['decoder']['layers_0'], longer['decoder']['layers_0']
  assert layer_longer['self_attention']['cached_key'].shape == (2, 2, 12, 16)
  np.testing.assert_array_equal(layer_longer['self_attention']['cached_value'][:, :, :4],
                                layer['self_attention']['cached_value'])
  assert not np.asarray(layer_longer['self_attention']['cached_key'][:, :, 4:]).any()
  assert (layer_longer['encoder_decoder_attention']['shared_key'].shape
          == layer['encoder_decoder_attention']['shared_key'].shape)
  with pytest.raises(ValueError, match='cannot shorten'):
    MODEL.extend_decode_cache(longer, 8)
  with pytest.raises(ValueError, match='max_len'):
    MODEL.extend_decode_cache(cache, 65)
