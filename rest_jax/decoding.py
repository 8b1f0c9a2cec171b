"""Autoregressive decoding: temperature / top-k / top-p sampling and beam search.

The samplers' per-step draw is :func:`rest_jax.sampling.sample_logits`; this module holds
the decoding loops.

Pure functions driven by a ``tokens_to_logits`` callback, in the style of
t5x's ``decoding.py`` (github.com/google-research/t5x, t5x/decoding.py); the
code here is an independent, compact rewrite.

Conventions
-----------
* Token id 0 is PAD and also the decoder start token; ``eos_id`` is passed in
  (1 in this project).
* ``N`` candidates per source come from expanding the batch to
  ``[batch * N, ...]`` (row ``b * N + j`` is candidate ``j`` of source ``b``),
  see :func:`flat_batch_beam_expand`.
* The callback sees a :class:`DecodingState` and returns
  ``(logits [batch * N, vocab] float32, new_cache)``. At ``cur_index == i`` the
  callback is fed ``cur_token`` (the token at position ``i - 1``, or the start
  token 0 when ``i == 0``) and its logits predict the token at position ``i``.
* The cache contract. Leaves have a leading ``batch`` dimension when they reach a
  decoding function, which expands them to ``batch * N`` (:func:`expand_cache`) and,
  in beam search, re-orders them with the surviving beams at every step. Two kinds of
  leaves are passed through untouched by both:
    - scalar (0-d) leaves, such as a shared ``cache_index``;
    - leaves whose name starts with ``SHARED_PREFIX`` ('shared_'): per-source state
      that every sample / beam of a source reads and none writes (the model's
      cross-attention keys / values and source mask). They keep their leading
      ``batch`` dimension, and the callback must read row ``b`` of them for rows
      ``b * N .. b * N + N - 1`` of everything else. Re-ordering beams never moves a
      beam to another source, so beam search needs no gather of them.
* All log-probabilities are natural logs (nats).

Only jax and flax.struct are imported (no TensorFlow).
"""

from typing import Any, Callable, Tuple

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from rest_jax.sampling import MIN_TEMPERATURE, NEG_INF, PAD_ID, sample_logits


@flax.struct.dataclass
class DecodingState:
  """What ``tokens_to_logits`` sees at one decoding step."""
  cur_index: jnp.ndarray  # [] int32, position being decoded (0-based)
  sequences: jnp.ndarray  # [batch * num_decodes, max_decode_len] int32, tokens so far (0-padded)
  cur_token: jnp.ndarray  # [batch * num_decodes] int32, token fed at this step (0 = start at index 0)
  cache: Any  # pytree, leading dim batch * num_decodes ('shared_' leaves: batch)


TokensToLogits = Callable[[DecodingState], Tuple[jnp.ndarray, Any]]


@flax.struct.dataclass
class SampleOutput:
  """Result of :func:`temperature_sample` / :func:`greedy_decode`.

  Positions after EOS hold token 0 and log-prob 0; EOS itself is kept and
  counted.
  """
  tokens: jnp.ndarray  # [batch, num_decodes, max_decode_len] int32
  token_logprobs: jnp.ndarray  # [batch, num_decodes, max_decode_len] f32, nats, sampling distribution
  token_logprobs_policy: jnp.ndarray  # [batch, num_decodes, max_decode_len] f32, nats, log_softmax(logits)
  sequence_logprob: jnp.ndarray  # [batch, num_decodes] f32, nats, sum of token_logprobs
  sequence_logprob_policy: jnp.ndarray  # [batch, num_decodes] f32, nats, sum of token_logprobs_policy
  lengths: jnp.ndarray  # [batch, num_decodes] int32, tokens incl. EOS
  num_steps: jnp.ndarray  # [] int32, loop iterations run (= tokens_to_logits calls)


@flax.struct.dataclass
class BeamOutput:
  """Result of :func:`beam_search`, beams sorted best first."""
  tokens: jnp.ndarray  # [batch, beam, max_decode_len] int32, 0 after EOS
  scores: jnp.ndarray  # [batch, beam] f32, logprob / ((5 + len) / 6) ** alpha
  logprobs: jnp.ndarray  # [batch, beam] f32, nats, raw sum of token log-probs
  lengths: jnp.ndarray  # [batch, beam] int32, tokens incl. EOS
  num_steps: jnp.ndarray  # [] int32, loop iterations run


# ----------------------------------------------------------------------------
# Batch / beam reshaping helpers.
# ----------------------------------------------------------------------------
def flat_batch_beam_expand(x: jnp.ndarray, n: int) -> jnp.ndarray:
  """[batch, ...] -> [batch * n, ...], each row repeated n times consecutively."""
  x = jnp.asarray(x)
  return jnp.repeat(x, n, axis=0, total_repeat_length=x.shape[0] * n)


def unflatten_beam_dim(x: jnp.ndarray, batch: int, n: int) -> jnp.ndarray:
  """[batch * n, ...] -> [batch, n, ...]."""
  return jnp.reshape(x, (batch, n) + tuple(x.shape[1:]))


def flatten_beam_dim(x: jnp.ndarray) -> jnp.ndarray:
  """[batch, n, ...] -> [batch * n, ...]."""
  return jnp.reshape(x, (x.shape[0] * x.shape[1],) + tuple(x.shape[2:]))


SHARED_PREFIX = 'shared_'  # Cache leaves read by all N rows of a source (module docstring).


def _leaf_name(path) -> str:
  last = path[-1] if path else None
  name = getattr(last, 'key', getattr(last, 'name', None))
  return name if isinstance(name, str) else ''


def _cache_map(fn, cache):
  """Applies ``fn`` to every per-row cache leaf: not 0-d, name not starting with 'shared_'."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x if jnp.ndim(x) == 0 or _leaf_name(path).startswith(SHARED_PREFIX)
      else fn(x), cache)


def expand_cache(cache: Any, n: int) -> Any:
  """A cache with leading dim ``batch`` -> the one decoding runs on: per-row leaves
  ``[batch * n, ...]`` (:func:`flat_batch_beam_expand`), 'shared_' and 0-d leaves as they are."""
  return _cache_map(lambda x: flat_batch_beam_expand(x, n), cache)


def _gather_beams(x: jnp.ndarray, beam_idx: jnp.ndarray) -> jnp.ndarray:
  """x: [batch, n, ...], beam_idx: [batch, m] int -> [batch, m, ...]."""
  idx = beam_idx.reshape(beam_idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def brevity_penalty(alpha: float, length) -> jnp.ndarray:
  """GNMT length penalty ((5 + length) / 6) ** alpha (Wu et al. 2016, eq. 14)."""
  return jnp.power((5.0 + jnp.asarray(length, jnp.float32)) / 6.0, alpha)


FIRST_WINDOW = 32  # sampling starts with a self-attention cache of this many positions


def cache_windows(max_decode_len: int, first_window: int = FIRST_WINDOW) -> list[int]:
  """The cache lengths a sampling loop decodes through: first_window, twice that, ...,
  max_decode_len (the last one); [max_decode_len] alone for first_window 0 or >= it.

  Our choice, for speed: a step's attention reads and masks its whole self-attention cache, so a
  step costs what its cache length costs whatever the position (the 2,000-source benchmark Grow
  sampled in about 30 s with windows against 32-38 s without: benchmarks/README.md). The peers
  grow their caches one position a step (HF's DynamicCache, CTranslate2); doubling keeps the
  shapes static, one compilation per window.
  """
  windows = [max_decode_len]
  if 0 < first_window < max_decode_len:
    windows = [first_window]
    while windows[-1] < max_decode_len:
      windows.append(min(2 * windows[-1], max_decode_len))
  return windows


# ----------------------------------------------------------------------------
# Temperature sampling.
# ----------------------------------------------------------------------------
@flax.struct.dataclass
class SampleState:
  """The sampling loop's state (:func:`init_sample_state`, :func:`sample_steps`).

  Rows are candidates (row ``b * N + j`` is candidate ``j`` of source ``b``) until
  :func:`compact_sample_state` keeps a subset of them; then each row is its own group.
  """
  cur_index: jnp.ndarray  # [] int32, position being decoded
  sequences: jnp.ndarray  # [rows, L] int32, emitted tokens (0 after EOS / not yet)
  cur_token: jnp.ndarray  # [rows] int32, token fed at cur_index
  cache: Any  # pytree, leading dim rows ('shared_' leaves: rows // N)
  ended: jnp.ndarray  # [rows] bool, row has emitted EOS (or its source is inactive)
  lengths: jnp.ndarray  # [rows] int32, tokens emitted incl. EOS
  token_logprobs: jnp.ndarray  # [rows, L] f32, nats, sampling distribution
  token_logprobs_policy: jnp.ndarray  # [rows, L] f32, nats, log_softmax(logits)
  row_keys: Any  # [rows, 2] uint32 (or typed [rows]) candidate keys; None with one shared key


def _is_key_array(rng) -> bool:
  return jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)


def _candidate_keys(rng, batch_size: int, num_decodes: int):
  """Per-source keys (raw [batch, 2] or typed [batch]) -> the candidates' keys
  [batch * num_decodes, ...]: candidate j of source b gets fold_in(rng[b], j).
  A single key (raw [2] or typed []) -> None.

  Raises:
    ValueError: per-source keys whose leading dim is not `batch_size`; other shapes.
  """
  rng = rng if isinstance(rng, jax.Array) else jnp.asarray(rng)
  per_row_ndim = 1 if _is_key_array(rng) else 2
  if rng.ndim == per_row_ndim - 1:
    return None
  if rng.ndim != per_row_ndim:
    raise ValueError(f'unsupported rng shape {rng.shape}')
  if rng.shape[0] != batch_size:
    raise ValueError(f'per-source rng has leading dim {rng.shape[0]}, '
                     f'expected batch_size={batch_size}')
  cand = jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(
      jnp.arange(num_decodes)))(rng)  # [B, N, ...]
  return jnp.reshape(cand, (batch_size * num_decodes,) + cand.shape[2:])


def _greedy_temperature(temperature) -> bool:
  return isinstance(temperature, (int, float)) and float(temperature) <= MIN_TEMPERATURE


def init_sample_state(cache: Any, *, batch_size: int, max_decode_len: int, rng,
                      num_decodes: int = 1, active=None) -> SampleState:
  """The state :func:`sample_steps` starts from (arguments as in :func:`temperature_sample`;
  rng may be None for greedy decoding)."""
  bn = batch_size * num_decodes
  L = max_decode_len
  ended = jnp.zeros((bn,), jnp.bool_)
  if active is not None:
    ended = ~flat_batch_beam_expand(jnp.asarray(active, jnp.bool_), num_decodes)
  return SampleState(
      cur_index=jnp.zeros((), jnp.int32),
      sequences=jnp.zeros((bn, L), jnp.int32),
      cur_token=jnp.full((bn,), PAD_ID, jnp.int32),
      cache=expand_cache(cache, num_decodes),
      ended=ended,
      lengths=jnp.zeros((bn,), jnp.int32),
      token_logprobs=jnp.zeros((bn, L), jnp.float32),
      token_logprobs_policy=jnp.zeros((bn, L), jnp.float32),
      row_keys=None if rng is None else _candidate_keys(rng, batch_size, num_decodes))


def sample_steps(state: SampleState, tokens_to_logits: TokensToLogits, *, eos_id: int,
                 temperature=1.0, topk: int = 0, topp: float = 0.0, rng=None,
                 min_live=0, stop_index=None) -> SampleState:
  """Runs the sampling loop from `state` until every row has ended, L tokens were produced,
  at most `min_live` rows are still decoding ([] int, may be traced; 0: to the end), or
  `cur_index` reached `stop_index` ([] int, may be traced; None: L), e.g. the length of a
  cache that holds fewer than L positions (`PolicyModel.extend_decode_cache` makes it longer).

  Random numbers: candidate row r at step t draws uniform(fold_in(row_keys[r], t)); with one
  shared key (`row_keys` None) step t draws all rows from fold_in(rng, t). Greedy (a static
  temperature <= MIN_TEMPERATURE) draws none.
  """
  L = state.sequences.shape[1]
  if _greedy_temperature(temperature):
    uniforms = lambda s, step: jnp.zeros(s.ended.shape, jnp.float32)
  elif state.row_keys is not None:
    uniforms = lambda s, step: jax.vmap(
        lambda k: jax.random.uniform(jax.random.fold_in(k, step), ()))(s.row_keys)
  elif rng is not None:
    uniforms = lambda s, step: jax.random.uniform(jax.random.fold_in(rng, step), s.ended.shape)
  else:
    raise ValueError('sampling needs an rng (per-source keys in the state, or one shared key)')

  stop = L if stop_index is None else jnp.minimum(stop_index, L)

  def cond_fn(s: SampleState):
    return (s.cur_index < stop) & (jnp.sum(~s.ended) > min_live)

  def body_fn(s: SampleState):
    i = s.cur_index
    logits, new_cache = tokens_to_logits(
        DecodingState(cur_index=i, sequences=s.sequences,
                      cur_token=s.cur_token, cache=s.cache))
    tok, lp, lp_pol = sample_logits(logits, uniforms(s, i), temperature=temperature,
                                    topk=topk, topp=topp)
    active = ~s.ended
    tok = jnp.where(active, tok, PAD_ID)
    lp = jnp.where(active, lp, 0.0)
    lp_pol = jnp.where(active, lp_pol, 0.0)
    put = lambda a, v: lax.dynamic_update_slice(a, v[:, None], (0, i))
    return s.replace(
        cur_index=i + 1,
        sequences=put(s.sequences, tok),
        cur_token=tok,
        cache=new_cache,
        ended=s.ended | (active & (tok == eos_id)),
        lengths=s.lengths + active.astype(jnp.int32),
        token_logprobs=put(s.token_logprobs, lp),
        token_logprobs_policy=put(s.token_logprobs_policy, lp_pol))

  return lax.while_loop(cond_fn, body_fn, state)


def compact_sample_state(state: SampleState, rows: jnp.ndarray,
                         num_decodes: int) -> SampleState:
  """The state of `rows` only ([rows'] int32 positions; repeats allowed, e.g. ended rows as
  filler to a fixed size), so that decoding stops paying for rows that have ended.

  Per-row leaves are gathered by `rows`; 'shared_' leaves, whose row s serves rows
  s * num_decodes .. s * num_decodes + num_decodes - 1 (1 once compacted), by
  `rows // num_decodes`: afterwards every row is its own group (N = 1 for the callback).
  Tokens drawn afterwards are those the uncompacted loop draws (each row's random numbers come
  from its own key), up to floating-point rounding of batch-size-dependent kernels.

  Raises:
    ValueError: the state has one shared key (its draws depend on the number of rows).
  """
  if state.row_keys is None:
    raise ValueError('compaction needs per-source keys (one shared key draws per batch)')
  rows = jnp.asarray(rows, jnp.int32)
  take = lambda x: jnp.take(x, rows, axis=0)
  cache = jax.tree_util.tree_map_with_path(
      lambda path, x: x if jnp.ndim(x) == 0 else jnp.take(
          x, rows // num_decodes if _leaf_name(path).startswith(SHARED_PREFIX) else rows, axis=0),
      state.cache)
  return state.replace(
      sequences=take(state.sequences), cur_token=take(state.cur_token), cache=cache,
      ended=take(state.ended), lengths=take(state.lengths),
      token_logprobs=take(state.token_logprobs),
      token_logprobs_policy=take(state.token_logprobs_policy), row_keys=take(state.row_keys))


def sample_output(state: SampleState, batch_size: int, num_decodes: int) -> SampleOutput:
  """The :class:`SampleOutput` of an uncompacted state ([batch * num_decodes] rows)."""
  unflat = lambda x: unflatten_beam_dim(x, batch_size, num_decodes)
  tlp = unflat(state.token_logprobs)
  tlp_pol = unflat(state.token_logprobs_policy)
  return SampleOutput(
      tokens=unflat(state.sequences),
      token_logprobs=tlp,
      token_logprobs_policy=tlp_pol,
      sequence_logprob=jnp.sum(tlp, axis=-1),
      sequence_logprob_policy=jnp.sum(tlp_pol, axis=-1),
      lengths=unflat(state.lengths),
      num_steps=state.cur_index)


def temperature_sample(cache: Any, tokens_to_logits: TokensToLogits, *,
                       batch_size: int, max_decode_len: int, eos_id: int,
                       rng, num_decodes: int = 1, temperature=1.0,
                       topk: int = 0, topp: float = 0.0, active=None,
                       windows=None, extend_cache=None) -> SampleOutput:
  """Samples ``num_decodes`` continuations per source (ancestral sampling).

  Args:
    cache: pytree with leading dim ``batch_size`` (expanded here to
      ``batch_size * num_decodes`` with :func:`expand_cache`).
    tokens_to_logits: callback, see module docstring.
    batch_size: number of sources B.
    max_decode_len: L, max tokens per sample (incl. EOS).
    eos_id: EOS token id; decoding of a row stops after it.
    rng: one PRNG key (raw uint32 [2] or typed key []), or one key per source
      (raw [B, 2] or typed [B]). With per-source keys, candidate j of source b
      at step t draws from fold_in(fold_in(rng[b], j), t): results for a source
      are identical whether it is decoded alone or inside any batch, provided
      its logits only depend on its own row. With a single key, step t uses
      fold_in(rng, t) for all rows. Unused (may be None) for a static
      temperature <= MIN_TEMPERATURE.
    num_decodes: N samples per source.
    temperature: logits are divided by it; <= MIN_TEMPERATURE is greedy.
    topk: static; 0 disables, else keep the k largest logits.
    topp: static; 0 (or >= 1) disables, else nucleus sampling (Holtzman et al.
      2020), applied after temperature and top-k as in t5x.
    active: optional [B] bool, the sources to decode (None: all). The rows of an
      inactive source (a batch's padding) start ended: they emit nothing (PAD,
      length 0, log-prob 0) and never keep the loop running, so a padded batch
      stops when its real rows do. Active rows are unaffected.
    windows: optional increasing cache lengths ending at L (:func:`cache_windows`): `cache`
      then holds ``windows[0]`` positions, the loop runs until the position reaches it, and
      ``extend_cache(cache, windows[k + 1])`` makes room for the next ones; the same loop over a
      cache of L positions draws the same tokens, up to floating-point rounding of the longer
      attention reductions (every step reads and masks the whole cache, so the short ones are
      cheaper). None: the cache holds L positions.
    extend_cache: ``(cache, length) -> cache`` (``PolicyModel.extend_decode_cache``), needed
      with more than one window.

  Returns:
    :class:`SampleOutput` with [B, N, L] tokens / per-token log-probs and
    [B, N] sums and lengths. The ``lax.while_loop`` exits as soon as every
    (active) row has emitted EOS or L tokens were produced (``num_steps``).

  Raises:
    ValueError: per-source keys whose leading dim is not B; an rng of another shape; no rng
      for a non-greedy temperature; windows that do not end at L, or several without
      extend_cache.
  """
  windows = list(windows or [max_decode_len])
  if windows[-1] != max_decode_len or (len(windows) > 1 and extend_cache is None):
    raise ValueError(f'windows {windows} must end at max_decode_len={max_decode_len} '
                     '(and more than one needs extend_cache)')
  greedy = _greedy_temperature(temperature)
  state = init_sample_state(cache, batch_size=batch_size, max_decode_len=max_decode_len,
                            rng=None if greedy else rng, num_decodes=num_decodes,
                            active=active)
  for k, window in enumerate(windows):
    if k:
      state = state.replace(cache=extend_cache(state.cache, window))
    state = sample_steps(state, tokens_to_logits, eos_id=eos_id, temperature=temperature,
                         topk=topk, topp=topp, rng=None if greedy else rng,
                         stop_index=window if len(windows) > 1 else None)
  return sample_output(state, batch_size, num_decodes)


def greedy_decode(cache: Any, tokens_to_logits: TokensToLogits, *,
                  batch_size: int, max_decode_len: int,
                  eos_id: int, active=None, windows=None, extend_cache=None) -> SampleOutput:
  """Argmax decoding (num_decodes = 1). ``token_logprobs`` are 0 (the greedy
  distribution is a point mass); ``token_logprobs_policy`` are the model's.
  ``active``, ``windows``, ``extend_cache``: as in :func:`temperature_sample`."""
  return temperature_sample(
      cache, tokens_to_logits, batch_size=batch_size,
      max_decode_len=max_decode_len, eos_id=eos_id,
      rng=None, num_decodes=1, temperature=0.0, active=active, windows=windows,
      extend_cache=extend_cache)


# ----------------------------------------------------------------------------
# Beam search.
# ----------------------------------------------------------------------------
@flax.struct.dataclass
class _BeamState:
  cur_index: jnp.ndarray  # [] int32, position being decoded
  live_logprobs: jnp.ndarray  # [B, K] f32, nats, sorted desc (NEG_INF = dead)
  live_seqs: jnp.ndarray  # [B, K, L] int32, tokens at positions < cur_index
  finished_scores: jnp.ndarray  # [B, K] f32, length-normalised, sorted desc (NEG_INF = empty)
  finished_logprobs: jnp.ndarray  # [B, K] f32, nats, raw
  finished_seqs: jnp.ndarray  # [B, K, L] int32, ending in EOS, 0 after
  finished_lengths: jnp.ndarray  # [B, K] int32, tokens incl. EOS
  cache: Any  # pytree, leading dim B*K, aligned with live beams ('shared_' leaves: B)


def beam_search(cache: Any, tokens_to_logits: TokensToLogits, *,
                batch_size: int, max_decode_len: int, eos_id: int,
                beam_size: int, alpha: float = 0.6, active=None) -> BeamOutput:
  """Beam search with GNMT length normalisation (as in t5x decoding).

  A hypothesis of ``len`` tokens (incl. EOS) with summed log-prob ``lp`` scores
  ``lp / ((5 + len) / 6) ** alpha`` (Wu et al. 2016). Each step expands the K
  live beams to the 2K best (beam, token) extensions; extensions ending in EOS
  compete for the K finished slots, the others for the K live slots. The loop
  stops at L tokens or once, for every source, the best live beam cannot beat
  the worst of K finished beams (its score is bounded by lp / max penalty).
  At the end, empty finished slots are filled with the best live
  (length-L, EOS-less) beams, ranked after all finished ones.

  Args:
    cache: pytree with leading dim ``batch_size`` (expanded to B*K here with
      :func:`expand_cache`; 'shared_' leaves stay [B, ...] and are never gathered).
    tokens_to_logits: callback, see module docstring.
    batch_size, max_decode_len, eos_id: as in :func:`temperature_sample`.
    beam_size: K; needs vocab >= 2K.
    alpha: length-penalty exponent (0 = plain log-prob).
    active: optional [B] bool, the sources to decode (None: all): an inactive source (a
      batch's padding) never keeps the loop running; its beams are unspecified.

  Returns:
    :class:`BeamOutput`, beams best first.
  """
  B, K, L = batch_size, beam_size, max_decode_len
  cache = expand_cache(cache, K)
  searching = jnp.ones((B,), jnp.bool_) if active is None else jnp.asarray(active, jnp.bool_)
  init = _BeamState(
      cur_index=jnp.zeros((), jnp.int32),
      # Only beam 0 is alive initially, so the K beams don't duplicate.
      live_logprobs=jnp.tile(
          jnp.array([0.0] + [NEG_INF] * (K - 1), jnp.float32)[None], (B, 1)),
      live_seqs=jnp.zeros((B, K, L), jnp.int32),
      finished_scores=jnp.full((B, K), NEG_INF, jnp.float32),
      finished_logprobs=jnp.full((B, K), NEG_INF, jnp.float32),
      finished_seqs=jnp.zeros((B, K, L), jnp.int32),
      finished_lengths=jnp.zeros((B, K), jnp.int32),
      cache=cache)
  max_penalty = lambda i: jnp.maximum(brevity_penalty(alpha, i + 1),
                                      brevity_penalty(alpha, L))

  def cond_fn(s: _BeamState):
    # Live log-probs are <= 0 and only decrease, so lp / max_penalty bounds
    # any future score of the best live beam.
    bound = s.live_logprobs[:, 0] / max_penalty(s.cur_index)
    worst_finished = s.finished_scores[:, -1]  # NEG_INF while not K finished
    return (s.cur_index < L) & jnp.any(searching & (bound > worst_finished))

  def body_fn(s: _BeamState):
    i = s.cur_index
    flat_seqs = flatten_beam_dim(s.live_seqs)  # [B*K, L]
    prev = lax.dynamic_slice_in_dim(flat_seqs, jnp.maximum(i - 1, 0), 1, 1)[:, 0]
    cur_token = jnp.where(i == 0, PAD_ID, prev)
    logits, new_cache = tokens_to_logits(
        DecodingState(cur_index=i, sequences=flat_seqs, cur_token=cur_token,
                      cache=s.cache))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    # PAD is never emitted: below even a dead beam's candidates (NEG_INF + logp). Scores stay the
    # policy's own log-probs (not renormalised without PAD), as `score_batch` computes them.
    logp = logp.at[:, PAD_ID].set(2 * NEG_INF)
    V = logp.shape[-1]
    cand = s.live_logprobs[:, :, None] + unflatten_beam_dim(logp, B, K)
    top_lp, top_ix = lax.top_k(cand.reshape(B, K * V), 2 * K)  # [B, 2K]
    parent = top_ix // V
    tok = (top_ix % V).astype(jnp.int32)
    seqs = _gather_beams(s.live_seqs, parent)  # [B, 2K, L]
    seqs = lax.dynamic_update_slice(seqs, tok[:, :, None], (0, 0, i))
    is_eos = tok == eos_id

    # Live: best K non-EOS extensions (at most K of the 2K end in EOS).
    live_lp, live_sel = lax.top_k(jnp.where(is_eos, NEG_INF, top_lp), K)
    live_seqs = _gather_beams(seqs, live_sel)
    live_parent = jnp.take_along_axis(parent, live_sel, axis=1)
    new_cache = _cache_map(
        lambda x: flatten_beam_dim(_gather_beams(unflatten_beam_dim(x, B, K),
                                                 live_parent)), new_cache)

    # Finished: merge old K with the new EOS extensions.
    valid = is_eos & (top_lp > 0.5 * NEG_INF)
    new_scores = jnp.where(valid, top_lp / brevity_penalty(alpha, i + 1), NEG_INF)
    all_scores = jnp.concatenate([s.finished_scores, new_scores], axis=1)
    all_lp = jnp.concatenate([s.finished_logprobs, top_lp], axis=1)
    all_seqs = jnp.concatenate([s.finished_seqs, seqs], axis=1)
    all_len = jnp.concatenate(
        [s.finished_lengths, jnp.full((B, 2 * K), i + 1, jnp.int32)], axis=1)
    fin_scores, fin_sel = lax.top_k(all_scores, K)
    take = lambda a: jnp.take_along_axis(a, fin_sel, axis=1)
    return _BeamState(
        cur_index=i + 1,
        live_logprobs=live_lp,
        live_seqs=live_seqs,
        finished_scores=fin_scores,
        finished_logprobs=take(all_lp),
        finished_seqs=_gather_beams(all_seqs, fin_sel),
        finished_lengths=take(all_len),
        cache=new_cache)

  f = lax.while_loop(cond_fn, body_fn, init)
  # Fill empty finished slots (sorted last) with the best live beams.
  n_fin = jnp.sum(f.finished_scores > 0.5 * NEG_INF, axis=1, keepdims=True)
  slot = jnp.arange(K)[None, :]
  sel = jnp.where(slot < n_fin, slot, K + slot - n_fin)  # [B, K]
  live_scores = f.live_logprobs / brevity_penalty(alpha, f.cur_index)
  take = lambda a, b: jnp.take_along_axis(jnp.concatenate([a, b], 1), sel, 1)
  return BeamOutput(
      tokens=_gather_beams(
          jnp.concatenate([f.finished_seqs, f.live_seqs], axis=1), sel),
      scores=take(f.finished_scores, live_scores),
      logprobs=take(f.finished_logprobs, f.live_logprobs),
      lengths=take(f.finished_lengths,
                   jnp.full((B, K), f.cur_index, jnp.int32)),
      num_steps=f.cur_index)


# -- the decoding-method registry ------------------------------------------------------------------
#
# `PolicyModel.predict_batch(method=name)` (and so evaluation, `rest-jax eval` / `translate`) looks
# a method up here instead of switching on its name. A registered function takes the cache, the
# callback and keyword options (`active` [batch] bool among them: sources that are a batch's
# padding must not keep decoding running) and returns (tokens [batch, num_decodes, max_decode_len] int32,
# aux dict of arrays; 'logprobs' [batch, num_decodes] f32 in nats under the untempered policy and
# 'lengths' [batch, num_decodes] int32 at least). Register your own with `register_decode_fn`.
# A method registered `windowed=True` is given a cache of `windows[0]` positions and the
# keyword arguments `windows` and `extend_cache` (see `temperature_sample`); any other method
# gets a cache of max_decode_len positions.

DecodeFn = Callable[..., Tuple[jnp.ndarray, dict]]
DECODE_FNS: dict[str, DecodeFn] = {}
WINDOWED_FNS: set[str] = set()


def register_decode_fn(name: str, windowed: bool = False) -> Callable[[DecodeFn], DecodeFn]:
  """Decorator: registers a decoding method under `name` (raises ValueError if taken);
  `windowed`: it decodes over a cache extended window by window (registry comment above)."""
  def wrap(fn: DecodeFn) -> DecodeFn:
    if name in DECODE_FNS:
      raise ValueError(f'decoding method {name!r} is already registered')
    DECODE_FNS[name] = fn
    if windowed:
      WINDOWED_FNS.add(name)
    return fn
  return wrap


def decode_fn(name: str) -> DecodeFn:
  """The registered decoding method `name`.

  Raises:
    ValueError: no such method (lists the registered ones).
  """
  if name not in DECODE_FNS:
    raise ValueError(f'Unknown decoding method {name!r}: registered are {sorted(DECODE_FNS)}')
  return DECODE_FNS[name]


def _sample_aux(out: SampleOutput) -> dict:
  return {'logprobs': out.sequence_logprob_policy, 'sampling_logprobs': out.sequence_logprob,
          'token_logprobs': out.token_logprobs,
          'token_logprobs_policy': out.token_logprobs_policy, 'lengths': out.lengths}


@register_decode_fn('greedy', windowed=True)
def _greedy(cache, tokens_to_logits, *, batch_size, max_decode_len, eos_id, num_decodes=1,
            active=None, windows=None, extend_cache=None, **unused):
  """Argmax decoding (`greedy_decode`); one decode per source."""
  del unused
  if num_decodes != 1:
    raise ValueError('greedy decoding needs num_decodes == 1.')
  out = greedy_decode(cache, tokens_to_logits, batch_size=batch_size,
                      max_decode_len=max_decode_len, eos_id=eos_id, active=active,
                      windows=windows, extend_cache=extend_cache)
  return out.tokens, _sample_aux(out)


@register_decode_fn('sample', windowed=True)
def _sample(cache, tokens_to_logits, *, batch_size, max_decode_len, eos_id, num_decodes=1,
            rng=None, temperature=1.0, topk=0, topp=0.0, active=None, windows=None,
            extend_cache=None, **unused):
  """`temperature_sample`: num_decodes samples per source (temperature / top-k / top-p)."""
  del unused
  if rng is None:
    raise ValueError("method='sample' needs an rng.")
  out = temperature_sample(cache, tokens_to_logits, batch_size=batch_size,
                           max_decode_len=max_decode_len, eos_id=eos_id, rng=rng,
                           num_decodes=num_decodes, temperature=temperature, topk=topk, topp=topp,
                           active=active, windows=windows, extend_cache=extend_cache)
  return out.tokens, _sample_aux(out)


@register_decode_fn('beam')
def _beam(cache, tokens_to_logits, *, batch_size, max_decode_len, eos_id, num_decodes=4,
          beam_alpha=0.6, active=None, **unused):
  """`beam_search` with num_decodes beams (best first) and the GNMT length penalty alpha."""
  del unused
  out = beam_search(cache, tokens_to_logits, batch_size=batch_size, beam_size=num_decodes,
                    max_decode_len=max_decode_len, eos_id=eos_id, alpha=beam_alpha,
                    active=active)
  return out.tokens, {'logprobs': out.logprobs, 'scores': out.scores, 'lengths': out.lengths}
