"""The ReST-EM binary verifier (answer parsing, steps, truncation) and pass@k / maj@k."""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from math import comb

import numpy as np
import pytest

from rest_jax.rewards import verifiers as V

GOLD = '52 + 85 = 137 ; 137 - 16 = 121 ; 121 + 89 = 210 #### 210'


def reasons(outputs, reference='210', **kw):
  return [V.verify(o, reference, **kw).reason for o in outputs]


# -- parsing ---------------------------------------------------------------------------------------

def test_parse_answer_numbers_markers_and_malformed_answers():
  ok = {'#### 210': 210, '####210': 210, '#### -3': -3, '#### +7': 7, '#### 1,234': 1234,
        '#### 12,345,678': 12345678, '#### 3.50': Fraction(7, 2), '#### 1,234.5': Fraction(2469, 2),
        '#### 210.': 210, '####   42  \n': 42, '#### -0': 0, 'x 5 y 7 #### 9': 9,
        '#### 1 #### 2': 2}
  for text, want in ok.items():
    value, reason = V.parse_answer(text)
    assert (value, reason) == (want, None), text
    assert isinstance(value, Fraction)
  assert V.parse_answer('#### 3.50')[0] == V.parse_answer('#### 3.5')[0]  # exact, no floats
  assert V.parse_answer('#### 0.1')[0] != V.parse_answer('#### 0.10000000000000001')[0]
  bad = ['####', '#### ', '#### 1,23', '#### 1234,567', '#### ,123', '#### 1,2345', '#### 12 13',
         '#### 210 apples', '#### $210', '#### 210..', '#### .5', '#### - 3',
         '#### 1e3', '#### ３', '#### 210\nQ: next']
  for text in bad:
    assert V.parse_answer(text) == (None, 'unparsable_number'), text
  for text in ['', '   ', 'the answer is 210', '### 210', '# # # # 210']:
    assert V.parse_answer(text) == (None, 'no_answer_marker'), text


def test_parse_reference_full_solution_bare_answer_and_bad_references():
  assert V.parse_reference(GOLD) == 210
  assert V.parse_reference('210') == V.parse_reference(' 210\n') == 210
  assert V.parse_reference('-3') == -3 and V.parse_reference('1,000') == 1000
  assert V.parse_reference('2.50') == Fraction(5, 2)
  for bad in ['', 'abc', '1,00', 'Natalia sold 48 clips', 'so #### forty', '12 13']:
    with pytest.raises(ValueError, match='no parsable answer'):
      V.parse_reference(bad)
  with pytest.raises(ValueError):
    V.parse_reference(210)
  with pytest.raises(ValueError, match='no parsable answer'):
    V.verify('#### 210', 'no answer here')
  with pytest.raises(ValueError, match='no parsable answer'):
    V.verify('#### 210', 'x ####', truncated=True)  # a data bug is reported even then


def test_steps_valid():
  assert V.steps_valid(GOLD) is True
  assert V.steps_valid('52+85=137;137-16=121 #### 121') is True  # whitespace is free
  assert V.steps_valid('  6 * 7 = 42 ;\t84 / 2 = 42 ; 3 - 5 = -2 ; -2 * -3 = 6 #### 6') is True
  assert V.steps_valid('#### 210') is None and V.steps_valid('no steps, so #### 3') is None
  assert V.steps_valid('') is None
  for wrong in ['52 + 85 = 138 ; 138 - 16 = 122 #### 122',  # arithmetic
                '7 / 2 = 3 #### 3',  # inexact division
                '1 / 0 = 0 #### 0',
                '52 + 85 = 137 ; ; 137 - 16 = 121 #### 121',  # an empty piece
                '52 + 85 = 137 ; #### 137',  # a stray trailing ';'
                '52 + 85 = 137 ; then 137 - 16 = 121 #### 121',  # words in a step
                '1 + 2 + 3 = 6 #### 6',  # not `a op b = c`
                '1.5 + 1.5 = 3 #### 3',  # integers only
                'x = 5 #### 5']:
    assert V.steps_valid(wrong) is False, wrong
  # Only the text before the LAST marker is the solution's steps.
  assert V.steps_valid('1 + 1 = 2 #### 2 ; 1 + 1 = 3') is True
  assert V.steps_valid('1 + 1 = 3 #### 2 #### 2') is False
  assert V.steps_valid('1 + 1 = 2 ; 2 + 2 = 5') is False  # no marker: the whole text


# -- verify ----------------------------------------------------------------------------------------

def test_verify_correct_wrong_malformed_and_tricky_outputs():
  v = V.verify(GOLD, GOLD)
  assert v == V.Verdict(1.0, 'correct', Fraction(210), True)
  assert V.verify(GOLD, '210') == v  # full solution or bare answer as the reference
  cases = {
      '#### 210': ('correct', 1.0),
      '  #### 210  \n': ('correct', 1.0),
      'I counted 52, 85 and 89 apples, 3 bags: #### 210': ('correct', 1.0),  # numbers before ####
      '#### 210 #### 211': ('wrong_answer', 0.0),  # the last marker counts
      '#### 211 #### 210': ('correct', 1.0),
      '#### 211': ('wrong_answer', 0.0),
      '#### -210': ('wrong_answer', 0.0),
      'the answer is 210': ('no_answer_marker', 0.0),
      '': ('no_answer_marker', 0.0),
      '   ': ('no_answer_marker', 0.0),
      '#### ': ('unparsable_number', 0.0),
      '#### 210 apples': ('unparsable_number', 0.0),
      '#### 200 10': ('unparsable_number', 0.0),
      '#### 2,10': ('unparsable_number', 0.0),
  }
  for out, (reason, reward) in cases.items():
    v = V.verify(out, '210')
    assert (v.reason, v.reward) == (reason, reward), out
    assert type(v.reward) is float
  assert V.verify('#### -3', '-3').reward == 1.0
  assert V.verify('5 - 8 = -3 #### -3', '10 - 13 = -3 #### -3').reason == 'correct'
  assert V.verify('#### 1,234', '1234').reason == 'correct'
  assert V.verify('#### 1234', '1,234').reason == 'correct'
  assert V.verify('#### 3.50', '3.5').reason == 'correct'
  assert V.verify('#### 3.5', '#### 3.50').reason == 'correct'
  assert V.verify('#### 3.51', '3.5').reason == 'wrong_answer'
  assert V.verify('#### 210.', '210').reason == 'correct'
  assert V.verify('#### 210.0', '210').reason == 'correct'
  assert V.verify('#### 211', GOLD).answer == 211
  assert V.verify('#### x', GOLD).answer is None


def test_verify_right_answer_after_a_wrong_step_under_both_settings():
  out = '52 + 85 = 138 ; 138 - 16 = 121 ; 121 + 89 = 210 #### 210'
  lenient = V.verify(out, GOLD)
  assert lenient == V.Verdict(1.0, 'correct', Fraction(210), False)
  strict = V.verify(out, GOLD, check_steps=True)
  assert strict == V.Verdict(0.0, 'right_answer_wrong_step', Fraction(210), False)
  # Right steps, or no steps at all, pass the strict check; a wrong answer stays 'wrong_answer'.
  assert V.verify(GOLD, GOLD, check_steps=True).reason == 'correct'
  assert V.verify('#### 210', GOLD, check_steps=True) == V.Verdict(1.0, 'correct', 210, None)
  assert V.verify('52 + 85 = 138 #### 211', GOLD, check_steps=True).reason == 'wrong_answer'
  assert V.verify('1 + 1 = 2 ; junk #### 210', GOLD, check_steps=True).reason == (
      'right_answer_wrong_step')


def test_verify_truncated_scores_zero_whatever_the_text():
  for out in [GOLD, '#### 210', '', '52 + 85 = 137 ; 13']:
    v = V.verify(out, GOLD, truncated=True)
    assert (v.reward, v.reason, v.answer) == (0.0, 'truncated', None), out
  assert V.verify(GOLD, GOLD, truncated=True).steps_valid is True  # still computed
  assert V.verify(GOLD, GOLD, truncated=True, check_steps=True).reason == 'truncated'


def test_verdict_is_frozen_and_checked():
  v = V.verify('#### 1', '1')
  with pytest.raises(dataclasses.FrozenInstanceError):
    v.reward = 0.0
  with pytest.raises(ValueError, match='reward'):
    V.Verdict(0.5, 'correct')
  with pytest.raises(ValueError, match='unknown reason'):
    V.Verdict(1.0, 'close_enough')
  assert V.REASONS == ('correct', 'wrong_answer', 'right_answer_wrong_step', 'no_answer_marker',
                       'unparsable_number', 'truncated')


# -- the scorer ------------------------------------------------------------------------------------

EOS = 1


def encode(text, eos=True):
  return [ord(ch) + 3 for ch in text] + ([EOS] if eos else [])


def decode(ids):
  assert EOS not in ids  # the scorer cuts at EOS before detokenizing
  return ''.join(chr(i - 3) for i in ids)


def test_verifier_scorer_on_ids_with_a_toy_detokenizer():
  wrong_step = '52 + 85 = 138 ; 138 - 16 = 121 ; 121 + 89 = 210 #### 210'
  cands = [encode(GOLD), encode('#### 211'), encode(GOLD, eos=False), encode(wrong_step),
           encode('#### 210') + [EOS, 0, 0], encode('no marker'), encode('#### two'),
           np.asarray(encode('#### 210'), np.int32), []]
  refs = [GOLD, '210', '210', GOLD, '210', '210', '210', '210', '210']
  scorer = V.VerifierScorer(decode)
  r = scorer.score_ids([[5, EOS]] * len(cands), cands, references=refs)
  assert r.dtype == np.float32 and r.shape == (9,)
  # Rows 2 (no EOS), 4 (padding after EOS: not trimmed) and 8 (empty) are truncated.
  np.testing.assert_array_equal(r, [1, 0, 0, 1, 0, 0, 0, 1, 0])
  verdicts = scorer.verdicts(cands, refs)
  assert [v.reason for v in verdicts] == ['correct', 'wrong_answer', 'truncated', 'correct',
                                          'truncated', 'no_answer_marker', 'unparsable_number',
                                          'correct', 'truncated']
  assert verdicts[3].steps_valid is False and verdicts[4].steps_valid is None
  strict = V.VerifierScorer(decode, check_steps=True)
  np.testing.assert_array_equal(strict.score_ids(None, cands, references=refs),
                                [1, 0, 0, 0, 0, 0, 0, 1, 0])
  # Another EOS id: the same ids now have no EOS at all -> every row truncated.
  np.testing.assert_array_equal(
      V.VerifierScorer(lambda ids: '', eos_id=2).score_ids(None, cands, references=refs), 0)
  with pytest.raises(ValueError, match='needs the references'):
    scorer.score_ids(None, cands)
  with pytest.raises(ValueError, match='9 candidates vs 8 references'):
    scorer.score_ids(None, cands, references=refs[:8])
  with pytest.raises(ValueError, match='no parsable answer'):
    scorer.verdicts([encode('#### 1')], ['one'])
  assert scorer.score_ids([], [], references=[]).shape == (0,)
  # Text after an EOS that is not the last id is not part of the answer.
  assert scorer.verdicts([encode('#### 210') + encode('1')], ['2101'])[0].reason == 'wrong_answer'


def test_make_scorer_maps_reward_names_to_check_steps():
  assert V.VERIFIER_REWARDS == {'verifier': False, 'verifier_steps': True}
  wrong_step = [encode('1 + 1 = 3 #### 210')]
  assert V.make_scorer('verifier', decode).score_ids(None, wrong_step, references=['210'])[0] == 1
  assert V.make_scorer('verifier_steps', decode).score_ids(None, wrong_step,
                                                           references=['210'])[0] == 0
  assert V.make_scorer('verifier', decode, eos_id=2).eos_id == 2
  with pytest.raises(ValueError, match='unknown verifier reward'):
    V.make_scorer('chrf', decode)


def test_count_reasons():
  wrong_step = '1 + 1 = 3 #### 210'
  outs = [('#### 210', False), ('#### 210', False), (wrong_step, False), ('#### 9', False),
          ('', False), ('#### 210', True)]
  lenient = [V.verify(o, '210', truncated=t) for o, t in outs]
  counts = V.count_reasons(lenient)
  assert counts == {'correct': 3, 'wrong_answer': 1, 'right_answer_wrong_step': 0,
                    'no_answer_marker': 1, 'unparsable_number': 0, 'truncated': 1,
                    V.LENIENT_WRONG_STEP: 1}
  strict = V.count_reasons([V.verify(o, '210', truncated=t, check_steps=True) for o, t in outs])
  assert strict['correct'] == 2 and strict['right_answer_wrong_step'] == 1
  assert strict[V.LENIENT_WRONG_STEP] == 0
  assert V.count_reasons([]) == dict.fromkeys(V.REASONS + (V.LENIENT_WRONG_STEP,), 0)


# -- pass@k / maj@k --------------------------------------------------------------------------------

def test_pass_at_k_against_hand_computation():
  assert V.pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
  assert V.pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
  assert V.pass_at_k(5, 2, 1) == pytest.approx(0.4)  # pass@1 = c / n
  assert V.pass_at_k(10, 0, 3) == 0.0
  assert V.pass_at_k(10, 10, 3) == 1.0
  assert V.pass_at_k(10, 8, 3) == 1.0  # n - c < k: every k-subset has a correct sample
  assert V.pass_at_k(3, 1, 3) == pytest.approx(1.0)
  for n, c, k in [(20, 3, 5), (100, 7, 10), (200, 1, 1)]:
    assert V.pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), rel=1e-12)
  assert V.pass_at_k(np.int64(4), np.int64(1), 2) == pytest.approx(0.5)
  for args in [(1, 0, 2), (3, 4, 1), (-1, 0, 1), (3, -1, 1), (3, 1, 0), (3, 1, -2), (3.0, 1, 1)]:
    with pytest.raises(ValueError):
      V.pass_at_k(*args)
  with pytest.raises(ValueError, match='at least k samples'):
    V.pass_at_k(1, 0, 2)


def test_mean_pass_at_k():
  assert V.mean_pass_at_k(4, [1, 0, 4], 2) == pytest.approx((0.5 + 0 + 1) / 3)
  assert V.mean_pass_at_k([4, 5], np.array([1, 2]), 2) == pytest.approx((0.5 + 0.7) / 2)
  with pytest.raises(ValueError, match='at least k samples'):
    V.mean_pass_at_k([4, 1], [1, 0], 2)
  with pytest.raises(ValueError, match='2 sample counts vs 3'):
    V.mean_pass_at_k([4, 4], [1, 0, 1], 2)
  with pytest.raises(ValueError, match='no problems'):
    V.mean_pass_at_k(4, [], 2)


def test_majority_vote_ties_and_none():
  F = Fraction
  assert V.majority_vote([F(3), F(5), F(5), F(3), None, None, None]) == 3  # tie: 3 drawn first
  assert V.majority_vote([None, F(5), F(3), F(3), F(5)]) == 5
  assert V.majority_vote([F(1), F(2), F(2)]) == 2
  assert V.majority_vote([F(7, 2), V.parse_answer('#### 3.50')[0], F(4)]) == F(7, 2)
  assert V.majority_vote([None, None]) is None and V.majority_vote([]) is None


def test_maj_at_k_with_a_tie_and_a_wrong_majority():
  answers = [
      ['#### 3', '#### 5', '#### 5', '#### 3', '#### 7'],  # k=4: 3/5 tie, 3 drawn first
      ['#### 8', '#### 8', '#### 2', 'no marker', '#### 2'],  # majority 8 is wrong (gold 2)
      [None, None, Fraction(4), None, Fraction(4)],  # parsed answers; all None at k=2
  ]
  refs = ['x + y = 3 #### 3', '2', Fraction(4)]
  assert V.maj_at_k(answers, refs, 4) == pytest.approx(2 / 3)  # right, wrong, right
  # k=2: problem 0 votes over [3, 5], tie -> 3 (right); problem 1 -> 8 (wrong); 2 -> None (wrong).
  assert V.maj_at_k(answers, refs, 2) == pytest.approx(1 / 3)
  assert V.maj_at_k(answers[:1], ['3'], 4) == 1.0  # the tie goes to 3, drawn before 5 ...
  assert V.maj_at_k(answers[:1], ['5'], 4) == 0.0  # ... so 5 loses although as frequent
  assert V.maj_at_k(answers[1:2], ['8'], 5) == 1.0  # 8 vs 2 tie at k=5: 8 drawn first
  assert V.maj_at_k(answers, refs, 5) == pytest.approx(2 / 3)
  assert V.maj_at_k(answers, refs, 1) == pytest.approx(1 / 3)
  with pytest.raises(ValueError, match='fewer|at least 6'):
    V.maj_at_k(answers, refs, 6)
  with pytest.raises(ValueError, match='3 problems vs 2'):
    V.maj_at_k(answers, refs[:2], 2)
  with pytest.raises(ValueError, match='no parsable answer'):
    V.maj_at_k(answers, ['3', 'two', '4'], 2)
  with pytest.raises(ValueError, match='k must be'):
    V.maj_at_k(answers, refs, 0)


def test_score_records_with_a_verifier_reward():
  """`scoring.score_records(reward='verifier')`: the binary verdict against the reference's final
  answer, no sentence metrics, a sample without EOS is truncated; 'verifier_steps' also checks
  every step."""
  from rest_jax.rewards import scoring
  ref = '2 + 3 = 5 ; 5 - 1 = 4 #### 4'
  rec = lambda cand, ids: dict(candidate=cand, reference=ref, candidate_ids=ids, key=cand,
                               source_ids=[5, 1], origin='sample')
  records = [rec(ref, [7, 1]), rec('2 + 3 = 6 ; 6 - 2 = 4 #### 4', [8, 1]),
             rec('2 + 3 = 5 #### 5', [9, 1]), rec('2 + 3 = 5 ; 5 - 1', [9, 9]),
             rec('2 + 3 = 5 ; 5 - 1 = 4 #### 4', [9, 9])]
  out = scoring.score_records(records, reward='verifier', metrics=())
  assert [r['reward'] for r in out] == [1.0, 1.0, 0.0, 0.0, 0.0]
  assert [r['reason'] for r in out] == ['correct', 'correct', 'wrong_answer', 'truncated',
                                       'truncated']
  assert all(r['reward_raw'] == r['reward'] for r in out) and 'bleu' not in out[0]
  steps = scoring.score_records(records, reward='verifier_steps', metrics=())
  assert [r['reward'] for r in steps] == [1.0, 0.0, 0.0, 0.0, 0.0]
  assert steps[1]['reason'] == 'right_answer_wrong_step'
  counts = scoring._chunk_counts(steps, ['reward'])
  assert counts['sample']['reasons']['truncated'] == 2 and counts['sample']['count'] == 5
