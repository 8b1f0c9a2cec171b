"""`rest-jax rm-check`: does a reward rank the reference above obviously bad candidates?

For every source of a held-out split (default: the task's validation split, never seen by the
reward model), the reference and the five synthetic candidates of `negatives.KINDS` (copy of the
source, empty output, reference twice, first half of the reference, a random other source's
reference; `seed` fixes the choice) are scored. Per kind it reports

  * the share of sources where the reference outranks the candidate (strictly higher raw score;
    sources where the candidate's text equals the reference's, e.g. an untranslatable source
    copied as is, are left out of that kind's share and counted in `num_ties_excluded`);
  * the mean reward (calibrated, in [0, 1]) of every row, the reference's included.

The reward is the learned model (`reward='rm'`, loaded from `rm_dir`) or, for comparison, a
metric against the reference ('bleu', 'chrf', 'ter'; the reference then scores 1). Writes
`rm_check.json` (`rm_check_<metric>.json` for a metric) into `output_dir`:
{"copy_source": share, "empty": share, "repeated": share, "truncated": share,
 "other_reference": share, "mean_reward": {row: mean}, ...}.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import gin
import numpy as np

from rest_jax import fileio
from rest_jax import input_pipeline
from rest_jax.data import trim as trim_ids
from rest_jax.models.transformer import EOS_ID
from rest_jax.rewards import metrics as metrics_lib
from rest_jax.rewards import negatives as neg_lib

ROWS = ('reference',) + neg_lib.KINDS


def format_table(result: dict[str, Any]) -> str:
  """The check as a text table: row, mean reward, share of sources the reference outranks it."""
  lines = [f"reward {result['reward']} on {result['num_sources']} {result['split']} sources",
           f"{'candidate':<16} {'mean reward':>11} {'ref wins':>9} {'n':>6}"]
  for row in ROWS:
    share = f'{result[row]:9.3f}' if row in result else f"{'-':>9}"
    n = result['num_compared'].get(row, result['num_sources'])
    lines.append(f"{row:<16} {result['mean_reward'][row]:11.3f} {share} {n:6d}")
  return '\n'.join(lines)


@gin.configurable(denylist=['output_dir', 'task_data', 'tokenize', 'scorer'])
def rm_check(output_dir: str,
             rm_dir: str | None = gin.REQUIRED,
             task: str = 'libreoffice_help_de_en',
             split: str = 'validation',
             max_sources: int | None = None,
             reward: str = 'rm',
             seed: int = 0,
             batch_size: int = 64,
             inputs_length: int = 128,
             targets_length: int = 128,
             task_data: input_pipeline.TaskData | None = None,
             tokenize: Callable[[str], Sequence[int]] | None = None,
             scorer=None) -> dict[str, Any]:
  """Runs the check (module docstring), prints the table and writes the JSON.

  Args:
    output_dir: where `rm_check.json` goes (the reward model's dir by default in the CLI).
    rm_dir: a `train_rm` output dir (ignored unless `reward='rm'`).
    task, split, max_sources: the sources (first `max_sources` of the split; None: all).
    reward: 'rm' or a metric name ('bleu', 'chrf', 'ter').
    seed: choice of the 'other_reference' candidate.
    batch_size: reward-model rows per forward pass.
    inputs_length, targets_length: feature lengths of the tokenized split.
    task_data, tokenize, scorer: test overrides of the split, the text -> ids tokenizer (no EOS)
      and the `RewardScorer`.

  Returns:
    The result written to the JSON file.

  Raises:
    ValueError: an unknown reward, or 'rm' without `rm_dir` / `scorer`.
  """
  if reward != 'rm':
    metrics_lib.components(reward)  # Raises on an unknown metric ('rm' is the learned model).
  if task_data is None:
    cache = fileio.local_cache_dir(fileio.parent(output_dir))
    task_data = input_pipeline.cached_task_data(task, split, inputs_length, targets_length, cache,
                                                max_examples=max_sources)
  if max_sources is not None:
    task_data = task_data.subset(max_sources)
  n = len(task_data)
  if reward == 'rm' and scorer is None:
    if not rm_dir:
      raise ValueError("reward='rm' needs an rm_dir")
    from rest_jax.rewards import model as rm_model
    scorer = rm_model.load_reward_model(rm_dir, tokenize=tokenize)
  if tokenize is None:
    if scorer is not None:
      tokenize = lambda text: scorer.tokenize(text)[:-1]
    else:
      from rest_jax.rewards import model as rm_model
      tokenize = rm_model.text_tokenizer(task)

  others = neg_lib.other_indices(n, seed)
  kinds, texts, src_ids, cand_ids, refs = [], [], [], [], []
  for i in range(n):
    ref = task_data.targets[i]
    rows = [('reference', ref, [int(t) for t in tokenize(ref)] + [EOS_ID])]
    rows += neg_lib.synthetic_candidates(task_data.inputs[i], ref, task_data.targets[others[i]],
                                         tokenize)
    for kind, text, ids in rows:
      kinds.append(kind)
      texts.append(text)
      cand_ids.append(ids)
      src_ids.append(trim_ids(task_data.arrays['encoder_input_tokens'][i]))
      refs.append(ref)
  if reward == 'rm':
    raw = np.asarray(scorer.raw_scores(src_ids, cand_ids, batch_size), np.float32)
    value = np.asarray(scorer.calibrate(raw), np.float32)
  else:
    raw = value = metrics_lib.sentence_rewards(texts, refs, (reward,))[reward]
  k = len(ROWS)
  raw, value = raw.reshape(n, k), value.reshape(n, k)  # Rows in `ROWS` order per source.
  stripped = [t.strip() for t in texts]
  same = np.array([stripped[i] == stripped[i - i % k] for i in range(n * k)]).reshape(n, k)
  result: dict[str, Any] = {'reward': reward, 'split': split, 'num_sources': n, 'seed': seed,
                            'rm_dir': fileio.abspath(rm_dir) if reward == 'rm' and rm_dir
                            else None}
  result['num_compared'], result['num_ties_excluded'] = {}, {}
  for j, kind in enumerate(ROWS[1:], start=1):
    keep = ~same[:, j]
    wins = raw[keep, 0] > raw[keep, j]
    result[kind] = float(wins.mean()) if keep.any() else float('nan')
    result['num_compared'][kind] = int(keep.sum())
    result['num_ties_excluded'][kind] = int((~keep).sum())
  result['mean_reward'] = {row: float(value[:, j].mean()) for j, row in enumerate(ROWS)}
  print(format_table(result))
  name = 'rm_check.json' if reward == 'rm' else f'rm_check_{reward}.json'
  fileio.write_json(os.path.join(output_dir, name), result)
  return result
