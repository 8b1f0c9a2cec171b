"""`rest-jax grow`: the Grow step of ReST (Gulcehre et al. 2023, arXiv 2308.08998, sec. 2).

Grow augments the training set with samples of the current policy: for every *training* source x,
N candidates y ~ pi(. | x) are drawn (temperature 0.8 in the paper), and the original pair
(x, reference) is kept beside them. Every pair is written out once, to be scored by the reward
model and then filtered by the Improve steps.

Two layers:

* A pure-JAX core (no TensorFlow): `sample_candidates` and `score_references`. Source b's
  candidates use the key `fold_in(PRNGKey(seed), source_index[b])` (candidate j at step t:
  `fold_in(fold_in(key_b, j), t)`, see `decoding.temperature_sample`), and every source is padded
  to the length bucket of its *own* length, so its samples do not depend on batching, chunking,
  device count or host count.
* `grow` (gin) drives it chunk by chunk and writes the records through `rest_jax.records`
  (TensorFlow imported lazily, in that module's writer / reader only): chunk k holds sources
  [k * chunk_size, (k + 1) * chunk_size) and is `grow-{k:05d}-of-{K:05d}.tfrecord` (written to a
  temporary name, then renamed) followed by its completion marker `grow-{k:05d}.done` (JSON
  counts). A restarted Grow skips marked chunks and redoes the others from scratch, so a killed run
  resumes to output byte-identical to an uninterrupted one. `settings.json` (written first, see
  `records.pin_settings`) pins the settings; `manifest.json` (written last) marks the Grow
  complete. The hosts of a multi-host job, and independent worker processes of one job
  (`REST_JAX_JOB_ID`), share the chunks by claiming them (`records.claim_chunks`): a worker
  killed mid-chunk loses that chunk only, which another redoes, and the files are the same for
  any number of hosts or workers.

Records (one `tf.train.Example` per kept candidate, see `records.RECORD_FIELDS`): per source, the
reference record (origin 'reference', candidate_index -1, `logprob_policy` = the policy's
`score_batch` of the reference, `logprob_sampling` NaN under record format 2: the reference was
never sampled) comes first, then the distinct samples by candidate index. Identical
samples of one source (same ids) are deduplicated, keeping the first by candidate index;
`num_duplicates` counts how many of the N samples equal the record's ids (>= 1 for a sample, >= 0
for the reference). A sample equal to the reference is *kept* as a sample (origin 'sample'): it is a
genuine draw of the policy, and the reward model scores it like any other sample.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from tqdm import tqdm

from rest_jax import data as data_lib
from rest_jax import decoding, distributed, fileio, inference, input_pipeline, partitioning
from rest_jax import records
from rest_jax import trainer as trainer_lib
from rest_jax.models import base as model_base
from rest_jax.models import encoder_decoder
from rest_jax.models.transformer import EOS_ID

LENGTH_BUCKETS = inference.LENGTH_BUCKETS
RECORD_FIELDS = records.RECORD_FIELDS


class GrowInterrupted(RuntimeError):
  """Raised by the `_stop_after_chunks` test hook (a simulated kill)."""


# -- pure-JAX core ---------------------------------------------------------------------------------

COMPACT_FACTOR = 4  # a batch's rows shrink by this factor as they finish (0: never)
MIN_COMPACT_ROWS = 8  # ... down to this many rows (rounded up to the mesh's data axis)
FIRST_WINDOW = decoding.FIRST_WINDOW  # a batch's first cache length (decoding.cache_windows)


@functools.lru_cache(maxsize=16)
def _sample_programs(model, num_decodes, temperature, topk, topp, max_decode_len, first_window):
  """The jitted pieces of a batch's sampling loop: init (a cache of `first_window` positions),
  steps (to at most `min_live` live rows, or to `stop_index`), compact (keep `rows`; its output
  size is that of `rows`) and extend (the cache to `length` positions)."""
  def init(params, encoder_input_tokens, source_index, base_key):
    rng = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(source_index)  # [B, 2] uint32
    cache = model.init_decode_cache(params, encoder_input_tokens, first_window)
    return decoding.init_sample_state(
        cache, batch_size=encoder_input_tokens.shape[0], max_decode_len=max_decode_len, rng=rng,
        num_decodes=num_decodes,
        active=(encoder_input_tokens != 0).any(axis=-1))  # Padding rows end at once.

  def steps(params, state, min_live, stop_index):
    return decoding.sample_steps(state, model.make_tokens_to_logits(params), eos_id=EOS_ID,
                                 temperature=temperature, topk=topk, topp=topp,
                                 min_live=min_live, stop_index=stop_index)

  def extend(state, length):
    return state.replace(cache=model.extend_decode_cache(state.cache, length))

  return (jax.jit(init), jax.jit(steps, donate_argnums=1),
          jax.jit(decoding.compact_sample_state, static_argnums=2),
          jax.jit(extend, static_argnums=1))


def compaction_sizes(rows: int, factor: int, min_rows: int = MIN_COMPACT_ROWS,
                     multiple: int = 1) -> list[int]:
  """The row counts a batch of `rows` candidate rows is compacted through, largest first:
  rows, rows / factor, rows / factor^2, ... (each rounded up to a multiple of `multiple`, the
  mesh's data axis), none below `min_rows`; [rows] alone for factor 0 or 1. Our choice: a
  geometric ladder bounds the compilations at one per size and length bucket."""
  sizes = [rows]
  if factor <= 1:
    return sizes
  while True:
    nxt = -(-(sizes[-1] // factor) // multiple) * multiple
    if nxt < max(min_rows, multiple) or nxt >= sizes[-1]:
      return sizes
    sizes.append(nxt)


def _sample_batch(programs, params, enc, source_index, key, *, num_decodes: int,
                  compact_factor: int, windows: Sequence[int], multiple: int,
                  token_logprobs: bool) -> dict:
  """One batch's candidates, its rows compacted as they finish and its cache extended as the
  decoded positions reach its length (the loop of `sample_candidates`).

  The loop runs on device until at most the next ladder size of rows is still decoding, or the
  position reaches the cache's length (`windows`, which `programs`' init starts from). The host
  then copies every row's tokens and log-probs out (by original row) and keeps the live rows
  only (padded with an ended row to the ladder size), so that the remaining steps cost what the
  live rows cost, or extends the cache to the next window. Each row draws from its own key: the
  tokens are those of an uncompacted loop over a full-length cache, up to floating-point rounding
  of batch-size- and length-dependent kernels.
  """
  init, steps, compact, extend = programs
  B, N = enc.shape[0], num_decodes
  state = init(params, enc, source_index, key)
  L = state.sequences.shape[1]
  sizes = compaction_sizes(B * N, compact_factor, multiple=multiple)
  row_ids = np.arange(B * N)  # original row of each state row, -1 for filler
  buf = {'tokens': np.zeros((B * N, L), np.int32), 'lengths': np.zeros((B * N,), np.int32),
         'token_logprobs': np.zeros((B * N, L), np.float32),
         'token_logprobs_policy': np.zeros((B * N, L), np.float32)}
  group = N  # rows per 'shared_' cache row
  level, window = 0, 0
  while True:
    min_live = sizes[level + 1] if level + 1 < len(sizes) else 0
    state = steps(params, state, min_live, windows[window])
    got = jax.device_get({'tokens': state.sequences, 'lengths': state.lengths,
                          'token_logprobs': state.token_logprobs,
                          'token_logprobs_policy': state.token_logprobs_policy,
                          'ended': state.ended, 'cur_index': state.cur_index})
    real = row_ids >= 0
    for k in ('tokens', 'lengths', 'token_logprobs', 'token_logprobs_policy'):
      buf[k][row_ids[real]] = got[k][real]
    live = np.flatnonzero(~got['ended'])
    if not len(live) or int(got['cur_index']) >= L:
      break
    if int(got['cur_index']) >= windows[window]:
      window += 1
      state = extend(state, windows[window])
    if len(live) > min_live:
      continue
    level = next(i for i in range(len(sizes) - 1, level, -1) if sizes[i] >= len(live))
    filler = np.flatnonzero(got['ended'])[:1]  # some row ended: len(live) < rows in the state
    keep = np.concatenate([live, np.repeat(filler, sizes[level] - len(live))])
    state = compact(state, keep.astype(np.int32), group)
    row_ids = np.concatenate([row_ids[live], np.full(sizes[level] - len(live), -1)])
    group = 1
  unflat = lambda x: x.reshape((B, N) + x.shape[1:])
  out = {'tokens': unflat(buf['tokens']), 'lengths': unflat(buf['lengths']),
         'logprob_sampling': unflat(buf['token_logprobs'].sum(-1, dtype=np.float32)),
         'logprob_policy': unflat(buf['token_logprobs_policy'].sum(-1, dtype=np.float32))}
  if token_logprobs:
    out['token_logprobs_policy'] = unflat(buf['token_logprobs_policy'])
  return out


@functools.lru_cache(maxsize=4)
def _score_fn(model):
  return jax.jit(model.score_batch)


def sample_seed(seed: int, grow_step: int) -> int:
  """The sampling seed of Grow `grow_step` of a loop seeded with `seed`: `seed` itself for
  Grow 1, else a seed derived from (seed, grow_step) (`numpy.random.SeedSequence`), so that each
  Grow draws fresh samples (ReST sec. 2 samples anew in every Grow; with one seed for all Grows a
  policy that no Improve step changed would reproduce the previous Grow record for record)."""
  if grow_step == 1:
    return int(seed)
  return int(np.random.SeedSequence([int(seed), int(grow_step)]).generate_state(1)[0] >> 1)


def sample_candidates(model, params, encoder_input_tokens: np.ndarray,
                      source_indices: np.ndarray, *, seed: int, num_decodes: int,
                      temperature: float, topk: int = 0, topp: float = 0.0,
                      max_decode_len: int = 128, decode_length_ratio: float | None = 2.0,
                      mesh=None, batch_size: int = 32,
                      progress: Callable[[int], None] | None = None, key=None,
                      token_logprobs: bool = False,
                      compact_factor: int = COMPACT_FACTOR,
                      first_window: int = FIRST_WINDOW) -> dict[str, np.ndarray]:
  """Draws `num_decodes` candidates per source from the policy (ReST Grow, sec. 2).

  Args:
    model: an `EncoderDecoderModel`.
    params: its (unboxed) params, ideally already laid out on `mesh`.
    encoder_input_tokens: [n, src_len] int32 sources (EOS-terminated, PAD = 0).
    source_indices: [n] int, the sources' indices in the split; source b samples with the key
      `fold_in(PRNGKey(seed), source_indices[b])`, so its candidates are the same in any batch,
      chunk, device or host layout.
    seed: Grow seed.
    num_decodes: N candidates per source.
    temperature, topk, topp: sampling distribution (`sampling.sample_logits`; temperature
      <= 1e-4 is greedy).
    max_decode_len: L, tokens per candidate incl. EOS.
    decode_length_ratio: candidates of a source in length bucket s stop after
      `data.decode_length(s, L, ratio)` tokens (None: L). A candidate is a prefix-closed function
      of its key, so the bound only truncates: it never changes the tokens drawn before it.
    mesh: a `Mesh(('data', 'model'))`; default: all local devices, `create_mesh` (gin) partitions.
    batch_size: sources per decoding batch (rounded up to a multiple of the `data` axis; the
      last batch of each length bucket is padded with zero rows, dropped afterwards). Sources are
      grouped by their own length bucket (16/32/64/128 tokens), one compilation per bucket.
    progress: called with the number of sources after each batch.
    key: a PRNG key (uint32 [2]) to use instead of `PRNGKey(seed)` (the online loop passes
      `fold_in(PRNGKey(seed), rollout)`); source b then samples with
      `fold_in(key, source_indices[b])`.
    token_logprobs: also return 'token_logprobs_policy' [n, N, L] float32 (nats, per token under
      the untempered policy, 0 after EOS): the rollout log-probs of `rest_jax.online`.
    compact_factor: as a batch's candidates finish, its live rows are gathered into a batch this
      many times smaller (`compaction_sizes`; 0 never), so a batch does not pay for its finished
      rows until its longest candidate ends. The tokens do not depend on it (each row draws from
      its own key), up to floating-point rounding of batch-size-dependent kernels.
    first_window: decoding starts with a self-attention cache of this many positions and
      doubles it whenever the decoded position reaches its length (`decoding.cache_windows`;
      0: the full length from the start), so that the first steps do not read and mask the
      positions of the longest candidate; the tokens do not depend on it, up to floating-point
      rounding of length-dependent kernels. Only for a `PolicyModel` (`extend_decode_cache`).

  Returns:
    dict of numpy arrays: 'tokens' [n, N, L] int32 (EOS kept, 0 after), 'logprob_sampling'
    [n, N] f32 (nats, under the tempered / filtered sampling distribution; 0 if greedy),
    'logprob_policy' [n, N] f32 (nats, under the untempered policy), 'lengths' [n, N] int32
    (tokens incl. EOS).
  """
  enc = np.asarray(encoder_input_tokens, np.int32)
  n, N, L = len(enc), num_decodes, max_decode_len
  if n == 0:
    return {'tokens': np.zeros((0, N, L), np.int32), 'lengths': np.zeros((0, N), np.int32),
            'logprob_sampling': np.zeros((0, N), np.float32),
            'logprob_policy': np.zeros((0, N), np.float32)}
  mesh = mesh if mesh is not None else partitioning.create_mesh(devices=jax.local_devices())
  key = jax.random.PRNGKey(seed) if key is None else key

  # A PolicyModel declares `extend_decode_cache`; any other model decodes over a full cache.
  first = int(first_window) if isinstance(model, model_base.PolicyModel) else 0

  def step(buckets, batch):
    steps = data_lib.decode_length(buckets[0], L, decode_length_ratio)
    windows = decoding.cache_windows(steps, first)
    programs = _sample_programs(model, N, float(temperature), int(topk), float(topp), steps,
                                windows[0])
    return _sample_batch(programs, params, batch['encoder_input_tokens'], batch['source_index'],
                         key, num_decodes=N, compact_factor=int(compact_factor),
                         windows=windows, multiple=mesh.shape['data'],
                         token_logprobs=bool(token_logprobs))
  out = inference.run_batched(
      step, {'encoder_input_tokens': enc,
             'source_index': np.asarray(source_indices, np.int64).astype(np.int32)},
      trim=('encoder_input_tokens',), buckets=LENGTH_BUCKETS, batch_size=batch_size, mesh=mesh,
      grouping='row', progress=progress)
  for k in ('tokens', 'token_logprobs_policy'):
    if k in out:
      out[k] = np.pad(out[k], ((0, 0), (0, 0), (0, L - out[k].shape[2])))
  return out


def score_references(model, params, encoder_input_tokens: np.ndarray,
                     decoder_target_tokens: np.ndarray, *, mesh=None,
                     batch_size: int = 32) -> np.ndarray:
  """log pi(reference | source) in nats, [n] float32 (`model.score_batch`, no dropout).

  Args:
    encoder_input_tokens: [n, src_len] int32; decoder_target_tokens: [n, tgt_len] int32
    (EOS-terminated, PAD = 0). Rows are grouped by their own (source, target) length buckets.
  """
  if not len(encoder_input_tokens):
    return np.zeros((0,), np.float32)
  mesh = mesh if mesh is not None else partitioning.create_mesh(devices=jax.local_devices())
  fn = _score_fn(model)

  def step(buckets, batch):
    return fn(params, {'encoder_input_tokens': batch['encoder_input_tokens'],
                       'decoder_input_tokens': encoder_decoder.shift_right(batch['decoder_target_tokens']),
                       'decoder_target_tokens': batch['decoder_target_tokens']})
  return inference.run_batched(
      step, {'encoder_input_tokens': np.asarray(encoder_input_tokens, np.int32),
             'decoder_target_tokens': np.asarray(decoder_target_tokens, np.int32)},
      trim=('encoder_input_tokens', 'decoder_target_tokens'), buckets=LENGTH_BUCKETS,
      batch_size=batch_size, mesh=mesh, grouping='row').astype(np.float32)


def chunk_records(rows: np.ndarray, task_data, samples: Mapping[str, np.ndarray],
                  ref_scores: np.ndarray, detokenize: Callable, grow_step: int,
                  record_format: int = records.RECORD_FORMAT
                  ) -> tuple[list[dict], dict[str, int]]:
  """The records of one chunk (plain dicts, see `records.RECORD_FIELDS`) and its counts.

  rows: [n] source indices into `task_data`; samples, ref_scores: of those sources, in order.
  record_format: `records.RECORD_FORMAT` (2: a reference's `logprob_sampling` is NaN, it was
  never sampled; 1: the policy score, for directories started under format 1).
  """
  enc = task_data.arrays['encoder_input_tokens']
  tgt = task_data.arrays['decoder_target_tokens']
  N = samples['tokens'].shape[1]
  ref_sampling = (lambda v: float('nan')) if record_format >= 2 else float
  out, c = [], dict(sources=0, samples_drawn=0, samples_kept=0, duplicates_removed=0,
                    reference_records=0, records=0, generated_tokens=0)
  for b, i in enumerate(rows):
    i = int(i)
    src_ids, ref_ids = data_lib.trim(enc[i]), data_lib.trim(tgt[i])
    cands: dict[tuple, list[int]] = {}  # ids -> candidate indices (insertion order = first j).
    for j in range(N):
      ids = tuple(int(t) for t in samples['tokens'][b, j, :samples['lengths'][b, j]])
      cands.setdefault(ids, []).append(j)
    common = dict(source_index=i, source=task_data.inputs[i], source_ids=src_ids,
                  reference=task_data.targets[i], grow_step=grow_step)
    provenance = f'{task_data.keys[i]}/grow_{grow_step}'
    out.append(dict(common, candidate=task_data.targets[i], candidate_ids=ref_ids,
                    logprob_sampling=ref_sampling(ref_scores[b]),
                    logprob_policy=float(ref_scores[b]),
                    length=len(ref_ids), candidate_index=-1, origin='reference',
                    key=f'{provenance}/reference',
                    num_duplicates=len(cands.get(tuple(ref_ids), ()))))
    for ids, js in cands.items():
      j = js[0]
      out.append(dict(common, candidate=detokenize(list(ids)), candidate_ids=list(ids),
                      logprob_sampling=float(samples['logprob_sampling'][b, j]),
                      logprob_policy=float(samples['logprob_policy'][b, j]),
                      length=len(ids), candidate_index=j, origin='sample',
                      key=f'{provenance}/sample_{j}', num_duplicates=len(js)))
    for name, v in dict(sources=1, samples_drawn=N, samples_kept=len(cands), reference_records=1,
                        duplicates_removed=N - len(cands), records=1 + len(cands),
                        generated_tokens=int(samples['lengths'][b].sum())).items():
      c[name] += v
  return out, c


def read_grow_records(grow_dir: str) -> list[dict[str, Any]]:
  """All records of a finished Grow, sorted by chunk file name, then in file order.

  Returns dicts with the `records.RECORD_FIELDS` (text fields as str, `*_ids` as lists of int).

  Raises:
    FileNotFoundError: as `records.read_chunked` (Grow unfinished, a chunk without its marker).
  """
  return records.read_chunked(grow_dir, records.GROW)


# -- the command -----------------------------------------------------------------------------------

@gin.configurable(denylist=['output_dir', 'task_data', 'detokenize', 'mesh', 'params',
                            '_stop_after_chunks'])
def grow(output_dir: str,
         model=gin.REQUIRED,
         policy_dir: str | None = None,
         task: str = 'libreoffice_help_de_en',
         split: str = 'train',
         num_decodes: int = 8,
         temperature: float = 0.8,
         topk: int = 0,
         topp: float = 0.0,
         max_decode_len: int = 128,
         decode_length_ratio: float | None = 2.0,
         batch_size: int = 32,
         compact_factor: int = COMPACT_FACTOR,
         first_window: int = FIRST_WINDOW,
         chunk_size: int = 1024,
         seed: int = 0,
         grow_step: int = 1,
         max_sources: int | None = None,
         source_every: int = 1,
         inputs_length: int = 128,
         targets_length: int = 128,
         task_data: input_pipeline.TaskData | None = None,
         detokenize: Callable[[Sequence[int]], str] | None = None,
         mesh=None,
         params=None,
         _stop_after_chunks: int | None = None) -> dict[str, Any]:
  """Grow (ReST sec. 2): N policy samples + the reference for every source, written as TFRecords.

  Args:
    output_dir: where chunks, markers, settings.json and manifest.json go (`<workdir>/grow_<g>`).
    model: an `EncoderDecoderModel` (gin: `MODEL`).
    policy_dir: a run dir of `rest-jax train` / `improve` (best params, else the latest
      checkpoint) or a params `.npz` (`trainer.restore_policy`); its recorded vocabulary must be
      the task's (`input_pipeline.check_policy_vocab`).
    task, split: SeqIO task and split whose sources are grown (the paper grows the train split).
    num_decodes: N samples per source. temperature, topk, topp: sampling (paper: T = 0.8).
    max_decode_len: tokens per sample incl. EOS.
    decode_length_ratio: a sample of a source in length bucket s has at most
      min(max_decode_len, ratio * s) tokens (`data.decode_length`; None: max_decode_len).
    batch_size: sources per decoding batch (see `sample_candidates`); not part of the settings
      (it does not change which samples are drawn).
    compact_factor: finished candidates are dropped from a decoding batch, its live rows
      gathered into one this many times smaller (`sample_candidates`; 0: never); not part of
      the settings.
    first_window: decoding starts with a self-attention cache of this many positions, doubled
      as the decoded position reaches it (`sample_candidates`; 0: full length); not part of the
      settings.
    chunk_size: sources per chunk file (the unit of resumption).
    seed: sampling seed; source i uses `fold_in(PRNGKey(sample_seed(seed, grow_step)), i)`.
    grow_step: which Grow of the ReST loop (1, 2, ...), stored in every record; Grow g > 1
      samples with its own seed (`sample_seed`).
    max_sources: grow only the first sources of the split (None: all), counted after
      `source_every`.
    source_every: grow every k-th source of the split only (1: all), so that a `max_sources`
      subset spreads over the whole split (its files are in document order) instead of its first
      pages. `source_index` in the records is the position in this subset.
    inputs_length, targets_length: feature lengths of the tokenized split (tokens).
    task_data: an `input_pipeline.TaskData` to grow instead of loading `task`/`split` (tests).
    detokenize: ids -> text (default: the task's SentencePiece detokenizer).
    mesh: decoding mesh (default: this host's devices, `create_mesh` partitions). Each host or
      worker grows the chunks it claims (`records.claim_chunks`) on its own devices.
    params: policy params to use instead of restoring `policy_dir` (tests).
    _stop_after_chunks: test hook: raise `GrowInterrupted` after this many chunks were written.

  Returns:
    The manifest (also `output_dir/manifest.json`): settings and their sha256, counts (sources,
    samples drawn / kept, duplicates removed, reference records, records, generated tokens,
    chunks), wall_seconds and generated_tokens_per_second of this invocation.

  Raises:
    ValueError: `output_dir` holds a Grow with different settings (names them).
  """
  start = time.perf_counter()
  fileio.makedirs(output_dir)
  if task_data is None:
    cache = fileio.local_cache_dir(fileio.parent(output_dir))
    task_data = input_pipeline.cached_task_data(
        task, split, inputs_length, targets_length, cache,
        max_examples=max_sources if source_every == 1 else None)
  if source_every > 1:
    task_data = task_data.take(np.arange(0, len(task_data), source_every))
  if max_sources is not None:
    task_data = task_data.subset(max_sources)
  num_sources = len(task_data)
  p, P = jax.process_index(), jax.process_count()
  settings = dict(policy_dir=policy_dir or None, task=task,
                  split=split, num_decodes=num_decodes, temperature=float(temperature), topk=topk,
                  topp=float(topp), max_decode_len=max_decode_len,
                  decode_length_ratio=decode_length_ratio, chunk_size=chunk_size, seed=seed,
                  grow_step=grow_step, max_sources=max_sources,
                  source_every=source_every, num_sources=num_sources,
                  inputs_length=inputs_length, targets_length=targets_length,
                  model_config=repr(model.config))
  this_seed = sample_seed(seed, grow_step)
  if grow_step > 1:  # (Grow 1's settings, and so its hash, are as they were before this key.)
    settings['sample_seed'] = this_seed
  pinned = records.pin_settings(output_dir, settings, what='a Grow', path_keys=('policy_dir',),
                                process_count=P, write=p == 0)
  finished = records.finished_manifest(output_dir, records.GROW)
  if finished is not None:
    logging.info('grow: %s is complete', output_dir)
    return finished

  # Chunk k holds sources [k * chunk_size, (k + 1) * chunk_size), whoever makes it: the hosts of
  # a job and independent workers claim chunks (`records.claim_chunks`), so the files depend on
  # neither the host count (outside the settings hash) nor the number of workers.
  K = -(-num_sources // chunk_size)
  todo = [k for k in range(K) if not records.is_done(output_dir, records.GROW, k, K)]
  chunk_rows = lambda k: np.arange(k * chunk_size, min((k + 1) * chunk_size, num_sources))
  logging.info('grow: %d sources, %d chunks (%d to do) -> %s', num_sources, K, len(todo),
               output_dir)

  mesh = mesh if mesh is not None else partitioning.create_mesh(devices=jax.local_devices())
  if detokenize is None:
    input_pipeline.check_vocab_size(task, model.config.vocab_size)
    if policy_dir:
      input_pipeline.check_policy_vocab(policy_dir, task)
    detokenize = input_pipeline.detokenizer(task)
  # In a multi-host job every host restores the policy, even one that finds no chunk left:
  # orbax's restore is a collective there (each host's mesh is its own devices).
  if todo or P > 1:
    abstract = trainer_lib.abstract_params(model, mesh)
    if params is None:
      if not policy_dir:
        raise ValueError('grow needs a policy_dir (or params)')
      params = trainer_lib.restore_policy(policy_dir, abstract)
    else:
      params = jax.device_put(nn.meta.unbox(params), jax.tree.map(lambda a: a.sharding, abstract))

  total = sum(len(chunk_rows(k)) for k in todo)  # At most: other workers may make some.
  bar = tqdm(total=total, desc=f'grow {grow_step}', unit='src', dynamic_ncols=True,
             mininterval=2.0, disable=p != 0)
  drawn, tokens, made = 0, 0, 0
  seconds = dict(sample=0.0, score=0.0, write=0.0)  # This run's sampling / reference scoring /
  # record building and writing (wall seconds; sampling includes each bucket's compilation).
  with contextlib.closing(records.claim_chunks(output_dir, records.GROW, K)) as claimed:
    for k in claimed:
      rows = chunk_rows(k)
      t0 = time.perf_counter()
      enc = task_data.arrays['encoder_input_tokens'][rows]

      def progress(m):
        bar.update(m)
        bar.set_postfix(cand_s=f'{bar.n * num_decodes / (time.perf_counter() - start):,.1f}')
      samples = sample_candidates(model, params, enc, rows, seed=this_seed,
                                  num_decodes=num_decodes,
                                  temperature=temperature, topk=topk, topp=topp,
                                  max_decode_len=max_decode_len,
                                  decode_length_ratio=decode_length_ratio, mesh=mesh,
                                  batch_size=batch_size, compact_factor=compact_factor,
                                  first_window=first_window, progress=progress)
      t1 = time.perf_counter()
      ref = score_references(model, params, enc, task_data.arrays['decoder_target_tokens'][rows],
                             mesh=mesh, batch_size=batch_size)
      t2 = time.perf_counter()
      chunk, counts = chunk_records(rows, task_data, samples, ref, detokenize, grow_step,
                                    pinned.record_format)
      drawn += counts['samples_drawn']
      tokens += counts['generated_tokens']
      records.write_chunk(output_dir, records.GROW, k, K, chunk, counts)
      seconds['sample'] += t1 - t0
      seconds['score'] += t2 - t1
      seconds['write'] += time.perf_counter() - t2
      made += 1
      if _stop_after_chunks is not None and made >= _stop_after_chunks:
        raise GrowInterrupted(f'stopped after {made} chunks (test hook)')
  bar.close()

  distributed.barrier('rest_jax.grow.done')
  counts = records.sum_counts(output_dir, records.GROW, K)
  counts['chunks'] = K
  wall = time.perf_counter() - start
  manifest = dict(policy_dir=pinned.settings['policy_dir'], task=task, split=split,
                  settings=pinned.settings, settings_hash=pinned.settings_hash, counts=counts,
                  chunks_resumed=K - len(todo),
                  wall_seconds=wall, decode_seconds=seconds['sample'] + seconds['score'],
                  sample_seconds=seconds['sample'], reference_score_seconds=seconds['score'],
                  write_seconds=seconds['write'], generated_tokens_this_run=tokens,
                  generated_tokens_per_second=tokens / max(seconds['sample'] + seconds['score'],
                                                           1e-9),
                  sampled_tokens_per_second=tokens / max(seconds['sample'], 1e-9))
  if p == 0:  # Host 0 of a job; every independent worker (each one's host 0) when it ends.
    records.write_manifest(output_dir, manifest)
  logging.info('grow: %d records (%d samples kept of %d, %d references) in %.0f s, %.0f tok/s',
               counts['records'], counts['samples_kept'], counts['samples_drawn'],
               counts['reference_records'], wall, manifest['generated_tokens_per_second'])
  return manifest
