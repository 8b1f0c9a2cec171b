"""The ReST-EM loop end to end (`rest-jax rest-em`) on `arithmetic_chain` with the shipped base
model: E-step -> verifier -> M-step from the base model (x2), evaluation, the three controls,
report; then the same loop killed right after its first E-step and resumed: the same report.
"""

import json
import os
import shutil

import gin
import numpy as np
import pytest

from rest_jax import grow as grow_lib, main as main_lib, rest_em
from rest_jax.rewards import scoring, verifiers

from loop_utils import report as _report, run, strip

TINY = [
    '--gin_file=gin_configs/runs/rest_em_arithmetic_cpu.gin',
    '--gin.rest_em.num_iterations=2', '--gin.rest_em.dev_examples=16',
    '--gin.rest_em.test_examples=16', '--gin.rest_em.pool_eval_examples=8',
    '--gin.evaluate_solver.num_samples=4', '--gin.evaluate_solver.ks=(1, 2, 4)',
    '--gin.grow.max_sources=16', '--gin.grow.num_decodes=4', '--gin.grow.chunk_size=8',
    '--gin.grow.batch_size=8',
    '--gin.improve.num_steps=4', '--gin.improve.eval_every_steps=4', '--gin.improve.batch_size=8',
]
TIMING_KEYS = ('minutes', 'eval_minutes', 'estep_minutes', 'score_minutes', 'mstep_minutes',
               'minutes_this_invocation', 'minutes_total')


def comparable(report):
  """A ReST-EM report without wall-clock times and the fields that hold the work dir."""
  r = strip(report, TIMING_KEYS)
  r.pop('settings')
  for it in r['iterations']:
    it.pop('policy_dir'), it.pop('init_policy', None)
  return r


def test_bucket_of():
  assert rest_em.bucket_of('arithmetic_chain/test/00012/t3d2') == 't3d2'
  assert rest_em.bucket_of('gsm8k/test/17') is None


def test_rest_em_loop_end_to_end_and_resume(tmp_path, monkeypatch):
  straight = str(tmp_path / 'straight')
  run(['rest-em', f'--workdir={straight}'] + TINY)
  report = _report(straight)
  its = report['iterations']
  assert [it['iteration'] for it in its] == [0, 1, 2]
  assert set(report['controls']) == {'sft_same_data', 'unfiltered', 'more_sft'}
  for it in its + list(report['controls'].values()):
    for key in ('dev_pass1', 'test_pass1', 'test_hard_pass1', 'pool_pass1'):
      assert 0.0 <= it[key] <= 100.0
    assert set(it['test_pass_at_k']) == {'1', '2', '4'}
    p = [it['test_pass_at_k'][k] for k in ('1', '2', '4')]
    assert p[0] <= p[1] <= p[2]                        # pass@k never falls with k.
    assert sum(it['test_reasons'][r] for r in verifiers.REASONS) == 16
  # The greedy outputs written per split reproduce the reported pass@1.
  for it in its:
    with open(os.path.join(straight, 'eval', it['name'], 'test_outputs.jsonl')) as f:
      rows = [json.loads(line) for line in f]
    assert len(rows) == 16 and np.isclose(100 * np.mean([r['reward'] for r in rows]),
                                          it['test_pass1'])
  # E-step 1 sampled from the base model; every M-step started from the base model: its step-0
  # dev pass@1 is the base model's own.
  # (Recorded relative to the work dir, `records.pin_settings`; resolved against it here.)
  from rest_jax import records
  policy = lambda d: records.read_settings(os.path.join(straight, d), ('policy_dir',))['policy_dir']
  assert policy('estep_1') == os.path.join(straight, 'base')
  assert policy('estep_2') == os.path.join(straight, 'mstep_1')
  for i in (1, 2):
    with open(os.path.join(straight, f'mstep_{i}', 'improve_summary.json')) as f:
      s = json.load(f)
    assert s['init_policy_dir'] == os.path.join(straight, 'base')
    assert s['history'][0]['step'] == 0 and s['history'][0]['reward'] == its[0]['dev_pass1']
    assert s['selection'] == 'correct' and s['loss'] == 'reward_weighted_nll'
  # The M-step trained on correct samples only, at most K per problem; no gold solution.
  records = scoring.read_scored_records(os.path.join(straight, 'scored_1'))
  keep = rest_em.correct_selection(records, 10, 0)
  assert keep.sum() == its[1]['num_train_solutions'] > 0
  assert all(records[i]['origin'] == 'sample' and records[i]['reward'] == 1.0
             for i in np.flatnonzero(keep))
  # Control (a) trains on as many gold solutions of the same problems.
  assert report['controls']['sft_same_data']['num_train_solutions'] == its[1]['num_train_solutions']
  unfiltered = sum(r['origin'] == 'sample' for r in records)
  assert report['controls']['unfiltered']['num_train_solutions'] == unfiltered
  best = max(its, key=lambda it: it['dev_pass1'])
  assert report['best_iteration'] == best['iteration']
  assert sorted(report['plots']) == ['plots/pass1_per_iteration.png', 'plots/pass_at_k.png']
  with open(os.path.join(straight, 'report.md')) as f:
    text = f.read()
  assert '| iteration 2 |' in text and '(a) gold solutions of the same problems' in text

  # Killed right after the last E-step (before it is verified), then resumed: the same report.
  resumed = str(tmp_path / 'resumed')
  real_score = scoring.score

  def killed(output_dir, **kwargs):
    if output_dir.endswith('scored_2'):
      raise KeyboardInterrupt('killed after the E-step')
    return real_score(output_dir, **kwargs)
  with monkeypatch.context() as m:
    m.setattr(scoring, 'score', killed)
    with pytest.raises(KeyboardInterrupt):
      run(['rest-em', f'--workdir={resumed}'] + TINY)
  assert os.path.exists(os.path.join(resumed, 'estep_2', 'stage.json'))
  assert not os.path.exists(os.path.join(resumed, 'scored_2'))
  run(['rest-em', f'--workdir={resumed}'] + TINY)
  assert comparable(_report(resumed)) == comparable(report)

  # The ablation `m_step_init='last'`: iteration 1 is the same run (its M-step starts from the
  # base model either way), so it starts from a copy of the straight run's first iteration;
  # M-step 2 then starts from M-step 1's policy, its step-0 dev pass@1 is iteration 1's.
  last = str(tmp_path / 'last')
  for d in ('base', 'estep_1', 'scored_1', 'mstep_1', 'cache', 'eval/base', 'eval/iter_1'):
    shutil.copytree(os.path.join(straight, d), os.path.join(last, d))
  run(['rest-em', f'--workdir={last}'] + TINY + [
      "--gin.rest_em.m_step_init='last'", '--gin.rest_em.controls=()'])
  with open(os.path.join(last, 'mstep_2', 'improve_summary.json')) as f:
    s = json.load(f)
  assert s['init_policy_dir'] == os.path.join(last, 'mstep_1')
  assert s['history'][0]['reward'] == its[1]['dev_pass1']
  assert _report(last)['controls'] == {} and _report(last)['m_step_init'] == 'last'


def test_the_longest_gold_solution_fits_the_decode_length():
  """Worked solutions are 2-4x longer than their problems: the math config's decoding bound
  (E-step, M-step dev selection, evaluation) must hold every gold solution of every split."""
  from rest_jax import data as data_lib, input_pipeline
  main_lib.parse_gin(['gin_configs/runs/rest_em_arithmetic_cpu.gin'], [])
  q = gin.query_parameter
  for split in ('train', 'pool', 'validation', 'test', 'test_hard'):
    d = input_pipeline.load_task_data('arithmetic_chain', split, q('rest_em.inputs_length'),
                                      q('rest_em.targets_length'))
    assert d.num_truncated == 0, split
    longest = int(data_lib.lengths(d.arrays['decoder_target_tokens']).max())  # EOS included.
    source_bucket = data_lib.bucket_length(
        int(data_lib.lengths(d.arrays['encoder_input_tokens']).max()), grow_lib.LENGTH_BUCKETS)
    for fn in ('grow', 'rest_em'):
      steps = data_lib.decode_length(source_bucket, q(f'{fn}.max_decode_len'),
                                     q(f'{fn}.decode_length_ratio'))
      assert longest <= steps, (split, fn, longest, steps)
    assert longest <= q('improve.max_decode_len') and q('improve.decode_length_ratio') is None
    assert longest <= q('train.max_decode_len') and q('train.decode_length_ratio') is None
