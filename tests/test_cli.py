"""`rest-jax train` / `rest-jax eval` end to end on the real corpus with a very small model."""

import json
import os

import gin
import pytest

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
