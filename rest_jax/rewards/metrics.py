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

An empty (or whitespace-only) candidate gets 0 under every metric.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import sacrebleu

METRICS = ('bleu', 'chrf', 'ter')


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
    metrics: names among 'bleu', 'chrf', 'ter' (see the module docstring for the formulas).

  Returns:
    metric name -> [n] float32 rewards in [0, 1] (higher = better; 0 for an empty candidate).

  Raises:
    ValueError: different numbers of candidates and references, or an unknown metric.
  """
  if len(candidates) != len(references):
    raise ValueError(f'{len(candidates)} candidates vs {len(references)} references')
  out = {}
  for name in metrics:
    metric = _metric(name)
    vals = np.zeros((len(candidates),), np.float32)
    for i, (c, r) in enumerate(zip(candidates, references)):
      if c.strip():
        vals[i] = _to_reward(name, metric.sentence_score(c, [r]).score)
    out[name] = vals
  return out
