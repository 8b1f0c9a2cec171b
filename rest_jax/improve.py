"""`rest-jax improve`: one Improve step of ReST (Gulcehre et al. 2023, arXiv 2308.08998, sec. 2).

Improve step i keeps the scored Grow records whose normalised reward exceeds tau_i
(`rest_jax.filtering`), fine-tunes the *previous* policy on them with an offline-RL loss
(`rest_jax.losses`, chosen by gin) at a lower learning rate, measures the reward-model reward of
greedy translations of a dev subset every `eval_every_steps`, keeps the best checkpoint by it and
stops once it has not improved for `patience` evaluations. The best policy seeds the next step.

Parameters during Improve are `{'policy', 'aux', 'prior'}` (see `losses`): the policy being
fine-tuned, loss-owned trainable parameters (the value head of `oac`) and, for losses with a KL
term, the frozen BC policy (the optimizer leaves it untouched: `optax.set_to_zero`; which policy
that is: `resolve_prior_policy_dir`, the same BC policy in the ReST loop and in a standalone
`rest-jax improve` from any step of it). The best
checkpoint (`<model_dir>/best`) holds the *policy params only*, in the layout of a `rest-jax train`
run, so `trainer.restore_params(model_dir, ...)` reads an Improve step like a BC run (Grow, eval
and the next Improve step all do). `<model_dir>/checkpoints` holds the whole state for resume.
TensorBoard event files in `<model_dir>` (`summaries`): `train/*` (the loss's metrics, learning
rate, KL weight, minutes) every 10 steps and at the evaluations, `dev/reward`, `dev/bleu`,
`dev/chrf` at every evaluation (step 0 included).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
import optax
from tqdm import tqdm

from rest_jax import distributed, fileio
from rest_jax import data as data_lib
from rest_jax import evaluation, filtering, input_pipeline, losses, partitioning, summaries
from rest_jax import trainer as trainer_lib
from rest_jax.models import base


ORIGINS = ('reference', 'sample')  # Grow record origins (`grow.RECORD_FIELDS`).


class ImproveModel(base.BaseModel):
  """The policy plus the loss's own params, as one model for `trainer.Trainer`.

  `get_initial_variables` returns {'params': {'policy', 'aux'[, 'prior']}}: the policy's boxed
  (logically partitioned) params, the loss's aux params (replicated), and a copy of the policy
  layout for the frozen prior.
  """

  def __init__(self, model: base.PolicyModel, loss_name: str, with_prior: bool):
    base.check_model(model, base.PolicyModel)
    self.model = model
    self.loss_name = loss_name
    self.with_prior = with_prior
    self._loss_fn = losses.make_loss_fn(model, loss_name)

  @property
  def config(self):
    return self.model.config

  def loss_fn(self, params, batch, dropout_rng):
    """The registered loss `loss_name` (`losses.make_loss_fn`) on {'policy', 'aux'[, 'prior']}."""
    return self._loss_fn(params, batch, dropout_rng)

  def get_initial_variables(self, rng, input_shapes, input_types=None):
    del input_types
    policy = self.model.get_initial_variables(rng, input_shapes)['params']
    params = {'policy': policy,
              'aux': losses.init_aux_params(self.loss_name, self.model, jax.random.fold_in(rng, 1))}
    if self.with_prior:
      params['prior'] = policy
    return {'params': params}


def _optimizer(with_prior: bool) -> tuple[optax.GradientTransformation, Callable]:
  """`make_optimizer` in the gin scope `improve` (its lower learning rate); the prior is frozen.
  Returns (optimizer, its learning-rate schedule)."""
  with gin.config_scope('improve'):
    opt, schedule = trainer_lib.make_optimizer(with_schedule=True)
  if not with_prior:
    return opt, schedule
  labels = lambda params: {k: jax.tree.map(lambda _: 'frozen' if k == 'prior' else 'train', v)
                           for k, v in params.items()}
  return optax.multi_transform({'train': opt, 'frozen': optax.set_to_zero()}, labels), schedule


def records_to_arrays(records: Sequence[Mapping[str, Any]], inputs_length: int,
                      targets_length: int) -> dict[str, np.ndarray]:
  """Scored Grow records -> training features (`input_pipeline.pad_features`) + per-record fields.

  Returns:
    encoder_input_tokens [n, inputs_length] int32, decoder_{input,target}_tokens [n,
    targets_length] int32, decoder_loss_weights [n, targets_length] float32, reward [n] float32,
    source_index [n] int64. Ids longer than the feature lengths are cut (EOS kept last).
  """
  def cut(ids, n):
    ids = list(ids)
    return ids if len(ids) <= n else ids[:n - 1] + [ids[-1]]
  feats = input_pipeline.pad_features([cut(r['source_ids'], inputs_length) for r in records],
                                      [cut(r['candidate_ids'], targets_length) for r in records],
                                      inputs_length, targets_length)
  feats['reward'] = np.array([r['reward'] for r in records], np.float32)
  feats['source_index'] = np.array([r['source_index'] for r in records], np.int64)
  return feats


SELECTIONS = ('threshold', 'correct')


def _is_reference(records: Sequence[Mapping[str, Any]]) -> np.ndarray:
  return np.array([r.get('origin', 'sample') == 'reference' for r in records], bool)


def selection_mask(records: Sequence[Mapping[str, Any]], tau: float, mode: str,
                   origins: Sequence[str] = ORIGINS, selection: str = 'threshold',
                   max_per_source: int | None = 10, seed: int = 0) -> np.ndarray:
  """[n] bool: the records an Improve step trains on (see `select_training_data`).

  Raises:
    ValueError: an unknown origin or selection; a NaN reward, or a non-binary one with
      'correct' (from `filtering`).
  """
  bad = set(origins) - set(ORIGINS)
  if bad or not origins:
    raise ValueError(f'origins must be a non-empty subset of {ORIGINS}, got {tuple(origins)}')
  if selection not in SELECTIONS:
    raise ValueError(f'unknown selection {selection!r}; use one of {SELECTIONS}')
  rewards = np.array([r['reward'] for r in records], np.float32)
  sources = np.array([r['source_index'] for r in records], np.int64)
  is_ref = _is_reference(records)
  allowed = np.ones(len(records), bool)
  if 'reference' not in origins:
    allowed &= ~is_ref
  if 'sample' not in origins:
    allowed &= is_ref
  if selection == 'correct':
    return filtering.select_correct(np.where(allowed, rewards, 0.0), sources, max_per_source,
                                    seed=seed)
  return filtering.filter_records(rewards, sources, tau, mode) & allowed


def select_training_data(records: Sequence[Mapping[str, Any]], tau: float, mode: str,
                         inputs_length: int, targets_length: int, batch_size: int,
                         origins: Sequence[str] = ORIGINS, selection: str = 'threshold',
                         max_per_source: int | None = 10, seed: int = 0
                         ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The kept records of one Improve step as training arrays, and the filtering stats.

  selection 'threshold' (ReST): the threshold is applied to all records (references and samples
  together, as ReST's Grow dataset holds both); `origins` then restricts training to records of
  those origins ('reference': the original pairs, 'sample': the policy's Grow samples; a record
  without an `origin` field counts as a sample). `origins=('reference',)` is the
  continued-supervised-training control of `rest.compare_losses`.
  selection 'correct' (the ReST-EM E-step, Singh et al. 2023, sec. 3): of the records of
  `origins`, those with reward exactly 1 (a binary verifier's reward), at most `max_per_source`
  per source (`filtering.select_correct`, which ones drawn with `seed`); `tau` / `mode` unused.
  Identical samples of a source are one record already (Grow de-duplicates them).
  `source_baseline` (the mean reward of all of a source's records, before filtering) is added
  for the losses that need an advantage. Fewer kept records than one batch are tiled to fill it.

  Returns:
    (arrays as `records_to_arrays` plus `source_baseline` [k] float32, stats: `filter_stats`
    plus kept_references / kept_samples (after `origins`), tau, mode, origins, mean rewards).
  Raises:
    ValueError: no record passes the threshold, a NaN reward (from `filtering`), an unknown origin.
  """
  arrays = records_to_arrays(records, inputs_length, targets_length)
  rewards, sources = arrays['reward'], arrays['source_index']
  is_ref = _is_reference(records)
  keep = selection_mask(records, tau, mode, origins, selection, max_per_source, seed)
  stats = filtering.filter_stats(keep, sources)
  stats.update(tau=float(tau), mode=mode, origins=list(origins), selection=selection,
               max_per_source=max_per_source if selection == 'correct' else None,
               kept_references=int((keep & is_ref).sum()),
               kept_samples=int((keep & ~is_ref).sum()),
               mean_reward_kept=float(rewards[keep].mean()) if keep.any() else float('nan'),
               mean_reward_all=float(rewards.mean()))
  if not keep.any():
    if selection == 'correct':
      raise ValueError(f'no record of origin {tuple(origins)} is correct (reward 1) among '
                       f'{len(records)}: the policy solved no problem; sample more per problem')
    raise ValueError(f'no record of origin {tuple(origins)} has reward > tau = {tau} ({mode}); '
                     f'max reward {float(rewards.max()):.4f}: lower the threshold')
  arrays['source_baseline'] = filtering.source_baselines(rewards, sources)
  rows = np.flatnonzero(keep)
  if len(rows) < batch_size:
    rows = np.resize(rows, batch_size)
  out = {k: v[rows] for k, v in arrays.items() if k != 'source_index'}
  return out, stats


def resolve_prior_policy_dir(init_policy_dir: str, prior_policy_dir: str | None = None) -> str:
  """The frozen prior of the losses with a KL term (`bvmpo`): the BC policy of the Improve chain.

  `prior_policy_dir` if given (the ReST loop passes its `bc/`). Otherwise derived from
  `init_policy_dir`: a run without `improve_summary.json` (a BC / `rest-jax train` run) is the
  prior itself; an Improve step is followed back, through its recorded `prior_policy_dir` (set
  by steps that had a prior) or else its `init_policy_dir`, until such a run. So a standalone
  `rest-jax improve` from the previous Improve step regularises toward the BC policy the chain
  started from, as the loop does, and not toward the previous step (ReST: "KL to the BC policy").

  Returns:
    The prior's directory, absolute.
  Raises:
    ValueError: an Improve step in the chain names no existing start policy (e.g. a moved work
      directory) or the chain loops: set `improve.prior_policy_dir`.
  """
  if prior_policy_dir:
    return fileio.abspath(prior_policy_dir)
  d, seen = fileio.abspath(init_policy_dir), set()
  while fileio.exists(os.path.join(d, 'improve_summary.json')):
    seen.add(d)
    s = fileio.read_json(os.path.join(d, 'improve_summary.json'))
    recorded = fileio.relocate(s.get('prior_policy_dir'), s.get('model_dir'), d)
    nxt = recorded or fileio.relocate(s.get('init_policy_dir'), s.get('model_dir'), d)
    if not nxt or not fileio.isdir(nxt) or fileio.abspath(nxt) in seen:
      raise ValueError(f'cannot derive the BC prior from the Improve step {d}: its start policy '
                       f'{nxt!r} is missing; set improve.prior_policy_dir')
    if recorded:
      return fileio.abspath(recorded)
    d = fileio.abspath(nxt)
  return d


def dev_reward(model, params, dev: input_pipeline.TaskData, scorer, detokenize: Callable,
               max_decode_len: int = 128, batch_size: int = 64,
               decode_length_ratio: float | None = 2.0) -> dict[str, float]:
  """Greedy outputs for `dev`: mean reward of `scorer` (0-100; with a verifier: pass@1 in
  percent), sacreBLEU and chrF against the references."""
  ids = evaluation.predict_ids(model, params, dev.arrays['encoder_input_tokens'],
                               batch_size=batch_size, max_decode_len=max_decode_len,
                               decode_length_ratio=decode_length_ratio)
  src = [r[:int(n)] for r, n in zip(dev.arrays['encoder_input_tokens'],
                                    data_lib.lengths(dev.arrays['encoder_input_tokens']))]
  reward = scorer.score_ids([list(map(int, s)) for s in src], ids, references=dev.targets)
  m = evaluation.corpus_metrics([detokenize(i) for i in ids], dev.targets)
  return {'reward': 100.0 * float(np.mean(reward)), 'bleu': m['bleu'], 'chrf': m['chrf']}


@gin.configurable(denylist=['model_dir'])
def improve(model_dir: str,
            model=gin.REQUIRED,
            scored_dir: str = gin.REQUIRED,
            init_policy_dir: str = gin.REQUIRED,
            rm_dir: str | None = None,
            reward: str = 'rm',
            prior_policy_dir: str | None = None,
            task: str = 'libreoffice_help_de_en',
            tau: float = 0.0,
            threshold_mode: str = 'absolute',
            loss: str = 'bc',
            batch_size: int = 64,
            inputs_length: int = 128,
            targets_length: int = 128,
            num_steps: int = 300,
            max_minutes: float | None = None,
            eval_every_steps: int = 50,
            patience: int = 2,
            dev_examples: int = 200,
            max_decode_len: int = 128,
            decode_length_ratio: float | None = 2.0,
            kl_anneal: tuple[float, float] = (1.0, 1e-5),
            seed: int = 0,
            origins: Sequence[str] = ORIGINS,
            selection: str = 'threshold',
            max_per_source: int | None = 10,
            records: Sequence[Mapping[str, Any]] | None = None,
            scorer=None,
            initial_dev: Mapping[str, float] | None = None) -> dict[str, Any]:
  """One Improve step: filter at `tau`, fine-tune `init_policy_dir`'s policy, keep the best by RM.

  Args:
    model_dir: output (best/ = best policy params, checkpoints/, improve_summary.json).
    model: the policy's `EncoderDecoderModel` (gin: `MODEL`).
    scored_dir: a `rest-jax score` output (records with a normalised `reward` in [0, 1]).
    init_policy_dir: the previous policy (a BC run or the previous Improve step).
    rm_dir: the learned reward model for the dev reward (`rewards.model.load_reward_model`).
    reward: what measures the dev reward when no `scorer` is given: 'rm' (the model in
      `rm_dir`), a verifier ('verifier', 'verifier_steps': dev pass@1 in percent) or a metric
      against the references ('chrf+ter', ...).
    prior_policy_dir: the BC policy, for losses with a KL to it (`bvmpo`); default: derived from
      `init_policy_dir` (itself if a BC run, else the BC policy its Improve chain started from;
      `resolve_prior_policy_dir`).
    task: SeqIO task (dev split, vocabulary).
    tau, threshold_mode: this step's threshold, 'absolute' or 'percentile' (`filtering`).
    loss: a registered loss name (`losses.LOSSES`).
    batch_size: records per step.
    num_steps, max_minutes: budget of the step (optimizer steps, training minutes).
    eval_every_steps: dev reward period (steps); also at step 0 (the starting policy).
    patience: stop after this many evaluations without a new best dev reward.
    dev_examples: first dev pairs used for the dev reward.
    kl_anneal: (start, end) of the KL weight, annealed geometrically over this step's
      `num_steps`, restarting at every Improve step (`losses.kl_weight_schedule`).
    seed: data order and dropout seed.
    origins: the origins of the kept records that are trained on (`select_training_data`);
      ('reference',) trains on the kept original pairs only (a control, not ReST).
    selection: 'threshold' (ReST: reward > tau) or 'correct' (ReST-EM: reward 1, at most
      `max_per_source` per source; `select_training_data`).
    max_decode_len, decode_length_ratio: the dev decoding bound (`data.decode_length`; None:
      max_decode_len tokens for every source, as worked solutions need).
    records, scorer: in-memory scored records and reward scorer; default: read `scored_dir`,
      load `rm_dir`.
    initial_dev: the starting policy's dev metrics ('reward', 'bleu', 'chrf' on the same dev
      pairs), when the caller knows them (the ReST loop does): saves decoding dev once more.

  Returns:
    The summary (also `model_dir/improve_summary.json`): filtering stats, steps, minutes, the dev
    reward history, the best dev reward and its step, init_policy_dir and prior_policy_dir
    (absolute; None for a loss without a prior).

  Raises:
    ValueError: no record passes the threshold; NaN rewards; unknown loss; no derivable prior.
    trainer.NonFiniteLossError: a NaN / infinite loss (read every 10 steps) or non-finite params
      before an evaluation: that state is not saved; the message names the step and the last
      good checkpoint.
  """
  start = time.perf_counter()
  fileio.makedirs(model_dir)
  summary_path = os.path.join(model_dir, 'improve_summary.json')
  if fileio.exists(summary_path):
    summary = fileio.read_json(summary_path)
    if summary.get('complete'):
      logging.info('improve: %s is complete', model_dir)
      return summary
  fileio.write_text(os.path.join(model_dir, 'config.gin'), gin.config_str())
  if records is None:
    from rest_jax.rewards import scoring
    records = scoring.read_scored_records(scored_dir)
  detok = input_pipeline.detokenizer(task)
  input_pipeline.check_policy_vocab(init_policy_dir, task)
  if jax.process_index() == 0:
    input_pipeline.write_policy_vocab(model_dir, task)  # This step's policy is a policy too.
  if scorer is None:
    from rest_jax.rewards import scoring
    scorer = scoring.make_reward_scorer(reward, detok, rm_dir)
  arrays, stats = select_training_data(records, tau, threshold_mode, inputs_length,
                                       targets_length, batch_size, origins, selection,
                                       max_per_source, seed)
  logging.info('improve: tau %.2f (%s) keeps %d of %d records (%d references, %d samples), '
               '%d of %d sources', tau, threshold_mode, stats['kept_records'],
               stats['total_records'], stats['kept_references'], stats['kept_samples'],
               stats['distinct_sources'], stats['total_sources'])
  cache = fileio.local_cache_dir(fileio.parent(model_dir))
  dev = input_pipeline.cached_task_data(task, 'validation', inputs_length, targets_length, cache,
                                        max_examples=dev_examples)

  with_prior = losses.needs_prior(loss)
  prior_dir = resolve_prior_policy_dir(init_policy_dir, prior_policy_dir) if with_prior else None
  wrapped = ImproveModel(model, loss, with_prior)
  mesh = partitioning.create_mesh()
  optimizer, schedule = _optimizer(with_prior)
  t = trainer_lib.Trainer(wrapped, optimizer, mesh, seed=seed)
  shapes = {'encoder_input_tokens': (batch_size, inputs_length),
            'decoder_input_tokens': (batch_size, targets_length)}
  abstract = t.abstract_state(shapes).params
  policy = trainer_lib.restore_params(init_policy_dir, abstract['policy'])
  params = {'policy': policy,
            'aux': nn.meta.unbox(losses.init_aux_params(loss, model, jax.random.PRNGKey(seed)))}
  if with_prior:
    logging.info('improve: KL prior %s', prior_dir)
    params['prior'] = trainer_lib.restore_params(prior_dir, abstract['prior'])
  state = t.init_state(shapes, params=params)
  ckpt = trainer_lib.Checkpointer(model_dir, best_metric='dev_reward')
  guard = trainer_lib.LossGuard(model_dir, ckpt)
  restored = ckpt.restore_latest(state)
  history: list[dict] = []
  if restored is not None:
    state = restored
    if fileio.exists(summary_path):
      history = fileio.read_json(summary_path).get('history', [])
  step = int(jax.device_get(state.step))
  train_seconds = history[-1]['train_seconds'] if history else 0.0
  writer = summaries.metric_writer(model_dir)

  def policy_view(s):  # `save_best` stores `.params` only: the policy, in BC-run layout.
    return trainer_lib.TrainState(step=s.step, params=s.params['policy'], opt_state=None)

  def evaluate(s, known=None):
    guard.check(s)  # Before the state is evaluated and saved (best and latest checkpoints).
    m = dict(known) if known else dev_reward(model, s.params['policy'], dev, scorer, detok,
                                             max_decode_len,
                                             decode_length_ratio=decode_length_ratio)
    is_best = ckpt.save_best(policy_view(s), {'dev_reward': m['reward'], 'dev_bleu': m['bleu'],
                                              'dev_chrf': m['chrf']})
    entry = dict(m, step=int(jax.device_get(s.step)), train_seconds=train_seconds, best=is_best)
    history.append(entry)
    tqdm.write(f'[improve {os.path.basename(model_dir)} step {entry["step"]}] dev reward '
               f'{m["reward"]:.2f} BLEU {m["bleu"]:.2f} chrF {m["chrf"]:.2f}'
               + (' (best)' if is_best else ''))
    ckpt.save(s)
    fileio.write_json(summary_path, {'history': history, 'filter': stats})
    if writer:
      writer.write_scalars(entry['step'], {f'dev/{k}': m[k] for k in ('reward', 'bleu', 'chrf')})
      writer.flush()
    return entry

  def log_train(step, metrics, kl):
    if writer:
      writer.write_scalars(step, summaries.train_scalars(
          jax.device_get(metrics), summaries.last_learning_rate(schedule, step),
          **({'kl_weight': kl} if with_prior else {}),
          minutes=(train_seconds + time.perf_counter() - clock) / 60))

  if not history:
    evaluate(state, initial_dev)
  batcher = data_lib.ArrayBatcher(arrays, batch_size, seed=seed)
  rows = distributed.host_rows(batch_size, mesh)  # This host's rows of every global batch.
  start_kl, end_kl = kl_anneal
  bar = tqdm(total=num_steps, initial=step, desc=f'improve {os.path.basename(model_dir)}',
             unit='step', dynamic_ncols=True, mininterval=2.0)
  clock = time.perf_counter()
  metrics: dict = {}
  kl = start_kl
  stale = sum(1 for _ in _since_best(history))
  while step < num_steps and stale < patience:
    if max_minutes is not None and train_seconds >= max_minutes * 60:
      break
    batch = batcher.batch_at(step, rows)
    kl = losses.kl_weight_schedule(step, num_steps, start_kl, end_kl)
    batch['kl_weight'] = np.full((rows.stop - rows.start,), kl, np.float32)
    state, metrics = t.train_step(state, partitioning.shard_batch(batch, mesh))
    step += 1
    guard.add(step, metrics['loss'])
    evaluating = step % eval_every_steps == 0 or step == num_steps
    if step % 10 == 0:
      guard.check()
      bar.update(step - bar.n)
      bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
    if step % 10 == 0 or evaluating:
      log_train(step, metrics, kl)
    if evaluating:
      train_seconds += time.perf_counter() - clock
      evaluate(state)
      clock = time.perf_counter()
      stale = sum(1 for _ in _since_best(history))
  bar.close()
  if not history or history[-1]['step'] != step:
    if metrics:
      log_train(step, metrics, kl)
    train_seconds += time.perf_counter() - clock
    evaluate(state)
  best = max(history, key=lambda e: e['reward'])
  summary = dict(history=history, filter=stats, loss=loss, tau=float(tau), origins=list(origins),
                 selection=selection,
                 threshold_mode=threshold_mode, steps=step, train_seconds=train_seconds,
                 best_dev_reward=best['reward'], best_step=best['step'],
                 stopped_early=stale >= patience, init_policy_dir=fileio.abspath(init_policy_dir),
                 prior_policy_dir=prior_dir, model_dir=fileio.abspath(model_dir),
                 wall_seconds=time.perf_counter() - start, complete=True,
                 final_metrics={k: float(v) for k, v in jax.device_get(metrics).items()})
  fileio.write_json(summary_path, summary)
  if writer:
    writer.close()
  return summary


def _since_best(history):
  """The evaluations after the best one (the stale streak that early stopping counts)."""
  if not history:
    return []
  best = max(range(len(history)), key=lambda i: history[i]['reward'])
  return history[best + 1:]
