"""The reward side of ReST: metric rewards, RM losses, a tiny RM, resumable scoring, rm_check."""

import dataclasses
import filecmp
import itertools
import json
import os
import shutil
import types

import jax
import numpy as np
import pytest
import sacrebleu

from rest_jax import records as records_lib
from rest_jax import grow as grow_lib
from rest_jax import input_pipeline
from rest_jax import trainer as trainer_lib
from rest_jax.rewards import check, metrics, scoring, train_rm
from rest_jax.rewards import model as rm_model

V = 32
MARKER = 7
TINY = rm_model.RewardModelConfig(vocab_size=V, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=64,
                                  num_layers=1, dropout_rate=0.0, max_len=32)


def make_corpus(n=64, seed=3):
  """A parallel corpus whose 'translation' of token t (3..16) is t + 14, EOS-terminated."""
  rng = np.random.default_rng(seed)
  src, tgt = np.zeros((n, 10), np.int32), np.zeros((n, 10), np.int32)
  for i in range(n):
    words = rng.choice(np.arange(3, 17), rng.integers(2, 8), replace=False)
    src[i, :len(words) + 1] = list(words) + [1]
    tgt[i, :len(words) + 1] = list(words + 14) + [1]
  return src, tgt


CORPUS = make_corpus()


def tokenize(text):
  return [int(t) for t in text.split()]


def text(ids):
  return ' '.join(str(i) for i in ids if i > 1)


# -- metric rewards --------------------------------------------------------------------------------

def test_metric_rewards_equal_sacrebleu_sentence_scores():
  cands = ['The cat sat on the mat.', 'a dog', '', 'the the the the the the the the', 'Hallo Welt']
  refs = ['The cat sat on a mat.', 'A dog barked loudly.', 'Something.', 'the', 'Hello world']
  r = metrics.sentence_rewards(cands, refs)
  bleu = sacrebleu.metrics.BLEU(effective_order=True)
  chrf, ter = sacrebleu.metrics.CHRF(), sacrebleu.metrics.TER()
  for i, (c, ref) in enumerate(zip(cands, refs)):
    if not c:
      assert r['bleu'][i] == r['chrf'][i] == r['ter'][i] == 0.0  # empty candidate
      continue
    assert r['bleu'][i] == pytest.approx(min(bleu.sentence_score(c, [ref]).score / 100, 1.0))
    assert r['chrf'][i] == pytest.approx(chrf.sentence_score(c, [ref]).score / 100)
    assert r['ter'][i] == pytest.approx(1 - min(ter.sentence_score(c, [ref]).score / 100, 1))
  assert r['ter'][3] == 0.0  # TER 700 -> clipped to 0.
  assert all(v.dtype == np.float32 and v.shape == (5,) and (0 <= v).all() and (v <= 1).all()
             for v in r.values())
  same = metrics.sentence_rewards(['Hello world'], ['Hello world'])
  assert same == {'bleu': 1.0, 'chrf': 1.0, 'ter': 1.0}
  assert metrics.sentence_rewards([''], [''])['ter'][0] == 0.0  # empty, even vs an empty ref
  with pytest.raises(ValueError, match='unknown metric'):
    metrics.sentence_rewards(['a'], ['a'], ('comet',))
  with pytest.raises(ValueError, match='unknown metric'):
    metrics.sentence_rewards(['a'], ['a'], ('chrf+comet',))


def test_metric_scorer_scores_detokenized_candidates_against_references():
  scorer = metrics.MetricScorer('chrf+ter', detokenize=text)
  cands, refs = [[3, 4, 1], [3, 1], []], ['3 4', '3 4 4', '5']
  r = scorer.score_ids([[9, 1]] * 3, cands, references=refs)
  expected = metrics.sentence_rewards(['3 4', '3', ''], refs, ('chrf+ter',))['chrf+ter']
  np.testing.assert_array_equal(r, expected)
  assert r[0] == 1.0 and r[2] == 0.0 and 0.0 < r[1] < 1.0  # exact, different, empty
  with pytest.raises(ValueError, match='needs the references'):
    scorer.score_ids([[9, 1]], [[3, 1]])
  with pytest.raises(ValueError, match='unknown metric'):
    metrics.MetricScorer('comet', detokenize=text)


def test_composite_metric_is_the_mean_and_punishes_a_doubled_reference():
  ref = 'Click the arrow next to the icon to open the toolbar.'
  cands = [ref, f'{ref} {ref}', 'Click the arrow to open the toolbar.']
  r = metrics.sentence_rewards(cands, [ref] * 3, ('chrf', 'ter', 'chrf+ter'))
  np.testing.assert_allclose(r['chrf+ter'], (r['chrf'] + r['ter']) / 2, rtol=1e-6)
  assert r['chrf+ter'].dtype == np.float32
  # chrF (recall-weighted) still gives the doubled reference ~0.8; TER gives it 0 (100% edits).
  assert r['chrf'][1] > 0.75 and r['ter'][1] == 0.0
  # So chrF ranks the doubled reference above a good shorter paraphrase; the mean does not.
  assert r['chrf'][1] > r['chrf'][2] and r['chrf+ter'][1] < r['chrf+ter'][2]


# -- losses ----------------------------------------------------------------------------------------

def test_bradley_terry_loss_by_hand_and_its_gradient():
  scores = np.array([[2.0, 1.0, 0.0, 5.0], [0.0, 3.0, 0.0, 0.0]], np.float32)
  targets = np.array([[0.9, 0.5, 0.5, 0.1], [0.2, 0.8, 0.0, 0.0]], np.float32)
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
  # Pairs: row 0: (0 > 1), (0 > 2); (1, 2) tie skipped; candidate 3 masked. Row 1: (1 > 0).
  nls = lambda d: np.log1p(np.exp(-d))  # -log sigmoid(d)
  expected = (nls(2.0 - 1.0) + nls(2.0 - 0.0) + nls(3.0 - 0.0)) / 3
  assert float(rm_model.bradley_terry_loss(scores, targets, mask)) == pytest.approx(expected,
                                                                                    rel=1e-6)
  assert int(rm_model.preference_pairs(targets, mask).sum()) == 3
  grad = np.asarray(jax.grad(rm_model.bradley_terry_loss)(scores, targets, mask))
  assert grad[0, 0] < 0 and grad[1, 1] < 0  # descent raises the preferred candidates' scores
  assert grad[0, 1] > 0 and grad[0, 2] > 0 and grad[1, 0] > 0
  assert grad[0, 3] == 0 and grad[1, 2] == 0  # masked candidates get no gradient
  # Accuracy: all three pairs ordered right; flipping row 1 makes one of three wrong.
  assert float(rm_model.pairwise_accuracy(scores, targets, mask)) == 1.0
  flipped = scores.copy()
  flipped[1] = [3.0, 0.0, 0.0, 0.0]
  assert float(rm_model.pairwise_accuracy(flipped, targets, mask)) == pytest.approx(2 / 3)
  tied = scores.copy()
  tied[1] = [1.0, 1.0, 0.0, 0.0]
  assert float(rm_model.pairwise_accuracy(tied, targets, mask)) == pytest.approx(2.5 / 3)
  # Comparison groups (bit masks): candidate 2 shares no bit with 0, so pair (0 > 2) is dropped.
  groups = np.array([[1, 3, 2, 1], [1, 1, 0, 0]], np.int32)
  assert float(rm_model.bradley_terry_loss(scores, targets, mask, groups)) == pytest.approx(
      (nls(1.0) + nls(3.0)) / 2, rel=1e-6)
  # Weighted MSE: ((1 - 0.5)^2 * 1 + (2 - 0)^2 * 0 + (0 - 1)^2 * 2) / 3 = 2.25 / 3.
  assert float(rm_model.regression_loss(np.array([1.0, 2.0, 0.0]), np.array([0.5, 0.0, 1.0]),
                                        np.array([1.0, 0.0, 2.0]))) == pytest.approx(0.75)


def test_pack_inputs_cuts_the_source_first_and_takes_empty_candidates():
  tokens, segs = rm_model.pack_inputs([[5, 6, 7, 1], [5, 6, 7, 8, 9, 1], [3, 1]],
                                      [[9, 1], [10, 11, 12, 1], []], max_len=6)
  np.testing.assert_array_equal(tokens, [[5, 6, 7, 1, 9, 1], [5, 6, 10, 11, 12, 1],
                                         [3, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(segs, [[1, 1, 1, 1, 2, 2], [1, 1, 2, 2, 2, 2],
                                       [1, 1, 0, 0, 0, 0]])
  assert tokens.dtype == segs.dtype == np.int32
  long_tokens, _ = rm_model.pack_inputs([[3, 1]], [list(range(2, 12))], max_len=6)
  np.testing.assert_array_equal(long_tokens, [[2, 3, 4, 5, 6, 7]])


def test_lsi_embedding_puts_translations_together():
  e, present = train_rm.lsi_embedding(*CORPUS, vocab_size=V, dim=8)
  assert e.shape == (V, 8) and e.dtype == np.float32
  np.testing.assert_array_equal(present, [t in range(3, 31) for t in range(V)])
  assert (e[~present] == 0).all() and e[present].std() == pytest.approx(1.0, rel=1e-4)
  unit = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-9)
  for t in range(3, 17):
    sims = unit[range(17, 31)] @ unit[t]
    assert np.argmax(sims) == t - 3, t  # its translation t + 14 is the nearest target token
  with pytest.raises(ValueError, match='LSI of dimension 40'):
    train_rm.lsi_embedding(*CORPUS, vocab_size=V, dim=40)


# -- a tiny RM learns a synthetic preference -------------------------------------------------------

def marker_arrays(n, seed):
  """n sources x 4 candidates; the 2 candidates containing MARKER are preferred (target 1)."""
  rng = np.random.default_rng(seed)
  vocab = np.array([t for t in range(3, V) if t != MARKER])
  src, cand, tgt, sid = [], [], [], []
  for i in range(n):
    s = list(rng.choice(vocab, rng.integers(3, 9))) + [1]
    for j in range(4):
      c = list(rng.choice(vocab, rng.integers(3, 9)))
      if j % 2 == 0:
        c[rng.integers(len(c))] = MARKER
      src.append(s)
      cand.append(c + [1])
      tgt.append(1.0 if j % 2 == 0 else 0.0)
      sid.append(i)
  cands = train_rm.Candidates(np.array(sid), ['sample'] * len(sid), src, cand, [''] * len(sid),
                              [''] * len(sid), {'oracle': np.array(tgt, np.float32)})
  return cands


def test_tiny_reward_model_learns_a_marker_preference():
  train, held_out = marker_arrays(96, seed=0), marker_arrays(32, seed=1)
  arrays = train_rm.pack_by_source(train, train.labels['oracle'], TINY.max_len)
  assert arrays['tokens'].shape == (96, 4, TINY.max_len) and arrays['mask'].sum() == 96 * 4
  state, info = train_rm.fit(TINY, arrays, num_steps=120, batch_size=16, learning_rate=3e-3,
                             warmup_steps=10, seed=0)
  assert info['steps'] == 120
  scorer = rm_model.RewardScorer(TINY, state.params)
  raw = scorer.raw_scores(held_out.source_ids, held_out.candidate_ids, batch_size=32)
  result = train_rm.evaluate_scores(raw, held_out, against=('oracle',))
  assert result['oracle']['num_pairs'] == 32 * 4  # 2 x 2 preferred-vs-not pairs per source
  assert result['oracle']['pairwise_accuracy'] >= 0.95, result


# -- a synthetic Grow dir, the RM trained on it, scoring ------------------------------------------

N_SOURCES, CHUNK = 12, 4
K = N_SOURCES // CHUNK


def grow_records(i, rng):
  src = list(rng.integers(3, V, rng.integers(3, 8)))
  ref = list(rng.integers(3, V, rng.integers(3, 8)))
  common = dict(source_index=i, source=text(src), source_ids=src + [1], reference=text(ref),
                grow_step=1)
  recs = [dict(common, candidate=text(ref), candidate_ids=ref + [1], length=len(ref) + 1,
               candidate_index=-1, origin='reference', key=f'pair-{i}/grow_1/reference',
               num_duplicates=0, logprob_sampling=-3.0, logprob_policy=-3.0)]
  for j in range(3):  # Samples: the reference with j + 1 tokens replaced.
    c = list(ref)
    for p in rng.choice(len(c), min(j + 1, len(c)), replace=False):
      c[p] = int(rng.integers(3, V))
    recs.append(dict(common, candidate=text(c), candidate_ids=c + [1], length=len(c) + 1,
                     candidate_index=j, origin='sample', key=f'pair-{i}/grow_1/sample_{j}',
                     num_duplicates=1, logprob_sampling=-4.0 - j, logprob_policy=-5.0 - j))
  return recs


@pytest.fixture(scope='module')
def grow_dir(tmp_path_factory):
  """A finished Grow as `rest-jax grow` writes it: 3 chunks, markers, manifest."""
  d = tmp_path_factory.mktemp('grow') / 'grow_1'
  os.makedirs(d)
  rng = np.random.default_rng(5)
  records = [grow_records(i, rng) for i in range(N_SOURCES)]
  for k in range(K):
    recs = [r for rs in records[k * CHUNK:(k + 1) * CHUNK] for r in rs]
    records_lib.write_chunk(str(d), records_lib.GROW, k, K, recs, {'records': len(recs)})
  records_lib.write_manifest(str(d), {
      'counts': {'chunks': K, 'records': N_SOURCES * 4}, 'settings_hash': 'synthetic'})
  return d


@pytest.fixture(scope='module')
def rm_dir(grow_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp('rm') / 'rm'
  summary = train_rm.train_reward_model(str(out), grow_dir=str(grow_dir), task='tiny',
                                        num_steps=6, batch_size=8, warmup_steps=2,
                                        dev_fraction=0.25, config=TINY, tokenize=tokenize,
                                        corpus=CORPUS)
  return out, summary


def test_train_reward_model_outputs_and_loading(rm_dir, grow_dir):
  out, summary = rm_dir
  assert summary['steps'] == 6 and 'SIMULATED' in summary['oracle_note']
  c = summary['counts']
  assert c['grow_records'] == N_SOURCES * 4 and c['train_sources'] + c['dev_sources'] == 12
  assert c['train_candidates']['empty'] == c['train_sources']  # one of each negative per source
  assert c['train_candidates']['repeated_sample'] == 3 * c['train_sources']  # degraded_samples=3
  assert c['dev_candidates']['reference'] == c['dev_sources'] >= 1
  dev = summary['dev']
  for part in ('grow_records', 'with_negatives'):
    for name in ('chrf', 'bleu'):
      assert set(dev[part][name]) == {'pairwise_accuracy', 'num_pairs', 'kendall_tau', 'pearson'}
  with open(out / 'rm_config.json') as f:
    saved = json.load(f)
  assert saved['oracle'] == 'chrf' and saved['objective'] == 'bradley_terry+regression'
  assert saved['calibration']['low'] <= saved['calibration']['high']
  assert rm_model.RewardModelConfig.from_json(saved['config']) == TINY
  scorer = rm_model.load_reward_model(str(out), tokenize=tokenize)
  r = scorer.score_ids([[3, 4, 1], [5, 1], [5, 1]], [[6, 1], [1], []])
  assert r.dtype == np.float32 and r.shape == (3,) and ((0 <= r) & (r <= 1)).all()
  # score_text appends EOS to each text: '' is the EOS-only candidate [1], not the empty row [].
  np.testing.assert_allclose(scorer.score_text(['3 4', '5'], ['6', '']), r[:2])
  # Exported (rm_config.json + float32 params.npz, no checkpoints/): scores exactly the same.
  exported = rm_model.export_reward_model(str(out), str(out.parent / 'exported'))
  assert sorted(os.listdir(exported)) == ['params.npz', 'rm_config.json']
  again_scorer = rm_model.load_reward_model(exported, tokenize=tokenize)
  np.testing.assert_array_equal(again_scorer.score_ids([[3, 4, 1], [5, 1], [5, 1]],
                                                       [[6, 1], [1], []]), r)
  with pytest.raises(FileNotFoundError, match='rm_config.json'):
    rm_model.load_reward_model(str(out.parent / 'nowhere'))
  # A finished run is returned as is; other settings are refused.
  again = train_rm.train_reward_model(str(out), grow_dir=str(grow_dir), task='tiny', num_steps=6,
                                      batch_size=8, warmup_steps=2, dev_fraction=0.25,
                                      config=TINY, tokenize=tokenize, corpus=CORPUS)
  assert again == json.load(open(out / 'rm_summary.json'))
  with pytest.raises(ValueError, match='num_steps 6 -> 7'):
    train_rm.train_reward_model(str(out), grow_dir=str(grow_dir), task='tiny', num_steps=7,
                                batch_size=8, warmup_steps=2, dev_fraction=0.25, config=TINY,
                                tokenize=tokenize, corpus=CORPUS)


def test_train_reward_model_writes_tensorboard_scalars(rm_dir):
  """TensorBoard shows the RM's training curves and its dev evaluation, at the summary's values."""
  from loop_utils import tensorboard_scalars
  out, summary = rm_dir
  scalars = tensorboard_scalars(str(out))
  for tag in ('train/loss', 'train/pairwise_accuracy', 'train/learning_rate', 'train/minutes'):
    assert list(scalars[tag]) == [6], tag  # 6 steps: logged at the last one.
  assert np.isclose(scalars['train/loss'][6], summary['final_loss'])
  # Cosine schedule, warm-up 2, decaying to 0 at step 6: the 6th update's rate, lr(5) > 0.
  lr = scalars['train/learning_rate'][6]
  assert np.isclose(lr, 5e-3 * 0.5 * (1 + np.cos(np.pi * 3 / 4)), rtol=1e-5)
  dev = summary['dev']
  for prefix, part in (('dev/', 'grow_records'), ('dev/with_negatives/', 'with_negatives')):
    for k in ('pairwise_accuracy', 'kendall_tau', 'pearson'):
      assert list(scalars[prefix + k]) == [6]
      np.testing.assert_allclose(scalars[prefix + k][6], dev[part]['chrf'][k], rtol=1e-6)


# -- reward-model training killed and resumed ------------------------------------------------------

TRAIN_STEP = trainer_lib.Trainer.train_step


class Killed(Exception):
  """Stands for a SIGKILL of the training process (raised by `kill_before_step`)."""


def kill_before_step(monkeypatch, step):
  """Makes `Trainer.train_step` raise `Killed` instead of the update from state step `step`
  (None: never); returns the list that gets one entry per update run."""
  ran = []

  def train_step(self, state, batch):
    if step is not None and int(jax.device_get(state.step)) == step:
      raise Killed(step)
    ran.append(1)
    return TRAIN_STEP(self, state, batch)

  monkeypatch.setattr(trainer_lib.Trainer, 'train_step', train_step)
  return ran


def checkpoint_steps(out):
  return sorted(int(n) for n in os.listdir(os.path.join(out, 'checkpoints')) if n.isdigit())


def test_fit_killed_after_a_checkpoint_resumes_to_the_uninterrupted_state(tmp_path, monkeypatch):
  """Killed at step 6 (checkpoint at 4), resumed: steps 5-10 run again and give the whole state
  (params, AdamW moments, schedule count, frozen embedding's multi_transform) of a straight run;
  dropout on, so the rng must follow the step. max_minutes counts the killed run's time."""
  config = dataclasses.replace(TINY, dropout_rate=0.1)
  train = marker_arrays(32, seed=0)
  arrays = train_rm.pack_by_source(train, train.labels['oracle'], config.max_len)
  kw = dict(num_steps=10, batch_size=8, learning_rate=3e-3, warmup_steps=2, seed=0,
            train_embedding=False)
  fit = lambda **k: train_rm.fit(config, arrays, params=train_rm.init_params(config, 0), **k)
  straight, straight_info = fit(**kw)  # (fresh params each time: `fit` donates them.)
  straight = jax.device_get(straight)
  run = str(tmp_path / 'run')
  ckpt = lambda: dict(checkpointer=trainer_lib.Checkpointer(run, keep=2), checkpoint_every=4)

  ran = kill_before_step(monkeypatch, 6)
  with monkeypatch.context() as m:  # A clock of 1000 s a reading: the killed run "took" hours.
    ticks = itertools.count(0.0, 1000.0)
    m.setattr(train_rm, 'time', types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    with pytest.raises(Killed):
      fit(**kw, **ckpt())
  assert len(ran) == 6 and checkpoint_steps(run) == [4]
  seconds = trainer_lib.Checkpointer(run).latest_metrics(4)['train_seconds']
  assert seconds >= 1000
  # max_minutes is training time over the restarts: 1 minute was spent before the kill.
  del ran[:]
  _, info = fit(**dict(kw, max_minutes=1), **ckpt())
  assert not ran and info['steps'] == info['resumed_from'] == 4 and checkpoint_steps(run) == [4]

  ran = kill_before_step(monkeypatch, None)
  resumed, info = fit(**kw, **ckpt())
  assert len(ran) == 6 and info['resumed_from'] == 4 and info['steps'] == 10
  assert info['train_seconds'] > seconds and checkpoint_steps(run) == [8, 10]
  resumed = jax.device_get(resumed)
  assert jax.tree.structure(resumed) == jax.tree.structure(straight)
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)
  assert int(resumed.step) == 10
  assert (info['final_loss'], info['final_train_pairwise_accuracy']) == (
      straight_info['final_loss'], straight_info['final_train_pairwise_accuracy'])


def test_train_reward_model_killed_resumes_and_refuses_other_settings(grow_dir, tmp_path,
                                                                      monkeypatch):
  """`train_reward_model` killed at step 5 (checkpoints at 2, 4): a rerun with other settings
  is refused and changes nothing; the same settings resume from step 4 to a straight run's params
  and summary, keeping the event files; only the final checkpoint is left. Checkpoints of a run
  from before settings were pinned (no settings.json) are not resumed: it starts at step 0.

  Random embedding init: the LSI of this tiny corpus is not reproducible to the last bit from one
  call to the next (ARPACK on a degenerate matrix), so two straight runs would differ."""
  kw = dict(grow_dir=str(grow_dir), task='tiny', num_steps=6, batch_size=8, warmup_steps=2,
            dev_fraction=0.25, config=TINY, tokenize=tokenize, embedding_init=None)
  straight_dir = str(tmp_path / 'straight' / 'rm')
  straight = train_rm.train_reward_model(straight_dir, **kw)  # No checkpoint before the end.
  kw['checkpoint_every'] = 2
  out = str(tmp_path / 'rm')
  ran = kill_before_step(monkeypatch, 5)
  with pytest.raises(Killed):
    train_rm.train_reward_model(out, **kw)
  assert checkpoint_steps(out) == [2, 4]
  legacy = str(tmp_path / 'legacy' / 'rm')
  shutil.copytree(out, legacy)
  os.remove(os.path.join(legacy, records_lib.SETTINGS_FILE))
  events = sorted(n for n in os.listdir(out) if n.startswith('events.out.tfevents.'))
  assert events
  before = {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)}
  with pytest.raises(ValueError, match=r'a reward model with other settings \(learning_rate '):
    train_rm.train_reward_model(out, **dict(kw, learning_rate=1e-3))
  assert {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)} == before

  ran = kill_before_step(monkeypatch, None)
  summary = train_rm.train_reward_model(out, **kw)
  assert len(ran) == 2 and checkpoint_steps(out) == [6]  # Steps 5 and 6 only.
  assert set(events) <= set(os.listdir(out))
  timing = ('train_minutes', 'wall_minutes')
  assert {k: v for k, v in summary.items() if k not in timing} == {
      k: v for k, v in straight.items() if k not in timing}
  names = lambda d: sorted(n for n in os.listdir(d) if not n.startswith('events.out.'))
  assert names(out) == names(straight_dir) == [
      'checkpoints', 'rm_config.json', 'rm_summary.json', 'settings.json']
  assert filecmp.cmp(os.path.join(out, 'rm_config.json'),
                     os.path.join(straight_dir, 'rm_config.json'), shallow=False)
  params = lambda d: jax.device_get(rm_model.load_reward_model(d, tokenize=tokenize).params)
  jax.tree.map(np.testing.assert_array_equal, params(out), params(straight_dir))

  del ran[:]
  train_rm.train_reward_model(legacy, **kw)
  assert len(ran) == 6 and checkpoint_steps(legacy) == [6]
  jax.tree.map(np.testing.assert_array_equal, params(legacy), params(straight_dir))


def scored_files(d):
  return sorted(f for f in os.listdir(d) if f.startswith('scored-'))


def test_scoring_is_resumable_and_byte_identical(rm_dir, grow_dir, tmp_path):
  kw = dict(grow_dir=str(grow_dir), rm_dir=str(rm_dir[0]), task='tiny')
  straight = scoring.score(str(tmp_path / 'straight'), **kw)
  with pytest.raises(scoring.ScoringInterrupted):
    scoring.score(str(tmp_path / 'resumed'), _stop_after_chunks=1, **kw)
  resumed_dir = tmp_path / 'resumed'
  assert not (resumed_dir / 'manifest.json').exists()
  with pytest.raises(FileNotFoundError, match='manifest'):
    scoring.read_scored_records(str(resumed_dir))
  (resumed_dir / f'scored-00001-of-{K:05d}.tfrecord.tmp').write_bytes(b'partial')  # a kill
  mtime = os.path.getmtime(resumed_dir / f'scored-00000-of-{K:05d}.tfrecord')
  resumed = scoring.score(str(resumed_dir), **kw)
  assert resumed['chunks_resumed'] == 1
  assert os.path.getmtime(resumed_dir / f'scored-00000-of-{K:05d}.tfrecord') == mtime
  assert scored_files(resumed_dir) == scored_files(tmp_path / 'straight')
  for f in scored_files(resumed_dir):
    assert filecmp.cmp(resumed_dir / f, tmp_path / 'straight' / f, shallow=False), f
  assert resumed['counts'] == straight['counts'] == dict(chunks=K, records=48, reference=12,
                                                         sample=36)
  assert resumed['histograms'] == straight['histograms']
  for origin in scoring.ORIGINS:
    for field in ('reward', 'bleu', 'chrf', 'ter'):
      assert sum(straight['histograms'][origin][field]) == straight['counts'][origin]
  records = scoring.read_scored_records(str(tmp_path / 'straight'))
  grow_records_ = grow_lib.read_grow_records(str(grow_dir))
  assert [r['key'] for r in records] == [r['key'] for r in grow_records_]
  assert set(records[0]) == set(records_lib.RECORD_FIELDS) | {'reward', 'reward_raw', 'bleu',
                                                           'chrf', 'ter'}
  scorer = rm_model.load_reward_model(str(rm_dir[0]), tokenize=tokenize)
  raw = scorer.raw_scores([r['source_ids'] for r in records], [r['candidate_ids'] for r in records])
  np.testing.assert_allclose([r['reward_raw'] for r in records], raw, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose([r['reward'] for r in records], scorer.calibrate(raw), atol=1e-5)
  refs = [r for r in records if r['origin'] == 'reference']
  assert all(r['chrf'] == r['bleu'] == r['ter'] == 1.0 for r in refs)
  assert straight['mean_reward']['reference'] == pytest.approx(
      np.mean([r['reward'] for r in refs]), abs=1e-5)
  with pytest.raises(ValueError, match="reward 'rm' -> 'bleu'"):
    scoring.score(str(resumed_dir), grow_dir=str(grow_dir), reward='bleu', task='tiny')


def test_scoring_with_a_metric_reward(grow_dir, tmp_path):
  manifest = scoring.score(str(tmp_path), grow_dir=str(grow_dir), reward='chrf', task='tiny',
                           metrics=('bleu',))
  records = scoring.read_scored_records(str(tmp_path))
  assert all(r['reward'] == r['reward_raw'] for r in records) and 'chrf' not in records[0]
  expected = metrics.sentence_rewards([r['candidate'] for r in records],
                                      [r['reference'] for r in records], ('chrf',))['chrf']
  np.testing.assert_allclose([r['reward'] for r in records], expected, rtol=1e-6)
  assert manifest['mean_reward']['reference'] == 1.0 > manifest['mean_reward']['sample']
  assert manifest['histograms']['reference']['reward'] == [0] * 19 + [12]



def test_metrics_in_worker_processes_write_the_same_bytes(grow_dir, tmp_path, monkeypatch):
  kw = dict(grow_dir=str(grow_dir), reward='chrf', task='tiny', metrics=('bleu', 'ter'))
  scoring.score(str(tmp_path / 'inline'), metric_workers=0, **kw)
  monkeypatch.setattr(metrics, 'MIN_PARALLEL_PAIRS', 1)  # the fixture's chunks are small
  submitted = []
  real_submit = metrics.MetricPool.submit
  monkeypatch.setattr(metrics.MetricPool, 'submit', lambda self, *a: (
      submitted.append(self.num_workers), real_submit(self, *a))[1])
  scoring.score(str(tmp_path / 'pool'), metric_workers=2, **kw)
  assert submitted == [2] * K
  for f in scored_files(tmp_path / 'inline'):
    assert filecmp.cmp(tmp_path / 'inline' / f, tmp_path / 'pool' / f, shallow=False), f
  pool = metrics.MetricPool(2)
  try:
    pairs = (['a b c', '', 'x y'] * 3, ['a b d', 'q', 'x y'] * 3)
    got = pool.submit(*pairs, ('chrf+ter', 'bleu'))()
    want = metrics.sentence_rewards(*pairs, ('chrf+ter', 'bleu'))
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(ValueError, match='2 candidates vs 1 references'):
      pool.submit(['a', 'b'], ['a'])
    with pytest.raises(ValueError, match='unknown metric'):
      pool.submit(['a'], ['a'], ('rouge',))
  finally:
    pool.close()

class NanScorer:
  """Scores 0.5 except NaN for the candidate of `bad_key`."""

  def __init__(self, bad_key):
    self.bad_key, self.keys = bad_key, None

  def raw_scores(self, source_ids, candidate_ids, batch_size=64):
    return np.array([np.nan if k == self.bad_key else 0.5 for k in self.keys], np.float32)

  def calibrate(self, raw):
    return np.clip(raw, 0, 1)


def test_scoring_rejects_nan_naming_chunk_and_record(grow_dir, tmp_path, monkeypatch):
  bad = 'pair-5/grow_1/sample_1'  # chunk 1 (sources 4..7), record 6 of the chunk.
  scorer = NanScorer(bad)
  orig = records_lib.read_records

  def read(path):
    records = orig(path)
    scorer.keys = [r['key'] for r in records]
    return records
  monkeypatch.setattr(records_lib, 'read_records', read)
  with pytest.raises(ValueError, match=rf'grow-00001-of-0000{K}\.tfrecord: record 6 '
                                       rf"\(key '{bad}'\) has a non-finite reward_raw"):
    scoring.score(str(tmp_path), grow_dir=str(grow_dir), task='tiny', scorer=scorer)
  assert (tmp_path / f'scored-00000-of-{K:05d}.tfrecord').exists()  # chunk 0 was fine
  assert not [f for f in os.listdir(tmp_path) if f.startswith('scored-00001')]
  assert not (tmp_path / 'manifest.json').exists()


# -- rm_check --------------------------------------------------------------------------------------

def check_data():
  """8 sources; source 2 equals its reference (an untranslatable segment, copied as is)."""
  rng = np.random.default_rng(11)
  srcs = [list(rng.integers(3, V, rng.integers(2, 8))) for _ in range(8)]
  refs = [list(rng.integers(3, V, rng.integers(2, 8))) for _ in range(8)]
  refs[2] = list(srcs[2])
  enc = np.zeros((8, 16), np.int32)
  for i, s in enumerate(srcs):
    enc[i, :len(s) + 1] = s + [1]
  return input_pipeline.TaskData({'encoder_input_tokens': enc}, [text(s) for s in srcs],
                                 [text(r) for r in refs], [f'pair-{i}' for i in range(8)], 0)


def test_rm_check_with_a_metric_gives_the_expected_shares(tmp_path):
  result = check.rm_check(str(tmp_path), rm_dir=None, reward='chrf', task_data=check_data(),
                          tokenize=tokenize)
  # chrF of the reference against itself is 1, of anything else < 1: the reference wins every
  # comparison, except source 2's copy_source, identical to its reference and left out.
  for kind in ('copy_source', 'empty', 'repeated', 'truncated', 'other_reference'):
    assert result[kind] == 1.0, kind
  assert result['num_compared']['copy_source'] == 7
  assert result['num_ties_excluded'] == {'copy_source': 1, 'empty': 0, 'repeated': 0,
                                         'truncated': 0, 'other_reference': 0}
  assert result['mean_reward']['reference'] == 1.0 and result['mean_reward']['empty'] == 0.0
  assert 0 < result['mean_reward']['repeated'] < 1
  with open(tmp_path / 'rm_check_chrf.json') as f:
    assert json.load(f) == json.loads(json.dumps(result))


def test_rm_check_with_the_reward_model(rm_dir, tmp_path):
  result = check.rm_check(str(tmp_path), rm_dir=str(rm_dir[0]), task_data=check_data(),
                          tokenize=tokenize)
  assert set(check.ROWS) <= set(result['mean_reward'])
  assert all(0 <= result[k] <= 1 for k in check.ROWS[1:])
  assert (tmp_path / 'rm_check.json').exists()
  assert 'ref wins' in check.format_table(result)
