"""Deterministic, resumable batching of tokenized examples held in memory (no TensorFlow).

The corpora ReST trains on here (tens of thousands of pairs, or the kept Grow samples of one Improve
step) fit in host memory as padded int32 arrays, so batching is a pure function of `(seed, step)`:
`batch_at(step)` needs no iterator state, which makes kill-and-resume exact (the resumed run sees
the batches the uninterrupted run would have seen) and lets every host compute its own slice.

Length bucketing: within each epoch, examples are drawn in a seeded random order, cut into pools of
`pool_batches` batches, sorted by length inside a pool and split into batches; the batch order is
then shuffled. Each batch's sequence features (source and target alike) are trimmed to the
smallest of `length_buckets` that holds its longest row, so the train step compiles once per
bucket (a handful of shapes) instead of padding every batch to the longest sentence of the corpus.
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import numpy as np

LENGTH_KEYS = {  # feature -> the feature whose non-zero count gives its length.
    'encoder_input_tokens': 'encoder_input_tokens',
    'decoder_input_tokens': 'decoder_target_tokens',
    'decoder_target_tokens': 'decoder_target_tokens',
    'decoder_loss_weights': 'decoder_target_tokens',
}


def lengths(tokens: np.ndarray) -> np.ndarray:
  """Number of tokens up to the last non-zero one, per row: [n, length] int -> [n] int64."""
  nonzero = tokens != 0
  return np.where(nonzero.any(1), tokens.shape[1] - np.argmax(nonzero[:, ::-1], axis=1), 0)


class ArrayBatcher:
  """Batches of a dict of equally long `[n, length]` arrays, a pure function of the step.

  Args:
    arrays: feature name -> [n, length] array (all features share n).
    batch_size: rows per batch (global batch; every host computes the same global batch and may
      slice its own rows).
    seed: shuffling seed.
    length_buckets: trim each batch's sequence features to the smallest of these lengths (tokens)
      that holds its longest source and target; () disables trimming (full array length).
    pool_batches: batches per sorting pool (1 = no length grouping).

  Raises:
    ValueError: fewer examples than one batch, or features of different sizes.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, seed: int = 0,
               length_buckets: Sequence[int] = (16, 32, 64, 128), pool_batches: int = 32):
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
      raise ValueError(f'features have different numbers of examples: {sizes}')
    self.num_examples = next(iter(sizes.values()))
    if self.num_examples < batch_size:
      raise ValueError(f'{self.num_examples} examples cannot fill one batch of {batch_size}')
    self.arrays = dict(arrays)
    self.batch_size = batch_size
    self.seed = seed
    self.length_buckets = sorted(length_buckets)
    self.pool_batches = max(1, pool_batches)
    self.batches_per_epoch = self.num_examples // batch_size
    self._lengths = {k: lengths(np.asarray(v)) for k, v in self.arrays.items()
                     if k in LENGTH_KEYS and k == LENGTH_KEYS[k]}

  @functools.lru_cache(maxsize=2)
  def _epoch_plan(self, epoch: int) -> np.ndarray:
    """[batches_per_epoch, batch_size] row indices of one epoch."""
    rng = np.random.default_rng([self.seed, epoch])
    order = rng.permutation(self.num_examples)[:self.batches_per_epoch * self.batch_size]
    if self.pool_batches > 1 and self._lengths:
      key = sum(self._lengths.values())
      pool = self.pool_batches * self.batch_size
      chunks = [c[np.argsort(key[c], kind='stable')] for c in np.split(
          order, np.arange(pool, len(order), pool))]
      order = np.concatenate(chunks)
    plan = order.reshape(self.batches_per_epoch, self.batch_size)
    return plan[rng.permutation(self.batches_per_epoch)]

  def batch_at(self, step: int, host_rows: slice | None = None) -> dict[str, np.ndarray]:
    """The batch of training step `step` (0-based); epochs follow each other seamlessly.

    host_rows: only these rows of the global batch (`distributed.host_rows`: a host of a
      multi-host job loads its own rows); the length bucket is still the global batch's.
    """
    epoch, index = divmod(step, self.batches_per_epoch)
    plan = self._epoch_plan(epoch)[index]
    rows = plan if host_rows is None else plan[host_rows]
    batch = {k: np.asarray(v[rows]) for k, v in self.arrays.items()}
    if self.length_buckets:
      longest = max(int(v[plan].max()) for v in self._lengths.values())
      n = bucket_length(longest, self.length_buckets)
      for key in LENGTH_KEYS:
        if key in batch:
          batch[key] = batch[key][:, :n]
    return batch


def bucket_length(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= `length`, or `length` itself if no bucket holds it (never truncates)."""
  return min([b for b in buckets if b >= length], default=length)


def decode_length(source_bucket: int, max_decode_len: int, ratio: float | None) -> int:
  """Decoding steps for sources of one length bucket: min(max_decode_len, ceil(ratio * bucket)).

  The while-loop of a decoding batch runs until its *slowest* row stops, and a sampled row that
  never emits EOS runs to the limit, so the limit sets the cost of the batch. Bounding it by the
  source length is fairseq's `max_len_a * src_len + max_len_b` (here b = 0, at least 16 steps).
  On the LibreOffice help train split, 2 x the source bucket holds 99.99% of the references
  (sources of <= 16 tokens: 2 of 16,468 references are longer than 32 tokens). None: no bound.
  """
  if ratio is None:
    return max_decode_len
  return max(1, min(max_decode_len, max(16, int(np.ceil(ratio * source_bucket)))))


def pad_batch(batch: Mapping[str, np.ndarray], batch_size: int) -> tuple[dict, int]:
  """Pads the first dimension of every feature with zero rows up to `batch_size`.

  Returns:
    (padded batch, number of real rows). Used for the last, partial batch of an evaluation so
    that the jitted step keeps one shape.
  """
  n = len(next(iter(batch.values())))
  if n > batch_size:
    raise ValueError(f'batch of {n} rows does not fit in {batch_size}')
  out = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
         for k, v in batch.items()}
  return out, n


def trim(row: np.ndarray) -> list[int]:
  """A `[length]` int row's ids up to and including the last non-PAD (0) token, as a list
  (through EOS for a complete sequence; [] for an all-PAD row)."""
  nz = np.flatnonzero(row)
  return [int(t) for t in row[:nz[-1] + 1]] if len(nz) else []
