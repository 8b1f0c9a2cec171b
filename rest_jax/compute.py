"""Compute estimates per stage of a ReST / ReST-EM / online RL run config on a TPU or GPU slice.

    python scripts/compute_estimate.py gin_configs/runs/rest_iwslt14_de_en.gin --accelerator=v5e-8

Stated assumptions (each a function argument; the defaults are our choices):
  * Peak figures per chip from the vendors (`accelerators.CHIPS`: bf16 dense FLOP/s, HBM
    bandwidth); the work is data-parallel over every chip of the slice (params replicated,
    `create_mesh.num_partitions = 1` as in the configs).
  * Training (BC / base model, Improve / M-step, reward model) is compute-bound at an assumed
    model-FLOP utilisation `mfu` (default 0.4). FLOPs per example = 3 x the forward pass
    (backward = 2 x forward), forward = 2 x params x tokens over the matmul params (encoder params
    x source tokens, decoder params x target tokens, the tied output projection V x d x target
    tokens) + attention's score and value products (4 x L_q x L_k x heads x head_dim per layer).
    Rows are padded to the configured feature lengths (an upper bound: length buckets trim them).
  * Sampling (Grow / E-step, greedy evaluation) is memory-bandwidth-bound: each step of the
    batched decode moves the decoder's params (param bytes: float32 = 4) plus the KV cache of the
    chip's rows (self-attention over the whole max_decode_len buffer, as our cache is a fixed
    buffer, + cross-attention over the source; activation bytes) through HBM. A step takes
    max(bytes / bandwidth, FLOPs / peak) per chip (the roofline: the compute side at peak, not
    at `mfu`). Every batch decodes max_decode_len steps (an upper bound: a batch stops when all its
    rows hit EOS, and decode_length_ratio may stop it earlier). The encoder pass of each batch
    and the teacher-forced scoring of references are forward passes at `mfu`.
  * Reward-model scoring is one forward pass per record (source + candidate packed, at most the
    RM's max_len tokens) at `mfu`; records = sources x (N + 1), no dedup (upper bound). The
    metrics (BLEU, chrF, TER) and the ReST-EM verifier run on the host CPU: not estimated.
  * Not estimated: input pipelines, checkpoint I/O, compilation, host <-> device transfers.

Sizes of splits whose data cannot be read here come from `SPLIT_SIZES` (sources stated there);
`num_sources` overrides.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from rest_jax import accelerators

# Examples per split of the tasks whose data are not shipped (sources per task):
#   iwslt14_de_en: fairseq examples/translation/prepare-iwslt14.sh: 160,239 train, 7,283 valid,
#     6,750 test pairs.
#   wmt20_zh_en: newstest2019 zh-en (valid) and newstest2020 zh-en (test), 2,000 lines each;
#     train depends on the corpora a researcher puts in (the config bounds Grow by max_sources).
#   gsm8k: 7,473 train.jsonl problems (tasks/math.py: the last 500 are validation, the rest the
#     train and pool splits), 1,319 test.jsonl problems (Cobbe et al. 2021).
#   libreoffice_help_de_en: the shipped corpus, train after the length filter (grow.gin).
SPLIT_SIZES = {
    'iwslt14_de_en': {'train': 160_239, 'validation': 7_283, 'test': 6_750},
    'wmt20_zh_en': {'validation': 2_000, 'test': 2_000},
    'gsm8k': {'train': 6_973, 'pool': 6_973, 'validation': 500, 'test': 1_319},
    'libreoffice_help_de_en': {'train': 31_233},
}
EVAL_BATCH_ROWS = 256  # Our choice: rows per batch of greedy evaluation decodes.


@dataclasses.dataclass(frozen=True)
class ModelShape:
  """What the estimates need of an encoder-decoder policy (counts from its real init).

  encoder_params / decoder_params: params in encoder/ and decoder/ (the embedding excluded);
  embedding_params: the tied token embedding (V x d). param_bytes: bytes per param (float32: 4);
  act_bytes: bytes per activation / KV-cache element (bfloat16: 2).
  """
  encoder_params: int
  decoder_params: int
  embedding_params: int
  vocab_size: int
  emb_dim: int
  num_heads: int
  head_dim: int
  num_encoder_layers: int
  num_decoder_layers: int
  param_bytes: int = 4
  act_bytes: int = 4

  @property
  def total_params(self) -> int:
    return self.encoder_params + self.decoder_params + self.embedding_params


def count(tree) -> int:
  """Number of scalars in a tree of arrays / `ShapeDtypeStruct`s."""
  import jax
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def policy_shape(model) -> ModelShape:
  """`ModelShape` of an `EncoderDecoderModel`, its params counted from the model's own init
  under `jax.eval_shape` (no memory, no FLOPs)."""
  import jax
  import jax.numpy as jnp
  from rest_jax.models import encoder_decoder
  shapes = {'encoder_input_tokens': (1, 16), 'decoder_input_tokens': (1, 16)}
  boxed = jax.eval_shape(lambda r: model.get_initial_variables(r, shapes), jax.random.PRNGKey(0))
  params = encoder_decoder.unbox(boxed)['params']
  c = model.config
  return ModelShape(
      encoder_params=count(params['encoder']), decoder_params=count(params['decoder']),
      embedding_params=count(params['token_embedder']), vocab_size=c.vocab_size,
      emb_dim=c.emb_dim, num_heads=c.num_heads, head_dim=c.head_dim,
      num_encoder_layers=c.num_encoder_layers, num_decoder_layers=c.num_decoder_layers,
      param_bytes=jnp.dtype(c.param_dtype).itemsize, act_bytes=jnp.dtype(c.dtype).itemsize)


def reward_model_params(config) -> int:
  """Params of a `rewards.model.RewardModel` of `config`, from its init under eval_shape."""
  import flax.linen as nn
  from rest_jax.rewards import model as rm_model
  return count(nn.meta.unbox(rm_model._boxed_shapes(config)[1]))


# -- the formulas (pure arithmetic: tests/test_compute.py checks them by hand) ------------------

def forward_flops(m: ModelShape, src_len: int, tgt_len: int) -> float:
  """FLOPs of one teacher-forced forward pass of one example ([src_len] -> [tgt_len] tokens):
  2 x matmul params x tokens + the output projection + attention's two L_q x L_k products."""
  attn = 4 * m.num_heads * m.head_dim
  return (2 * m.encoder_params * src_len + 2 * m.decoder_params * tgt_len
          + 2 * m.embedding_params * tgt_len
          + attn * m.num_encoder_layers * src_len * src_len
          + attn * m.num_decoder_layers * (tgt_len * tgt_len + tgt_len * src_len))


def train_flops(m: ModelShape, src_len: int, tgt_len: int, examples: float) -> float:
  """Training FLOPs: 3 x forward (backward = 2 x forward) for `examples` examples."""
  return 3 * forward_flops(m, src_len, tgt_len) * examples


def decode_step_cost(m: ModelShape, rows: int, src_len: int, max_decode_len: int,
                     num_chips: int) -> dict[str, float]:
  """Bytes and FLOPs per chip of one step of a batched decode of `rows` rows over `num_chips`
  data-parallel chips: the decoder's and output projection's params (every chip reads its
  replica) + the KV cache of its rows (self-attention buffer of max_decode_len positions and
  cross-attention over src_len, keys and values, every decoder layer)."""
  rows_per_chip = rows / num_chips
  kv_per_row = (2 * m.num_decoder_layers * (max_decode_len + src_len) * m.num_heads * m.head_dim
                * m.act_bytes)
  params_bytes = (m.decoder_params + m.embedding_params) * m.param_bytes
  flops_per_row = (2 * (m.decoder_params + m.embedding_params)
                   + 4 * m.num_decoder_layers * m.num_heads * m.head_dim
                   * (max_decode_len + src_len))
  return {'bytes': params_bytes + rows_per_chip * kv_per_row, 'params_bytes': params_bytes,
          'kv_bytes': rows_per_chip * kv_per_row, 'flops': rows_per_chip * flops_per_row}


def decode_seconds(m: ModelShape, acc: accelerators.Accelerator, examples: int, rows_per_batch: int,
                   num_decodes: int, src_len: int, max_decode_len: int,
                   mfu: float) -> dict[str, float]:
  """Wall seconds to decode `examples` sources x `num_decodes` samples, `rows_per_batch` rows a
  batch (sources x samples), max_decode_len steps each: bandwidth-bound steps (roofline) + the
  encoder's forward pass per source at `mfu`."""
  batches = math.ceil(examples * num_decodes / rows_per_batch)
  step = decode_step_cost(m, rows_per_batch, src_len, max_decode_len, acc.num_chips)
  step_s = max(step['bytes'] / acc.chip.hbm_bandwidth, step['flops'] / acc.chip.peak_bf16_flops)
  encode_flops = (2 * m.encoder_params * src_len
                  + 4 * m.num_heads * m.head_dim * m.num_encoder_layers * src_len ** 2) * examples
  encode_s = encode_flops / (acc.num_chips * acc.chip.peak_bf16_flops * mfu)
  return {'decode_steps': batches * max_decode_len, 'step_seconds': step_s,
          'step_bytes_per_chip': step['bytes'],
          'bandwidth_bound': step['bytes'] / acc.chip.hbm_bandwidth
          >= step['flops'] / acc.chip.peak_bf16_flops,
          'seconds': batches * max_decode_len * step_s + encode_s}


def compute_seconds(flops: float, acc: accelerators.Accelerator, mfu: float) -> float:
  """Seconds for `flops` at `mfu` of the slice's peak."""
  return flops / (acc.num_chips * acc.chip.peak_bf16_flops * mfu)


# -- a run config's stages -----------------------------------------------------------------------

def _split_size(task: str, split: str, override: int | None = None) -> int:
  if override is not None:
    return override
  try:
    return SPLIT_SIZES[task][split]
  except KeyError:
    raise ValueError(f'no known size of {task}/{split}: pass num_sources (or bind '
                     'grow.max_sources)') from None


def _stage(name: str, count_: int, seconds: float, **detail) -> dict[str, Any]:
  return {'stage': name, 'count': count_, 'seconds_each': seconds,
          'hours_total': count_ * seconds / 3600, **detail}


def estimate(w: Mapping[str, Any], m: ModelShape, rm_params: int | None,
             acc: accelerators.Accelerator, mfu: float = 0.4) -> dict[str, Any]:
  """Per-stage estimates of a workload `w` (`workload_from_gin`'s dict) on `acc`.

  Returns:
    {'accelerator', 'assumptions', 'params', 'stages': [{stage, count, seconds_each,
    hours_total, ...}], 'hours_total'}.

  Raises:
    ValueError: a CPU 'accelerator' (no vendor figures), a split of unknown size.
  """
  if acc.kind == 'cpu':
    raise ValueError('no estimates for cpu: name a TPU slice or GPUs')
  stages = []
  src, tgt = w['inputs_length'], w['targets_length']
  if w.get('train_steps'):
    t = w['train']
    stages.append(_stage(w['train_name'], 1, compute_seconds(
        train_flops(m, t['inputs_length'], t['targets_length'], w['train_steps'] * t['batch_size']),
        acc, mfu), steps=w['train_steps'], batch=t['batch_size']))
  g = w['grow']
  sources = g['max_sources'] or _split_size(w['task'], g['split'], w.get('num_sources'))
  if g['max_sources'] and w.get('num_sources'):
    sources = min(sources, w['num_sources'])
  d = decode_seconds(m, acc, sources, g['batch_size'] * g['num_decodes'], g['num_decodes'],
                     g['inputs_length'], g['max_decode_len'], mfu)
  ref_s = compute_seconds(forward_flops(m, g['inputs_length'], g['targets_length']) * sources,
                          acc, mfu)
  stages.append(_stage(w['grow_name'], w['num_grows'], d['seconds'] + ref_s, sources=sources,
                       samples=sources * g['num_decodes'], decode_steps=d['decode_steps'],
                       step_bytes_per_chip=d['step_bytes_per_chip'],
                       bandwidth_bound=d['bandwidth_bound']))
  records = sources * (g['num_decodes'] + 1)
  if rm_params is not None:
    r = w['rm']
    rm_len = min(r['max_len'], g['inputs_length'] + g['max_decode_len'])
    stages.append(_stage('rm_train', w['rm_trainings'], compute_seconds(
        3 * 2 * rm_params * rm_len * r['num_steps'] * r['batch_size'] * r['candidates'], acc, mfu),
        rm_params=rm_params, steps=r['num_steps']))
    stages.append(_stage('score', w['num_grows'], compute_seconds(
        2 * rm_params * rm_len * records, acc, mfu), records=records))
  i = w['improve']
  kept = records  # Improve step 0 (tau = 0) keeps every record: its steps are bounded by num_steps.
  evals = math.ceil(i['num_steps'] / i['eval_every_steps'])
  dev_s = evals * decode_seconds(m, acc, i['dev_examples'], EVAL_BATCH_ROWS, 1, src,
                                 i['max_decode_len'], mfu)['seconds']
  stages.append(_stage(w['improve_name'], w['num_grows'] * w['improve_steps'], compute_seconds(
      train_flops(m, src, tgt, i['num_steps'] * i['batch_size']), acc, mfu) + dev_s,
      steps=i['num_steps'], batch=i['batch_size'], epochs_of_records=round(
          i['num_steps'] * i['batch_size'] / kept, 3)))
  e = w['eval']
  eval_s = sum(decode_seconds(m, acc, n, EVAL_BATCH_ROWS, 1, src, e['max_decode_len'],
                              mfu)['seconds'] for n in e['greedy_examples'])
  if e.get('samples'):
    eval_s += decode_seconds(m, acc, e['sampled_examples'], EVAL_BATCH_ROWS, e['samples'], src,
                             e['max_decode_len'], mfu)['seconds']
  stages.append(_stage('evaluation', e['stages'], eval_s))
  return _result(stages, m, rm_params, acc, mfu)


def _result(stages: list[dict], m: ModelShape, rm_params: int | None,
            acc: accelerators.Accelerator, mfu: float) -> dict[str, Any]:
  """An estimate's dict: the chip, the assumptions, the param counts, the stages and their sum."""
  return {
      'accelerator': acc.to_json(),
      'chip': dataclasses.asdict(acc.chip),
      'assumptions': {'mfu_training': mfu, 'sampling': 'HBM-bandwidth-bound roofline',
                      'eval_batch_rows': EVAL_BATCH_ROWS},
      'params': {'policy_total': m.total_params, 'policy_encoder': m.encoder_params,
                 'policy_decoder': m.decoder_params, 'policy_embedding': m.embedding_params,
                 'reward_model': rm_params},
      'stages': stages, 'hours_total': sum(s['hours_total'] for s in stages),
  }


def estimate_online(w: Mapping[str, Any], m: ModelShape, rm_params: int | None,
                    acc: accelerators.Accelerator, mfu: float = 0.4) -> dict[str, Any]:
  """Per-stage estimates of an online RL run (`rest-jax online`; `workload_from_gin('online')`).

  Stages (our accounting, the same assumptions as `estimate`): `rollouts`: the samples drawn, in
  rollout batches of sources_per_rollout x num_decodes rows (bandwidth-bound decode: online RL's
  small batches are what make its sampling dear); `rollout_scoring`: a forward pass of the policy
  (value head; the ratio's old log-probs come with the samples) and of the frozen reference per
  sample, plus the reward model's forward pass when the reward is one; `updates`: ppo_epochs
  training passes over every sample; `evaluation`: greedy dev + test decodes at every stage.

  Returns / raises: as `estimate`.
  """
  if acc.kind == 'cpu':
    raise ValueError('no estimates for cpu: name a TPU slice or GPUs')
  o = w['online']
  src, tgt, n = o['inputs_length'], o['max_decode_len'], o['max_samples']
  rows = o['sources_per_rollout'] * o['num_decodes']
  rollouts = math.ceil(n / rows)
  d = decode_seconds(m, acc, o['sources_per_rollout'], rows, o['num_decodes'], src, tgt, mfu)
  stages = [_stage('rollouts', rollouts, d['seconds'], samples=n, batch=rows,
                   decode_steps=d['decode_steps'] * rollouts, bandwidth_bound=d['bandwidth_bound'])]
  score = 2 * forward_flops(m, src, tgt) * rows
  if rm_params is not None:
    score += 2 * rm_params * min(o['rm_max_len'], src + tgt) * rows
  stages.append(_stage('rollout_scoring', rollouts, compute_seconds(score, acc, mfu),
                       samples=n))
  stages.append(_stage('updates', rollouts, compute_seconds(
      train_flops(m, src, tgt, rows * o['ppo_epochs']), acc, mfu),
      steps=rollouts * o['ppo_epochs'] * (rows // o['minibatch_size']), batch=o['minibatch_size']))
  evals = 1 + math.ceil(n / o['eval_every_samples'])
  stages.append(_stage('evaluation', evals, sum(
      decode_seconds(m, acc, k, EVAL_BATCH_ROWS, 1, src, tgt, mfu)['seconds']
      for k in (o['dev_examples'], o['test_examples']))))
  return _result(stages, m, rm_params, acc, mfu)


def _online_workload(get) -> dict[str, Any]:
  from rest_jax import online
  fn = online.online
  o = {k: get(fn, k) for k in ('task', 'algorithm', 'reward', 'rm_dir', 'sources_per_rollout',
                               'num_decodes', 'ppo_epochs', 'minibatch_size', 'max_samples',
                               'max_decode_len', 'inputs_length', 'eval_every_samples',
                               'dev_examples', 'test_examples')}
  for split, key in (('validation', 'dev_examples'), ('test', 'test_examples')):
    if o[key] is None:
      o[key] = _split_size(o['task'], split)
  o['rm_max_len'] = 256
  return {'loop': 'online', 'task': o['task'], 'online': o}


def workload_from_gin(loop: str | None = None, num_sources: int | None = None) -> dict[str, Any]:
  """The workload of the parsed gin config (`main.parse_gin` first): 'rest' or 'rest_em' (None:
  whichever the config binds), its stages' sizes read from the bindings (defaults from the
  functions' signatures)."""
  import inspect

  import gin

  from rest_jax import grow, improve, rest, rest_em, train
  from rest_jax.rewards import train_rm

  def get(fn, name, scope=None):
    try:
      return gin.query_parameter(f'{scope or fn.__name__}.{name}')
    except ValueError:
      return inspect.signature(fn).parameters[name].default
  if loop is None:
    loop = ('online' if rest.is_bound('online.model')
            else 'rest_em' if rest.is_bound('rest_em.model') else 'rest')
  if loop == 'online':
    return _online_workload(get)
  fn = rest_em.rest_em if loop == 'rest_em' else rest.rest
  task = get(fn, 'task')
  w = {'loop': loop, 'task': task, 'num_sources': num_sources,
       'inputs_length': get(fn, 'inputs_length'), 'targets_length': get(fn, 'targets_length')}
  g = {k: get(grow.grow, k) for k in ('num_decodes', 'batch_size', 'max_sources', 'max_decode_len',
                                      'inputs_length', 'targets_length', 'split', 'source_every')}
  imp = {k: get(improve.improve, k) for k in ('num_steps', 'batch_size', 'eval_every_steps',
                                              'max_decode_len')}
  dev = get(fn, 'dev_examples')
  imp['dev_examples'] = dev if dev is not None else _split_size(task, 'validation')
  t = {k: get(train.train, k) for k in ('num_steps', 'batch_size', 'inputs_length',
                                        'targets_length')}
  trains_here = not get(fn, 'base_params_file' if loop == 'rest_em' else 'bc_params_file') and \
      not get(fn, 'base_policy_dir' if loop == 'rest_em' else 'bc_policy_dir')
  w.update(grow=g, improve=imp, train=t, train_steps=t['num_steps'] if trains_here else 0)
  test = get(fn, 'test_examples')
  if loop == 'rest_em':
    g['split'] = get(fn, 'pool_split')
    n_iter = get(fn, 'num_iterations')
    splits = get(fn, 'eval_splits')
    sizes = [_split_size(task, s) if test is None else test for s in splits]
    controls = len(get(fn, 'controls'))
    w.update(train_name='base_sft', grow_name='e_step', improve_name='m_step', num_grows=n_iter,
             improve_steps=1, rm=None, rm_trainings=0)
    w['improve_steps_total_note'] = f'+ {controls} controls (M-steps) not counted'
    w['eval'] = {'stages': n_iter + 1 + controls, 'max_decode_len': get(fn, 'max_decode_len'),
                 'greedy_examples': [imp['dev_examples'], get(fn, 'pool_eval_examples')] + sizes,
                 'samples': get(rest_em.evaluate_solver, 'num_samples'),
                 'sampled_examples': sizes[0] if sizes else 0}
  else:
    n_grow = get(fn, 'num_grow_steps')
    steps = rest.improve_step_count(get(fn, 'improve_steps_per_grow'),
                                    get(fn, 'num_improve_steps'))
    test_n = test if test is not None else _split_size(task, 'test')
    uses_rm = get(fn, 'reward') == 'rm' and not get(fn, 'rm_dir')
    rm = None
    if uses_rm:
      rm = {'num_steps': get(train_rm.train_reward_model, 'num_steps'),
            'batch_size': get(train_rm.train_reward_model, 'batch_size'),
            # Candidates per source in a training batch: samples + reference + 5 negatives +
            # 2 degraded copies of each degraded sample (runs/train_rm.gin's header).
            'candidates': (get(train_rm.train_reward_model, 'max_samples') + 1 + 5
                           + 2 * get(train_rm.train_reward_model, 'degraded_samples')),
            'max_len': gin.query_parameter('train_reward_model.config')
                       .scoped_configurable_fn().max_len}
    w.update(train_name='bc_train', grow_name='grow', improve_name='improve', num_grows=n_grow,
             improve_steps=steps, rm=rm, rm_trainings=(n_grow if get(fn, 'retrain_rm') else 1)
             if uses_rm else 0)
    w['eval'] = {'stages': 1 + n_grow * steps,
                 'max_decode_len': get(rest.evaluate_policy, 'max_decode_len'),
                 'greedy_examples': [imp['dev_examples'], test_n]}
  return w


def format_table(result: Mapping[str, Any]) -> str:
  """A markdown table of `estimate`'s stages: count, minutes each, hours in all."""
  acc = result['accelerator']
  lines = [f"| stage ({acc['name']}: {acc['num_chips']} x {acc['chip']}) | count "
           '| minutes each | hours total | detail |', '|---|---|---|---|---|']
  keys = ('samples', 'records', 'steps', 'batch', 'decode_steps', 'bandwidth_bound')
  for s in result['stages']:
    detail = ', '.join(f'{k} {s[k]:,}' if isinstance(s[k], int) and not isinstance(s[k], bool)
                       else f'{k} {s[k]}' for k in keys if k in s)
    each = s['seconds_each'] / 60
    each_text = f'{each:.1f}' + ('' if each >= 0.1 else f' ({each * 60:.2g} s)')
    lines.append(f"| {s['stage']} | {s['count']:,} | {each_text} | {s['hours_total']:.2f} | "
                 f"{detail} |")
  lines.append(f"| **total** | | | **{result['hours_total']:.2f}** | |")
  return '\n'.join(lines)
