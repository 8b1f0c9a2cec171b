"""Compute estimates (rest_jax/compute.py) checked by hand."""

import math
import os
import sys

import gin
import pytest

from rest_jax import accelerators, compute

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A made-up policy small enough to add up on paper: V = 10, d = 5 (embedding 50 params), one
# encoder layer of 100 params, one decoder layer of 200, 1 head of width 2, bf16 activations.
TOY = compute.ModelShape(encoder_params=100, decoder_params=200, embedding_params=50,
                         vocab_size=10, emb_dim=5, num_heads=1, head_dim=2, num_encoder_layers=1,
                         num_decoder_layers=1, param_bytes=4, act_bytes=2)


def test_formulas_by_hand():
  # src 3, tgt 4: 2*100*3 + 2*200*4 + 2*50*4 (logits) + attention 4*1*2 * (3*3 + 4*4 + 4*3).
  assert compute.forward_flops(TOY, 3, 4) == 600 + 1600 + 400 + 8 * (9 + 16 + 12) == 2896
  assert compute.train_flops(TOY, 3, 4, examples=10) == 3 * 2896 * 10
  # 8 rows on 2 chips, src 3, decode buffer 4: 4 rows a chip, KV per row = K and V * 1 layer *
  # (4 + 3) positions * 1 head * 2 wide * 2 bytes = 56; params (decoder + embedding) 250 * 4 bytes.
  step = compute.decode_step_cost(TOY, rows=8, src_len=3, max_decode_len=4, num_chips=2)
  assert step['params_bytes'] == 1000 and step['kv_bytes'] == 4 * 56
  assert step['bytes'] == 1224
  assert step['flops'] == 4 * (2 * 250 + 4 * 1 * 1 * 2 * 7)


def test_grow_estimate_by_hand_on_v5e_8():
  acc = accelerators.parse('v5e-8')
  assert (acc.num_chips, acc.chip.hbm_bandwidth, acc.chip.peak_bf16_flops) == (8, 819e9, 197e12)
  # 1,000 sources x 4 samples, 64 rows a batch: ceil(4000 / 64) = 63 batches of 16 steps.
  got = compute.decode_seconds(TOY, acc, examples=1000, rows_per_batch=64, num_decodes=4,
                               src_len=3, max_decode_len=16, mfu=0.5)
  kv = 8 * 2 * 1 * (16 + 3) * 1 * 2 * 2        # 8 rows a chip.
  step_s = (1000 + kv) / 819e9                   # Bandwidth-bound: FLOPs take far less.
  assert 8 * (2 * 250 + 8 * 19) / 197e12 < step_s
  encode_s = (2 * 100 * 3 + 4 * 2 * 9) * 1000 / (8 * 197e12 * 0.5)
  assert got['decode_steps'] == 63 * 16 and got['bandwidth_bound']
  assert math.isclose(got['seconds'], 63 * 16 * step_s + encode_s, rel_tol=1e-12)


def test_param_count_of_the_real_tiny_model():
  from rest_jax import main as main_lib
  main_lib.parse_gin(['gin_configs/models/tiny.gin'], [])
  shape = compute.policy_shape(gin.query_parameter('%MODEL').scoped_configurable_fn())
  d, h, k, f, v = 256, 4, 64, 1024, 8000
  attn = 3 * (d * h * k + h * k) + h * k * d + d        # q, k, v kernels + biases; out + bias.
  mlp = d * f + f + f * d + d
  norm = 2 * d
  assert shape.embedding_params == v * d
  assert shape.encoder_params == 3 * (attn + mlp + 2 * norm) + norm
  assert shape.decoder_params == 3 * (2 * attn + mlp + 3 * norm) + norm
  assert (shape.param_bytes, shape.act_bytes) == (4, 4)


def test_iwslt_config_estimate(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, 'scripts'))
  import compute_estimate
  out = tmp_path / 'est.json'
  compute_estimate.main(['gin_configs/runs/rest_iwslt14_de_en.gin', '--accelerator=v5e-8',
                         f'--json={out}'])
  import json
  [r] = json.loads(out.read_text())
  est = r['estimates']['v5e-8']
  stages = {s['stage']: s for s in est['stages']}
  assert stages['grow']['samples'] == 160_239 * 100 and stages['grow']['count'] == 2
  assert stages['improve']['count'] == 2 * 5 and stages['improve']['steps'] == 5000
  assert 40e6 < est['params']['policy_total'] < 60e6  # iwslt size, 32k vocabulary.
  assert math.isclose(est['hours_total'], sum(s['hours_total'] for s in est['stages']))
  with pytest.raises(ValueError, match='cpu'):
    compute.estimate({}, compute.ModelShape(1, 1, 1, 1, 1, 1, 1, 1, 1), None,
                     accelerators.parse('cpu'))


def test_online_estimate_by_hand_and_the_paper_scale_ppo_config(tmp_path):
  acc = accelerators.parse('v5e-8')
  w = {'loop': 'online', 'task': 't', 'online': dict(
      inputs_length=3, max_decode_len=16, max_samples=1000, sources_per_rollout=16, num_decodes=4,
      ppo_epochs=2, minibatch_size=32, eval_every_samples=500, dev_examples=10,
      test_examples=20, rm_max_len=8)}
  got = {s['stage']: s for s in compute.estimate_online(w, TOY, 7, acc, mfu=0.5)['stages']}
  # 1,000 samples in rollouts of 64: 16 rollouts, each one decode batch of 64 rows.
  assert got['rollouts']['count'] == 16 and got['rollouts']['decode_steps'] == 16 * 16
  assert math.isclose(got['rollouts']['seconds_each'], compute.decode_seconds(
      TOY, acc, 16, 64, 4, 3, 16, 0.5)['seconds'])
  score = (2 * compute.forward_flops(TOY, 3, 16) + 2 * 7 * 8) * 64
  assert math.isclose(got['rollout_scoring']['seconds_each'], score / (8 * 197e12 * 0.5))
  assert math.isclose(got['updates']['seconds_each'],
                      compute.train_flops(TOY, 3, 16, 64 * 2) / (8 * 197e12 * 0.5))
  assert got['updates']['steps'] == 16 * 2 * 2 and got['evaluation']['count'] == 1 + 2
  sys.path.insert(0, os.path.join(ROOT, 'scripts'))
  import compute_estimate
  r = compute_estimate.run('gin_configs/runs/ppo_iwslt14_de_en.gin', ['h100x8'])
  est = r['estimates']['h100x8']
  stages = {s['stage']: s for s in est['stages']}
  assert r['loop'] == 'online' and stages['rollouts']['samples'] == 160_239 * 100
  assert est['params']['reward_model'] is not None and 40e6 < est['params']['policy_total'] < 60e6
