"""SeqIO problem-solving tasks for ReST-EM (Singh et al. 2023): a problem in, a worked solution out.

Registered on `import tasks`:

| task               | data                                                  | runnable here |
|--------------------|-------------------------------------------------------|---------------|
| `arithmetic_chain` | generated here, seeded (`arithmetic_settings`)        | yes           |
| `gsm8k`            | GSM8K's `train.jsonl` / `test.jsonl` in `GSM8K_DATA_DIR` | where present |

Splits: `train` (the gold SFT set: problems with solutions), `pool` (the E-step's problems; their
`targets` are gold solutions, kept for a control, never for the ReST-EM reward), `validation`,
`test`, and for `arithmetic_chain` also `test_hard` (a harder bucket, for easy-to-hard reporting).
Every example has string features `inputs` (the problem), `targets` (a solution ending
`#### <answer>`, tokenized with EOS = 1 appended) and `key` (where it came from).

`arithmetic_chain`: integer chains solved left to right, e.g.
    inputs   52 + 85 - 16 + 89
    targets  52 + 85 = 137 ; 137 - 16 = 121 ; 121 + 89 = 210 #### 210
    key      arithmetic_chain/test/00042/t4d2      (4 terms of 2 digits: the bucket)
The bucket (terms, digits) is drawn uniformly from 2..5 x 1..2 (`test_hard`: 6 x 2); each number
uniformly with exactly `digits` digits ([1, 9] for one digit), each operator uniformly from + and -;
our choice: a '-' that would make the running total negative becomes '+' (totals stay >= 0).
Splits draw from disjoint random streams and share no expression (`generate_arithmetic_chain`).
Its vocabulary is a 29-piece SentencePiece model in which every digit is its own token, shipped at
`tasks/data/math/spm/arithmetic_chain_29.model` (rebuilt identically if missing).

`gsm8k`: the standard GSM8K files (https://github.com/openai/grade-school-math, `grade_school_math/
data/{train,test}.jsonl`); `validation` is the last 500 lines of `train.jsonl` (our choice: GSM8K
has no dev set), `train` and `pool` the lines before them, `test` is `test.jsonl`. Answers are kept
verbatim (calculator annotations `<<48/2=24>>` and newlines included). Its vocabulary (1,000 pieces,
digits split) is trained on first use into the data folder, as for IWSLT.

Gin: `--gin.tasks.math.arithmetic_settings.seed=1`, `--gin.tasks.math.gsm8k_data_dir.value="DIR"`.
Settings are read when a split is loaded, so bindings parsed after `import tasks` apply.

    python -c 'from tasks import math; math.main()'   # rebuild the shipped vocabulary, print stats
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import re
from typing import Any, Callable, Mapping, Sequence

import gin
import numpy as np
import seqio
import sentencepiece as spm
import tensorflow as tf

from tasks import readers, translation, vocab

TASK_NAMES = ('arithmetic_chain', 'gsm8k')
SPLITS = {'arithmetic_chain': ('train', 'pool', 'validation', 'test', 'test_hard'),
          'gsm8k': ('train', 'pool', 'validation', 'test')}
# Split s draws from np.random.default_rng([seed, SPLIT_ID[s]]): disjoint streams.
SPLIT_ID = {'train': 0, 'pool': 1, 'validation': 2, 'test': 3, 'test_hard': 4}
# De-duplication priority: a later split skips the expressions of every earlier one.
PRIORITY = ('test', 'test_hard', 'validation', 'pool', 'train')
MATH_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'math')
ARITHMETIC_VOCAB_SIZE = 29  # The most BPE pieces the default train split supports.
GSM8K_VOCAB_SIZE = 1000
_GENERATOR_VERSION = 1  # Bump when the generator's code changes what it draws.
# A bucket is given up for the current split when this many draws in a row from it were all
# already used (only tiny buckets, e.g. 2 terms of 1 digit (126 distinct chains), run out).
_MAX_ATTEMPTS = 50


@dataclasses.dataclass(frozen=True)
class Problem:
  inputs: str   # the problem text.
  targets: str  # the gold solution, ending '#### <answer>'.
  key: str      # provenance (see the module docstring).


# ------------------------------------------------------------------ arithmetic_chain: generator


@gin.configurable
def arithmetic_settings(seed: int = 0, train: int = 2000, pool: int = 4000, validation: int = 200,
                        test: int = 500, test_hard: int = 300,
                        terms: Sequence[int] = (2, 5), digits: Sequence[int] = (1, 2),
                        hard_bucket: Sequence[int] = (6, 2)) -> dict[str, Any]:
  """The generator settings of `arithmetic_chain` (gin-configurable), as a JSON-able dict.

  Args:
    seed: base seed of every split's random stream.
    train, pool, validation, test, test_hard: number of problems per split.
    terms, digits: inclusive (min, max) ranges; the in-distribution splits draw the bucket
      (terms, digits) uniformly over this grid (8 buckets by default).
    hard_bucket: (terms, digits) of every `test_hard` problem.

  Raises:
    ValueError: a negative count, fewer than 2 terms, fewer than 1 digit, or min > max.
  """
  counts = dict(train=train, pool=pool, validation=validation, test=test, test_hard=test_hard)
  terms, digits, hard_bucket = (tuple(int(v) for v in x) for x in (terms, digits, hard_bucket))
  if any(int(v) < 0 for v in counts.values()):
    raise ValueError(f'arithmetic_settings: negative split size in {counts}')
  if len(terms) != 2 or not 2 <= terms[0] <= terms[1]:
    raise ValueError(f'arithmetic_settings: terms={terms} must be (min, max), 2 <= min <= max')
  if len(digits) != 2 or not 1 <= digits[0] <= digits[1]:
    raise ValueError(f'arithmetic_settings: digits={digits} must be (min, max), 1 <= min <= max')
  if len(hard_bucket) != 2 or hard_bucket[0] < 2 or hard_bucket[1] < 1:
    raise ValueError(f'arithmetic_settings: hard_bucket={hard_bucket} must be (>= 2 terms, '
                     '>= 1 digit)')
  return {'seed': int(seed), **{k: int(v) for k, v in counts.items()}, 'terms': list(terms),
          'digits': list(digits), 'hard_bucket': list(hard_bucket)}


def default_arithmetic_settings() -> dict[str, Any]:
  """`arithmetic_settings` with its Python defaults, whatever gin binds (the shipped vocab's)."""
  return arithmetic_settings.__wrapped__()


def chain_solution(numbers: Sequence[int], ops: Sequence[str]) -> str:
  """The worked left-to-right solution of `numbers[0] ops[0] numbers[1] ...`.

  E.g. ([52, 85, 16], ['+', '-']) -> '52 + 85 = 137 ; 137 - 16 = 121 #### 121'.

  Raises:
    ValueError: `ops` is not one shorter than `numbers`, or holds something but '+' / '-'.
  """
  if len(ops) != len(numbers) - 1 or not set(ops) <= {'+', '-'}:
    raise ValueError(f'chain_solution: bad chain {numbers} / {ops}')
  total, steps = int(numbers[0]), []
  for op, n in zip(ops, numbers[1:]):
    new = total + int(n) if op == '+' else total - int(n)
    steps.append(f'{total} {op} {int(n)} = {new}')
    total = new
  return ' ; '.join(steps) + f' #### {total}'


def _draw_chain(rng: np.random.Generator, terms: int, digits: int) -> tuple[list[int], list[str]]:
  """One chain: `terms` numbers uniform in [10^(d-1), 10^d - 1] ([1, 9] for d = 1), operators
  uniform in {+, -}; our choice: a '-' that would make the running total negative becomes '+'."""
  numbers = [int(n) for n in rng.integers(10 ** (digits - 1), 10 ** digits, size=terms)]
  minus = rng.integers(0, 2, size=terms - 1)
  total, ops = numbers[0], []
  for n, m in zip(numbers[1:], minus):
    op = '-' if m and total >= n else '+'
    total = total - n if op == '-' else total + n
    ops.append(op)
  return numbers, ops


def _generate_split(split: str, count: int, buckets: Sequence[tuple[int, int]], seed: int,
                    used: set[str]) -> list[Problem]:
  rng = np.random.default_rng([seed, SPLIT_ID[split]])
  live, out = list(buckets), []
  while len(out) < count:
    if not live:
      raise ValueError(f'arithmetic_chain/{split}: only {len(out)} of {count} problems could be '
                       f'drawn from buckets {list(buckets)} without repeating an expression')
    terms, digits = live[int(rng.integers(len(live)))]
    for _ in range(_MAX_ATTEMPTS):
      numbers, ops = _draw_chain(rng, terms, digits)
      expression = ' '.join([str(numbers[0])] + [f'{o} {n}' for o, n in zip(ops, numbers[1:])])
      if expression not in used:
        break
    else:  # The bucket is (nearly) exhausted: give it up for this split, draw another bucket.
      live.remove((terms, digits))
      continue
    used.add(expression)
    key = f'arithmetic_chain/{split}/{len(out):05d}/t{terms}d{digits}'
    out.append(Problem(expression, chain_solution(numbers, ops), key))
  return out


@functools.lru_cache(maxsize=8)
def _generate_cached(settings_json: str) -> dict[str, tuple[Problem, ...]]:
  s = json.loads(settings_json)
  grid = [(t, d) for t in range(s['terms'][0], s['terms'][1] + 1)
          for d in range(s['digits'][0], s['digits'][1] + 1)]
  used: set[str] = set()
  out = {}
  for split in PRIORITY:
    buckets = [tuple(s['hard_bucket'])] if split == 'test_hard' else grid
    out[split] = tuple(_generate_split(split, s[split], buckets, s['seed'], used))
  return {split: out[split] for split in SPLITS['arithmetic_chain']}


def generate_arithmetic_chain(settings: Mapping[str, Any] | None = None
                              ) -> dict[str, tuple[Problem, ...]]:
  """Every split of `arithmetic_chain`: split name -> problems in index order (memoised).

  Exact expressions are unique within and across splits, assigned in `PRIORITY` order (test
  first); a drawn bucket is drawn from again until an unused expression comes; one that yields
  none in `_MAX_ATTEMPTS` draws is dropped for the rest of that split, so tiny buckets are
  under-represented in later splits (with the defaults, 2 terms x 1 digit has 126 distinct chains,
  nearly all in test, validation and pool). Same settings -> identical output on any machine
  (numpy's PCG64 streams).

  Args:
    settings: as returned by `arithmetic_settings` (None: `arithmetic_settings()`, gin-bound).

  Raises:
    ValueError: bad settings, or a split larger than its buckets can fill without repeats.
  """
  settings = dict(arithmetic_settings() if settings is None else settings)
  return _generate_cached(json.dumps(settings, sort_keys=True))


def bucket_of_key(key: str) -> str:
  """The bucket ('t3d2': 3 terms of 2 digits) of an `arithmetic_chain` key.

  Raises:
    ValueError: `key` is not an `arithmetic_chain/<split>/<index>/t<T>d<D>` key.
  """
  match = re.fullmatch(r'arithmetic_chain/\w+/\d+/(t\d+d\d+)', key)
  if not match:
    raise ValueError(f'{key!r} is not an arithmetic_chain key')
  return match.group(1)


def arithmetic_fingerprint(settings: Mapping[str, Any] | None = None) -> str:
  """16 hex digits of sha256 over the generator settings (None: gin-bound), its code version and
  the vocabulary's name: changes whenever the generated data or its tokenization may."""
  settings = dict(arithmetic_settings() if settings is None else settings)
  blob = json.dumps({'settings': settings, 'version': _GENERATOR_VERSION,
                     'vocab': os.path.basename(arithmetic_vocab_path())}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------ arithmetic_chain: vocabulary


def arithmetic_vocab_path(size: int = ARITHMETIC_VOCAB_SIZE) -> str:
  return os.path.join(MATH_DIR, 'spm', f'arithmetic_chain_{size}.model')


def build_arithmetic_vocab(size: int = ARITHMETIC_VOCAB_SIZE) -> str:
  """Trains the shipped `arithmetic_chain` vocabulary on the default train split's inputs+targets.

  The settings of `tasks.vocab.train_sentencepiece` (identity normalization, split digits, one
  thread, fixed order: byte-identical rebuilds) except two, our choice for a ~32-piece vocabulary:
  byte fallback is off (its 256 byte pieces would be 90% of the vocabulary; the generator's
  alphabet `0-9 +-=;#` and space is covered, anything else encodes to UNK = 2), and the model is
  BPE (unigram merges nothing but '##' here and stops at 20 pieces; BPE learns '▁+', '▁-',
  '▁=', '▁;', '▁####' and a few more, 29 pieces at most on this corpus). Every digit stays one
  token.

  Returns:
    The model's path (`arithmetic_vocab_path(size)`).

  Raises:
    RuntimeError (from sentencepiece): `size` larger than the corpus supports (29).
  """
  train = generate_arithmetic_chain(default_arithmetic_settings())['train']
  texts = [p.inputs for p in train] + [p.targets for p in train]
  path = arithmetic_vocab_path(size)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  proto = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=proto, vocab_size=size, model_type='bpe',
      character_coverage=1.0, pad_id=vocab.PAD_ID, eos_id=vocab.EOS_ID, unk_id=vocab.UNK_ID,
      bos_id=-1, input_sentence_size=0, shuffle_input_sentence=False, num_threads=1,
      max_sentence_length=8192, split_digits=True, byte_fallback=False,
      normalization_rule_name='identity', minloglevel=2)
  with open(path + '.tmp', 'wb') as f:
    f.write(proto.getvalue())
  os.replace(path + '.tmp', path)
  return path


# ------------------------------------------------------------------ gsm8k

_HOW_TO_GET_GSM8K = (
    'Download train.jsonl and test.jsonl of GSM8K (https://github.com/openai/grade-school-math, '
    'grade_school_math/data/) into one folder and pass it with '
    '--gin.tasks.math.gsm8k_data_dir.value="DIR" or $GSM8K_DATA_DIR.')


@gin.configurable
def gsm8k_data_dir(value: str | None = None) -> str | None:
  """Folder of GSM8K's `train.jsonl` / `test.jsonl` (else $GSM8K_DATA_DIR; None if neither)."""
  return value or os.environ.get('GSM8K_DATA_DIR')


@gin.configurable
def gsm8k_validation_size(value: int = 500) -> int:
  """How many of the last `train.jsonl` lines form `validation` (our choice: 500)."""
  return value


def read_gsm8k_jsonl(path: str) -> list[tuple[int, str, str]]:
  """(1-based line, question, answer) of every line of a GSM8K jsonl file, validated.

  Raises:
    readers.CorpusFileNotFound: `path` is missing (the message says how to get GSM8K).
    readers.CorpusFormatError: non-UTF-8 bytes, a line that is not a JSON object with non-empty
      string fields 'question' and 'answer', an answer without '####' followed by text, or no
      lines at all; the message names `path` and the line.
  """
  if not os.path.exists(path):
    raise readers.CorpusFileNotFound(f'gsm8k: {path} not found. {_HOW_TO_GET_GSM8K}')
  rows = []
  for lineno, raw in readers._open_text_lines(path):  # pylint: disable=protected-access
    line = readers._decode(path, lineno, raw)  # pylint: disable=protected-access
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise readers.CorpusFormatError(f'{path}:{lineno}: not valid JSON ({e.msg})') from e
    if not isinstance(record, dict):
      raise readers.CorpusFormatError(f'{path}:{lineno}: expected a JSON object')
    for field in ('question', 'answer'):
      if not isinstance(record.get(field), str) or not record[field].strip():
        raise readers.CorpusFormatError(f'{path}:{lineno}: missing or empty {field!r}')
    answer = record['answer'].strip()
    if '####' not in answer or not answer.rsplit('####', 1)[1].strip():
      raise readers.CorpusFormatError(f'{path}:{lineno}: answer has no final "#### <number>"')
    rows.append((lineno, record['question'].strip(), answer))
  if not rows:
    raise readers.CorpusFormatError(f'{path}: no problems (empty file)')
  return rows


def _gsm8k_dir() -> str:
  data_dir = gsm8k_data_dir()
  if not data_dir or not os.path.isdir(data_dir):
    raise readers.CorpusFileNotFound(
        f'gsm8k: data folder {data_dir!r} not found. {_HOW_TO_GET_GSM8K}')
  return data_dir


def gsm8k_fingerprint() -> str:
  """16 hex digits of sha256 over the data folder's path, its jsonl files' sizes (-1: missing),
  the validation size and the vocabulary size; '' when no data folder is configured."""
  data_dir = gsm8k_data_dir()
  if not data_dir:
    return ''
  sizes = {}
  for name in ('train.jsonl', 'test.jsonl'):
    path = os.path.join(data_dir, name)
    sizes[name] = os.path.getsize(path) if os.path.exists(path) else -1
  blob = json.dumps({'dir': os.path.abspath(data_dir), 'sizes': sizes,
                     'validation': gsm8k_validation_size(), 'vocab': GSM8K_VOCAB_SIZE},
                    sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=16)
def _load_gsm8k_cached(data_dir: str, split: str, validation_size: int,
                       fingerprint: str) -> tuple[Problem, ...]:
  del fingerprint  # Only part of the cache key: edited files are read again.
  if split == 'test':
    rows = read_gsm8k_jsonl(os.path.join(data_dir, 'test.jsonl'))
  else:
    path = os.path.join(data_dir, 'train.jsonl')
    rows = read_gsm8k_jsonl(path)
    if not 0 <= validation_size < len(rows):
      raise readers.CorpusFormatError(
          f'{path}: {len(rows)} problems; cannot hold out the last {validation_size} as '
          'validation')
    cut = len(rows) - validation_size
    rows = rows[cut:] if split == 'validation' else rows[:cut]
  return tuple(Problem(q, a, f'gsm8k/{split}/{lineno}') for lineno, q, a in rows)


def load_gsm8k(split: str) -> tuple[Problem, ...]:
  """The problems of a `gsm8k` split, from the folder `gsm8k_data_dir()` (memoised).

  Keys are `gsm8k/<split>/<line>` (the 1-based line in `train.jsonl` or `test.jsonl`).

  Raises:
    KeyError: an unknown split.
    readers.CorpusFileNotFound: no data folder or a missing file (message says how to get them).
    readers.CorpusFormatError: a malformed line (message names the file and line).
  """
  if split not in SPLITS['gsm8k']:
    raise KeyError(f'gsm8k has no split {split!r}; splits: {SPLITS["gsm8k"]}')
  data_dir = _gsm8k_dir()
  return _load_gsm8k_cached(os.path.abspath(data_dir), split, gsm8k_validation_size(),
                            gsm8k_fingerprint())


# ------------------------------------------------------------------ seqio


def load_problems(task: str, split: str) -> tuple[Problem, ...]:
  """All problems of `task`'s `split`; raises as `generate_arithmetic_chain` / `load_gsm8k`."""
  if task == 'arithmetic_chain':
    return generate_arithmetic_chain()[split]
  if task == 'gsm8k':
    return load_gsm8k(split)
  raise KeyError(f'unknown math task {task!r}; tasks: {TASK_NAMES}')


def data_fingerprint(task: str) -> str:
  """What identifies `task`'s data, for caches (`arithmetic_fingerprint`, `gsm8k_fingerprint`)."""
  if task == 'arithmetic_chain':
    return arithmetic_fingerprint()
  if task == 'gsm8k':
    return gsm8k_fingerprint()
  raise KeyError(f'unknown math task {task!r}; tasks: {TASK_NAMES}')


class _LazyPathVocabulary(translation.ProjectVocabulary):
  """A `ProjectVocabulary` whose file is located on first use (after gin has been parsed)."""

  def __init__(self, path_fn: Callable[[], str], build_fn: Callable[[str], Any]):
    super().__init__('', lambda: build_fn(self.sentencepiece_model_file))
    self._path_fn = path_fn

  def _model_context(self):
    if not self._model:
      self._sentencepiece_model_file = self._path_fn()
    return super()._model_context()


def _gsm8k_vocab_path() -> str:
  return os.path.join(_gsm8k_dir(), f'spm_{GSM8K_VOCAB_SIZE}.model')


def _build_gsm8k_vocab(path: str) -> str:
  train = load_gsm8k('train')
  return vocab.train_sentencepiece([p.inputs for p in train] + [p.targets for p in train], path,
                                   GSM8K_VOCAB_SIZE)


def get_vocabulary(task: str) -> seqio.SentencePieceVocabulary:
  """The shared input/target vocabulary of `task` (independent of the translation `vocab_size`)."""
  if task == 'arithmetic_chain':
    return translation.ProjectVocabulary(arithmetic_vocab_path(), build_arithmetic_vocab)
  if task == 'gsm8k':
    return _LazyPathVocabulary(_gsm8k_vocab_path, _build_gsm8k_vocab)
  raise KeyError(f'unknown math task {task!r}; tasks: {TASK_NAMES}')


def _dataset_fn(split: str, shuffle_files: bool, seed: int | None = None, *, task: str):
  del shuffle_files, seed  # Fixed order; shuffling happens downstream.
  problems = load_problems(task, split)
  return tf.data.Dataset.from_tensor_slices({
      'inputs': tf.constant([p.inputs for p in problems], tf.string),
      'targets': tf.constant([p.targets for p in problems], tf.string),
      'key': tf.constant([p.key for p in problems], tf.string),
  })


def register_tasks() -> None:
  """(Re-)registers `arithmetic_chain` and `gsm8k`."""
  for name in TASK_NAMES:
    translation.register_text_task(name, functools.partial(_dataset_fn, task=name), SPLITS[name],
                                   get_vocabulary(name))


def main() -> None:
  """Rebuilds the shipped `arithmetic_chain` vocabulary; prints its pieces and per-split stats."""
  path = build_arithmetic_vocab()
  proc = spm.SentencePieceProcessor(model_file=path)
  print(f'{path}: {proc.get_piece_size()} pieces, {os.path.getsize(path)} bytes')
  print('pieces:', ' '.join(proc.id_to_piece(i) for i in range(proc.get_piece_size())))
  for split, problems in generate_arithmetic_chain(default_arithmetic_settings()).items():
    buckets: dict[str, int] = {}
    for p in problems:
      buckets[bucket_of_key(p.key)] = buckets.get(bucket_of_key(p.key), 0) + 1
    longest = max((len(proc.encode(p.targets)) + 1 for p in problems), default=0)
    print(f'{split}: {len(problems)} problems, longest target {longest} tokens (EOS included), '
          f'buckets {dict(sorted(buckets.items()))}')

