"""Synthetic bad candidates: the reward model's extra training negatives and `rm_check`'s rows.

For a source x with reference y (untokenized text), five kinds of candidate that a good reward
should rank below y:

  * 'copy_source': x itself (an untranslated copy);
  * 'empty': the empty output;
  * 'repeated': y twice, joined by a space;
  * 'truncated': the first half of y's whitespace tokens (floor(n / 2) words; empty for a
    one-word y);
  * 'other_reference': the reference of another source (fluent, but not a translation of x).

For training only, `SAMPLE_KINDS` apply the two length degradations to a policy sample s as well:
'repeated_sample' (s twice) and 'truncated_sample' (the first half of s). The oracle ranks a
repeated or half reference above most policy samples (chrF ~0.8 and ~0.45 against ~0.25), so the
reference-based negatives alone teach "long and reference-like is good"; the degraded samples
teach that repeating or cutting a candidate lowers *its own* reward, which is what `rm_check` and a
policy drifting to loops or truncation put to the test.

Their ids come from the same tokenizer as the policy's candidates (SentencePiece ids + EOS).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from rest_jax.models.transformer import EOS_ID

KINDS = ('copy_source', 'empty', 'repeated', 'truncated', 'other_reference')
SAMPLE_KINDS = ('repeated_sample', 'truncated_sample')


def _repeat(text: str) -> str:
  return f'{text} {text}'


def _first_half(text: str) -> str:
  words = text.split()
  return ' '.join(words[:len(words) // 2])


def synthetic_texts(source: str, reference: str, other_reference: str) -> dict[str, str]:
  """kind -> candidate text, for the `KINDS` above (in that order)."""
  return {'copy_source': source, 'empty': '', 'repeated': _repeat(reference),
          'truncated': _first_half(reference), 'other_reference': other_reference}


def degraded_samples(sample: str, tokenize: Callable[[str], Sequence[int]]
                     ) -> list[tuple[str, str, list[int]]]:
  """[(kind, text, ids)] of the `SAMPLE_KINDS` of one policy sample (ids + [EOS])."""
  return [(kind, text, [int(i) for i in tokenize(text)] + [EOS_ID])
          for kind, text in (('repeated_sample', _repeat(sample)),
                             ('truncated_sample', _first_half(sample)))]


def synthetic_candidates(source: str, reference: str, other_reference: str,
                         tokenize: Callable[[str], Sequence[int]]
                         ) -> list[tuple[str, str, list[int]]]:
  """[(kind, text, ids)] of the `KINDS`; ids = tokenize(text) + [EOS] (the empty one: [EOS])."""
  return [(kind, text, [int(i) for i in tokenize(text)] + [EOS_ID])
          for kind, text in synthetic_texts(source, reference, other_reference).items()]


def other_indices(n: int, seed: int) -> np.ndarray:
  """[n] int: for each position i a random other position (i itself only if n == 1), seeded."""
  if n <= 1:
    return np.zeros((n,), np.int64)
  rng = np.random.default_rng(seed)
  return (np.arange(n) + rng.integers(1, n, size=n)) % n
