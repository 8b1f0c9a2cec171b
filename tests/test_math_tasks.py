"""The ReST-EM problem-solving tasks: the arithmetic_chain generator, its vocabulary, GSM8K."""

import collections
import os
import re
import shutil

import gin
import numpy as np
import pytest
import seqio
import sentencepiece as spm
import tensorflow_datasets as tfds

import tasks
from tasks import math as math_tasks
from tasks import readers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GSM8K_FIXTURE = os.path.join(ROOT, 'tests', 'fixtures', 'gsm8k')
STEP = re.compile(r'(\d+) ([+-]) (\d+) = (\d+)')


def _splits(**overrides):
  return math_tasks.generate_arithmetic_chain(
      {**math_tasks.default_arithmetic_settings(), **overrides})


def test_generator_is_reproducible_and_seeded():
  a = _splits()
  math_tasks._generate_cached.cache_clear()  # Really generate again, not the memoised copy.
  b = _splits()
  assert a == b and a is not b
  assert math_tasks.generate_arithmetic_chain() == a  # No gin bindings: the defaults.
  other = _splits(seed=1)
  for split in a:
    assert len(other[split]) == len(a[split])
    assert [p.inputs for p in other[split]] != [p.inputs for p in a[split]], split


def test_split_sizes_keys_and_no_shared_expressions():
  splits = _splits()
  assert {s: len(v) for s, v in splits.items()} == {
      'train': 2000, 'pool': 4000, 'validation': 200, 'test': 500, 'test_hard': 300}
  everything = [p.inputs for v in splits.values() for p in v]
  assert len(set(everything)) == len(everything)  # No duplicate anywhere, within or across.
  seen = {p.inputs for s in ('train', 'pool') for p in splits[s]}
  for split in ('test', 'test_hard', 'validation'):
    assert not seen & {p.inputs for p in splits[split]}, split
  for split, problems in splits.items():
    for i, p in enumerate(problems):
      assert p.key.startswith(f'arithmetic_chain/{split}/{i:05d}/t'), p.key


def test_solutions_are_right_and_follow_the_expression():
  minus = plus = 0
  for split, problems in _splits().items():
    for p in problems:
      tokens = p.inputs.split(' ')
      numbers, ops = [int(t) for t in tokens[::2]], tokens[1::2]
      terms, digits = map(int, re.fullmatch(r't(\d+)d(\d+)', math_tasks.bucket_of_key(p.key)).groups())
      assert len(numbers) == terms and all(len(str(n)) == digits for n in numbers), p
      body, answer = p.targets.split(' #### ')
      steps = body.split(' ; ')
      assert len(steps) == terms - 1, p
      total = numbers[0]
      for step, op, n in zip(steps, ops, numbers[1:]):
        m = STEP.fullmatch(step)
        assert m, step
        a, o, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        assert (a, o, b) == (total, op, n), p
        assert c == (a + b if o == '+' else a - b) and c >= 0, p
        total = c
      assert int(answer) == total == eval(p.inputs), p  # Python's +/- also go left to right.
      minus, plus = minus + ops.count('-'), plus + ops.count('+')
  # '-' is drawn half the time, but becomes '+' where the total would go negative.
  assert 0.25 < minus / (minus + plus) < 0.5


def test_buckets_are_roughly_uniform():
  splits = _splits()
  test = collections.Counter(math_tasks.bucket_of_key(p.key) for p in splits['test'])
  assert set(test) == {f't{t}d{d}' for t in range(2, 6) for d in (1, 2)}
  assert all(0.6 * 500 / 8 < c < 1.4 * 500 / 8 for c in test.values()), test
  assert {math_tasks.bucket_of_key(p.key) for p in splits['test_hard']} == {'t6d2'}
  # The big buckets stay uniform in the later splits too (t2d1 has 126 chains, t3d1 ~1,400).
  pool = collections.Counter(math_tasks.bucket_of_key(p.key) for p in splits['pool'])
  big = [pool[f't{t}d{d}'] for t, d in [(2, 2), (3, 2), (4, 2), (5, 2), (4, 1), (5, 1)]]
  assert max(big) < 1.3 * min(big), pool
  assert math_tasks.bucket_of_key('arithmetic_chain/train/00007/t3d2') == 't3d2'
  with pytest.raises(ValueError, match='not an arithmetic_chain key'):
    math_tasks.bucket_of_key('gsm8k/test/7')


def test_settings_are_validated_and_exhaustion_is_an_error():
  with pytest.raises(ValueError, match='terms'):
    math_tasks.arithmetic_settings(terms=(1, 3))
  with pytest.raises(ValueError, match='negative'):
    math_tasks.arithmetic_settings(test=-1)
  tiny = math_tasks.arithmetic_settings(terms=(2, 2), digits=(1, 1), train=0, pool=0,
                                        validation=0, test=300, test_hard=0)
  with pytest.raises(ValueError, match=r'arithmetic_chain/test: only \d+ of 300'):
    math_tasks.generate_arithmetic_chain(tiny)


def test_fingerprint_follows_every_generator_setting():
  base = tasks.data_fingerprint('arithmetic_chain')
  assert re.fullmatch(r'[0-9a-f]{16}', base)
  assert base == math_tasks.arithmetic_fingerprint(math_tasks.default_arithmetic_settings())
  seen = {base}
  for name, value in [('seed', 1), ('pool', 3999), ('digits', (1, 3)), ('hard_bucket', (7, 2))]:
    gin.clear_config()
    gin.bind_parameter(f'arithmetic_settings.{name}', value)
    fingerprint = tasks.data_fingerprint('arithmetic_chain')
    assert fingerprint not in seen, name
    seen.add(fingerprint)
  gin.clear_config()
  assert tasks.data_fingerprint('arithmetic_chain') == base
  assert tasks.data_fingerprint('libreoffice_help_de_en') == ''
  with pytest.raises(KeyError):
    tasks.data_fingerprint('no_such_task')


def test_vocabulary_splits_digits_and_round_trips_every_example(tmp_path, monkeypatch):
  voc = seqio.get_mixture_or_task('arithmetic_chain').output_features['targets'].vocabulary
  assert voc.sentencepiece_model_file == math_tasks.arithmetic_vocab_path()
  assert voc.vocab_size == math_tasks.ARITHMETIC_VOCAB_SIZE == 29
  assert (voc.pad_id, voc.eos_id, voc.unk_id) == (0, 1, 2)
  proc = voc.tokenizer
  pieces = [proc.id_to_piece(i) for i in range(proc.get_piece_size())]
  assert all(sum(ch.isdigit() for ch in piece) <= 1 for piece in pieces), pieces
  assert proc.encode('1234567890 ####', out_type=str) == ['▁', *'1234567890', '▁####']
  longest = 0
  for problems in _splits().values():
    for p in problems:
      for text in (p.inputs, p.targets):
        ids = proc.encode(text)
        assert proc.unk_id() not in ids and proc.decode(ids) == text, text
      longest = max(longest, len(proc.encode(p.targets)) + 1)
  assert longest == 74  # test_hard's longest solution + EOS: rest_em's targets_length 128 holds it.
  gin_text = open(os.path.join(ROOT, 'gin_configs', 'models', 'tiny_math.gin')).read()
  assert int(re.search(r'vocab_size = (\d+)', gin_text)[1]) >= voc.vocab_size
  # The shipped model is exactly what a rebuild gives.
  monkeypatch.setattr(math_tasks, 'MATH_DIR', str(tmp_path))
  rebuilt = math_tasks.build_arithmetic_vocab()
  assert rebuilt.startswith(str(tmp_path))
  assert open(rebuilt, 'rb').read() == open(voc.sentencepiece_model_file, 'rb').read()


def test_seqio_task_yields_expected_features():
  from rest_jax import input_pipeline
  data = input_pipeline.load_task_data('arithmetic_chain', 'validation', 64, 128)
  gold = _splits()['validation']
  assert data.inputs == [p.inputs for p in gold]
  assert data.targets == [p.targets for p in gold]
  assert data.keys == [p.key for p in gold] and data.num_truncated == 0
  assert data.arrays['encoder_input_tokens'].shape == (200, 64)
  assert data.arrays['decoder_target_tokens'].shape == (200, 128)
  proc = spm.SentencePieceProcessor(model_file=math_tasks.arithmetic_vocab_path())
  for i in (0, 17, 199):  # TF's tokenization is the Python one, EOS = 1 appended.
    ids = proc.encode(gold[i].targets) + [1]
    np.testing.assert_array_equal(data.arrays['decoder_target_tokens'][i, :len(ids)], ids)
    assert not data.arrays['decoder_target_tokens'][i, len(ids):].any()
  detok = input_pipeline.detokenizer('arithmetic_chain')
  assert detok(data.arrays['decoder_target_tokens'][5]) == gold[5].targets


def test_ids_past_the_pieces_decode_as_unk_and_fail_the_verifier():
  # The math model's embedding has 32 rows for 29 pieces; GRPO at temperature 1 sampled ids
  # 29-31 and the detokenizer raised 'piece id is out of range'.
  from rest_jax import input_pipeline
  from rest_jax.rewards import verifiers
  proc = spm.SentencePieceProcessor(model_file=math_tasks.arithmetic_vocab_path())
  detok = input_pipeline.detokenizer('arithmetic_chain')
  assert proc.get_piece_size() == 29
  good = proc.encode('#### 12')
  assert detok(good + [1, 30]) == '#### 12'  # Past EOS: never decoded.
  text = detok(good[:-1] + [31] + [1])
  assert '\u2047' in text and verifiers.verify(text, '12').reward == 0.0
  assert verifiers.verify(detok(good), '12').reward == 1.0


@pytest.fixture
def gsm8k_dir(tmp_path, monkeypatch):
  data_dir = tmp_path / 'gsm8k'
  shutil.copytree(GSM8K_FIXTURE, data_dir)
  monkeypatch.setenv('GSM8K_DATA_DIR', str(data_dir))
  return data_dir


def test_gsm8k_fixture_loads(gsm8k_dir):
  gin.bind_parameter('gsm8k_validation_size.value', 2)
  train, pool = math_tasks.load_gsm8k('train'), math_tasks.load_gsm8k('pool')
  validation, test = math_tasks.load_gsm8k('validation'), math_tasks.load_gsm8k('test')
  assert (len(train), len(pool), len(validation), len(test)) == (6, 6, 2, 4)
  assert [p.key for p in validation] == ['gsm8k/validation/7', 'gsm8k/validation/8']
  assert [p.inputs for p in pool] == [p.inputs for p in train]
  assert train[0].inputs.startswith('Mia picked 12 apples')
  assert train[0].targets.endswith('\n#### 36') and '<<12*2=24>>' in train[0].targets
  source = seqio.get_mixture_or_task('gsm8k').source
  rows = list(tfds.as_numpy(source.get_dataset('test')))
  assert [r['key'].decode() for r in rows] == [f'gsm8k/test/{i}' for i in range(1, 5)]
  assert rows[3]['targets'].decode() == test[3].targets
  fingerprint = tasks.data_fingerprint('gsm8k')
  with open(gsm8k_dir / 'test.jsonl', 'a') as f:
    f.write('{"question": "What is 1 + 1?", "answer": "1 + 1 = 2\\n#### 2"}\n')
  assert tasks.data_fingerprint('gsm8k') not in ('', fingerprint)
  assert len(math_tasks.load_gsm8k('test')) == 5  # Edited files are read again.
  gin.clear_config()
  with pytest.raises(readers.CorpusFormatError, match='train.jsonl: 8 problems; cannot hold out'):
    math_tasks.load_gsm8k('train')  # The default 500 lines of validation.


def test_gsm8k_vocabulary_is_located_on_first_use(gsm8k_dir):
  shutil.copy(math_tasks.arithmetic_vocab_path(), gsm8k_dir / 'spm_1000.model')  # A stand-in.
  voc = math_tasks.get_vocabulary('gsm8k')
  assert voc.vocab_size == 29  # Found in $GSM8K_DATA_DIR, set after registration.
  assert voc.sentencepiece_model_file == str(gsm8k_dir / 'spm_1000.model')


def test_gsm8k_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
  monkeypatch.delenv('GSM8K_DATA_DIR', raising=False)
  with pytest.raises(readers.CorpusFileNotFound, match='data folder None not found.*grade-school-math.*GSM8K_DATA_DIR'):
    math_tasks.load_gsm8k('test')
  gin.bind_parameter('gsm8k_data_dir.value', str(tmp_path))
  with pytest.raises(readers.CorpusFileNotFound,
                     match=rf'{re.escape(str(tmp_path / "test.jsonl"))} not found.*grade-school-math'):
    math_tasks.load_gsm8k('test')


@pytest.mark.parametrize('line, message', [
    ('{"question": "Q?", "answer": "A #### 1"', r'train.jsonl:3: not valid JSON'),
    ('{"question": "Q?"}', r"train.jsonl:3: missing or empty 'answer'"),
    ('{"question": "Q?", "answer": "It is 4."}', r'train.jsonl:3: answer has no final'),
])
def test_gsm8k_malformed_line_names_file_and_line(gsm8k_dir, line, message):
  lines = (gsm8k_dir / 'train.jsonl').read_text().splitlines()
  lines[2] = line
  (gsm8k_dir / 'train.jsonl').write_text('\n'.join(lines) + '\n')
  with pytest.raises(readers.CorpusFormatError, match=message):
    math_tasks.load_gsm8k('train')
