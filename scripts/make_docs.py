"""Writes the tables of README.md and docs/results.md that come from committed JSON.

Each generated table sits between `<!-- BEGIN generated:NAME -->` and `<!-- END generated:NAME -->`
in a Markdown file; this script rewrites what is between them from the JSON it names, so that a
table cannot drift from the run that produced it:

| block | file | from |
|---|---|---|
| `headline` | README.md | results/rest_main_cpu/report.json, results/rest_em_main_cpu/report.json |
| `rest_stages` | docs/results.md | results/rest_main_cpu/report.json |
| `rest_em_iterations`, `rest_em_buckets` | docs/results.md | results/rest_em_main_cpu/report.json |
| `throughput` | docs/results.md | benchmarks/results/{grow,train}_{tiny,iwslt}.json |
| `fault_soak` | docs/reliability.md | results/fault_soak.json (`scripts/fault_soak.py`) |

    python scripts/make_docs.py           # rewrite the blocks in place
    python scripts/make_docs.py --check   # exit 1 (naming the blocks) if any is out of date

`tests/test_docs.py` runs the check. Standard library only.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REST = 'results/rest_main_cpu/report.json'
REST_EM = 'results/rest_em_main_cpu/report.json'
ONLINE = 'results/compare_online_rm_small/report.json'
ONLINE_TINY = 'results/compare_online_rm_tiny/report.json'
ONLINE_MATH = 'results/compare_online_arithmetic/report.json'
CONTROL_NAMES = {'sft_same_data': '(a) gold solutions of the same problems',
                 'unfiltered': '(b) every E-step sample, unverified',
                 'more_sft': '(c) more SFT on the gold set'}


def _load(path: str) -> dict:
  with open(os.path.join(ROOT, path)) as f:
    return json.load(f)


def _f(v, spec='.2f') -> str:
  return '' if v is None else format(v, spec) if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list[str]], right_from: int = 1) -> str:
  align = ['---' if i < right_from else '---:' for i in range(len(header))]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(align) + '|']
  return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in rows])


def _stage_label(s: dict) -> str:
  if s['grow'] == 0:
    return 'BC'
  tau = s['tau']
  return f"G={s['grow']}, I={s['improve']} (tau {'0.0' if tau == 0 else f'p{round(tau * 100)}'})"


def rest_stages() -> str:
  r = _load(REST)
  rows = []
  for s in r['stages']:
    rec = '' if s['num_train_records'] is None else (
        f"{s['num_train_records']:,} ({s['train_references']:,})")
    rows.append([_stage_label(s), rec, _f(s['dev_reward']), _f(s['test_reward']),
                 _f(s['test_oracle']), _f(s['test_rm_oracle_kendall'], '.3f'),
                 _f(s['test_bleu']), _f(s['test_chrf']), _f(s['minutes'], '.1f')])
  return _table(['stage', 'train records (references)', 'dev RM reward', 'test RM reward',
                 'test oracle', 'RM-oracle Kendall', 'test BLEU', 'test chrF', 'minutes'], rows)


def _em_row(name: str, it: dict, ks: list[str], solved_key: str) -> list[str]:
  p = lambda k: _f(it.get(k), '.1f')
  return ([name, _f(it.get('num_train_solutions')), _f(it.get(solved_key)), p('dev_pass1'),
           p('test_pass1'), p('test_hard_pass1'), p('pool_pass1')]
          + [_f(it['test_pass_at_k'][k], '.1f') for k in ks]
          + [_f(it['test_maj_at_k'][k], '.1f') for k in ks]
          + [_f(it.get('minutes', it.get('mstep_minutes', 0.0) + it.get('eval_minutes', 0.0)),
                '.1f')])


def _em_header(ks: list[str]) -> list[str]:
  return (['', 'train solutions', 'problems', 'dev pass@1', 'test pass@1', 'test_hard pass@1',
           'pool pass@1'] + [f'pass@{k}' for k in ks] + [f'maj@{k}' for k in ks] + ['minutes'])


def rest_em_iterations() -> str:
  r = _load(REST_EM)
  ks = sorted(r['iterations'][0]['test_pass_at_k'], key=int)
  rows = [_em_row('base' if it['iteration'] == 0 else f"iteration {it['iteration']}"
                  + (' (best on dev)' if it['iteration'] == r['best_iteration'] else ''),
                  it, ks, 'num_problems_solved') for it in r['iterations']]
  rows += [_em_row(CONTROL_NAMES[n], c, ks, 'num_problems') for n, c in r['controls'].items()]
  return _table(_em_header(ks), rows)


def rest_em_buckets() -> str:
  r = _load(REST_EM)
  its = r['iterations']
  buckets = sorted({b for it in its for b in it['test_buckets']},
                   key=lambda b: tuple(int(x) for x in re.findall(r'\d+', b)))
  rows = [[it['name']] + [_f(it['test_buckets'].get(b), '.1f') for b in buckets]
          + [_f(it['test_hard_pass1'], '.1f')] for it in its]
  return _table(['test, greedy'] + buckets + ['test_hard (t6d2)'], rows)


def headline() -> str:
  r, e = _load(REST), _load(REST_EM)
  bc = r['stages'][0]
  best = max(r['stages'], key=lambda s: s['dev_reward'])
  base, top = e['iterations'][0], e['iterations'][e['best_iteration']]
  a = e['controls'].get('sft_same_data', {})
  rows = [
      ['ReST, `libreoffice_help_de_en` (`bash scripts/main.sh`)', 'test RM reward',
       _f(bc['test_reward']), f"{_f(best['test_reward'])} ({best['name']})",
       f"test oracle {_f(bc['test_oracle'])} -> {_f(best['test_oracle'])}; "
       f"BLEU {_f(bc['test_bleu'])} -> {_f(best['test_bleu'])}"],
      ['ReST-EM, `arithmetic_chain` (`bash scripts/main.sh rest-em`)', 'test pass@1 (greedy)',
       _f(base['test_pass1']), f"{_f(top['test_pass1'])} (iteration {top['iteration']})",
       f"control (a) same problems' gold solutions: {_f(a.get('test_pass1'))}; "
       f"maj@16 {_f(base['test_maj_at_k'].get('16'))} -> {_f(top['test_maj_at_k'].get('16'))}"],
  ]
  for path, rm in ((ONLINE, '`rm_small`'), (ONLINE_TINY, "the main job's `rm_tiny`")):
    if not os.path.exists(os.path.join(ROOT, path)):
      continue
    r = _load(path)
    o = {row['method'].split(' @ ')[0].split(' (')[0]: row for row in r['rows']}
    at = lambda m: (f"{_f(o[m]['test_reward'])} / {_f(o[m]['test_oracle'])} / "
                    f"{_f(o[m]['test_bleu'])}" + (' (alarm)' if o[m].get('name') in r[
                        'alarms'].get(m.split(' ')[0], []) else ''))
    rows.append([f'ReST vs online RL, `libreoffice_help_de_en`, 8k samples, {rm} '
                 '(`python scripts/compare_online.py`)', 'test reward / oracle / BLEU',
                 f"BC {at('BC')}", f"ReST G = 2 {at('ReST G = 2')}",
                 f"PPO {at('PPO')}; GRPO {at('GRPO')}"])
  if os.path.exists(os.path.join(ROOT, ONLINE_MATH)):
    r = _load(ONLINE_MATH)
    base = r['rows'][0]
    em = [row for row in r['rows'] if row['method'].startswith('ReST-EM')]
    grpo = [row for row in r['rows'] if row['method'].startswith('GRPO')]
    # Pairs at (about) equal samples: ReST-EM's iterations draw 8,000, GRPO's budgets 8,192.
    pairs = [(e, g) for e in em for g in grpo
             if abs(g['samples'] - e['samples']) <= 0.05 * g['samples']]
    at = lambda i: '; '.join(f"{p[i]['samples']:,}: {_f(p[i]['test_pass1'], '.1f')} / "
                             f"{_f(p[i]['pool_pass1'], '.1f')}" for p in pairs)
    rows.append([f"ReST-EM vs GRPO, `arithmetic_chain`, verifier `{r['reward']}` "
                 '(`python scripts/compare_online.py --task=arithmetic_chain`)',
                 'test / pool pass@1 (greedy) at equal samples',
                 f"base {_f(base['test_pass1'], '.1f')} / {_f(base['pool_pass1'], '.1f')}",
                 f'ReST-EM {at(0)}', f'GRPO {at(1)}'])
  return _table(['main job', 'measure', 'start', 'best on dev', 'beside it'], rows, right_from=9)


def throughput() -> str:
  rows = []
  for kind, what in (('grow', 'generated tok/s'), ('train', 'target tok/s')):
    for arch in ('tiny', 'iwslt'):
      b = _load(f'benchmarks/results/{kind}_{arch}.json')
      if kind == 'grow':
        peer = (f"HF {b['hf_tokens_per_s']:,.0f} / CTranslate2 {b['ct2_tokens_per_s']:,.0f}")
        ratio = f"{b['ratio_vs_hf']:.2f}x / {b['ratio_vs_ct2']:.2f}x"
        ours = b['rest_jax_tokens_per_s']
      else:
        peer, ours = f"PyTorch + HF Marian {b['torch_tokens_per_s']:,.0f}", b['rest_jax_tokens_per_s']
        ratio = f"{b['ratio']:.2f}x"
      rows.append([f'`{kind}_throughput.py --arch {arch}` ({what})', f'{ours:,.0f}', peer, ratio,
                   b['timestamp'][:10]])
  real = 'benchmarks/results/grow_real_tiny.json'
  if os.path.exists(os.path.join(ROOT, real)):
    b = _load(real)
    rows.append([f"`grow_real.py`: `rest-jax grow`'s sampling, {b['num_sources']:,} real train "
                 'sources, EOS on (generated tok/s)', f"{b['real_tokens_per_s']:,.0f}",
                 f"the synthetic `tiny` Grow {b['synthetic_tokens_per_s']:,.0f} (same run, "
                 f"{len(b.get('rounds', [1]))} alternating rounds)",
                 f"{b['ratio']:.2f}x", b['timestamp'][:10]])
  return _table(['benchmark', 'rest-jax', 'peer(s)', 'ratio', 'measured'], rows, right_from=1)


SOAK = 'results/fault_soak.json'


def fault_soak() -> str:
  if not os.path.exists(os.path.join(ROOT, SOAK)):
    return f'(No soak result committed: `{SOAK}` is written by `scripts/fault_soak.py`.)'
  r = _load(SOAK)
  counts = ', '.join(f'{stage} {n}' for stage, n in
                     collections.Counter(k['stage'] for k in r['kill_points']).items())
  rows = [[f"random SIGKILL of the whole main job ({r['kills']} kills, {r['rounds']} starts, "
           f"{r['wall_minutes']:.0f} min)", str(r['kills']),
           f"{r['survived']} of {r['kills']}", str(r['records_lost']),
           str(r['records_duplicated']), 'yes' if r['report_equal'] else 'NO',
           f"`{r['command']}`"]]
  table = _table(['fault', 'injected', 'survived', 'records lost', 'records duplicated',
                  'report equal to the reference', 'command'], rows, right_from=1)
  recs = '; '.join(f"{d}: {v['distinct']} of {v['reference_report']}"
                   for d, v in r['records'].items())
  return (f'{table}\n\nKills landed in (the stage folder being written when the kill came): '
          f'{counts}. Records read back by key after the last restart: {recs}. Run on '
          f'{r["date"]}.')


def online_comparison(path: str = ONLINE) -> str:
  """ReST vs PPO / GRPO at equal training samples (`scripts/compare_online.py`)."""
  if not os.path.exists(os.path.join(ROOT, path)):
    return f'(No comparison committed: `{path}` is written by `scripts/compare_online.py`.)'
  return online_table(_load(path))


def online_table(r: dict) -> str:
  """The table of a `scripts/compare_online.py` report (its report.md uses it too)."""
  alarmed = {(m, s) for m, stages in r['alarms'].items() for s in stages}
  rows = [[row['method'], f"{row['samples']:,}", _f(row.get('test_reward')),
           _f(row.get('test_oracle')), _f(row.get('test_bleu')), _f(row.get('test_chrf')),
           _f(row.get('wall_minutes'), '.1f'),
           'yes' if (row['method'].split(' ')[0], row.get('name')) in alarmed else '']
          for row in r['rows']]
  return _table(['method', 'training samples', 'test reward', 'test oracle', 'test BLEU',
                 'test chrF', 'wall minutes', 'alarm'], rows, right_from=1)


def online_comparison_math() -> str:
  """ReST-EM vs GRPO at equal training samples (`compare_online.py --task=arithmetic_chain`)."""
  if not os.path.exists(os.path.join(ROOT, ONLINE_MATH)):
    return (f'(No comparison committed: `{ONLINE_MATH}` is written by `scripts/compare_online.py '
            '--task=arithmetic_chain`.)')
  return online_math_table(_load(ONLINE_MATH))


def online_math_table(r: dict) -> str:
  """The table of a `scripts/compare_online.py --task=arithmetic_chain` report."""
  rows = [[row['method'], f"{row['samples']:,}", _f(row.get('test_pass1'), '.1f'),
           _f(row.get('pool_pass1'), '.1f'), _f(row.get('dev_pass1'), '.1f'),
           _f(row.get('wall_minutes'), '.1f')] for row in r['rows']]
  return _table(['method', 'training samples', 'test pass@1', 'pool pass@1', 'dev pass@1',
                 'wall minutes'], rows, right_from=1)


BLOCKS = {'README.md': {'headline': headline, 'throughput': throughput},
          'docs/reliability.md': {'fault_soak': fault_soak},
          'docs/results.md': {'rest_em_iterations': rest_em_iterations,
                              'rest_em_buckets': rest_em_buckets, 'rest_stages': rest_stages,
                              'throughput': throughput,
                              'online_comparison': online_comparison,
                              'online_comparison_rm_tiny': lambda: online_comparison(ONLINE_TINY),
                              'online_comparison_math': online_comparison_math}}


def render(text: str, blocks: dict) -> str:
  """`text` with every generated block replaced; ValueError if a block's markers are missing."""
  for name, fn in blocks.items():
    pat = re.compile(rf'(<!-- BEGIN generated:{name} -->\n)(?:.*?\n)?(<!-- END generated:{name} -->)',
                     re.S)
    if not pat.search(text):
      raise ValueError(f'no markers for the generated block {name!r}')
    text = pat.sub(lambda m: m.group(1) + fn() + '\n' + m.group(2), text)
  return text


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--check', action='store_true', help='fail if a block is out of date')
  args = parser.parse_args(argv)
  stale = []
  for path, blocks in BLOCKS.items():
    full = os.path.join(ROOT, path)
    with open(full) as f:
      old = f.read()
    new = render(old, blocks)
    if new != old:
      stale.append(path)
      if not args.check:
        with open(full, 'w') as f:
          f.write(new)
  if args.check and stale:
    print(f'out of date: {", ".join(stale)}; run `python scripts/make_docs.py`', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
