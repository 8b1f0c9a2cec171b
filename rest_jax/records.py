"""Record I/O of every stage: TFRecord chunks, `.done` markers, manifests, versioned settings.

Grow (`rest_jax.grow`), scoring (`rest_jax.rewards.scoring`), Improve, reward-model training and
the reward checks read and write their datasets through this module only. An output directory
holds

  * `settings.json`, written first: the settings that determine the output, their sha256 and
    where and how they were written (see "Settings schema" below);
  * chunks `<prefix>-KKKKK-of-NNNNN.tfrecord` (one `tf.train.Example` per record, serialised
    deterministically; written to `<name>.tmp`, then renamed), each followed by its completion
    marker `<prefix>-KKKKK.done` (JSON: the chunk's counts, and under `MARKER_FILE_KEY` the chunk
    file's name, size in bytes and sha256). A chunk without its marker is redone from scratch,
    so a killed run resumes to files byte-identical to an uninterrupted run's;
  * `manifest.json`, written last: a summary of the markers.

Markers, not the manifest, decide what is done: an output is finished when every chunk's marker
is there and its chunk verifies (`verify_chunk`: the file exists with the size and sha256 its
marker records; markers written before this check existed record no digest and are trusted by
existence). A chunk whose marker is missing is simply redone (and the manifest rewritten); a
marker whose chunk is missing, cut short or altered raises `CorruptChunkError`, naming the file
and the command that regenerates that chunk only (the same command with `--repair`, which sets
`set_repair(True)`: the bad chunk and its marker are deleted and redone).

Paths may be local or URLs (`rest_jax.fileio`); TensorFlow is imported lazily, in the functions
that write or read TFRecords.

Records (`RECORD_FIELDS`, as written by Grow; scoring adds float fields such as `reward`): int64
`source_index`, `source_ids` (list), `candidate_ids` (list), `length` (tokens incl. EOS),
`grow_step`, `candidate_index` (-1 for the reference), `num_duplicates`; float32
`logprob_sampling`, `logprob_policy` (nats); bytes (UTF-8) `source`, `reference`, `candidate`,
`origin` ('reference' / 'sample'), `key`.

Record format (`RECORD_FORMAT`, stored in the settings of every record directory):
  1: a reference record's `logprob_sampling` holds the untempered policy score of the reference
     (equal to `logprob_policy`), although the reference was never sampled.
  2 (current): that field is NaN for reference records: no importance weight can be formed for a
     sequence the sampler did not draw. Samples are unchanged. `logprob_policy` is the policy
     score in both formats.

Settings schema (`SCHEMA_VERSION`):
  1 (no `schema_version` key): {'settings', 'settings_hash'}; paths absolute; `process_count`
     inside the hashed settings.
  2 (current): {'schema_version': 2, 'settings': {..., 'record_format': F}, 'settings_hash':
     sha256 of the canonical JSON of 'settings', 'location': {'output_dir', 'process_count'}}.
     Paths are recorded relative to the work directory (the output directory's parent) when
     inside it (`fileio.portable_path`); the host count and the location are outside the hash.
  A directory written under schema 1 resumes: its settings are migrated in memory (paths made
  relative, `process_count` moved out, record format 1) and compared with the new ones; the file
  is not rewritten and the directory keeps its hash and record format, so every chunk a resumed
  run adds is what the schema-1 code would have written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Iterator, Mapping, Sequence

from rest_jax import fileio

SCHEMA_VERSION = 2
RECORD_FORMAT = 2
WRITABLE_RECORD_FORMATS = (1, 2)  # A resumed directory keeps the format it was started with.
SETTINGS_FILE = 'settings.json'
MANIFEST_FILE = 'manifest.json'
MARKER_FILE_KEY = '_file'  # In a marker: {'name', 'bytes', 'sha256'} of its chunk file.
LOCATION_KEYS = ('process_count',)  # Schema 1 hashed these; schema 2 keeps them in 'location'.

INT_FIELDS = ('source_index', 'source_ids', 'candidate_ids', 'length', 'grow_step',
              'candidate_index', 'num_duplicates')
FLOAT_FIELDS = ('logprob_sampling', 'logprob_policy')
BYTES_FIELDS = ('source', 'reference', 'candidate', 'origin', 'key')
LIST_FIELDS = ('source_ids', 'candidate_ids')  # The other fields are scalars.
RECORD_FIELDS = INT_FIELDS + FLOAT_FIELDS + BYTES_FIELDS


@dataclasses.dataclass(frozen=True)
class ChunkKind:
  """A kind of chunked output: file prefix, and the names used in messages."""
  prefix: str   # 'grow' -> grow-00000-of-00004.tfrecord, grow-00000.done
  what: str     # 'Grow'
  command: str  # 'rest-jax grow'

  @property
  def chunk_re(self):
    return re.compile(rf'{self.prefix}-(\d{{5}})-of-(\d{{5}})\.tfrecord$')


GROW = ChunkKind('grow', 'Grow', 'rest-jax grow')
SCORED = ChunkKind('scored', 'scoring', 'rest-jax score')


# -- tf.train.Example ------------------------------------------------------------------------------

def to_example(record: Mapping[str, Any], extra_float_fields: Sequence[str] = ()):
  """`record` (the `RECORD_FIELDS`, plus float `extra_float_fields`) as a `tf.train.Example`."""
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
  ex = tf.train.Example(features=tf.train.Features(feature=feats))
  for name in extra_float_fields:
    ex.features.feature[name].float_list.value.append(float(record[name]))
  return ex


def parse(raw: bytes) -> dict[str, Any]:
  """A serialised record -> dict (text fields as str, `LIST_FIELDS` as lists, others scalars)."""
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


def write_records(path: str, records: Sequence[Mapping[str, Any]],
                  extra_float_fields: Sequence[str] = ()) -> None:
  """Writes `records` (deterministic serialisation) to the TFRecord file `path` atomically.

  A write that fails part-way (e.g. `OSError` ENOSPC) removes the temporary file and re-raises.
  """
  import tensorflow as tf
  # Locally `<path>.tmp`, one name for every process: chunks are claimed, so one writer at a
  # time, and a rerun removes a killed run's partial file. A URL is written through a local
  # file (TensorFlow's writer knows only the `gs://` of the URL schemes).
  with fileio.staged_write(path, tmp=path + '.tmp') as tmp:
    with tf.io.TFRecordWriter(tmp) as w:
      for r in records:
        w.write(to_example(r, extra_float_fields).SerializeToString(deterministic=True))


def read_records(path: str) -> list[dict[str, Any]]:
  """All records of one TFRecord file, in file order (`parse`).

  Raises:
    CorruptChunkError: the file is corrupt or cut short (names it and the index of the first
      record that cannot be read).
  """
  import tensorflow as tf
  out = []
  try:
    with fileio.local_copy(path) as local:
      for raw in tf.data.TFRecordDataset(local).as_numpy_iterator():
        out.append(parse(raw))
  except tf.errors.DataLossError as e:
    raise CorruptChunkError(f'{path} is corrupt or truncated at record {len(out)} '
                            f'({e.message.splitlines()[0]})', path=path) from e
  return out


# -- chunked outputs -------------------------------------------------------------------------------

class CorruptChunkError(ValueError):
  """A chunk file that is missing behind its marker, cut short or altered.

  Attributes: `path` (the chunk file), `chunk` (its index, or None).
  """

  def __init__(self, message: str, path: str, chunk: int | None = None):
    super().__init__(message)
    self.path, self.chunk = path, chunk


_REPAIR = False


def set_repair(on: bool) -> None:
  """`--repair`: delete and redo a corrupt chunk (and its marker) instead of raising."""
  global _REPAIR
  _REPAIR = bool(on)


def repair_enabled() -> bool:
  return _REPAIR


def chunk_path(out_dir: str, kind: ChunkKind, k: int, num_chunks: int) -> str:
  return os.path.join(out_dir, f'{kind.prefix}-{k:05d}-of-{num_chunks:05d}.tfrecord')


def marker_path(out_dir: str, kind: ChunkKind, k: int) -> str:
  return os.path.join(out_dir, f'{kind.prefix}-{k:05d}.done')


def file_digest(path: str) -> dict[str, Any]:
  """{'name': basename, 'bytes': size, 'sha256': hex digest} of the file `path`."""
  h, n = hashlib.sha256(), 0
  with fileio.open_file(path, 'rb') as f:
    while block := f.read(1 << 22):
      h.update(block)
      n += len(block)
  return {'name': os.path.basename(path), 'bytes': n, 'sha256': h.hexdigest()}


def _repair_hint(kind: ChunkKind, k: int) -> str:
  return (f'rerun the same command (`{kind.command}`, or the loop that ran it) with --repair '
          f'to regenerate chunk {k} only')


def verify_chunk(out_dir: str, kind: ChunkKind, k: int, num_chunks: int,
                 repair: bool | None = None) -> bool:
  """Whether chunk k is done: its marker exists and its file matches the marker.

  Returns False when there is no marker (the chunk is to do). With `repair` (None: as
  `set_repair`) a chunk that fails the check is deleted with its marker (and the manifest) and
  False is returned.

  Raises:
    CorruptChunkError: a marker whose chunk file is missing, or has another size or sha256 than
      the marker records (names the file, what differs and the repair command).
  """
  marker = marker_path(out_dir, kind, k)
  if not fileio.exists(marker):
    return False
  path = chunk_path(out_dir, kind, k, num_chunks)
  try:
    expected = fileio.read_json(marker).get(MARKER_FILE_KEY)
    problem = None
  except ValueError as e:  # A marker cut short (not written atomically by older code).
    expected, problem = None, str(e)
  if problem is None:
    if not fileio.exists(path):
      problem = f'{path} is missing behind its completion marker {marker}'
    elif expected is not None:
      got = file_digest(path)
      if got['bytes'] != expected['bytes']:
        problem = (f'{path} has {got["bytes"]} bytes, its marker records {expected["bytes"]} '
                   '(cut short or overwritten)')
      elif got['sha256'] != expected['sha256']:
        problem = f'{path} differs from its marker (sha256 {got["sha256"][:12]}..., recorded '\
                  f'{expected["sha256"][:12]}...: altered on disk)'
  if problem is None:
    return True
  if _REPAIR if repair is None else repair:
    import logging
    logging.warning('repair: %s; deleting chunk %d and its marker to redo it', problem, k)
    for p in (path, marker, os.path.join(out_dir, MANIFEST_FILE)):
      fileio.remove(p)
    return False
  raise CorruptChunkError(f'{problem}; {_repair_hint(kind, k)}', path=path, chunk=k)


def is_done(out_dir: str, kind: ChunkKind, k: int, num_chunks: int | None = None) -> bool:
  """Whether chunk k has its marker (and, given `num_chunks`, verifies: `verify_chunk`)."""
  if num_chunks is None:
    return fileio.exists(marker_path(out_dir, kind, k))
  return verify_chunk(out_dir, kind, k, num_chunks)


def write_chunk(out_dir: str, kind: ChunkKind, k: int, num_chunks: int,
                records: Sequence[Mapping[str, Any]], counts: Mapping[str, Any],
                extra_float_fields: Sequence[str] = ()) -> None:
  """Chunk k's records, then its completion marker: `counts` and the file's size and sha256
  (both written atomically)."""
  path = chunk_path(out_dir, kind, k, num_chunks)
  write_records(path, records, extra_float_fields)
  fileio.write_json(marker_path(out_dir, kind, k),
                    dict(counts, **{MARKER_FILE_KEY: file_digest(path)}))


# -- sharing the chunks of an output between workers ------------------------------------------

CLAIMS_DIR = '.claims'


def _try_claim(path: str):
  """An open fd holding an exclusive `flock` on `path`, or None if another process holds it."""
  import fcntl
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    return None
  except OSError as e:
    os.close(fd)
    raise OSError(f'{path}: the file system does not support locks ({e}); share chunks between '
                  'workers on a local or NFSv4 directory') from e
  return fd


def claim_chunks(out_dir: str, kind: ChunkKind, num_chunks: int, *,
                 poll_seconds: float = 1.0) -> Iterator[int]:
  """Yields the chunks of `out_dir` that this process is to make, each claimed while it is made.

  The one way the chunks of a Grow or a scoring are shared: between the hosts of a multi-host
  job and between independent worker processes (`REST_JAX_JOB_ID`, `rest_jax.joblock`) alike.
  Chunk k is a fixed range of sources, so it does not matter which worker makes it.

  A claim is an exclusive `fcntl.flock` on `<out_dir>/.claims/<prefix>-KKKKK.claim`, held from
  the moment chunk k is yielded until the caller asks for the next one (by then it has written
  the chunk and its marker, `write_chunk`). The kernel releases the lock when its holder dies, so
  a worker killed mid-chunk loses only that chunk: another worker, still waiting for it, claims
  and redoes it. Chunks that verify are never yielded (their markers are checked once, at the
  start; later markers were just written by live workers). The generator returns when every chunk
  has its marker: a worker with nothing left to claim waits (polling every `poll_seconds`) for the
  chunks that others hold, so that each worker ends only when the output is complete, and any
  of them can then write the manifest.

  On an object store (a URL `out_dir`), which has no locks, there are no claims: host p of P
  (`jax.process_index()`, `jax.process_count()`) makes the chunks with k % P == p and returns
  without waiting (hosts then meet at a barrier). Independent workers need a shared POSIX file
  system (local, NFSv4).

  Raises:
    CorruptChunkError: as `verify_chunk` (a done chunk that fails its marker, without --repair).
    OSError: the file system does not support locks.
  """
  import time
  if fileio.is_url(out_dir):
    import jax
    p, P = jax.process_index(), jax.process_count()
    yield from [k for k in range(num_chunks)
                if k % P == p and not verify_chunk(out_dir, kind, k, num_chunks)]
    return
  claims = os.path.join(out_dir, CLAIMS_DIR)
  os.makedirs(claims, exist_ok=True)
  pending = [k for k in range(num_chunks) if not verify_chunk(out_dir, kind, k, num_chunks)]
  waited = False
  while pending:
    for k in list(pending):
      if fileio.exists(marker_path(out_dir, kind, k)):
        pending.remove(k)
        continue
      fd = _try_claim(os.path.join(claims, f'{kind.prefix}-{k:05d}.claim'))
      if fd is None:
        continue  # Another worker is making it.
      try:
        if not fileio.exists(marker_path(out_dir, kind, k)):  # Finished since the check above?
          yield k
        pending.remove(k)
      finally:
        os.close(fd)  # Releases the claim.
    if pending:
      if not waited:
        import logging
        logging.info('%s: waiting for chunks %s, made by other workers', kind.what, pending)
        waited = True
      time.sleep(poll_seconds)


def read_marker(out_dir: str, kind: ChunkKind, k: int) -> dict[str, Any]:
  """Chunk k's counts (its marker without the file digest)."""
  marker = fileio.read_json(marker_path(out_dir, kind, k))
  marker.pop(MARKER_FILE_KEY, None)
  return marker


def read_manifest(out_dir: str, kind: ChunkKind) -> dict[str, Any]:
  """`out_dir/manifest.json` of a finished output.

  Raises:
    FileNotFoundError: no manifest (the output is unfinished, or `out_dir` is no such output).
  """
  path = os.path.join(out_dir, MANIFEST_FILE)
  if not fileio.exists(path):
    raise FileNotFoundError(f'{path} missing: the {kind.what} in {out_dir} is unfinished (rerun '
                            f'`{kind.command}` to resume it) or this is no {kind.what} dir')
  return fileio.read_json(path)


def finished_manifest(out_dir: str, kind: ChunkKind | None = None) -> dict[str, Any] | None:
  """The manifest if `out_dir` is complete, else None.

  Given `kind`, complete means every chunk the manifest counts verifies (`verify_chunk`; the
  markers decide): a manifest whose chunks lost a marker is stale and None is returned, so the
  caller redoes those chunks and writes the manifest again.

  Raises:
    CorruptChunkError: as `verify_chunk` (a marker whose chunk is missing or altered).
  """
  path = os.path.join(out_dir, MANIFEST_FILE)
  if not fileio.exists(path):
    return None
  manifest = fileio.read_json(path)
  if kind is not None:
    K = manifest['counts']['chunks']
    if not all([verify_chunk(out_dir, kind, k, K) for k in range(K)]):
      return None
  return manifest


def verify_output(out_dir: str, kind: ChunkKind, repair: bool | None = False) -> None:
  """Checks a finished chunked output (every chunk against its marker; `repair` as
  `verify_chunk`, default off: a reader does not delete what another stage wrote).

  Raises:
    FileNotFoundError: no manifest, or a chunk without its marker (the output is incomplete:
      rerun the command that wrote it to redo that chunk).
    CorruptChunkError: as `verify_chunk`.
  """
  manifest = read_manifest(out_dir, kind)
  K = manifest['counts']['chunks']
  for k in range(K):
    if not verify_chunk(out_dir, kind, k, K, repair=repair):
      raise FileNotFoundError(f'chunk {chunk_path(out_dir, kind, k, K)} has no completion '
                              f'marker {marker_path(out_dir, kind, k)}: it may be partial or '
                              f'missing; rerun `{kind.command}` (or the loop) to redo it')


def write_manifest(out_dir: str, manifest: Mapping[str, Any]) -> None:
  fileio.write_json(os.path.join(out_dir, MANIFEST_FILE), manifest)


def chunk_files(out_dir: str, kind: ChunkKind) -> list[str]:
  """The chunk files of `out_dir`, sorted by name (temporary files excluded)."""
  return [p for p in fileio.glob(out_dir, f'{kind.prefix}-*-of-*.tfrecord')
          if kind.chunk_re.search(os.path.basename(p))]


def read_chunked(out_dir: str, kind: ChunkKind) -> list[dict[str, Any]]:
  """All records of a finished chunked output, by chunk index, then in file order.

  Raises:
    FileNotFoundError: no `manifest.json` (unfinished) or a chunk without its marker.
    CorruptChunkError: a chunk missing behind its marker, or altered or cut short (names the
      file, the record index where reading failed, and the repair command).
  """
  manifest = read_manifest(out_dir, kind)
  verify_output(out_dir, kind)
  K = manifest['counts']['chunks']
  out = []
  for k in range(K):
    try:
      out += read_records(chunk_path(out_dir, kind, k, K))
    except CorruptChunkError as e:
      raise CorruptChunkError(f'{e}; {_repair_hint(kind, k)}', path=e.path, chunk=k) from e
  return out


def sum_counts(out_dir: str, kind: ChunkKind, num_chunks: int) -> dict[str, Any]:
  """The markers' counts of chunks 0..num_chunks-1 summed key by key (numbers only)."""
  total: dict[str, Any] = {}
  for k in range(num_chunks):
    for name, v in read_marker(out_dir, kind, k).items():
      total[name] = total.get(name, 0) + v
  return total


# -- settings --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Pinned:
  """The settings an output directory is pinned to (`pin_settings`)."""
  settings: dict[str, Any]   # As hashed: portable paths, 'record_format'.
  settings_hash: str         # sha256 hex of the canonical JSON (schema 1 dirs: their old hash).
  record_format: int         # The format this directory's records are written in.
  schema_version: int        # Of its settings.json.


def settings_hash(settings: Mapping[str, Any]) -> str:
  """sha256 hex of `settings` as canonical JSON (sorted keys)."""
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def workdir_of(output_dir: str) -> str:
  """The work directory of a stage's output dir: its parent (`<workdir>/grow_1`)."""
  return fileio.parent(output_dir)


def portable_settings(settings: Mapping[str, Any], workdir: str, path_keys: Sequence[str],
                      stored: bool = False) -> dict[str, Any]:
  """`settings` with the values of `path_keys` as `fileio.portable_path`s, JSON-normalised.

  stored: the settings come from a file, where a relative path is already relative to the work
  directory (only absolute ones are converted); else relative paths are the caller's (cwd).
  """
  out = json.loads(json.dumps(dict(settings)))
  for k in path_keys:
    v = out.get(k)
    if v is not None and not (stored and not os.path.isabs(v) and not fileio.is_url(v)):
      out[k] = fileio.portable_path(v, workdir)
  return out


def migrate_v1(old: Mapping[str, Any], workdir: str, path_keys: Sequence[str]) -> dict[str, Any]:
  """Schema-1 settings as schema 2 would record them: portable paths, no `LOCATION_KEYS`,
  `record_format` 1.

  Raises:
    ValueError: the directory was written by several hosts (schema 1 assigned chunks to hosts
      by the host count; resume it with the code that wrote it or start a new directory).
  """
  s = portable_settings(old, workdir, path_keys, stored=True)
  if int(s.get('process_count', 1)) != 1:
    raise ValueError(f"settings written by {s['process_count']} hosts under settings schema 1 "
                     'cannot be resumed by this code (chunks were assigned by host count); use '
                     'a new output directory')
  for k in LOCATION_KEYS:
    s.pop(k, None)
  s['record_format'] = 1
  return s


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """'key old -> new' for every key whose values differ."""
  keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  return [f'{k} {old.get(k)!r} -> {new.get(k)!r}' for k in keys]


def pin_settings(output_dir: str, settings: Mapping[str, Any], *, what: str,
                 path_keys: Sequence[str] = (), process_count: int = 1,
                 write: bool = True) -> Pinned:
  """Pins `output_dir` to `settings`: writes `settings.json` (schema 2) or checks the existing one.

  Args:
    output_dir: a stage's output directory (created if missing).
    settings: JSON-able settings that determine the output (paths as given; the keys in
      `path_keys` are recorded with `fileio.portable_path` relative to `workdir_of(output_dir)`).
      'record_format' is added.
    what: names the output in errors ('a Grow', 'scores').
    process_count: hosts writing it (recorded under 'location', outside the hash).
    write: whether this process writes a new `settings.json` (False on hosts other than 0).

  Returns:
    `Pinned`: the hashed settings, their hash and the record format to write.

  Raises:
    ValueError: `output_dir` holds `what` with other settings (names each differing key), or a
      schema-1 directory that cannot be resumed (`migrate_v1`), or an unknown schema version.
  """
  workdir = workdir_of(output_dir)
  new = portable_settings(settings, workdir, path_keys)
  path = os.path.join(output_dir, SETTINGS_FILE)
  if fileio.exists(path):
    stored = fileio.read_json(path)
    version = stored.get('schema_version', 1)
    if version == 1:
      old = migrate_v1(stored.get('settings', {}), workdir, path_keys)
      old_hash = stored.get('settings_hash')
    elif version == SCHEMA_VERSION:
      old, old_hash = stored['settings'], stored['settings_hash']
    else:
      raise ValueError(f'{path}: settings schema {version} is newer than this code '
                       f'({SCHEMA_VERSION}); update rest-jax')
    fmt = old.get('record_format', RECORD_FORMAT)
    if fmt not in WRITABLE_RECORD_FORMATS:
      raise ValueError(f'{path}: record format {fmt} cannot be written by this code')
    new['record_format'] = fmt
    diff = settings_diff(old, new)
    if diff:
      raise ValueError(f'{output_dir} holds {what} with other settings ({"; ".join(diff)}); use '
                       'another output dir instead of mixing outputs')
    return Pinned(old, old_hash, fmt, version)
  new['record_format'] = RECORD_FORMAT
  h = settings_hash(new)
  if write:
    fileio.makedirs(output_dir)
    fileio.write_json(path, {'schema_version': SCHEMA_VERSION, 'settings': new,
                             'settings_hash': h,
                             'location': {'output_dir': fileio.abspath(output_dir),
                                          'process_count': process_count}})
  return Pinned(new, h, RECORD_FORMAT, SCHEMA_VERSION)


def read_settings(output_dir: str, path_keys: Sequence[str] = ()) -> dict[str, Any]:
  """The settings of `output_dir` (any schema), with the `path_keys` resolved to usable paths
  (`fileio.resolve_path` against the work directory).

  Raises:
    FileNotFoundError: no `settings.json`.
  """
  stored = fileio.read_json(os.path.join(output_dir, SETTINGS_FILE))
  s = dict(stored.get('settings', {}))
  for k in path_keys:
    s[k] = fileio.resolve_path(s.get(k), workdir_of(output_dir))
  return s
