"""Shared helpers of the side-by-side benchmarks (train_throughput.py, grow_throughput.py).

* `ARCHS`: the model sizes of `gin_configs/models/{tiny,iwslt}.gin`, and how the same size is
  written as a rest-jax `TransformerConfig` and as a Hugging Face `MarianConfig`.
* `train_flops_per_step`: the FLOP count the throughput figures are converted with.
* `matmul_peak_flops`: this machine's float32 matmul peak as XLA reaches it (`jax.jit(jnp.dot)`).
* `median_time`: warm-up excluded, median of repeats.
* `marian_dir`: a random-init MarianMT model of a given size, saved with a SentencePiece-backed
  `MarianTokenizer` built from the project's vocabulary (nothing is downloaded), ready for
  `ctranslate2.converters.TransformersConverter`.
* `machine_info`, `versions`, `write_json`, `print_table`.

Only jax/numpy are imported at module level: torch, transformers and ctranslate2 (the `bench`
extra, `pip install -e '.[bench]'`) are imported where they are used.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import time
from typing import Any, Callable

import numpy as np

from rest_jax import fileio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPM_MODEL = os.path.join(REPO, 'tasks', 'data', 'libreoffice_help', 'spm', 'de_en_8000.model')
VOCAB_SIZE = 8000
MAX_LEN = 512  # rest-jax's sinusoidal table length == Marian's max_position_embeddings.

# The sizes of gin_configs/models/tiny.gin and iwslt.gin (heads x head_dim == d_model in both,
# so a Marian model of the same d_model / heads has exactly the same shapes).
ARCHS: dict[str, dict[str, int]] = {
    'tiny': dict(emb_dim=256, num_heads=4, head_dim=64, mlp_dim=1024,
                 num_encoder_layers=3, num_decoder_layers=3),
    'iwslt': dict(emb_dim=512, num_heads=4, head_dim=128, mlp_dim=1024,
                  num_encoder_layers=6, num_decoder_layers=6),
}


def transformer_config(arch: str, dtype: str = 'float32', dropout: float = 0.1):
  """The rest-jax `TransformerConfig` of `arch`, activations in `dtype` (params float32)."""
  import jax.numpy as jnp
  from rest_jax.models import TransformerConfig
  return TransformerConfig(vocab_size=VOCAB_SIZE, dropout_rate=dropout, max_len=MAX_LEN,
                           dtype={'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[dtype],
                           **ARCHS[arch])


def marian_config(arch: str, dropout: float = 0.1):
  """A `MarianConfig` of the same size as `arch`.

  Shared source/target/output embedding (tied), ReLU FFN (as rest-jax), sinusoidal positions,
  dropout on embeddings and sub-layer outputs only. Marian's own layout of the special ids:
  `</s>` = 0, `<unk>` = 1, `<pad>` = vocab_size - 1 (also the decoder start token), see
  `marian_dir`. Marian is post-LN where rest-jax is pre-LN; the matmul shapes are identical.
  """
  from transformers import MarianConfig
  a = ARCHS[arch]
  assert a['num_heads'] * a['head_dim'] == a['emb_dim'], a
  pad = VOCAB_SIZE - 1
  return MarianConfig(
      vocab_size=VOCAB_SIZE, decoder_vocab_size=VOCAB_SIZE, d_model=a['emb_dim'],
      encoder_layers=a['num_encoder_layers'], decoder_layers=a['num_decoder_layers'],
      encoder_attention_heads=a['num_heads'], decoder_attention_heads=a['num_heads'],
      encoder_ffn_dim=a['mlp_dim'], decoder_ffn_dim=a['mlp_dim'],
      max_position_embeddings=MAX_LEN, activation_function='relu',
      dropout=dropout, attention_dropout=0.0, activation_dropout=0.0,
      share_encoder_decoder_embeddings=True, tie_word_embeddings=True, scale_embedding=False,
      pad_token_id=pad, decoder_start_token_id=pad, eos_token_id=0, forced_eos_token_id=None,
      bos_token_id=None)


# -------------------------------------------------------------------------------------------------
# FLOPs.
# -------------------------------------------------------------------------------------------------

def matmul_params(arch: str) -> dict[str, int]:
  """Matmul (kernel) parameters: per encoder stack, decoder stack, and the tied output projection."""
  a = ARCHS[arch]
  d, hd, ff = a['emb_dim'], a['num_heads'] * a['head_dim'], a['mlp_dim']
  enc_layer = 4 * d * hd + 2 * d * ff           # q, k, v, out + wi, wo
  dec_layer = 8 * d * hd + 2 * d * ff           # self q, k, v, out + cross q, k, v, out + MLP
  return {'encoder': a['num_encoder_layers'] * enc_layer,
          'decoder': a['num_decoder_layers'] * dec_layer,
          'output_projection': VOCAB_SIZE * d}


def train_flops_per_step(arch: str, batch: int, src_len: int, tgt_len: int) -> dict[str, float]:
  """FLOPs of one training step (forward + backward = 3x forward, 2 FLOPs per multiply-add).

    6 * (P_enc * B * Ls + (P_dec + V * d) * B * Lt)
  + 6 * 2 * B * (h * hd) * (L_enc * Ls * Ls + L_dec * Lt * Lt + L_dec * Lt * Ls)

  P_enc / P_dec: matmul parameters of the encoder / decoder layers (attention q, k, v, out and the
  MLP; embeddings, biases and LayerNorms are not matmuls), counted against source / target tokens
  respectively; V * d: the tied output projection, counted once, against target tokens. Attention
  scores (QK^T) and the weighted sum (PV) for encoder self-attention, decoder self-attention (full
  Lt x Lt, not causal-halved) and cross-attention. The embedding lookup, softmaxes, LayerNorms and
  the optimizer update are not counted.
  """
  a = ARCHS[arch]
  p = matmul_params(arch)
  tokens_src, tokens_tgt = batch * src_len, batch * tgt_len
  dense = 6 * (p['encoder'] * tokens_src + (p['decoder'] + p['output_projection']) * tokens_tgt)
  width = a['num_heads'] * a['head_dim']
  attn = 6 * 2 * batch * width * (a['num_encoder_layers'] * src_len * src_len +
                                  a['num_decoder_layers'] * tgt_len * tgt_len +
                                  a['num_decoder_layers'] * tgt_len * src_len)
  return {'dense': float(dense), 'attention': float(attn), 'total': float(dense + attn)}


FLOPS_FORMULA = ('6 * (P_enc * B * Ls + (P_dec + V * d) * B * Lt) + 6 * 2 * B * (h * hd) * '
                 '(L_enc * Ls^2 + L_dec * Lt^2 + L_dec * Lt * Ls); P_enc/P_dec = matmul params of '
                 'the encoder/decoder layers (q,k,v,out,wi,wo), V*d = tied output projection '
                 'counted once; decoder self-attention counted full (not causal-halved)')


def matmul_peak_flops(sizes=(1024, 2048, 3072), reps: int = 5) -> dict[str, Any]:
  """Best float32 FLOP/s of `jax.jit(jnp.dot)` on n x n matrices over `sizes` (best of `reps`)."""
  import jax
  import jax.numpy as jnp
  dot = jax.jit(jnp.dot)
  per_size = {}
  for n in sizes:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    jax.block_until_ready(dot(a, b))
    best = float('inf')
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(dot(a, b))
      best = min(best, time.perf_counter() - t0)
    per_size[str(n)] = 2.0 * n ** 3 / best
  return {'peak_flops': max(per_size.values()), 'per_size': per_size}


# -------------------------------------------------------------------------------------------------
# Timing.
# -------------------------------------------------------------------------------------------------

def median_time(run: Callable[[], Any], *, warmup: int, repeats: int, inner: int = 1
                ) -> dict[str, Any]:
  """Median seconds per call of `run` (which must block until its work is done).

  `warmup` calls (compilation, caches, allocator) are not timed; then `repeats` timings of `inner`
  consecutive calls each; returns the median and all repeats, per call.
  """
  for _ in range(warmup):
    run()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(inner):
      run()
    times.append((time.perf_counter() - t0) / inner)
  return {'seconds': statistics.median(times), 'repeats': times}


# -------------------------------------------------------------------------------------------------
# A random MarianMT model with a tokenizer (for HF generate and the CTranslate2 converter).
# -------------------------------------------------------------------------------------------------

def marian_vocab() -> list[str]:
  """Marian's token list for the project's SentencePiece vocabulary: the pieces of ids 1..V-1
  (`</s>` = 0, `<unk>` = 1, ...) and `<pad>` last (id V - 1), Marian's own convention.

  Marian id of a rest-jax id t (t >= 1) is t - 1; rest-jax's PAD 0 is Marian's V - 1.
  """
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=SPM_MODEL)
  assert sp.get_piece_size() == VOCAB_SIZE and sp.id_to_piece(0) == '<pad>'
  return [sp.id_to_piece(i) for i in range(1, VOCAB_SIZE)] + ['<pad>']


def build_marian_model(arch: str, seed: int = 0, dropout: float = 0.1):
  """A random-init `MarianMTModel` of size `arch` (float32, train mode off)."""
  import torch
  from transformers import MarianMTModel
  torch.manual_seed(seed)
  model = MarianMTModel(marian_config(arch, dropout=dropout))
  return model


def marian_dir(arch: str, out_dir: str, seed: int = 0) -> str:
  """Saves a random `MarianMTModel` of size `arch` + a `MarianTokenizer` into `out_dir`.

  The tokenizer is SentencePiece-backed (source.spm = target.spm = the project's de_en model)
  with a vocab.json in Marian's id layout (`marian_vocab`). Returns `out_dir`.
  """
  import shutil
  from transformers import MarianTokenizer
  os.makedirs(out_dir, exist_ok=True)
  vocab = marian_vocab()
  with open(os.path.join(out_dir, 'vocab.json'), 'w') as f:
    json.dump({p: i for i, p in enumerate(vocab)}, f, ensure_ascii=False)
  for name in ('source.spm', 'target.spm'):
    shutil.copyfile(SPM_MODEL, os.path.join(out_dir, name))
  tok = MarianTokenizer(source_spm=os.path.join(out_dir, 'source.spm'),
                        target_spm=os.path.join(out_dir, 'target.spm'),
                        vocab=os.path.join(out_dir, 'vocab.json'),
                        source_lang='de', target_lang='en')
  tok.save_pretrained(out_dir)
  model = build_marian_model(arch, seed)
  model.save_pretrained(out_dir)
  return out_dir


# -------------------------------------------------------------------------------------------------
# Reporting.
# -------------------------------------------------------------------------------------------------

def versions(*names: str) -> dict[str, str | None]:
  out = {}
  for n in ('jax', 'jaxlib', 'flax', 'optax', 'numpy') + names:
    try:
      out[n] = importlib.metadata.version(n)
    except importlib.metadata.PackageNotFoundError:
      out[n] = None
  return out


def machine_info() -> dict[str, Any]:
  info = {'platform': platform.platform(), 'python': platform.python_version(),
          'processor': platform.processor(), 'cpu_count': os.cpu_count()}
  if hasattr(os, 'getloadavg'):
    info['loadavg_1_5_15min'] = [round(x, 2) for x in os.getloadavg()]
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          info['cpu_model'] = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  try:
    import jax
    info['jax_devices'] = [str(d) for d in jax.devices()]
  except Exception:  # pragma: no cover
    pass
  return info


def warn_if_busy(threshold: float = 0.5) -> None:
  """Warns when the machine is not idle: PyTorch's OpenMP threads (and XLA's) slow down by
  10-40x on 2 cores when another process competes for them, which makes the figures meaningless."""
  if hasattr(os, 'getloadavg') and os.getloadavg()[0] > threshold:
    print(f'WARNING: 1-minute load average {os.getloadavg()[0]:.2f} > {threshold}: other '
          'processes are using the CPU; the timings will not be representative.', flush=True)


def timestamp() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


write_json = fileio.write_json  # One atomic JSON writer for the project.


def print_table(rows: list[list[Any]], header: list[str]) -> None:
  cells = [[str(c) for c in r] for r in [header] + rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  fmt = lambda r: '  '.join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                            enumerate(zip(r, widths)))
  print(fmt(cells[0]))
  print('  '.join('-' * w for w in widths))
  for r in cells[1:]:
    print(fmt(r))


def fmt_num(x: float | None, digits: int = 0) -> str:
  if x is None:
    return '-'
  return f'{x:,.{digits}f}'


def fmt_flops(x: float | None) -> str:
  return '-' if x is None else f'{x / 1e9:,.1f} GFLOP/s'


# -------------------------------------------------------------------------------------------------
# Profiles: XLA op times from a jax.profiler trace, by op class.
# -------------------------------------------------------------------------------------------------

def trace_op_times(trace_dir: str) -> dict[str, tuple[float, int]] | None:
  """Event name -> (total ms, count) of XLA's ops in the newest perfetto trace under trace_dir."""
  import glob
  import gzip
  import json
  files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True) +
                 glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'),
                           recursive=True), key=os.path.getmtime)
  if not files:
    return None
  with gzip.open(files[-1], 'rt') as f:
    data = json.load(f)
  events = data['traceEvents'] if isinstance(data, dict) else data
  # Thread names, to keep XLA's executor threads and drop Python/host bookkeeping.
  threads = {}
  for e in events:
    if e.get('ph') == 'M' and e.get('name') == 'thread_name':
      threads[(e.get('pid'), e.get('tid'))] = e.get('args', {}).get('name', '')
  totals: dict[str, list[float]] = {}
  for e in events:
    if e.get('ph') != 'X' or 'dur' not in e:
      continue
    name = e.get('name', '')
    tname = threads.get((e.get('pid'), e.get('tid')), '')
    if 'python' in tname.lower() or name.startswith('$') or '::' in name:
      continue
    t = totals.setdefault(name, [0.0, 0])
    t[0] += float(e['dur']) / 1e3
    t[1] += 1
  return {n: (ms, int(c)) for n, (ms, c) in totals.items()}


def hlo_ops(hlo_text: str) -> dict[str, dict[str, str]]:
  """Instruction name -> {'hlo': 'opcode shape', 'op_name': JAX's op_name} from compiled HLO."""
  import re
  out = {}
  pat = re.compile(r'\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\(')
  op_name = re.compile(r'op_name="([^"]*)"')
  for line in hlo_text.splitlines():
    m = pat.match(line)
    if m and m.group(1) not in out:
      shape = re.sub(r'\{[^}]*\}', '', m.group(2))
      kind = 'ynn_gemm' if '__ynn_fusion' in line else m.group(3)
      meta = op_name.search(line)
      out[m.group(1)] = {'hlo': f'{kind} {shape}'[:60], 'op_name': meta.group(1) if meta else ''}
  return out


# Op classes of a train step or a decode step, in the order they are tested (first match wins).
OP_CLASSES = ('dropout (RNG + mask)', 'output projection (tied, [tokens, vocab] GEMMs)',
              'embedding look-up + gradient', 'softmax / cross-entropy / accuracy',
              'attention (QK^T, softmax, PV)', 'layer norm', 'matmuls (Q/K/V/out, MLP)',
              'elementwise in layers (bias, ReLU, residual)', 'optimizer (AdamW, clipping)',
              'other')


def op_class(op_name: str, hlo: str) -> str:
  """The class of one XLA op from its JAX op_name (the Flax module path) and HLO opcode.

  'softmax / cross-entropy / accuracy' is the loss in a train step and the sampling
  (`sampling.sample_logits`) in a decode step; 'attention' includes the KV-cache write.
  Fused ops carry the op_name of their root; XLA's CPU backend runs GEMMs as `dot` or YNNPACK
  (`ynn_gemm`) fusions.
  """
  is_gemm = hlo.startswith(('dot', 'ynn_gemm'))
  if not op_name and hlo.startswith('dot') and hlo.count(',') == 3:
    # XLA drops the metadata of some batched dots: the [batch, heads, q, k|kv] attention GEMMs.
    return OP_CLASSES[4]
  if any(k in op_name for k in ('Dropout', 'threefry', 'bernoulli', 'random_bits')):
    return OP_CLASSES[0]
  if 'token_embedder.attend' in op_name:
    return OP_CLASSES[1]
  if 'token_embedder' in op_name:
    return OP_CLASSES[2]
  if 'Transformer' not in op_name and 'jvp(' in op_name:  # the loss on the logits
    return OP_CLASSES[3]
  if 'attention' in op_name and ('->' in op_name or 'softmax' in op_name or
                                 any(k in op_name for k in ('reduce_max', '/exp', 'select_n',
                                                            'reduce_sum', '/div',
                                                            'dynamic_update_slice'))):
    return OP_CLASSES[4]
  if 'layer_norm' in op_name or '_norm/' in op_name:
    return OP_CLASSES[5]
  if is_gemm and 'Transformer' in op_name:
    return OP_CLASSES[6]
  if 'Transformer' in op_name:
    return OP_CLASSES[7]
  if 'jvp(' not in op_name and op_name.startswith('jit(_step)'):
    return OP_CLASSES[8]
  return OP_CLASSES[9]


def op_class_table(times: dict[str, tuple[float, int]], ops: dict[str, dict[str, str]],
                   steps: int) -> list[dict]:
  """Per op class: ms per step, share of the traced op time, forward / backward split."""
  acc: dict[str, dict] = {c: {'class': c, 'ms_per_step': 0.0, 'forward_ms': 0.0,
                              'backward_ms': 0.0, 'ops': 0} for c in OP_CLASSES}
  for name, (ms, _) in times.items():
    info = ops.get(name, {'hlo': '', 'op_name': ''})
    row = acc[op_class(info['op_name'], info['hlo'])]
    row['ms_per_step'] += ms / steps
    row['ops'] += 1
    if 'transpose(jvp' in info['op_name']:
      row['backward_ms'] += ms / steps
    elif 'jvp(' in info['op_name']:
      row['forward_ms'] += ms / steps
  total = sum(r['ms_per_step'] for r in acc.values()) or 1.0
  rows = [r for r in acc.values() if r['ops']]
  for r in rows:
    r['share'] = r['ms_per_step'] / total
  return rows
