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
