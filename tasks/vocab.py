"""SentencePiece vocabularies trained by the project on a task's training split.

One vocabulary is shared by source and target (the ReST paper used a shared 32k SentencePiece
model; our CPU default is 8,000 pieces). Ids follow the seqio / t5x convention: PAD = 0 (also the
decoder start token), EOS = 1, UNK = 2, no BOS.

Training is deterministic (fixed input order, no sampling of input sentences, one thread), so a
missing model file is rebuilt byte-for-byte identically from the same corpus. The shipped models
live in `tasks/data/<corpus>/spm/<name>_<size>.model`.

    python -m tasks.vocab --pair de_en --size 8000     # (re)build one shipped vocabulary
"""

from __future__ import annotations

import argparse
import io
import os
from typing import Iterable, Sequence

import sentencepiece as spm

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def train_sentencepiece(texts: Iterable[str], model_path: str, vocab_size: int,
                        character_coverage: float = 1.0) -> str:
  """Trains a unigram SentencePiece model on `texts` and writes `model_path`.

  Args:
    texts: training sentences (source and target sides together), in a fixed order.
    model_path: output `.model` path (its folder is created).
    vocab_size: number of pieces, special ids included.
    character_coverage: share of characters covered (1.0 for Latin scripts, 0.9995 for Chinese).

  Returns:
    `model_path`.

  Raises:
    RuntimeError (from sentencepiece): e.g. `vocab_size` larger than the corpus supports.
  """
  os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
  proto = io.BytesIO()
  # An iterator rather than an input file: the model then records no temporary path, so two
  # builds from the same texts are byte-identical.
  spm.SentencePieceTrainer.train(
      sentence_iterator=(t.replace('\n', ' ') for t in texts), model_writer=proto,
      vocab_size=vocab_size, model_type='unigram', character_coverage=character_coverage,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1, input_sentence_size=0,
      shuffle_input_sentence=False, num_threads=1, max_sentence_length=8192, split_digits=True,
      byte_fallback=True, normalization_rule_name='identity', minloglevel=2)
  tmp_path = model_path + '.tmp'
  with open(tmp_path, 'wb') as f:
    f.write(proto.getvalue())
  os.replace(tmp_path, model_path)  # Atomic: a killed build leaves no half-written model.
  return model_path


def libreoffice_vocab_path(pair: str, size: int) -> str:
  from tasks import translation  # Local import: translation imports this module.
  return os.path.join(translation.LIBREOFFICE_DIR, 'spm', f'{pair}_{size}.model')


def build_libreoffice_vocab(pair: str, size: int) -> str:
  """Trains the shared vocabulary of `libreoffice_help_<pair>` on its train split."""
  from tasks import readers, translation
  pairs = readers.read_tsv_pairs(translation.libreoffice_file(pair, 'train'))
  texts = [p.source for p in pairs] + [p.target for p in pairs]
  coverage = 0.9995 if pair.startswith('zh') else 1.0
  return train_sentencepiece(texts, libreoffice_vocab_path(pair, size), size, coverage)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--pair', choices=['de_en', 'zh_en'], nargs='+', default=['de_en', 'zh_en'])
  parser.add_argument('--size', type=int, default=8000)
  args = parser.parse_args(argv)
  for pair in args.pair:
    path = build_libreoffice_vocab(pair, args.size)
    proc = spm.SentencePieceProcessor(model_file=path)
    print(f'{path}: {proc.get_piece_size()} pieces, {os.path.getsize(path)} bytes')


if __name__ == '__main__':
  main()
