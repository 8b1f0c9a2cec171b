"""The benchmark scripts run (rest-jax side only, tiny shapes). The figures are not checked, but
the scripts' own checks are: the synthetic Grow asserts every sample ran its full length (EOS
disabled) and the real Grow reads its manifest. (A refactor once broke every benchmark script's
import without a failing test.)"""

import importlib
import json
import os
import sys


BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks')


def _bench(name):
  if BENCH not in sys.path:
    sys.path.insert(0, BENCH)
  return importlib.import_module(name)


def test_grow_throughput_rest_jax_side(tmp_path):
  out = _bench('grow_throughput').main(
      ['--arch', 'tiny', '--sides', 'rest_jax', '--batch', '2', '--src-len', '8',
       '--num-decodes', '2', '--new-tokens', '4', '--repeats', '1', '--warmup', '0',
       '--json', str(tmp_path / 'grow.json')])
  saved = json.loads((tmp_path / 'grow.json').read_text())
  assert saved['settings']['tokens_per_run'] == 16 == out['settings']['tokens_per_run']
  assert saved['rest_jax_tokens_per_s'] > 0 and saved['hf_tokens_per_s'] is None


def test_train_throughput_rest_jax_side(tmp_path):
  _bench('train_throughput').main(
      ['--arch', 'tiny', '--no-torch', '--dtype', 'float32', '--batch', '2', '--src-len', '8',
       '--tgt-len', '8', '--steps', '1', '--repeats', '1', '--warmup', '1',
       '--json', str(tmp_path / 'train.json')])
  saved = json.loads((tmp_path / 'train.json').read_text())
  assert saved['rest_jax_tokens_per_s'] > 0 and saved.get('torch_tokens_per_s') is None


def test_grow_real(tmp_path, monkeypatch):
  gt = _bench('grow_throughput')
  synthetic = gt.main
  monkeypatch.setattr(gt, 'main', lambda argv: synthetic(
      argv + ['--batch', '2', '--src-len', '8', '--num-decodes', '2', '--new-tokens', '4',
              '--warmup', '0']))
  out = _bench('grow_real').main(['--num-sources', '6', '--source-every', '5000', '--repeats',
                                  '1', '--rounds', '2', '--json', str(tmp_path / 'real.json')])
  saved = json.loads((tmp_path / 'real.json').read_text())
  assert saved['real']['warm']['counts']['sources'] == 6 == out['num_sources']
  assert saved['real']['warm']['counts']['samples_drawn'] == 48
  assert saved['real']['cold']['counts'] == saved['real']['warm']['counts']
  rounds = saved['rounds']
  assert len(rounds) == 2
  for r in rounds:
    assert r['ratio'] == r['real_tokens_per_s'] / r['synthetic_tokens_per_s']
  median = min(rounds, key=lambda r: r['ratio'])  # the lower middle of two rounds
  assert saved['ratio'] == median['ratio']
  assert saved['ratio'] == saved['real_tokens_per_s'] / saved['synthetic_tokens_per_s']
