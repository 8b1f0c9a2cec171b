"""Strict readers for parallel text: every bad line is an error that names the file and line.

Used by the SeqIO tasks in `tasks/translation.py`. Pure Python (no TensorFlow): the corpora shipped
with the repo are small enough (tens of thousands of pairs) to validate fully in memory before they
become a `tf.data.Dataset`, which is what lets an error say *where* the input is bad.

Errors raised (all subclasses of `CorpusError`, itself a `ValueError`):
  * `CorpusFileNotFound` -- the file is missing; the message says how to build or fetch it.
  * `CorpusFormatError` -- corrupt gzip, non-UTF-8 bytes, a wrong number of tab-separated
    fields, an empty side, or mismatched line counts between two aligned text files.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from typing import Iterator


class CorpusError(ValueError):
  """Base class of the errors raised on bad corpus input."""


class CorpusFileNotFound(CorpusError, FileNotFoundError):
  """A corpus file is missing."""


class CorpusFormatError(CorpusError):
  """A corpus file is malformed; the message names the file and the 1-based line."""


@dataclasses.dataclass(frozen=True)
class Pair:
  source: str
  target: str
  key: str  # Where the pair comes from (`path#id#occurrence` for LibreOffice, `file:line` else).


def _open_text_lines(path: str) -> Iterator[tuple[int, bytes]]:
  """Yields (1-based line number, raw line without the newline); handles `.gz`."""
  if not os.path.exists(path):
    raise CorpusFileNotFound(f'{path}: no such corpus file')
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      for lineno, raw in enumerate(f, start=1):
        yield lineno, raw.rstrip(b'\n').rstrip(b'\r')
  except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError.
    raise CorpusFormatError(f'{path}: corrupt or truncated file ({e})') from e


def _decode(path: str, lineno: int, raw: bytes) -> str:
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise CorpusFormatError(
        f'{path}:{lineno}: not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r})') from e


def read_tsv_pairs(path: str, num_fields: int = 3) -> list[Pair]:
  """Reads a (gzipped) TSV of `source<TAB>target[<TAB>key]` lines.

  Args:
    path: `.tsv` or `.tsv.gz` file.
    num_fields: exact number of tab-separated fields per line (2 or 3).

  Returns:
    One `Pair` per line, in file order.

  Raises:
    CorpusFileNotFound: `path` does not exist.
    CorpusFormatError: corrupt gzip, non-UTF-8 bytes, a line with another number of fields, or an
      empty (whitespace-only) source or target; the message names `path` and the line.
  """
  pairs = []
  for lineno, raw in _open_text_lines(path):
    line = _decode(path, lineno, raw)
    fields = line.split('\t')
    if len(fields) != num_fields:
      raise CorpusFormatError(
          f'{path}:{lineno}: expected {num_fields} tab-separated fields, found {len(fields)}')
    source, target = fields[0].strip(), fields[1].strip()
    if not source or not target:
      side = 'source' if not source else 'target'
      raise CorpusFormatError(f'{path}:{lineno}: empty {side}')
    key = fields[2] if num_fields > 2 else f'{os.path.basename(path)}:{lineno}'
    pairs.append(Pair(source, target, key))
  if not pairs:
    raise CorpusFormatError(f'{path}: no pairs (empty file)')
  return pairs


def read_aligned_text(source_path: str, target_path: str) -> list[Pair]:
  """Reads two line-aligned plain-text files (fairseq style `train.de` / `train.en`).

  Raises:
    CorpusFileNotFound: either file is missing.
    CorpusFormatError: non-UTF-8 bytes, an empty line on either side, or a different number of
      lines; the message names the file and the line.
  """
  src = [(n, _decode(source_path, n, r)) for n, r in _open_text_lines(source_path)]
  tgt = [(n, _decode(target_path, n, r)) for n, r in _open_text_lines(target_path)]
  if len(src) != len(tgt):
    raise CorpusFormatError(
        f'{source_path} has {len(src)} lines but {target_path} has {len(tgt)}: not aligned')
  pairs = []
  for (lineno, s), (_, t) in zip(src, tgt):
    if not s.strip():
      raise CorpusFormatError(f'{source_path}:{lineno}: empty source')
    if not t.strip():
      raise CorpusFormatError(f'{target_path}:{lineno}: empty target')
    pairs.append(Pair(s.strip(), t.strip(), f'{os.path.basename(source_path)}:{lineno}'))
  return pairs
