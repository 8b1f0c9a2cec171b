"""Kill the ReST and ReST-EM loops anywhere, restart them, get the same result (issue: faults).

An uninterrupted tiny loop (in this process) logs every file write (`fileio.note_write`). Kill
points are then drawn with a fixed seed among its writes, one inside each part of the loop (Grow,
reward-model training, scoring, an Improve step, evaluation, the report); the
same loop runs as a subprocess that SIGKILLs itself at that write (`REST_JAX_KILL_AT_WRITE`, just
before the write's rename), is restarted, killed at the next point, ... and finally runs to the
end. The finished work directory must equal the uninterrupted one: the same report figures, the
same Grow and scored records (compared by key: none lost, none duplicated), the same final
policy within float tolerance.
"""

import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np

from rest_jax import records as records_lib

from loop_utils import report as _report, run, strip
import test_rest
import test_rest_em

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = test_rest.TINY + ['--gin.rest.improve_steps_per_grow=1', '--gin.rest.best_of_n_stages=()',
                         '--gin.improve.num_steps=4', '--gin.improve.eval_every_steps=2']
# The parts of the loop, by the paths they write (in the order of their first write). (BC
# training resumes like an Improve step, through the same trainer: left out to save a restart.)
PARTS = {'grow': r'grow_1/', 'rm': r'rm/', 'score': r'scored_1/', 'improve': r'improve_1_0/',
         'eval': r'eval/G1I0/', 'report': r'(report|plots)'}
# ReST-EM: one iteration and one control (an M-step of its own from the base model).
EM_ARGS = test_rest_em.TINY + ['--gin.rest_em.num_iterations=1',
                               "--gin.rest_em.controls=('sft_same_data',)"]
EM_PARTS = {'e-step': r'estep_1/grow-00001',  # Inside the second chunk, the first done.
            'verifier': r'scored_1/', 'm-step': r'mstep_1/',
            'eval': r'eval/iter_1/', 'control': r'controls/sft_same_data/',
            'report': r'(report|plots)'}


def _subprocess_loop(workdir, log, kill=None, command='rest', args=ARGS):
  env = dict(os.environ, PYTHONPATH=ROOT, REST_JAX_WRITE_LOG=log,
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
  env.pop('REST_JAX_KILL_AT_WRITE', None)
  if kill:
    env['REST_JAX_KILL_AT_WRITE'] = kill
  return subprocess.run([sys.executable, '-m', 'rest_jax.main', command, f'--workdir={workdir}']
                        + args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _records_by_key(workdir, name, kind):
  rs = records_lib.read_chunked(os.path.join(workdir, name), kind)
  keyed = {}
  for r in rs:
    k = (r['source_index'], r['origin'], r['candidate_index'])
    assert k not in keyed, f'duplicate record {k} in {name}'
    keyed[k] = r
  return keyed


def _kill_anywhere(tmp_path, monkeypatch, command, args, parts):
  """Runs `command` straight, then killed once inside each of `parts` and restarted; returns
  (straight work dir, resumed work dir)."""
  straight = str(tmp_path / 'straight')
  log = str(tmp_path / 'straight.log')
  monkeypatch.setenv('REST_JAX_WRITE_LOG', log)
  run([command, f'--workdir={straight}'] + args)
  monkeypatch.delenv('REST_JAX_WRITE_LOG')
  writes = [os.path.relpath(w, straight) for w in open(log).read().split()]

  # One kill point inside each part, drawn with a fixed seed among its writes, named by its path
  # (relative to the work dir) and which write of that path it is. The parts run one after the
  # other, so in the restarted run that write comes at the same place.
  rng = np.random.default_rng(0)
  points = []
  for part, pattern in parts.items():
    matches = [i for i, w in enumerate(writes) if re.match(pattern, w)]
    assert matches, (part, pattern)
    i = matches[int(rng.integers(len(matches)))]
    rel = writes[i]
    n = writes[:i + 1].count(rel)
    points.append((i, part, f'{re.escape(os.sep + rel)}$#{n}'))
  points.sort()
  assert [part for _, part, _ in points] == list(parts)

  resumed = str(tmp_path / 'resumed')
  landed = []
  for i, (_, part, kill) in enumerate(points):
    inv_log = str(tmp_path / f'kill_{i}.log')
    p = _subprocess_loop(resumed, inv_log, kill, command, args)
    assert p.returncode == -signal.SIGKILL, (part, kill, p.returncode, p.stderr[-3000:])
    last = open(inv_log).read().split()[-1]  # The write it was killed at (not renamed).
    assert re.search(kill.rpartition('#')[0], last), (kill, last)
    landed.append((part, os.path.relpath(last, resumed)))
  p = _subprocess_loop(resumed, str(tmp_path / 'final.log'), None, command, args)
  assert p.returncode == 0, p.stderr[-3000:]
  print('kill points:', landed)
  assert [part for part, _ in landed] == [part for _, part, _ in points]
  return straight, resumed


def _same_records(straight, resumed, names):
  """The same records by key in both work dirs: none lost, none duplicated, every field equal."""
  for name, kind in names:
    a, b = _records_by_key(straight, name, kind), _records_by_key(resumed, name, kind)
    assert a.keys() == b.keys(), name
    for k in a:
      np.testing.assert_equal(a[k], b[k])


def test_kill_at_seeded_writes_and_resume_equals_the_uninterrupted_loop(tmp_path, monkeypatch):
  straight, resumed = _kill_anywhere(tmp_path, monkeypatch, 'rest', ARGS, PARTS)
  # The same report figures (wall-clock times aside) ...
  assert strip(_report(resumed), test_rest.TIMING_KEYS) == strip(_report(straight),
                                                                 test_rest.TIMING_KEYS)
  # ... the same records, none lost, none duplicated ...
  _same_records(straight, resumed, (('grow_1', records_lib.GROW),
                                    ('scored_1', records_lib.SCORED)))
  # ... and the same final policy.
  _same_params(os.path.join(straight, 'improve_1_0'), os.path.join(resumed, 'improve_1_0'))


def test_rest_em_killed_at_seeded_writes_resumes_to_the_uninterrupted_result(tmp_path,
                                                                            monkeypatch):
  straight, resumed = _kill_anywhere(tmp_path, monkeypatch, 'rest-em', EM_ARGS, EM_PARTS)
  want = test_rest_em.comparable(_report(straight))
  assert test_rest_em.comparable(_report(resumed)) == want
  assert want['iterations'][1]['num_train_solutions'] > 0
  _same_records(straight, resumed, (('estep_1', records_lib.GROW),
                                    ('scored_1', records_lib.SCORED)))
  for d in ('mstep_1', os.path.join('controls', 'sft_same_data')):
    _same_params(os.path.join(straight, d), os.path.join(resumed, d))


def _same_params(a, b):
  """The best params of two runs, read back as raw arrays, equal within float tolerance."""
  import orbax.checkpoint as ocp
  la, lb = [ocp.CheckpointManager(os.path.join(d, 'best')) for d in (a, b)]
  sa, sb = la.best_step() or la.latest_step(), lb.best_step() or lb.latest_step()
  assert sa == sb
  ra = la.restore(sa, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
  rb = lb.restore(sb, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
  leaves_a, leaves_b = jax.tree.leaves(ra.params), jax.tree.leaves(rb.params)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
