"""Tests for rest_jax.decoding with stub tokens_to_logits functions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rest_jax import decoding

EOS = 1


def _log_softmax(x, axis=-1):
  x = np.asarray(x, np.float64)
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _sampling_log_softmax(x):
  """The distribution the sampler draws from: PAD (0) is never emitted."""
  x = np.array(x, np.float64)
  x[..., 0] = -np.inf
  return _log_softmax(x)


def markov_fn(table):
  """Logits depend only on the fed token: logits = table[cur_token]."""
  table = jnp.asarray(table, jnp.float32)

  def tokens_to_logits(state):
    return table[state.cur_token], state.cache
  return tokens_to_logits


def index_fn(table):
  """Logits depend only on the position: logits = table[cur_index]."""
  table = jnp.asarray(table, jnp.float32)

  def tokens_to_logits(state):
    n = state.cur_token.shape[0]
    return jnp.broadcast_to(table[state.cur_index], (n, table.shape[1])), state.cache
  return tokens_to_logits


def _jit_sample(fn, **static):
  return jax.jit(lambda cache, rng: decoding.temperature_sample(
      cache, fn, rng=rng, **static))


# Hand-built model: start -> {2: .55, 3: .45}; 2 -> {1, 4, 5} ~ 1/3 each;
# 3 -> EOS (.95); 4, 5 -> EOS. Greedy takes 2 (locally best) and ends with
# p = .55 * .34 = .187; the best sequence is [3, EOS] with p = .45 * .95.
_P = np.full((6, 6), 1e-6)
_P[0, [2, 3]] = [.55, .45]
_P[1, 1] = 1.0
_P[2, [1, 4, 5]] = [.33, .34, .33]
_P[3, [1, 4]] = [.95, .05]
_P[4, 1] = 1.0
_P[5, 1] = 1.0
TRAP_LOGITS = np.log(_P / _P.sum(-1, keepdims=True))
_trap_greedy = jax.jit(lambda c: decoding.greedy_decode(
    c, markov_fn(TRAP_LOGITS), batch_size=2, max_decode_len=6, eos_id=EOS))


def test_expand_unflatten_roundtrip():
  x = np.arange(3 * 2 * 5).reshape(3, 2, 5)
  y, u, f = jax.jit(lambda x: (
      decoding.flat_batch_beam_expand(x, 4),
      decoding.unflatten_beam_dim(decoding.flat_batch_beam_expand(x, 4), 3, 4),
      decoding.flatten_beam_dim(decoding.unflatten_beam_dim(
          decoding.flat_batch_beam_expand(x, 4), 3, 4))))(x)
  assert y.shape == (12, 2, 5) and u.shape == (3, 4, 2, 5)
  np.testing.assert_array_equal(y[0], x[0])
  np.testing.assert_array_equal(y[3], x[0])
  np.testing.assert_array_equal(y[4], x[1])
  for j in range(4):
    np.testing.assert_array_equal(u[:, j], x)
  np.testing.assert_array_equal(f, y)


def test_greedy_exact_and_tiny_temperature():
  fn = markov_fn(TRAP_LOGITS)
  cache = jnp.zeros((2, 1))
  g = _trap_greedy(cache)
  expected = np.array([2, 4, 1, 0, 0, 0])
  assert g.tokens.shape == (2, 1, 6)
  for b in range(2):
    np.testing.assert_array_equal(g.tokens[b, 0], expected)
  np.testing.assert_array_equal(g.lengths, [[3], [3]])
  assert int(g.num_steps) == 3
  np.testing.assert_allclose(g.token_logprobs, 0.0)  # point mass
  pol = [TRAP_LOGITS[0, 2], TRAP_LOGITS[2, 4], TRAP_LOGITS[4, 1], 0, 0, 0]
  np.testing.assert_allclose(g.token_logprobs_policy[0, 0], pol, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g.sequence_logprob_policy[:, 0], sum(pol), rtol=1e-5)

  kw = dict(batch_size=2, max_decode_len=6, eos_id=EOS, num_decodes=3)
  traced = jax.jit(lambda c, r, t: decoding.temperature_sample(
      c, fn, rng=r, temperature=t, **kw))
  static = jax.jit(lambda c, r: decoding.temperature_sample(
      c, fn, rng=r, temperature=1e-3, **kw))  # not the argmax branch
  for out in [static(cache, jax.random.PRNGKey(3))] + [
      traced(cache, jax.random.PRNGKey(3), jnp.float32(t)) for t in (0.0, 1e-3)]:
    np.testing.assert_array_equal(out.tokens, np.broadcast_to(expected, (2, 3, 6)))
    np.testing.assert_allclose(out.token_logprobs, 0.0, atol=1e-4)  # f32 at logits/1e-3


def test_greedy_large_vocab_two_level_argmax():
  V, L = 3001, 4  # 3001 is prime: padded blocks
  table = np.random.RandomState(4).randn(L, V).astype(np.float32)
  table[0, [17, 2999]] = 9.0  # tie: first index wins, like np.argmax
  table[1, 3000] = 9.0
  table[2, 1500] = 9.0
  out = jax.jit(lambda c: decoding.greedy_decode(
      c, index_fn(table), batch_size=1, max_decode_len=L, eos_id=EOS))(
          jnp.zeros((1, 1)))
  np.testing.assert_array_equal(out.tokens[0, 0], np.argmax(table, -1))
  np.testing.assert_allclose(out.token_logprobs_policy[0, 0],
                             _log_softmax(table).max(-1), rtol=1e-5)


def _draw_counts(logits, n, **kw):
  logits = np.asarray(logits, np.float32)
  V = logits.shape[0]
  fn = index_fn(logits[None])
  out = jax.jit(lambda r: decoding.temperature_sample(
      jnp.zeros((1, 1)), fn, batch_size=1, max_decode_len=1, eos_id=EOS,
      rng=r, num_decodes=n, **kw))(jax.random.PRNGKey(0))
  toks = np.asarray(out.tokens[0, :, 0])
  return np.bincount(toks, minlength=V) / n, toks, out


@pytest.mark.parametrize('temperature', [1.0, 0.5])
def test_sample_frequencies_match_softmax(temperature):
  logits = np.array([0.3, -1.0, 1.2, 0.0, 0.8, -0.5, 2.0, 0.1])
  freq, toks, out = _draw_counts(logits, 8192, temperature=temperature)
  expected = np.exp(_sampling_log_softmax(logits / temperature))
  np.testing.assert_allclose(freq, expected, atol=0.02)
  assert freq[0] == 0  # PAD is never drawn.
  # Log-probs: sampling distribution = tempered softmax without PAD; policy = untempered.
  np.testing.assert_allclose(out.token_logprobs[0, :, 0],
                             _sampling_log_softmax(logits / temperature)[toks], rtol=1e-5)
  np.testing.assert_allclose(out.token_logprobs_policy[0, :, 0],
                             _log_softmax(logits)[toks], rtol=1e-5)


def test_sample_frequencies_large_vocab_two_level_cdf():
  # 2003 is prime: exercises the padded two-level inverse CDF.
  V = 2003
  logits = np.full(V, -4.0)
  hot = [0, 5, 44, 45, 777, 1500, 2002]
  logits[hot] = [1.0, 2.0, 0.5, 1.5, 1.0, 0.0, 2.5]
  freq, _, _ = _draw_counts(logits, 8192)
  expected = np.exp(_sampling_log_softmax(logits))
  np.testing.assert_allclose(freq[hot], expected[hot], atol=0.02)
  cold = np.setdiff1d(np.arange(V), hot)
  assert abs(freq[cold].sum() - expected[cold].sum()) < 0.02


def test_topk_keeps_exactly_k_and_renormalises():
  logits = np.array([0.5, 1.5, -0.3, 2.0, 0.0, 1.4, -1.0, 0.9])
  freq, toks, out = _draw_counts(logits, 4096, topk=3, temperature=0.8)
  kept = [3, 1, 5]
  assert set(np.unique(toks)) == set(kept)
  expected = np.zeros_like(logits)
  expected[kept] = np.exp(_log_softmax(logits[kept] / 0.8))
  np.testing.assert_allclose(freq, expected, atol=0.03)
  ref = np.full_like(logits, -np.inf)
  ref[kept] = _log_softmax(logits[kept] / 0.8)
  np.testing.assert_allclose(out.token_logprobs[0, :, 0], ref[toks], rtol=1e-5)
  np.testing.assert_allclose(out.token_logprobs_policy[0, :, 0],
                             _log_softmax(logits)[toks], rtol=1e-5)


@pytest.mark.parametrize('V,topk', [(8, 0), (2003, 0), (64, 5)])
def test_topp_keeps_smallest_nucleus(V, topk):
  # Source 0: probabilities .4, .25, .15, .1 on tokens 6, 2, 4, 3; the rest
  # share .1. Nucleus for p=.75 is {6, 2, 4} (mass .8 >= .75 > .65).
  # Source 1: token 5 alone has .8 >= p: only the top token is kept.
  probs = np.full((2, V), 0.1 / (V - 4))
  probs[0, [6, 2, 4, 3]] = [.4, .25, .15, .1]
  probs[1, [5, 2, 4, 3]] = [.8, .05, .03, .02]
  logits = np.log(probs / probs.sum(-1, keepdims=True))
  table = jnp.asarray(logits, jnp.float32)
  fn = lambda state: (table[state.cache[:, 0]], state.cache)
  n = 4096
  out = _jit_sample(fn, batch_size=2, max_decode_len=1, eos_id=EOS,
                    num_decodes=n, topp=0.75, topk=topk)(
                        jnp.array([[0], [1]]), jax.random.PRNGKey(0))
  toks = np.asarray(out.tokens[:, :, 0])
  for src, kept in [(0, [6, 2, 4]), (1, [5])]:
    assert set(np.unique(toks[src])) == set(kept)
    ref = np.full(V, -np.inf)
    ref[kept] = _log_softmax(logits[src, kept])
    freq = np.bincount(toks[src], minlength=V) / n
    np.testing.assert_allclose(freq[kept], np.exp(ref[kept]), atol=0.03)
    np.testing.assert_allclose(out.token_logprobs[src, :, 0], ref[toks[src]],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.token_logprobs_policy[src, :, 0],
                               logits[src, toks[src]], rtol=1e-5)


def test_eos_padding_and_logprob_bookkeeping():
  rng = np.random.RandomState(0)
  V = 7
  table = rng.randn(V, V).astype(np.float32) * 1.5
  table[:, EOS] += 0.5
  fn = markov_fn(table)
  B, N, L = 3, 16, 9
  out = _jit_sample(fn, batch_size=B, max_decode_len=L, eos_id=EOS,
                    num_decodes=N, temperature=0.7)(jnp.zeros((B, 1)),
                                                    jax.random.PRNGKey(7))
  toks = np.asarray(out.tokens)
  tlp, tpol = np.asarray(out.token_logprobs), np.asarray(out.token_logprobs_policy)
  saw_eos = saw_full = False
  for b in range(B):
    for j in range(N):
      row = toks[b, j]
      eos_pos = np.nonzero(row == EOS)[0]
      length = eos_pos[0] + 1 if len(eos_pos) else L
      saw_eos |= bool(len(eos_pos))
      saw_full |= not len(eos_pos)
      assert out.lengths[b, j] == length
      assert (row[length:] == 0).all()
      assert (tlp[b, j, length:] == 0).all() and (tpol[b, j, length:] == 0).all()
      prev = np.concatenate([[0], row[:-1]])
      pol = _log_softmax(table[prev])[np.arange(L), row]
      samp = _sampling_log_softmax(table[prev] / 0.7)[np.arange(L), row]
      np.testing.assert_allclose(tpol[b, j, :length], pol[:length], rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(tlp[b, j, :length], samp[:length], rtol=1e-4, atol=1e-5)
  assert saw_eos and saw_full
  np.testing.assert_allclose(out.sequence_logprob, tlp.sum(-1), rtol=1e-5)
  np.testing.assert_allclose(out.sequence_logprob_policy, tpol.sum(-1), rtol=1e-5)


def test_while_loop_stops_early():
  L, V = 10, 5
  table = np.zeros((L, V), np.float32)
  table[:, 3] = 5.0
  table[2, EOS] = 50.0  # everyone emits EOS at step 2
  inner = index_fn(table)
  calls = []

  def fn(state):
    jax.debug.callback(lambda i: calls.append(int(i)), state.cur_index)
    return inner(state)

  out = _jit_sample(fn, batch_size=4, max_decode_len=L, eos_id=EOS,
                    num_decodes=2)(jnp.zeros((4, 1)), jax.random.PRNGKey(0))
  jax.block_until_ready(out)
  jax.effects_barrier()
  assert int(out.num_steps) == 3
  assert sorted(calls) == [0, 1, 2]
  np.testing.assert_array_equal(out.lengths, 3)
  assert (np.asarray(out.tokens)[:, :, 3:] == 0).all()
  assert (np.asarray(out.tokens)[:, :, 2] == EOS).all()


def test_inactive_sources_do_not_keep_decoding_running():
  """A batch's padding (active=False) starts ended: a source that would never emit EOS stops
  costing steps, and the active sources' outputs are those of the full batch."""
  L, V = 10, 5

  def fn(state):  # Source 0 emits EOS at step 2; source 1 never does.
    sid = state.cache['source'][:, 0]
    logits = jnp.where((sid == 0)[:, None] & (state.cur_index == 2),
                       50.0 * jax.nn.one_hot(EOS, V), 5.0 * jax.nn.one_hot(3, V))
    return logits, state.cache

  cache = {'source': jnp.array([[0], [1]], jnp.int32)}
  kw = dict(batch_size=2, max_decode_len=L, eos_id=EOS, num_decodes=2)
  both = _jit_sample(fn, **kw)(cache, jax.random.PRNGKey(0))
  assert int(both.num_steps) == L
  padded = jax.jit(lambda c, r: decoding.temperature_sample(
      c, fn, rng=r, active=jnp.array([True, False]), **kw))(cache, jax.random.PRNGKey(0))
  assert int(padded.num_steps) == 3
  np.testing.assert_array_equal(padded.tokens[0], both.tokens[0])
  np.testing.assert_array_equal(padded.sequence_logprob_policy[0], both.sequence_logprob_policy[0])
  np.testing.assert_array_equal(padded.lengths, [[3, 3], [0, 0]])
  assert not np.asarray(padded.tokens[1]).any()
  beam = lambda active: jax.jit(lambda c: decoding.beam_search(
      c, fn, batch_size=2, max_decode_len=L, eos_id=EOS, beam_size=2, active=active))(cache)
  full, cut = beam(None), beam(jnp.array([True, False]))
  assert int(full.num_steps) == L and int(cut.num_steps) < L
  np.testing.assert_array_equal(cut.tokens[0], full.tokens[0])


def _source_fn(V=11):
  """Markov stub whose logits also depend on the source id held in the cache."""
  rng = np.random.RandomState(1)
  table = jnp.asarray(rng.randn(V, V), jnp.float32)
  src = jnp.asarray(rng.randn(8, V), jnp.float32)

  def fn(state):
    sid = state.cache['source'][:, 0]
    logits = table[state.cur_token] + src[sid]
    return logits, state.cache
  return fn


def test_per_source_rng_independent_of_batch():
  fn = _source_fn()
  jitted = {B: _jit_sample(fn, batch_size=B, max_decode_len=8, eos_id=EOS,
                           num_decodes=5, topk=6) for B in (1, 3)}
  sample = lambda cache, keys: jitted[keys.shape[0]](cache, keys)
  keys = np.asarray(jax.random.split(jax.random.PRNGKey(0), 3))  # [3, 2] uint32
  sources = np.array([[3], [5], [7]], np.int32)
  full = sample({'source': sources}, keys)
  for b in range(3):
    alone = sample({'source': sources[b:b + 1]}, keys[b:b + 1])
    np.testing.assert_array_equal(alone.tokens[0], full.tokens[b])
    np.testing.assert_allclose(alone.token_logprobs[0], full.token_logprobs[b])
  # Candidates of a source differ from each other.
  assert len({tuple(t) for t in np.asarray(full.tokens[0])}) > 1
  # A different batch composition (reordered) gives the same per-source rows.
  perm = np.array([2, 0, 1])
  permuted = sample({'source': sources[perm]}, keys[perm])
  np.testing.assert_array_equal(permuted.tokens, full.tokens[perm])
  # Typed key arrays [batch] behave exactly like raw uint32 [batch, 2] keys.
  typed = sample({'source': sources}, jax.random.wrap_key_data(keys))
  np.testing.assert_array_equal(typed.tokens, full.tokens)


def test_single_key_deterministic_and_cache_expanded():
  fn = _source_fn()
  cache = {'source': jnp.array([[0], [4]], jnp.int32), 'step': jnp.zeros((), jnp.int32)}
  seen = {}

  def spy(state):
    seen['shape'] = state.cache['source'].shape
    seen['step_shape'] = state.cache['step'].shape
    return fn(state)

  s = _jit_sample(spy, batch_size=2, max_decode_len=6, eos_id=EOS, num_decodes=3)
  a = s(cache, jax.random.PRNGKey(0))
  b = s(cache, jax.random.PRNGKey(0))
  c = s(cache, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)
  assert seen['shape'] == (6, 1) and seen['step_shape'] == ()

  # Expansion order: rows of source b are b*N .. b*N+N-1 (greedy decodes of a
  # source-dominated model reveal which source each row saw).
  table = np.zeros((8, 9), np.float32)

  def by_source(state):
    sid = state.cache['source'][:, 0]
    return jnp.asarray(table)[state.cur_token] + 10.0 * jax.nn.one_hot(sid + 2, 9), state.cache
  g = _jit_sample(by_source, batch_size=2, max_decode_len=2, eos_id=EOS,
                  num_decodes=3, temperature=0.0)(cache, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(g.tokens[:, :, 0], [[2, 2, 2], [6, 6, 6]])


def test_shared_cache_leaves_are_neither_expanded_nor_gathered():
  """'shared_' leaves reach the callback with their [batch] rows, per-row leaves as [batch * N];
  a callback reading source b's shared row for rows b*N..b*N+N-1 decodes each source's rows
  from its own source (sampling and beam search)."""
  cache = {'shared_source': jnp.array([[0], [4]], jnp.int32),
           'rows': jnp.zeros((2, 1), jnp.int32), 'step': jnp.zeros((), jnp.int32)}
  table = np.zeros((8, 9), np.float32)
  seen = {}

  def by_shared_source(state):
    shared, rows = state.cache['shared_source'], state.cache['rows']
    seen.update(shared=shared.shape, rows=rows.shape)
    sid = jnp.repeat(shared[:, 0], rows.shape[0] // shared.shape[0])
    logits = jnp.asarray(table)[state.cur_token] + 10.0 * jax.nn.one_hot(sid + 2, 9)
    return logits, dict(state.cache, rows=rows + 1)

  g = _jit_sample(by_shared_source, batch_size=2, max_decode_len=2, eos_id=EOS, num_decodes=3,
                  temperature=0.0)(cache, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(g.tokens[:, :, 0], [[2, 2, 2], [6, 6, 6]])
  assert seen == {'shared': (2, 1), 'rows': (6, 1)}
  b = jax.jit(lambda c: decoding.beam_search(c, by_shared_source, batch_size=2,
                                             max_decode_len=2, eos_id=EOS, beam_size=4))(cache)
  np.testing.assert_array_equal(b.tokens[:, 0, 0], [2, 6])
  assert seen == {'shared': (2, 1), 'rows': (8, 1)}
  expanded = decoding.expand_cache(cache, 5)
  assert jax.tree.map(jnp.shape, expanded) == {'shared_source': (2, 1), 'rows': (10, 1),
                                               'step': ()}


def test_beam_search_beats_greedy_on_trap():
  fn = markov_fn(TRAP_LOGITS)
  out = jax.jit(lambda c: decoding.beam_search(
      c, fn, batch_size=2, max_decode_len=6, eos_id=EOS, beam_size=3,
      alpha=0.6))(jnp.zeros((2, 1)))
  assert out.tokens.shape == (2, 3, 6)
  np.testing.assert_array_equal(out.tokens[:, 0], [[3, 1, 0, 0, 0, 0]] * 2)
  np.testing.assert_array_equal(out.lengths[:, 0], [2, 2])
  lp = TRAP_LOGITS[0, 3] + TRAP_LOGITS[3, 1]
  np.testing.assert_allclose(out.logprobs[:, 0], lp, rtol=1e-5)
  np.testing.assert_allclose(out.scores[:, 0], lp / ((5 + 2) / 6) ** 0.6, rtol=1e-5)
  # Best first, and scores consistent with logprobs / GNMT penalty.
  assert (np.diff(np.asarray(out.scores), axis=1) <= 0).all()
  pen = ((5 + np.asarray(out.lengths)) / 6) ** 0.6
  np.testing.assert_allclose(out.scores, np.asarray(out.logprobs) / pen, rtol=1e-5)
  second = {tuple(np.asarray(out.tokens[0, k])) for k in (1, 2)}
  assert (2, 4, 1, 0, 0, 0) in second or (2, 1, 0, 0, 0, 0) in second
  # Greedy falls into the trap.
  g = _trap_greedy(jnp.zeros((2, 1)))
  np.testing.assert_array_equal(g.tokens[0, 0], [2, 4, 1, 0, 0, 0])
  assert g.sequence_logprob_policy[0, 0] < out.logprobs[0, 0]


def test_beam_search_cache_reordering_matches_sequence_model():
  """A model reading its history from the cache must give the same beams as
  the same model reading ``state.sequences`` (checks cache gathering)."""
  V, M = 9, 7
  W = jnp.asarray(np.random.RandomState(3).randn(M, V) * 2, jnp.float32)

  def from_sequences(state):
    h = (jnp.sum(state.sequences, axis=1) + state.cur_token) % M
    return W[h], state.cache

  # At step i, sequences sum to the cache's running sum of fed tokens plus
  # cur_token (the last one, not yet in the cache).
  def from_cache(state):
    hist = state.cache['hist'][:, 0]
    h = hist + 2 * state.cur_token
    return W[h % M], {'hist': (hist + state.cur_token)[:, None]}

  cache = {'hist': jnp.zeros((2, 1), jnp.int32)}
  kw = dict(batch_size=2, max_decode_len=7, eos_id=EOS, beam_size=4)
  a = jax.jit(lambda c: decoding.beam_search(c, from_sequences, **kw))(cache)
  b = jax.jit(lambda c: decoding.beam_search(c, from_cache, **kw))(cache)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)
  # Same check for sampling (cache expanded and threaded per row).
  s = lambda fn: _jit_sample(fn, batch_size=2, max_decode_len=7, eos_id=EOS,
                             num_decodes=4)(cache, jax.random.PRNGKey(5))
  np.testing.assert_array_equal(s(from_sequences).tokens, s(from_cache).tokens)


def test_beam_search_without_eos_returns_live_beams():
  V = 6  # 2K = 4 candidates a step: tokens 2-5 always beat EOS, so no hypothesis finishes.
  table = np.log(np.array([1e-9, 1e-9, .5, .2, .2, .1]))  # EOS never likely
  fn = index_fn(np.tile(table, (4, 1)))
  out = jax.jit(lambda c: decoding.beam_search(
      c, fn, batch_size=1, max_decode_len=4, eos_id=EOS, beam_size=2,
      alpha=0.0))(jnp.zeros((1, 1)))
  assert int(out.num_steps) == 4
  np.testing.assert_array_equal(out.tokens[0, 0], [2, 2, 2, 2])
  np.testing.assert_allclose(out.logprobs[0, 0], 4 * np.log(.5), rtol=1e-4)
  np.testing.assert_array_equal(out.lengths[0], [4, 4])
  assert out.scores[0, 0] >= out.scores[0, 1]


def test_pad_is_never_emitted_but_policy_logprob_is_the_models():
  logits = jnp.array([[5.0, 1.0, 0.5, 0.2]])  # PAD (0) is the most likely "token".
  ttl = lambda state: (jnp.tile(logits, (state.cur_token.shape[0], 1)), state.cache)
  cache = jnp.zeros((1, 1))
  greedy = decoding.greedy_decode(cache, ttl, batch_size=1, max_decode_len=1, eos_id=1)
  assert int(greedy.tokens[0, 0, 0]) == 1  # The best non-PAD token.
  out = decoding.temperature_sample(cache, ttl, batch_size=1, max_decode_len=1, eos_id=1,
                                    rng=jax.random.PRNGKey(0), num_decodes=512,
                                    temperature=1.0)
  toks = np.asarray(out.tokens[0, :, 0])
  assert 0 not in toks
  log_policy = np.asarray(jax.nn.log_softmax(logits[0]))
  np.testing.assert_allclose(out.token_logprobs_policy[0, :, 0], log_policy[toks], rtol=1e-5)
  masked = np.asarray(jax.nn.log_softmax(logits[0, 1:]))  # Sampling distribution: PAD removed.
  np.testing.assert_allclose(out.token_logprobs[0, :, 0], masked[toks - 1], rtol=1e-5)


def test_compacting_finished_rows_keeps_every_row_s_tokens():
  """init -> steps (until <= 5 rows live) -> compact to the live rows (+ an ended filler row,
  'shared_' leaves gathered by source) -> steps to the end draws exactly the tokens of the
  uncompacted loop: each row's random numbers come from its own key, and the callback reads the
  per-row cache (a running sum) and the shared one (the source) of the rows it was given."""
  V, B, N, L = 11, 3, 4, 12
  rng = np.random.RandomState(3)
  table = jnp.asarray(rng.randn(V, V), jnp.float32).at[:, EOS].add(-1.0)
  src = jnp.asarray(rng.randn(8, V), jnp.float32)

  def fn(state):
    shared = state.cache['shared_source'][:, 0]
    sid = jnp.repeat(shared, state.cur_token.shape[0] // shared.shape[0])
    total = state.cache['total'][:, 0]
    logits = (table[state.cur_token] + src[sid] + 0.3 * jax.nn.one_hot(total % V, V)
              + 0.4 * state.cur_index * jax.nn.one_hot(EOS, V))
    return logits, dict(state.cache, total=state.cache['total'] + state.cur_token[:, None])

  cache = {'shared_source': jnp.array([[2], [5], [7]], jnp.int32),
           'total': jnp.zeros((B, 1), jnp.int32), 'index': jnp.zeros((), jnp.int32)}
  keys = jax.random.split(jax.random.PRNGKey(4), B)
  full = _jit_sample(fn, batch_size=B, max_decode_len=L, eos_id=EOS, num_decodes=N)(cache, keys)
  state = decoding.init_sample_state(cache, batch_size=B, max_decode_len=L, rng=keys,
                                     num_decodes=N)
  steps = jax.jit(lambda s, m: decoding.sample_steps(s, fn, eos_id=EOS, min_live=m))
  state = steps(state, 5)
  ended = np.asarray(state.ended)
  live = np.flatnonzero(~ended)
  assert 0 < len(live) <= 5 and int(state.cur_index) < L
  keep = np.concatenate([live, np.flatnonzero(ended)[:1]])
  small = decoding.compact_sample_state(state, keep, N)
  assert small.cache['shared_source'].shape == (len(keep), 1)
  small = steps(small, 0)
  tokens = np.asarray(state.sequences).copy()
  tokens[live] = np.asarray(small.sequences)[:len(live)]
  np.testing.assert_array_equal(tokens.reshape(B, N, L), full.tokens)
  lp = np.asarray(state.token_logprobs).copy()
  lp[live] = np.asarray(small.token_logprobs)[:len(live)]
  np.testing.assert_allclose(lp.reshape(B, N, L), full.token_logprobs, atol=1e-6)
  assert int(small.cur_index) == int(full.num_steps)
  with pytest.raises(ValueError, match='per-source keys'):
    decoding.compact_sample_state(
        decoding.init_sample_state(cache, batch_size=B, max_decode_len=L,
                                   rng=jax.random.PRNGKey(0), num_decodes=N), keep, N)
