"""Fault soak: the ReST main job killed with SIGKILL at random wall-clock times, restarted each time,
then compared with the committed report (the main job is deterministic).

    python scripts/fault_soak.py --workdir=/tmp/soak --kills=20 [--seed=0] \
        [--min_seconds=40 --max_seconds=240] [--out=results/fault_soak.json]

Each round starts `bash scripts/main.sh` (README command 1) in its own process group with
WORKDIR=--workdir, waits a uniformly drawn time and kills the whole group (SIGKILL: no handler
runs, as on a preempted VM); after `--kills` kills it lets the job finish. The delays must be
long enough for a round to get past start-up (about 30 s) and one resume unit (a Grow chunk of
250 sources, about 80 s on 2 cores): with 20-90 s, a first soak killed every round inside Grow 1's
first chunk and never reached the later stages. Each kill records the stage folder being written
and how many stages finished in that round. Then it checks:

  * the report: `report.json` equals `--reference` with wall-clock times removed (as the loop
    tests compare), stage by stage;
  * the records: every `grow_<g>/` and `scored_<g>/` read back by key (source, origin, candidate
    index): duplicates and, against the manifest's and the reference report's counts, records
    lost;
  * the lock: no restart was refused (a killed holder must release it).

Writes a JSON summary (`--out`); `scripts/make_docs.py` turns it into the reliability table of
`docs/reliability.md`. It takes the main job's time plus the start-up and work lost at each kill
(about an hour on 2 cores for 20 kills).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TIMING_KEYS = ('minutes', 'stage_minutes', 'grow_minutes', 'score_minutes', 'eval_minutes',
               'minutes_this_invocation', 'minutes_total', 'total_minutes', 'scored_dir',
               'wall_seconds', 'train_seconds')


def strip(obj, keys=TIMING_KEYS):
  if isinstance(obj, dict):
    return {k: strip(v, keys) for k, v in obj.items() if k not in keys}
  if isinstance(obj, list):
    return [strip(v, keys) for v in obj]
  return obj


def differences(a, b, path=''):
  """Paths where two JSON values differ (floats compared exactly, as the loop is deterministic)."""
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += differences(a.get(k), b.get(k), f'{path}/{k}')
    return out
  if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
    return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f'{path}[{i}]')]
  same = a == b or (isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b))
  return [] if same else [f'{path}: {b!r} -> {a!r}']


def in_progress(workdir: str, since: float) -> str:
  """The stage folder holding the newest file written after `since` (a time.time()).

  Files at the top of the work directory (the job lock, the log) are skipped: every start writes
  them. '(start-up)' when the round had written nothing into a stage folder yet.
  """
  best, when = '(start-up)', since
  for root, dirs, files in os.walk(workdir):
    rel = os.path.relpath(root, workdir)
    if rel == '.' or 'cache' in rel.split(os.sep):
      continue
    for name in files:
      try:
        t = os.path.getmtime(os.path.join(root, name))
      except OSError:
        continue
      if t > when:
        best, when = rel.split(os.sep)[0], t
  return best


def finished_stages(workdir: str) -> int:
  """How many stage folders hold a `stage.json` (the loop's record that a stage is done)."""
  try:
    return sum(os.path.exists(os.path.join(workdir, d, 'stage.json')) for d in os.listdir(workdir))
  except FileNotFoundError:
    return 0


def check_records(workdir: str, report: dict) -> dict:
  from rest_jax import records as records_lib
  out = {}
  for g in report['grows']:
    for name, kind in ((f"grow_{g['grow']}", records_lib.GROW),
                       (f"scored_{g['grow']}", records_lib.SCORED)):
      d = os.path.join(workdir, name)
      rs = records_lib.read_chunked(d, kind)
      keys = [(r['source_index'], r['origin'], r['candidate_index']) for r in rs]
      manifest = records_lib.read_manifest(d, kind)
      out[name] = dict(records=len(rs), distinct=len(set(keys)),
                       manifest=manifest['counts']['records'], reference_report=g['records'])
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--kills', type=int, default=20)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--min_seconds', type=float, default=40.0)
  parser.add_argument('--max_seconds', type=float, default=240.0)
  parser.add_argument('--reference', default=os.path.join(ROOT, 'results', 'rest_main_cpu',
                                                          'report.json'))
  parser.add_argument('--out', default=os.path.join(ROOT, 'results', 'fault_soak.json'))
  args = parser.parse_args(argv)
  rng = np.random.default_rng(args.seed)
  env = dict(os.environ, WORKDIR=args.workdir)
  log = open(os.path.join(os.path.dirname(os.path.abspath(args.workdir)),
                          os.path.basename(args.workdir) + '.soak.log'), 'a')
  start = time.time()
  kills, refused, rounds = [], 0, 0
  while True:
    rounds += 1
    p = subprocess.Popen(['bash', os.path.join(ROOT, 'scripts', 'main.sh')], cwd=ROOT, env=env,
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    if len(kills) < args.kills:
      delay = float(rng.uniform(args.min_seconds, args.max_seconds))
      round_start, done_before = time.time(), finished_stages(args.workdir)
      try:
        rc = p.wait(timeout=delay)
      except subprocess.TimeoutExpired:
        stage = in_progress(args.workdir, round_start)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        finished = finished_stages(args.workdir) - done_before
        kills.append(dict(after_seconds=round(delay, 1), stage=stage, stages_finished=finished))
        print(f'[soak] kill {len(kills)} after {delay:.0f} s in {stage} '
              f'({finished} stages finished in this round)', flush=True)
        continue
    else:
      rc = p.wait()
    if rc != 0:
      refused += 'in use by another job' in open(log.name).read()[-5000:]
      raise SystemExit(f'[soak] the job failed with exit code {rc} (see {log.name})')
    break
  with open(os.path.join(args.workdir, 'report.json')) as f:
    report = json.load(f)
  with open(args.reference) as f:
    reference = json.load(f)
  diff = differences(strip(report), strip(reference))
  records = check_records(args.workdir, report)
  lost = sum(max(r['reference_report'] - r['distinct'], 0) for r in records.values())
  duplicated = sum(r['records'] - r['distinct'] for r in records.values())
  summary = dict(
      command=f'python scripts/fault_soak.py --workdir={args.workdir} --kills={args.kills} '
              f'--seed={args.seed} --min_seconds={args.min_seconds:g} '
              f'--max_seconds={args.max_seconds:g}',
      date=datetime.date.today().isoformat(), kills=len(kills), rounds=rounds,
      survived=len(kills) if not diff else 0, report_equal=not diff, report_differences=diff[:20],
      records=records, records_lost=lost, records_duplicated=duplicated,
      restarts_refused_by_the_lock=refused, wall_minutes=round((time.time() - start) / 60, 1),
      kill_points=kills)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(summary, f, indent=1)
  print(json.dumps({k: v for k, v in summary.items() if k != 'kill_points'}, indent=1))


if __name__ == '__main__':
  main()
