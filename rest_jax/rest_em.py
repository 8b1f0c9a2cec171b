"""`rest-jax rest-em`: ReST-EM (Singh et al. 2023, "Beyond Human Data", arXiv 2312.06585, sec. 3).

Self-training with a binary reward, as expectation-maximisation:

    base model -> for i = 1..I: E-step_i -> verify_i -> M-step_i -> evaluation -> controls, report

* E-step i: sample solutions for every problem of the pool (`grow.grow` on the task's `pool`
  split; paper: 32 per problem at temperature 0.7, top-k 40) from the *latest* policy (the base
  model for i = 1, else the M-step policy of iteration i - 1).
* verify i: score every sample with the verifier (`scoring.score(reward='verifier')`: 1 iff the
  final answer after `####` is right, `rewards.verifiers`). The pool's gold solutions are written
  beside the samples as `reference` records but never trained on by ReST-EM (they serve control
  (a) only): the M-step trains on `origins=('sample',)`.
* M-step i: keep the correct samples, at most K = 10 per problem (`improve.select_training_data
  (selection='correct')`; Grow already made identical samples of a problem one record), and
  fine-tune **the base model** (not the previous iterate; `m_step_init='last'` for the ablation)
  with the reward-weighted NLL (`losses.reward_weighted_nll`), the checkpoint chosen by dev greedy
  pass@1 (`improve.improve` with the verifier as its scorer).

Every iterate is evaluated (`evaluate_solver`): greedy pass@1 on dev, test, test_hard (the harder
bucket, easy-to-hard) and the first pool problems (the problems it trained on: the overfitting
check), per-bucket accuracy and the verdicts' reasons; on test, pass@k from n samples at the
E-step's temperature and top-k (the unbiased estimator) and majority vote maj@k. The best
iteration is chosen on dev, never on test.

Controls (the paper's comparisons), each an M-step from the base model with iteration 1's M-step
settings (the same step budget and dev-based selection):
  (a) `sft_same_data`: the gold solutions of the pool problems that iteration 1 solved, each
      repeated as often as ReST-EM kept samples of it (human vs model-written solutions of the
      same problems, the same number of them);
  (b) `unfiltered`: every E-step-1 sample, correct or not, with plain NLL (is the verifier
      doing the work?);
  (c) `more_sft`: continued supervised training on the base model's own gold set (is it just
      more training?).

Work directory (each stage resumable, marked by `stage.json` as in `rest.py`):

    base/  eval/base/  estep_<i>/  scored_<i>/  mstep_<i>/  eval/iter_<i>/
    controls/<name>/  eval/<name>/  report.json  report.md  plots/
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any, Mapping, Sequence

import gin
import numpy as np

from rest_jax import fileio
from rest_jax import data as data_lib, evaluation, grow as grow_lib, improve as improve_lib, input_pipeline
from rest_jax import partitioning, report as report_lib, rest as rest_lib
from rest_jax.rewards import verifiers

CONTROLS = ('sft_same_data', 'unfiltered', 'more_sft')
_BUCKET_RE = re.compile(r't\d+d\d+')


def bucket_of(key: str) -> str | None:
  """The difficulty bucket ('t3d2': 3 terms of 2 digits) at the end of an example's key, or
  None for a task without buckets (e.g. GSM8K)."""
  last = key.rsplit('/', 1)[-1]
  return last if _BUCKET_RE.fullmatch(last) else None


def _ids(samples: Mapping[str, np.ndarray], b: int, j: int) -> list[int]:
  return [int(t) for t in samples['tokens'][b, j, :samples['lengths'][b, j]]]


def _bucket_accuracy(keys: Sequence[str], correct: np.ndarray) -> dict[str, float]:
  buckets = [bucket_of(k) for k in keys]
  return {b: 100.0 * float(np.mean([c for c, bb in zip(correct, buckets) if bb == b]))
          for b in sorted({b for b in buckets if b is not None})}


@gin.configurable(denylist=['model', 'policy_dir', 'data', 'scorer', 'out_dir', 'params'])
def evaluate_solver(model, policy_dir: str | None, data: Mapping[str, input_pipeline.TaskData],
                    scorer: verifiers.VerifierScorer, *, sampled_split: str | None = 'test',
                    num_samples: int = 16, ks: Sequence[int] = (1, 4, 16),
                    temperature: float = 0.7, topk: int = 40, seed: int = 0,
                    max_decode_len: int = 128, decode_length_ratio: float | None = None,
                    batch_size: int = 64, out_dir: str | None = None,
                    params=None) -> dict[str, Any]:
  """A policy's accuracy on problem-solving splits (ReST-EM sec. 4's measures).

  Args:
    model, policy_dir: the policy (`rest-jax train` run or Improve step dir).
    data: split name -> `TaskData` (problems; targets: gold solutions ending `#### answer`).
    scorer: the verifier (`verifiers.VerifierScorer`).
    sampled_split: the split on which pass@k and maj@k are estimated (None: none).
    num_samples: n samples per problem for pass@k / maj@k, drawn with `grow.sample_candidates`
      (problem b's key `fold_in(PRNGKey(seed), b)`) at `temperature` / `topk` (the E-step's).
    ks: the k of pass@k and maj@k (each <= num_samples).
    max_decode_len, decode_length_ratio: decoding bound (`data.decode_length`).
    out_dir: where `<split>_outputs.jsonl` go (key, problem, reference, greedy output, reward,
      reason), one line per problem.
    params: evaluate these (unboxed) policy params instead of restoring `policy_dir`.

  Returns:
    For every split s: `{s}_pass1` (greedy, percent), `{s}_buckets` (bucket -> greedy accuracy,
    percent; empty without buckets), `{s}_reasons` (`verifiers.count_reasons` of the greedy
    outputs), `{s}_problems`; for `sampled_split` s: `{s}_pass_at_k` and `{s}_maj_at_k` (str(k)
    -> percent; Chen et al. 2021's unbiased estimator, `verifiers.mean_pass_at_k`; majority vote
    of the first k samples, `verifiers.maj_at_k`), `{s}_samples_per_problem`.

  Raises:
    ValueError: a k larger than `num_samples` (pass@k is undefined there).
  """
  if sampled_split and max(ks) > num_samples:
    raise ValueError(f'pass@k needs n >= k: k = {max(ks)} > num_samples = {num_samples}')
  mesh = partitioning.create_mesh()
  if params is None:
    params = rest_lib._policy_params(model, policy_dir, mesh)
  out: dict[str, Any] = {}
  for split, d in data.items():
    ids = evaluation.predict_ids(model, params, d.arrays['encoder_input_tokens'],
                                 batch_size=batch_size, max_decode_len=max_decode_len,
                                 decode_length_ratio=decode_length_ratio)
    verdicts = scorer.verdicts(ids, d.targets)
    correct = np.array([v.reward for v in verdicts], np.float64)
    out[f'{split}_pass1'] = 100.0 * float(correct.mean())
    out[f'{split}_buckets'] = _bucket_accuracy(d.keys, correct)
    out[f'{split}_reasons'] = verifiers.count_reasons(verdicts)
    out[f'{split}_problems'] = len(d)
    if out_dir:
      rows = [dict(key=k, problem=x, reference=y, output=scorer.detokenize(i), reward=v.reward,
                   reason=v.reason)
              for k, x, y, i, v in zip(d.keys, d.inputs, d.targets, ids, verdicts)]
      fileio.write_jsonl(os.path.join(out_dir, f'{split}_outputs.jsonl'), rows)
  if sampled_split:
    d = data[sampled_split]
    enc = d.arrays['encoder_input_tokens']
    samples = grow_lib.sample_candidates(
        model, params, enc, np.arange(len(enc)), seed=seed, num_decodes=num_samples,
        temperature=temperature, topk=topk, max_decode_len=max_decode_len,
        decode_length_ratio=decode_length_ratio, mesh=mesh, batch_size=batch_size)
    flat = [_ids(samples, b, j) for b in range(len(enc)) for j in range(num_samples)]
    verdicts = scorer.verdicts(flat, [t for t in d.targets for _ in range(num_samples)])
    correct = np.array([v.reward for v in verdicts]).reshape(len(enc), num_samples)
    answers = [[v.answer for v in verdicts[b * num_samples:(b + 1) * num_samples]]
               for b in range(len(enc))]
    refs = [verifiers.parse_answer(t)[0] for t in d.targets]
    out[f'{sampled_split}_pass_at_k'] = {
        str(k): 100.0 * verifiers.mean_pass_at_k(num_samples, correct.sum(1).astype(int), k)
        for k in ks}
    out[f'{sampled_split}_maj_at_k'] = {
        str(k): 100.0 * verifiers.maj_at_k(answers, refs, k) for k in ks}
    out[f'{sampled_split}_samples_per_problem'] = num_samples
  return out


def correct_selection(records: Sequence[Mapping[str, Any]], max_per_problem: int | None,
                      seed: int) -> np.ndarray:
  """[n] bool: the records the M-step trains on (the correct samples, at most K per problem),
  exactly as `improve.select_training_data(selection='correct', origins=('sample',))` keeps
  them (the same function, so control (a) sees the very selection of iteration 1)."""
  return improve_lib.selection_mask(records, tau=0.0, mode='absolute', origins=('sample',),
                                    selection='correct', max_per_source=max_per_problem,
                                    seed=seed)


def same_problem_gold(records: Sequence[Mapping[str, Any]], keep: np.ndarray
                      ) -> list[dict[str, Any]]:
  """Control (a)'s records: for each kept sample, its problem's gold solution (the `reference`
  record of its source): the human solutions of the problems ReST-EM solved, as many as its
  training set.

  Raises:
    ValueError: a kept sample's problem has no reference record.
  """
  refs = {r['source_index']: r for r in records if r.get('origin') == 'reference'}
  out = []
  for r, k in zip(records, keep):
    if k:
      if r['source_index'] not in refs:
        raise ValueError(f'problem {r["source_index"]} ({r["key"]}) has no gold solution record')
      out.append(refs[r['source_index']])
  return out


def gold_records(data: input_pipeline.TaskData) -> list[dict[str, Any]]:
  """Control (c)'s records: the gold set (the base model's SFT data) in the record layout
  Improve reads (origin 'reference', reward 1)."""
  enc, tgt = data.arrays['encoder_input_tokens'], data.arrays['decoder_target_tokens']
  return [dict(source_index=i, source_ids=[int(t) for t in enc[i, :ns]],
               candidate_ids=[int(t) for t in tgt[i, :nt]], reward=1.0, origin='reference',
               key=data.keys[i])
          for i, (ns, nt) in enumerate(zip(data_lib.lengths(enc), data_lib.lengths(tgt)))]


@gin.configurable(denylist=['workdir'])
def rest_em(workdir: str,
            model=gin.REQUIRED,
            task: str = 'arithmetic_chain',
            base_params_file: str | None = None,
            base_policy_dir: str | None = None,
            num_iterations: int = 3,
            reward: str = 'verifier',
            max_per_problem: int | None = 10,
            m_step_init: str = 'base',
            pool_split: str = 'pool',
            pool_eval_examples: int = 200,
            dev_examples: int | None = None,
            test_examples: int | None = None,
            eval_splits: Sequence[str] = ('test', 'test_hard'),
            controls: Sequence[str] = CONTROLS,
            inputs_length: int = 64,
            targets_length: int = 128,
            max_decode_len: int = 128,
            decode_length_ratio: float | None = None,
            seed: int = 0) -> dict[str, Any]:
  """The ReST-EM loop in `workdir` (module docstring); returns the report (also report.json/md).

  Args:
    workdir: the run's folder; rerunning resumes a killed loop at its stage.
    model: the policy's `EncoderDecoderModel` (gin: `MODEL`).
    task: a problem-solving SeqIO task with splits train (gold SFT set), `pool_split`,
      validation and `eval_splits` ('arithmetic_chain', 'gsm8k').
    base_params_file: start from this shipped base model (`fileio.save_params_npz` file) ...
    base_policy_dir: ... or from this `rest-jax train` run; with neither, `base/` is trained here
      by `train.train` (gin: `train.dev_metric = 'verifier'`).
    num_iterations: EM iterations (paper: 3; it overfit after 2-3).
    reward: the verifier ('verifier': final answer; 'verifier_steps': and every step).
    max_per_problem: K, the most correct samples kept per problem (paper: 10; None: all).
    m_step_init: 'base' (ReST-EM: every M-step fine-tunes the base model) or 'last' (the
      ablation: continue from the previous iterate).
    pool_split: the problems of the E-step (the Grow's `split`; `grow.max_sources` bounds them).
    pool_eval_examples: the first pool problems evaluated greedily (the overfitting check).
    dev_examples, test_examples: first problems of validation / each eval split (None: all).
    controls: which of `CONTROLS` to run after the loop (() for none).
    inputs_length, targets_length: feature lengths (tokens) of the evaluation data.
    max_decode_len, decode_length_ratio: the evaluation's decoding bound (worked solutions are
      2-4x longer than their problems: None decodes up to max_decode_len for every problem).
    seed: which K correct samples are kept when a problem has more.

  Raises:
    ValueError: unknown reward, m_step_init or control; an E-step without any correct sample.
  """
  from rest_jax import train as train_lib
  from rest_jax.rewards import scoring
  if reward not in verifiers.VERIFIER_REWARDS:
    raise ValueError(f'rest_em needs a verifier reward {tuple(verifiers.VERIFIER_REWARDS)}, '
                     f'got {reward!r}')
  if m_step_init not in ('base', 'last'):
    raise ValueError(f"m_step_init must be 'base' or 'last', got {m_step_init!r}")
  if set(controls) - set(CONTROLS):
    raise ValueError(f'unknown controls {sorted(set(controls) - set(CONTROLS))}; use {CONTROLS}')
  start = time.perf_counter()
  fileio.makedirs(workdir)
  cache = fileio.local_cache_dir(workdir)
  input_pipeline.check_vocab_size(task, model.config.vocab_size)
  detok = input_pipeline.detokenizer(task)
  scorer = verifiers.make_scorer(reward, detok)
  load = lambda split, n: input_pipeline.cached_task_data(task, split, inputs_length,
                                                          targets_length, cache, max_examples=n)
  dev = load('validation', dev_examples)
  eval_data = {'dev': dev, **{s: load(s, test_examples) for s in eval_splits},
               'pool': load(pool_split, pool_eval_examples)}
  sampled = eval_splits[0] if eval_splits else None
  decode = dict(max_decode_len=max_decode_len, decode_length_ratio=decode_length_ratio)

  # -- the base model ------------------------------------------------------------------------------
  base_dir = os.path.join(workdir, 'base')
  if base_params_file:
    base = rest_lib._run_stage(base_dir, rest_lib.import_policy, base_dir, model, base_params_file)
  elif base_policy_dir:
    base_dir, base = base_policy_dir, {'policy_dir': fileio.abspath(base_policy_dir),
                                       'minutes': 0.0}
  else:
    base = rest_lib._run_stage(base_dir, lambda: {'train': train_lib.train(base_dir, task=task)})

  def evaluate(name, policy_dir):
    ev_dir = os.path.join(workdir, 'eval', name)
    return rest_lib._run_stage(ev_dir, evaluate_solver, model, policy_dir, eval_data, scorer,
                               sampled_split=sampled, out_dir=ev_dir, **decode)

  def m_step(step_dir, scored_dir, init_dir, records, **kw):
    return rest_lib._run_stage(step_dir, lambda: {'summary': improve_lib.improve(
        step_dir, model=model, scored_dir=scored_dir,
        init_policy_dir=init_dir, task=task, tau=0.0, threshold_mode='absolute',
        dev_examples=dev_examples, records=records, scorer=scorer, inputs_length=inputs_length,
        targets_length=targets_length, seed=seed, **decode, **kw)})

  iterations = [dict(iteration=0, name='base', policy_dir=base_dir, minutes=base['minutes'],
                     **_eval_fields(evaluate('base', base_dir)))]
  # -- E-step / verify / M-step ------------------------------------------------------------------
  policy_dir, estep_reasons = base_dir, {}
  for i in range(1, num_iterations + 1):
    grow_dir, scored_dir = (os.path.join(workdir, f'{s}_{i}') for s in ('estep', 'scored'))
    mstep_dir = os.path.join(workdir, f'mstep_{i}')
    gr = rest_lib._run_stage(grow_dir, lambda: {'manifest': grow_lib.grow(
        grow_dir, model=model, policy_dir=policy_dir, task=task, split=pool_split,
        grow_step=i, inputs_length=inputs_length, targets_length=targets_length)})
    sc = rest_lib._run_stage(scored_dir, lambda: {'manifest': scoring.score(
        scored_dir, grow_dir=grow_dir, task=task, reward=reward, metrics=())})
    estep_reasons[str(i)] = sc['manifest']['reasons']['sample']
    records = None
    if rest_lib._stage_done(mstep_dir) is None:
      records = scoring.read_scored_records(scored_dir)
    init_dir = base_dir if m_step_init == 'base' or i == 1 else policy_dir
    ms = m_step(mstep_dir, scored_dir, init_dir, records, loss='reward_weighted_nll',
                origins=('sample',),
                selection='correct', max_per_source=max_per_problem)
    s = ms['summary']
    counts = gr['manifest']['counts']
    iterations.append(dict(
        iteration=i, name=f'iter_{i}', policy_dir=mstep_dir, init_policy=init_dir,
        num_train_solutions=s['filter']['kept_records'],
        num_problems_solved=s['filter']['distinct_sources'],
        num_problems=s['filter']['total_sources'],
        samples_drawn=counts['samples_drawn'], distinct_samples=counts['samples_kept'],
        correct_samples=sc['manifest']['reasons']['sample']['correct'],
        best_step=s['best_step'], steps=s['steps'],
        estep_minutes=gr['minutes'], score_minutes=sc['minutes'], mstep_minutes=ms['minutes'],
        **_eval_fields(evaluate(f'iter_{i}', mstep_dir))))
    iterations[-1]['minutes'] = sum(iterations[-1][k] + 0.0 for k in (
        'estep_minutes', 'score_minutes', 'mstep_minutes', 'eval_minutes'))
    policy_dir = mstep_dir

  # -- controls: M-steps from the base model on other data of the same problems ----------------------
  results = {}
  scored_1 = os.path.join(workdir, 'scored_1')
  for name in controls:
    ctl_dir = os.path.join(workdir, 'controls', name)
    records = None
    if rest_lib._stage_done(ctl_dir) is None:
      if name == 'more_sft':
        records = gold_records(load('train', None))
      else:
        records = scoring.read_scored_records(scored_1)
        if name == 'sft_same_data':
          records = same_problem_gold(records, correct_selection(records, max_per_problem, seed))
    loss, origins = {'sft_same_data': ('reward_weighted_nll', ('reference',)),
                     'unfiltered': ('bc', ('sample',)),
                     'more_sft': ('reward_weighted_nll', ('reference',))}[name]
    ctl = m_step(ctl_dir, scored_1, base_dir, records, loss=loss, origins=origins,
                 selection='threshold')
    s = ctl['summary']
    results[name] = dict(num_train_solutions=s['filter']['kept_records'],
                         num_problems=s['filter']['distinct_sources'], loss=s['loss'],
                         best_step=s['best_step'], steps=s['steps'], mstep_minutes=ctl['minutes'],
                         **_eval_fields(evaluate(name, ctl_dir)))
  best = max(iterations, key=lambda it: it['dev_pass1'])  # On dev, never on test.
  report = dict(task=task, reward=reward, max_per_problem=max_per_problem,
                m_step_init=m_step_init, iterations=iterations, controls=results,
                best_iteration=best['iteration'], verifier=estep_reasons,
                sampled_split=sampled, settings=_loop_settings(),
                minutes_this_invocation=(time.perf_counter() - start) / 60)
  report['minutes_total'] = float(sum(it['minutes'] for it in iterations) +
                                  sum(c['mstep_minutes'] + c['eval_minutes']
                                      for c in results.values()))
  report_lib.write_rest_em_report(workdir, report)
  logging.info('rest_em: best iteration %d (dev pass@1 %.2f): test pass@1 %.2f (base %.2f)',
               best['iteration'], best['dev_pass1'], best.get('test_pass1', float('nan')),
               iterations[0].get('test_pass1', float('nan')))
  return report


def _eval_fields(ev: Mapping[str, Any]) -> dict[str, Any]:
  """An evaluation stage's result as report fields (`eval_minutes` for its `minutes`)."""
  out = {k: v for k, v in ev.items() if k != 'minutes'}
  out['eval_minutes'] = ev['minutes']
  return out


def _loop_settings() -> dict[str, Any]:
  """The E-step / M-step settings in force (gin), for the report's header."""
  names = ('grow.num_decodes', 'grow.temperature', 'grow.topk', 'grow.max_sources',
           'grow.max_decode_len', 'improve.num_steps', 'improve.batch_size',
           'improve.eval_every_steps', 'improve.patience', 'improve/make_optimizer.learning_rate')
  out = {}
  for n in names:
    try:
      out[n] = gin.query_parameter(n)
    except ValueError:
      pass
  return out
