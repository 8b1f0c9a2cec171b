"""Online RL (`rest_jax.rl`, the `ppo` / `grpo` losses, `rest_jax.online`): the clipped surrogate,
GAE, the KL estimators and controller, GRPO's advantages against hand computations; the stored
rollout log-probs equal the teacher-forced ones (the ratio is exact); a tiny policy learns a toy
reward online, and a killed run resumes to the uninterrupted run's state."""

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rest_jax import grow as grow_lib, input_pipeline, losses, online, partitioning, rl
from rest_jax.models import EncoderDecoderModel, Transformer, TransformerConfig, unbox

jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


# -- pure functions against hand computations ------------------------------------------------------

def test_clipped_surrogate_by_hand():
  # Token (0, 0): ratio e^0.5 = 1.649 > 1.2, A = 1 -> clipped: 1.2. Token (0, 1): ratio
  # e^-0.5 = 0.607, A = 1 -> min(0.607, 0.8) = 0.607 (unclipped side). Token (1, 0): ratio
  # e^0.1 = 1.105, A = -2 -> min(-2.210, -2.210) = -2.210. Token (1, 1): ratio e^-0.5, A = -1 ->
  # min(-0.607, -0.8) = -0.8 (clipped). Token (1, 2): weight 0.
  logp = jnp.array([[0.5, -0.5, 0.0], [0.1, -0.5, 7.0]])
  old = jnp.zeros((2, 3))
  adv = jnp.array([[1.0, 1.0, 0.0], [-2.0, -1.0, 5.0]])
  w = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
  loss, m = rl.ppo_policy_loss(logp, old, adv, w, clip_eps=0.2)
  want = -(1.2 + math.exp(-0.5) - 2 * math.exp(0.1) - 0.8) / 4
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(m['clip_fraction'], 3 / 4)  # (0,0), (0,1), (1,1) are outside.
  np.testing.assert_allclose(m['approx_kl'], -(0.5 - 0.5 + 0.1 - 0.5) / 4, rtol=1e-6)
  # The gradient flows through the unclipped tokens only: d/dlogp of -ratio*A/4 at (0, 1), (1, 0).
  g = jax.grad(lambda lp: rl.ppo_policy_loss(lp, old, adv, w, 0.2)[0])(logp)
  np.testing.assert_allclose(g, [[0.0, -math.exp(-0.5) / 4, 0.0],
                                 [2 * math.exp(0.1) / 4, 0.0, 0.0]], rtol=1e-6)


def test_value_loss_by_hand():
  v = jnp.array([[1.0, 0.0]])
  old = jnp.array([[0.5, 0.0]])
  ret = jnp.array([[2.0, 1.0]])
  w = jnp.ones((1, 2))
  np.testing.assert_allclose(rl.value_loss(v, old, ret, w), 0.5 * (1.0 + 1.0) / 2)
  # Clipped at 0.2: token 0's V_clip = 0.7, error max(1, 1.69) = 1.69; token 1 unchanged.
  np.testing.assert_allclose(rl.value_loss(v, old, ret, w, 0.2), 0.5 * (1.69 + 1.0) / 2,
                             rtol=1e-6)


def test_gae_by_hand():
  rewards = np.array([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
  values = np.array([[0.5, 0.2, 0.1], [0.3, 0.3, 9.0]])  # 9.0 is past row 1's end: ignored.
  mask = np.array([[1, 1, 1], [1, 1, 0]])
  adv, ret = rl.gae(rewards, values, mask, gamma=0.9, lam=0.8)
  # Row 0: deltas 0 + .9*.2 - .5 = -.32, 0 + .9*.1 - .2 = -.11, 1 - .1 = .9 (V = 0 after the end);
  # A_2 = .9, A_1 = -.11 + .72 * .9 = .538, A_0 = -.32 + .72 * .538 = .06736.
  # Row 1: deltas .9*.3 - .3 = -.03, 2 - .3 = 1.7; A_1 = 1.7, A_0 = -.03 + .72 * 1.7 = 1.194.
  np.testing.assert_allclose(adv, [[0.06736, 0.538, 0.9], [1.194, 1.7, 0.0]], rtol=1e-5)
  np.testing.assert_allclose(ret, [[0.56736, 0.738, 1.0], [1.494, 2.0, 0.0]], rtol=1e-5)
  # gamma = lam = 1 with zero values: every advantage is the sum of the rewards still to come.
  adv, _ = rl.gae(rewards, np.zeros_like(values), mask, 1.0, 1.0)
  np.testing.assert_allclose(adv, [[1, 1, 1], [2, 2, 0]])


def test_kl_estimators_and_penalty_by_hand():
  logp = jnp.array([[-1.0, -2.0]])
  ref = jnp.array([[-1.5, -1.0]])
  np.testing.assert_allclose(rl.kl_estimate(logp, ref, 'k1'), [[0.5, -1.0]])
  # k3 with d = ref - logp = (-0.5, 1): e^d - d - 1.
  np.testing.assert_allclose(rl.kl_estimate(logp, ref, 'k3'),
                             [[math.exp(-0.5) - 0.5, math.e - 2.0]], rtol=1e-6)
  for est in rl.KL_ESTIMATORS:
    assert np.all(np.asarray(rl.kl_estimate(logp, logp, est)) == 0.0)
  with pytest.raises(ValueError, match='unknown KL estimator'):
    rl.kl_estimate(logp, ref, 'k2')
  # The per-token reward: -beta * k1 on the sample's tokens, the sequence reward at its last one.
  r = rl.token_rewards(np.array([1.0, 0.5]), np.array([2, 3]),
                       np.array([[0.5, -1.0, 0.3], [0.1, 0.2, 0.4]]), beta=0.1)
  np.testing.assert_allclose(r, [[-0.05, 0.1 + 1.0, 0.0], [-0.01, -0.02, -0.04 + 0.5]],
                             rtol=1e-6)


def test_kl_controller_by_hand():
  fixed = rl.KLController.create(0.05)
  assert float(fixed.update(100.0, 64).value) == np.float32(0.05)
  c = rl.KLController.create(0.1, target=6.0, horizon=100.0)
  # KL 12 = 2x the target: error clipped to +0.2; beta * (1 + 0.2 * 10 / 100).
  np.testing.assert_allclose(c.update(12.0, 10).value, 0.1 * 1.02, rtol=1e-6)
  # KL 4.5: error 4.5 / 6 - 1 = -0.25 -> -0.2; KL 5.4: -0.1.
  np.testing.assert_allclose(c.update(4.5, 50).value, 0.1 * (1 - 0.2 * 0.5), rtol=1e-6)
  np.testing.assert_allclose(c.update(5.4, 50).value, 0.1 * (1 - 0.1 * 0.5), rtol=1e-5)
  with pytest.raises(ValueError):
    rl.KLController.create(0.1, target=0.0)


def test_grpo_advantages_normalised_within_each_group():
  rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.2, 0.4, 0.9, 0.1], [0.7, 0.7, 0.7, 0.7]])
  eps = 1e-6
  adv = np.asarray(rl.grpo_advantages(rewards, eps))
  np.testing.assert_allclose(adv.mean(1), 0.0, atol=1e-6)
  std = rewards.std(1)  # Population std: the variance of A is std^2 / (std + eps)^2.
  np.testing.assert_allclose(adv[:2].var(1), (std[:2] / (std[:2] + eps)) ** 2, rtol=1e-5)
  np.testing.assert_allclose(adv[:2].var(1), 1.0, rtol=1e-4)
  np.testing.assert_allclose(adv[0], [1, -1, -1, 1], rtol=1e-5)  # mean 0.5, std 0.5.
  assert np.all(adv[2] == 0.0)  # Equal rewards: no signal.


# -- the losses on a tiny policy -------------------------------------------------------------------

V, S, L = 32, 8, 6
MODEL = EncoderDecoderModel(Transformer(TransformerConfig(
    vocab_size=V, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=1,
    num_decoder_layers=1, dropout_rate=0.0, max_len=64)))


@jit
def _random_params(rng):
  shapes = {'encoder_input_tokens': (1, S), 'decoder_input_tokens': (1, L)}
  return unbox(MODEL.get_initial_variables(rng, shapes)['params'])


def _sources(n, seed=0):
  rng = np.random.default_rng(seed)
  enc = np.zeros((n, S), np.int32)
  for i in range(n):
    k = int(rng.integers(2, S))
    enc[i, :k], enc[i, k] = rng.integers(3, V, k), 1
  return enc


def test_rollout_logprobs_are_the_policys_and_the_kl_to_itself_is_zero():
  """The sampler's stored per-token log-probs (the ratio's denominator) equal the teacher-forced
  log-probs of the same policy; so the first epoch's ratio is 1 and the PPO / GRPO KL terms to a
  reference equal to the policy are 0."""
  params = _random_params(jax.random.PRNGKey(0))
  enc = _sources(4)
  samples = grow_lib.sample_candidates(MODEL, params, enc, np.arange(4), seed=0,
                                       key=jax.random.fold_in(jax.random.PRNGKey(0), 3),
                                       num_decodes=2, temperature=1.0, max_decode_len=L,
                                       mesh=partitioning.create_mesh(1), batch_size=4,
                                       token_logprobs=True)
  feats = online.rollout_features(enc, samples)
  mask = feats['decoder_loss_weights']
  teacher = np.asarray(jit(MODEL.token_logprobs)(params, feats))
  np.testing.assert_allclose(feats['old_logprobs'] * mask, teacher * mask, atol=2e-5)
  adv = np.where(mask > 0, np.linspace(-1, 1, mask.size).reshape(mask.shape), 0.0)
  batch = dict(feats, ref_logprobs=teacher, advantages=adv.astype(np.float32),
               returns=np.zeros_like(mask), old_values=np.zeros_like(mask),
               kl_coef=np.full((len(mask),), 0.5, np.float32))
  batch['old_logprobs'] = teacher
  aux = losses.init_aux_params('ppo', MODEL, jax.random.PRNGKey(1))
  for name, p in (('ppo', {'policy': params, 'aux': aux}), ('grpo', {'policy': params, 'aux': {}})):
    loss, m = jit(functools.partial(losses.get_loss(name), MODEL))(p, batch, None)
    assert abs(float(m['kl'])) < 1e-6 and abs(float(m['kl_loss'])) < 1e-6, name
    np.testing.assert_allclose(m['ratio'], 1.0, atol=1e-6)
    np.testing.assert_allclose(m['policy_loss'], -(adv * mask).sum() / mask.sum(), atol=1e-6)
  np.testing.assert_allclose(m['loss'], m['policy_loss'], atol=1e-6)  # grpo: no critic.


# -- the loop on a toy reward ----------------------------------------------------------------------

TOKEN = 7  # The toy reward: 1 if the sample contains this token.


class ContainsToken:
  """Reward 1.0 for a candidate that contains `TOKEN`, else 0.0 (the `score_ids` interface)."""

  def score_ids(self, source_ids, candidate_ids, batch_size=64, references=None):
    del source_ids, batch_size, references
    return np.array([float(TOKEN in list(c)) for c in candidate_ids], np.float32)


def detok(ids):
  return ' '.join(str(int(t)) for t in ids if int(t) > 1)


def task_data(n, seed):
  enc = _sources(n, seed)
  tgt = np.zeros((n, L), np.int32)
  tgt[:, :3] = [3, TOKEN, 1]
  feats = input_pipeline.pad_features([list(r[:np.flatnonzero(r)[-1] + 1]) for r in enc],
                                      [list(r[:3]) for r in tgt], S, L)
  return input_pipeline.TaskData(feats, [detok(r) for r in enc], [detok(r) for r in tgt],
                                 [f'{seed}-{i}' for i in range(n)], 0)


TRAIN, DEV, TEST = task_data(16, 1), task_data(4, 2), task_data(4, 3)
TOY = dict(model=MODEL, task='toy', sources_per_rollout=8, num_decodes=4, minibatch_size=16,
           ppo_epochs=2, inputs_length=S, max_decode_len=L, decode_batch_size=8,
           task_data=TRAIN, dev=DEV, test=TEST, detokenize=detok, scorer=ContainsToken(),
           checkpoint_every_rollouts=1)


@pytest.fixture()
def optimizer_gin():
  import gin
  gin.parse_config("online/make_optimizer.learning_rate = 1e-3\n"
                   "online/make_optimizer.warmup_steps = 0\n"
                   "online/make_optimizer.schedule = 'constant'")


@pytest.mark.parametrize('algorithm', online.ALGORITHMS)
def test_toy_reward_rises_to_half_within_50_updates(tmp_path, optimizer_gin, algorithm):
  """From a random policy: the mean reward of a rollout (about 0.3 at the start) reaches 0.5
  (averaged over two consecutive rollouts) within 48 updates (12 rollouts x 2 epochs x 2
  minibatches); the stages are in report.json."""
  params = _random_params(jax.random.PRNGKey(0))
  rep = online.online(str(tmp_path), params=params, algorithm=algorithm, max_samples=12 * 32,
                      kl_coef=0.01, eval_every_samples=6 * 32, **TOY)
  log = {e['rollouts']: e for e in online_history(tmp_path)}
  assert log[1]['reward'] < 0.4 and abs(log[1]['kl']) < 1e-4 and rep['updates'] == 48
  assert max(np.mean([log[r]['reward'], log[r + 1]['reward']]) for r in range(1, 12)) >= 0.5
  assert [s['name'] for s in rep['stages']] == ['bc', f'{algorithm}_192', f'{algorithm}_384']
  assert [s['samples_drawn'] for s in rep['stages']] == [0, 192, 384]
  assert rep['eval_decodes'] == 3 * 8 and rep['samples_drawn'] == 384
  assert all(s['test_reward'] is not None and s['test_bleu'] is not None for s in rep['stages'])


def online_history(workdir):
  from rest_jax import fileio
  return fileio.read_json(os.path.join(str(workdir), 'history.json'))['rollouts']


def test_killed_run_resumes_to_the_uninterrupted_state(tmp_path, optimizer_gin):
  """3 rollouts in one go vs 2 rollouts, a kill, and a rerun: the same params (policy and value
  head), optimizer state, adaptive KL coefficient and samples drawn."""
  params = _random_params(jax.random.PRNGKey(0))
  run = functools.partial(online.online, params=params, algorithm='ppo', max_samples=3 * 32,
                          kl_coef=0.05, kl_target=0.01, kl_horizon=100.0,
                          eval_every_samples=10_000, **TOY)
  whole = run(str(tmp_path / 'whole'))
  with pytest.raises(online.OnlineInterrupted):
    run(str(tmp_path / 'killed'), _stop_after_rollouts=2)
  resumed = run(str(tmp_path / 'killed'))
  assert resumed['rollouts'] == whole['rollouts'] == 3 and resumed['updates'] == 12

  def final(d):
    import orbax.checkpoint as ocp
    mngr = ocp.CheckpointManager(os.path.join(str(d), 'policy', 'checkpoints'))
    return mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore())).state
  a, b = final(tmp_path / 'whole'), final(tmp_path / 'killed')
  flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
  assert len(flat_a) == len(flat_b)
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
  kl = [e['kl_coef'] for e in online_history(tmp_path / 'killed')]
  assert kl == [e['kl_coef'] for e in online_history(tmp_path / 'whole')] and kl[0] != kl[-1]
  # Minutes count the whole run: the resumed invocation adds to the killed one's minutes.
  log = online_history(tmp_path / 'killed')
  assert all(a['minutes'] < b['minutes'] for a, b in zip(log, log[1:]))
  assert resumed['minutes_total'] > resumed['minutes_this_invocation']
  assert resumed['stages'][-1]['minutes'] >= log[1]['minutes']


def test_rollout_advantages_ppo_and_grpo():
  """`online.advantages` on a hand-made rollout of 2 sources x 2 samples: PPO's k1 penalty and
  reward at the last token through GAE (zero values, gamma = lam = 1: the reward-to-go); GRPO's
  group-normalised sequence reward on every token of the sample, the KL left to the loss."""
  mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], np.float32)
  feats = {'decoder_loss_weights': mask, 'lengths': np.array([2, 1, 3, 2]),
           'old_logprobs': np.full((4, 3), -1.0, np.float32),
           'ref_logprobs': np.full((4, 3), -1.5, np.float32),  # k1 = 0.5 per token.
           'values': np.zeros((4, 3), np.float32)}
  rewards = np.array([1.0, 0.0, 0.5, 0.5], np.float32)
  kw = dict(beta=0.2, gamma=1.0, lam=1.0, whiten_advantages=False, grpo_eps=1e-6)
  ppo = online.advantages('ppo', feats, rewards, 2, kl_penalty='reward', **kw)
  np.testing.assert_allclose(ppo['seq_kl'], [1.0, 0.5, 1.5, 1.0])
  np.testing.assert_allclose(ppo['advantages'][0], [1.0 - 0.2, 1.0 - 0.1, 0.0], rtol=1e-6)
  np.testing.assert_allclose(ppo['advantages'][2], [0.5 - 0.3, 0.5 - 0.2, 0.5 - 0.1], rtol=1e-6)
  grpo = online.advantages('grpo', feats, rewards, 2, kl_penalty='loss', **kw)
  np.testing.assert_allclose(grpo['advantages'][0], [1.0, 1.0, 0.0], rtol=1e-5)
  np.testing.assert_allclose(grpo['advantages'][1], [-1.0, 0.0, 0.0], rtol=1e-5)
  assert np.all(grpo['advantages'][2:] == 0.0)  # Source 1's two samples tie.


def test_grpo_on_arithmetic_with_the_verifier_from_the_config(tmp_path):
  """`rest-jax online` with `gin_configs/runs/grpo_arithmetic_cpu.gin` (shipped base model, binary
  verifier), one rollout: the stages are pass@1 on dev, test and the first pool problems."""
  from loop_utils import run
  from rest_jax import fileio
  w = str(tmp_path / 'grpo')
  run(['online', '--gin_file=gin_configs/runs/grpo_arithmetic_cpu.gin', f'--workdir={w}',
       '--gin.online.max_samples=64', '--gin.online.eval_every_samples=64',
       '--gin.online.dev_examples=4', '--gin.online.test_examples=6',
       '--gin.online.pool_eval_examples=5', '--gin.online.max_decode_len=48'])
  rep = fileio.read_json(os.path.join(w, 'report.json'))
  assert rep['algorithm'] == 'grpo' and rep['reward'] == 'verifier_steps' and rep['samples_drawn'] == 64
  assert [s['name'] for s in rep['stages']] == ['bc', 'grpo_64']
  for s in rep['stages']:
    assert (s['dev_problems'], s['test_problems'], s['pool_problems']) == (4, 6, 5)
    assert s['eval_decodes'] == 15 and s['test_reward'] == s['test_pass1']
    for split, n in (('dev', 4), ('test', 6), ('pool', 5)):
      assert round(s[f'{split}_pass1'] * n / 100) * 100 / n == pytest.approx(s[f'{split}_pass1'])
  outputs = os.path.join(w, 'eval', 'bc', 'pool_outputs.jsonl')
  assert len(open(outputs).read().splitlines()) == 5
