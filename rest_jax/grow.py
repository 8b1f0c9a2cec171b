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
* `grow` (gin) drives it chunk by chunk and writes TFRecords (TensorFlow imported lazily, in the
  writer / reader only). Chunk k is `grow-{k:05d}-of-{K:05d}.tfrecord` (written to a temporary
  name, then renamed) followed by its completion marker `grow-{k:05d}.done` (JSON counts). A
  restarted Grow skips marked chunks and redoes the others from scratch, so a killed run resumes to
  output byte-identical to an uninterrupted one. `settings.json` (written first) pins the settings;
  `manifest.json` (written last) marks the Grow complete.

Records (one `tf.train.Example` per kept candidate, see `RECORD_FIELDS`): per source, the
reference record (origin 'reference', candidate_index -1, both logprob fields = the policy's
`score_batch` of the reference) comes first, then the distinct samples by candidate index. Identical
samples of one source (same ids) are deduplicated, keeping the first by candidate index;
`num_duplicates` counts how many of the N samples equal the record's ids (>= 1 for a sample, >= 0
for the reference). A sample equal to the reference is *kept* as a sample (origin 'sample'): it is a
genuine draw of the policy, and the reward model scores it like any other sample.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import logging
import os
import re
import time
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from tqdm import tqdm

from rest_jax import data as data_lib
from rest_jax import decoding, input_pipeline, partitioning, trainer as trainer_lib
from rest_jax.models.transformer import EOS_ID

LENGTH_BUCKETS = (16, 32, 64, 128)
INT_FIELDS = ('source_index', 'source_ids', 'candidate_ids', 'length', 'grow_step',
              'candidate_index', 'num_duplicates')
FLOAT_FIELDS = ('logprob_sampling', 'logprob_policy')
BYTES_FIELDS = ('source', 'reference', 'candidate', 'origin', 'key')
LIST_FIELDS = ('source_ids', 'candidate_ids')  # The other fields are scalars.
RECORD_FIELDS = INT_FIELDS + FLOAT_FIELDS + BYTES_FIELDS
_CHUNK_RE = re.compile(r'grow-(\d{5})-of-(\d{5})\.tfrecord$')


class GrowInterrupted(RuntimeError):
  """Raised by the `_stop_after_chunks` test hook (a simulated kill)."""


# -- pure-JAX core ---------------------------------------------------------------------------------

@contextlib.contextmanager
def _mesh_context(mesh):
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.LOGICAL_AXIS_RULES):
    yield


def _shard(batch: Mapping[str, np.ndarray], mesh) -> dict:
  if jax.process_count() == 1:
    return partitioning.shard_batch(dict(batch), mesh)
  # Several hosts: Grow runs on a host-local mesh, each host on its own sources (no lockstep).
  return {k: jax.device_put(v, partitioning.batch_sharding(mesh)) for k, v in batch.items()}


def _global_batch(batch_size: int, mesh) -> int:
  """`batch_size` rounded up to a multiple of the mesh's `data` axis."""
  d = mesh.shape['data']
  return -(-batch_size // d) * d


def _grouped_batches(keys: np.ndarray, batch_size: int) -> list[np.ndarray]:
  """Row positions grouped by equal key (ascending keys, rows in order), cut to <= batch_size."""
  out = []
  for k in np.unique(keys):
    rows = np.flatnonzero(keys == k)
    out += [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
  return out


def _buckets(tokens: np.ndarray) -> np.ndarray:
  """[n, len] int tokens -> [n] int: each row's own length bucket (`data.bucket_length`)."""
  return np.array([data_lib.bucket_length(max(int(l), 1), LENGTH_BUCKETS)
                   for l in data_lib.lengths(tokens)], np.int64)


@functools.lru_cache(maxsize=16)
def _sample_fn(model, num_decodes, temperature, topk, topp, max_decode_len):
  def sample(params, encoder_input_tokens, source_index, base_key):
    rng = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(source_index)  # [B, 2] uint32
    cache = model.init_decode_cache(params, encoder_input_tokens, max_decode_len)
    out = decoding.temperature_sample(
        cache, model.make_tokens_to_logits(params), batch_size=encoder_input_tokens.shape[0],
        max_decode_len=max_decode_len, eos_id=EOS_ID, rng=rng, num_decodes=num_decodes,
        temperature=temperature, topk=topk, topp=topp)
    return {'tokens': out.tokens, 'logprob_sampling': out.sequence_logprob,
            'logprob_policy': out.sequence_logprob_policy, 'lengths': out.lengths}
  return jax.jit(sample)


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
                      progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
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
    temperature, topk, topp: sampling distribution (`decoding.sample_logits`; temperature
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

  Returns:
    dict of numpy arrays: 'tokens' [n, N, L] int32 (EOS kept, 0 after), 'logprob_sampling'
    [n, N] f32 (nats, under the tempered / filtered sampling distribution; 0 if greedy),
    'logprob_policy' [n, N] f32 (nats, under the untempered policy), 'lengths' [n, N] int32
    (tokens incl. EOS).
  """
  enc = np.asarray(encoder_input_tokens, np.int32)
  idx = np.asarray(source_indices, np.int64)
  n, N, L = len(enc), num_decodes, max_decode_len
  mesh = mesh if mesh is not None else partitioning.create_mesh(devices=jax.local_devices())
  bs = _global_batch(batch_size, mesh)
  key = jax.random.PRNGKey(seed)
  out = {'tokens': np.zeros((n, N, L), np.int32),
         'logprob_sampling': np.zeros((n, N), np.float32),
         'logprob_policy': np.zeros((n, N), np.float32),
         'lengths': np.zeros((n, N), np.int32)}
  buckets = _buckets(enc)
  with _mesh_context(mesh):
    for rows in _grouped_batches(buckets, bs):
      steps = data_lib.decode_length(int(buckets[rows[0]]), L, decode_length_ratio)
      fn = _sample_fn(model, N, float(temperature), int(topk), float(topp), steps)
      batch, real = data_lib.pad_batch({'enc': enc[rows, :buckets[rows[0]]],
                                        'idx': idx[rows].astype(np.int32)}, bs)
      batch = _shard(batch, mesh)
      res = jax.device_get(fn(params, batch['enc'], batch['idx'], key))
      for k in out:
        v = np.asarray(res[k])[:real]
        if k == 'tokens':
          out[k][rows, :, :steps] = v
        else:
          out[k][rows] = v
      if progress:
        progress(len(rows))
  return out


def score_references(model, params, encoder_input_tokens: np.ndarray,
                     decoder_target_tokens: np.ndarray, *, mesh=None,
                     batch_size: int = 32) -> np.ndarray:
  """log pi(reference | source) in nats, [n] float32 (`model.score_batch`, no dropout).

  Args:
    encoder_input_tokens: [n, src_len] int32; decoder_target_tokens: [n, tgt_len] int32
    (EOS-terminated, PAD = 0). Rows are grouped by their own (source, target) length buckets.
  """
  enc = np.asarray(encoder_input_tokens, np.int32)
  tgt = np.asarray(decoder_target_tokens, np.int32)
  mesh = mesh if mesh is not None else partitioning.create_mesh(devices=jax.local_devices())
  bs = _global_batch(batch_size, mesh)
  sb, tb = _buckets(enc), _buckets(tgt)
  out = np.zeros((len(enc),), np.float32)
  fn = _score_fn(model)
  with _mesh_context(mesh):
    for rows in _grouped_batches(sb * 100_000 + tb, bs):
      t = tgt[rows, :tb[rows[0]]]
      batch, real = data_lib.pad_batch({
          'encoder_input_tokens': enc[rows, :sb[rows[0]]],
          'decoder_input_tokens': np.pad(t, ((0, 0), (1, 0)))[:, :-1],
          'decoder_target_tokens': t}, bs)
      out[rows] = np.asarray(jax.device_get(fn(params, _shard(batch, mesh))))[:real]
  return out


def _trim(row: np.ndarray) -> list[int]:
  """Ids up to and including the last non-PAD token (EOS for a complete sequence)."""
  nz = np.flatnonzero(row)
  return [int(t) for t in row[:nz[-1] + 1]] if len(nz) else []


def chunk_records(rows: np.ndarray, task_data, samples: Mapping[str, np.ndarray],
                  ref_scores: np.ndarray, detokenize: Callable, grow_step: int
                  ) -> tuple[list[dict], dict[str, int]]:
  """The records of one chunk (plain dicts, see `RECORD_FIELDS`) and its counts.

  rows: [n] source indices into `task_data`; samples, ref_scores: of those sources, in order.
  """
  enc = task_data.arrays['encoder_input_tokens']
  tgt = task_data.arrays['decoder_target_tokens']
  N = samples['tokens'].shape[1]
  records, c = [], dict(sources=0, samples_drawn=0, samples_kept=0, duplicates_removed=0,
                        reference_records=0, records=0, generated_tokens=0)
  for b, i in enumerate(rows):
    i = int(i)
    src_ids, ref_ids = _trim(enc[i]), _trim(tgt[i])
    cands: dict[tuple, list[int]] = {}  # ids -> candidate indices (insertion order = first j).
    for j in range(N):
      ids = tuple(int(t) for t in samples['tokens'][b, j, :samples['lengths'][b, j]])
      cands.setdefault(ids, []).append(j)
    common = dict(source_index=i, source=task_data.inputs[i], source_ids=src_ids,
                  reference=task_data.targets[i], grow_step=grow_step)
    provenance = f'{task_data.keys[i]}/grow_{grow_step}'
    records.append(dict(common, candidate=task_data.targets[i], candidate_ids=ref_ids,
                        logprob_sampling=float(ref_scores[b]), logprob_policy=float(ref_scores[b]),
                        length=len(ref_ids), candidate_index=-1, origin='reference',
                        key=f'{provenance}/reference',
                        num_duplicates=len(cands.get(tuple(ref_ids), ()))))
    for ids, js in cands.items():
      j = js[0]
      records.append(dict(common, candidate=detokenize(list(ids)), candidate_ids=list(ids),
                          logprob_sampling=float(samples['logprob_sampling'][b, j]),
                          logprob_policy=float(samples['logprob_policy'][b, j]),
                          length=len(ids), candidate_index=j, origin='sample',
                          key=f'{provenance}/sample_{j}', num_duplicates=len(js)))
    for name, v in dict(sources=1, samples_drawn=N, samples_kept=len(cands), reference_records=1,
                        duplicates_removed=N - len(cands), records=1 + len(cands),
                        generated_tokens=int(samples['lengths'][b].sum())).items():
      c[name] += v
  return records, c


# -- TFRecord edge (TensorFlow imported lazily) ----------------------------------------------------

def _to_example(record: Mapping[str, Any]):
  import tensorflow as tf
  feats = {}
  for name in RECORD_FIELDS:
    v = record[name]
    v = list(v) if name in LIST_FIELDS else [v]
    if name in INT_FIELDS:
      feats[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=v))
    elif name in FLOAT_FIELDS:
      feats[name] = tf.train.Feature(float_list=tf.train.FloatList(value=v))
    else:
      feats[name] = tf.train.Feature(bytes_list=tf.train.BytesList(
          value=[s.encode('utf-8') for s in v]))
  return tf.train.Example(features=tf.train.Features(feature=feats))


def write_records(path: str, records: Sequence[Mapping[str, Any]]) -> None:
  """Writes `records` as `tf.train.Example`s (deterministic serialisation) to `path` atomically."""
  import tensorflow as tf
  tmp = path + '.tmp'
  with tf.io.TFRecordWriter(tmp) as w:
    for r in records:
      w.write(_to_example(r).SerializeToString(deterministic=True))
  os.replace(tmp, path)


def _parse(raw: bytes) -> dict[str, Any]:
  import tensorflow as tf
  ex = tf.train.Example.FromString(raw)
  out = {}
  for name, f in ex.features.feature.items():
    kind = f.WhichOneof('kind')
    vals = list(getattr(f, kind).value)
    if kind == 'bytes_list':
      vals = [v.decode('utf-8') for v in vals]
    out[name] = vals if name in LIST_FIELDS else vals[0]
  return out


def _marker(chunk_path: str) -> str:
  m = _CHUNK_RE.search(os.path.basename(chunk_path))
  return os.path.join(os.path.dirname(chunk_path), f'grow-{m.group(1)}.done')


def read_chunked_records(out_dir: str, *, pattern: str, chunk_re, marker: Callable[[str], str],
                         read: Callable[[str], Any], what: str, command: str
                         ) -> list[dict[str, Any]]:
  """All records of a finished chunked output (Grow, scoring), by chunk file name, in file order.

  Args:
    out_dir: the output directory (holds `manifest.json`, written last, and the chunk files).
    pattern: glob of the chunk files in it; `chunk_re` must also match their base names.
    marker: chunk path -> its completion marker's path.
    read: chunk path -> its records.
    what, command: for the messages ('Grow', 'rest-jax grow').

  Raises:
    FileNotFoundError: no `manifest.json` (unfinished), a chunk file without its completion
      marker, or another number of chunk files than the manifest counts.
  """
  manifest_path = os.path.join(out_dir, 'manifest.json')
  if not os.path.exists(manifest_path):
    raise FileNotFoundError(f'{manifest_path} missing: the {what} in {out_dir} is unfinished '
                            f'(rerun `{command}` to resume it) or this is no {what} dir')
  with open(manifest_path) as f:
    manifest = json.load(f)
  files = sorted(p for p in glob.glob(os.path.join(out_dir, pattern))
                 if chunk_re.search(os.path.basename(p)))
  for p in files:
    if not os.path.exists(marker(p)):
      raise FileNotFoundError(f'chunk {p} has no completion marker {marker(p)}: it may be '
                              f'partial; rerun `{command}` to redo it')
  if len(files) != manifest['counts']['chunks']:
    raise FileNotFoundError(f'{out_dir}: {len(files)} chunk files, manifest says '
                            f"{manifest['counts']['chunks']}")
  return [r for p in files for r in read(p)]


def read_grow_records(grow_dir: str) -> list[dict[str, Any]]:
  """All records of a finished Grow, sorted by chunk file name, then in file order.

  Returns dicts with the `RECORD_FIELDS` (text fields as str, `*_ids` as lists of int).

  Raises:
    FileNotFoundError: as `read_chunked_records` (Grow unfinished, a chunk without its marker).
  """
  import tensorflow as tf
  return read_chunked_records(
      grow_dir, pattern='grow-*-of-*.tfrecord', chunk_re=_CHUNK_RE, marker=_marker,
      read=lambda p: [_parse(raw) for raw in tf.data.TFRecordDataset(p).as_numpy_iterator()],
      what='Grow', command='rest-jax grow')


# -- the command -----------------------------------------------------------------------------------

def _check_settings(output_dir: str, settings: dict, settings_hash: str,
                    what: str = 'a Grow') -> None:
  """Writes `settings.json`, or raises ValueError if `output_dir` holds `what` with others."""
  path = os.path.join(output_dir, 'settings.json')
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old.get('settings_hash') != settings_hash:
      prev = old.get('settings', {})
      diff = sorted(k for k in set(prev) | set(settings) if prev.get(k) != settings.get(k))
      raise ValueError(f'{output_dir} holds {what} with other settings ({", ".join(diff)}: ' +
                       '; '.join(f'{k} {prev.get(k)!r} -> {settings.get(k)!r}' for k in diff) +
                       '); use another output dir instead of mixing outputs')
  elif jax.process_index() == 0:
    trainer_lib.write_json(path, {'settings': settings, 'settings_hash': settings_hash})


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
    policy_dir: a run dir of `rest-jax train` (best params, else the latest checkpoint).
    task, split: SeqIO task and split whose sources are grown (the paper grows the train split).
    num_decodes: N samples per source. temperature, topk, topp: sampling (paper: T = 0.8).
    max_decode_len: tokens per sample incl. EOS.
    decode_length_ratio: a sample of a source in length bucket s has at most
      min(max_decode_len, ratio * s) tokens (`data.decode_length`; None: max_decode_len).
    batch_size: sources per decoding batch (see `sample_candidates`); not part of the settings
      (it does not change which samples are drawn).
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
    mesh: decoding mesh (default: this host's devices, `create_mesh` partitions). Each host grows
      the sources with index % process_count == process_index on its own devices.
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
  os.makedirs(output_dir, exist_ok=True)
  if task_data is None:
    cache = os.path.join(os.path.dirname(os.path.abspath(output_dir)), 'cache')
    task_data = input_pipeline.cached_task_data(
        task, split, inputs_length, targets_length, cache,
        max_examples=max_sources if source_every == 1 else None)
  if source_every > 1:
    task_data = task_data.take(np.arange(0, len(task_data), source_every))
  if max_sources is not None:
    task_data = task_data.subset(max_sources)
  num_sources = len(task_data)
  p, P = jax.process_index(), jax.process_count()
  settings = dict(policy_dir=os.path.abspath(policy_dir) if policy_dir else None, task=task,
                  split=split, num_decodes=num_decodes, temperature=float(temperature), topk=topk,
                  topp=float(topp), max_decode_len=max_decode_len,
                  decode_length_ratio=decode_length_ratio, chunk_size=chunk_size, seed=seed,
                  grow_step=grow_step, max_sources=max_sources,
                  source_every=source_every, num_sources=num_sources,
                  inputs_length=inputs_length, targets_length=targets_length,
                  process_count=P, model_config=repr(model.config))
  this_seed = sample_seed(seed, grow_step)
  if grow_step > 1:  # (Grow 1's settings, and so its hash, are as they were before this key.)
    settings['sample_seed'] = this_seed
  settings_hash = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
  _check_settings(output_dir, settings, settings_hash)
  manifest_path = os.path.join(output_dir, 'manifest.json')
  if os.path.exists(manifest_path):
    with open(manifest_path) as f:
      logging.info('grow: %s is complete', output_dir)
      return json.load(f)

  # Host p grows sources p, p + P, ...; its j-th chunk is chunk j * P + p of K (contiguous ids,
  # since hosts with a higher p never have more chunks).
  host_chunks = [np.arange(q, num_sources, P) for q in range(P)]
  host_chunks = [[s[i:i + chunk_size] for i in range(0, len(s), chunk_size)] for s in host_chunks]
  K = sum(len(c) for c in host_chunks)
  names = {j * P + p: f'grow-{j * P + p:05d}-of-{K:05d}' for j in range(len(host_chunks[p]))}
  todo = [(j, k) for j, k in enumerate(names)
          if not os.path.exists(os.path.join(output_dir, f'grow-{k:05d}.done'))]
  logging.info('grow: %d sources, %d chunks (%d on this host to do) -> %s', num_sources, K,
               len(todo), output_dir)

  mesh = mesh if mesh is not None else partitioning.create_mesh(devices=jax.local_devices())
  if detokenize is None:
    input_pipeline.check_vocab_size(task, model.config.vocab_size)
    detokenize = input_pipeline.detokenizer(task)
  if todo:
    abstract = trainer_lib.abstract_params(model, mesh)
    if params is None:
      if not policy_dir:
        raise ValueError('grow needs a policy_dir (or params)')
      params = trainer_lib.restore_params(policy_dir, abstract)
    else:
      params = jax.device_put(nn.meta.unbox(params), jax.tree.map(lambda a: a.sharding, abstract))

  total = sum(len(host_chunks[p][j]) for j, _ in todo)
  bar = tqdm(total=total, desc=f'grow {grow_step}', unit='src', dynamic_ncols=True,
             mininterval=2.0, disable=p != 0)
  drawn, tokens, decode_seconds = 0, 0, 0.0
  for done, (j, k) in enumerate(todo):
    rows = host_chunks[p][j]
    path = os.path.join(output_dir, names[k] + '.tfrecord')
    if os.path.exists(path + '.tmp'):
      os.remove(path + '.tmp')  # Partial file of a killed run: redo the chunk from scratch.
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
                                batch_size=batch_size,
                                progress=progress)
    ref = score_references(model, params, enc, task_data.arrays['decoder_target_tokens'][rows],
                           mesh=mesh, batch_size=batch_size)
    decode_seconds += time.perf_counter() - t0
    records, counts = chunk_records(rows, task_data, samples, ref, detokenize, grow_step)
    drawn += counts['samples_drawn']
    tokens += counts['generated_tokens']
    write_records(path, records)
    trainer_lib.write_json(os.path.join(output_dir, f'grow-{k:05d}.done'), counts)
    if _stop_after_chunks is not None and done + 1 >= _stop_after_chunks:
      raise GrowInterrupted(f'stopped after {done + 1} chunks (test hook)')
  bar.close()

  if P > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('rest_jax.grow.done')
  counts: dict[str, int] = {}
  for k in range(K):
    with open(os.path.join(output_dir, f'grow-{k:05d}.done')) as f:
      counts = {n: counts.get(n, 0) + v for n, v in json.load(f).items()}
  counts['chunks'] = K
  wall = time.perf_counter() - start
  manifest = dict(policy_dir=settings['policy_dir'], task=task, split=split, settings=settings,
                  settings_hash=settings_hash, counts=counts,
                  chunks_resumed=len(names) - len(todo),
                  wall_seconds=wall, decode_seconds=decode_seconds,
                  generated_tokens_this_run=tokens,
                  generated_tokens_per_second=tokens / max(decode_seconds, 1e-9))
  if p == 0:
    trainer_lib.write_json(manifest_path, manifest)
  logging.info('grow: %d records (%d samples kept of %d, %d references) in %.0f s, %.0f tok/s',
               counts['records'], counts['samples_kept'], counts['samples_drawn'],
               counts['reference_records'], wall, manifest['generated_tokens_per_second'])
  return manifest
