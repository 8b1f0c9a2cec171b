"""Tests of the Transformer and its t5x-style wrapper (tiny configs, CPU)."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rest_jax.models import (EncoderDecoderModel, Transformer, TransformerConfig,
                             cross_entropy_with_logits, params_logical_axes,
                             shift_right, unbox)

TINY = TransformerConfig(vocab_size=32, emb_dim=16, num_heads=2, head_dim=8,
                         mlp_dim=32, num_encoder_layers=1, num_decoder_layers=2,
                         dropout_rate=0.1, max_len=64)
RULES = (('batch', 'data'), ('vocab', 'model'), ('mlp', 'model'), ('heads', 'model'),
         ('embed', None), ('kv', None), ('length', None))
ALLOWED_AXES = {'vocab', 'embed', 'mlp', 'heads', 'kv'}
LABEL_SMOOTHING = 0.1

# XLA:CPU compilation dominates the run time of this file, so the model, its
# params and the jitted functions are shared, batch shapes kept few, and most
# functions compiled without LLVM optimisation (about 2x faster to compile; the
# programs here are tiny).
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})
MODEL = EncoderDecoderModel(Transformer(TINY), label_smoothing=LABEL_SMOOTHING)
VARIABLES = jit(lambda rng: MODEL.get_initial_variables(
    rng, {'encoder_input_tokens': (2, 7), 'decoder_input_tokens': (2, 6)}))(
        jax.random.PRNGKey(0))
PARAMS = unbox(VARIABLES['params'])
LOGITS = jit(MODEL.compute_logits)
SCORE = jit(MODEL.score_batch)
GRAD = jit(jax.value_and_grad(MODEL.loss_fn, has_aux=True))


def make_batch(seed, batch=4, src_len=7, tgt_len=6, vocab=32, pad=True):
  """Random EncDecFeatureConverter-style batch: tokens 3..vocab-1, EOS=1, PAD=0."""
  rng = np.random.RandomState(seed)
  enc = rng.randint(3, vocab, (batch, src_len)).astype(np.int32)
  tgt = rng.randint(3, vocab, (batch, tgt_len)).astype(np.int32)
  weights = np.ones((batch, tgt_len), np.float32)
  for b in range(batch):
    src_n = src_len - (b % 3 if pad else 0)
    tgt_n = tgt_len - (b % 2 if pad else 0)
    enc[b, src_n - 1] = 1
    enc[b, src_n:] = 0
    tgt[b, tgt_n - 1] = 1
    tgt[b, tgt_n:] = 0
    weights[b, tgt_n:] = 0
  return {
      'encoder_input_tokens': jnp.asarray(enc),
      'decoder_input_tokens': shift_right(jnp.asarray(tgt)),
      'decoder_target_tokens': jnp.asarray(tgt),
      'decoder_loss_weights': jnp.asarray(weights),
  }


def test_incremental_decode_matches_teacher_forcing():
  batch = make_batch(1)
  full = LOGITS(PARAMS, batch)
  tgt_len = batch['decoder_input_tokens'].shape[1]
  cache = jit(MODEL.init_decode_cache, static_argnums=2)(
      PARAMS, batch['encoder_input_tokens'], tgt_len)
  # Cross-attention K/V are computed once and stored in the cache.
  layer_cache = cache['decoder']['layers_0']
  # Heads-major layout [batch, heads, length, kv].
  assert layer_cache['encoder_decoder_attention']['shared_key'].shape == (4, 2, 7, 8)
  assert layer_cache['self_attention']['cached_key'].shape == (4, 2, tgt_len, 8)
  step = jit(MODEL.decode_step)
  cross_before = jax.tree.map(np.asarray, cache['decoder']['layers_1'][
      'encoder_decoder_attention'])
  step_logits = []
  for t in range(tgt_len):
    logits, cache = step(PARAMS, cache, batch['decoder_input_tokens'][:, t])
    step_logits.append(logits)
  np.testing.assert_allclose(np.stack(step_logits, axis=1), full, atol=1e-5)
  np.testing.assert_array_equal(cache['decoder']['cache_index'], tgt_len)
  cross_after = cache['decoder']['layers_1']['encoder_decoder_attention']
  jax.tree.map(np.testing.assert_array_equal, cross_before, cross_after)


def _np_log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  m = logits.max(-1, keepdims=True)
  return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def test_score_batch_matches_numpy():
  batch = make_batch(2)
  log_softmax = _np_log_softmax(LOGITS(PARAMS, batch))
  tgt = np.asarray(batch['decoder_target_tokens'])
  w = np.asarray(batch['decoder_loss_weights'])
  expected = np.zeros(tgt.shape[0])
  for b in range(tgt.shape[0]):
    for t in range(tgt.shape[1]):
      if w[b, t] > 0:
        expected[b] += log_softmax[b, t, tgt[b, t]]
  scores = SCORE(PARAMS, batch)
  assert scores.shape == (4,) and scores.dtype == jnp.float32
  np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
  # Boxed params are accepted too.
  np.testing.assert_allclose(SCORE(VARIABLES['params'], batch), scores, atol=1e-6)


def test_loss_weighting_and_label_smoothing():
  batch = dict(make_batch(3))
  w = np.random.RandomState(0).uniform(0, 2, batch['decoder_loss_weights'].shape)
  batch['decoder_loss_weights'] = jnp.asarray(w, jnp.float32)
  logp = _np_log_softmax(LOGITS(PARAMS, batch))
  tgt = np.asarray(batch['decoder_target_tokens'])
  nll = -np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
  # Label smoothing: explicit soft-target cross-entropy minus its entropy (t5x).
  ls, vocab = LABEL_SMOOTHING, logp.shape[-1]
  soft = np.full(logp.shape, ls / (vocab - 1))
  np.put_along_axis(soft, tgt[..., None], 1 - ls, -1)
  smoothed = -(soft * logp).sum(-1) + (soft * np.log(soft)).sum(-1)

  (loss, metrics), _ = GRAD(PARAMS, batch, None)
  assert set(metrics) >= {'loss', 'accuracy', 'num_tokens', 'nll'}
  np.testing.assert_allclose(loss, (w * smoothed).sum() / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-6)
  np.testing.assert_allclose(metrics['nll'], (w * nll).sum() / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(metrics['num_tokens'], w.sum(), rtol=1e-6)
  acc = (np.argmax(logp, -1) == tgt).mean()  # all w > 0 here
  np.testing.assert_allclose(metrics['accuracy'], acc, rtol=1e-6)
  got, got_nll = cross_entropy_with_logits(jnp.asarray(logp, jnp.float32),
                                           jnp.asarray(tgt), ls)
  np.testing.assert_allclose(got, smoothed, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got_nll, nll, rtol=1e-5)
  # Zero total weight: loss 0 and finite zero gradients.
  batch['decoder_loss_weights'] = jnp.zeros_like(batch['decoder_loss_weights'])
  (loss0, _), grads0 = GRAD(PARAMS, batch, None)
  assert float(loss0) == 0.0
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads0))


def _pad_to(x, length, axis=1):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, pad)


def _assert_trees_close(a, b, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol), a, b)


def test_padding_and_zero_weights_do_not_change_loss_or_grad():
  batch = make_batch(4)
  (loss, _), grads = GRAD(PARAMS, batch, None)

  # 1. Extra right padding on source and target (zero loss weights).
  padded = {k: _pad_to(v, v.shape[1] + 5) for k, v in batch.items()}
  (loss_p, _), grads_p = GRAD(PARAMS, padded, None)
  np.testing.assert_allclose(loss_p, loss, atol=1e-6)
  _assert_trees_close(grads_p, grads, 1e-6)

  # 2. A zero-weighted target token changed to another id; and a padding
  #    position's target set to a real token.
  w = np.asarray(batch['decoder_loss_weights']).copy()
  tgt = np.asarray(batch['decoder_target_tokens']).copy()
  w[0, 2] = 0.0
  zeroed = dict(batch, decoder_loss_weights=jnp.asarray(w))
  (loss_z, _), grads_z = GRAD(PARAMS, zeroed, None)
  tgt[0, 2] = (tgt[0, 2] + 7) % 32
  assert w[1, -1] == 0.0  # row 1 has one padded target position.
  tgt[1, -1] = 5
  changed = dict(zeroed, decoder_target_tokens=jnp.asarray(tgt))
  (loss_c, _), grads_c = GRAD(PARAMS, changed, None)
  np.testing.assert_allclose(loss_c, loss_z, atol=1e-6)
  _assert_trees_close(grads_c, grads_z, 1e-6)


def test_dropout_only_with_rng():
  batch = make_batch(5)
  a = LOGITS(PARAMS, batch)
  b = LOGITS(PARAMS, batch, None)
  c = LOGITS(PARAMS, batch, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_dropout_mask_rate_scale_and_key():
  from rest_jax.models.transformer import Dropout
  x = jnp.ones((64, 33, 257), jnp.float32)  # odd last axis: the halves of a uint32 overlap
  drop = Dropout(0.1)
  y = np.asarray(jit(lambda r: drop.apply({}, x, deterministic=False, rngs={'dropout': r}))(
      jax.random.PRNGKey(3)))
  t = round(0.9 * 65536)
  kept = y != 0
  np.testing.assert_allclose(y[kept], 65536 / t, rtol=1e-6)  # E[y] = x exactly
  # Keep rate t / 2**16 = 0.9000: 543,168 draws, 4 standard deviations = 0.0016.
  assert abs(kept.mean() - t / 65536) < 0.0016, kept.mean()
  # Each uint32 gives positions j and j + 129: the two halves are independent bits.
  lo, hi = kept[..., :128], kept[..., 129:257]
  assert abs((lo & hi).mean() - (t / 65536) ** 2) < 0.003
  again = jit(lambda r: drop.apply({}, x, deterministic=False, rngs={'dropout': r}))(
      jax.random.PRNGKey(3))
  np.testing.assert_array_equal(y, again)
  other = jit(lambda r: drop.apply({}, x, deterministic=False, rngs={'dropout': r}))(
      jax.random.PRNGKey(4))
  assert (np.asarray(other) != y).mean() > 0.1
  np.testing.assert_array_equal(drop.apply({}, x, deterministic=True), x)


def test_overfits_small_dataset():
  config = TransformerConfig(vocab_size=32, emb_dim=32, num_heads=2, head_dim=16,
                             mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1,
                             dropout_rate=0.0, max_len=16)
  model = EncoderDecoderModel(Transformer(config))
  batch = make_batch(6, batch=16, src_len=8, tgt_len=8)
  params = unbox(jit(lambda rng: model.get_initial_variables(
      rng, {k: v.shape for k, v in batch.items()}))(jax.random.PRNGKey(0))['params'])
  opt = optax.adam(1e-2)
  opt_state = opt.init(params)

  @jit
  def train_steps(params, opt_state):
    def step(carry, _):
      params, opt_state = carry
      (loss, metrics), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(
          params, batch, None)
      updates, opt_state = opt.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), (loss, metrics)
    return jax.lax.scan(step, (params, opt_state), None, length=100)

  for _ in range(2):  # 200 Adam steps.
    (params, opt_state), (losses, metrics) = train_steps(params, opt_state)
  # Metrics of the last step (params before its update).
  assert float(losses[-1]) < 0.05, losses[-5:]
  assert float(metrics['accuracy'][-1]) == 1.0


def test_logical_axis_names():
  specs = params_logical_axes(VARIABLES['params'])
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  value_leaves = jax.tree.leaves(PARAMS)
  assert len(spec_leaves) == len(value_leaves) > 0
  for spec, value in zip(spec_leaves, value_leaves):
    assert isinstance(spec, P)
    assert len(spec) == value.ndim, (spec, value.shape)
    assert set(spec) <= ALLOWED_AXES, spec
  emb = VARIABLES['params']['token_embedder']['embedding']
  assert tuple(emb.names) == ('vocab', 'embed')
  attn = VARIABLES['params']['encoder']['layers_0']['attention']
  assert tuple(attn['query_kernel'].names) == ('embed', 'heads', 'kv')
  assert tuple(attn['out_kernel'].names) == ('heads', 'kv', 'embed')
  mlp = VARIABLES['params']['decoder']['layers_1']['mlp']
  assert tuple(mlp['wi_kernel'].names) == ('embed', 'mlp')
  assert tuple(mlp['wo_kernel'].names) == ('mlp', 'embed')


def test_sharded_mesh_matches_single_device():
  devices = jax.devices()
  if len(devices) < 8:
    pytest.skip('needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)')
  batch = make_batch(7)  # batch 4 = size of the 'data' axis.
  (ref_loss, _), ref_grads = GRAD(PARAMS, batch, None)

  mesh = Mesh(np.asarray(devices[:8]).reshape(4, 2), ('data', 'model'))
  param_shardings = nn.logical_to_mesh_sharding(
      params_logical_axes(VARIABLES['params']), mesh, RULES)
  sharded_params = jax.device_put(PARAMS, param_shardings)
  assert sharded_params['token_embedder']['embedding'].sharding.spec == P('model', None)
  sharded_batch = jax.device_put(batch, NamedSharding(mesh, P('data')))
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    (loss, _), grads = jit(jax.value_and_grad(MODEL.loss_fn, has_aux=True))(
        sharded_params, sharded_batch, None)
  np.testing.assert_allclose(loss, ref_loss, atol=1e-5)
  _assert_trees_close(grads, ref_grads, 1e-5)


def test_predict_batch_greedy_sample_beam():
  pytest.importorskip('rest_jax.decoding')
  batch = make_batch(8)
  max_len = batch['decoder_input_tokens'].shape[1]

  def rescore(tokens, lengths):
    """score_batch of decoded outputs [b, n, L] (weights on the first `lengths`).

    Scored one candidate index at a time to reuse SCORE's compiled batch shape.
    """
    L = tokens.shape[2]
    scores = []
    for j in range(tokens.shape[1]):
      w = (jnp.arange(L)[None] < lengths[:, j:j + 1]).astype(jnp.float32)
      scores.append(SCORE(PARAMS, {
          'encoder_input_tokens': batch['encoder_input_tokens'],
          'decoder_input_tokens': shift_right(tokens[:, j]),
          'decoder_target_tokens': tokens[:, j], 'decoder_loss_weights': w}))
    return jnp.stack(scores, axis=1)

  predict = jit(MODEL.predict_batch, static_argnames=('method', 'num_decodes'))
  tokens, aux = predict(PARAMS, batch, method='greedy')
  assert tokens.shape == (4, 1, max_len) and tokens.dtype == jnp.int32
  np.testing.assert_allclose(aux['logprobs'], rescore(tokens, aux['lengths']),
                             atol=1e-4)
  # Greedy tokens are the argmax of teacher-forced logits on themselves.
  flat = tokens[:, 0]
  logits = LOGITS(PARAMS, dict(batch, decoder_input_tokens=shift_right(flat)))
  valid = jnp.arange(max_len)[None] < aux['lengths'][:, 0:1]
  np.testing.assert_array_equal(jnp.where(valid, jnp.argmax(logits, -1), 0), flat)

  tokens, aux = predict(PARAMS, batch, jax.random.PRNGKey(0), method='sample',
                        num_decodes=2)
  assert tokens.shape == (4, 2, max_len)
  np.testing.assert_allclose(aux['logprobs'], rescore(tokens, aux['lengths']),
                             atol=1e-4)

  tokens, aux = predict(PARAMS, batch, method='beam', num_decodes=2)
  assert tokens.shape == (4, 2, max_len)
  np.testing.assert_allclose(aux['logprobs'], rescore(tokens, aux['lengths']),
                             atol=1e-4)
  assert np.all(np.diff(np.asarray(aux['scores']), axis=1) <= 1e-6)  # best first


def test_shared_cross_attention_cache_equals_the_tiled_one(monkeypatch):
  """The N samples / beams of a source read one copy of its cross-attention K/V ('shared_'
  cache leaves); tiling those leaves N times (the former layout, N = 1 per key row) must give
  the same tokens, and log-probs within 1e-5, for sampling and for beam search."""
  from rest_jax import decoding
  batch = make_batch(8)
  cache = MODEL.init_decode_cache(PARAMS, batch['encoder_input_tokens'], 6)
  expanded = decoding.expand_cache(cache, 3)
  layer = expanded['decoder']['layers_0']
  assert layer['encoder_decoder_attention']['shared_key'].shape == (4, 2, 7, 8)
  assert layer['self_attention']['cached_key'].shape == (12, 2, 6, 8)
  assert expanded['decoder']['shared_encoder_mask'].shape == (4, 7)

  def run():  # A fresh function each time, so that tracing reads the patched prefix.
    f = jit(lambda p, b, r, method: MODEL.predict_batch(
        p, b, r, method=method, num_decodes=3, max_decode_len=6), static_argnames='method')
    return f(PARAMS, batch, jax.random.PRNGKey(3), 'sample'), f(PARAMS, batch, None, 'beam')

  shared = run()
  monkeypatch.setattr(decoding, 'SHARED_PREFIX', 'no cache leaf is named like this')
  tiled_layer = decoding.expand_cache(cache, 3)['decoder']['layers_0']
  assert tiled_layer['encoder_decoder_attention']['shared_key'].shape == (12, 2, 7, 8)
  tiled = run()
  for (a_tokens, a_aux), (b_tokens, b_aux) in zip(shared, tiled):
    np.testing.assert_array_equal(a_tokens, b_tokens)
    np.testing.assert_allclose(a_aux['logprobs'], b_aux['logprobs'], atol=1e-5)
  np.testing.assert_allclose(shared[0][1]['token_logprobs_policy'],
                             tiled[0][1]['token_logprobs_policy'], atol=1e-5)
  np.testing.assert_allclose(shared[1][1]['scores'], tiled[1][1]['scores'], atol=1e-5)
  assert len({tuple(np.asarray(t)) for t in shared[0][0].reshape(12, 6)}) > 4  # Real samples.


def test_windowed_sampling_and_greedy_match_a_full_cache(monkeypatch):
  """predict_batch's 'sample' and 'greedy' over a cache of 2 positions extended to 4 and 6
  (decoding.cache_windows) give the tokens of a 6-position cache, log-probs within 1e-5;
  beam search, not registered windowed, gets the full cache."""
  from rest_jax import decoding
  batch = make_batch(8)
  lengths = []
  extend = MODEL.extend_decode_cache
  monkeypatch.setattr(MODEL, 'extend_decode_cache',
                      lambda cache, n: lengths.append(n) or extend(cache, n))
  for method, n, rng in (('sample', 3, jax.random.PRNGKey(5)), ('greedy', 1, None),
                         ('beam', 2, None)):
    lengths.clear()
    run = lambda w: MODEL.predict_batch(PARAMS, batch, rng, method=method, num_decodes=n,
                                        temperature=1.5, max_decode_len=6, first_window=w)
    full, windowed = run(0), run(2)
    assert lengths == ([] if method == 'beam' else [4, 6])
    np.testing.assert_array_equal(windowed[0], full[0])
    np.testing.assert_allclose(windowed[1]['logprobs'], full[1]['logprobs'], atol=1e-5)
  assert decoding.cache_windows(128) == [32, 64, 128]
  assert decoding.cache_windows(48, 32) == [32, 48]
  assert decoding.cache_windows(16, 32) == [16]
  assert decoding.cache_windows(128, 0) == [128]
  cache = MODEL.init_decode_cache(PARAMS, batch['encoder_input_tokens'], 2)
  with pytest.raises(ValueError, match='must end at max_decode_len=6'):
    decoding.temperature_sample(cache, MODEL.make_tokens_to_logits(PARAMS), batch_size=4,
                                max_decode_len=6, eos_id=1, rng=jax.random.PRNGKey(0),
                                windows=[2, 4])


def test_bfloat16_compute():
  model = EncoderDecoderModel(Transformer(dataclasses.replace(TINY, dtype=jnp.bfloat16)))
  batch = make_batch(9)
  logits = jit(model.compute_logits)(PARAMS, batch)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, LOGITS(PARAMS, batch), atol=0.15)


def test_hidden_states_and_encode_decode_match_logits():
  batch = make_batch(3)
  logits = LOGITS(PARAMS, batch)
  got, hidden = jit(functools.partial(MODEL.compute_logits, return_hidden=True))(PARAMS, batch)
  assert hidden.shape == (4, 6, TINY.emb_dim)
  np.testing.assert_array_equal(got, logits)
  # The hidden states are what the output projection reads: logits = h E^T / sqrt(emb_dim).
  emb = PARAMS['token_embedder']['embedding']
  np.testing.assert_allclose(hidden @ emb.T / np.sqrt(TINY.emb_dim), logits, atol=1e-4)
  # encode / decode are the two halves of compute_logits, also under dropout.
  rng = jax.random.PRNGKey(4)
  enc = MODEL.encode(PARAMS, batch['encoder_input_tokens'])
  np.testing.assert_allclose(
      MODEL.decode(PARAMS, enc, batch['encoder_input_tokens'], batch['decoder_input_tokens']),
      logits, atol=1e-5)
  with_dropout = MODEL.compute_logits(PARAMS, batch, rng)
  assert not np.allclose(with_dropout, logits)  # dropout 0.1 is on with an rng


def test_decoding_methods_are_a_registry():
  from rest_jax import decoding, trainer as trainer_lib
  with pytest.raises(ValueError, match=r"Unknown decoding method 'nucleus'.*'beam', 'greedy'"):
    MODEL.predict_batch(PARAMS, make_batch(1), method='nucleus', max_decode_len=5)
  name = 'first_token_test'
  if name not in decoding.DECODE_FNS:
    @decoding.register_decode_fn(name)
    def _always_five(cache, tokens_to_logits, *, batch_size, max_decode_len, num_decodes=1,
                     **unused):
      tokens = jnp.full((batch_size, num_decodes, max_decode_len), 5, jnp.int32)
      return tokens, {'lengths': jnp.full((batch_size, num_decodes), max_decode_len)}
  tokens, aux = MODEL.predict_batch(PARAMS, make_batch(1), method=name, num_decodes=2,
                                    max_decode_len=3)
  assert tokens.shape == (4, 2, 3) and (np.asarray(tokens) == 5).all()
  with pytest.raises(ValueError, match='already registered'):
    decoding.register_decode_fn('greedy')(lambda *a, **k: None)
  # Models are declared, not duck-typed: the trainer refuses anything else, naming the interface.
  class Duck:
    def loss_fn(self, params, batch, rng):
      return 0.0, {}
  with pytest.raises(TypeError, match='Duck is not a rest_jax.models.base.BaseModel'):
    trainer_lib.Trainer(Duck(), optax.sgd(0.1), mesh=None)
