"""`improve.improve` with the losses that own extra params: `bvmpo` (a frozen prior: the optimizer
partition `optax.set_to_zero`, the prior restored from the BC policy) and `oac` (a trained value
head); the best checkpoint holds policy params only; the prior of a standalone Improve step from
an earlier one is the chain's BC policy; a NaN run stops without saving its bad state.

Tiny policy (test_grow.py's size), 16 hand-made records, 4 dev pairs (the SeqIO dev split and
detokenizer replaced by in-memory ones), 3 optimizer steps per run, evaluated at the end.
"""

import json
import os

import gin
import jax
import numpy as np
import pytest

from rest_jax import fileio, improve, input_pipeline, losses, partitioning, trainer as trainer_lib
from rest_jax.models import EncoderDecoderModel, Transformer, TransformerConfig, unbox

V, LS, LT, B = 32, 16, 12, 8
SHAPES = {'encoder_input_tokens': (B, LS), 'decoder_input_tokens': (B, LT)}
MODEL = EncoderDecoderModel(Transformer(TransformerConfig(
    vocab_size=V, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=1,
    num_decoder_layers=1, dropout_rate=0.0, max_len=64)))
NUM_STEPS = 3


def make_records():
  """4 sources x 4 candidates (EOS = 1 last) with rewards spread inside each source."""
  rng = np.random.default_rng(0)
  records = []
  for s in range(4):
    src = [int(t) for t in rng.integers(3, V, 5 + s)] + [1]
    for j in range(4):
      cand = [int(t) for t in rng.integers(3, V, 3 + j)] + [1]
      records.append(dict(source_ids=src, candidate_ids=cand, reward=0.2 + 0.2 * j,
                          source_index=s, origin='sample' if j else 'reference'))
  return records


def make_dev():
  arrays = improve.records_to_arrays(make_records()[::4], LS, LT)
  texts = [' '.join(map(str, r)) for r in arrays['decoder_target_tokens']]
  return input_pipeline.TaskData({k: v for k, v in arrays.items()
                                  if k not in ('reward', 'source_index')},
                                 texts, texts, [f'dev-{i}' for i in range(4)], 0)


class RisingScorer:
  """A dev 'reward' that rises with every call (0.1, 0.2, ...): each evaluation is the new best,
  so the best checkpoint is the last step's policy."""

  def __init__(self):
    self.calls = 0

  def score_ids(self, sources, ids, references=None, batch_size=None):
    self.calls += 1
    return np.full(len(ids), 0.1 * self.calls, np.float32)


@jax.jit
def _random_params(rng):
  return unbox(MODEL.get_initial_variables(rng, SHAPES)['params'])


def save_policy(path, seed, summary=None):
  """A random tiny policy saved as a BC run (best/, as `rest.import_policy` writes one), or as
  an Improve step with `summary`."""
  params = jax.device_get(_random_params(jax.random.PRNGKey(seed)))
  ckpt = trainer_lib.Checkpointer(str(path), best_metric='imported')
  ckpt.save_best(trainer_lib.TrainState(step=np.int32(0), params=params, opt_state=None),
                 {'imported': 1.0})
  if summary is not None:
    fileio.write_json(os.path.join(str(path), 'improve_summary.json'), summary)
  return params


@pytest.fixture(scope='module')
def policies(tmp_path_factory):
  """(bc_dir, bc params, step_dir, step params): a BC run and an 'Improve step' started from it
  (different random params, so the prior and the starting policy differ)."""
  root = tmp_path_factory.mktemp('policies')
  bc = save_policy(root / 'bc', seed=1)
  step = save_policy(root / 'improve_1_0', seed=0,
                     summary={'init_policy_dir': str(root / 'bc'), 'prior_policy_dir': None,
                              'complete': True})
  return str(root / 'bc'), bc, str(root / 'improve_1_0'), step


def run_improve(model_dir, init_dir, loss, monkeypatch, learning_rate=1e-2, **kw):
  monkeypatch.setattr(input_pipeline, 'cached_task_data', lambda *a, **k: make_dev())
  monkeypatch.setattr(input_pipeline, 'detokenizer', lambda task: lambda ids: ' '.join(map(str, ids)))
  # A learning rate large enough that weight decay would move an unfrozen prior in float32.
  gin.bind_parameter('improve/make_optimizer.learning_rate', learning_rate)
  gin.bind_parameter('improve/make_optimizer.warmup_steps', 1)
  gin.bind_parameter('improve/make_optimizer.schedule', 'constant')
  args = dict(model=MODEL, scored_dir='unused', init_policy_dir=init_dir, task='tiny', loss=loss,
              batch_size=B, inputs_length=LS, targets_length=LT, num_steps=NUM_STEPS,
              eval_every_steps=NUM_STEPS, patience=10, dev_examples=4, max_decode_len=8,
              records=make_records(), scorer=RisingScorer(),
              initial_dev={'reward': -1.0, 'bleu': 0.0, 'chrf': 0.0})
  args.update(kw)
  return improve.improve(str(model_dir), **args)


def final_state(model_dir, loss):
  """The whole Improve state of the last step, from `model_dir/checkpoints`."""
  with_prior = losses.needs_prior(loss)
  t = trainer_lib.Trainer(improve.ImproveModel(MODEL, loss, with_prior),
                          improve._optimizer(with_prior)[0], partitioning.create_mesh())
  state = trainer_lib.Checkpointer(str(model_dir)).restore_latest(t.abstract_state(SHAPES))
  return jax.device_get(state)


def leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def check_best_is_the_policy(model_dir, state):
  """best/ holds policy params only (a BC-run layout) and restores to the last step's policy."""
  best = trainer_lib.restore_params(str(model_dir),
                                    trainer_lib.abstract_params(MODEL, partitioning.create_mesh()))
  assert set(best) == set(state.params['policy'])
  assert leaves_equal(jax.device_get(best), state.params['policy'])


def test_bvmpo_improve_keeps_the_derived_bc_prior_frozen(tmp_path, policies, monkeypatch):
  bc_dir, bc, step_dir, step = policies
  # Standalone, from an earlier Improve step, no prior given: the prior is that chain's BC run.
  summary = run_improve(tmp_path / 'bvmpo', step_dir, 'bvmpo', monkeypatch)
  assert summary['prior_policy_dir'] == os.path.abspath(bc_dir)
  assert summary['steps'] == NUM_STEPS and summary['best_step'] == NUM_STEPS
  state = final_state(tmp_path / 'bvmpo', 'bvmpo')
  assert int(state.step) == NUM_STEPS and set(state.params) == {'policy', 'aux', 'prior'}
  assert leaves_equal(state.params['prior'], bc)          # Restored from bc/, bitwise frozen ...
  assert not leaves_equal(state.params['prior'], step)
  assert not leaves_equal(state.params['policy'], step)   # ... while the policy trained.
  m = summary['final_metrics']
  assert m['kl'] > 1e-4  # A KL to a different policy really entered the loss.
  # The last step's weight: the anneal of this step, restarted at 1 (`kl_weight_schedule`).
  np.testing.assert_allclose(m['kl_weight'], losses.kl_weight_schedule(NUM_STEPS - 1, NUM_STEPS),
                             rtol=1e-5)
  check_best_is_the_policy(tmp_path / 'bvmpo', state)


def test_oac_improve_trains_the_value_head(tmp_path, policies, monkeypatch):
  bc_dir, bc, _, _ = policies
  summary = run_improve(tmp_path / 'oac', bc_dir, 'oac', monkeypatch)
  assert summary['prior_policy_dir'] is None
  state = final_state(tmp_path / 'oac', 'oac')
  assert set(state.params) == {'policy', 'aux'}
  aux = state.params['aux']  # Zero-initialised; the critic's loss moved it toward the rewards.
  assert np.abs(aux['kernel']).max() > 1e-4 and aux['bias'][0] > 1e-4
  assert not leaves_equal(state.params['policy'], bc)
  assert summary['final_metrics']['mean_value'] > 0.0
  check_best_is_the_policy(tmp_path / 'oac', state)


def test_prior_is_the_bc_policy_of_the_improve_chain(tmp_path):
  def step(name, init, prior=None):
    fileio.write_json(str(tmp_path / name / 'improve_summary.json'),
                           {'init_policy_dir': str(tmp_path / init), 'prior_policy_dir': prior})
  os.makedirs(tmp_path / 'bc')
  os.makedirs(tmp_path / 'other')
  step('i0', 'bc')                                 # A bc-loss step: no prior recorded.
  step('i1', 'i0')
  step('i2', 'i1', prior=str(tmp_path / 'other'))  # A step given another prior: it is kept.
  step('i3', 'i2')
  resolve = improve.resolve_prior_policy_dir
  assert resolve(str(tmp_path / 'bc')) == str(tmp_path / 'bc')
  assert resolve(str(tmp_path / 'i1')) == str(tmp_path / 'bc')
  assert resolve(str(tmp_path / 'i3')) == str(tmp_path / 'other')
  assert resolve(str(tmp_path / 'i3'), str(tmp_path / 'given')) == str(tmp_path / 'given')
  step('moved', 'gone')
  with pytest.raises(ValueError, match='prior_policy_dir'):
    resolve(str(tmp_path / 'moved'))


def test_nan_learning_rate_stops_improve_before_saving(tmp_path, policies, monkeypatch):
  bc_dir = policies[0]
  model_dir = tmp_path / 'nan'
  with pytest.raises(trainer_lib.NonFiniteLossError) as err:
    run_improve(model_dir, bc_dir, 'bc', monkeypatch, learning_rate=float('nan'))
  # Step 1's loss is finite (computed before its NaN update), steps 2 and 3's are not; the
  # evaluation at step 3 finds them, names the first, and only step 0's checkpoints exist.
  assert err.value.step == 2 and 'non-finite training loss nan at step 2;' in str(err.value)
  assert f"latest {model_dir / 'checkpoints' / '0'} (step 0)" in str(err.value)
  assert os.listdir(model_dir / 'checkpoints') == ['0'] and os.listdir(model_dir / 'best') == ['0']
  with open(model_dir / 'improve_summary.json') as f:
    assert [e['step'] for e in json.load(f)['history']] == [0]
