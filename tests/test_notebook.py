"""notebooks/quickstart.ipynb runs on CPU with its tiny parameters (papermill) and shows the report.

Colab itself is not exercised: the install cell is off (`install = False`), the kernel is this
environment's.
"""

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'quickstart.ipynb')


def _markdown_outputs(nb) -> list[str]:
  """The text of every Markdown display (IPython.display.Markdown) in the executed notebook."""
  return [''.join(o['data']['text/markdown']) for c in nb['cells'] for o in c.get('outputs', [])
          if 'text/markdown' in o.get('data', {})]


def test_committed_without_outputs():
  nb = json.load(open(NOTEBOOK))
  code = [c for c in nb['cells'] if c['cell_type'] == 'code']
  assert all(not c['outputs'] and c['execution_count'] is None for c in code)
  assert 'parameters' in code[0]['metadata'].get('tags', [])
  assert 'install = False' in ''.join(code[0]['source'])


def test_quickstart_runs_a_tiny_loop(tmp_path, monkeypatch):
  import jax
  import papermill
  # The kernel shares this session's XLA cache (conftest.py): the tiny loop compiles what
  # tests/test_rest.py's tiny loop compiles.
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', jax.config.jax_compilation_cache_dir)
  monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
  out = tmp_path / 'quickstart.out.ipynb'
  workdir = tmp_path / 'work'
  papermill.execute_notebook(NOTEBOOK, str(out), parameters={'workdir': str(workdir)},
                             cwd=ROOT, kernel_name='python3', progress_bar=False,
                             execution_timeout=600)
  nb = json.load(open(out))
  [table] = _markdown_outputs(nb)  # report.md, shown as Markdown.
  assert table == (workdir / 'report.md').read_text()
  assert '| bc |' in table and '| G1I1 |' in table and '| G1I2 |' not in table
  images = [o for c in nb['cells'] for o in c.get('outputs', []) if 'image/png' in o.get('data', {})]
  pngs = sorted(os.listdir(workdir / 'plots'))
  assert len(images) == len(pngs) >= 2 and 'reward_per_stage.png' in pngs
  assert (workdir / 'report.json').exists()
