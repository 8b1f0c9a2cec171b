"""Improve-step data selection: ReST reward thresholds and ReST-EM's correct-sample selection.

ReST (Gulcehre et al. 2023, arXiv 2308.08998, sec. 2 and 3): Improve step i trains on the Grow
records with F = 1[R(x, y) > tau_i], tau increasing over the steps (0.0, 0.7, 0.8, 0.9, 0.95,
0.99 on rewards normalised to [0, 1]; tau = 0 keeps everything), either with one global
threshold ('absolute') or per source at a reward percentile ('percentile'; the paper found
both about equally good). ReST-EM (Singh et al. 2023, arXiv 2312.06585; E-step and experimental
set-up): keep the correct samples (binary reward), at most K = 10 per problem.

Everything here is host-side numpy on [n] arrays, one entry per scored Grow record, with
`source_ids` [n] int the index of each record's source; vectorised (no per-source loop), so
millions of records take well under a second.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import gin
import numpy as np

MODES = ('absolute', 'percentile')


@dataclasses.dataclass(frozen=True)
class Threshold:
  """One Improve step's filter: keep records with reward > tau ('absolute') or > the tau-quantile
  of their source's rewards ('percentile')."""
  tau: float
  mode: str = 'absolute'


@gin.configurable
def threshold_schedule(taus: Sequence[float] = (0.0, 0.7, 0.8, 0.9, 0.95, 0.99),
                       mode: str = 'absolute') -> tuple[Threshold, ...]:
  """The thresholds of the successive Improve steps (ReST sec. 2; default: the paper's schedule).

  Args:
    taus: one threshold per Improve step, in [0, 1], non-decreasing (ReST increases them).
      'absolute': a normalised reward; 'percentile': a quantile level (0.9 = p90 per source).
    mode: 'absolute' or 'percentile'.
  Returns:
    tuple of `Threshold(tau, mode)`, one per Improve step.
  Raises:
    ValueError: unknown mode, a tau outside [0, 1] or decreasing taus.
  """
  _check_mode(mode)
  taus = [float(t) for t in taus]
  for i, t in enumerate(taus):
    if not 0.0 <= t <= 1.0:
      raise ValueError(f'tau {t} (step {i}) is outside [0, 1]')
    if i and t < taus[i - 1]:
      raise ValueError(f'taus must be non-decreasing, got {taus}')
  return tuple(Threshold(t, mode) for t in taus)


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f'unknown threshold mode {mode!r}; use one of {MODES}')


def _check_rewards(rewards, source_ids) -> tuple[np.ndarray, np.ndarray]:
  """rewards [n] -> float64, source_ids [n] -> int64; ValueError on shape or non-finite."""
  rewards = np.asarray(rewards)
  source_ids = np.asarray(source_ids)
  if rewards.ndim != 1 or source_ids.shape != rewards.shape:
    raise ValueError(f'rewards and source_ids must be [n] arrays of one length, got shapes '
                     f'{rewards.shape} and {source_ids.shape}')
  if source_ids.size and not np.issubdtype(source_ids.dtype, np.integer):
    raise ValueError(f'source_ids must be integers, got dtype {source_ids.dtype}')
  rewards = rewards.astype(np.float64)
  bad = np.flatnonzero(~np.isfinite(rewards))
  if bad.size:
    raise ValueError(f'non-finite reward {rewards[bad[0]]} at index {bad[0]} '
                     f'({bad.size} non-finite in all)')
  return rewards, source_ids.astype(np.int64)


def _group(source_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(group index of each record [n], record count of each group [g]) for the distinct ids."""
  _, inverse, counts = np.unique(source_ids, return_inverse=True, return_counts=True)
  return inverse.reshape(-1), counts


def source_quantiles(rewards, source_ids, q: float) -> np.ndarray:
  """[n] float64: the q-quantile of each record's source's rewards, broadcast to its records.

  numpy's default 'linear' quantile (Hyndman & Fan type 7), per source with n_s rewards sorted
  v_0 <= ... <= v_{n_s-1}: h = (n_s - 1) q, quantile = v_floor(h) + (h - floor(h)) *
  (v_floor(h)+1 - v_floor(h)); equal to `np.quantile(source_rewards, q)` in float64 (vectorised
  over the sources, interpolated as numpy does, so the values agree).
  """
  rewards, source_ids = _check_rewards(rewards, source_ids)
  if rewards.size == 0:
    return rewards
  group, counts = _group(source_ids)
  order = np.lexsort((rewards, group))            # By source, then by reward.
  sorted_r = rewards[order]
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  h = (counts - 1) * float(q)
  lo = np.floor(h).astype(np.int64)
  hi = np.minimum(lo + 1, counts - 1)
  t = h - lo
  a, b = sorted_r[starts + lo], sorted_r[starts + hi]
  diff = b - a
  # numpy's _lerp: a + t (b - a), computed from the upper end when t >= 0.5 (monotone rounding).
  per_group = np.where(t >= 0.5, b - diff * (1.0 - t), a + diff * t)
  return per_group[group]


def filter_records(rewards, source_ids, tau: float, mode: str = 'absolute') -> np.ndarray:
  """Keep mask [n] bool of ReST's Improve filter F = 1[R > tau] (ReST sec. 2).

  Args:
    rewards: [n] float, the normalised reward of each record.
    source_ids: [n] int, the source index of each record (used by 'percentile').
    tau: the threshold (absolute reward, or quantile level in [0, 1] for 'percentile').
    mode: 'absolute': keep reward > tau. 'percentile': keep reward > the tau-quantile of the
      record's source's rewards (`source_quantiles`: numpy 'linear'); records equal to the
      quantile are dropped (strict >), so a source whose rewards are all equal, or a
      single-record source, keeps nothing at tau > 0, and tau = 1 keeps nothing.
  tau = 0 is special-cased as "keep all" in both modes (also rewards <= 0), as in the paper,
  whose first Improve step trains on all the Grow data.

  Raises:
    ValueError: a non-finite (NaN) reward (the message names the first bad index), unknown mode,
      mismatched shapes, tau outside [0, 1] for 'percentile'.
  """
  _check_mode(mode)
  rewards, source_ids = _check_rewards(rewards, source_ids)
  tau = float(tau)
  if tau == 0.0:
    return np.ones(rewards.shape, bool)
  if mode == 'absolute':
    return rewards > tau
  if not 0.0 <= tau <= 1.0:
    raise ValueError(f'a percentile tau must be in [0, 1], got {tau}')
  return rewards > source_quantiles(rewards, source_ids, tau)


def filter_stats(mask, source_ids) -> dict[str, int]:
  """{'kept_records', 'distinct_sources' (sources with a kept record), 'total_records',
  'total_sources'} of a keep mask [n] bool over records with source_ids [n]."""
  mask = np.asarray(mask, bool)
  source_ids = np.asarray(source_ids)
  if mask.shape != source_ids.shape:
    raise ValueError(f'mask {mask.shape} and source_ids {source_ids.shape} differ in shape')
  return {'kept_records': int(mask.sum()),
          'distinct_sources': int(np.unique(source_ids[mask]).size),
          'total_records': int(mask.size),
          'total_sources': int(np.unique(source_ids).size)}


def source_baselines(rewards, source_ids) -> np.ndarray:
  """[n] float32: the mean reward of each record's source (over all its records), per record.

  The baseline of the advantage of `losses.bvmpo` / `losses.gold` (computed before filtering).

  Raises:
    ValueError: a non-finite (NaN) reward (the message names the first bad index).
  """
  rewards, source_ids = _check_rewards(rewards, source_ids)
  if rewards.size == 0:
    return rewards.astype(np.float32)
  group, counts = _group(source_ids)
  sums = np.bincount(group, weights=rewards, minlength=counts.size)
  return (sums / counts)[group].astype(np.float32)


def select_correct(rewards, source_ids, max_per_source: Optional[int] = 10,
                   seed: Optional[int] = 0) -> np.ndarray:
  """ReST-EM E-step selection: keep mask [n] bool of the correct records, at most K per source.

  ReST-EM (Singh et al. 2023, experimental set-up) keeps the samples with reward 1, at most 10
  per problem (to balance easy and hard problems). Which K of a source's correct records are
  kept: with a `seed`, a uniformly random subset drawn with `np.random.default_rng(seed)`
  (deterministic for a seed; our choice, the paper does not say); with seed=None the first K
  in record order.

  Args:
    rewards: [n] binary rewards (0 or 1, any numeric dtype).
    source_ids: [n] int source (problem) index of each record.
    max_per_source: K >= 1, or None for no cap.
    seed: see above.
  Raises:
    ValueError: non-finite (NaN) reward (first bad index named), a reward not in {0, 1}
      (first such index named), K < 1.
  """
  rewards, source_ids = _check_rewards(rewards, source_ids)
  bad = np.flatnonzero((rewards != 0) & (rewards != 1))
  if bad.size:
    raise ValueError(f'select_correct needs binary rewards in {{0, 1}}: reward '
                     f'{rewards[bad[0]]} at index {bad[0]}')
  correct = rewards == 1
  if max_per_source is None:
    return correct
  if max_per_source < 1:
    raise ValueError(f'max_per_source must be >= 1 or None, got {max_per_source}')
  idx = np.flatnonzero(correct)
  if idx.size == 0:
    return correct
  if seed is None:
    key = idx.astype(np.float64)
  else:
    key = np.random.default_rng(seed).random(idx.size)
  src = source_ids[idx]
  order = np.lexsort((key, src))                  # By source, then by key.
  src_sorted = src[order]
  first = np.concatenate([[True], src_sorted[1:] != src_sorted[:-1]])
  group_start = np.maximum.accumulate(np.where(first, np.arange(idx.size), 0))
  rank = np.arange(idx.size) - group_start        # Rank of each correct record in its source.
  keep = np.zeros_like(correct)
  keep[idx[order[rank < max_per_source]]] = True
  return keep
