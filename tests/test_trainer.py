"""Trainer: sharded step equals the 1-device step, exact kill-and-resume, gradient accumulation."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rest_jax import data as data_lib
from rest_jax import partitioning, trainer as trainer_lib
from rest_jax.models import EncoderDecoderModel, Transformer, TransformerConfig

B, LS, LT, V = 8, 12, 10, 48
SHAPES = {'encoder_input_tokens': (B, LS), 'decoder_input_tokens': (B, LT)}


def make_model(dropout=0.1):
  cfg = TransformerConfig(vocab_size=V, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                          num_encoder_layers=1, num_decoder_layers=1, dropout_rate=dropout,
                          max_len=64)
  return EncoderDecoderModel(Transformer(cfg), label_smoothing=0.1)


def make_arrays(n=64, seed=0):
  rng = np.random.default_rng(seed)
  src = rng.integers(3, V, size=(n, LS)).astype(np.int32)
  tgt = rng.integers(3, V, size=(n, LT)).astype(np.int32)
  for i in range(n):  # Variable lengths: EOS then padding.
    ls, lt = rng.integers(3, LS), rng.integers(3, LT)
    src[i, ls], src[i, ls + 1:] = 1, 0
    tgt[i, lt], tgt[i, lt + 1:] = 1, 0
  dec_in = np.pad(tgt, ((0, 0), (1, 0)))[:, :-1]
  return {'encoder_input_tokens': src, 'decoder_input_tokens': dec_in,
          'decoder_target_tokens': tgt, 'decoder_loss_weights': (tgt > 0).astype(np.float32)}


def run(trainer, batcher, state, steps, start=0):
  losses = []
  for step in range(start, start + steps):
    batch = partitioning.shard_batch(batcher.batch_at(step), trainer.mesh)
    state, metrics = trainer.train_step(state, batch)
    losses.append(float(metrics['loss']))
  return state, losses


def new_trainer(mesh, **kw):
  return trainer_lib.Trainer(make_model(kw.pop('dropout', 0.1)),
                             trainer_lib.make_optimizer(learning_rate=3e-3, warmup_steps=2, eps=1e-6),
                             mesh, seed=3, **kw)


def test_sharded_step_matches_single_device():
  batcher = data_lib.ArrayBatcher(make_arrays(), B, seed=1, length_buckets=())
  results = {}
  for name, mesh in [('1', partitioning.create_mesh(1, jax.devices()[:1])),
                     ('8x1', partitioning.create_mesh(1)),
                     ('4x2', partitioning.create_mesh(2))]:
    t = new_trainer(mesh)
    state = t.init_state(SHAPES)
    state, losses = run(t, batcher, state, 4)
    results[name] = (losses, jax.device_get(state.params))
  for name in ('8x1', '4x2'):
    np.testing.assert_allclose(results[name][0], results['1'][0], rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5),
                 results[name][1], results['1'][1])
  # Params really are sharded over 'model' on the 4x2 mesh (vocab axis of the embedding).
  t = new_trainer(partitioning.create_mesh(2))
  state = t.init_state(SHAPES)
  specs = [leaf.sharding.spec for leaf in jax.tree.leaves(state.params)]
  assert any('model' in tuple(s) for s in specs)


def test_kill_and_resume_equals_uninterrupted(tmp_path):
  mesh = partitioning.create_mesh(2)
  batcher = data_lib.ArrayBatcher(make_arrays(), B, seed=1)
  t = new_trainer(mesh)
  straight, straight_losses = run(t, batcher, t.init_state(SHAPES), 6)
  straight = jax.device_get(straight)

  t1 = new_trainer(mesh)
  first, losses_a = run(t1, batcher, t1.init_state(SHAPES), 3)
  trainer_lib.Checkpointer(str(tmp_path)).save(first)
  del first, t1  # "Killed": a new process would start here.

  t2 = new_trainer(mesh)
  fresh = t2.init_state(SHAPES)
  restored = trainer_lib.Checkpointer(str(tmp_path)).restore_latest(fresh)
  assert int(restored.step) == 3
  resumed, losses_b = run(t2, batcher, restored, 3, start=3)
  np.testing.assert_allclose(losses_a + losses_b, straight_losses, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               jax.device_get(resumed), straight)


def test_microbatches_average_gradients():
  mesh = partitioning.create_mesh(1)
  batch = data_lib.ArrayBatcher(make_arrays(), B, length_buckets=()).batch_at(0)
  sharded = partitioning.shard_batch(batch, mesh)
  outs = []
  for m in (1, 2, 4):
    t = new_trainer(mesh, dropout=0.0, num_microbatches=m)
    state = t.init_state(SHAPES)
    state, metrics = t.train_step(state, sharded)
    outs.append((float(metrics['loss']), jax.device_get(state.params)))
  # Accumulation weights microbatches by their tokens: the same loss and update as one big batch.
  for loss, params in outs[1:]:
    assert abs(loss - outs[0][0]) < 1e-5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params, outs[0][1])


def test_best_checkpoint_and_restore_params(tmp_path, monkeypatch):
  mesh = partitioning.create_mesh(1)
  t = new_trainer(mesh)
  state = t.init_state(SHAPES)
  ckpt = trainer_lib.Checkpointer(str(tmp_path), best_metric='dev_bleu')
  batcher = data_lib.ArrayBatcher(make_arrays(), B)
  saved = {}
  for step, (bleu, expect_best) in enumerate([(3.0, True), (7.0, True), (5.0, False)]):
    state, _ = run(t, batcher, state, 1, start=step)
    assert ckpt.save_best(state, {'dev_bleu': bleu}) == expect_best
    saved[bleu] = jax.device_get(state.params)
  assert ckpt.best_metrics()['dev_bleu'] == 7.0
  params = trainer_lib.restore_params(str(tmp_path), t.abstract_state(SHAPES).params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), saved[7.0])
  # A relative run dir (the CLI's default --workdir=workdir) restores too: orbax wants absolute
  # paths.
  monkeypatch.chdir(tmp_path.parent)
  params = trainer_lib.restore_params(tmp_path.name, t.abstract_state(SHAPES).params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), saved[7.0])


def test_learning_rate_schedules():
  def lr_at(opt, step):
    params = {'w': jnp.ones((2, 2))}
    state = opt.init(params)
    for _ in range(step + 1):
      updates, state = opt.update({'w': jnp.ones((2, 2))}, state, params)
    return updates
  # rsqrt: warm-up reaches the peak at `warmup_steps`, then decays as sqrt(warmup / step).
  opt = trainer_lib.make_optimizer(learning_rate=1.0, warmup_steps=4, clip_norm=None,
                                   weight_decay=0.0)
  with pytest.raises(ValueError, match='unknown schedule'):
    trainer_lib.make_optimizer(schedule='linear')
  # Adam's first update has magnitude lr(step 0) (sign of the gradient); lr(0) = 1/4 with warm-up 4.
  np.testing.assert_allclose(np.abs(lr_at(opt, 0)['w']), 0.25, rtol=1e-3)
  # with_schedule: the schedule the optimizer applies (a constant gradient: |update k| = lr(k)).
  for name in ('rsqrt', 'cosine', 'constant'):
    opt, lr = trainer_lib.make_optimizer(learning_rate=1.0, warmup_steps=4, schedule=name,
                                         decay_steps=10, clip_norm=None, weight_decay=0.0,
                                         with_schedule=True)
    for k in (0, 3, 6):
      np.testing.assert_allclose(np.abs(lr_at(opt, k)['w']), float(lr(np.int32(k))), rtol=1e-3)
  assert float(lr(np.int32(6))) == 1.0  # constant after the warm-up.


def test_batcher_is_a_pure_function_of_step():
  arrays = make_arrays(n=40)
  a = data_lib.ArrayBatcher(arrays, 8, seed=5)
  b = data_lib.ArrayBatcher(arrays, 8, seed=5)
  seen = []
  for step in (0, 7, 3, 12):  # Any order, any instance: the same batch.
    x, y = a.batch_at(step), b.batch_at(step)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  for step in range(5):  # One epoch = 5 batches visits every example once.
    seen.extend(map(tuple, a.batch_at(step)['encoder_input_tokens'].tolist()))
  assert len(seen) == 40
  # Batches are trimmed to the smallest bucket holding their longest source or target; trimming
  # only ever drops padding.
  c = data_lib.ArrayBatcher(arrays, 8, seed=5, length_buckets=(4, 8, 10, 16))
  for step in range(5):
    full, cut = a.batch_at(step), c.batch_at(step)
    longest = max(data_lib.lengths(full['decoder_target_tokens']).max(),
                  data_lib.lengths(full['encoder_input_tokens']).max())
    bucket = min(b for b in (4, 8, 10, 16) if b >= longest)
    for k in full:
      n = min(bucket, full[k].shape[1])  # Capped at the arrays' own width.
      assert cut[k].shape[1] == n
      np.testing.assert_array_equal(cut[k], full[k][:, :n])
      assert not full[k][:, n:].any()
  assert data_lib.bucket_length(20, (8, 16)) == 20  # Longer than every bucket: not truncated.
  with pytest.raises(ValueError, match='cannot fill one batch'):
    data_lib.ArrayBatcher(arrays, 64)


def test_nan_loss_stops_training_before_the_bad_state_is_saved(tmp_path, monkeypatch):
  """A poisoned row (a NaN loss weight) first batched at step 5: `train` raises at the next
  check (the save at step 6) naming step 5 and the last good checkpoint (step 4); no checkpoint of
  step 5 or later exists, and the saved ones are finite."""
  from rest_jax import input_pipeline, train as train_lib
  arrays = make_arrays()
  batcher = data_lib.ArrayBatcher(arrays, B, seed=0)  # `train`'s batcher (seed 0).
  bad_row = int(batcher._epoch_plan(0)[4][0])         # In the batch of 0-based step 4 only.
  arrays['decoder_loss_weights'][bad_row, 0] = np.nan
  texts = [str(i) for i in range(len(arrays['encoder_input_tokens']))]
  data = input_pipeline.TaskData(arrays, texts, texts, texts, 0)
  monkeypatch.setattr(input_pipeline, 'cached_task_data', lambda *a, **k: data)
  monkeypatch.setattr(input_pipeline, 'check_vocab_size', lambda *a: None)
  monkeypatch.setattr(input_pipeline, 'detokenizer', lambda task: str)
  monkeypatch.setattr(train_lib.summaries, 'metric_writer', lambda logdir: None)
  model_dir = str(tmp_path / 'run')
  with pytest.raises(trainer_lib.NonFiniteLossError) as err:
    train_lib.train(model_dir, model=make_model(), task='tiny', batch_size=B, inputs_length=LS,
                    targets_length=LT, num_steps=8, eval_every_steps=1000,
                    checkpoint_every_steps=2, train_data=data)
  msg = str(err.value)
  assert err.value.step == 5 and 'non-finite training loss nan at step 5;' in msg, msg
  latest = os.path.join(model_dir, 'checkpoints', '4')
  assert f'Last good checkpoint: latest {latest} (step 4)' in msg, msg
  assert sorted(os.listdir(os.path.join(model_dir, 'checkpoints'))) == ['2', '4']
  t = new_trainer(partitioning.create_mesh())
  restored = trainer_lib.Checkpointer(model_dir).restore_latest(t.abstract_state(SHAPES))
  assert int(restored.step) == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(restored.params)))
  # Non-finite params (e.g. a NaN learning rate) are caught before a save even with finite losses.
  guard = trainer_lib.LossGuard('run')
  guard.add(1, jnp.float32(0.5))
  state = trainer_lib.TrainState(step=jnp.int32(1), params={'w': jnp.array([1.0, np.inf])},
                                 opt_state=None)
  with pytest.raises(FloatingPointError, match='non-finite parameters at step 1; .* none'):
    guard.check(state)
