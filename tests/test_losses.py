"""Improve-step losses (`rest_jax.losses`): each loss equals its formula computed by hand in numpy
from the model's logits; reductions (bc = NLL, gold(u=1) = reward-weighted NLL, ReST-EM NLL on the
positives); BVMPO's selection, weights, dual and KL; OAC's critic; exact microbatch combination."""

import dataclasses
import functools
import math

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rest_jax import losses
from rest_jax import trainer as trainer_lib
from rest_jax.models import (EncoderDecoderModel, Transformer, TransformerConfig, shift_right,
                             unbox)

CFG = TransformerConfig(vocab_size=16, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                        num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0, max_len=16)
MODULE = Transformer(CFG)
MODEL = EncoderDecoderModel(MODULE, label_smoothing=0.1)   # Smoothing: bc must not inherit it.
PLAIN = EncoderDecoderModel(MODULE, label_smoothing=0.0)
B, S, T = 6, 5, 4
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


@jit
def _init(rng):
  shapes = {'encoder_input_tokens': (B, S), 'decoder_input_tokens': (B, T)}
  return unbox(MODEL.get_initial_variables(rng, shapes)['params'])


LOGITS = jit(MODEL.compute_logits)
PLAIN_LOSS = jit(PLAIN.loss_fn)
SMOOTHED_LOSS = jit(MODEL.loss_fn)
ENCODE = jit(lambda p, tokens: MODULE.apply({'params': p}, tokens, method='encode'))
POLICY = _init(jax.random.PRNGKey(0))
PRIOR = _init(jax.random.PRNGKey(1))
AUX = {'kernel': jnp.asarray(np.random.RandomState(3).normal(0, 0.3, (CFG.emb_dim, 1)),
                             jnp.float32), 'bias': jnp.asarray([0.2], jnp.float32)}


def make_batch(reward=(0.9, 0.2, 0.6, 0.0, 1.0, 0.5),
               baseline=(0.5, 0.5, 0.3, 0.3, 0.7, 0.1), kl_weight=0.3):
  """6 rows; row 2 has a fractional weight, row 5 is a padding row (all weights 0)."""
  rng = np.random.RandomState(0)
  enc = rng.randint(3, CFG.vocab_size, (B, S)).astype(np.int32)
  enc[1, 3:] = 0
  enc[4, 2:] = 0
  tgt = rng.randint(3, CFG.vocab_size, (B, T)).astype(np.int32)
  lengths = [4, 3, 2, 4, 1, 0]
  w = np.zeros((B, T), np.float32)
  for b, n in enumerate(lengths):
    tgt[b, n:] = 0
    w[b, :n] = 1.0
  w[2, 1] = 0.5
  return {'encoder_input_tokens': jnp.asarray(enc),
          'decoder_input_tokens': shift_right(jnp.asarray(tgt)),
          'decoder_target_tokens': jnp.asarray(tgt),
          'decoder_loss_weights': jnp.asarray(w),
          'reward': jnp.asarray(reward, jnp.float32),
          'source_baseline': jnp.asarray(baseline, jnp.float32),
          'kl_weight': jnp.full((B,), kl_weight, jnp.float32)}


BATCH = make_batch()


def params(aux=None, prior=None):
  p = {'policy': POLICY, 'aux': {} if aux is None else aux}
  if prior is not None:
    p['prior'] = prior
  return p


@functools.lru_cache(maxsize=None)
def _jitted(name, hparams):
  return jit(losses.make_loss_fn(MODEL, name, **dict(hparams)))


def run(name, p, batch=BATCH, rng=None, **hparams):
  loss, metrics = _jitted(name, tuple(sorted(hparams.items())))(p, batch, rng)
  return float(loss), {k: float(v) for k, v in metrics.items()}


# -- numpy references ------------------------------------------------------------------------------

def np_log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  m = logits.max(-1, keepdims=True)
  return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def np_logp(policy=POLICY, batch=BATCH):
  """(full log-probs [B, T, V], target log-probs [B, T]) in float64."""
  lp = np_log_softmax(LOGITS(policy, batch))
  tgt = np.asarray(batch['decoder_target_tokens'])
  return lp, np.take_along_axis(lp, tgt[..., None], -1)[..., 0]


def arr(batch, key):
  return np.asarray(batch[key], np.float64)


W = arr(BATCH, 'decoder_loss_weights')
R = arr(BATCH, 'reward')


# -- registry, factory, gin -----------------------------------------------------------------------

def test_registry_and_factory():
  assert set(losses.LOSSES) == {'bc', 'gold', 'bvmpo', 'oac', 'reward_weighted_nll', 'ppo',
                                'grpo'}
  with pytest.raises(KeyError, match='known losses: bc, bvmpo, gold, grpo, oac, ppo, '
                                     'reward_weighted_nll'):
    losses.get_loss('trpo')
  with pytest.raises(ValueError):  # improve.py documents a ValueError for an unknown loss.
    losses.make_loss_fn(MODEL, 'trpo')
  with pytest.raises(TypeError, match='eps_eta'):
    losses.make_loss_fn(MODEL, 'bc', eps_eta=0.1)
  assert [losses.needs_prior(n) for n in ('bc', 'gold', 'bvmpo', 'oac', 'reward_weighted_nll')] \
      == [False, False, True, False, False]
  aux = losses.init_aux_params('oac', MODEL, jax.random.PRNGKey(0))
  assert aux['kernel'].shape == (CFG.emb_dim, 1) and aux['bias'].shape == (1,)
  assert losses.init_aux_params('bvmpo', MODEL, jax.random.PRNGKey(0)) == {}
  with pytest.raises(ValueError):
    losses.register('bc')(lambda *a: None)
  with pytest.raises(KeyError, match='prior'):
    losses.make_loss_fn(MODEL, 'bvmpo')(params(), BATCH, None)


def test_gin_binds_loss_name_and_hyperparameters():
  gold_u1, _ = run('gold', params(), clip_min=1.0)
  gold_default, _ = run('gold', params())
  assert abs(gold_u1 - gold_default) > 1e-4  # The clip matters on this batch.
  gin.parse_config("gold.clip_min = 1.0\nmake_loss_fn.name = 'gold'")  # Cleared by conftest.py.
  # Name and clip_min from gin; then an explicit hparam overrides gin. gin is read when the
  # loss is traced, so both are traced while the bindings hold.
  fns = (losses.make_loss_fn(MODEL), losses.make_loss_fn(MODEL, clip_min=0.1))
  got = jit(lambda p: [fn(p, BATCH, None)[0] for fn in fns])(params())
  np.testing.assert_allclose(float(got[0]), gold_u1, rtol=1e-6)
  np.testing.assert_allclose(float(got[1]), gold_default, rtol=1e-6)


def test_kl_weight_schedule():
  assert losses.kl_weight_schedule(0, 100) == 1.0
  np.testing.assert_allclose(losses.kl_weight_schedule(50, 100), math.sqrt(1e-5), rtol=1e-9)
  np.testing.assert_allclose(losses.kl_weight_schedule(100, 100), 1e-5, rtol=1e-9)
  np.testing.assert_allclose(losses.kl_weight_schedule(500, 100), 1e-5, rtol=1e-9)
  np.testing.assert_allclose(losses.kl_weight_schedule(25, 100, 0.5, 0.5 * 1e-4),
                             0.5 * 1e-1, rtol=1e-9)
  assert losses.kl_weight_schedule(3, 0) == 1e-5
  with pytest.raises(ValueError):
    losses.kl_weight_schedule(0, 10, 0.0, 1e-5)


# -- each loss by hand ----------------------------------------------------------------------------

def test_bc_is_plain_nll_and_matches_hand_value():
  _, tok = np_logp()
  want = -(W * tok).sum() / W.sum()
  loss, m = run('bc', params())
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(m['nll'], want, rtol=1e-5)
  assert m['num_tokens'] == W.sum()
  # Rewards play no part (the records were already filtered): == the model's unsmoothed loss.
  for reward in ([0.3] * B, [1.0, 0.0, 0.2, 0.9, 0.4, 0.0]):
    loss_r, _ = run('bc', params(), make_batch(reward=reward))
    np.testing.assert_allclose(loss_r, float(PLAIN_LOSS(POLICY, BATCH, None)[0]), rtol=1e-5)
  # bc.label_smoothing reproduces the model's smoothed loss (and then differs from the NLL).
  loss_ls, m_ls = run('bc', params(), label_smoothing=0.1)
  np.testing.assert_allclose(loss_ls, float(SMOOTHED_LOSS(POLICY, BATCH, None)[0]), rtol=1e-5)
  np.testing.assert_allclose(m_ls['nll'], want, rtol=1e-5)
  assert abs(loss_ls - want) > 1e-3


@pytest.mark.parametrize('clip_min,use_baseline', [(0.1, False), (0.3, True), (1.0, False)])
def test_gold_matches_hand_value(clip_min, use_baseline):
  _, tok = np_logp()
  q = np.maximum(np.exp(tok), clip_min)
  ret = R - arr(BATCH, 'source_baseline') if use_baseline else R
  want = -(W * q * ret[:, None] * tok).sum() / W.sum()
  loss, m = run('gold', params(), clip_min=clip_min, use_baseline=use_baseline)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(m['nll'], -(W * tok).sum() / W.sum(), rtol=1e-5)
  np.testing.assert_allclose(m['mean_is_weight'], (W * q).sum() / W.sum(), rtol=1e-5)
  assert m['num_tokens'] == W.sum()


def test_gold_with_unit_clip_is_reward_weighted_nll():
  gold_u1, _ = run('gold', params(), clip_min=1.0)
  rw, m = run('reward_weighted_nll', params())
  # Same numerator sum(r w nll); GOLD normalises by sum w, ReST-EM by sum r w.
  np.testing.assert_allclose(gold_u1, rw * m['num_tokens'] / W.sum(), rtol=1e-5)
  # And with every reward 1 both are the plain NLL (bc).
  ones = make_batch(reward=[1.0] * B)
  np.testing.assert_allclose(run('gold', params(), ones, clip_min=1.0)[0],
                             run('bc', params(), ones)[0], rtol=1e-5)
  np.testing.assert_allclose(run('reward_weighted_nll', params(), ones)[0],
                             run('bc', params(), ones)[0], rtol=1e-5)


def test_reward_weighted_nll_hand_value_and_binary_rewards():
  _, tok = np_logp()
  rw = R[:, None] * W
  loss, m = run('reward_weighted_nll', params())
  np.testing.assert_allclose(loss, -(rw * tok).sum() / rw.sum(), rtol=1e-5)
  np.testing.assert_allclose(m['num_tokens'], rw.sum(), rtol=1e-6)
  # Binary rewards: exactly the NLL of the positive rows alone.
  reward = np.array([1, 0, 1, 0, 1, 1], np.float32)
  loss, m = run('reward_weighted_nll', params(), make_batch(reward=reward))
  pos = np.flatnonzero(reward)
  positives = {k: v[pos] for k, v in BATCH.items()}
  want = float(PLAIN_LOSS(POLICY, positives, None)[0])
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(m['num_tokens'], W[pos].sum(), rtol=1e-6)


def _np_bvmpo(adv, keep, eta, prior, policy=POLICY, normalize=True):
  """Hand V-MPO loss with an explicit kept set and eta."""
  lp, tok = np_logp(policy)
  row_lp = (W * tok).sum(1)
  if normalize:
    row_lp = row_lp / np.maximum(W.sum(1), 1e-30)
  z = adv[keep] / eta
  psi = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
  policy_loss = -(psi * row_lp[keep]).sum()
  prior_lp, _ = np_logp(prior)
  kl_tok = (np.exp(prior_lp) * (prior_lp - lp)).sum(-1)
  kw = arr(BATCH, 'kl_weight')[:, None]
  kl = (W * kl_tok).sum() / W.sum()
  return policy_loss + (W * kw * kl_tok).sum() / W.sum(), policy_loss, kl, psi


# Advantages 0.4, 0.3, 0.1, 0.3, 0.3 on the 5 valid rows (row 5, padding, has the largest).
ADV_BATCH = make_batch(reward=(0.9, 0.8, 0.6, 0.6, 0.5, 1.0),
                       baseline=(0.5, 0.5, 0.5, 0.3, 0.2, 0.1))
ADV = arr(ADV_BATCH, 'reward') - arr(ADV_BATCH, 'source_baseline')


def test_top_rows_ties_and_padding():
  valid = jnp.asarray(W.sum(1) > 0)
  keep = np.asarray(losses.top_rows(jnp.asarray(ADV, jnp.float32), valid, 0.5))
  # ceil(5 / 2) = 3 of the valid rows: 0.4 (row 0), then the first two of the tied 0.3s.
  assert np.flatnonzero(keep).tolist() == [0, 1, 3]
  keep = np.asarray(losses.top_rows(jnp.asarray(ADV, jnp.float32), valid, 1.0))
  assert np.flatnonzero(keep).tolist() == [0, 1, 2, 3, 4]
  one = jnp.asarray([False, False, True, False, False, False])
  assert np.flatnonzero(losses.top_rows(jnp.asarray(ADV, jnp.float32), one, 0.5)).tolist() == [2]


@pytest.mark.parametrize('normalize', [True, False])
def test_bvmpo_fixed_eta_matches_hand_value(normalize):
  keep = np.zeros(B, bool)
  keep[[0, 1, 3]] = True
  eta = 0.07
  want, want_pol, want_kl, _ = _np_bvmpo(ADV, keep, eta, PRIOR, normalize=normalize)
  loss, m = run('bvmpo', params(prior=PRIOR), ADV_BATCH, eta=eta, normalize_by_length=normalize)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(m['policy_loss'], want_pol, rtol=1e-5)
  np.testing.assert_allclose(m['kl'], want_kl, rtol=1e-5)
  assert want_kl > 1e-3  # A different prior really gives a KL.
  np.testing.assert_allclose(m['kl_loss'], 0.3 * want_kl, rtol=1e-5)
  assert m['eta'] == pytest.approx(eta) and m['kept_rows'] == 3 and m['valid_rows'] == 5
  assert m['num_tokens'] == W.sum()


def test_bvmpo_kl_vanishes_when_prior_is_policy_and_prior_gets_no_gradient():
  loss, m = run('bvmpo', params(prior=POLICY), ADV_BATCH, eta=0.5)
  assert abs(m['kl']) < 1e-6 and abs(m['kl_loss']) < 1e-6
  np.testing.assert_allclose(loss, m['policy_loss'], atol=1e-6)
  grads = jit(jax.grad(lambda p: losses.make_loss_fn(MODEL, 'bvmpo', eta=0.5)(
      p, ADV_BATCH, None)[0]))(params(prior=PRIOR))
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads['prior']))
  assert any(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(grads['policy']))


def test_bvmpo_solved_eta_minimises_the_dual():
  eps = 0.05
  loss, m = run('bvmpo', params(prior=PRIOR), ADV_BATCH, eps_eta=eps)
  eta = m['eta']
  kept = ADV[[0, 1, 3]]

  def dual(e):
    z = kept / e
    return e * eps + e * (np.log(np.mean(np.exp(z - z.max()))) + z.max())

  grid = np.exp(np.linspace(np.log(1e-3), np.log(10.0), 4001))
  assert dual(eta) <= min(dual(e) for e in grid) + 1e-7
  assert dual(eta) < dual(eta * 1.1) and dual(eta) < dual(eta / 1.1)
  np.testing.assert_allclose(m['dual_loss'], dual(eta), rtol=1e-4)
  # At the optimum KL(psi || uniform) = eps, and the loss uses that eta.
  psi = np.exp(kept / eta - (kept / eta).max())
  psi /= psi.sum()
  np.testing.assert_allclose((psi * np.log(psi * 3)).sum(), eps, rtol=1e-3)
  np.testing.assert_allclose(m['psi_kl'], eps, rtol=1e-3)
  keep = np.zeros(B, bool)
  keep[[0, 1, 3]] = True
  np.testing.assert_allclose(loss, _np_bvmpo(ADV, keep, eta, PRIOR)[0], rtol=1e-5)


def _np_oac(enc, tok, c):
  """(loss, actor loss, value loss, advantage [B]) of OAC by hand from the encoder output
  [B, S, emb] and the target log-probs [B, T]."""
  enc = np.asarray(enc, np.float64)
  mask = (np.asarray(BATCH['encoder_input_tokens']) != 0)[..., None]
  pooled = (enc * mask).sum(1) / mask.sum(1)
  value = pooled @ np.asarray(AUX['kernel'], np.float64)[:, 0] + float(AUX['bias'][0])
  adv = R - value
  actor = -(W * adv[:, None] * tok).sum() / W.sum()
  vloss = (W.sum(1) * (R - value) ** 2).sum() / W.sum()
  return actor + c * vloss, actor, vloss, adv


def test_oac_matches_hand_value():
  c = 0.7
  _, tok = np_logp()
  want, actor, vloss, adv = _np_oac(ENCODE(POLICY, BATCH['encoder_input_tokens']), tok, c)
  loss, m = run('oac', params(aux=AUX), value_coef=c)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(m['actor_loss'], actor, rtol=1e-5)
  np.testing.assert_allclose(m['value_loss'], vloss, rtol=1e-5)
  np.testing.assert_allclose(m['mean_advantage'], adv[:5].mean(), rtol=1e-5)


def test_oac_dropout_path_matches_hand_value():
  """With dropout (rate 0.3, the same params) the encoder runs once, under the first half of the
  split key, and both the decoder (second half) and the value head read that output."""
  c = 0.7
  module = Transformer(dataclasses.replace(CFG, dropout_rate=0.3))
  model = EncoderDecoderModel(module)
  rng = jax.random.PRNGKey(5)
  enc_rng, dec_rng = jax.random.split(rng)
  tokens, variables = BATCH['encoder_input_tokens'], {'params': POLICY}

  @jit
  def forward():
    enc = module.apply(variables, tokens, enable_dropout=True, rngs={'dropout': enc_rng},
                       method='encode')
    logits = module.apply(variables, enc, tokens, BATCH['decoder_input_tokens'],
                          enable_dropout=True, rngs={'dropout': dec_rng}, method='decode')
    return enc, logits

  enc, logits = forward()
  lp = np_log_softmax(logits)
  tok = np.take_along_axis(lp, np.asarray(BATCH['decoder_target_tokens'])[..., None], -1)[..., 0]
  want = _np_oac(enc, tok, c)[0]
  oac = jit(lambda p, r: losses.oac(model, p, BATCH, r, value_coef=c)[0])
  loss = float(oac(params(aux=AUX), rng))
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  # Dropout really acts (else this compares a computation with itself), on the value head too.
  no_dropout = float(oac(params(aux=AUX), None))
  np.testing.assert_allclose(no_dropout, run('oac', params(aux=AUX), value_coef=c)[0], rtol=1e-5)
  assert abs(loss - no_dropout) > 1e-3
  deterministic_value = _np_oac(ENCODE(POLICY, tokens), tok, c)[0]
  assert abs(deterministic_value - want) > 1e-4


def test_oac_value_head_learns_the_reward_and_critic_spares_the_policy():
  # value_coef traced: one compilation for every coefficient.
  grads = jit(jax.grad(lambda p, c: losses.oac(MODEL, p, BATCH, None, value_coef=c)[0]))

  aux0 = losses.init_aux_params('oac', MODEL, jax.random.PRNGKey(0))
  g = grads(params(aux=aux0), 0.5)
  # V = 0 at init: d/d bias = -2 c sum_b n_b (r_b - 0) / N < 0, i.e. descent raises V toward r.
  want = -2 * 0.5 * (W.sum(1) * R).sum() / W.sum()
  np.testing.assert_allclose(float(g['aux']['bias'][0]), want, rtol=1e-5)
  # The critic never reaches the policy (a non-zero head, else d V / d features = 0 anyway),
  # the actor never reaches the head.
  g_lo, g_hi = grads(params(aux=AUX), 0.5), grads(params(aux=AUX), 5.0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               g_lo['policy'], g_hi['policy'])
  assert float(jnp.abs(g_hi['aux']['kernel']).max()) > 1e-3
  g0 = grads(params(aux=AUX), 0.0)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g0['aux']))
  # Gradient descent on the head alone drives V toward the rewards.
  step = jit(jax.value_and_grad(
      lambda aux: losses.make_loss_fn(MODEL, 'oac')(params(aux=aux), BATCH, None)[1]['value_loss']))
  aux, history = aux0, []
  for _ in range(40):
    v, ga = step(aux)
    history.append(float(v))
    aux = jax.tree.map(lambda a, b: a - 0.02 * b, aux, ga)
  assert history[-1] < 0.5 * history[0], history
  assert all(b <= a + 1e-7 for a, b in zip(history, history[1:]))


# -- padding and microbatches ---------------------------------------------------------------------

@pytest.mark.parametrize('name', ['bc', 'gold', 'bvmpo', 'oac', 'reward_weighted_nll'])
def test_all_padding_batch_gives_zero_loss_and_finite_grads(name):
  batch = dict(BATCH, decoder_loss_weights=jnp.zeros((B, T), jnp.float32))
  p = params(aux=AUX if name == 'oac' else None, prior=PRIOR if name == 'bvmpo' else None)
  fn = losses.make_loss_fn(MODEL, name)
  (loss, metrics), g = jit(jax.value_and_grad(fn, has_aux=True))(p, batch, None)
  assert float(loss) == 0.0 and float(metrics['num_tokens']) == 0.0
  assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))


@pytest.mark.parametrize('name,hparams,reward', [
    ('bc', {}, None),
    ('gold', {'clip_min': 0.2, 'use_baseline': True}, None),
    ('oac', {}, None),
    # Rows 1, 3, 5 (the second microbatch) have reward 0: a microbatch with N = 0.
    ('reward_weighted_nll', {}, (0.9, 0.0, 0.6, 0.0, 1.0, 0.0)),
])
def test_microbatches_combine_to_the_full_batch(name, hparams, reward):
  batch = BATCH if reward is None else make_batch(reward=reward)
  fn = losses.make_loss_fn(MODEL, name, **hparams)
  p = params(aux=AUX if name == 'oac' else None)

  @jit
  def all_grads(p, batch, rng):
    out = [trainer_lib.Trainer(MODEL, optax.sgd(0.1), mesh=None, loss_fn=fn,
                               num_microbatches=m)._grads(p, batch, rng) for m in (1, 2)]
    halves = [fn(p, {k: v[i::2] for k, v in batch.items()}, None)[0] for i in (0, 1)]
    return out, halves

  (full, micro), halves = all_grads(p, batch, jax.random.PRNGKey(0))
  np.testing.assert_allclose(float(micro[0]), float(full[0]), rtol=1e-5)
  np.testing.assert_allclose(float(micro[1]['num_tokens']), float(full[1]['num_tokens']),
                             rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               micro[2], full[2])
  # The two microbatches really differ (else the check above would be vacuous).
  assert abs(float(halves[0]) - float(halves[1])) > 1e-3
