"""`rest-jax train` / `rest-jax eval` end to end on the real corpus with a very small model."""

import json
import os

import gin
import pytest

from rest_jax import fileio
from rest_jax import main as main_lib

SMALL = [
    '--gin.models.TransformerConfig.emb_dim=32', '--gin.models.TransformerConfig.mlp_dim=64',
    '--gin.models.TransformerConfig.num_heads=2', '--gin.models.TransformerConfig.head_dim=16',
    '--gin.models.TransformerConfig.num_encoder_layers=1',
    '--gin.models.TransformerConfig.num_decoder_layers=1',
    '--gin.train.batch_size=8', '--gin.train.inputs_length=32', '--gin.train.targets_length=32',
    '--gin.train.eval_every_steps=3', '--gin.train.eval_examples=8',
    '--gin.train.checkpoint_every_steps=3', '--gin.train.max_decode_len=8',
    '--gin.train.eval_at_minutes=(0,)', '--gin.train.test_examples=8',
    '--gin.evaluate.inputs_length=32', '--gin.evaluate.targets_length=32',
    '--gin.evaluate.max_decode_len=8', "--gin.evaluate.splits=('validation',)",
    '--gin.make_optimizer.warmup_steps=2', '--gin.train.max_train_examples=64',
    '--gin.evaluate.max_examples=16',
]


def run(args):
  gin.clear_config()
  main_lib.main(args)


def test_train_resume_and_eval(tmp_path):
  workdir = str(tmp_path)
  base = ['--gin_file=gin_configs/runs/train_bc.gin', f'--workdir={workdir}'] + SMALL
  run(['train', '--gin.train.num_steps=4'] + base)
  model_dir = os.path.join(workdir, 'bc')
  with open(os.path.join(model_dir, 'train_summary.json')) as f:
    first = json.load(f)
  assert first['steps'] == 4
  assert first['eval_at_minutes'][0]['minutes'] == 0
  assert first['eval_at_minutes'][0]['bleu_signature'].startswith('nrefs:1|case:mixed')
  assert os.path.exists(os.path.join(model_dir, 'config.gin'))
  assert sorted(os.listdir(os.path.join(model_dir, 'checkpoints'))) == ['3', '4']

  run(['train', '--gin.train.num_steps=6'] + base)  # Resumes at step 4, not from scratch.
  with open(os.path.join(model_dir, 'train_summary.json')) as f:
    second = json.load(f)
  assert second['steps'] == 6
  assert second['train_seconds'] >= first['train_seconds']

  run(['eval'] + base)
  with open(os.path.join(model_dir, 'eval_validation.json')) as f:
    result = json.load(f)
  assert result['num_sentences'] == 16
  assert result['chrf_signature'].startswith('nrefs:1')
  with open(os.path.join(model_dir, 'eval_validation.hyp.txt')) as f:
    assert len(f.read().splitlines()) == 16


def test_bad_flags():
  with pytest.raises(SystemExit, match='expected --gin.NAME=VALUE'):
    main_lib.main(['train', '--gin.train.batch_size'])
  with pytest.raises(FileNotFoundError, match='nope.gin'):
    run(['train', '--gin_file=gin_configs/runs/nope.gin'])


def test_model_smaller_than_vocabulary_is_refused(tmp_path):
  with pytest.raises(ValueError, match='vocab_size=64 but task .* 8000 pieces'):
    run(['train', '--gin_file=gin_configs/runs/train_bc.gin', f'--workdir={tmp_path}',
         '--gin.models.TransformerConfig.vocab_size=64'] + SMALL)


def test_train_starts_from_an_npz_policy(tmp_path, monkeypatch):
  """`train.init_params_dir` may name a `save_params_npz` file: training starts from its params."""
  import flax
  import jax
  import numpy as np
  from rest_jax import trainer as trainer_lib
  starts = []
  original = trainer_lib.Trainer.init_state

  def spy(self, input_shapes, params=None):
    state = original(self, input_shapes, params=params)
    starts.append(flax.traverse_util.flatten_dict(jax.device_get(state.params), sep='/'))
    return state
  monkeypatch.setattr(trainer_lib.Trainer, 'init_state', spy)
  base = ['--gin_file=gin_configs/runs/train_bc.gin'] + SMALL + ['--gin.train.num_steps=1']
  run(['train', f'--workdir={tmp_path / "a"}'] + base)
  npz = str(tmp_path / 'policy.npz')  # Run a's initial params, float32 (an exact round trip).
  fileio.save_params_npz(npz, flax.traverse_util.unflatten_dict(starts[0], sep='/'),
                              dtype=np.float32)
  run(['train', f'--workdir={tmp_path / "b"}', '--gin.train.seed=1'] + base)
  run(['train', f'--workdir={tmp_path / "c"}', '--gin.train.seed=1'] + base
      + [f"--gin.train.init_params_dir='{npz}'"])
  a, b, c = starts
  assert a.keys() == c.keys()
  assert any(not np.array_equal(a[k], b[k]) for k in a)  # Seed 1 alone starts elsewhere ...
  for k in a:                                              # ... but from the .npz: run a's start.
    np.testing.assert_array_equal(c[k], a[k], err_msg=k)


@pytest.mark.parametrize('name', sorted(os.listdir(os.path.join(main_lib._ROOT, 'gin_configs',
                                                                'runs'))))
def test_every_run_config_parses(name):
  # Every include resolves and every binding names a registered configurable (a typo raises).
  gin.clear_config()
  main_lib.parse_gin([os.path.join('gin_configs', 'runs', name)], [])
  if name.startswith('train_rm'):
    from rest_jax.rewards import model as rm_model
    config = gin.query_parameter('train_reward_model.config').scoped_configurable_fn()
    assert isinstance(config, rm_model.RewardModelConfig)
    assert config.emb_dim == {'train_rm.gin': 32, 'train_rm_small.gin': 64}[name]
  gin.clear_config()


def test_translate_a_file_with_the_shipped_policy_as_eval_does(tmp_path, capsys):
  """`rest-jax translate` of test sources = `rest-jax eval`'s greedy translations of them; a
  policy of another vocabulary is refused with both hashes."""
  from rest_jax import input_pipeline
  npz = 'checkpoints/bc_tiny_libreoffice_de_en/params.npz'
  work = str(tmp_path / 'work')
  main_lib.main(['eval', '--gin_file=models/tiny.gin', f'--model_dir={npz}', f'--workdir={work}',
                 '--gin.evaluate.model=%MODEL', "--gin.evaluate.splits=('test',)",
                 '--gin.evaluate.max_examples=6'])
  hyps = open(os.path.join(work, 'eval', 'eval_test.hyp.txt')).read().splitlines()
  gin.clear_config()
  test = input_pipeline.cached_task_data('libreoffice_help_de_en', 'test', 128, 128,
                                         os.path.join(work, 'cache'), max_examples=6)
  src = tmp_path / 'de.txt'
  src.write_text('\n'.join(test.inputs[:3] + [''] + test.inputs[3:]) + '\n', encoding='utf-8')
  main_lib.main(['translate', '--gin_file=models/tiny.gin', f'--policy={npz}',
                 f'--input={src}', f'--output={tmp_path / "en.txt"}', f'--workdir={work}'])
  got = (tmp_path / 'en.txt').read_text(encoding='utf-8').splitlines()
  assert got == hyps[:3] + [''] + hyps[3:] and len(hyps) == 6 and all(hyps)
  gin.clear_config()
  with pytest.raises(ValueError, match=r'another vocabulary \(sha256 29ec9d88.*sha256 b9579002'):
    main_lib.main(['translate', '--gin_file=models/tiny.gin', f'--workdir={work}',
                   '--policy=checkpoints/base_tiny_math_arithmetic_chain/params.npz',
                   f'--input={src}'])
  gin.clear_config()
  with pytest.raises(ValueError, match='learned reward model'):
    main_lib.main(['translate', '--gin_file=models/tiny.gin', f'--policy={npz}',
                   f'--input={src}', '--method=sample', '--num_decodes=4', f'--workdir={work}'])
