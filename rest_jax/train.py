"""`rest-jax train` and `rest-jax eval`: supervised (BC) training of the policy and its evaluation.

The BC policy is where ReST starts (Gulcehre et al. 2023, sec. 2): maximum likelihood on the
parallel corpus. Every knob is a gin binding of `train` / `evaluate` below; see
`gin_configs/runs/train_bc.gin`.

Time accounting: `max_minutes` and `eval_at_minutes` count *training* wall-clock time only
(evaluation pauses the clock), so "BLEU after 30 minutes" means 30 minutes of optimizer steps.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Sequence

import gin
import jax
import numpy as np
from tqdm import tqdm

from rest_jax import distributed, fileio
from rest_jax import data as data_lib
from rest_jax import evaluation, input_pipeline, partitioning, summaries, trainer as trainer_lib


def _input_shapes(batch_size, inputs_length, targets_length):
  return {'encoder_input_tokens': (batch_size, inputs_length),
          'decoder_input_tokens': (batch_size, targets_length)}


@gin.configurable(denylist=['model_dir'])
def train(model_dir: str,
          model=gin.REQUIRED,
          task: str = 'libreoffice_help_de_en',
          batch_size: int = 64,
          inputs_length: int = 128,
          targets_length: int = 128,
          num_steps: int = 100_000,
          max_minutes: float | None = None,
          eval_every_steps: int = 1000,
          eval_examples: int = 400,
          eval_at_minutes: Sequence[float] = (),
          test_examples: int | None = None,
          checkpoint_every_steps: int = 1000,
          max_decode_len: int = 128,
          decode_length_ratio: float | None = 2.0,
          dev_metric: str = 'bleu',
          num_microbatches: int = 1,
          seed: int = 0,
          max_train_examples: int | None = None,
          init_params_dir: str | None = None,
          train_data=None) -> dict[str, Any]:
  """Trains `model` on `task`'s train split; resumes from `model_dir` if it holds a checkpoint.

  Args:
    model_dir: output folder (checkpoints/, best/, TensorBoard events, train_summary.json).
    model: an `EncoderDecoderModel` (gin: `MODEL`).
    task: SeqIO task name.
    batch_size: global batch (sentence pairs).
    inputs_length, targets_length: feature lengths (tokens; SeqIO cuts longer rows, EOS kept).
      Each batch is then trimmed to the smallest of `data.ArrayBatcher`'s length buckets (16,
      32, 64, 128 tokens) that holds its longest source and target, sources and targets to that
      same length (at most their feature length; a longest row over 128 tokens keeps its own
      length), so the step compiles once per bucket.
    num_steps: stop after this many optimizer steps.
    max_minutes: also stop after this much training time (minutes; None: no limit).
    eval_every_steps: dev greedy BLEU on `eval_examples` dev pairs, keep-best checkpoint by it.
    eval_at_minutes: training-time marks (minutes) at which the full test split is evaluated;
      results go to `model_dir/train_summary.json`.
    test_examples: evaluate only the first test pairs at those marks (None: the whole split).
    checkpoint_every_steps: latest-state checkpoint period (for resume).
    max_decode_len: decoding length for evaluation (tokens).
    decode_length_ratio: dev decoding stops after `data.decode_length(bucket, max_decode_len,
      ratio)` tokens (None: max_decode_len; worked solutions are longer than their problems).
    dev_metric: what selects the best checkpoint: 'bleu' (dev sacreBLEU, translation) or a
      verifier reward ('verifier', 'verifier_steps'; `rewards.verifiers`): dev greedy pass@1 in
      percent, `dev_pass1` (problem solving: the ReST-EM base model).
    num_microbatches: gradient accumulation factor.
    seed: run seed (init, data order, dropout).
    max_train_examples: train on the first pairs of the split only (None: all).
    init_params_dir: start from the params of this run (fresh optimizer), e.g. a BC policy, or
      of a `fileio.save_params_npz` file (a path ending in `.npz`, e.g. the shipped policy;
      relative paths not found here are read relative to the repository).
    train_data: an `input_pipeline.TaskData` to train on instead of `task`'s train split (Improve).

  Returns:
    Summary dict (steps, minutes, best dev BLEU, eval-at-minutes results), also written to
    `model_dir/train_summary.json`.

  Raises:
    trainer.NonFiniteLossError: a NaN / infinite loss (checked every step, read at the 20-step
      metric sync) or non-finite params before a checkpoint save or dev evaluation; that state
      is not saved and the message names the step and the last good checkpoint.
  """
  fileio.makedirs(model_dir)
  cache = fileio.local_cache_dir(fileio.parent(model_dir))
  fileio.write_text(os.path.join(model_dir, 'config.gin'), gin.config_str())
  if train_data is None:
    train_data = input_pipeline.cached_task_data(task, 'train', inputs_length, targets_length, cache,
                                                 max_examples=max_train_examples)
  dev = input_pipeline.cached_task_data(task, 'validation', inputs_length, targets_length, cache,
                                        max_examples=eval_examples)
  input_pipeline.check_vocab_size(task, model.config.vocab_size)
  if init_params_dir:
    input_pipeline.check_policy_vocab(init_params_dir, task)
  if jax.process_index() == 0:
    input_pipeline.write_policy_vocab(model_dir, task)
  detok = input_pipeline.detokenizer(task)
  logging.info('train: %d pairs (%d truncated); dev subset: %d', len(train_data),
               train_data.num_truncated, len(dev))

  mesh = partitioning.create_mesh()
  optimizer, schedule = trainer_lib.make_optimizer(with_schedule=True)
  t = trainer_lib.Trainer(model, optimizer, mesh,
                          num_microbatches=num_microbatches, seed=seed)
  shapes = _input_shapes(batch_size, inputs_length, targets_length)
  init_params = None
  if init_params_dir:
    abstract = t.abstract_state(shapes).params
    init_params = trainer_lib.restore_policy(init_params_dir, abstract)
  state = t.init_state(shapes, params=init_params)
  verifier = None
  if dev_metric != 'bleu':
    from rest_jax.rewards import verifiers
    verifier = verifiers.make_scorer(dev_metric, detok)
  ckpt = trainer_lib.Checkpointer(model_dir,
                                  best_metric='dev_bleu' if verifier is None else 'dev_pass1')
  guard = trainer_lib.LossGuard(model_dir, ckpt)
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state = restored
  start_step = int(jax.device_get(state.step))
  summary_path = os.path.join(model_dir, 'train_summary.json')
  summary = {'eval_at_minutes': [], 'train_seconds': 0.0}
  if restored is not None and fileio.exists(summary_path):
    summary = fileio.read_json(summary_path)
    logging.info('resumed from step %d', start_step)

  batcher = data_lib.ArrayBatcher(train_data.arrays, batch_size, seed=seed)
  rows = distributed.host_rows(batch_size, mesh)  # This host's rows of every global batch.
  writer = summaries.metric_writer(model_dir)
  pending_marks = [m for m in eval_at_minutes
                   if m not in [e['minutes'] for e in summary['eval_at_minutes']]]
  train_seconds = summary['train_seconds']
  bar = tqdm(total=num_steps, initial=start_step, desc='train', unit='step',
             dynamic_ncols=True, mininterval=2.0)
  clock = time.perf_counter()
  metrics = {}

  def dev_eval(step):
    guard.check(state)  # Before a state is evaluated for, and saved as, the best checkpoint.
    if verifier is not None:
      ids = evaluation.predict_ids(model, state.params, dev.arrays['encoder_input_tokens'],
                                   max_decode_len=max_decode_len,
                                   decode_length_ratio=decode_length_ratio)
      pass1 = 100.0 * float(np.mean(verifier.score_ids(None, ids, references=dev.targets)))
      is_best = ckpt.save_best(state, {'dev_pass1': pass1})
      tqdm.write(f'[train step {step}] dev pass@1 {pass1:.2f}' + ' (best)' * is_best)
      if writer:
        writer.write_scalars(step, {'dev/pass1': pass1})
      return {'pass1': pass1}
    m, _ = evaluation.evaluate_translation(model, state.params, dev, detok,
                                           max_decode_len=max_decode_len,
                                           decode_length_ratio=decode_length_ratio)
    is_best = ckpt.save_best(state, {'dev_bleu': m['bleu'], 'dev_chrf': m['chrf']})
    logging.info('step %d dev %s%s', step, evaluation.format_metrics(m), ' (best)' * is_best)
    if writer:
      writer.write_scalars(step, {'dev/bleu': m['bleu'], 'dev/chrf': m['chrf']})
    return m

  step = start_step
  while step < num_steps:
    if max_minutes is not None and train_seconds >= max_minutes * 60:
      break
    batch = partitioning.shard_batch(batcher.batch_at(step, rows), mesh)
    state, metrics = t.train_step(state, batch)
    step += 1
    guard.add(step, metrics['loss'])
    if step % 20 == 0 or step == num_steps:
      metrics = jax.device_get(metrics)
      guard.check()
      now = time.perf_counter()
      train_seconds += now - clock
      rate = float(metrics['num_tokens']) * 20 / max(now - clock, 1e-9)
      clock = now
      bar.update(step - bar.n)
      bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f'{rate:,.0f}',
                      min=f'{train_seconds / 60:.1f}')
      if writer:
        writer.write_scalars(step, {'train/loss': metrics['loss'],
                                    'train/accuracy': metrics.get('accuracy', np.nan),
                                    'train/target_tokens_per_s': rate,
                                    'train/learning_rate': summaries.last_learning_rate(
                                        schedule, step),
                                    'train/minutes': train_seconds / 60})
      while pending_marks and train_seconds >= pending_marks[0] * 60:
        mark = pending_marks.pop(0)
        summary['eval_at_minutes'].append(_test_eval(model, state.params, task, inputs_length,
                                                     targets_length, cache, detok,
                                                     max_decode_len, mark, step,
                                                     max_examples=test_examples))
      clock = time.perf_counter()
    if step % eval_every_steps == 0:
      dev_eval(step)
      clock = time.perf_counter()
    if step % checkpoint_every_steps == 0:
      guard.check(state)
      summary['train_seconds'] = train_seconds
      ckpt.save(state)
      fileio.write_json(summary_path, summary)
      clock = time.perf_counter()
  bar.close()
  train_seconds += time.perf_counter() - clock
  final_dev = dev_eval(step)
  if pending_marks:  # Marks past the end of a shorter run: the final policy stands for them.
    final = _test_eval(model, state.params, task, inputs_length, targets_length, cache, detok,
                       max_decode_len, pending_marks[0], step, reached=False,
                       max_examples=test_examples)
    summary['eval_at_minutes'] += [dict(final, minutes=mark) for mark in pending_marks]
  summary.update(steps=step, train_seconds=train_seconds, final_dev=final_dev,
                 best_dev=ckpt.best_metrics(), task=task, batch_size=batch_size)
  guard.check(state)
  ckpt.save(state)
  fileio.write_json(summary_path, summary)
  if writer:
    writer.flush()
  return summary


def _test_eval(model, params, task, inputs_length, targets_length, cache, detok, max_decode_len,
               mark, step, reached=True, max_examples=None):
  test = input_pipeline.cached_task_data(task, 'test', inputs_length, targets_length, cache,
                                         max_examples=max_examples)
  m, _ = evaluation.evaluate_translation(model, params, test, detok, max_decode_len=max_decode_len)
  logging.info('test at %.0f training minutes (step %d): %s', mark, step,
               evaluation.format_metrics(m))
  tqdm.write(f'[{mark:g} min, step {step}] test {evaluation.format_metrics(m)}')
  return dict(m, minutes=mark, step=step, reached=reached)


@gin.configurable(denylist=['model_dir', 'output_dir'])
def evaluate(model_dir: str,
             model=gin.REQUIRED,
             task: str = 'libreoffice_help_de_en',
             splits: Sequence[str] = ('validation', 'test'),
             inputs_length: int = 128,
             targets_length: int = 128,
             max_decode_len: int = 128,
             method: str = 'greedy',
             beam_size: int = 4,
             batch_size: int = 64,
             max_examples: int | None = None,
             output_dir: str | None = None) -> dict[str, Any]:
  """Translates the `splits` of `task` with the best (else latest) params in `model_dir`, or
  with the params of an `.npz` (`trainer.restore_policy`, e.g. a shipped policy).

  Writes `<output_dir>/eval_<split>.json` (metrics with sacreBLEU signatures) and
  `<output_dir>/eval_<split>.hyp.txt` (one hypothesis a line); output_dir defaults to
  `model_dir` (required for an `.npz`). `max_examples` limits each split to its first pairs
  (None: all).

  Raises:
    ValueError: an `.npz` without output_dir; a policy of another vocabulary.
  """
  if output_dir is None:
    if model_dir.endswith('.npz'):
      raise ValueError('evaluating an .npz needs an output_dir for its eval files')
    output_dir = model_dir
  mesh = partitioning.create_mesh()
  input_pipeline.check_vocab_size(task, model.config.vocab_size)
  input_pipeline.check_policy_vocab(model_dir, task)
  params = trainer_lib.restore_policy(model_dir, trainer_lib.abstract_params(model, mesh))
  cache = fileio.local_cache_dir(fileio.parent(output_dir))
  detok = input_pipeline.detokenizer(task)
  results = {}
  for split in splits:
    data = input_pipeline.cached_task_data(task, split, inputs_length, targets_length, cache,
                                           max_examples=max_examples)
    m, hyps = evaluation.evaluate_translation(model, params, data, detok, batch_size=batch_size,
                                              max_decode_len=max_decode_len, method=method,
                                              beam_size=beam_size)
    m.update(method=method, split=split, task=task)
    print(f'{task}/{split} ({method}): {evaluation.format_metrics(m)}')
    print(f'  chrF signature: {m["chrf_signature"]}')
    fileio.write_json(os.path.join(output_dir, f'eval_{split}.json'), m)
    fileio.write_text(os.path.join(output_dir, f'eval_{split}.hyp.txt'),
                      '\n'.join(h.replace('\n', ' ') for h in hyps) + '\n')
    results[split] = m
  return results
