"""SeqIO translation tasks: the sources ReST grows from and the references it is evaluated on.

Registered on `import tasks`:

| task                      | data                                                   | runnable here |
|---------------------------|--------------------------------------------------------|---------------|
| `libreoffice_help_de_en`  | shipped: `tasks/data/libreoffice_help/de_en.*.tsv.gz`   | yes           |
| `libreoffice_help_zh_en`  | shipped: `tasks/data/libreoffice_help/zh_en.*.tsv.gz`   | yes           |
| `iwslt14_de_en`           | fairseq `prepare-iwslt14.sh` output `train/valid/test.{de,en}` in `IWSLT14_DATA_DIR` | where present |
| `wmt20_zh_en`             | `train/valid/test.{zh,en}` text files in `WMT20_DATA_DIR` (valid = newstest2019, test = newstest2020) | where present |

Every example has string features `inputs`, `targets` (tokenized to int32 ids with EOS = 1 appended)
and `key` (where the pair came from). Splits are seqio's `train`, `validation`, `test`.

Data are read by the strict readers of `tasks/readers.py` in Python first (an error names the file
and line) and then handed to tf.data. On the train split, pairs longer than `max_train_chars`
characters on either side are dropped, and the count is logged (they would be truncated by the
feature converter otherwise, which teaches the policy to stop mid-sentence).

Data directories and vocabulary size are gin-configurable:
    --gin.tasks.translation.data_dirs.iwslt14_de_en="/data/iwslt14.tokenized.de-en"
"""

from __future__ import annotations

import functools
import logging
import os

import gin
import seqio
import tensorflow as tf

from tasks import readers, vocab

LIBREOFFICE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'libreoffice_help')
SPLIT_FILES = {'train': 'train', 'validation': 'dev', 'test': 'test'}
DEFAULT_VOCAB_SIZE = 8000


def libreoffice_file(pair: str, split: str) -> str:
  """Path of a shipped split file; `split` is 'train', 'dev' or 'test'."""
  return os.path.join(LIBREOFFICE_DIR, f'{pair}.{split}.tsv.gz')


@gin.configurable
def data_dirs(iwslt14_de_en: str | None = None, wmt20_zh_en: str | None = None) -> dict[str, str | None]:
  """Data folders of the external corpora (also read from $IWSLT14_DATA_DIR / $WMT20_DATA_DIR)."""
  return {
      'iwslt14_de_en': iwslt14_de_en or os.environ.get('IWSLT14_DATA_DIR'),
      'wmt20_zh_en': wmt20_zh_en or os.environ.get('WMT20_DATA_DIR'),
  }


@gin.configurable
def max_train_chars(value: int = 400) -> int:
  """Longest source or target (characters) kept in a train split; longer pairs are counted, dropped."""
  return value


_HOW_TO_PREPARE = {
    'iwslt14_de_en': (
        'Prepare IWSLT 2014 De-En with fairseq (examples/translation/prepare-iwslt14.sh, which '
        'writes iwslt14.tokenized.de-en/{train,valid,test}.{de,en}) and pass the folder with '
        '--gin.tasks.translation.data_dirs.iwslt14_de_en=DIR or $IWSLT14_DATA_DIR.'),
    'wmt20_zh_en': (
        'Put WMT 2020 Zh-En as line-aligned text files {train,valid,test}.{zh,en} in one folder '
        '(train: the WMT20 zh-en parallel data; valid: newstest2019; test: newstest2020, e.g. '
        '`sacrebleu -t wmt20 -l zh-en --echo src/ref`) and pass it with '
        '--gin.tasks.translation.data_dirs.wmt20_zh_en=DIR or $WMT20_DATA_DIR.'),
}


def _filter_long(pairs: list[readers.Pair], limit: int, origin: str) -> list[readers.Pair]:
  kept = [p for p in pairs if len(p.source) <= limit and len(p.target) <= limit]
  if len(kept) < len(pairs):
    logging.info('%s: dropped %d of %d pairs longer than %d characters', origin,
                 len(pairs) - len(kept), len(pairs), limit)
  return kept


def _to_dataset(pairs: list[readers.Pair]) -> tf.data.Dataset:
  return tf.data.Dataset.from_tensor_slices({
      'inputs': [p.source for p in pairs],
      'targets': [p.target for p in pairs],
      'key': [p.key for p in pairs],
  })


@functools.lru_cache(maxsize=None)
def load_pairs(task: str, split: str) -> tuple[readers.Pair, ...]:
  """All pairs of `task`'s `split` ('train', 'validation', 'test'), validated, before filtering.

  Raises:
    readers.CorpusFileNotFound: the data are missing (the message says how to prepare them).
    readers.CorpusFormatError: a malformed file (the message names the file and line).
  """
  if task.startswith('libreoffice_help_'):
    pair = task[len('libreoffice_help_'):]
    path = libreoffice_file(pair, SPLIT_FILES[split])
    if not os.path.exists(path):
      raise readers.CorpusFileNotFound(
          f'{path}: missing; rebuild it with `python -m tasks.corpora.libreoffice '
          f'--out {LIBREOFFICE_DIR}`')
    return tuple(readers.read_tsv_pairs(path))
  src_lang, tgt_lang = task.split('_')[-2:]
  data_dir = data_dirs()[task]
  fname = {'train': 'train', 'validation': 'valid', 'test': 'test'}[split]
  if not data_dir or not os.path.isdir(data_dir):
    raise readers.CorpusFileNotFound(
        f'{task}: data folder {data_dir!r} not found. {_HOW_TO_PREPARE[task]}')
  src = os.path.join(data_dir, f'{fname}.{src_lang}')
  tgt = os.path.join(data_dir, f'{fname}.{tgt_lang}')
  for path in (src, tgt):
    if not os.path.exists(path):
      raise readers.CorpusFileNotFound(f'{task}: {path} not found. {_HOW_TO_PREPARE[task]}')
  pairs = readers.read_aligned_text(src, tgt)
  if task == 'iwslt14_de_en':  # fairseq's files are BPE-split with '@@ ' continuations: undo it.
    pairs = [readers.Pair(p.source.replace('@@ ', ''), p.target.replace('@@ ', ''), p.key)
             for p in pairs]
  return tuple(pairs)


def _dataset_fn(split: str, shuffle_files: bool, seed: int | None = None, *, task: str):
  del shuffle_files, seed  # One file per split; shuffling happens downstream.
  pairs = list(load_pairs(task, split))
  if split == 'train':
    pairs = _filter_long(pairs, max_train_chars(), f'{task}/{split}')
  return _to_dataset(pairs)


@gin.configurable
def vocab_size(value: int = DEFAULT_VOCAB_SIZE) -> int:
  """Size of the shared SentencePiece vocabulary (pieces, special ids included)."""
  return value


class ProjectVocabulary(seqio.SentencePieceVocabulary):
  """A SentencePiece vocabulary trained by the project; built on first use when missing."""

  def __init__(self, model_file: str, build_fn):
    super().__init__(model_file)
    self._build_fn = build_fn

  def _model_context(self):
    if not os.path.exists(self.sentencepiece_model_file):
      logging.info('building vocabulary %s', self.sentencepiece_model_file)
      self._build_fn()
    return super()._model_context()


def get_vocabulary(task: str, size: int | None = None) -> seqio.SentencePieceVocabulary:
  """The shared source/target vocabulary of `task` (default size from gin `vocab_size`)."""
  size = size or vocab_size()
  if task.startswith('libreoffice_help_'):
    pair = task[len('libreoffice_help_'):]
    return ProjectVocabulary(vocab.libreoffice_vocab_path(pair, size),
                             functools.partial(vocab.build_libreoffice_vocab, pair, size))
  data_dir = data_dirs()[task] or '/nonexistent'
  path = os.path.join(data_dir, f'spm_{size}.model')

  def build():
    pairs = load_pairs(task, 'train')
    vocab.train_sentencepiece([p.source for p in pairs] + [p.target for p in pairs], path, size,
                              0.9995 if 'zh' in task else 1.0)

  return ProjectVocabulary(path, build)


TASK_NAMES = ('libreoffice_help_de_en', 'libreoffice_help_zh_en', 'iwslt14_de_en', 'wmt20_zh_en')


def register_text_task(name: str, dataset_fn, splits, vocabulary) -> None:
  """(Re-)registers a SeqIO task of string `inputs` / `targets` / `key` examples (from
  `dataset_fn(split, shuffle_files, seed)`), tokenized by one shared `vocabulary`, EOS appended
  after trimming: the layout of every task of this package."""
  features = {
      'inputs': seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32),
      'targets': seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32),
  }
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(dataset_fn, splits=list(splits)),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      output_features=features,
      metric_fns=[])


def register_tasks(size: int | None = None) -> None:
  """(Re-)registers every translation task with a vocabulary of `size` pieces."""
  for name in TASK_NAMES:
    register_text_task(name, functools.partial(_dataset_fn, task=name), SPLIT_FILES,
                       get_vocabulary(name, size))
