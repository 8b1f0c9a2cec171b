"""The docs' generated tables equal what `scripts/make_docs.py` writes from the committed JSON."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import make_docs  # noqa: E402


def test_generated_tables_are_up_to_date():
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'make_docs.py'), '--check'],
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr


def test_render_replaces_only_the_block_and_needs_its_markers():
  text = 'a\n<!-- BEGIN generated:x -->\nold\nolder\n<!-- END generated:x -->\nb\n'
  want = 'a\n<!-- BEGIN generated:x -->\nnew\n<!-- END generated:x -->\nb\n'
  assert make_docs.render(text, {'x': lambda: 'new'}) == want
  assert make_docs.render(want, {'x': lambda: 'new'}) == want  # Idempotent.
  empty = 'a\n<!-- BEGIN generated:x -->\n<!-- END generated:x -->\nb\n'
  assert make_docs.render(empty, {'x': lambda: 'new'}) == want
  with pytest.raises(ValueError, match="'y'"):
    make_docs.render(text, {'y': lambda: 'new'})


def test_readme_stays_an_entry_point():
  with open(os.path.join(ROOT, 'README.md')) as f:
    lines = f.read().splitlines()
  assert len(lines) <= 160
  assert any('bash scripts/main.sh' in l for l in lines)
  assert any('bash scripts/test.sh' in l for l in lines)
