"""`rest-jax score`: scores every Grow record once, for the Improve steps (ReST, sec. 2).

ReST's Improve steps filter the Grow dataset by reward thresholds; the records are scored once,
here, so that every Improve step reads the same rewards. For each finished Grow chunk
`grow-KKKKK-of-KKKKK.tfrecord` (the ones with their `.done` marker; the Grow's `manifest.json`
must exist) this writes `scored-KKKKK-of-KKKKK.tfrecord`: every Grow field unchanged (see
`records.RECORD_FIELDS`) plus float fields

  * `reward`: what Improve filters on, in [0, 1]: the reward model's calibrated score
    (`model.RewardScorer.score_ids`) for `reward='rm'`, the binary verdict (exactly 0.0 or 1.0)
    of `verifiers.verify` against the reference's final answer for a verifier reward
    (`verifiers.VERIFIER_REWARDS`: 'verifier', 'verifier_steps'; ReST-EM), else the named metric;
  * `reward_raw`: the reward model's raw score (= `reward` for a metric or a verifier);
  * one field per metric of `metrics` ('bleu', 'chrf', 'ter'; `metrics.sentence_rewards` of the
    candidate against the reference, in [0, 1]).

Like Grow, the output is resumable per chunk (`rest_jax.records`): each chunk is written to a
temporary name and renamed, then marked done by `scored-KKKKK.done` (JSON: counts and histograms
of the chunk); a rerun skips marked chunks and redoes the others, so a killed run resumes to
byte-identical files. `settings.json` (written first) pins the settings (`grow_dir` and `rm_dir`
relative to the work directory, `records.pin_settings`), `manifest.json` (written last) marks the
scoring complete and holds counts, mean rewards and 20-bin histograms over [0, 1] of the reward
and of every metric, split by origin ('reference' / 'sample'), and, for a verifier reward, the
verdicts' reasons per origin (`verifiers.REASONS`: correct, wrong answer, no `####`, ...).

A NaN or infinite score raises ValueError naming the chunk file, the record index and key; nothing
of that chunk is written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Mapping, Sequence

import gin
import jax
import numpy as np
from tqdm import tqdm

from rest_jax import distributed, fileio, records as records_lib
from rest_jax.models.transformer import EOS_ID
from rest_jax.rewards import metrics as metrics_lib
from rest_jax.rewards import verifiers

NUM_BINS = 20
ORIGINS = ('reference', 'sample')


class ScoringInterrupted(RuntimeError):
  """Raised by the `_stop_after_chunks` test hook (a simulated kill)."""


def histogram(values: np.ndarray) -> list[int]:
  """Counts of `values` in NUM_BINS equal bins over [0, 1] (1.0 falls in the last bin)."""
  return np.histogram(np.asarray(values, np.float64), bins=NUM_BINS, range=(0.0, 1.0))[0].tolist()


def _chunk_counts(records: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> dict:
  """Per origin: count, sums and histograms of `fields` (JSON, summed over chunks later)."""
  out = {}
  for origin in ORIGINS:
    rs = [r for r in records if r['origin'] == origin]
    out[origin] = {'count': len(rs),
                   'sum': {f: float(sum(r[f] for r in rs)) for f in fields},
                   'histogram': {f: histogram([r[f] for r in rs]) for f in fields}}
    if rs and 'reason' in rs[0]:  # A verifier reward: the verdicts' reasons.
      out[origin]['reasons'] = {k: sum(r['reason'] == k for r in rs) for k in verifiers.REASONS}
  return out


def score_records(records: Sequence[Mapping[str, Any]], *, reward: str,
                  metrics: Sequence[str], scorer=None, batch_size: int = 64,
                  where: str = 'records',
                  metric_pool: metrics_lib.MetricPool | None = None) -> list[dict[str, Any]]:
  """The records with `reward`, `reward_raw` and one field per metric added (all float).

  Args:
    records: Grow records. reward: 'rm' (needs `scorer`, a `model.RewardScorer`), a verifier
      reward (`verifiers.VERIFIER_REWARDS`; a candidate whose ids do not end with EOS hit the
      length limit and is 'truncated': reward 0) or a metric.
    where: names the records in errors (e.g. the chunk file).
    metric_pool: computes the sentence metrics in worker processes while the reward model runs
      (None: in-process, first).

  Returns:
    The records with the float fields added and, for a verifier reward, `reason` (str, one of
    `verifiers.REASONS`; counted in the chunk markers, not written to the TFRecords).

  Raises:
    ValueError: a NaN or infinite value (names `where`, the record index and key).
  """
  cands = [r['candidate'] for r in records]
  refs = [r['reference'] for r in records]
  is_metric = reward != 'rm' and reward not in verifiers.VERIFIER_REWARDS
  names = list(dict.fromkeys(list(metrics) + ([reward] if is_metric else [])))
  pending = (metric_pool or metrics_lib.MetricPool(0)).submit(cands, refs, names)
  values = {}
  reasons = None
  if reward in verifiers.VERIFIER_REWARDS:
    verdicts = [verifiers.verify(r['candidate'], r['reference'],
                                 truncated=not r['candidate_ids'] or r['candidate_ids'][-1] != EOS_ID,
                                 check_steps=verifiers.VERIFIER_REWARDS[reward])
                for r in records]
    values['reward_raw'] = values['reward'] = np.array([v.reward for v in verdicts], np.float32)
    reasons = [v.reason for v in verdicts]
  elif reward == 'rm':
    raw = np.asarray(scorer.raw_scores([r['source_ids'] for r in records],
                                       [r['candidate_ids'] for r in records], batch_size),
                     np.float32)
    values['reward_raw'], values['reward'] = raw, np.asarray(scorer.calibrate(raw), np.float32)
  values.update(pending())
  if is_metric:
    values['reward_raw'] = values['reward'] = values[reward]
  fields = ['reward', 'reward_raw'] + list(metrics)
  for f in ['reward_raw'] + fields:
    bad = np.flatnonzero(~np.isfinite(values[f]))
    if len(bad):
      i = int(bad[0])
      raise ValueError(f'{where}: record {i} (key {records[i]["key"]!r}) has a non-finite {f} '
                       f'= {values[f][i]} ({len(bad)} such records); nothing of it was written')
  out = [dict(r, **{f: float(values[f][i]) for f in fields}) for i, r in enumerate(records)]
  if reasons is not None:
    for r, reason in zip(out, reasons):
      r['reason'] = reason
  return out


def make_reward_scorer(reward: str, detokenize, rm_dir: str | None = None, mesh=None):
  """The scorer (`score_ids(source_ids, candidate_ids, batch_size, references) -> [n] float32 in
  [0, 1]`) of a reward name: 'rm' (the learned reward model in `rm_dir`,
  `model.load_reward_model`), a verifier reward (`verifiers.VERIFIER_REWARDS`) or a metric
  against the references (`metrics.MetricScorer`, e.g. 'chrf+ter').

  Raises:
    ValueError: 'rm' without `rm_dir`; an unknown metric.
    FileNotFoundError: `rm_dir` holds no finished reward model.
  """
  if reward == 'rm':
    if not rm_dir:
      raise ValueError("reward 'rm' needs the reward model's directory (rm_dir)")
    from rest_jax.rewards import model as rm_model
    return rm_model.load_reward_model(rm_dir, mesh=mesh)
  if reward in verifiers.VERIFIER_REWARDS:
    return verifiers.make_scorer(reward, detokenize)
  return metrics_lib.MetricScorer(reward, detokenize)


METRIC_WORKERS = min(8, os.cpu_count() or 1)


@gin.configurable(denylist=['output_dir', 'scorer', '_stop_after_chunks'])
def score(output_dir: str,
          grow_dir: str = gin.REQUIRED,
          rm_dir: str | None = None,
          task: str = 'libreoffice_help_de_en',
          reward: str = 'rm',
          metrics: Sequence[str] = metrics_lib.METRICS,
          batch_size: int = 64,
          metric_workers: int = METRIC_WORKERS,
          scorer=None,
          _stop_after_chunks: int | None = None) -> dict[str, Any]:
  """Scores every record of a finished Grow (module docstring); resumable per chunk.

  Args:
    output_dir: where scored chunks, markers, settings.json and manifest.json go
      (`<workdir>/scored_<grow step>`).
    grow_dir: a finished Grow (its manifest.json exists).
    rm_dir: a `train_rm` output dir (`reward='rm'`).
    task: unused by the scores themselves (the RM scores ids); recorded in the settings.
    reward: 'rm' for the learned reward model, a verifier ('verifier': the final answer after
      `####` equals the reference's; 'verifier_steps': and every step `a op b = c` is right;
      ReST-EM's binary reward), or a metric name ('bleu', 'chrf', 'ter') to use that metric as
      the reward (e.g. when no reward model exists).
    metrics: metric fields to add to every record (() for problem solving: sentence metrics
      of a worked solution mean nothing).
    batch_size: reward-model rows per forward pass (not a setting: it does not change scores
      beyond float rounding).
    metric_workers: processes computing the `metrics` of a chunk while the reward model scores
      it (`metrics.MetricPool`; 0: in-process; chunks under `metrics.MIN_PARALLEL_PAIRS` records
      always in-process); not a setting: the values are the same.
    scorer: a `RewardScorer` to use instead of loading `rm_dir` (tests).
    _stop_after_chunks: test hook: raise `ScoringInterrupted` after this many chunks.

  Returns:
    The manifest (also `output_dir/manifest.json`): settings, counts (chunks, records, per
    origin), mean reward and metrics per origin, histograms per origin and field (NUM_BINS bins
    over [0, 1], `bin_edges`), wall_seconds, chunks_resumed.

  Raises:
    FileNotFoundError: no finished Grow in `grow_dir`, or a chunk without its marker.
    ValueError: other settings in `output_dir`; 'rm' without `rm_dir`; an unknown reward or
      metric; a NaN / infinite score (names chunk, record index and key).
  """
  start = time.perf_counter()
  grow_manifest = records_lib.read_manifest(grow_dir, records_lib.GROW)
  if reward != 'rm' and reward not in verifiers.VERIFIER_REWARDS:
    metrics_lib.components(reward)  # Raises on an unknown metric ('rm' is the learned model).
  for m in metrics:
    metrics_lib.components(m)
  if reward == 'rm' and scorer is None and not rm_dir:
    raise ValueError("reward='rm' needs an rm_dir (or use a metric as the reward)")
  rm_config = None
  if reward == 'rm' and rm_dir:
    rm_config = fileio.read_json(os.path.join(rm_dir, 'rm_config.json'))
  settings = dict(grow_dir=grow_dir, grow_settings_hash=grow_manifest.get('settings_hash'),
                  rm_dir=rm_dir if rm_dir and reward == 'rm' else None,
                  rm_config=rm_config, task=task, reward=reward, metrics=list(metrics))
  pinned = records_lib.pin_settings(output_dir, settings, what='scores',
                                    path_keys=('grow_dir', 'rm_dir'),
                                    process_count=jax.process_count(),
                                    write=jax.process_index() == 0)
  finished = records_lib.finished_manifest(output_dir, records_lib.SCORED)
  if finished is not None:
    logging.info('score: %s is complete', output_dir)
    return finished

  K = grow_manifest['counts']['chunks']
  records_lib.verify_output(grow_dir, records_lib.GROW)  # Every Grow chunk as its marker says.
  chunks = [records_lib.chunk_path(grow_dir, records_lib.GROW, k, K) for k in range(K)]
  kind = records_lib.SCORED
  todo = [k for k in range(K) if not records_lib.is_done(output_dir, kind, k, K)]
  logging.info('score: %d Grow chunks (%d to do), reward %s -> %s', K, len(todo), reward,
               output_dir)
  if todo and reward == 'rm' and scorer is None:
    from rest_jax.rewards import model as rm_model
    scorer = rm_model.load_reward_model(rm_dir)

  fields = ['reward'] + list(metrics)
  bar = tqdm(total=len(todo), desc='score', unit='chunk', dynamic_ncols=True,
             disable=jax.process_index() != 0)
  made = 0
  # The hosts of a job and independent workers share the chunks (`records.claim_chunks`).
  with contextlib.closing(records_lib.claim_chunks(output_dir, kind, K)) as claimed, \
       contextlib.closing(metrics_lib.MetricPool(metric_workers)) as pool:
    for k in claimed:
      records = score_records(records_lib.read_records(chunks[k]), reward=reward,
                              metrics=metrics, scorer=scorer, batch_size=batch_size,
                              where=chunks[k], metric_pool=pool)
      records_lib.write_chunk(output_dir, kind, k, K, records,
                              {'records': len(records),
                               'by_origin': _chunk_counts(records, fields)},
                              extra_float_fields=['reward', 'reward_raw'] + list(metrics))
      bar.update(1)
      mean = np.mean([r['reward'] for r in records]) if records else float('nan')
      bar.set_postfix(records=len(records), mean_reward=f'{mean:.3f}')
      made += 1
      if _stop_after_chunks is not None and made >= _stop_after_chunks:
        raise ScoringInterrupted(f'stopped after {made} chunks (test hook)')
  bar.close()
  distributed.barrier('rest_jax.score.done')

  total = 0
  by_origin = {o: {'count': 0, 'sum': {f: 0.0 for f in fields},
                   'histogram': {f: [0] * NUM_BINS for f in fields}} for o in ORIGINS}
  reasons = {o: dict.fromkeys(verifiers.REASONS, 0) for o in ORIGINS}
  for k in range(K):
    c = records_lib.read_marker(output_dir, kind, k)
    total += c['records']
    for o in ORIGINS:
      src, dst = c['by_origin'][o], by_origin[o]
      dst['count'] += src['count']
      for f in fields:
        dst['sum'][f] += src['sum'][f]
        dst['histogram'][f] = [a + b for a, b in zip(dst['histogram'][f], src['histogram'][f])]
      for reason, n in src.get('reasons', {}).items():
        reasons[o][reason] += n
  manifest = dict(
      grow_dir=pinned.settings['grow_dir'], reward=reward, settings=pinned.settings,
      settings_hash=pinned.settings_hash,
      counts=dict(chunks=K, records=total, **{o: by_origin[o]['count'] for o in ORIGINS}),
      mean_reward={o: by_origin[o]['sum']['reward'] / max(by_origin[o]['count'], 1)
                   for o in ORIGINS},
      mean={o: {f: by_origin[o]['sum'][f] / max(by_origin[o]['count'], 1) for f in fields}
            for o in ORIGINS},
      histograms={o: by_origin[o]['histogram'] for o in ORIGINS},
      bin_edges=np.linspace(0.0, 1.0, NUM_BINS + 1).tolist(),
      chunks_resumed=K - len(todo), wall_seconds=time.perf_counter() - start)
  if reward in verifiers.VERIFIER_REWARDS:
    manifest['reasons'] = reasons
  if jax.process_index() == 0:  # Host 0 of a job; every independent worker when it ends.
    records_lib.write_manifest(output_dir, manifest)
  logging.info('score: %d records; mean reward: reference %.3f, sample %.3f', total,
               manifest['mean_reward']['reference'], manifest['mean_reward']['sample'])
  return manifest


def read_scored_records(scored_dir: str) -> list[dict[str, Any]]:
  """All records of a finished scoring, sorted by chunk file name, then in file order.

  Returns dicts with the Grow fields plus `reward`, `reward_raw` and the metric fields.

  Raises:
    FileNotFoundError: as `records.read_chunked` (scoring unfinished, a chunk without its
      marker, a chunk file missing).
  """
  return records_lib.read_chunked(scored_dir, records_lib.SCORED)
