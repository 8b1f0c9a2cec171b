"""Grow (sampling) throughput: rest-jax's jitted `predict_batch` side by side with HF and CTranslate2.

    python benchmarks/grow_throughput.py --arch tiny  --json bench/grow_tiny.json
    python benchmarks/grow_throughput.py --arch iwslt --json bench/grow_iwslt.json
    python benchmarks/grow_throughput.py --arch tiny --profile   # + one decode step, split

The work (all three sides, the same random source batch, random-init models of the same size):
32 sources x 32 source tokens, 8 candidates each (temperature 0.8, no top-k / top-p), exactly 64
new tokens per candidate (EOS can't end a sample early), i.e. 32 x 8 x 64 = 16,384 generated
target tokens per run. tokens/s = 16,384 / median seconds of `--repeats` (>= 3) timed runs, after
`--warmup` untimed runs (compilation, caches). The counts are checked against the outputs.

  * rest-jax: `jax.jit` of `EncoderDecoderModel.predict_batch(method='sample', num_decodes=8,
    temperature=0.8, max_decode_len=64)`, float32, 1 device (encoder + cache set-up + the
    `lax.while_loop` of incremental decoding with KV cache, all in one executable). predict_batch
    takes no `eos_id`: it uses the module constant `rest_jax.models.encoder_decoder.EOS_ID`, which
    this script sets to -1 (an id no sample can take) while it traces, so every row runs 64 steps.
  * HF transformers: `MarianMTModel.generate(do_sample=True, temperature=0.8, top_k=0,
    num_return_sequences=8, min_new_tokens=64, max_new_tokens=64)`, float32, inference mode,
    torch.set_num_threads(2).
  * CTranslate2: the same Marian model converted with `ctranslate2.converters.TransformersConverter`
    (float32), `Translator(device='cpu', inter_threads=1, intra_threads=2).translate_batch(
    sampling_topk=0 (full distribution), sampling_temperature=0.8, num_hypotheses=8,
    min_decoding_length=64, max_decoding_length=64)`.

The Marian model is saved with a SentencePiece-backed `MarianTokenizer` built from the project's
vocabulary (tasks/data/libreoffice_help/spm/de_en_8000.model), since the converter loads one;
nothing is downloaded.

`--profile`: one rest-jax decode step on the expanded batch (256 rows), split into the model step
(`EncoderDecoderModel.decode_step`: embedding, 3/6 decoder layers with KV cache, output projection)
and the sampling step (`sampling.sample_logits` on [256, 8000] logits), each jitted alone, plus
the encoder + cache set-up (`init_decode_cache`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import common  # noqa: E402  (benchmarks/common.py)


def make_sources(batch: int, src_len: int, seed: int = 0) -> np.ndarray:
  """rest-jax ids [batch, src_len]: random ordinary pieces (3 .. V-1) ending with EOS (1)."""
  rng = np.random.default_rng(seed)
  enc = rng.integers(3, common.VOCAB_SIZE, (batch, src_len), dtype=np.int32)
  enc[:, -1] = 1
  return enc


@contextlib.contextmanager
def eos_disabled():
  """predict_batch passes `encoder_decoder.EOS_ID` to decoding; -1 is never sampled."""
  from rest_jax.models import encoder_decoder
  old = encoder_decoder.EOS_ID
  encoder_decoder.EOS_ID = -1
  try:
    yield
  finally:
    encoder_decoder.EOS_ID = old


# -------------------------------------------------------------------------------------------------
# The three sides. Each `run()` generates the whole batch once and returns the token count.
# -------------------------------------------------------------------------------------------------

class RestJaxSide:
  def __init__(self, arch: str, src: np.ndarray, args):
    import jax
    import jax.numpy as jnp
    from rest_jax.models import EncoderDecoderModel, Transformer, unbox
    self.jax = jax
    self.args = args
    cfg = common.transformer_config(arch, 'float32')
    self.model = EncoderDecoderModel(Transformer(cfg), label_smoothing=0.1)
    shapes = {'encoder_input_tokens': src.shape,
              'decoder_input_tokens': (src.shape[0], args.new_tokens)}
    self.params = unbox(self.model.get_initial_variables(jax.random.PRNGKey(0), shapes))['params']
    self.enc = jnp.asarray(src)
    self.calls = 0

    def predict(params, enc, rng):
      tokens, aux = self.model.predict_batch(
          params, {'encoder_input_tokens': enc}, rng, method='sample',
          num_decodes=args.num_decodes, temperature=args.temperature,
          max_decode_len=args.new_tokens)
      return tokens, aux['lengths']
    self.predict = jax.jit(predict)

  def run(self) -> int:
    rng = self.jax.random.PRNGKey(self.calls)
    self.calls += 1
    with eos_disabled():  # only matters while tracing (the first call)
      tokens, lengths = self.jax.block_until_ready(self.predict(self.params, self.enc, rng))
    lengths = np.asarray(lengths)
    return int(lengths.sum())

  def profile(self) -> dict:
    """One decode step on the expanded batch, model vs sampling, each jitted alone (ms)."""
    import jax
    import jax.numpy as jnp
    from rest_jax import decoding, sampling
    a = self.args
    bn = self.enc.shape[0] * a.num_decodes
    init_cache = jax.jit(lambda p, e: self.model.init_decode_cache(p, e, a.new_tokens))
    cache = init_cache(self.params, self.enc)
    cache = decoding.expand_cache(cache, a.num_decodes)
    # The step's cost does not depend on the position: self-attention reads (and masks) the
    # whole [max_decode_len] KV buffer at every step, so any cache_index is representative.
    # The cache is donated, as in the while loop where each step updates it in place: without
    # donation every call would also copy the whole [rows, heads, len, kv] buffers.
    step = jax.jit(self.model.decode_step, donate_argnums=1)
    tokens = jnp.full((bn,), 5, jnp.int32)
    logits, cache = step(self.params, cache, tokens)
    state = {'cache': cache}

    def model_step():
      _, state['cache'] = step(self.params, state['cache'], tokens)
      jax.block_until_ready(state['cache'])
    sample = jax.jit(functools.partial(sampling.sample_logits, temperature=a.temperature))
    u = jax.random.uniform(jax.random.PRNGKey(0), (bn,))
    enc = self.enc
    parts = {
        'encoder + cache set-up (once per run)':
            lambda: jax.block_until_ready(init_cache(self.params, enc)),
        'decode step: model (decode_step)': model_step,
        'decode step: sampling (sample_logits)':
            lambda: jax.block_until_ready(sample(logits, u)),
    }
    out = {n: common.median_time(f, warmup=2, repeats=max(a.repeats, 3), inner=10)['seconds']
           * 1e3 for n, f in parts.items()}
    # The model's decode step by op class, from a trace of 10 steps.
    import tempfile
    ops = common.hlo_ops(step.lower(self.params, state['cache'], tokens).compile().as_text())
    with tempfile.TemporaryDirectory() as trace_dir:
      with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(10):
          model_step()
      times = common.trace_op_times(trace_dir)
    if times:
      classes = common.op_class_table(times, ops, 10)
      print(f'\nrest-jax decode step ({bn} rows) by op class (ms per step, traced):')
      common.print_table([[r['class'], f"{r['ms_per_step']:,.2f}", f"{100 * r['share']:.0f}%",
                           r['ops']] for r in classes], ['class', 'ms/step', 'share', 'ops'])
      out['decode_step_op_classes'] = classes
    return out


class HFSide:
  def __init__(self, model_dir: str, src: np.ndarray, args):
    import torch
    from transformers import MarianMTModel
    torch.set_num_threads(args.torch_threads)
    self.torch = torch
    self.args = args
    self.model = MarianMTModel.from_pretrained(model_dir).eval()
    self.src = torch.from_numpy(src.astype(np.int64) - 1)  # Marian ids (common.marian_vocab)
    self.mask = torch.ones_like(self.src)
    self.calls = 0

  def run(self) -> int:
    a = self.args
    self.torch.manual_seed(self.calls)
    self.calls += 1
    with self.torch.inference_mode():
      out = self.model.generate(
          input_ids=self.src, attention_mask=self.mask, do_sample=True,
          temperature=a.temperature, top_k=0, top_p=1.0, num_beams=1,
          num_return_sequences=a.num_decodes, min_new_tokens=a.new_tokens,
          max_new_tokens=a.new_tokens)
    # out: [batch * N, 1 + new] (decoder start token first); min_new_tokens == max_new_tokens
    # suppresses EOS at every position, so every row has exactly `new` generated tokens.
    eos = self.model.config.eos_token_id
    if bool((out[:, 1:] == eos).any()):
      raise RuntimeError('HF generate emitted EOS despite min_new_tokens')
    return int(out.shape[0] * (out.shape[1] - 1))


class CT2Side:
  def __init__(self, model_dir: str, src: np.ndarray, args):
    import ctranslate2
    self.args = args
    ct2_dir = os.path.join(model_dir, 'ct2')
    if not os.path.exists(os.path.join(ct2_dir, 'model.bin')):
      ctranslate2.converters.TransformersConverter(model_dir).convert(ct2_dir, force=True)
    self.translator = ctranslate2.Translator(ct2_dir, device='cpu', inter_threads=1,
                                             intra_threads=args.ct2_threads)
    vocab = common.marian_vocab()
    self.source = [[vocab[t - 1] for t in row] for row in src.tolist()]
    self.calls = 0

  def run(self) -> int:
    import ctranslate2
    a = self.args
    ctranslate2.set_random_seed(self.calls + 1)
    self.calls += 1
    results = self.translator.translate_batch(
        self.source, beam_size=1, num_hypotheses=a.num_decodes, sampling_topk=0,
        sampling_temperature=a.temperature, min_decoding_length=a.new_tokens,
        max_decoding_length=a.new_tokens, max_batch_size=0)
    return sum(len(h) for r in results for h in r.hypotheses)


# -------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--arch', choices=sorted(common.ARCHS), default='tiny')
  p.add_argument('--json', help='write the results here')
  p.add_argument('--repeats', type=int, default=3, help='timed runs (median; >= 3)')
  p.add_argument('--warmup', type=int, default=1, help='untimed runs first (compilation)')
  p.add_argument('--batch', type=int, default=32, help='sources')
  p.add_argument('--src-len', type=int, default=32)
  p.add_argument('--num-decodes', type=int, default=8, help='candidates per source')
  p.add_argument('--new-tokens', type=int, default=64, help='tokens generated per candidate')
  p.add_argument('--temperature', type=float, default=0.8)
  p.add_argument('--torch-threads', type=int, default=2)
  p.add_argument('--ct2-threads', type=int, default=2, help='CTranslate2 intra_threads')
  p.add_argument('--sides', default='rest_jax,hf,ct2',
                 help='comma-separated subset of rest_jax,hf,ct2')
  p.add_argument('--model-dir', help='where the random Marian model (+ its CTranslate2 '
                 'conversion) is written; default: a temporary directory')
  p.add_argument('--profile', action='store_true',
                 help='also time one rest-jax decode step: model vs sampling')
  args = p.parse_args(argv)
  common.warn_if_busy()
  sides = [s.strip() for s in args.sides.split(',') if s.strip()]
  unknown = set(sides) - {'rest_jax', 'hf', 'ct2'}
  if unknown:
    p.error(f'unknown sides {sorted(unknown)}')

  src = make_sources(args.batch, args.src_len)
  expected = args.batch * args.num_decodes * args.new_tokens
  print(f'grow throughput, arch={args.arch}: {args.batch} sources x {args.src_len} tokens, '
        f'{args.num_decodes} samples each (T={args.temperature}), {args.new_tokens} new tokens '
        f'= {expected:,} tokens/run; {args.warmup} warm-up run(s), median of {args.repeats}',
        flush=True)

  tmp = None
  model_dir = args.model_dir
  if ({'hf', 'ct2'} & set(sides)) and not model_dir:
    tmp = tempfile.TemporaryDirectory(prefix='rest_jax_bench_marian_')
    model_dir = tmp.name
  if model_dir and ({'hf', 'ct2'} & set(sides)) and not os.path.exists(
      os.path.join(model_dir, 'config.json')):
    common.marian_dir(args.arch, model_dir)

  results: dict[str, dict] = {}
  profile = None
  for name in sides:
    if name == 'rest_jax':
      side = RestJaxSide(args.arch, src, args)
    elif name == 'hf':
      side = HFSide(model_dir, src, args)
    else:
      side = CT2Side(model_dir, src, args)
    counts = []
    run = lambda: counts.append(side.run())  # noqa: E731
    t = common.median_time(run, warmup=args.warmup, repeats=args.repeats)
    if any(c != expected for c in counts):
      raise RuntimeError(f'{name}: generated {counts} tokens per run, expected {expected}')
    results[name] = {'seconds_per_run': t['seconds'], 'repeats_seconds': t['repeats'],
                     'tokens_per_run': expected, 'tokens_per_s': expected / t['seconds']}
    print(f'  {name}: {t["seconds"]:.2f} s/run, {expected / t["seconds"]:,.0f} tok/s',
          flush=True)
    if name == 'rest_jax' and args.profile:
      profile = side.profile()
    del side
  if tmp is not None:
    tmp.cleanup()

  tps = lambda n: results.get(n, {}).get('tokens_per_s')  # noqa: E731
  ratio = lambda a, b: tps(a) / tps(b) if tps(a) and tps(b) else None  # noqa: E731
  labels = {'rest_jax': 'rest-jax predict_batch (jit)', 'hf': 'HF transformers generate',
            'ct2': 'CTranslate2 translate_batch'}
  print()
  common.print_table(
      [[labels[n], f'{r["seconds_per_run"]:.2f}', common.fmt_num(r['tokens_per_s']),
        '-' if n == 'rest_jax' or not ratio('rest_jax', n) else f'{ratio("rest_jax", n):.2f}x']
       for n, r in results.items()],
      ['side', 's/run', 'generated tok/s', 'rest-jax / side'])
  if profile:
    bn = args.batch * args.num_decodes
    print(f'\nrest-jax, one decode step ({bn} rows), each part jitted alone:')
    step_total = (profile['decode step: model (decode_step)'] +
                  profile['decode step: sampling (sample_logits)'])
    rows = []
    for n, ms in profile.items():
      if not isinstance(ms, float):
        continue
      share = f'{100 * ms / step_total:.0f}% of step' if n.startswith('decode step') else ''
      rows.append([n, f'{ms:,.2f}', share])
    rows.append([f'x {args.new_tokens} steps (model + sampling)',
                 f'{step_total * args.new_tokens:,.0f}', ''])
    common.print_table(rows, ['part', 'ms', ''])

  out = {
      'arch': args.arch,
      'rest_jax_tokens_per_s': tps('rest_jax'),
      'hf_tokens_per_s': tps('hf'),
      'ct2_tokens_per_s': tps('ct2'),
      'ratio_vs_hf': ratio('rest_jax', 'hf'),
      'ratio_vs_ct2': ratio('rest_jax', 'ct2'),
      'details': results,
      'settings': {
          'sources': args.batch, 'src_len': args.src_len, 'num_decodes': args.num_decodes,
          'new_tokens': args.new_tokens, 'tokens_per_run': expected,
          'temperature': args.temperature, 'topk': 0, 'topp': 1.0, 'eos': 'disabled',
          'repeats': args.repeats, 'warmup_runs': args.warmup, 'dtype': 'float32',
          'torch_threads': args.torch_threads, 'ct2_intra_threads': args.ct2_threads,
          'ct2_inter_threads': 1, 'rest_jax_devices': 1,
          'model': dict(common.ARCHS[args.arch], vocab_size=common.VOCAB_SIZE)},
      'versions': common.versions('torch', 'transformers', 'ctranslate2', 'sentencepiece'),
      'machine': common.machine_info(),
      'timestamp': common.timestamp(),
  }
  if profile:
    out['profile_ms'] = {n: ms for n, ms in profile.items() if isinstance(ms, float)}
    if 'decode_step_op_classes' in profile:
      out['profile_decode_step_op_classes'] = profile['decode_step_op_classes']
  if args.json:
    common.write_json(args.json, out)
    print(f'wrote {args.json}')
  return out


if __name__ == '__main__':
  main()
