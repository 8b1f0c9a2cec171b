"""Improve-step data selection (`rest_jax.filtering`): absolute and per-source percentile thresholds
on hand-made rewards (ties, tau = 0, single-record sources), baselines, stats, ReST-EM selection."""

import gin
import numpy as np
import pytest

from rest_jax import filtering

# Records in a shuffled source order, with non-contiguous source ids:
#   source 7:   0.1 0.2 0.3 0.4        (0.5-quantile 0.25)
#   source 3:   0.5 0.5 0.5            (all tied)
#   source 100: 0.8                    (a single record)
#   source 42:  0.2 0.9 0.9 0.1        (tie at the top; 0.5-quantile 0.55, 0.9-quantile 0.9)
REWARDS = np.array([0.1, 0.5, 0.2, 0.8, 0.9, 0.5, 0.3, 0.2, 0.4, 0.9, 0.5, 0.1], np.float32)
SOURCES = np.array([7, 3, 42, 100, 42, 3, 7, 7, 7, 42, 3, 42])


def test_absolute_threshold():
  rewards = np.array([0.0, 0.5, 0.7, 0.71, 0.9, 1.0, -0.1])
  sources = np.arange(7)
  keep = filtering.filter_records(rewards, sources, 0.7, 'absolute')
  assert keep.tolist() == [False, False, False, True, True, True, False]  # 0.7 is not > 0.7.
  assert keep.dtype == bool
  # tau = 0 keeps everything, even a zero (or negative) reward.
  assert filtering.filter_records(rewards, sources, 0.0).all()
  assert not filtering.filter_records(rewards, sources, 1.0).any()


def test_percentile_threshold_per_source():
  keep = filtering.filter_records(REWARDS, SOURCES, 0.5, 'percentile')
  kept = sorted(zip(SOURCES[keep].tolist(), REWARDS[keep].tolist()))
  assert kept == [(7, pytest.approx(0.3)), (7, pytest.approx(0.4)),
                  (42, pytest.approx(0.9)), (42, pytest.approx(0.9))]
  # Exactly the records 4, 6, 8, 9; ties at the quantile (source 3) and a single record
  # (source 100) keep nothing.
  assert np.flatnonzero(keep).tolist() == [4, 6, 8, 9]
  # 0.9-quantile of source 42 is its (tied) maximum 0.9: nothing of it is kept; of source 7,
  # h = 2.7 -> 0.37: only 0.4.
  keep = filtering.filter_records(REWARDS, SOURCES, 0.9, 'percentile')
  assert np.flatnonzero(keep).tolist() == [8]
  assert filtering.filter_records(REWARDS, SOURCES, 0.0, 'percentile').all()
  assert not filtering.filter_records(REWARDS, SOURCES, 1.0, 'percentile').any()


def test_source_quantiles_equal_numpy_linear():
  rng = np.random.default_rng(0)
  n = 3000
  sources = rng.integers(0, 400, n) * 3 + 5          # Some sources have 1 or 0 records.
  rewards = np.round(rng.random(n), 2).astype(np.float32)  # Many ties.
  for q in (0.0, 0.1, 0.5, 0.7, 0.9, 0.95, 0.99, 1.0):
    got = filtering.source_quantiles(rewards, sources, q)
    want = np.empty(n)
    for s in np.unique(sources):
      idx = sources == s
      want[idx] = np.quantile(rewards[idx].astype(np.float64), q, method='linear')
    np.testing.assert_array_equal(got, want)
    if q > 0:
      np.testing.assert_array_equal(filtering.filter_records(rewards, sources, q, 'percentile'),
                                    rewards.astype(np.float64) > want)


def test_filter_stats_and_baselines():
  keep = filtering.filter_records(REWARDS, SOURCES, 0.5, 'percentile')
  assert filtering.filter_stats(keep, SOURCES) == {
      'kept_records': 4, 'distinct_sources': 2, 'total_records': 12, 'total_sources': 4}
  base = filtering.source_baselines(REWARDS, SOURCES)
  assert base.dtype == np.float32 and base.shape == (12,)
  want = {7: 0.25, 3: 0.5, 100: 0.8, 42: 0.525}
  np.testing.assert_allclose(base, [want[s] for s in SOURCES], rtol=1e-6)


@pytest.mark.parametrize('fn', [
    lambda r, s: filtering.filter_records(r, s, 0.5, 'absolute'),
    lambda r, s: filtering.filter_records(r, s, 0.0, 'absolute'),
    lambda r, s: filtering.filter_records(r, s, 0.5, 'percentile'),
    filtering.source_baselines,
    filtering.select_correct,
])
def test_nan_reward_raises_with_first_index(fn):
  rewards = np.array([1.0, 0.0, np.nan, 1.0, np.nan], np.float32)
  with pytest.raises(ValueError, match='index 2'):
    fn(rewards, np.zeros(5, int))


def test_bad_arguments():
  with pytest.raises(ValueError, match='mode'):
    filtering.filter_records(REWARDS, SOURCES, 0.5, 'global')
  with pytest.raises(ValueError):
    filtering.filter_records(REWARDS, SOURCES[:3], 0.5)
  with pytest.raises(ValueError):
    filtering.filter_records(REWARDS, SOURCES, 1.5, 'percentile')


def test_threshold_schedule():
  sched = filtering.threshold_schedule()
  assert [t.tau for t in sched] == [0.0, 0.7, 0.8, 0.9, 0.95, 0.99]
  assert {t.mode for t in sched} == {'absolute'}
  with pytest.raises(ValueError):
    filtering.threshold_schedule((0.0, 0.9, 0.8))
  with pytest.raises(ValueError):
    filtering.threshold_schedule((0.0, 1.2))
  with pytest.raises(ValueError):
    filtering.threshold_schedule(mode='median')
  gin.parse_config("threshold_schedule.taus = (0.5, 0.9)\n"
                   "threshold_schedule.mode = 'percentile'")  # Cleared by tests/conftest.py.
  assert filtering.threshold_schedule() == (filtering.Threshold(0.5, 'percentile'),
                                            filtering.Threshold(0.9, 'percentile'))


def test_select_correct_caps_per_source():
  #                   source 0: 5 correct of 6     source 1: 2 correct    source 2: none
  rewards = np.array([1, 1, 0, 1, 1, 1,           0, 1, 1,               0, 0])
  sources = np.array([0, 0, 0, 0, 0, 0,           1, 1, 1,               2, 2])
  first = filtering.select_correct(rewards, sources, max_per_source=3, seed=None)
  assert np.flatnonzero(first).tolist() == [0, 1, 3, 7, 8]
  seeded = [filtering.select_correct(rewards, sources, max_per_source=3, seed=s)
            for s in range(8)]
  for keep in seeded:
    assert keep.dtype == bool
    assert (rewards[keep] == 1).all()                    # Only correct records.
    assert keep[sources == 0].sum() == 3                 # Capped at K.
    assert keep[[7, 8]].all() and not keep[sources == 2].any()
  np.testing.assert_array_equal(
      seeded[0], filtering.select_correct(rewards, sources, max_per_source=3, seed=0))
  assert len({tuple(k) for k in seeded}) > 1             # The seed picks which K.
  # Default K = 10 keeps all 7 correct; None: no cap.
  assert filtering.select_correct(rewards, sources).sum() == 7
  np.testing.assert_array_equal(filtering.select_correct(rewards, sources, None), rewards == 1)
  with pytest.raises(ValueError, match='binary'):
    filtering.select_correct(np.array([1.0, 0.5]), np.array([0, 0]))
  with pytest.raises(ValueError):
    filtering.select_correct(rewards, sources, max_per_source=0)


def test_improve_training_data_by_origin():
  """The threshold sees every record; `origins` then keeps references and/or samples only."""
  from rest_jax import improve
  refs = {4, 8}  # Source 42's first 0.9 and source 7's 0.4.
  records = [dict(source_ids=[5, 6, 1], candidate_ids=[7 + i, 1], reward=float(r),
                  source_index=int(s), origin='reference' if i in refs else 'sample')
             for i, (r, s) in enumerate(zip(REWARDS, SOURCES))]
  select = lambda origins, tau=0.5: improve.select_training_data(
      records, tau, 'percentile', 4, 4, batch_size=1, origins=origins)
  arrays, stats = select(('reference', 'sample'))
  assert (stats['kept_records'], stats['kept_references'], stats['kept_samples']) == (4, 2, 2)
  # Rows 4, 6, 8, 9 in record order; the candidate's first token tells which record it is.
  assert arrays['decoder_target_tokens'][:, 0].tolist() == [11, 13, 15, 16]
  np.testing.assert_allclose(arrays['source_baseline'], [0.525, 0.25, 0.25, 0.525], rtol=1e-6)
  arrays, stats = select(('reference',))
  assert arrays['decoder_target_tokens'][:, 0].tolist() == [11, 15]
  assert (stats['kept_records'], stats['kept_references'], stats['kept_samples']) == (2, 2, 0)
  arrays, _ = select(('sample',))
  assert arrays['decoder_target_tokens'][:, 0].tolist() == [13, 16]
  _, stats = select(('reference',), tau=0.0)  # tau = 0: every reference.
  assert stats['kept_records'] == 2 and stats['distinct_sources'] == 2
  with pytest.raises(ValueError, match='origins'):
    select(('human',))
  with pytest.raises(ValueError, match='no record'):
    select(('sample',), tau=0.95)  # Above its source's p95: only source 7's top, a reference.


def test_improve_correct_selection_for_rest_em():
  """ReST-EM's M-step data: correct samples only (never the gold reference records), at most K
  per problem, the same K as `filtering.select_correct` draws with the same seed."""
  from rest_jax import improve
  #  problem 0: reference + 4 correct samples + 1 wrong; problem 1: reference + 1 wrong;
  #  problem 2: reference + 2 correct samples.
  spec = [(0, 'reference', 1), (0, 'sample', 1), (0, 'sample', 1), (0, 'sample', 0),
          (0, 'sample', 1), (0, 'sample', 1), (1, 'reference', 1), (1, 'sample', 0),
          (2, 'reference', 1), (2, 'sample', 1), (2, 'sample', 1)]
  records = [dict(source_ids=[5, 1], candidate_ids=[10 + i, 1], reward=float(r), source_index=s,
                  origin=o) for i, (s, o, r) in enumerate(spec)]
  select = lambda k, seed=0: improve.select_training_data(
      records, 0.0, 'absolute', 4, 4, batch_size=1, origins=('sample',), selection='correct',
      max_per_source=k, seed=seed)
  arrays, stats = select(None)
  assert arrays['decoder_target_tokens'][:, 0].tolist() == [11, 12, 14, 15, 19, 20]
  assert (stats['kept_references'], stats['kept_samples'], stats['distinct_sources']) == (0, 6, 2)
  arrays, stats = select(2)
  kept = arrays['decoder_target_tokens'][:, 0] - 10
  assert stats['kept_records'] == 4 and sorted(kept)[-2:] == [9, 10]  # Problem 2's both.
  assert set(kept[:2]) <= {1, 2, 4, 5} and len(set(kept[:2])) == 2
  mask = improve.selection_mask(records, 0.0, 'absolute', ('sample',), 'correct', 2, seed=0)
  expected = filtering.select_correct(
      np.where([o == 'sample' for _, o, _ in spec], [r for *_, r in spec], 0), [s for s, *_ in spec],
      2, seed=0)
  np.testing.assert_array_equal(mask, expected)
  assert np.flatnonzero(mask).tolist() == sorted((kept).tolist())
  with pytest.raises(ValueError, match='binary'):
    improve.select_training_data([dict(records[1], reward=0.5)], 0.0, 'absolute', 4, 4, 1,
                                 ('sample',), 'correct')
  with pytest.raises(ValueError, match='no record .* is correct'):
    improve.select_training_data([records[3], records[7]], 0.0, 'absolute', 4, 4, 1,
                                 ('sample',), 'correct')
  with pytest.raises(ValueError, match='selection'):
    improve.select_training_data(records, 0.0, 'absolute', 4, 4, 1, ('sample',), 'best')
