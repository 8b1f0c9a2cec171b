"""SeqIO tasks, vocabularies and the strict corpus readers."""

import gzip
import os

import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

import tasks  # noqa: F401  (registers the tasks)
from tasks import readers, translation, vocab

LENGTHS = {'inputs': 32, 'targets': 32}


@pytest.mark.parametrize('name', ['libreoffice_help_de_en', 'libreoffice_help_zh_en'])
def test_task_batches_through_feature_converter(name):
  task = seqio.get_mixture_or_task(name)
  ds = task.get_dataset(LENGTHS, split='validation', shuffle=False, num_epochs=1)
  converted = seqio.EncDecFeatureConverter(pack=False)(ds, LENGTHS).batch(4)
  batch = next(iter(tfds.as_numpy(converted)))
  assert set(batch) == {'encoder_input_tokens', 'decoder_input_tokens', 'decoder_target_tokens',
                        'decoder_loss_weights'}
  for k, v in batch.items():
    assert v.shape == (4, 32), k
    assert v.dtype == np.int32, k
  # Decoder inputs are the targets shifted right behind the start token 0; EOS = 1 ends targets.
  np.testing.assert_array_equal(batch['decoder_input_tokens'][:, 1:],
                                batch['decoder_target_tokens'][:, :-1])
  assert (batch['decoder_input_tokens'][:, 0] == 0).all()
  lengths = (batch['decoder_target_tokens'] > 0).sum(1)
  first = next(iter(tfds.as_numpy(ds)))
  assert first['targets'][-1] == 1 or len(first['targets']) == 32
  assert lengths.min() > 1
  np.testing.assert_array_equal(batch['decoder_loss_weights'], batch['decoder_target_tokens'] > 0)


def test_input_pipeline_arrays_equal_feature_converter():
  from rest_jax import input_pipeline
  name = 'libreoffice_help_de_en'
  data = input_pipeline.load_task_data(name, 'test', 32, 24, max_examples=64)
  ds = seqio.get_mixture_or_task(name).get_dataset({'inputs': 32, 'targets': 24}, split='test',
                                                   shuffle=False, num_epochs=1).take(64)
  converted = seqio.EncDecFeatureConverter(pack=False)(ds, {'inputs': 32, 'targets': 24})
  expected = next(iter(tfds.as_numpy(converted.batch(64))))
  for k, v in expected.items():
    np.testing.assert_array_equal(data.arrays[k], v, err_msg=k)
  assert data.inputs[0] == translation.load_pairs(name, 'test')[0].source
  assert 0 < data.num_truncated < 64  # Some real paragraphs exceed 24 target tokens.


def test_splits_have_expected_sizes_and_keys():
  task = seqio.get_mixture_or_task('libreoffice_help_de_en')
  dev = list(tfds.as_numpy(task.source.get_dataset('validation')))
  assert len(dev) == len(translation.load_pairs('libreoffice_help_de_en', 'validation'))
  assert 1000 < len(dev) < 5000
  assert all(ex['key'].decode().startswith('text/') for ex in dev[:50])


def test_vocabulary_round_trips_real_sentences():
  for name in ('libreoffice_help_de_en', 'libreoffice_help_zh_en'):
    voc = seqio.get_mixture_or_task(name).output_features['targets'].vocabulary
    assert voc.vocab_size == 8000
    assert (voc.pad_id, voc.eos_id, voc.unk_id) == (0, 1, 2)
    pairs = translation.load_pairs(name, 'test')[:200]
    for text in [p.source for p in pairs] + [p.target for p in pairs]:
      ids = voc.encode(text)
      assert voc.unk_id not in ids, text  # byte fallback: nothing is unknown.
      assert voc.decode(ids) == text
  ids = voc.encode('Wählen Sie Extras - Optionen.')
  assert len(ids) < 20


def test_sentencepiece_training_is_deterministic(tmp_path):
  texts = [p.source for p in translation.load_pairs('libreoffice_help_de_en', 'test')]
  a = vocab.train_sentencepiece(texts, str(tmp_path / 'a.model'), 500)
  b = vocab.train_sentencepiece(texts, str(tmp_path / 'b.model'), 500)
  assert open(a, 'rb').read() == open(b, 'rb').read()


def _write(path, data: bytes):
  with gzip.open(path, 'wb') as f:
    f.write(data)
  return str(path)


def test_reader_errors_name_file_and_line(tmp_path):
  good = _write(tmp_path / 'good.tsv.gz', b'Hallo\tHello\tk1\nWelt\tWorld\tk2\n')
  assert [p.target for p in readers.read_tsv_pairs(good)] == ['Hello', 'World']
  cases = {
      b'Hallo\tHello\tk1\nWelt\tWorld\n': r'fields.tsv.gz:2: expected 3 tab-separated fields, found 2',
      b'Hallo\tHello\tk1\n\xff\xfe\tWorld\tk2\n': r'utf8.tsv.gz:2: not valid UTF-8',
      b'Hallo\t \tk1\n': r'empty.tsv.gz:1: empty target',
      b'': r'nothing.tsv.gz: no pairs',
  }
  for (data, message), name in zip(cases.items(), ['fields', 'utf8', 'empty', 'nothing']):
    path = _write(tmp_path / f'{name}.tsv.gz', data)
    with pytest.raises(readers.CorpusFormatError, match=message):
      readers.read_tsv_pairs(path)
  corrupt = tmp_path / 'corrupt.tsv.gz'
  corrupt.write_bytes(open(good, 'rb').read()[:-6])  # Truncated gzip stream.
  with pytest.raises(readers.CorpusFormatError, match='corrupt.tsv.gz: corrupt or truncated'):
    readers.read_tsv_pairs(str(corrupt))
  with pytest.raises(readers.CorpusFileNotFound, match='missing.tsv.gz: no such corpus file'):
    readers.read_tsv_pairs(str(tmp_path / 'missing.tsv.gz'))


def test_aligned_text_reader(tmp_path):
  (tmp_path / 'train.de').write_text('a\nb\n')
  (tmp_path / 'train.en').write_text('A\n')
  with pytest.raises(readers.CorpusFormatError, match='has 2 lines but .*train.en has 1'):
    readers.read_aligned_text(str(tmp_path / 'train.de'), str(tmp_path / 'train.en'))
  (tmp_path / 'train.en').write_text('A\n\n')
  with pytest.raises(readers.CorpusFormatError, match=r'train.en:2: empty target'):
    readers.read_aligned_text(str(tmp_path / 'train.de'), str(tmp_path / 'train.en'))


def test_external_tasks_fail_with_preparation_hint(tmp_path, monkeypatch):
  monkeypatch.delenv('IWSLT14_DATA_DIR', raising=False)
  monkeypatch.delenv('WMT20_DATA_DIR', raising=False)
  translation.load_pairs.cache_clear()
  with pytest.raises(readers.CorpusFileNotFound, match='prepare-iwslt14.sh'):
    translation.load_pairs('iwslt14_de_en', 'train')
  monkeypatch.setenv('WMT20_DATA_DIR', str(tmp_path))
  with pytest.raises(readers.CorpusFileNotFound, match=r'train.zh not found.*newstest2020'):
    translation.load_pairs('wmt20_zh_en', 'train')


def test_iwslt_task_reads_fairseq_files(tmp_path, monkeypatch):
  for split in ('train', 'valid', 'test'):
    (tmp_path / f'{split}.de').write_text('ein klei@@ nes Haus\nder Hund\n' * 3)
    (tmp_path / f'{split}.en').write_text('a small house\nthe dog\n' * 3)
  monkeypatch.setenv('IWSLT14_DATA_DIR', str(tmp_path))
  translation.load_pairs.cache_clear()
  pairs = translation.load_pairs('iwslt14_de_en', 'validation')
  assert pairs[0].source == 'ein kleines Haus'  # BPE continuation markers removed.
  assert pairs[1].target == 'the dog' and len(pairs) == 6
  translation.load_pairs.cache_clear()
