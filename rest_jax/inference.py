"""The one batched-inference helper: length-bucketed, padded, sharded, compiled once per bucket.

Every stage that runs a jitted function over many rows (Grow's sampling and reference scoring,
the reward model's scoring, evaluation's greedy / beam decoding, ReST-EM's solver evaluation)
goes through `run_batched`:

  1. each row gets a length bucket per trimmed feature (`data.bucket_length` of its non-PAD
     length over `buckets`, e.g. 16 / 32 / 64 / 128 tokens);
  2. rows are grouped into batches of at most `batch_size` by one of two policies:
     * `grouping='row'` (Grow, reward scoring): rows with equal buckets share a batch (ordered by
       length inside the bucket), so a row is padded to the bucket of its *own* length: its
       outputs do not depend on which other rows it is batched with, or on chunking, devices or
       hosts;
     * `grouping='sorted'` (evaluation): rows sorted by length (stable) and cut into consecutive
       batches, each trimmed to the bucket of its *longest* row (fewer, fuller batches);
  3. every batch is cut to its buckets, padded with zero rows to the batch size (rounded up to a
     multiple of the mesh's `data` axis) and placed on the mesh (`partitioning.shard_batch`);
  4. `step(buckets, batch)` is called: callers cache one jitted function per bucket (e.g. with
     `functools.lru_cache`), so it compiles once per bucket; its outputs (a dict of
     `[batch, ...]` arrays, or one array) are fetched, cut to the real rows and scattered back
     into row order.

Outputs of batches with different trailing shapes (e.g. decoded tokens `[rows, N, steps]` whose
`steps` depends on the source bucket) are zero-padded at the end of each trailing dimension to
the largest one seen.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from rest_jax import data as data_lib
from rest_jax import partitioning

LENGTH_BUCKETS = (16, 32, 64, 128)
GROUPINGS = ('row', 'sorted')


@contextlib.contextmanager
def mesh_context(mesh):
  """`jax.set_mesh(mesh)` and the logical-axis rules (nothing for mesh None)."""
  if mesh is None:
    yield
    return
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.LOGICAL_AXIS_RULES):
    yield


def global_batch(batch_size: int, mesh) -> int:
  """`batch_size` rounded up to a multiple of the mesh's `data` axis (as is for mesh None)."""
  if mesh is None:
    return batch_size
  d = mesh.shape['data']
  return -(-batch_size // d) * d


def shard(batch: Mapping[str, np.ndarray], mesh) -> dict:
  """A host-local numpy batch placed on `mesh`, split along the batch dimension.

  One host: `partitioning.shard_batch`. Several hosts: the mesh is host-local (each host works on
  its own rows, no lockstep), so each array is `device_put` onto it. mesh None: numpy as is.
  """
  if mesh is None:
    return dict(batch)
  if jax.process_count() == 1:
    return partitioning.shard_batch(dict(batch), mesh)
  return {k: jax.device_put(v, partitioning.batch_sharding(mesh)) for k, v in batch.items()}


def row_buckets(tokens: np.ndarray, buckets: Sequence[int] = LENGTH_BUCKETS) -> np.ndarray:
  """[n, len] int tokens -> [n] int64: the length bucket of each row's own non-PAD length."""
  return np.array([data_lib.bucket_length(max(int(l), 1), buckets)
                   for l in data_lib.lengths(tokens)], np.int64)


def plan_batches(keys: np.ndarray, batch_size: int, grouping: str = 'row',
                 lengths: np.ndarray | None = None) -> list[np.ndarray]:
  """Row positions of each batch.

  Args:
    keys: [n] or [n, m] int, each row's buckets ('row' grouping: rows with equal keys share a
      batch; batches by ascending key, rows inside by ascending `lengths` when given, stable).
    batch_size: rows per batch at most.
    grouping: 'row' or 'sorted' (rows by ascending `lengths`, stable; consecutive batches).
    lengths: [n] sort keys: for 'sorted', and for 'row' inside a bucket (our choice: rows of
      similar source length finish their decodes at similar steps, so a Grow batch idles less).

  Raises:
    ValueError: an unknown grouping.
  """
  keys = np.asarray(keys).reshape(len(keys), -1)
  if grouping == 'row':
    out = []
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    for u in range(len(uniq)):
      rows = np.flatnonzero(inverse == u)
      if lengths is not None:
        rows = rows[np.argsort(np.asarray(lengths)[rows], kind='stable')]
      out += [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    return out
  if grouping == 'sorted':
    order = np.argsort(lengths, kind='stable')
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
  raise ValueError(f'unknown grouping {grouping!r}: use one of {GROUPINGS}')


def _scatter(n: int, parts: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
  """[n, ...] array with parts[i][1] at rows parts[i][0], trailing dims zero-padded to the max."""
  shape = tuple(max(v.shape[d] for _, v in parts) for d in range(1, parts[0][1].ndim))
  out = np.zeros((n,) + shape, parts[0][1].dtype)
  for rows, v in parts:
    out[(rows,) + tuple(slice(0, s) for s in v.shape[1:])] = v
  return out


def run_batched(step: Callable[[tuple[int, ...], dict[str, Any]], Any],
                arrays: Mapping[str, np.ndarray], *, trim: Sequence[str],
                buckets: Sequence[int] = LENGTH_BUCKETS, batch_size: int = 32, mesh=None,
                grouping: str = 'row', bucket_lengths: np.ndarray | None = None,
                progress: Callable[[int], None] | None = None) -> Any:
  """Runs `step` over all rows of `arrays` in length-bucketed, padded, sharded batches.

  Args:
    step: `(buckets, batch) -> outputs`: `buckets` is a tuple with one bucket length (tokens) per
      `trim` feature; `batch` holds every feature of `arrays`, the `trim` ones cut to their bucket,
      all `[global batch, ...]` on the mesh. Outputs: a dict of `[global batch, ...]` arrays or one
      array (jax or numpy).
    arrays: feature -> `[n, ...]` numpy arrays (equal n).
    trim: the `[n, len]` token features (PAD = 0) cut to a length bucket per batch.
    buckets: bucket lengths (tokens); a row longer than every bucket keeps its own length.
    batch_size: rows per batch (rounded up to a multiple of the mesh's `data` axis).
    mesh: a `Mesh(('data', 'model'))` to shard batches over and to run under (its logical-axis
      rules active), or None (unsharded numpy inputs, default device).
    grouping: 'row' (a row padded to its own buckets) or 'sorted' (batch-longest buckets); see
      the module docstring.
    bucket_lengths: [n] lengths to bucket by instead of each `trim` feature's own non-PAD length
      (e.g. the packed source + candidate length of a reward-model input); then every `trim`
      feature gets that one bucket.
    progress: called with the number of rows after each batch.

  Returns:
    The outputs in row order: a dict of `[n, ...]` numpy arrays (or one array).

  Raises:
    ValueError: an unknown grouping; no `trim` feature; no rows.
  """
  if not trim:
    raise ValueError('run_batched needs at least one feature to trim')
  n = len(arrays[trim[0]])
  if bucket_lengths is not None:
    lens = np.stack([np.asarray(bucket_lengths, np.int64)] * len(trim), axis=1)  # [n, m]
  else:
    lens = np.stack([data_lib.lengths(arrays[k]) for k in trim], axis=1)
  bucket = lambda l: data_lib.bucket_length(max(int(l), 1), buckets)
  keys = np.vectorize(bucket, otypes=[np.int64])(lens) if n else lens
  bs = global_batch(batch_size, mesh)
  parts: dict[Any, list] = {}
  with mesh_context(mesh):
    for rows in plan_batches(keys, bs, grouping, lens[:, 0]):
      b = tuple(bucket(lens[rows, j].max()) for j in range(len(trim)))  # 'row': = keys[rows[0]]
      cut = {k: (v[rows, :b[trim.index(k)]] if k in trim else v[rows]) for k, v in arrays.items()}
      batch, real = data_lib.pad_batch(cut, bs)
      out = jax.device_get(step(b, shard(batch, mesh)))
      named = out if isinstance(out, Mapping) else {None: out}
      for k, v in named.items():
        parts.setdefault(k, []).append((rows, np.asarray(v)[:real]))
      if progress:
        progress(len(rows))
  if not parts:
    raise ValueError('run_batched needs at least one row')
  res = {k: _scatter(n, p) for k, p in parts.items()}
  return res[None] if None in res else res
