"""Tests of the LibreOffice help corpus builder (tasks/corpora/libreoffice.py) and of
the corpus it shipped under tasks/data/libreoffice_help.

The builder is loaded from its file (standard library only), so these tests do not pay
for `import tasks`, which registers the SeqIO tasks (TensorFlow).
"""
import collections
import gzip
import hashlib
import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures', 'libreoffice')
DATA = os.path.join(ROOT, 'tasks', 'data', 'libreoffice_help')
PAGE = 'text/swriter/sample.html'


def _load_builder():
  name = 'tasks.corpora.libreoffice'
  if name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.spec_from_file_location(
      '_libreoffice_corpus_builder',
      os.path.join(ROOT, 'tasks', 'corpora', 'libreoffice.py'))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


lo = _load_builder()

# The exact de->en pairs of the fixture page, in key order, after dedup.  Left out:
# header/aside/footer chrome, the code block and the class="code" paragraph,
# par_id1008 (image only: empty), par_id1009 ("LibreOffice" in both: source ==
# target) and hd_id1011 (same pair as hd_id1010: duplicate).
EXPECTED_DE_EN = [
    ('Wählen Sie Extras - Optionen - Laden/Speichern.',
     'Choose Tools - Options - Load/Save.', 'a:landen#0'),
    ('Verwandte Themen', 'Related Topics', 'a:related#0'),
    ('Suchen & Ersetzen', 'Searching & replacing', 'a:search#0'),
    ('So greifen Sie auf diesen Befehl zu:', 'To access this command...', 'a:wie#0'),
    ('Text suchen', 'Finding Text', 'hd_id1000#0'),
    ('Optionen', 'Options', 'hd_id1010#0'),
    ('Ein Hinweis ohne ID.', 'A note without an id.', 'noid#0'),
    ('Verwenden Sie die Tastenkombination Strg + F.', 'Use the shortcut Ctrl + F.',
     'par_id1001#0'),
    ('Weitere Details finden Sie in der Symbolleiste Suchen.',
     'See the Find toolbar for details.', 'par_id1002#0'),
    ('Ordner verwenden / als Trennzeichen.', 'Folders use / as separator.',
     'par_id1003#0'),
    ('Wählen Sie zuerst die Zellen aus.', 'Select the cells first.', 'par_id1004#0'),
    ('Taste', 'Key', 'par_id1005#0'),
    ('Bewegt den Cursor nach unten.', 'Moves the cursor down.', 'par_id1006#0'),
    ('Wiederholter Absatz eins.', 'Repeated paragraph one.', 'par_id1007#0'),
    ('Wiederholter Absatz zwei.', 'Repeated paragraph two.', 'par_id1007#1'),
    ('Nur in Calc.', 'Only in Calc.', 'par_id1013#0'),
]


def _fixture_pages(lang):
  return lo.load_pages(FIXTURES, lang)


def test_extract_units_of_fixture_page():
  stats = collections.Counter()
  units = lo.extract_units(_fixture_pages('en-US')[PAGE], stats)
  assert units == [
      ('hd_id1000', 0, 'Finding Text'),
      ('par_id1001', 0, 'Use the shortcut Ctrl + F.'),  # MAC "Command" dropped
      ('par_id1002', 0, 'See the Find toolbar for details.'),  # link, emph, <br>
      ('par_id1003', 0, 'Folders use / as separator.'),  # WIN/UNIX: UNIX
      ('par_id1004', 0, 'Select the cells first.'),  # CALC/WRITER, no default: first
      ('par_id1005', 0, 'Key'),  # th paragraph
      ('par_id1006', 0, 'Moves the cursor down.'),  # td paragraph
      ('par_id1007', 0, 'Repeated paragraph one.'),
      ('par_id1007', 1, 'Repeated paragraph two.'),
      ('par_id1008', 0, ''),
      ('par_id1009', 0, 'LibreOffice'),
      ('hd_id1010', 0, 'Options'),
      ('hd_id1011', 0, 'Options'),
      ('par_id1013', 0, 'Only in Calc.'),  # paragraph in a block-level switch
      ('noid', 0, 'A note without an id.'),
      ('a:wie', 0, 'To access this command...'),
      ('a:landen', 0, 'Choose Tools - Options - Load/Save.'),
      ('a:related', 0, 'Related Topics'),  # <p> left open, ended by the <div>
      ('a:search', 0, 'Searching & replacing'),
  ]
  assert stats == {'switch_default': 2, 'switch_no_default_fallback': 2,
                   'noid_units': 1}


def test_align_fixture_exact_pairs():
  stats = collections.Counter()
  pairs = lo.align(_fixture_pages('de'), _fixture_pages('en-US'), stats)
  unique = lo.dedup(pairs)
  assert [tuple(p) for p in unique] == [(s, t, f'{PAGE}#{k}') for s, t, k in EXPECTED_DE_EN]
  assert len(pairs) == len(unique) + 1  # hd_id1011 duplicates hd_id1010
  assert stats['empty_side'] == 1 and stats['source_equals_target'] == 1
  assert stats['units_only_in_source'] == stats['units_only_in_target'] == 0


def test_pick_case_and_normalize():
  assert lo.pick_case([('MAC', 'Command'), ('default', 'Ctrl')]) == 'Ctrl'
  assert lo.pick_case([('default', '/'), ('WIN', '\\')]) == '/'
  assert lo.pick_case([('WIN', '\\'), ('UNIX', '/')]) == '/'
  assert lo.pick_case([('MAC', 'x'), ('IMPRESS', 'slide'), ('DRAW', 'page')]) == 'slide'
  assert lo.pick_case([('MAC', 'Command')]) == ''
  assert lo.normalize(' a\t\n b\u00a0 c ') == 'a b c'
  assert lo.normalize('zuru\u0308ck') == 'zur\u00fcck'  # NFC


def test_extract_units_nested_switch_and_mac_only():
  page = ('<div id="DisplayArea"><p id="p1">Press <span class="switchinline">'
          '<span hidden="true" id="MACx" class="MAC">Option</span></span>'
          '<span class="switchinline"><span hidden="true" class="MAC" id="MACy">'
          '<span class="keycode">Cmd</span></span><span hidden="true" id="defaulty">'
          '<span class="switchinline"><span hidden="true" id="WINz" class="WIN">Win'
          '</span><span hidden="true" id="defaultz">Ctrl</span></span>'
          '</span></span>+Z</p></div>')
  assert lo.extract_units(page) == [('p1', 0, 'Press Ctrl+Z')]


def _pair(src, tgt, path, uid='par_id1'):
  return lo.Pair(src, tgt, f'{path}#{uid}#0')


def test_document_split_rules():
  assert lo.document_split('text/schart/01/x.html') == 'test'
  assert lo.document_split('text/sdraw/main0000.html') == 'test'
  assert lo.document_split('text/schartx/a.html') != 'test'  # whole modules only
  # Hash rule: int(sha1(path), 16) % 100 < 3 -> dev.
  assert int(hashlib.sha1(b'text/swriter/p52.html').hexdigest(), 16) % 100 == 0
  assert int(hashlib.sha1(b'text/swriter/p20.html').hexdigest(), 16) % 100 == 2
  assert int(hashlib.sha1(b'text/swriter/a.html').hexdigest(), 16) % 100 == 10
  assert lo.document_split('text/swriter/p52.html') == 'dev'
  assert lo.document_split('text/swriter/p20.html') == 'dev'
  assert lo.document_split('text/swriter/a.html') == 'train'
  assert lo.document_split('text/swriter/a.html', dev_percent=11) == 'dev'
  assert lo.document_split('text/swriter/a.html', test_modules=('text/swriter',)) == 'test'


def test_split_removes_leakage_and_duplicates():
  test_page, dev_page = 'text/schart/t.html', 'text/swriter/p52.html'
  train_page = 'text/swriter/a.html'
  pairs = [
      _pair('Hallo', 'Hello', test_page),
      _pair('Welt', 'World', dev_page),
      _pair('Hallo', 'Howdy', dev_page, 'par_id2'),  # source in test -> out of dev
      _pair('Hallo', 'Hi', train_page),  # source in test -> out of train
      _pair('Erde', 'World', train_page, 'par_id2'),  # target in dev -> out of train
      _pair('Baum', 'Tree', train_page, 'par_id3'),
      _pair('Baum', 'Tree', train_page, 'par_id4'),  # duplicate within train
      _pair('Welt', 'World', train_page, 'par_id5'),  # same pair as dev -> out
  ]
  stats = collections.Counter()
  splits = lo.split(pairs, stats=stats)
  assert splits['test'] == [pairs[0]]
  assert splits['dev'] == [pairs[1]]
  assert splits['train'] == [pairs[5]]
  assert stats['dev_overlap_removed'] == 1
  assert stats['train_overlap_removed'] == 3
  assert stats['train_duplicate'] == 1


def test_write_tsv_is_deterministic_and_flattens(tmp_path):
  pairs = [lo.Pair('a\tb', 'c\nd', 'text/x.html#p#0'), lo.Pair('é', 'e', 'text/x.html#q#0')]
  one, two = tmp_path / 'one.tsv.gz', tmp_path / 'two.tsv.gz'
  assert lo.write_tsv(str(one), pairs) == 2
  lo.write_tsv(str(two), pairs)
  assert one.read_bytes() == two.read_bytes()
  assert gzip.decompress(one.read_bytes()).decode() == (
      'a b\tc d\ttext/x.html#p#0\né\te\ttext/x.html#q#0\n')


def test_load_pages_rejects_non_utf8(tmp_path):
  page = tmp_path / 'de' / 'text' / 'x'
  page.mkdir(parents=True)
  (page / 'bad.html').write_bytes(b'<p id="a">\xff</p>')
  with pytest.raises(RuntimeError, match='bad.html is not valid UTF-8'):
    lo.load_pages(str(tmp_path), 'de')


def test_missing_deb_names_the_package(tmp_path, monkeypatch):
  monkeypatch.setenv('PATH', str(tmp_path))  # no apt-get reachable
  with pytest.raises(RuntimeError, match='libreoffice-help-de'):
    lo.fetch_debs(str(tmp_path), str(tmp_path))


# ---- the shipped corpus -------------------------------------------------------------

@pytest.fixture(scope='module')
def shipped():
  out = {}
  for pair in ('de_en', 'zh_en'):
    for split in ('train', 'dev', 'test'):
      path = os.path.join(DATA, f'{pair}.{split}.tsv.gz')
      with gzip.open(path, 'rt', encoding='utf-8') as f:
        out[pair, split] = [line.rstrip('\n').split('\t') for line in f]
  return out


@pytest.mark.parametrize('pair', ['de_en', 'zh_en'])
def test_shipped_files_well_formed_and_disjoint(shipped, pair):
  sources, targets = {}, {}
  for split in ('train', 'dev', 'test'):
    rows = shipped[pair, split]
    assert len(rows) > 500
    for row in rows:
      assert len(row) == 3, row
      assert row[0] and row[1] and row[0] != row[1], row
      assert row[0] == row[0].strip() and row[1] == row[1].strip()
    sources[split] = {r[0] for r in rows}
    targets[split] = {r[1] for r in rows}
    assert len({(r[0], r[1]) for r in rows}) == len(rows)  # deduplicated
  for a, b in (('train', 'dev'), ('train', 'test'), ('dev', 'test')):
    assert not sources[a] & sources[b], (a, b)
    assert not targets[a] & targets[b], (a, b)
  assert all(lo.document_split(r[2].split('#')[0]) == 'test' for r in shipped[pair, 'test'])


def test_shipped_manifest_matches_files():
  with open(os.path.join(DATA, 'MANIFEST.json'), encoding='utf-8') as f:
    manifest = json.load(f)
  assert set(manifest['source_packages']) == set(lo.PACKAGES.values())
  for name, info in manifest['files'].items():
    with open(os.path.join(DATA, name), 'rb') as f:
      data = f.read()
    assert hashlib.sha256(data).hexdigest() == info['sha256'], name
    assert gzip.decompress(data).count(b'\n') == info['lines'], name
  with open(os.path.join(DATA, 'NOTICE'), encoding='utf-8') as f:
    notice = f.read()
  assert 'If a copy of the MPL was not distributed with this file' in notice
