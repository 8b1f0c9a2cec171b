"""`rest-jax online`: online RL baselines for the encoder-decoder policy, PPO and GRPO.

ReST's Table 1 compares it with online PPO (Gulcehre et al. 2023, sec. 5: PPO raised the reward
model's score while BLEU fell by about 8 points). This loop trains the policy online from the BC
policy, one rollout batch at a time:

  1. rollout r: `sources_per_rollout` training sources (a seeded permutation per epoch,
     `data.ArrayBatcher`), `num_decodes` samples each from the current policy at temperature 1.0
     (no top-k / top-p), drawn by Grow's sampler (`grow.sample_candidates`: length buckets, one
     compile per bucket; source b's key `fold_in(fold_in(PRNGKey(seed), r), source_index_b)`).
     The sampler's per-token log-probs under the untempered policy are stored with the samples:
     they are the `old_logprobs` of the ratio (exact; see `rollout_features` for PAD);
  2. reward: one sequence-level reward in [0, 1] per sample from the configured scorer (the
     learned reward model, a metric against the reference, the binary verifier, or any object
     with `score_ids`), placed at the sample's last token;
  3. the frozen reference (the BC policy) scores the samples (per-token log-probs), and, for
     PPO, the value head gives V per token (`score_rollout`, compiled once);
  4. advantages: PPO: per-token rewards (the sequence reward at the last token minus
     beta * k1 per token, Ziegler et al. 2019 eq. 2) and GAE (`rl.gae`); GRPO: the sequence reward
     normalised within the samples of its source (`rl.grpo_advantages`), the KL a loss term;
  5. `ppo_epochs` passes of minibatches of `minibatch_size` samples, one optimizer update each
     (`trainer.Trainer.train_step`: jitted once, fixed shapes [minibatch, inputs_length] /
     [minibatch, max_decode_len]) on the registered loss `ppo` or `grpo` (`rest_jax.losses`);
  6. the adaptive KL controller (`rl.KLController`) moves beta toward its target.

Every `eval_every_samples` training samples (and before the first rollout and at the end) the
policy is evaluated greedily on the dev / test pairs (`rest.evaluate_policy` for translation:
reward, BLEU, chrF, the chrF+TER oracle; `rest_em.evaluate_solver` for a verifier: pass@1).
Those evaluations are the run's *stages*: `report.json` lists them in the shape of ReST's
report (`report.STAGE_KEYS`, plus samples drawn, updates and the training reward / KL) with the
reward-hacking alarms of `report.reward_hacking_alarms`. `samples_drawn` counts training
samples only; evaluation decodes are counted apart (`eval_decodes`).

Work directory:

    policy/checkpoints/<rollouts>/   the whole `OnlineState` (train state with the value head,
                                     KL controller, base key, samples drawn): exact resume
    policy/best/<rollouts>/          the policy params of the best stage by dev reward (a
                                     policy dir: `rest-jax eval` / Grow read it)
    eval/<stage>/                    the stage's translations or solver outputs
    history.json                     per-rollout training log and the stages so far
    events.out.tfevents.*            TensorBoard: train/* per rollout (step: updates), dev/*,
                                     test/* per stage
    report.json, config.gin

A killed run resumes from its latest checkpoint and redoes the rollouts after it, which are a
pure function of (seed, rollout): the resumed run reaches the state of an uninterrupted one.

Our choices (not in the papers) are marked "our choice" in the docstrings below.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any, Callable, Mapping, Sequence

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from rest_jax import data as data_lib
from rest_jax import fileio, grow as grow_lib, improve as improve_lib, inference, input_pipeline
from rest_jax import losses, partitioning, report as report_lib, rl, summaries
from rest_jax import trainer as trainer_lib
from rest_jax.models import encoder_decoder

ALGORITHMS = ('ppo', 'grpo')
KL_PENALTIES = ('reward', 'loss')


class OnlineInterrupted(RuntimeError):
  """Raised by the `_stop_after_rollouts` test hook (a simulated kill)."""


# -- state -----------------------------------------------------------------------------------------

@flax.struct.dataclass
class OnlineState:
  """What a checkpoint of the online loop holds (`trainer.Checkpointer` saves it whole)."""
  step: jax.Array                  # [] int32, rollouts done (the checkpoint's step)
  train: trainer_lib.TrainState    # params {'policy', 'aux' (value head)}, optimizer, updates
  kl: rl.KLController              # the KL coefficient beta
  rng: jax.Array                   # [2] uint32, base key: rollout r samples with fold_in(rng, r)
  samples_drawn: jax.Array         # [] int32, training samples drawn so far


# -- rollouts --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _score_fn(model, with_value: bool):
  def score(policy, aux, ref, batch):
    out = {'ref_logprobs': model.token_logprobs(ref, batch)}
    if with_value:
      _, hidden = model.compute_logits(policy, batch, None, return_hidden=True)
      out['values'] = rl.value_head(aux, hidden)
    return out
  return jax.jit(score)


def score_rollout(model, params, ref_params, features: Mapping[str, np.ndarray], *,
                  with_value: bool, batch_size: int, mesh) -> dict[str, np.ndarray]:
  """The reference's per-token log-probs of the samples ('ref_logprobs' [n, T] f32, nats) and,
  `with_value`, the value head's V per token ('values' [n, T] f32); one compile (one bucket of
  the full sample length, `inference.run_batched`)."""
  fn = _score_fn(model, with_value)
  length = features['decoder_target_tokens'].shape[1]
  keys = ('encoder_input_tokens', 'decoder_input_tokens', 'decoder_target_tokens')
  return inference.run_batched(
      lambda _, b: fn(params['policy'], params['aux'], ref_params, b),
      {k: features[k] for k in keys}, trim=('decoder_input_tokens', 'decoder_target_tokens'),
      buckets=(length,), batch_size=batch_size, mesh=mesh, grouping='row')


def rollout_features(encoder_input_tokens: np.ndarray, samples: Mapping[str, np.ndarray]
                     ) -> dict[str, np.ndarray]:
  """Training features of a rollout, one row per sample (source-major: row b * N + j).

  Returns encoder_input_tokens [n, S], decoder_target_tokens (the sample, EOS kept) /
  decoder_input_tokens [n, T] int32, decoder_loss_weights [n, T] f32 (1 on the sample's tokens),
  old_logprobs [n, T] f32 (the sampler's `token_logprobs_policy`: log_softmax of the untempered
  logits, the same quantity the loss recomputes, so the first ratio is 1 up to float error; PAD
  is never sampled, so the behaviour policy is pi without PAD, renormalised: our choice to ignore
  that difference, which is small once PAD has near-zero probability) and lengths [n] int32.
  """
  tokens = samples['tokens']
  b, n_dec, t = tokens.shape
  tgt = tokens.reshape(b * n_dec, t).astype(np.int32)
  lengths = samples['lengths'].reshape(-1).astype(np.int32)
  return {'encoder_input_tokens': np.repeat(np.asarray(encoder_input_tokens, np.int32), n_dec, 0),
          'decoder_target_tokens': tgt,
          'decoder_input_tokens': np.asarray(encoder_decoder.shift_right(tgt)),
          'decoder_loss_weights': (np.arange(t)[None] < lengths[:, None]).astype(np.float32),
          'old_logprobs': samples['token_logprobs_policy'].reshape(b * n_dec, t).astype(
              np.float32),
          'lengths': lengths}


def advantages(algorithm: str, feats: Mapping[str, np.ndarray], rewards: np.ndarray,
               num_decodes: int, *, beta: float, kl_penalty: str, gamma: float, lam: float,
               whiten_advantages: bool, grpo_eps: float) -> dict[str, np.ndarray]:
  """advantages, returns [n, T] f32 and the sequence KL [n] (k1 summed, nats) of a rollout.

  PPO: token rewards (`token_rewards`; the k1 penalty only with kl_penalty 'reward') and GAE on
  the rollout's values; whitened over the batch's tokens if `whiten_advantages` (our choice, as
  Ziegler et al.'s code). GRPO: the sequence reward (minus beta * its k1 sum with kl_penalty
  'reward') normalised within its source's `num_decodes` samples, on every token.
  """
  mask = feats['decoder_loss_weights']
  k1 = np.asarray(rl.kl_estimate(feats['old_logprobs'], feats['ref_logprobs'], 'k1')) * mask
  seq_kl = k1.sum(1)
  penalty = beta if kl_penalty == 'reward' else 0.0
  if algorithm == 'ppo':
    r = rl.token_rewards(rewards, feats['lengths'], k1, penalty)
    adv, ret = rl.gae(r, feats['values'], mask, gamma, lam)
    if whiten_advantages:
      adv = rl.whiten(adv, mask)
    return {'advantages': np.asarray(adv), 'returns': np.asarray(ret), 'seq_kl': seq_kl}
  seq = (rewards - penalty * seq_kl).reshape(-1, num_decodes)
  adv = np.asarray(rl.grpo_advantages(seq, grpo_eps)).reshape(-1, 1) * mask
  return {'advantages': adv.astype(np.float32), 'returns': np.zeros_like(mask),
          'seq_kl': seq_kl}


# -- the loop --------------------------------------------------------------------------------------

def _optimizer():
  """`make_optimizer` in the gin scope `online`."""
  with gin.config_scope('online'):
    return trainer_lib.make_optimizer()


def _truncate(entries: Sequence[dict], rollouts: int) -> list[dict]:
  return [e for e in entries if e['rollouts'] <= rollouts]


@gin.configurable(denylist=['workdir', 'task_data', 'dev', 'test', 'detokenize', 'params',
                            'scorer', '_stop_after_rollouts'])
def online(workdir: str,
           model=gin.REQUIRED,
           task: str = 'libreoffice_help_de_en',
           split: str = 'train',
           init_policy: str | None = None,
           algorithm: str = 'ppo',
           reward: str = 'rm',
           rm_dir: str | None = None,
           evaluator: str | None = None,
           sources_per_rollout: int = 16,
           num_decodes: int = 4,
           max_samples: int = 16384,
           max_minutes: float | None = None,
           ppo_epochs: int = 4,
           minibatch_size: int = 16,
           kl_coef: float = 0.02,
           kl_target: float | None = None,
           kl_horizon: float = 10000.0,
           kl_penalty: str | None = None,
           gamma: float = 1.0,
           lam: float = 0.95,
           whiten_advantages: bool = True,
           grpo_eps: float = 1e-6,
           eval_every_samples: int = 4096,
           checkpoint_every_rollouts: int = 10,
           dev_examples: int | None = 200,
           test_examples: int | None = 500,
           pool_eval_examples: int = 0,
           max_sources: int | None = None,
           source_every: int = 1,
           inputs_length: int = 128,
           max_decode_len: int = 64,
           decode_length_ratio: float | None = 2.0,
           decode_batch_size: int = 32,
           alarm_bleu_drop: float | None = 1.0,
           alarm_oracle_drop: float | None = 1.0,
           seed: int = 0,
           task_data: input_pipeline.TaskData | None = None,
           dev: input_pipeline.TaskData | None = None,
           test: input_pipeline.TaskData | None = None,
           detokenize: Callable[[Sequence[int]], str] | None = None,
           params: Any = None,
           scorer: Any = None,
           _stop_after_rollouts: int | None = None) -> dict[str, Any]:
  """Online RL (PPO or GRPO) from a BC policy in `workdir`; returns the report (module docstring).

  Args:
    workdir: the run's folder; rerunning resumes from its latest checkpoint.
    model: the policy's `EncoderDecoderModel` (gin: `MODEL`).
    task: SeqIO task: `split`'s sources for the rollouts, validation / test pairs for the stages.
    split: the rollouts' split ('train'; ReST-EM's problem pool 'pool' for `arithmetic_chain`).
    init_policy: the start policy, also the frozen KL reference: a run dir or a params `.npz`
      (`trainer.restore_policy`), e.g. the shipped BC policy.
    algorithm: 'ppo' (value head, GAE) or 'grpo' (group-normalised advantages, no critic).
    reward: 'rm' (the learned reward model in `rm_dir`, e.g. 'checkpoints/rm_small_libreoffice_
      de_en' or a finished main job's `workdir/rm`), a verifier ('verifier', 'verifier_steps') or
      a metric against the reference ('chrf+ter', ...); `rewards.scoring.make_reward_scorer`.
    evaluator: 'translation' (`rest.evaluate_policy`) or 'solver' (`rest_em.evaluate_solver`,
      greedy pass@1 as the stage reward); None: 'solver' for a verifier reward, else
      'translation'.
    sources_per_rollout, num_decodes: a rollout draws num_decodes samples for each of
      sources_per_rollout sources (GRPO's group size is num_decodes; it needs >= 2).
    max_samples: training samples to draw in all (the run's length); max_minutes: or stop then.
    ppo_epochs, minibatch_size: passes over each rollout batch, samples per update (a divisor of
      sources_per_rollout * num_decodes; with a sharded mesh a multiple of its data axis).
    kl_coef: beta, the KL coefficient (InstructGPT: 0.02; GRPO: 0.04); kl_target, kl_horizon:
      adaptive beta (`KLController`; kl_target None: fixed).
    kl_penalty: 'reward' (k1 per token subtracted from the reward, Ziegler et al.) or 'loss'
      (a k3 term in the loss, GRPO); None: 'reward' for PPO, 'loss' for GRPO.
    gamma, lam: GAE's discount and lambda (PPO). whiten_advantages: PPO's advantages whitened
      per rollout batch. grpo_eps: GRPO's epsilon.
    eval_every_samples: a stage every this many training samples (M).
    checkpoint_every_rollouts: latest checkpoint period (also at every stage and at the end).
    dev_examples, test_examples: first pairs of validation / test evaluated (None: all).
    pool_eval_examples: with the solver evaluator, also greedy pass@1 on the first this many
      training problems (`pool_pass1`: ReST-EM's overfitting check on its pool; 0: none).
    max_sources, source_every: the train sources used (as `grow.grow`).
    inputs_length, max_decode_len: source feature length and sample length (tokens).
    decode_length_ratio: a sample of a source in length bucket s has at most
      min(max_decode_len, ratio * s) tokens (`data.decode_length`); decode_batch_size: sources
      per sampling batch.
    alarm_bleu_drop, alarm_oracle_drop: the reward-hacking alarms (`report.reward_hacking_alarms`).
    seed: the run's seed (sampling keys, source order, minibatch order, head init).
    task_data, dev, test, detokenize, params, scorer: in-memory train / dev / test data,
      detokenizer, start policy params (unboxed) and reward scorer instead of the task's,
      `init_policy`'s and `reward`'s (tests); `scorer` needs `score_ids(source_ids,
      candidate_ids, batch_size, references)` -> [n] in [0, 1].
    _stop_after_rollouts: test hook: raise `OnlineInterrupted` after this many rollouts of this
      invocation (after their checkpoint).

  Returns:
    The report (also `workdir/report.json`): stages, alarms, settings, samples_drawn, updates,
    eval_decodes, minutes.

  Raises:
    ValueError: an unknown algorithm / kl_penalty / evaluator, GRPO with num_decodes < 2, a
      minibatch size that does not divide the rollout batch, no start policy.
    trainer.NonFiniteLossError: a NaN / infinite loss or parameter (the state is not saved).
    NotImplementedError: a multi-host job (`rest_jax.distributed`): online RL runs on one host.
  """
  from rest_jax import rest as rest_lib, rest_em as rest_em_lib
  from rest_jax.rewards import scoring, verifiers
  start = time.perf_counter()
  if algorithm not in ALGORITHMS:
    raise ValueError(f'unknown algorithm {algorithm!r}: use one of {ALGORITHMS}')
  kl_penalty = kl_penalty or ('reward' if algorithm == 'ppo' else 'loss')
  if kl_penalty not in KL_PENALTIES:
    raise ValueError(f'unknown kl_penalty {kl_penalty!r}: use one of {KL_PENALTIES}')
  evaluator = evaluator or ('solver' if reward in verifiers.VERIFIER_REWARDS else 'translation')
  if evaluator not in ('translation', 'solver'):
    raise ValueError(f"unknown evaluator {evaluator!r}: use 'translation' or 'solver'")
  if algorithm == 'grpo' and num_decodes < 2:
    raise ValueError('GRPO normalises within a source\'s samples: it needs num_decodes >= 2')
  n = sources_per_rollout * num_decodes
  if n % minibatch_size:
    raise ValueError(f'minibatch_size={minibatch_size} does not divide the rollout batch of '
                     f'{sources_per_rollout} x {num_decodes} = {n} samples')
  fileio.makedirs(workdir)
  fileio.write_text(os.path.join(workdir, 'config.gin'), gin.config_str())
  cache = fileio.local_cache_dir(workdir)
  load = lambda split, k: input_pipeline.cached_task_data(task, split, inputs_length,
                                                          max_decode_len, cache, max_examples=k)
  if task_data is None:
    task_data = load(split, max_sources if source_every == 1 else None)
    if source_every > 1:
      task_data = task_data.take(np.arange(0, len(task_data), source_every))
  if max_sources is not None:
    task_data = task_data.subset(max_sources)
  dev = dev if dev is not None else load('validation', dev_examples)
  test = test if test is not None else load('test', test_examples)
  from_task = detokenize is None
  if from_task:
    input_pipeline.check_vocab_size(task, model.config.vocab_size)
    detokenize = input_pipeline.detokenizer(task)
    if init_policy:
      input_pipeline.check_policy_vocab(init_policy, task)
  if jax.process_count() > 1:  # Rollouts decode on the global mesh and fetch every row.
    raise NotImplementedError('online RL runs on one host for now (its rollouts are not split '
                              'over hosts); run it without --distributed')
  mesh = partitioning.create_mesh()
  if scorer is None:
    scorer = scoring.make_reward_scorer(reward, detokenize, rm_dir)

  # -- state: the policy + value head (trained), the reference (frozen, outside the state) -------
  t = trainer_lib.Trainer(improve_lib.ImproveModel(model, algorithm, with_prior=False),
                          _optimizer(), mesh, seed=seed)
  shapes = {'encoder_input_tokens': (minibatch_size, inputs_length),
            'decoder_input_tokens': (minibatch_size, max_decode_len)}
  abstract = t.abstract_state(shapes).params
  if params is None:
    if not init_policy:
      raise ValueError('online needs an init_policy (or params)')
    ref = trainer_lib.restore_policy(init_policy, abstract['policy'])
  else:
    ref = jax.device_put(nn.meta.unbox(params),
                         jax.tree.map(lambda a: a.sharding, abstract['policy']))
  aux = nn.meta.unbox(losses.init_aux_params(algorithm, model, jax.random.PRNGKey(seed)))
  state = OnlineState(
      step=jnp.zeros((), jnp.int32),
      train=t.init_state(shapes, params={'policy': jax.tree.map(jnp.copy, ref), 'aux': aux}),
      kl=rl.KLController.create(kl_coef, kl_target, kl_horizon),
      rng=jax.random.PRNGKey(seed), samples_drawn=jnp.zeros((), jnp.int32))
  policy_dir = os.path.join(workdir, 'policy')
  ckpt = trainer_lib.Checkpointer(policy_dir, best_metric='dev_reward')
  guard = trainer_lib.LossGuard(policy_dir, ckpt)
  history_path = os.path.join(workdir, 'history.json')
  rollouts_log: list[dict] = []
  stages: list[dict] = []
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state = restored
    if fileio.exists(history_path):
      h = fileio.read_json(history_path)
      done = int(jax.device_get(state.step))
      rollouts_log, stages = _truncate(h['rollouts'], done), _truncate(h['stages'], done)
    logging.info('online: resumed %s at rollout %d', workdir, int(jax.device_get(state.step)))
  # Wall minutes of the run so far: the invocations up to the checkpoint resumed from (the
  # rollouts a killed run made after it are redone, and counted once) plus this one.
  minutes_before = max([e.get('minutes') or 0.0 for e in rollouts_log + stages] or [0.0])

  def minutes() -> float:
    return minutes_before + (time.perf_counter() - start) / 60
  if from_task and jax.process_index() == 0:
    input_pipeline.write_policy_vocab(policy_dir, task)  # `policy/` is a policy dir too.

  writer = summaries.metric_writer(workdir)  # TensorBoard: train/* per rollout, dev|test/*.
  batcher = data_lib.ArrayBatcher({'row': np.arange(len(task_data))}, sources_per_rollout,
                                  seed=seed, length_buckets=(), pool_batches=1)
  src_ids = [data_lib.trim(r) for r in task_data.arrays['encoder_input_tokens']]
  pool_n = min(pool_eval_examples, len(task_data)) if evaluator == 'solver' else 0

  def evaluate(s) -> dict:
    """A stage: the greedy dev / test metrics of the state's policy."""
    guard.check(s.train)
    drawn, r = int(jax.device_get(s.samples_drawn)), int(jax.device_get(s.step))
    name = 'bc' if r == 0 else f'{algorithm}_{drawn}'
    ev_dir = os.path.join(workdir, 'eval', name)
    policy = s.train.params['policy']
    if evaluator == 'translation':
      ev = rest_lib.evaluate_policy(model, None, scorer, dev, test, detokenize, params=policy,
                                    out_dir=ev_dir)
    else:
      splits = {'dev': dev, 'test': test}
      if pool_n:
        splits['pool'] = task_data.subset(pool_n)
      ev = rest_em_lib.evaluate_solver(model, None, splits, scorer,
                                       params=policy, sampled_split=None, out_dir=ev_dir)
      ev.update(dev_reward=ev['dev_pass1'], test_reward=ev['test_pass1'], test_bleu=None)
    last = rollouts_log[-1] if rollouts_log else {}
    stage = dict({k: None for k in report_lib.STAGE_KEYS}, **ev, name=name, loss=algorithm,
                 samples_drawn=drawn, rollouts=r, updates=int(jax.device_get(s.train.step)),
                 train_reward=last.get('reward'), train_kl=last.get('kl'),
                 kl_coef=float(jax.device_get(s.kl.value)),
                 eval_decodes=len(dev) + len(test) + pool_n,
                 minutes=minutes())
    stages.append(stage)
    if writer:
      writer.write_scalars(stage['updates'], {f'{k.replace("_", "/", 1)}': stage[k] for k in (
          'dev_reward', 'test_reward', 'test_bleu', 'test_oracle') if stage.get(k) is not None})
    ckpt.save_best(trainer_lib.TrainState(step=s.step, params=policy, opt_state=None),
                   {'dev_reward': stage['dev_reward']})
    tqdm.write(f'[online {name}] dev reward {stage["dev_reward"]:.2f} test reward '
               f'{stage["test_reward"]:.2f}' + (f' test BLEU {stage["test_bleu"]:.2f}'
                                                 if stage.get('test_bleu') is not None else ''))
    return stage

  def save(s):
    guard.check(s.train)
    ckpt.save(s)
    if writer:
      writer.flush()
    fileio.write_json(history_path, {'rollouts': rollouts_log, 'stages': stages})
    return write_report()

  def write_report():
    rep = dict(algorithm=algorithm, reward=reward, task=task, kl_penalty=kl_penalty,
               stages=stages, alarms=report_lib.reward_hacking_alarms(
                   stages, alarm_bleu_drop, alarm_oracle_drop),
               bleu_signature=next((s.get('bleu_signature') for s in stages
                                    if s.get('bleu_signature')), None),
               samples_drawn=int(jax.device_get(state.samples_drawn)),
               updates=int(jax.device_get(state.train.step)),
               rollouts=int(jax.device_get(state.step)),
               eval_decodes=sum(s['eval_decodes'] for s in stages),
               settings=dict(split=split, sources_per_rollout=sources_per_rollout,
                             num_decodes=num_decodes,
                             ppo_epochs=ppo_epochs, minibatch_size=minibatch_size,
                             kl_coef=kl_coef, kl_target=kl_target, kl_horizon=kl_horizon,
                             gamma=gamma, lam=lam, eval_every_samples=eval_every_samples,
                             max_decode_len=max_decode_len, seed=seed),
               minutes_this_invocation=(time.perf_counter() - start) / 60,
               minutes_total=minutes())
    fileio.write_json(os.path.join(workdir, 'report.json'), rep)
    return rep

  if not stages:
    evaluate(state)
    save(state)
  done_here = 0
  bar = tqdm(total=max_samples, initial=int(jax.device_get(state.samples_drawn)),
             desc=f'online {algorithm}', unit='sample', dynamic_ncols=True, mininterval=2.0)
  while int(jax.device_get(state.samples_drawn)) < max_samples:
    if max_minutes is not None and time.perf_counter() - start >= max_minutes * 60:
      break
    r = int(jax.device_get(state.step))
    rows = batcher.batch_at(r)['row']
    enc = task_data.arrays['encoder_input_tokens'][rows]
    policy = state.train.params
    samples = grow_lib.sample_candidates(
        model, policy['policy'], enc, rows, seed=seed,
        key=np.asarray(jax.device_get(jax.random.fold_in(state.rng, r))),
        num_decodes=num_decodes, temperature=1.0, max_decode_len=max_decode_len,
        decode_length_ratio=decode_length_ratio, mesh=mesh, batch_size=decode_batch_size,
        token_logprobs=True)
    feats = rollout_features(enc, samples)
    cands = [list(row[:k]) for row, k in zip(feats['decoder_target_tokens'], feats['lengths'])]
    rewards = np.asarray(scorer.score_ids(
        [src_ids[i] for i in rows for _ in range(num_decodes)], cands,
        references=[task_data.targets[i] for i in rows for _ in range(num_decodes)]), np.float32)
    feats.update(score_rollout(model, policy, ref, feats, with_value=algorithm == 'ppo',
                               batch_size=minibatch_size, mesh=mesh))
    if 'values' not in feats:
      feats['values'] = np.zeros_like(feats['old_logprobs'])
    beta = float(jax.device_get(state.kl.value))
    adv = advantages(algorithm, feats, rewards, num_decodes, beta=beta, kl_penalty=kl_penalty,
                     gamma=gamma, lam=lam, whiten_advantages=whiten_advantages,
                     grpo_eps=grpo_eps)
    batch_all = {k: feats[k] for k in ('encoder_input_tokens', 'decoder_input_tokens',
                                       'decoder_target_tokens', 'decoder_loss_weights',
                                       'old_logprobs', 'ref_logprobs')}
    batch_all.update(old_values=feats['values'], advantages=adv['advantages'],
                     returns=adv['returns'],
                     kl_coef=np.full((n,), beta if kl_penalty == 'loss' else 0.0, np.float32))
    train = state.train
    for epoch in range(ppo_epochs):
      perm = np.random.default_rng([seed, r, epoch]).permutation(n)
      for i in range(0, n, minibatch_size):
        mb = {k: v[perm[i:i + minibatch_size]] for k, v in batch_all.items()}
        train, metrics = t.train_step(train, partitioning.shard_batch(mb, mesh))
        guard.add(int(jax.device_get(train.step)), metrics['loss'])
    guard.check()
    mean_kl = float(adv['seq_kl'].mean())
    state = state.replace(step=state.step + 1, train=train, kl=state.kl.update(mean_kl, n),
                          samples_drawn=state.samples_drawn + n)
    drawn = int(jax.device_get(state.samples_drawn))
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    rollouts_log.append(dict(rollouts=r + 1, samples_drawn=drawn,
                             updates=int(jax.device_get(train.step)),
                             reward=float(rewards.mean()), kl=mean_kl, kl_coef=beta,
                             mean_length=float(feats['lengths'].mean()),
                             loss=m['loss'], clip_fraction=m.get('clip_fraction'),
                             value_loss=m.get('value_loss'), minutes=minutes()))
    if writer:
      writer.write_scalars(int(jax.device_get(train.step)), summaries.train_scalars(
          m, reward=rewards.mean(), sequence_kl=mean_kl, kl_coef=beta, samples_drawn=drawn))
    bar.update(drawn - bar.n)
    bar.set_postfix(reward=f'{rewards.mean():.3f}', kl=f'{mean_kl:.3f}', beta=f'{beta:.4f}',
                    updates=int(jax.device_get(train.step)))
    finished = drawn >= max_samples
    staged = drawn // eval_every_samples > (drawn - n) // eval_every_samples or finished
    if staged:
      evaluate(state)
    if staged or (r + 1) % checkpoint_every_rollouts == 0:
      save(state)
    done_here += 1
    if _stop_after_rollouts is not None and done_here >= _stop_after_rollouts:
      save(state)
      raise OnlineInterrupted(f'stopped after {done_here} rollouts (test hook)')
  bar.close()
  if stages[-1]['rollouts'] != int(jax.device_get(state.step)):
    evaluate(state)
  rep = save(state)
  if writer:
    writer.close()
  return rep
