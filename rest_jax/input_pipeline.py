"""The data edge: SeqIO tasks -> padded numpy arrays (+ their texts), cached per task and split.

This is where the training code reads SeqIO / TensorFlow data (imported lazily). TensorFlow is
also imported, lazily inside the functions that need it, for Grow's TFRecord chunks (`grow.py`),
the scored records (`rewards/scoring.py`) and clu's TensorBoard writer (`train.py`), so the core
(model, decoding, trainer, losses, Grow's sampling) stays importable without it (checked by
`tests/test_grow.py`). A task's split is run once
through its SeqIO pipeline and laid out as `seqio.EncDecFeatureConverter` (no packing) would, as
numpy arrays:

    encoder_input_tokens  [n, inputs_length]  int32
    decoder_input_tokens  [n, targets_length] int32
    decoder_target_tokens [n, targets_length] int32
    decoder_loss_weights  [n, targets_length] float32

together with the untokenized `inputs` / `targets` / `key` strings (for BLEU and for Grow records).
Sequences longer than the feature lengths are truncated by SeqIO (EOS kept); how many were
truncated is counted and logged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Sequence

import numpy as np

from rest_jax import fileio


@dataclasses.dataclass
class TaskData:
  arrays: dict[str, np.ndarray]   # features as above.
  inputs: list[str]               # [n] source texts.
  targets: list[str]              # [n] reference texts.
  keys: list[str]                 # [n] provenance of each pair.
  num_truncated: int              # rows whose source or target was cut to the feature length.

  def __len__(self):
    return len(self.inputs)

  def take(self, rows: Sequence[int]) -> 'TaskData':
    """The examples at `rows` (int indices), in that order."""
    rows = np.asarray(rows, np.int64)
    return TaskData({k: v[rows] for k, v in self.arrays.items()},
                    [self.inputs[i] for i in rows], [self.targets[i] for i in rows],
                    [self.keys[i] for i in rows], self.num_truncated)

  def subset(self, n: int) -> 'TaskData':
    """The first `n` examples (deterministic dev subsets for periodic evaluation)."""
    return TaskData({k: v[:n] for k, v in self.arrays.items()}, self.inputs[:n], self.targets[:n],
                    self.keys[:n], self.num_truncated)


def get_task(task_name: str):
  import seqio
  import tasks  # noqa: F401  (registers the tasks)
  return seqio.get_mixture_or_task(task_name)


def get_vocabulary(task_name: str):
  """The task's shared (input = target) vocabulary, a `seqio.SentencePieceVocabulary`."""
  return get_task(task_name).output_features['targets'].vocabulary


def check_vocab_size(task_name: str, model_vocab_size: int) -> None:
  """Raises ValueError if the model's embedding cannot hold every id of the task's vocabulary.

  (Ids past the embedding table gather garbage silently: NaN log-probs, empty samples.)
  """
  size = get_vocabulary(task_name).vocab_size
  if model_vocab_size < size:
    raise ValueError(f'the model has vocab_size={model_vocab_size} but task {task_name!r} uses a '
                     f'vocabulary of {size} pieces: bind models.TransformerConfig.vocab_size = '
                     f'{size}')


VOCAB_FILE = 'vocab.json'  # Beside every policy: which SentencePiece model its ids belong to.


def vocab_info(task_name: str) -> dict[str, Any]:
  """{'task', 'vocab_size', 'sha256'} of the task's SentencePiece model (sha256 of the
  `.model` file's bytes, hex)."""
  import hashlib
  vocab = get_vocabulary(task_name)
  with fileio.open_file(vocab.sentencepiece_model_file, 'rb') as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  return {'task': task_name, 'vocab_size': int(vocab.vocab_size), 'sha256': digest}


def policy_dir_of(policy: str) -> str:
  """The directory that describes a policy: itself for a run dir, the parent of an `.npz`."""
  policy = fileio.repo_path(policy)
  return os.path.dirname(policy) if policy.endswith('.npz') else policy


def _known_vocab(task_name: str) -> dict[str, Any] | None:
  """`vocab_info`, or None (with a warning) for a name that is no registered SeqIO task (tests
  that pass their own in-memory data and detokenizer)."""
  import seqio
  import tasks  # noqa: F401  (registers the tasks)
  if task_name not in set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()):
    logging.warning('task %r is not registered: no vocabulary to record or check', task_name)
    return None
  return vocab_info(task_name)


def write_policy_vocab(policy: str, task_name: str) -> None:
  """Records the task's `vocab_info` as `vocab.json` in the policy's directory."""
  info = _known_vocab(task_name)
  if info is not None:
    fileio.write_json(os.path.join(policy_dir_of(policy), VOCAB_FILE), info)


def check_policy_vocab(policy: str, task_name: str) -> dict[str, Any] | None:
  """Refuses a policy trained on another vocabulary than `task_name`'s.

  Returns the policy's recorded `vocab.json` (None, with a warning, for a policy written before
  policies carried one).

  Raises:
    ValueError: the recorded sha256 differs from the task's (names both hashes).
  """
  path = os.path.join(policy_dir_of(policy), VOCAB_FILE)
  if not fileio.exists(path):
    logging.warning('%s has no %s: its vocabulary cannot be checked against %r', policy,
                    VOCAB_FILE, task_name)
    return None
  recorded, want = fileio.read_json(path), _known_vocab(task_name)
  if want is not None and recorded['sha256'] != want['sha256']:
    raise ValueError(f"policy {policy} was trained on another vocabulary (sha256 "
                     f"{recorded['sha256']}, task {recorded.get('task')!r}) than task "
                     f"{task_name!r} uses (sha256 {want['sha256']}): its token ids would mean "
                     'other pieces; use the matching task or policy')
  return recorded


def detokenizer(task_name: str) -> Callable[[Sequence[int]], str]:
  """`ids -> text` with plain sentencepiece (stops at EOS = 1, skips PAD = 0).

  Ids at or past the SentencePiece model's piece count (a model's embedding is often padded past
  it, e.g. 32 rows for the 29 math pieces, and a policy sampled at temperature 1 can emit them)
  decode as UNK, rendered ' ⁇ ', as `seqio.SentencePieceVocabulary` does: never an error, and a
  verifier cannot read a number through them.
  """
  vocab = get_vocabulary(task_name)
  proc = vocab.tokenizer
  piece_size, unk_id = proc.get_piece_size(), proc.unk_id()

  def detok(ids):
    ids = [int(i) for i in ids]
    if 1 in ids:
      ids = ids[:ids.index(1)]
    return proc.decode([i if i < piece_size else unk_id for i in ids if i > 1])

  return detok


def pad_features(inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
                 inputs_length: int, targets_length: int) -> dict[str, np.ndarray]:
  """Unpacked encoder-decoder features, exactly as `seqio.EncDecFeatureConverter(pack=False)`.

  Args:
    inputs, targets: token id lists (EOS already appended, at most the feature lengths).
  Returns:
    encoder_input_tokens [n, inputs_length] int32, decoder_target_tokens [n, targets_length]
    int32, decoder_input_tokens (targets shifted right behind the start token 0), and
    decoder_loss_weights [n, targets_length] float32 (1 on real target tokens).
  """
  n = len(inputs)
  enc = np.zeros((n, inputs_length), np.int32)
  tgt = np.zeros((n, targets_length), np.int32)
  for i, (x, y) in enumerate(zip(inputs, targets)):
    enc[i, :len(x)] = x[:inputs_length]
    tgt[i, :len(y)] = y[:targets_length]
  dec_in = np.zeros_like(tgt)
  dec_in[:, 1:] = tgt[:, :-1]
  return {'encoder_input_tokens': enc, 'decoder_input_tokens': dec_in,
          'decoder_target_tokens': tgt, 'decoder_loss_weights': (tgt > 0).astype(np.float32)}


def load_task_data(task_name: str, split: str, inputs_length: int, targets_length: int,
                   max_examples: int | None = None) -> TaskData:
  """Tokenized, padded arrays and texts of one split of a SeqIO task, in file order.

  One pass of the task's SeqIO pipeline (tokenize, trim to the feature length keeping EOS);
  `pad_features` then lays the features out as `seqio.EncDecFeatureConverter` does (a test checks
  the two agree).

  Args:
    task_name: a registered task, e.g. 'libreoffice_help_de_en'.
    split: 'train', 'validation' or 'test'.
    inputs_length, targets_length: feature lengths (tokens, EOS included).
    max_examples: keep only the first examples (None: all).

  Raises:
    tasks.readers.CorpusError: missing or malformed data (message names the file and line).
  """
  import tensorflow_datasets as tfds

  task = get_task(task_name)
  lengths = {'inputs': inputs_length, 'targets': targets_length}
  ds = task.get_dataset(lengths, split=split, shuffle=False, num_epochs=1, use_cached=False)
  if max_examples:
    ds = ds.take(max_examples)
  texts: dict[str, list[str]] = {'inputs': [], 'targets': [], 'key': []}
  tokens: dict[str, list] = {'inputs': [], 'targets': []}
  for ex in tfds.as_numpy(ds):
    for k in texts:
      texts[k].append(ex[k + '_pretokenized' if k != 'key' else k].decode('utf-8'))
    for k in tokens:
      tokens[k].append(ex[k])
  vocab = task.output_features['targets'].vocabulary
  truncated = 0  # Rows at a length limit: re-tokenize those few to know whether text was cut.
  for i in range(len(texts['inputs'])):
    for k, limit in (('inputs', inputs_length), ('targets', targets_length)):
      if len(tokens[k][i]) == limit and len(vocab.encode(texts[k][i])) + 1 > limit:
        truncated += 1
        break
  arrays = pad_features(tokens['inputs'], tokens['targets'], inputs_length, targets_length)
  if truncated:
    logging.info('%s/%s: %d of %d examples truncated to %s tokens', task_name, split, truncated,
                 len(texts['inputs']), lengths)
  return TaskData(arrays, texts['inputs'], texts['targets'], texts['key'], truncated)


def cached_task_data(task_name: str, split: str, inputs_length: int, targets_length: int,
                     cache_dir: str | None, max_examples: int | None = None) -> TaskData:
  """`load_task_data`, memoised as an `.npz` in `cache_dir` (None: no cache).

  The file name holds the task's data fingerprint (`tasks.data_fingerprint`: e.g. a hash of a
  generated task's settings), so data made with other generator settings is never served.
  """
  if not cache_dir:
    return load_task_data(task_name, split, inputs_length, targets_length, max_examples)
  import tasks
  fingerprint = tasks.data_fingerprint(task_name)
  name = (f'{task_name}{"." + fingerprint if fingerprint else ""}.{split}.'
          f'{inputs_length}x{targets_length}.{max_examples or "all"}.npz')
  path = os.path.join(cache_dir, name)
  if fileio.exists(path):
    z = np.load(path, allow_pickle=False)
    arrays = {k[2:]: z[k] for k in z.files if k.startswith('a_')}
    return TaskData(arrays, list(z['inputs']), list(z['targets']), list(z['keys']),
                    int(z['num_truncated']))
  data = load_task_data(task_name, split, inputs_length, targets_length, max_examples)
  fileio.makedirs(cache_dir)
  tmp = fileio.temp_path(path, '.npz')  # Hosts may fill the same cache at once.
  try:
    np.savez_compressed(tmp, inputs=np.array(data.inputs), targets=np.array(data.targets),
                        keys=np.array(data.keys), num_truncated=data.num_truncated,
                        **{'a_' + k: v for k, v in data.arrays.items()})
  except BaseException:
    fileio.remove(tmp)
    raise
  fileio.atomic_replace(tmp, path)
  return data
