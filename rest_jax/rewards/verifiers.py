"""Binary answer verifiers for ReST-EM and the metrics of sampled solutions (pass@k, maj@k).

ReST-EM (Singh et al. 2023, arXiv 2312.06585, sec. 3 and 4) uses a binary reward: r(x, y) = 1 iff
the final answer of the sampled solution y is correct. This module is that reward for problems in
the GSM8K format (Cobbe et al. 2021, arXiv 2110.14168): the final answer is the text after the
LAST '####', one number.

Answer grammar (`parse_answer`; GSM8K conventions, the exact grammar is our choice): after the last
'####', surrounding whitespace and one optional trailing '.' are dropped, and what is left must be
exactly one number `[+-]? digits (. digits)?`, where the integer part is either plain digits
(`1234`) or comma-separated well-formed groups of three (`1,234`, `12,345,678`; `1,23` and
`1234,567` are not numbers). Values are `fractions.Fraction`, so `3.50 == 3.5` exactly and no float
rounding is involved. GSM8K answers are integers; decimals are accepted all the same. Anything else
after the marker (words, units, '$', two numbers, nothing) is 'unparsable_number'; no marker at all
is 'no_answer_marker'.

Steps (our choice, for arithmetic_chain solutions such as
`52 + 85 = 137 ; 137 - 16 = 121 ; 121 + 89 = 210 #### 210`): the text before the last '####' (the
whole text when there is none) has step structure iff it contains an '='. It is then split on ';',
and every piece must be one step `a op b = c`: integers with an optional sign, op in + - * /,
any whitespace around the tokens, and exact arithmetic (`a / b = c` iff b != 0 and a == b * c; no
rounding). One piece that does not parse (an empty piece from a stray ';' included) or whose
arithmetic is wrong makes the steps invalid. Each step is checked on its own: that a step uses the
previous result, or that the last result equals the final answer, is not checked (a chain may
bring in numbers from the question). The step check is meant for the arithmetic_chain format: a
free-text GSM8K solution that contains '=' (e.g. `48/2 = <<48/2=24>>24 clips`) has invalid steps.

Rewards (`verify`):

* `truncated=True` (the sample hit the length limit without EOS): 0.0, 'truncated', whatever the
  text says (a cut-off '#### 21' of '#### 210' must not count).
* no marker / unparsable answer: 0.0, 'no_answer_marker' / 'unparsable_number'.
* a parsed answer != the reference answer: 0.0, 'wrong_answer'.
* a right answer: 1.0, 'correct', except with `check_steps=True` and invalid steps: 0.0,
  'right_answer_wrong_step'. A text without step structure passes the step check (the check
  rejects wrong steps; it does not require steps to be written; our choice).

`Verdict.steps_valid` is computed in every case (check_steps or not), so that with the lenient
reward (check_steps=False) "right answer, wrong step" can still be counted (`count_reasons`,
key `LENIENT_WRONG_STEP`).

`VerifierScorer` scores token ids (the `score_ids` interface of the other rewards);
`make_scorer` builds it from a reward name of `VERIFIER_REWARDS` ('verifier', 'verifier_steps').

Sampled-solution metrics (section at the end):

* `pass_at_k`: the unbiased pass@k estimator of Chen et al. 2021 (arXiv 2107.03374, sec. 2.1,
  eq. 1, and the numerically stable numpy code of their Fig. 3).
* `majority_vote` / `maj_at_k`: self-consistency majority voting over sampled final answers
  (Wang et al. 2022, arXiv 2203.11171; 'maj1@k' of Lewkowycz et al. 2022, arXiv 2206.14858).
"""

from __future__ import annotations

import collections
import dataclasses
import fractions
import numbers
import re
from typing import Callable, Hashable, Optional, Sequence, Union

import numpy as np

MARKER = '####'

REASONS = ('correct', 'wrong_answer', 'right_answer_wrong_step', 'no_answer_marker',
           'unparsable_number', 'truncated')

# The `count_reasons` key of verdicts with reward 1 whose steps are invalid (only possible with
# check_steps=False: the lenient reward's "right answer, wrong step").
LENIENT_WRONG_STEP = 'right_answer_wrong_step_lenient'

Answer = fractions.Fraction

_NUMBER = re.compile(r'[+-]?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?', re.ASCII)
_STEP = re.compile(r'\s*([+-]?[0-9]+)\s*([-+*/])\s*([+-]?[0-9]+)\s*=\s*([+-]?[0-9]+)\s*',
                   re.ASCII)


# -- parsing ---------------------------------------------------------------------------------------

def parse_number(text: str) -> Optional[Answer]:
  """One number in the module's answer grammar -> its exact value, or None if `text` is not one.

  `text` may carry surrounding whitespace and one trailing '.' ('  1,234. ' -> 1234).
  """
  s = text.strip()
  if s.endswith('.'):
    s = s[:-1]
  if not _NUMBER.fullmatch(s):
    return None
  return fractions.Fraction(s.replace(',', ''))


def parse_answer(text: str) -> tuple[Optional[Answer], Optional[str]]:
  """The final answer of a solution: the number after the last '####'.

  Args:
    text: a model output or gold solution (detokenized text).

  Returns:
    (value, None) with value a `fractions.Fraction` when the answer parses, else
    (None, 'no_answer_marker') when `text` has no '####', or (None, 'unparsable_number') when
    what follows the last '####' is not exactly one number (module docstring).
  """
  at = text.rfind(MARKER)
  if at < 0:
    return None, 'no_answer_marker'
  value = parse_number(text[at + len(MARKER):])
  if value is None:
    return None, 'unparsable_number'
  return value, None


def parse_reference(reference: str) -> Answer:
  """The gold answer of a reference: a full gold solution ('... #### 210') or a bare answer ('210',
  '-3', '1,000'), in the grammar of `parse_answer`.

  Raises:
    ValueError: no parsable answer (a data bug, not a model error).
  """
  if not isinstance(reference, str):
    raise ValueError(f'a reference must be a string, got {type(reference).__name__}')
  if MARKER in reference:
    value, reason = parse_answer(reference)
  else:
    value = parse_number(reference)
    reason = 'unparsable_number'
  if value is None:
    raise ValueError(f'reference {reference!r} has no parsable answer ({reason})')
  return value


def steps_valid(text: str) -> Optional[bool]:
  """Whether the arithmetic steps before the last '####' are all well-formed and right.

  Returns:
    None when the text before the marker (the whole text without one) has no step structure (no
    '='); else True iff every ';'-separated piece is a step `a op b = c` with exact integer
    arithmetic (module docstring).
  """
  at = text.rfind(MARKER)
  body = text if at < 0 else text[:at]
  if '=' not in body:
    return None
  for piece in body.split(';'):
    m = _STEP.fullmatch(piece)
    if m is None:
      return False
    a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
    if op == '+':
      ok = a + b == c
    elif op == '-':
      ok = a - b == c
    elif op == '*':
      ok = a * b == c
    else:
      ok = b != 0 and a == b * c
    if not ok:
      return False
  return True


# -- the verifier ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Verdict:
  """The verifier's judgement of one sample.

  Attributes:
    reward: exactly 0.0 or 1.0.
    reason: one of `REASONS`.
    answer: the parsed final answer of the sample (`fractions.Fraction`), None when it has none or
      the sample is truncated.
    steps_valid: `steps_valid(output)`: None without step structure, else whether every step is
      right; computed whatever `check_steps` (also for truncated samples).
  """
  reward: float
  reason: str
  answer: Optional[Answer] = None
  steps_valid: Optional[bool] = None

  def __post_init__(self):
    if self.reward not in (0.0, 1.0):
      raise ValueError(f'reward must be 0.0 or 1.0, got {self.reward!r}')
    if self.reason not in REASONS:
      raise ValueError(f'unknown reason {self.reason!r}: use one of {REASONS}')


def verify(output: str, reference: str, *, truncated: bool = False,
           check_steps: bool = False) -> Verdict:
  """The ReST-EM binary reward of one sample (module docstring for the rules).

  Args:
    output: the sample's detokenized text (before EOS).
    reference: a gold solution ending '#### N' or a bare answer 'N'.
    truncated: the sample hit the length limit without EOS (the caller knows): reward 0,
      reason 'truncated', whatever the text.
    check_steps: a right answer with invalid steps scores 0 ('right_answer_wrong_step') instead
      of 1 ('correct').

  Returns:
    A `Verdict`.

  Raises:
    ValueError: `reference` has no parsable answer (checked first, also for truncated samples).
  """
  gold = parse_reference(reference)
  valid = steps_valid(output)
  if truncated:
    return Verdict(0.0, 'truncated', None, valid)
  value, reason = parse_answer(output)
  if value is None:
    return Verdict(0.0, reason, None, valid)
  if value != gold:
    return Verdict(0.0, 'wrong_answer', value, valid)
  if check_steps and valid is False:
    return Verdict(0.0, 'right_answer_wrong_step', value, valid)
  return Verdict(1.0, 'correct', value, valid)


def count_reasons(verdicts: Sequence[Verdict]) -> dict[str, int]:
  """Reason -> number of verdicts, with every reason of `REASONS` present (0 if none), plus
  `LENIENT_WRONG_STEP` ('right_answer_wrong_step_lenient'): the verdicts with reward 1 whose
  steps are invalid (right answers that only the lenient check_steps=False reward lets through;
  with check_steps=True these are 'right_answer_wrong_step' and this count is 0).
  """
  out = dict.fromkeys(REASONS, 0)
  out[LENIENT_WRONG_STEP] = 0
  for v in verdicts:
    out[v.reason] += 1
    if v.reward == 1.0 and v.steps_valid is False:
      out[LENIENT_WRONG_STEP] += 1
  return out


class VerifierScorer:
  """The binary verifier as the reward of the ReST loop (the `score_ids` interface of
  `model.RewardScorer` and `metrics.MetricScorer`, references required).

  A candidate is a list of token ids trimmed at its length, EOS included (as Grow records and
  `grow.sample_candidates(...)['lengths']` give them). One that does not end with `eos_id` hit the
  length limit and counts as truncated (reward 0; so does a list with padding after its EOS: trim
  it first); the ids before the first `eos_id` are detokenized. The same rule as
  `scoring.score` applies to Grow records.
  """

  def __init__(self, detokenize: Callable[[Sequence[int]], str], check_steps: bool = False,
               eos_id: int = 1):
    self.detokenize = detokenize
    self.check_steps = check_steps
    self.eos_id = eos_id

  def verdicts(self, ids: Sequence[Sequence[int]], references: Sequence[str]) -> list[Verdict]:
    """One `Verdict` per candidate.

    Args:
      ids: n candidates, token-id sequences (lists or 1-d int arrays).
      references: n gold solutions or bare answers.

    Raises:
      ValueError: `references` is None or not one per candidate, or a reference has no parsable
        answer.
    """
    if references is None:
      raise ValueError('the verifier reward needs the references of the candidates')
    if len(references) != len(ids):
      raise ValueError(f'{len(ids)} candidates vs {len(references)} references')
    out = []
    for cand, ref in zip(ids, references):
      cand = [int(t) for t in cand]
      truncated = not cand or cand[-1] != self.eos_id
      body = cand[:cand.index(self.eos_id)] if self.eos_id in cand else cand
      out.append(verify(self.detokenize(body), ref, truncated=truncated,
                        check_steps=self.check_steps))
    return out

  def score_ids(self, source_ids: Sequence[Sequence[int]], candidate_ids: Sequence[Sequence[int]],
                batch_size: int = 64, references: Sequence[str] | None = None) -> np.ndarray:
    """Rewards, [n] float32 of exactly 0.0 / 1.0 (`verdicts`; sources and batch size unused).

    Raises:
      ValueError: as `verdicts`.
    """
    del source_ids, batch_size
    return np.asarray([v.reward for v in self.verdicts(candidate_ids, references)], np.float32)


# Reward names of the verifier (for `rest_em`, `scoring.score`, `train`'s dev metric) -> the
# `check_steps` they verify with: 'verifier' is ReST-EM's final-answer reward, 'verifier_steps'
# also zeroes right answers with wrong arithmetic steps (module docstring).
VERIFIER_REWARDS = {'verifier': False, 'verifier_steps': True}


def make_scorer(reward: str, detokenize: Callable[[Sequence[int]], str],
                eos_id: int = 1) -> VerifierScorer:
  """The `VerifierScorer` of a reward name of `VERIFIER_REWARDS`.

  Raises:
    ValueError: not a verifier reward name.
  """
  if reward not in VERIFIER_REWARDS:
    raise ValueError(f'unknown verifier reward {reward!r}: use one of {tuple(VERIFIER_REWARDS)}')
  return VerifierScorer(detokenize, check_steps=VERIFIER_REWARDS[reward], eos_id=eos_id)


# -- sampled-solution metrics ----------------------------------------------------------------------

def _check_int(name: str, x) -> int:
  if isinstance(x, bool) or not isinstance(x, numbers.Integral):
    raise ValueError(f'{name} must be an integer, got {x!r}')
  return int(x)


def pass_at_k(n: int, c: int, k: int) -> float:
  """The unbiased pass@k estimate of one problem: 1 - C(n - c, k) / C(n, k).

  Chen et al. 2021 (arXiv 2107.03374), sec. 2.1 eq. 1; computed as in their Fig. 3 as
  1 - prod_{i = n - c + 1}^{n} (1 - k / i) (1.0 when n - c < k), which avoids huge binomials.

  Args:
    n: samples drawn for the problem.
    c: correct samples among them.
    k: the k of pass@k (>= 1).

  Returns:
    The probability in [0, 1] that at least one of k samples drawn without replacement from the n
    is correct.

  Raises:
    ValueError: non-integers, negative n or c, k < 1, n < k or c > n.
  """
  n, c, k = _check_int('n', n), _check_int('c', c), _check_int('k', k)
  if n < 0 or c < 0:
    raise ValueError(f'n and c must be >= 0, got n={n}, c={c}')
  if k < 1:
    raise ValueError(f'k must be >= 1, got {k}')
  if n < k:
    raise ValueError(f'pass@{k} needs at least k samples, got n={n}')
  if c > n:
    raise ValueError(f'more correct samples than samples: c={c} > n={n}')
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(num_samples: Union[int, Sequence[int], np.ndarray],
                   num_correct: Union[Sequence[int], np.ndarray], k: int) -> float:
  """Mean of `pass_at_k` over problems.

  Args:
    num_samples: samples per problem, an int (the same for all) or [P] ints.
    num_correct: [P] correct samples per problem.
    k: the k of pass@k.

  Returns:
    A float in [0, 1].

  Raises:
    ValueError: no problems, [P] lengths that differ, or as `pass_at_k` for any problem.
  """
  c = np.asarray(num_correct).reshape(-1)
  n = np.broadcast_to(np.asarray(num_samples), c.shape) if np.ndim(num_samples) == 0 else (
      np.asarray(num_samples).reshape(-1))
  if n.shape != c.shape:
    raise ValueError(f'{n.size} sample counts vs {c.size} correct counts')
  if c.size == 0:
    raise ValueError('no problems')
  return float(np.mean([pass_at_k(ni.item(), ci.item(), k) for ni, ci in zip(n, c)]))


def majority_vote(answers: Sequence[Optional[Hashable]]) -> Optional[Hashable]:
  """The most frequent non-None answer among a problem's samples (self-consistency voting).

  Ties: the earliest-drawn answer among the tied ones wins (our choice; deterministic and
  independent of hashing). Answers are compared with `==` (Fractions: 3.5 == 7/2).

  Returns:
    The winning answer; None when every answer is None (or there are none).
  """
  counts: dict = collections.Counter(a for a in answers if a is not None)
  if not counts:
    return None
  best = max(counts.values())
  for a in answers:  # The earliest drawn among those with the top count.
    if a is not None and counts[a] == best:
      return a
  raise AssertionError('unreachable')


def _as_answer(x) -> Optional[Answer]:
  """A sample's answer: None, an exact number, or a model output text (`parse_answer`)."""
  if x is None:
    return None
  if isinstance(x, str):
    return parse_answer(x)[0]
  if isinstance(x, numbers.Rational):
    return fractions.Fraction(x)
  raise ValueError(f'an answer must be None, a Fraction/int or an output text, got {x!r}')


def maj_at_k(answers_per_problem: Sequence[Sequence], reference_answers: Sequence,
             k: int) -> float:
  """maj@k: the fraction of problems whose majority vote over the first k samples is right.

  Args:
    answers_per_problem: [P][n_p] per problem its samples' answers in draw order, each None (no
      answer; e.g. `Verdict.answer` of a truncated sample), an exact number (`Verdict.answer`,
      `fractions.Fraction` or int), or a model output text (parsed with `parse_answer`; a text
      cannot say it was truncated, so pass `Verdict.answer` where that matters).
    reference_answers: [P] gold solutions / bare answers (`parse_reference`, as `verify` does),
      or exact numbers.
    k: samples voted on per problem (>= 1).

  Returns:
    A float in [0, 1]; a problem whose k answers are all None counts as wrong.

  Raises:
    ValueError: k < 1, no problems, P mismatch, a problem with fewer than k samples, or a bad
      reference.
  """
  k = _check_int('k', k)
  if k < 1:
    raise ValueError(f'k must be >= 1, got {k}')
  if len(answers_per_problem) != len(reference_answers):
    raise ValueError(f'{len(answers_per_problem)} problems vs {len(reference_answers)} '
                     'reference answers')
  if not answers_per_problem:
    raise ValueError('no problems')
  right = 0
  for p, (answers, ref) in enumerate(zip(answers_per_problem, reference_answers)):
    if len(answers) < k:
      raise ValueError(f'problem {p} has {len(answers)} samples, maj@{k} needs at least {k}')
    gold = parse_reference(ref) if isinstance(ref, str) else _as_answer(ref)
    if gold is None:
      raise ValueError(f'problem {p}: no reference answer')
    vote = majority_vote([_as_answer(a) for a in answers[:k]])
    right += int(vote is not None and vote == gold)
  return right / len(answers_per_problem)
