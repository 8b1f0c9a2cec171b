"""The ReST loop end to end (`rest-jax rest`) on the real corpus with very small models.

BC (a few steps) -> Grow 1 -> reward model -> score -> Improve 0..2 -> evaluation -> report, then
the same loop killed right after Grow and resumed: the report must be the same.
"""

import json
import os
import shutil

import gin
import numpy as np
import pytest
import sacrebleu

from rest_jax import evaluation, main as main_lib, report as report_lib, rest as rest_lib
from rest_jax.rewards import metrics, train_rm

from loop_utils import report as _report, run, strip, tensorboard_scalars

TINY = [
    '--gin_file=gin_configs/runs/rest_libreoffice_de_en_cpu.gin',
    '--gin.rest.bc_params_file=None', '--gin.rest.num_grow_steps=1',
    '--gin.rest.improve_steps_per_grow=3',
    '--gin.rest.dev_examples=8', '--gin.rest.test_examples=8', '--gin.rest.best_of_n_examples=8',
    "--gin.rest.best_of_n_stages=('bc', 'last')",
    '--gin.models.TransformerConfig.emb_dim=32', '--gin.models.TransformerConfig.mlp_dim=64',
    '--gin.models.TransformerConfig.num_heads=2', '--gin.models.TransformerConfig.head_dim=16',
    '--gin.models.TransformerConfig.num_encoder_layers=1',
    '--gin.models.TransformerConfig.num_decoder_layers=1',
    '--gin.train.batch_size=8', '--gin.train.inputs_length=32', '--gin.train.targets_length=32',
    '--gin.train.num_steps=4', '--gin.train.max_minutes=None', '--gin.train.eval_every_steps=100',
    '--gin.train.eval_examples=8', '--gin.train.max_decode_len=8',
    '--gin.train.max_train_examples=64', '--gin.make_optimizer.warmup_steps=2',
    '--gin.grow.max_sources=16', '--gin.grow.num_decodes=3', '--gin.grow.max_decode_len=8',
    '--gin.grow.chunk_size=8', '--gin.grow.batch_size=8',
    '--gin.rewards.RewardModelConfig.emb_dim=16', '--gin.rewards.RewardModelConfig.mlp_dim=32',
    '--gin.rewards.RewardModelConfig.num_layers=1', '--gin.rewards.RewardModelConfig.num_heads=2',
    '--gin.rewards.RewardModelConfig.head_dim=8',
    '--gin.train_reward_model.num_steps=4', '--gin.train_reward_model.batch_size=8',
    '--gin.train_reward_model.max_minutes=None', '--gin.train_reward_model.dev_fraction=0.25',
    '--gin.improve.num_steps=4', '--gin.improve.eval_every_steps=2', '--gin.improve.batch_size=8',
    '--gin.improve.max_decode_len=8',
    '--gin.evaluate_policy.max_decode_len=8', '--gin.evaluate_policy.batch_size=8',
    '--gin.best_of_n.max_decode_len=8', "--gin.best_of_n.ns=(1, 2, 4)",
    '--gin.best_of_n.batch_size=8',
]
TIMING_KEYS = ('minutes', 'stage_minutes', 'grow_minutes', 'score_minutes',
               'minutes_this_invocation', 'minutes_total', 'scored_dir')


def test_corpus_metrics_length_statistics():
  # 6 hypothesis tokens against 8 reference tokens: ratio 0.75, BP = exp(1 - 8 / 6).
  m = evaluation.corpus_metrics(['a b c', 'd e f'], ['a b c x', 'd e f y'])
  assert m['length_ratio'] == 0.75 and np.isclose(m['bleu_bp'], np.exp(1 - 8 / 6))
  m = evaluation.corpus_metrics(['a b c x z'], ['a b c x'])
  assert m['length_ratio'] == 1.25 and m['bleu_bp'] == 1.0
  with pytest.raises(ValueError):
    evaluation.corpus_metrics(['a'], [])


def test_rank_agreement_by_hand():
  # 4 sentences: pairs (0,1) (0,2) (0,3) (1,2) (1,3) concordant, (2,3) discordant -> (5 - 1) / 6.
  assert np.isclose(rest_lib.rank_agreement([0.1, 0.2, 0.3, 0.4], [0.0, 0.5, 0.9, 0.8]), 4 / 6)
  assert np.isclose(rest_lib.rank_agreement([0.1, 0.2, 0.3], [0.3, 0.2, 0.1]), -1.0)
  # A reward model that gives every translation the same score ranks nothing.
  assert np.isnan(rest_lib.rank_agreement([1.0, 1.0, 1.0], [0.1, 0.5, 0.9]))
  assert np.isnan(rest_lib.rank_agreement([0.5], [0.5]))


def test_reward_hacking_alarms_on_hand_made_stages():
  st = lambda name, reward, bleu, oracle=None: dict(name=name, test_reward=reward,
                                                    test_bleu=bleu, test_oracle=oracle)
  stages = [st('bc', 30.0, 12.0, 30.0),
            st('G1I0', 31.0, 11.5, 29.5),   # BLEU -0.5, oracle -0.5: no alarm.
            st('G1I1', 33.0, 10.9, 28.9),   # vs bc: BLEU -1.1 and oracle -1.1; vs G1I0: neither.
            st('G1I2', 32.0, 9.0, 26.0),    # reward fell vs G1I1 (no alarm there); vs bc: both.
            st('G1I3', 34.0, 6.5),          # no oracle: BLEU alarms only.
            st('G2I0', 34.0, 6.5)]          # kept its start (= G1I3): no alarm of its own.
  alarms = report_lib.reward_hacking_alarms(stages, bleu_drop=1.0, oracle_drop=1.0)
  got = [(a['stage'], a['versus'], a['measure']) for a in alarms]
  assert got == [('G1I1', 'bc', 'test_bleu'), ('G1I1', 'bc', 'test_oracle'),
                 ('G1I2', 'bc', 'test_bleu'), ('G1I2', 'bc', 'test_oracle'),
                 ('G1I3', 'G1I2', 'test_bleu'), ('G1I3', 'bc', 'test_bleu')]
  assert alarms[1]['reward_change'] == 3.0 and np.isclose(alarms[1]['change'], -1.1)
  assert 'test oracle (chrF+TER) 30.00 -> 28.90' in alarms[1]['message']
  only_bleu = report_lib.reward_hacking_alarms(stages, bleu_drop=1.0, oracle_drop=None)
  assert {a['measure'] for a in only_bleu} == {'test_bleu'} and len(only_bleu) == 4
  assert report_lib.reward_hacking_alarms(stages, bleu_drop=5.0, oracle_drop=5.0) == [
      a for a in alarms if a['stage'] == 'G1I3' and a['versus'] == 'bc']


def test_report_plots_draw_oracle_and_alarms_and_keep_text_inside(tmp_path, monkeypatch):
  """The committed reports' plots (and Grow histograms of made-up rewards): every title, label,
  tick and legend inside the figure; the reward plot shows the test oracle and the alarms."""
  drawn = {}
  save = report_lib._save

  def check(fig, out_dir, name):
    fig.tight_layout()
    fig.canvas.draw()
    box, (w, h) = fig.get_tightbbox(), fig.get_size_inches()
    drawn[name] = (box.x0, box.y0, w - box.x1, h - box.y1)  # Margins, inches: < 0 = cut off.
    if name == 'reward_per_stage.png':
      ax = fig.axes[0]
      drawn['lines'] = {l.get_label(): list(l.get_ydata()) for l in ax.get_lines()}
      drawn['spans'] = sorted((p.get_x() + p.get_width() / 2) for p in ax.patches)
    return save(fig, out_dir, name)
  monkeypatch.setattr(report_lib, '_save', check)
  with open('results/rest_main_cpu/report.json') as f:
    report = json.load(f)
  rewards = {g['grow']: np.random.default_rng(0).beta(2, 3, g['records'])
             for g in report['grows']}
  report_lib.plots(str(tmp_path / 'rest'), report, rewards)
  with open('results/rest_em_main_cpu/report.json') as f:
    report_lib.rest_em_plots(str(tmp_path / 'em'), json.load(f))
  assert sorted(n for n in drawn if n.endswith('.png')) == [
      'best_of_n.png', 'pass1_per_iteration.png', 'pass_at_k.png', 'reward_hist_grow_1.png',
      'reward_hist_grow_2.png', 'reward_per_stage.png', 'reward_vs_bleu.png']
  for name in drawn:
    if name.endswith('.png'):
      assert min(drawn[name]) >= -0.01, (name, drawn[name])
  stages = report['stages']
  assert drawn['lines']['test oracle (chrF+TER)'] == [s['test_oracle'] for s in stages]
  assert drawn['lines']['test RM reward'] == [s['test_reward'] for s in stages]
  names = [s['name'] for s in stages]
  alarmed = sorted({names.index(a['stage']) for a in report['alarms']})
  assert alarmed == [4, 8]  # G1I3 and G2I3 (report.json): one shaded band each.
  np.testing.assert_allclose(drawn['spans'], alarmed)
  assert os.path.exists(tmp_path / 'rest' / 'plots' / 'reward_hist_grow_2.png')


def test_improve_steps_per_grow_and_the_old_name(tmp_path):
  count = rest_lib.improve_step_count
  assert count(None, None) == 3 and count(4, None) == 4
  # The old `num_improve_steps` was the last step index: `= 3` ran steps 0..3, and still does.
  assert count(None, 3) == 4 and count(4, 3) == 4
  with pytest.raises(ValueError, match='disagree'):
    count(3, 3)
  with pytest.raises(ValueError, match='>= 1'):
    count(0, None)
  # Too many steps for the (default, 6-threshold) schedule: refused before any work.
  with pytest.raises(ValueError, match='improve_steps_per_grow=7 needs 7 thresholds'):
    rest_lib.rest(str(tmp_path), model=None, improve_steps_per_grow=7)
  # The main job's config: four steps per Grow under the new name; an old file's binding parses.
  main_lib.parse_gin(['gin_configs/runs/rest_libreoffice_de_en_cpu.gin'], [])
  assert gin.query_parameter('rest.improve_steps_per_grow') == 4
  assert gin.query_parameter('compare_losses.improve_steps_per_grow') == 3
  gin.parse_config('rest.num_improve_steps = 3')
  assert count(None, gin.query_parameter('rest.num_improve_steps')) == 4


def test_best_of_n_by_hand(monkeypatch):
  """`best_of_n` on fixed samples and rewards: for each N the reward model's favourite of the first
  N samples of each source (ties: the first), against picks worked out by hand."""
  from rest_jax import input_pipeline
  words = {i: w for i, w in enumerate(
      'PAD EOS x the cat sat on a mat dog ran far away big red car stops'.split())}
  rewards = np.array([[0.2, 0.9, 0.1, 0.5],    # source 0: N=1 -> 0, N=2 -> 1, N=4 -> 1
                      [0.6, 0.3, 0.8, 0.7],    # source 1: 0, 0, 2
                      [0.4, 0.4, 0.4, 1.0]])   # source 2: 0, 0 (tie: the first), 3
  picks = {1: [0, 0, 0], 2: [1, 0, 0], 4: [1, 2, 3]}
  cand = lambda b, j: [3 + 4 * b + j] * (1 + j % 2) + [1]   # Lengths 2 or 3 (EOS last).
  tokens = np.full((3, 4, 5), 31, np.int32)                  # 31: garbage past each length.
  lengths = np.zeros((3, 4), np.int32)
  for b in range(3):
    for j in range(4):
      tokens[b, j, :len(cand(b, j))], lengths[b, j] = cand(b, j), len(cand(b, j))
  detok = lambda ids: ' '.join(words[i] for i in ids if i > 1)
  refs = ['the the', 'dog ran', 'red red car']
  test = input_pipeline.TaskData(
      {'encoder_input_tokens': np.array([[5, 1, 0], [6, 7, 1], [8, 1, 0]], np.int32)},
      ['s0', 's1', 's2'], refs, ['k0', 'k1', 'k2'], 0)
  calls = {}

  def sample(model, params, enc, index, seed, num_decodes, temperature, **kw):
    calls.update(num_decodes=num_decodes, temperature=temperature, seed=seed)
    return {'tokens': tokens, 'lengths': lengths}

  class Scorer:
    def score_ids(self, sources, ids, references=None, batch_size=None):
      src = [[5, 1], [6, 7, 1], [8, 1]]
      assert sources == [src[k // 4] for k in range(12)]
      assert references == [refs[k // 4] for k in range(12)]
      return np.array([rewards[k // 4, k % 4] if ids[k] == cand(k // 4, k % 4) else np.nan
                       for k in range(12)], np.float32)

  monkeypatch.setattr(rest_lib, '_policy_params', lambda *a: None)
  monkeypatch.setattr(rest_lib.grow_lib, 'sample_candidates', sample)
  out = rest_lib.best_of_n(None, 'unused', Scorer(), test, detok, ns=(1, 2, 4), temperature=0.7,
                           seed=3)
  assert calls == {'num_decodes': 4, 'temperature': 0.7, 'seed': 3}
  assert out['n'] == [1, 2, 4] and out['sources'] == 3
  np.testing.assert_allclose(out['reward'], [100 * 1.2 / 3, 100 * 1.9 / 3, 100 * 2.7 / 3],
                             rtol=1e-6)
  for k, n in enumerate((1, 2, 4)):
    hyps = [detok(cand(b, j)) for b, j in enumerate(picks[n])]
    assert out['chrf'][k] == sacrebleu.corpus_chrf(hyps, [refs]).score
    assert out['bleu'][k] == sacrebleu.corpus_bleu(hyps, [refs]).score
  assert len(set(out['chrf'])) == 3  # The picks differ, so a wrong pick would show.


def test_rest_loop_end_to_end_and_resume(tmp_path, monkeypatch):
  straight = str(tmp_path / 'straight')
  run(['rest', f'--workdir={straight}'] + TINY)
  report = _report(straight)
  names = [s['name'] for s in report['stages']]
  assert names == ['bc', 'G1I0', 'G1I1', 'G1I2']
  taus = [s['tau'] for s in report['stages']]
  assert taus == [None, 0.0, 0.7, 0.8]
  for s in report['stages']:
    for key in ('dev_reward', 'test_reward', 'test_bleu', 'test_chrf', 'minutes'):
      assert np.isfinite(s[key]), (s['name'], key)
    assert 0.0 <= s['test_reward'] <= 100.0
  kept = [s['num_train_records'] for s in report['stages'][1:]]
  assert kept[0] == report['grows'][0]['records']  # tau = 0 keeps every record ...
  assert kept[0] > kept[1] >= kept[2] > 0           # ... and the schedule keeps fewer and fewer.
  assert report['grows'][0]['sources'] == 16 and report['grows'][0]['samples_drawn'] == 48
  assert set(report['best_of_n']) == {'bc', 'G1I2'}
  for b in report['best_of_n'].values():  # The picks themselves: test_best_of_n_by_hand.
    assert b['n'] == [1, 2, 4] and all(0.0 <= r <= 100.0 for r in b['reward'])
  assert report['bleu_signature'].startswith('nrefs:1|case:mixed')
  assert sorted(report['plots']) == ['plots/best_of_n.png', 'plots/reward_hist_grow_1.png',
                                     'plots/reward_per_stage.png', 'plots/reward_vs_bleu.png']
  with open(os.path.join(straight, 'report.md')) as f:
    assert '| G1I2 | 1 | 2 | 0.80 |' in f.read()
  # Every stage's greedy test translations, in test order, with the reward the report averages.
  for s in report['stages']:
    assert 0.0 < s['test_length_ratio'] and 0.0 <= s['test_bleu_bp'] <= 1.0
    with open(os.path.join(straight, 'eval', s['name'], 'test_translations.jsonl')) as f:
      rows = [json.loads(line) for line in f]
    assert len(rows) == 8 and set(rows[0]) == set(rest_lib.TRANSLATION_FIELDS)
    assert np.isclose(100 * np.mean([r['reward'] for r in rows]), s['test_reward'], atol=1e-3)
    hyps, refs = [r['translation'] for r in rows], [r['reference'] for r in rows]
    assert np.isclose(sacrebleu.corpus_bleu(hyps, [refs]).score, s['test_bleu'])
    oracle = metrics.sentence_rewards(hyps, refs, ('chrf+ter',))['chrf+ter']
    assert np.isclose(100 * oracle.mean(), s['test_oracle'])
    np.testing.assert_allclose([r['oracle'] for r in rows], oracle, atol=1e-6)
    agreement = rest_lib.rank_agreement([r['reward'] for r in rows], oracle)
    assert np.isclose(agreement, s['test_rm_oracle_kendall'], atol=1e-3, equal_nan=True)
  assert os.path.exists(os.path.join(straight, 'eval', 'bc', 'dev_translations.jsonl'))

  # The losses compared on the same Grow 1 data: 'bc' (the loop's loss) reuses the loop's own
  # Improve steps, 'gold' runs its own.
  run(['compare_losses', f'--workdir={straight}'] + TINY + [
      "--gin.compare_losses.losses=('bc', 'gold')", '--gin.compare_losses.improve_steps_per_grow=2',
      '--gin.compare_losses.dev_examples=8', '--gin.compare_losses.test_examples=8'])
  with open(os.path.join(straight, 'losses.json')) as f:
    losses = json.load(f)
  assert [r['loss'] for r in losses['losses']] == ['bc', 'gold', 'bc_references']
  assert not os.path.exists(os.path.join(straight, 'losses', 'bc', 'improve_1_0'))
  assert os.path.exists(os.path.join(straight, 'losses', 'gold', 'improve_1_1', 'stage.json'))
  # The control trains on the kept references only: at tau = 0 every reference (one a source).
  control = losses['losses'][2]
  assert control['origins'] == ['reference'] and control['train_records'][0] == 16
  assert losses['losses'][0]['train_records'] == kept[:2]
  g1i1 = next(s for s in report['stages'] if s['name'] == 'G1I1')
  bc_row = losses['losses'][0]
  assert ((bc_row['test_reward'], bc_row['test_bleu'], bc_row['test_oracle'])
          == (g1i1['test_reward'], g1i1['test_bleu'], g1i1['test_oracle']))
  with open(os.path.join(straight, 'losses.md')) as f:
    assert '| gold |' in f.read()

  # The work directory moved elsewhere: the loop and compare_losses resume from its stages (paths
  # are recorded relative to it, or relocated), nothing is rerun, the figures are the same.
  moved = str(tmp_path / 'elsewhere' / 'moved')
  shutil.move(straight, moved)
  run(['rest', f'--workdir={moved}'] + TINY)
  assert strip(_report(moved), TIMING_KEYS) == strip(report, TIMING_KEYS)
  run(['compare_losses', f'--workdir={moved}'] + TINY + [
      "--gin.compare_losses.losses=('bc', 'gold')", '--gin.compare_losses.improve_steps_per_grow=2',
      '--gin.compare_losses.dev_examples=8', '--gin.compare_losses.test_examples=8'])
  assert not os.path.exists(os.path.join(moved, 'losses', 'bc', 'improve_1_0'))
  with open(os.path.join(moved, 'losses.json')) as f:
    assert strip(json.load(f), ('start_policy',)) == strip(losses, ('start_policy',))
  shutil.move(moved, straight)
  # A work directory made by another configuration is refused, the differences listed.
  with pytest.raises(ValueError, match=r'holds a Grow with other settings \(temperature 0.8 -> '
                     r'0.5\)'):
    run(['rest', f'--workdir={straight}'] + TINY + ['--gin.grow.temperature=0.5'])
  with pytest.raises(ValueError, match=r"Improve step made by another configuration \(loss "
                     r"'bc' -> 'gold'\)"):
    run(['rest', f'--workdir={straight}'] + TINY + ["--gin.improve.loss='gold'"])

  # Killed right after Grow 1 (the reward model's training never starts), then resumed.
  resumed = str(tmp_path / 'resumed')

  def killed(*args, **kwargs):
    raise KeyboardInterrupt('killed after Grow')
  with monkeypatch.context() as m:
    m.setattr(train_rm, 'train_reward_model', killed)
    with pytest.raises(KeyboardInterrupt):
      run(['rest', f'--workdir={resumed}'] + TINY)
  assert os.path.exists(os.path.join(resumed, 'grow_1', 'stage.json'))
  assert not os.path.exists(os.path.join(resumed, 'rm'))
  run(['rest', f'--workdir={resumed}'] + TINY)
  assert strip(_report(resumed), TIMING_KEYS) == strip(report, TIMING_KEYS)

  # A loop given the straight run's reward model as it is (rest.rm_dir): no rm/ of its own, its
  # Grow scored by that model, so the same BC policy (the straight run's) gets the same rewards.
  shared = str(tmp_path / 'shared_rm')
  run(['rest', f'--workdir={shared}'] + TINY + [
      f"--gin.rest.rm_dir='{straight}/rm'", f"--gin.rest.bc_policy_dir='{straight}/bc'",
      '--gin.rest.improve_steps_per_grow=1', '--gin.rest.best_of_n_stages=()'])
  assert not os.path.exists(os.path.join(shared, 'rm'))
  with open(os.path.join(shared, 'scored_1', 'settings.json')) as f:
    assert json.load(f)['settings']['rm_dir'] == os.path.join(straight, 'rm')
  bc_shared, bc_straight = _report(shared)['stages'][0], report['stages'][0]
  assert (bc_shared['dev_reward'], bc_shared['test_reward']) == (
      bc_straight['dev_reward'], bc_straight['test_reward'])
  with pytest.raises(ValueError, match='rm_dir'):
    run(['rest', f'--workdir={tmp_path / "bad"}'] + TINY + [
        f"--gin.rest.rm_dir='{straight}/rm'", '--gin.rest.retrain_rm=True'])


def test_rest_loop_with_a_metric_reward(tmp_path):
  """`rest.reward='chrf+ter'`: no reward model; Grow is scored, Improve selected and stages
  reported by the metric against the reference."""
  workdir = str(tmp_path / 'metric')
  run(['rest', f'--workdir={workdir}'] + TINY + [
      "--gin.rest.reward='chrf+ter'", '--gin.rest.improve_steps_per_grow=2',
      '--gin.rest.best_of_n_stages=()'])
  report = _report(workdir)
  assert report['reward'] == 'chrf+ter' and not os.path.exists(os.path.join(workdir, 'rm'))
  assert [s['name'] for s in report['stages']] == ['bc', 'G1I0', 'G1I1']
  with open(os.path.join(workdir, 'scored_1', 'settings.json')) as f:
    assert json.load(f)['settings']['reward'] == 'chrf+ter'
  for s in report['stages']:
    with open(os.path.join(workdir, 'eval', s['name'], 'test_translations.jsonl')) as f:
      rows = [json.loads(line) for line in f]
    oracle = metrics.sentence_rewards([r['translation'] for r in rows],
                                      [r['reference'] for r in rows], ('chrf+ter',))['chrf+ter']
    assert np.isclose(100 * oracle.mean(), s['test_reward'], atol=1e-3)
    assert np.isclose(s['test_oracle'], s['test_reward'], atol=1e-3)  # The reward is the oracle.
  with open(os.path.join(workdir, 'report.md')) as f:
    assert "the metric 'chrf+ter' against the reference" in f.read()
  # TensorBoard (`tensorboard --logdir workdir`): one run per stage folder, train and dev curves.
  bc = tensorboard_scalars(os.path.join(workdir, 'bc'))
  for tag in ('train/loss', 'train/accuracy', 'train/learning_rate', 'dev/bleu', 'dev/chrf'):
    assert list(bc[tag]) == [4], tag  # train.num_steps=4: the last step, and the final dev eval.
  assert bc['train/learning_rate'][4] > 0
  for i in (0, 1):
    step_dir = os.path.join(workdir, f'improve_1_{i}')
    tb = tensorboard_scalars(step_dir)
    with open(os.path.join(step_dir, 'improve_summary.json')) as f:
      history = json.load(f)['history']
    evals = [e['step'] for e in history]
    assert evals == [0, 2, 4]  # improve.eval_every_steps=2, num_steps=4, the start policy at 0.
    for key in ('reward', 'bleu', 'chrf'):
      np.testing.assert_allclose([tb[f'dev/{key}'][k] for k in evals],
                                 [e[key] for e in history], rtol=1e-6)
    for tag in ('train/loss', 'train/nll', 'train/learning_rate', 'train/minutes'):
      assert list(tb[tag]) == [2, 4], (i, tag)  # At the evaluations (fewer than 10 steps).
    assert 'train/num_tokens' not in tb
