"""Which Improve data raises the reward? One Improve step from the BC policy on a chosen record set.

A diagnostic for README "Where the gain comes from": on a finished (or Grow-1-scored) main-job
work directory, trains one Improve step (`improve.improve`, the main job's gin settings, tau = 0
on the chosen records, dev reward every 30 steps, no early stopping) from `WORKDIR/bc` and
evaluates its best policy on the test pairs. Selections (per source; "samples" = the policy's
Grow samples, "references" = the original pairs):

  p90all      ReST's p90 filter over all records (references and samples)
  refs        the references only
  top1        the RM's best sample of each source only (the samples' p90, no references)
  top1refs    the RM's best sample of each source plus every reference above it
  top3refs    the RM's best 3 samples (the samples' p70) plus references above them
  otop1       the best sample by the oracle (mean of chrF and 1 - TER against the reference)
  trainrefs   every pair of the train split (supervised training continued on fresh data)

Usage:  python scripts/improve_data_probe.py WORKDIR SELECTION NUM_STEPS [--gin.X=Y ...]
Writes WORKDIR/probe/<selection>_<steps>/ and appends a JSON line to WORKDIR/probe/results.jsonl.
"""

import json
import os
import sys

import gin
import numpy as np

from rest_jax import data as data_lib
from rest_jax import filtering, improve as improve_lib, input_pipeline, main as main_lib
from rest_jax import rest as rest_lib
from rest_jax.rewards import model as rm_model, scoring

TASK = 'libreoffice_help_de_en'


@gin.configurable
def _model(model=gin.REQUIRED):
  return model


def _select(name, records, workdir):
  rewards = np.array([r['reward'] for r in records])
  sources = np.array([r['source_index'] for r in records])
  is_ref = np.array([r['origin'] == 'reference' for r in records])
  oracle = np.array([(r['chrf'] + r['ter']) / 2 for r in records])

  def top_samples(values, q):  # Records above the q-quantile of their source's *samples*.
    qs = filtering.source_quantiles(values[~is_ref], sources[~is_ref], q)
    by_source = dict(zip(sources[~is_ref], qs))
    return values > np.array([by_source.get(s, -1.0) for s in sources])

  if name == 'trainrefs':
    train = input_pipeline.cached_task_data(TASK, 'train', 128, 128, os.path.join(workdir, 'cache'))
    enc, tgt = train.arrays['encoder_input_tokens'], train.arrays['decoder_target_tokens']
    le, lt = data_lib.lengths(enc), data_lib.lengths(tgt)
    return [dict(source_ids=list(enc[i, :le[i]]), candidate_ids=list(tgt[i, :lt[i]]), reward=1.0,
                 source_index=i, origin='reference') for i in range(len(enc))]
  keep = {'p90all': lambda: filtering.filter_records(rewards, sources, 0.9, 'percentile'),
          'refs': lambda: is_ref,
          'top1': lambda: top_samples(rewards, 0.9) & ~is_ref,
          'top1refs': lambda: top_samples(rewards, 0.9),
          'top3refs': lambda: top_samples(rewards, 0.7),
          'otop1': lambda: top_samples(oracle, 0.9) & ~is_ref}[name]()
  return [r for r, k in zip(records, keep) if k]


def main(argv):
  bindings, args = main_lib._split_gin_flags(argv[1:])
  workdir, name, steps = args[0], args[1], int(args[2])
  main_lib.parse_gin(['runs/rest_libreoffice_de_en_cpu.gin'], ['_model.model = %MODEL'] + bindings)
  model = _model()
  records = _select(name, scoring.read_scored_records(os.path.join(workdir, 'scored_1')), workdir)
  scorer = rm_model.load_reward_model(os.path.join(workdir, 'rm'))
  out_dir = os.path.join(workdir, 'probe', f'{name}_{steps}')
  summary = improve_lib.improve(out_dir, scored_dir='', init_policy_dir=os.path.join(workdir, 'bc'),
                                rm_dir=os.path.join(workdir, 'rm'),
                                prior_policy_dir=os.path.join(workdir, 'bc'), records=records,
                                scorer=scorer, tau=0.0, num_steps=steps, eval_every_steps=30,
                                patience=steps)
  test = input_pipeline.cached_task_data(TASK, 'test', 128, 128, os.path.join(workdir, 'cache'),
                                         max_examples=500)
  ev = rest_lib.evaluate_policy(model, out_dir, scorer, None, test,
                                input_pipeline.detokenizer(TASK))
  out = dict(selection=name, steps=steps, gin=bindings, records=len(records),
             references=sum(r.get('origin') == 'reference' for r in records),
             dev_history=[(h['step'], round(h['reward'], 2), round(h['bleu'], 2))
                          for h in summary['history']],
             best_step=summary['best_step'], test_reward=ev['test_reward'],
             test_bleu=ev['test_bleu'], test_chrf=ev['test_chrf'])
  print(json.dumps(out))
  with open(os.path.join(workdir, 'probe', 'results.jsonl'), 'a') as f:
    f.write(json.dumps(out) + '\n')


if __name__ == '__main__':
  main(sys.argv)
