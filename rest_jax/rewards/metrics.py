"""Reference-based sentence rewards in [0, 1] from sacreBLEU (Post 2018).

ReST (Gulcehre et al. 2023, sec. 4) scores translations with a learned metric; these
reference-based metrics are the cheap stand-in used here as rewards, as the simulated preference
oracle that labels the reward model's training data, and as the comparison points of its
evaluation. Every reward is a float32 in [0, 1], higher = better:

* 'bleu': sentence BLEU / 100, `sacrebleu.metrics.BLEU(effective_order=True)` (Papineni et al.
  2002; effective order: n-gram orders absent from a short hypothesis are left out instead of
  zeroing the geometric mean; the default exponential smoothing).
* 'chrf': sentence chrF / 100, `sacrebleu.metrics.CHRF()` (Popovic 2015: character 6-gram F-beta,
  beta = 2).
* 'ter': 1 - min(TER / 100, 1), `sacrebleu.metrics.TER()` (Snover et al. 2006: edits per reference
  word; TER can exceed 100, hence the clip).

A composite name 'a+b' (e.g. 'chrf+ter') is the mean of those rewards. chrF alone is
recall-weighted (beta = 2): the reference written twice still scores ~0.8, above nearly every
policy sample, so an RM that imitates it learns that longer is better, and a policy optimised
against that RM inflates its outputs (BLEU falls while chrF holds). TER counts every extra or
missing word as an edit (a doubled reference: TER 100, reward 0), so 'chrf+ter' keeps chrF's
graded credit for partial matches and penalises repetition and truncation.

An empty (or whitespace-only) candidate gets 0 under every metric.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
from typing import Callable, Sequence

import numpy as np
import sacrebleu

METRICS = ('bleu', 'chrf', 'ter')


def components(name: str) -> tuple[str, ...]:
  """The base metrics of a (possibly composite, 'a+b') metric name.

  Raises:
    ValueError: an unknown base metric.
  """
  parts = tuple(name.split('+'))
  for p in parts:
    if p not in METRICS:
      raise ValueError(f'unknown metric {name!r}: use one of {METRICS} or a mean of them '
                       "joined by '+' (e.g. 'chrf+ter')")
  return parts


def _metric(name: str):
  if name == 'bleu':
    return sacrebleu.metrics.BLEU(effective_order=True)
  if name == 'chrf':
    return sacrebleu.metrics.CHRF()
  if name == 'ter':
    return sacrebleu.metrics.TER()
  raise ValueError(f'unknown metric {name!r}: use one of {METRICS}')


def _to_reward(name: str, score: float) -> float:
  """sacreBLEU's sentence score (0-100; TER: 0 = perfect, unbounded) -> reward in [0, 1]."""
  if name == 'ter':
    return 1.0 - min(score / 100.0, 1.0)
  return min(max(score / 100.0, 0.0), 1.0)  # BLEU can come out as 100.00000000000004.


def sentence_rewards(candidates: Sequence[str], references: Sequence[str],
                     metrics: Sequence[str] = METRICS) -> dict[str, np.ndarray]:
  """Per-sentence metric rewards of `candidates` against one reference each.

  Args:
    candidates: n hypothesis strings (detokenized text).
    references: n reference strings.
    metrics: names among 'bleu', 'chrf', 'ter', or composites such as 'chrf+ter' (the mean);
      see the module docstring for the formulas.

  Returns:
    metric name -> [n] float32 rewards in [0, 1] (higher = better; 0 for an empty candidate).

  Raises:
    ValueError: different numbers of candidates and references, or an unknown metric.
  """
  if len(candidates) != len(references):
    raise ValueError(f'{len(candidates)} candidates vs {len(references)} references')
  parts = {name: components(name) for name in metrics}
  base = {}
  for name in sorted({p for ps in parts.values() for p in ps}):
    metric = _metric(name)
    vals = np.zeros((len(candidates),), np.float32)
    for i, (c, r) in enumerate(zip(candidates, references)):
      if c.strip():
        vals[i] = _to_reward(name, metric.sentence_score(c, [r]).score)
    base[name] = vals
  return {name: np.mean([base[p] for p in ps], axis=0).astype(np.float32)
          for name, ps in parts.items()}


MIN_PARALLEL_PAIRS = 2048  # fewer pairs are scored in-process (a worker costs ~1 s to start)


class MetricPool:
  """`sentence_rewards` in worker processes, started on first use (our choice, for large Grows).

  sacreBLEU is pure Python and its TER search is superlinear in the sentence length (on
  `libreoffice_help_de_en` Grow records: median 0.14 ms per pair, the slowest 1% half of the
  time, up to ~1 s for one 70-word pair), so on a 2-core machine a Grow's metrics cost ~7x what its
  reward model does. `submit` splits the pairs round-robin over `num_workers` spawned processes
  (spawn, not fork: the parent runs JAX's threads) and returns at once, so the caller scores the
  reward model meanwhile; each pair's value is that of `sentence_rewards` in-process, exactly.
  As with any spawned pool, a script that scores must guard its top level with `if __name__ ==
  '__main__':` (the `rest-jax` command does); if the workers die, the metrics are computed
  in-process (logged) and the pool is not used again.
  `num_workers` 0, or fewer than `MIN_PARALLEL_PAIRS` pairs: computed in-process at `submit`.
  """

  def __init__(self, num_workers: int):
    self.num_workers = int(num_workers)
    self._executor = None

  def submit(self, candidates: Sequence[str], references: Sequence[str],
             metrics: Sequence[str] = METRICS) -> Callable[[], dict[str, np.ndarray]]:
    """Starts `sentence_rewards(candidates, references, metrics)`; returns a function that waits
    for it and returns its dict (metric -> [n] float32). Raises as `sentence_rewards` does
    (unequal lengths and unknown metrics at once; a worker's error when the result is read)."""
    if len(candidates) != len(references):
      raise ValueError(f'{len(candidates)} candidates vs {len(references)} references')
    for name in metrics:
      components(name)
    k = self.num_workers
    if k <= 0 or len(candidates) < MIN_PARALLEL_PAIRS or not metrics:
      values = sentence_rewards(candidates, references, metrics)
      return lambda: values
    if self._executor is None:
      self._executor = concurrent.futures.ProcessPoolExecutor(
          k, mp_context=multiprocessing.get_context('spawn'))
    cands, refs = list(candidates), list(references)
    futures = [self._executor.submit(sentence_rewards, cands[i::k], refs[i::k], tuple(metrics))
               for i in range(k)]

    def result() -> dict[str, np.ndarray]:
      out = {name: np.zeros((len(cands),), np.float32) for name in metrics}
      try:
        parts = [f.result() for f in futures]
      except concurrent.futures.process.BrokenProcessPool as e:
        logging.warning('metric workers died (%s; a script that starts them needs an `if '
                        "__name__ == '__main__':` guard): computing the metrics in-process", e)
        self.close()
        self.num_workers = 0
        return sentence_rewards(cands, refs, metrics)
      for i, part in enumerate(parts):
        for name, v in part.items():
          out[name][i::k] = v
      return out
    return result

  def close(self):
    if self._executor is not None:
      self._executor.shutdown()
      self._executor = None


class MetricScorer:
  """A reference-based metric as the reward of the ReST loop, in place of the learned RM.

  The interface of `model.RewardScorer` (`score_ids`), plus the references the metric needs:
  `rest.rest(reward='chrf+ter')` scores Grow with this metric (`scoring.score(reward=...)`), selects
  Improve checkpoints and reranks best-of-N by it, and reports it as the stage reward. Reference-
  based rewards are possible in translation (the ReST paper, sec. 4, uses a learned reference-free
  metric instead); with them the policy cannot exploit a learned model's errors.
  """

  def __init__(self, metric: str, detokenize: Callable[[Sequence[int]], str]):
    components(metric)  # Raises on an unknown metric.
    self.metric = metric
    self.detokenize = detokenize

  def score_ids(self, source_ids: Sequence[Sequence[int]], candidate_ids: Sequence[Sequence[int]],
                batch_size: int = 64, references: Sequence[str] | None = None) -> np.ndarray:
    """Rewards in [0, 1], [n] float32: `sentence_rewards` of the detokenized candidates.

    Raises:
      ValueError: no `references`, or not one per candidate.
    """
    del source_ids, batch_size
    if references is None:
      raise ValueError(f'the {self.metric!r} reward needs the references of the candidates')
    return sentence_rewards([self.detokenize(c) for c in candidate_ids], list(references),
                            (self.metric,))[self.metric]
