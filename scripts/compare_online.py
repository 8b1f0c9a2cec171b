"""ReST against online RL (PPO, GRPO) at equal training samples: the shape of ReST's Table 1.

    python scripts/compare_online.py --workdir=DIR [--rm_dir=checkpoints/rm_small_libreoffice_de_en]
        [--budgets=4096,8192] [--algorithms=ppo,grpo] [--rest_workdir=DIR] [--gin.NAME=VALUE ...]

runs, each in its own folder of DIR and each resumable (rerun the command after a kill):

* `rest/`: the main job's ReST loop (`gin_configs/runs/rest_libreoffice_de_en_cpu.gin`: 500
  train sources x 8 samples per Grow, G = 2 Grows of 4 Improve steps) with the reward model
  `--rm_dir` instead of one trained on its Grow, so that every method optimises the same
  reward; or, with `--rest_workdir`, a finished ReST run's report;
* `ppo/`, `grpo/`: `rest-jax online` from the same BC policy with the same reward model
  (`gin_configs/runs/ppo_libreoffice_de_en_cpu.gin`; GRPO: the same file with
  `online.algorithm = 'grpo'`, its KL a loss term), up to the largest budget, a stage at
  every budget (`online.eval_every_samples` = the budgets' gcd);

then writes `DIR/report.json`, `DIR/report.md` (a table: BC; ReST G = 1 / G = 2 at their best
Improve step on dev; PPO and GRPO at each budget: training samples, test reward, test oracle
(chrF+TER vs the reference), BLEU, chrF, minutes, reward-hacking alarms) and
`DIR/reward_vs_samples.png`. Training samples are the samples drawn for training (ReST: the
Grows' samples, references not counted; online RL: rollout samples); evaluation decodes are not
counted. Extra `--gin.` flags go to every run.

With `--task=arithmetic_chain`: ReST-EM (`gin_configs/runs/rest_em_arithmetic_cpu.gin`, no
controls; `--gin.grow.num_decodes=N` sets its E-step's samples per pool problem) in `rest_em/`
(or `--rest_workdir`, a finished ReST-EM run) against GRPO (`gin_configs/runs/
grpo_arithmetic_cpu.gin`; `--gin.online.` flags go to it alone) in `grpo/`, both with ReST-EM's
binary verifier (its report's `reward`, 'verifier_steps' in its config): a table of test / pool / dev pass@1 (greedy) and minutes against training samples
(ReST-EM: its E-steps' samples), and `pass1_vs_samples.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import make_docs  # scripts/: the table of report.md is the docs' table.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REST_GIN = 'gin_configs/runs/rest_libreoffice_de_en_cpu.gin'
ONLINE_GIN = 'gin_configs/runs/ppo_libreoffice_de_en_cpu.gin'
REST_EM_GIN = 'gin_configs/runs/rest_em_arithmetic_cpu.gin'
GRPO_MATH_GIN = 'gin_configs/runs/grpo_arithmetic_cpu.gin'


def _run(args: list[str]) -> None:
  cmd = [sys.executable, '-m', 'rest_jax.main'] + args
  print('+', ' '.join(cmd), flush=True)
  subprocess.run(cmd, cwd=ROOT, check=True)


def _load(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def rest_rows(report: dict) -> list[dict]:
  """BC and, per Grow g, its best Improve stage by dev reward (the first of equals); samples =
  the Grows' samples; wall_minutes = the loop's minutes up to the end of Grow g's last Improve
  step (its Grows, scorings, Improve steps and evaluations: what choosing that stage cost)."""
  stages = report['stages']
  grows = {g['grow']: g for g in report['grows']}
  rows = [dict(stages[0], method='BC', samples=0, wall_minutes=stages[0]['minutes'])]
  for g in sorted(grows):
    mine = [s for s in stages if s.get('grow') == g and s.get('improve') is not None]
    if mine:
      best = max(mine, key=lambda s: s['dev_reward'])
      upto = [s for s in stages if (s.get('grow') or 0) <= g]
      minutes = sum(s['minutes'] for s in upto) + sum(
          grows[h]['grow_minutes'] + grows[h]['score_minutes'] for h in grows if h <= g)
      rows.append(dict(best, method=f'ReST G = {g} ({best["name"]})',
                       samples=sum(grows[h]['samples_drawn'] for h in grows if h <= g),
                       wall_minutes=minutes))
  return rows


def rest_em_rows(report: dict) -> list[dict]:
  """The base model and every ReST-EM iteration; samples = the E-steps' samples so far,
  wall_minutes = the loop's minutes so far (E-steps, verification, M-steps, evaluations)."""
  rows, samples, minutes = [], 0, 0.0
  for it in report['iterations']:
    samples += it.get('samples_drawn') or 0
    minutes += it.get('minutes') or 0.0
    rows.append(dict(it, method='base' if it['iteration'] == 0 else
                     f"ReST-EM iteration {it['iteration']}", samples=samples,
                     wall_minutes=minutes))
  return rows


def online_rows(report: dict, name: str, budgets: list[int]) -> list[dict]:
  """The stage of each budget (the last one with at most that many samples)."""
  stages = [s for s in report['stages'] if s.get('samples_drawn')]
  rows = []
  for b in budgets:
    at = [s for s in stages if s['samples_drawn'] <= b]
    if at:
      s = at[-1]
      rows.append(dict(s, method=f'{name} @ {b:,}', samples=s['samples_drawn'],
                       wall_minutes=s['minutes']))  # The run's wall time up to this stage
      # (evaluations included; a resumed run adds its invocations' minutes up to the checkpoint).
  return rows


def plot(rows: list[dict], path: str, math_task: bool = False) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  groups: dict[str, list[dict]] = {}
  for r in rows:
    groups.setdefault(r['method'].split(' ')[0], []).append(r)
  start = groups.pop('BC', []) + groups.pop('base', [])
  groups = {name: start + rs for name, rs in groups.items()}  # Every method starts there.
  panels = (('test_pass1', 'pool_pass1', 'dev_pass1'), ('test pass@1 (greedy)',
            'pool pass@1 (greedy)', 'dev pass@1 (greedy)')) if math_task else (
      ('test_reward', 'test_oracle', 'test_bleu'),
      ('test reward', 'test oracle (chrF+TER)', 'test BLEU'))
  for ax, key, label in zip(axes, *panels):
    for name, rs in groups.items():
      ax.plot([r['samples'] for r in rs], [r.get(key) for r in rs], 'o-', label=name)
    ax.set_xlabel('training samples drawn')
    ax.set_title(label)
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--workdir', required=True)
  p.add_argument('--rm_dir', default='checkpoints/rm_small_libreoffice_de_en')
  p.add_argument('--budgets', default='4096,8192')
  p.add_argument('--algorithms', default='ppo,grpo')
  p.add_argument('--rest_workdir', default=None, help='a finished ReST run to report instead')
  p.add_argument('--task', default='libreoffice_help_de_en',
                 choices=('libreoffice_help_de_en', 'arithmetic_chain'))
  args, extra = p.parse_known_args(argv)
  if args.task == 'arithmetic_chain':
    return main_math(args, extra, argv)
  budgets = sorted(int(b) for b in args.budgets.split(','))
  algorithms = [a for a in args.algorithms.split(',') if a]
  work = os.path.abspath(args.workdir)
  rm = f"'{args.rm_dir}'"

  rest_dir = args.rest_workdir or os.path.join(work, 'rest')
  if not args.rest_workdir:
    _run(['rest', f'--gin_file={REST_GIN}', f'--workdir={rest_dir}',
          f'--gin.rest.rm_dir={rm}'] + extra)
  rows = rest_rows(_load(os.path.join(rest_dir, 'report.json')))
  alarms = {'ReST': {a['stage'] for a in _load(os.path.join(rest_dir, 'report.json'))['alarms']}}
  for algo in algorithms:
    d = os.path.join(work, algo)
    _run(['online', f'--gin_file={ONLINE_GIN}', f'--workdir={d}', f"--gin.online.algorithm='{algo}'",
          f'--gin.online.rm_dir={rm}', f'--gin.online.max_samples={budgets[-1]}',
          f'--gin.online.eval_every_samples={math.gcd(*budgets)}'] + extra)
    report = _load(os.path.join(d, 'report.json'))
    rows += online_rows(report, algo.upper(), budgets)
    alarms[algo.upper()] = {a['stage'] for a in report.get('alarms', [])}
  out = dict(command=_command(argv), rm_dir=args.rm_dir, budgets=budgets, rows=rows,
             alarms={k: sorted(v) for k, v in alarms.items()})
  _write_outputs(work, out, f'# ReST vs online RL at equal training samples\n\nCommand: '
                 f'`{out["command"]}`; reward model `{args.rm_dir}` for every method.\n\n'
                 + make_docs.online_table(out) + '\n', 'reward_vs_samples.png')


def _command(argv) -> str:
  return ' '.join(['python', 'scripts/compare_online.py'] + (argv or sys.argv[1:]))


def _write_outputs(work: str, out: dict, md: str, png: str, math_task: bool = False) -> None:
  """`work`/report.json (`out`), report.md (`md`, also printed) and the plot `png` of out's rows."""
  with open(os.path.join(work, 'report.json'), 'w') as f:
    json.dump(out, f, indent=1, sort_keys=True)
  with open(os.path.join(work, 'report.md'), 'w') as f:
    f.write(md)
  plot(out['rows'], os.path.join(work, png), math_task=math_task)
  print(md)


def main_math(args, extra: list[str], argv) -> None:
  """ReST-EM against GRPO on `arithmetic_chain` with the binary verifier (ReST-EM's reward)."""
  budgets = sorted(int(b) for b in args.budgets.split(','))
  work = os.path.abspath(args.workdir)
  rest_dir = args.rest_workdir or os.path.join(work, 'rest_em')
  em_extra = [a for a in extra if not a.startswith('--gin.online.')]
  if not args.rest_workdir:
    _run(['rest-em', f'--gin_file={REST_EM_GIN}', f'--workdir={rest_dir}',
          '--gin.rest_em.controls=()'] + em_extra)
  rest_em_report = _load(os.path.join(rest_dir, 'report.json'))
  rows = rest_em_rows(rest_em_report)
  reward = rest_em_report['reward']  # GRPO trains on (and is evaluated with) the same verifier.
  d = os.path.join(work, 'grpo')
  _run(['online', f'--gin_file={GRPO_MATH_GIN}', f'--workdir={d}',
        f"--gin.online.reward='{reward}'", f'--gin.online.max_samples={budgets[-1]}',
        f'--gin.online.eval_every_samples={math.gcd(*budgets)}']
       + [a for a in extra if a.startswith('--gin.online.')])
  grpo_report = _load(os.path.join(d, 'report.json'))
  if grpo_report['reward'] != reward:
    raise ValueError(f"GRPO ran with reward {grpo_report['reward']!r}, ReST-EM with {reward!r}: "
                     'pass@1 would be measured by two verifiers')
  rows += online_rows(grpo_report, 'GRPO', budgets)
  out = dict(command=_command(argv), task=args.task, reward=reward, budgets=budgets, rows=rows)
  _write_outputs(work, out, f'# ReST-EM vs GRPO at equal training samples\n\nCommand: '
                 f'`{out["command"]}`; the binary verifier `{reward}` for both.\n\n'
                 + make_docs.online_math_table(out) + '\n', 'pass1_vs_samples.png',
                 math_task=True)


if __name__ == '__main__':
  main()
