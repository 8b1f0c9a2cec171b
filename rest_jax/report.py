"""The ReST loop's report: `report.json`, `report.md` (the paper's Table 1 shape) and PNG plots.

Table 1 of Gulcehre et al. 2023 lists the average reward-model score of BC, of ReST after Grow 1
with Improve steps I = 0 .. I_max, and after Grow 2; we add test BLEU / chrF (reference metrics,
sacreBLEU signatures in the footer), the number of records each Improve step trained on, the
distinct samples of each Grow and each stage's minutes. The reward-hacking alarms (the paper's
PPO raised its reward while losing about 8 BLEU; `reward_hacking_alarms`) fire when a stage's test
reward (the loop's reward: the learned RM or a metric) rises over the previous stage's or BC's
while, against that same stage, its test BLEU falls by more than `alarm_bleu_drop` points or its
test oracle (`test_oracle`: the mean sentence `evaluate_policy.oracle` metric vs the reference,
chrF+TER by default, 0-100) by more than `alarm_oracle_drop` (None: that check is off; a stage
without the measure is skipped); a stage that kept its start policy (the same test reward and
BLEU as the stage before) raises none of its own.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from rest_jax import fileio

STAGE_KEYS = ('name', 'grow', 'improve', 'tau', 'loss', 'num_train_records', 'train_references',
              'distinct_sources',
              'dev_reward', 'test_reward', 'dev_bleu', 'test_bleu', 'dev_chrf', 'test_chrf',
              'test_oracle', 'test_rm_oracle_kendall', 'test_length_ratio', 'test_bleu_bp',
              'minutes', 'stage_minutes', 'steps', 'best_step')


ALARM_MEASURES = {'test_bleu': 'test BLEU', 'test_oracle': 'test oracle (chrF+TER)'}


def reward_hacking_alarms(stages: Sequence[dict], bleu_drop: float | None = 1.0,
                          oracle_drop: float | None = 1.0) -> list[dict]:
  """Stages whose test reward rose while a reference measure fell: test BLEU by more than
  `bleu_drop` points (ReST sec. 5: PPO's reward rose while BLEU fell ~8 points), or the test
  oracle (`test_oracle`, 0-100, the metric the reward model imitates) by more than `oracle_drop`
  (None: that check is off; a stage without the measure is skipped).

  Each stage is compared with the stage before it and with the first stage (BC); a stage that
  kept its start policy (an Improve step that never beat it: the same test reward and BLEU as the
  stage before) raises no alarm of its own.

  Returns:
    One dict per (stage, reference stage, measure): stage, versus, measure, reward_change,
    change (of the measure, negative), message.
  """
  drops = {'test_bleu': bleu_drop, 'test_oracle': oracle_drop}
  alarms = []
  for k, st in enumerate(stages[1:], start=1):
    prev = stages[k - 1]
    if (st['test_reward'], st['test_bleu']) == (prev['test_reward'], prev['test_bleu']):
      continue
    for ref in {prev['name']: prev, stages[0]['name']: stages[0]}.values():
      if not st['test_reward'] > ref['test_reward']:
        continue
      for key, drop in drops.items():
        if drop is None or st.get(key) is None or ref.get(key) is None:
          continue
        if ref[key] - st[key] > drop:
          alarms.append(dict(
              stage=st['name'], versus=ref['name'], measure=key,
              reward_change=st['test_reward'] - ref['test_reward'], change=st[key] - ref[key],
              message=f"reward hacking? {st['name']} vs {ref['name']}: test reward "
                      f"{ref['test_reward']:.2f} -> {st['test_reward']:.2f} while "
                      f"{ALARM_MEASURES[key]} {ref[key]:.2f} -> {st[key]:.2f}"))
  return alarms


def build_report(stages: Sequence[dict], grows: Sequence[dict], best_of_n: dict,
                 alarm_bleu_drop: float | None, taus: Sequence[float], mode: str, loss: str,
                 total_minutes: float, reward: str = 'rm',
                 alarm_oracle_drop: float | None = 1.0) -> dict[str, Any]:
  """The report dict (see the module docstring); prints the alarms."""
  alarms = reward_hacking_alarms(stages, alarm_bleu_drop, alarm_oracle_drop)
  for a in alarms:
    print('ALARM:', a['message'])
  sig = next((s.get('bleu_signature') for s in stages if s.get('bleu_signature')), None)
  return {
      'stages': [{k: st.get(k) for k in STAGE_KEYS} for st in stages],
      'grows': [dict(grow=g['grow'], samples_kept=g['counts']['samples_kept'],
                     samples_drawn=g['counts']['samples_drawn'],
                     sources=g['counts']['sources'], records=g['counts']['records'],
                     grow_minutes=g['grow_minutes'], score_minutes=g['score_minutes'],
                     scored_dir=g['scored_dir']) for g in grows],
      'best_of_n': best_of_n,
      'alarms': alarms,
      'thresholds': {'taus': list(taus), 'mode': mode},
      'loss': loss,
      'reward': reward,
      'bleu_signature': sig,
      'chrf_signature': next((s.get('chrf_signature') for s in stages
                              if s.get('chrf_signature')), None),
      'minutes_this_invocation': total_minutes,
      'minutes_total': float(sum(s.get('minutes') or 0.0 for s in stages)
                             + sum(g['grow_minutes'] + g['score_minutes'] for g in grows)
                             + sum(b.get('minutes', 0.0) for b in best_of_n.values())),
  }


def _reward_name(report: dict) -> str:
  reward = report.get('reward', 'rm')
  if reward == 'rm':
    return 'learned reward model'
  return f'the metric {reward!r} against the reference'


def fmt(v, spec='.2f') -> str:
  """A table cell: '' for None, floats with `spec`, anything else as str."""
  return '' if v is None else format(v, spec) if isinstance(v, float) else str(v)


def markdown(report: dict) -> str:
  """`report.md`: stage table (Table 1 shape), Grow table, best-of-N table, alarms, signatures."""
  samples = {g['grow']: g['samples_kept'] for g in report['grows']}
  lines = ['# ReST report', '',
           f"Loss `{report['loss']}`; thresholds {report['thresholds']['taus']} "
           f"({report['thresholds']['mode']}). Rewards: {_reward_name(report)}, 0-100. "
           "Test oracle: mean sentence 'chrf+ter' against the reference, 0-100 (what the "
           'default reward model learns to imitate); reward-oracle Kendall: rank agreement of '
           "the two over the stage's test translations. BLEU / chrF: greedy decoding.", '',
           '| stage | G | I | tau | train records | of which references | distinct samples '
           '| dev reward | test reward | test oracle | reward-oracle Kendall | test BLEU '
           '| test chrF | test length ratio | minutes |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for s in report['stages']:
    lines.append(
        f"| {s['name']} | {s['grow'] or ''} | {fmt(s['improve'])} | {fmt(s['tau'])} "
        f"| {fmt(s['num_train_records'])} | {fmt(s.get('train_references'))} "
        f"| {fmt(samples.get(s['grow']))} "
        f"| {fmt(s['dev_reward'])} | {fmt(s['test_reward'])} | {fmt(s.get('test_oracle'))} "
        f"| {fmt(s.get('test_rm_oracle_kendall'), '.3f')} | {fmt(s['test_bleu'])} "
        f"| {fmt(s['test_chrf'])} | {fmt(s.get('test_length_ratio'), '.3f')} "
        f"| {fmt(s['minutes'], '.1f')} |")
  lines += ['', '| Grow | sources | samples drawn | distinct samples kept | records | Grow min '
            '| score min |', '|---|---|---|---|---|---|---|']
  for g in report['grows']:
    lines.append(f"| {g['grow']} | {g['sources']} | {g['samples_drawn']} | {g['samples_kept']} "
                 f"| {g['records']} | {g['grow_minutes']:.1f} | {g['score_minutes']:.1f} |")
  if report['best_of_n']:
    ns = next(iter(report['best_of_n'].values()))['n']
    lines += ['', 'Best-of-N reranked by the reward model (test reward / test BLEU):', '',
              '| policy | ' + ' | '.join(f'N={n}' for n in ns) + ' |',
              '|---|' + '---|' * len(ns)]
    for name, b in report['best_of_n'].items():
      lines.append(f'| {name} | ' + ' | '.join(
          f'{r:.2f} / {bl:.2f}' for r, bl in zip(b['reward'], b['bleu'])) + ' |')
  lines += ['', '## Reward-hacking alarms', '']
  lines += [f"- {a['message']}" for a in report['alarms']] or ['none']
  lines += ['', f"BLEU signature: `{report['bleu_signature']}`",
            f"chrF signature: `{report['chrf_signature']}`",
            f"Total minutes (stages + evaluation): {report['minutes_total']:.1f}", '']
  return '\n'.join(lines)


def _reward_label(report: dict) -> str:
  """The reward's short name on the plots: 'RM reward' or "'chrf+ter' reward"."""
  reward = report.get('reward', 'rm')
  return 'RM reward' if reward == 'rm' else f'{reward!r} reward'


def _stage_groups(stages: Sequence[dict], keys: Sequence[str]) -> list[tuple[list[str], tuple]]:
  """Stages with the same values of `keys` (a stage that kept its start policy), as one label
  each: [(names, values)] in stage order."""
  groups: dict[tuple, list[str]] = {}
  for s in stages:
    groups.setdefault(tuple(s[k] for k in keys), []).append(s['name'])
  return [(names, values) for values, names in groups.items()]


def plots(workdir: str, report: dict, grow_rewards: dict[int, np.ndarray] | None = None
          ) -> list[str]:
  """PNG plots in `workdir/plots/`: reward per stage (dev and test reward, the test oracle,
  the stages of a reward-hacking alarm shaded), reward histogram per Grow with the thresholds
  drawn (only for the Grows in `grow_rewards`), test reward vs test BLEU per stage, best-of-N
  curves. Returns the paths."""
  import textwrap

  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from matplotlib import ticker
  out_dir = os.path.join(workdir, 'plots')
  fileio.makedirs(out_dir)
  paths = []
  stages = report['stages']
  names = [s['name'] for s in stages]
  reward = _reward_label(report)
  alarmed = sorted({a['stage'] for a in report.get('alarms', [])}, key=names.index)

  fig, ax = plt.subplots(figsize=(8.5, 3.8))
  x = np.arange(len(stages))
  for split in ('dev', 'test'):
    ax.plot(x, [s[f'{split}_reward'] for s in stages], marker='o', label=f'{split} {reward}')
  if any(s.get('test_oracle') is not None for s in stages):
    ax.plot(x, [np.nan if s.get('test_oracle') is None else s['test_oracle'] for s in stages],
            marker='s', ls='--', color='tab:green', label=ALARM_MEASURES['test_oracle'])
  for k, name in enumerate(alarmed):
    ax.axvspan(names.index(name) - 0.4, names.index(name) + 0.4, color='tab:red', alpha=0.15,
               lw=0, label='reward-hacking alarm' if k == 0 else None)
  ax.set_xticks(x, names)
  ax.set_xlabel('stage (bc, then G<Grow>I<Improve step>)')
  ax.set_ylabel('test / dev mean (0-100)')
  ax.set_title(f'{reward[0].upper() + reward[1:]} and test oracle per ReST stage')
  ax.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
  paths.append(_save(fig, out_dir, 'reward_per_stage.png'))

  for g, rewards in (grow_rewards or {}).items():
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.hist(rewards, bins=40, range=(0, 1), color='tab:blue', alpha=0.8)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)  # Room for the threshold labels above the bars.
    mode = report['thresholds']['mode']
    used = [s['tau'] for s in stages if s['grow'] == g and s['tau'] is not None]
    for tau in used:
      at = tau if mode == 'absolute' else float(np.quantile(rewards, tau))
      ax.axvline(at, color='tab:red', ls='--')
      ax.annotate(f'{tau:g}', (at, 1.0), xycoords=ax.get_xaxis_transform(), xytext=(2, -2),
                  textcoords='offset points', color='tab:red', ha='left', va='top', fontsize=8)
    ax.set_xlabel('normalised reward' + ('\n(dashed: pooled quantiles of the per-source '
                                         'percentile thresholds)' if mode != 'absolute' else
                                         ' (dashed: thresholds)'))
    ax.set_ylabel('records')
    ax.set_title(f'Grow {g}: reward of its {len(rewards):,} records\n'
                 f"thresholds tau = {', '.join(f'{t:g}' for t in used)} ({mode})", fontsize=10)
    paths.append(_save(fig, out_dir, f'reward_hist_grow_{g}.png'))

  fig, ax = plt.subplots(figsize=(5.5, 4.2))
  ax.plot([s['test_bleu'] for s in stages], [s['test_reward'] for s in stages], marker='o',
          zorder=1)
  for group, (bleu, value) in _stage_groups(stages, ('test_bleu', 'test_reward')):
    hot = any(n in alarmed for n in group)
    if hot:
      ax.scatter([bleu], [value], s=80, facecolors='none', edgecolors='tab:red', zorder=2)
    ax.annotate(textwrap.fill(', '.join(group), 18), (bleu, value), xytext=(5, 5),
                textcoords='offset points', fontsize=8, color='tab:red' if hot else 'black')
  ax.margins(x=0.2, y=0.15)
  ax.set_xlabel('test BLEU')
  ax.set_ylabel(f'test {reward}')
  ax.set_title(f'{reward[0].upper() + reward[1:]} vs BLEU per stage'
               + ('\n(red: reward-hacking alarm)' if alarmed else ''), fontsize=10)
  paths.append(_save(fig, out_dir, 'reward_vs_bleu.png'))

  if report['best_of_n']:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    order = lambda name: names.index(name) if name in names else len(names)
    for name in sorted(report['best_of_n'], key=order):  # Stage order, not the JSON's.
      b = report['best_of_n'][name]
      ax.plot(b['n'], b['reward'], marker='o', label=name)
    ax.set_xscale('log', base=2)
    ns = sorted({n for b in report['best_of_n'].values() for n in b['n']})
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xlabel('N (samples reranked by the RM)')
    ax.set_ylabel(f'test {reward} of the pick')
    ax.set_title('Best-of-N')
    ax.legend()
    paths.append(_save(fig, out_dir, 'best_of_n.png'))
  return paths


def _save(fig, out_dir, name):
  """Saves `fig` as `out_dir/name` (100 dpi), cropped to what is drawn (titles, labels and
  legends outside the axes included), and closes it."""
  path = os.path.join(out_dir, name)
  fig.tight_layout()
  tmp = fileio.temp_path(path, '.png')
  try:
    with fileio.open_file(tmp, 'wb') as f:
      fig.savefig(f, format='png', dpi=100, bbox_inches='tight', pad_inches=0.1)
  except BaseException:
    fileio.remove(tmp)
    raise
  finally:
    import matplotlib.pyplot as plt
    plt.close(fig)
  fileio.atomic_replace(tmp, path)
  return path


def write_report(workdir: str, report: dict) -> None:
  """Writes `report.json`, `report.md` and the plots (histograms from the scored Grow records)."""
  from rest_jax.rewards import scoring
  grow_rewards = {g['grow']: np.array([r['reward'] for r in
                                       scoring.read_scored_records(g['scored_dir'])])
                  for g in report['grows']}
  report['plots'] = [os.path.relpath(p, workdir) for p in plots(workdir, report, grow_rewards)]
  fileio.write_json(os.path.join(workdir, 'report.json'), report)
  fileio.write_text(os.path.join(workdir, 'report.md'), markdown(report))
  print(markdown(report))


def replot(workdir: str) -> list[str]:
  """Redraws the PNGs of a finished ReST or ReST-EM report from its `workdir/report.json` (the
  Grow histograms only where the scored Grow records still exist); report.json and report.md are
  left as they are. Returns the paths written."""
  report = fileio.read_json(os.path.join(workdir, 'report.json'))
  if 'iterations' in report:
    return rest_em_plots(workdir, report)
  from rest_jax.rewards import scoring
  grow_rewards = {g['grow']: np.array([r['reward'] for r in
                                       scoring.read_scored_records(g['scored_dir'])])
                  for g in report['grows'] if fileio.isdir(g['scored_dir'])}
  return plots(workdir, report, grow_rewards)


# -- ReST-EM ------------------------------------------------------------------------------------

EM_CONTROL_NAMES = {'sft_same_data': '(a) gold solutions of the same problems',
                    'unfiltered': '(b) every E-step sample, unverified',
                    'more_sft': '(c) more SFT on the gold set'}


def _row_em(name: str, r: dict, sampled: str, ks: Sequence[str], iteration=None) -> str:
  p = lambda key: fmt(r.get(key), '.1f')
  return (f"| {name} | {fmt(r.get('num_train_solutions'))} | {fmt(r.get('num_problems_solved'))} "
          f"| {p('dev_pass1')} | {p('test_pass1')} | {p('test_hard_pass1')} | {p('pool_pass1')} "
          + ''.join(f"| {fmt(r.get(f'{sampled}_pass_at_k', {}).get(k), '.1f')} " for k in ks)
          + ''.join(f"| {fmt(r.get(f'{sampled}_maj_at_k', {}).get(k), '.1f')} " for k in ks)
          + f"| {fmt(r.get('minutes', r.get('mstep_minutes')), '.1f')} |")


def rest_em_markdown(report: dict) -> str:
  """`report.md` of `rest_em.rest_em`: the iteration table, controls, per-bucket accuracy and the
  verifier's reasons; accuracies in percent."""
  its, sampled = report['iterations'], report.get('sampled_split') or 'test'
  ks = sorted(its[0].get(f'{sampled}_pass_at_k', {}), key=int)
  head = ('| | train solutions | problems solved | dev pass@1 | test pass@1 | test_hard pass@1 '
          '| pool pass@1 | ' + ''.join(f'pass@{k} | ' for k in ks)
          + ''.join(f'maj@{k} | ' for k in ks) + 'minutes |')
  sep = '|' + '---|' * (head.count('|') - 1)
  lines = ['# ReST-EM report', '',
           f"Task `{report['task']}`, reward `{report['reward']}` (binary), at most "
           f"{report['max_per_problem']} correct samples per problem, M-step from the "
           f"{'base model' if report['m_step_init'] == 'base' else 'previous iterate'}. pass@1: "
           f'greedy; pass@k (unbiased estimator) and maj@k: {sampled}, '
           f"{its[0].get(f'{sampled}_samples_per_problem')} samples per problem. Best iteration "
           f"on dev: **{report['best_iteration']}**. Settings: "
           + ', '.join(f'`{k}={v}`' for k, v in report.get('settings', {}).items()) + '.', '',
           head, sep]
  lines += [_row_em('base' if it['iteration'] == 0 else f"iteration {it['iteration']}", it,
                    sampled, ks) for it in its]
  if report['controls']:
    lines += ['', 'Controls: M-steps from the base model with the settings of iteration 1\'s '
              '(problems solved: distinct problems trained on).', '', head, sep]
    lines += [_row_em(EM_CONTROL_NAMES.get(n, n), dict(c, num_problems_solved=c['num_problems']),
                      sampled, ks) for n, c in report['controls'].items()]
  buckets = sorted({b for it in its for b in it.get(f'{sampled}_buckets', {})})
  if buckets:
    lines += ['', f'Greedy accuracy per bucket ({sampled}; tTdD: T terms of D digits):', '',
              '| | ' + ' | '.join(buckets) + ' |', '|---|' + '---|' * len(buckets)]
    for it in its:
      b = it.get(f'{sampled}_buckets', {})
      lines.append(f"| {it['name']} | " + ' | '.join(fmt(b.get(k), '.1f') for k in buckets) + ' |')
  reasons = sorted({k for it in its for k in it.get(f'{sampled}_reasons', {})})
  lines += ['', f'Verdicts of the greedy {sampled} outputs:', '',
            '| | ' + ' | '.join(reasons) + ' |', '|---|' + '---|' * len(reasons)]
  for it in its:
    r = it.get(f'{sampled}_reasons', {})
    lines.append(f"| {it['name']} | " + ' | '.join(fmt(r.get(k)) for k in reasons) + ' |')
  lines += ['', 'Verdicts of the E-step samples:', '',
            '| E-step | ' + ' | '.join(reasons) + ' |', '|---|' + '---|' * len(reasons)]
  for i, r in report['verifier'].items():
    lines.append(f'| {i} | ' + ' | '.join(fmt(r.get(k)) for k in reasons) + ' |')
  lines += ['', f"Total minutes (stages + evaluation): {report['minutes_total']:.1f}", '']
  return '\n'.join(lines)


def rest_em_plots(workdir: str, report: dict) -> list[str]:
  """PNGs in `workdir/plots/`: greedy pass@1 per iteration (test, test_hard, pool, dev; the
  controls as dashed lines) and pass@k curves per iteration. Returns the paths."""
  import textwrap

  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from matplotlib import ticker
  out_dir = os.path.join(workdir, 'plots')
  fileio.makedirs(out_dir)
  its, sampled = report['iterations'], report.get('sampled_split') or 'test'
  x = [it['iteration'] for it in its]
  fig, ax = plt.subplots(figsize=(8, 4))
  for split in ('dev', 'test', 'test_hard', 'pool'):
    if f'{split}_pass1' in its[0]:
      ax.plot(x, [it[f'{split}_pass1'] for it in its], marker='o', label=split)
  styles = ('--', ':', '-.')
  # The controls are named in the legend: labels on their lines collided with each other.
  known = list(EM_CONTROL_NAMES)
  controls = sorted(report['controls'].items(),
                    key=lambda kv: known.index(kv[0]) if kv[0] in known else len(known))
  for k, (name, c) in enumerate(controls):
    label = f'control {EM_CONTROL_NAMES.get(name, name)} ({sampled})'
    ax.axhline(c[f'{sampled}_pass1'], ls=styles[k % len(styles)], lw=1.2, color='gray',
               label=textwrap.fill(label, 30))
  ax.set_xticks(x)
  ax.set_xlabel('EM iteration (0 = base model)')
  ax.set_ylabel('greedy pass@1 (%)')
  ax.set_title('ReST-EM: pass@1 per iteration')
  ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1.0), frameon=False)
  paths = [_save(fig, out_dir, 'pass1_per_iteration.png')]
  key = f'{sampled}_pass_at_k'
  if key in its[0]:
    fig, ax = plt.subplots(figsize=(6, 4))
    for it in its:
      ks = sorted(it[key], key=int)
      ax.plot([int(k) for k in ks], [it[key][k] for k in ks], marker='o', label=it['name'])
    ax.set_xscale('log', base=2)
    ks = sorted({int(k) for it in its for k in it[key]})
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xlabel('k')
    ax.set_ylabel(f'{sampled} pass@k (%)')
    ax.set_title('pass@k per iteration')
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir, 'pass_at_k.png'))
  return paths


def write_rest_em_report(workdir: str, report: dict) -> None:
  """Writes ReST-EM's `report.json`, `report.md` and plots into `workdir`, and prints the md."""
  report['plots'] = [os.path.relpath(p, workdir) for p in rest_em_plots(workdir, report)]
  fileio.write_json(os.path.join(workdir, 'report.json'), report)
  text = rest_em_markdown(report)
  fileio.write_text(os.path.join(workdir, 'report.md'), text)
  print(text)
