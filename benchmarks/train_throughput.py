"""Training throughput: rest-jax's jitted train step side by side with PyTorch + HF MarianMT.

    python benchmarks/train_throughput.py --arch tiny  --json bench/train_tiny.json
    python benchmarks/train_throughput.py --arch iwslt --json bench/train_iwslt.json
    python benchmarks/train_throughput.py --arch tiny --profile /tmp/prof   # + where the time goes

What is timed (one process, the same batch on both sides):
  * batch 32 sources x 32 source tokens x 32 target tokens, every token real (no padding);
  * rest-jax: `Trainer.train_step` (jit, donated state, 1 device; AdamW with global-norm clipping,
    label smoothing 0.1, dropout 0.1) of `EncoderDecoderModel(Transformer(TransformerConfig))`;
  * PyTorch (torch.set_num_threads(2)): a random-init Hugging Face `MarianMTModel` of identical
    size (same d_model, layers, heads x head_dim, FFN, 8,000-token shared + tied vocabulary,
    dropout 0.1), forward + label-smoothed (0.1) cross-entropy + backward + clip_grad_norm_(1.0)
    + torch.optim.AdamW (weight decay on matrices only, like rest-jax). Nothing is downloaded.
  * bfloat16: rest-jax `TransformerConfig(dtype=jnp.bfloat16)` (float32 params, bf16 compute);
    torch `torch.autocast('cpu', dtype=torch.bfloat16)` around forward + loss.
  * `--warmup` untimed steps (compilation), then the median over `--repeats` (>= 3) timings of
    `--steps` consecutive steps, each ended by `jax.block_until_ready`; reported per step.

Figures:
  * tokens/s = target tokens per step (32 x 32 = 1,024) / median step time.
  * FLOP/s = FLOPs per step / step time, with (both sides: the models have the same shapes)
      FLOPs = 6 * (P_enc * B * Ls + (P_dec + V * d) * B * Lt)
            + 6 * 2 * B * (h * hd) * (L_enc * Ls^2 + L_dec * Lt^2 + L_dec * Lt * Ls)
    P_enc / P_dec = matmul parameters (attention q, k, v, out + MLP wi, wo) of the encoder /
    decoder layers, counted against source / target tokens; V * d = the tied output projection,
    counted once against target tokens; the attention term counts encoder self-attention,
    decoder self-attention (full, not causal-halved) and cross-attention (QK^T and PV).
  * peak_flops: the best float32 FLOP/s of `jax.jit(jnp.dot)` on n x n matrices (n = 1024,
    2048, 3072) on this machine; mfu = rest-jax float32 FLOP/s / peak_flops. (The bf16 MFU
    figures are relative to the same float32 peak.)

`--profile DIR` (rest-jax only, in the first `--dtype`) adds: a `jax.profiler` trace of a few
steps in DIR (open with TensorBoard / Perfetto) and the top ops by time read back from it, XLA's
compiled cost analysis of the step (flops, bytes accessed) next to the formula above, and the step
split into forward (loss) only, forward + backward, and the optimizer update, each jitted alone.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import common  # noqa: E402  (benchmarks/common.py)

LABEL_SMOOTHING = 0.1
DROPOUT = 0.1
LR = 1e-3
WEIGHT_DECAY = 1e-4


def make_batch(batch: int, src_len: int, tgt_len: int, seed: int = 0) -> dict[str, np.ndarray]:
  """rest-jax ids: random ordinary pieces (3 .. V-1), no padding; targets end with EOS."""
  rng = np.random.default_rng(seed)
  enc = rng.integers(3, common.VOCAB_SIZE, (batch, src_len), dtype=np.int32)
  tgt = rng.integers(3, common.VOCAB_SIZE, (batch, tgt_len), dtype=np.int32)
  enc[:, -1] = 1
  tgt[:, -1] = 1
  dec_in = np.pad(tgt, ((0, 0), (1, 0)))[:, :-1]
  return {'encoder_input_tokens': enc, 'decoder_input_tokens': dec_in,
          'decoder_target_tokens': tgt,
          'decoder_loss_weights': np.ones((batch, tgt_len), np.float32)}


# -------------------------------------------------------------------------------------------------
# rest-jax.
# -------------------------------------------------------------------------------------------------

class RestJaxSide:
  """A rest-jax Trainer on one device, stepping on a fixed batch."""

  def __init__(self, arch: str, dtype: str, np_batch: dict[str, np.ndarray], seed: int = 0):
    import jax
    from rest_jax import partitioning, trainer as trainer_lib
    from rest_jax.models import EncoderDecoderModel, Transformer
    self.jax = jax
    cfg = common.transformer_config(arch, dtype, dropout=DROPOUT)
    self.model = EncoderDecoderModel(Transformer(cfg), label_smoothing=LABEL_SMOOTHING)
    self.optimizer = trainer_lib.make_optimizer(learning_rate=LR, warmup_steps=1000,
                                                schedule='rsqrt', weight_decay=WEIGHT_DECAY)
    mesh = partitioning.create_mesh(1, devices=jax.devices()[:1])
    self.trainer = trainer_lib.Trainer(self.model, self.optimizer, mesh, seed=seed)
    shapes = {k: v.shape for k, v in np_batch.items()}
    self.state = self.trainer.init_state(shapes)
    self.batch = partitioning.shard_batch(np_batch, mesh)
    self.metrics = None

  def step(self):
    self.state, self.metrics = self.trainer.train_step(self.state, self.batch)
    self.jax.block_until_ready((self.state, self.metrics))

  def run(self, k: int):
    for _ in range(k):
      self.state, self.metrics = self.trainer.train_step(self.state, self.batch)
    self.jax.block_until_ready((self.state, self.metrics))


# -------------------------------------------------------------------------------------------------
# PyTorch + transformers.
# -------------------------------------------------------------------------------------------------

class TorchSide:
  """A random MarianMTModel of the same size, trained with AdamW on the same batch."""

  def __init__(self, arch: str, dtype: str, np_batch: dict[str, np.ndarray], threads: int,
               seed: int = 0):
    import torch
    torch.set_num_threads(threads)
    self.torch = torch
    self.model = common.build_marian_model(arch, seed=seed, dropout=DROPOUT)
    self.model.train()
    pad = common.VOCAB_SIZE - 1
    # rest-jax id t >= 1 is Marian id t - 1 (see common.marian_vocab); start/PAD = V - 1.
    self.src = torch.from_numpy(np_batch['encoder_input_tokens'].astype(np.int64) - 1)
    tgt = np_batch['decoder_target_tokens'].astype(np.int64) - 1
    self.labels = torch.from_numpy(tgt)
    dec_in = np.concatenate([np.full((tgt.shape[0], 1), pad), tgt[:, :-1]], axis=1)
    self.dec_in = torch.from_numpy(dec_in)
    self.mask = torch.ones_like(self.src)
    decay = [p for p in self.model.parameters() if p.ndim >= 2]
    no_decay = [p for p in self.model.parameters() if p.ndim < 2]
    self.opt = torch.optim.AdamW([{'params': decay, 'weight_decay': WEIGHT_DECAY},
                                  {'params': no_decay, 'weight_decay': 0.0}],
                                 lr=LR, betas=(0.9, 0.98), eps=1e-9)
    self.autocast = dtype == 'bfloat16'
    self.vocab = self.model.config.vocab_size

  def step(self):
    torch = self.torch
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=self.autocast):
      logits = self.model(input_ids=self.src, attention_mask=self.mask,
                          decoder_input_ids=self.dec_in).logits
      loss = torch.nn.functional.cross_entropy(
          logits.float().reshape(-1, self.vocab), self.labels.reshape(-1),
          label_smoothing=LABEL_SMOOTHING)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.opt.step()
    return float(loss.detach())

  def run(self, k: int):
    for _ in range(k):
      self.step()


# -------------------------------------------------------------------------------------------------
# Profiling (rest-jax).
# -------------------------------------------------------------------------------------------------

def profile_rest_jax(side: RestJaxSide, flops: dict[str, float], out_dir: str, args
                     ) -> dict:
  import jax
  import optax
  report: dict = {'trace_dir': os.path.abspath(out_dir)}
  trainer, model = side.trainer, side.model

  # 1. XLA's cost analysis of the compiled step.
  ops: dict[str, dict[str, str]] = {}
  try:
    with trainer.mesh_context():
      compiled = trainer._train_step.lower(  # pylint: disable=protected-access
          side.state, side.batch, jax.random.PRNGKey(trainer.seed)).compile()
    try:
      ops = common.hlo_ops(compiled.as_text())
    except Exception:  # pragma: no cover
      pass
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    keep = {k: float(v) for k, v in cost.items()
            if k in ('flops', 'bytes accessed', 'transcendentals', 'optimal_seconds')}
    report['xla_cost_analysis'] = keep
    print('\nXLA cost analysis of the compiled train step:')
    common.print_table(
        [['XLA flops', f"{keep.get('flops', float('nan')) / 1e9:,.2f} GFLOP"],
         ['formula FLOPs', f"{flops['total'] / 1e9:,.2f} GFLOP"],
         ['bytes accessed', f"{keep.get('bytes accessed', float('nan')) / 1e6:,.1f} MB"],
         ['transcendentals', f"{keep.get('transcendentals', float('nan')) / 1e6:,.2f} M"]],
        ['quantity', 'value'])
  except Exception as e:  # pragma: no cover - diagnostics only
    print(f'(cost analysis unavailable: {type(e).__name__}: {e})')

  # 2. Trace of a few steps; the top XLA ops by time read back from it.
  os.makedirs(out_dir, exist_ok=True)
  side.run(1)
  n_traced = 3
  try:
    with jax.profiler.trace(out_dir, create_perfetto_trace=True):
      side.run(n_traced)
  except TypeError:  # older jax without create_perfetto_trace
    with jax.profiler.trace(out_dir):
      side.run(n_traced)
  times = common.trace_op_times(out_dir)
  if times:
    top = sorted(times.items(), key=lambda kv: -kv[1][0])[:15]
    print(f'\nTop XLA ops in the trace (ms per step, {n_traced} steps traced; shapes from the '
          'compiled HLO):')
    common.print_table([[n[:40], ops.get(n, {}).get('hlo', ''), f'{ms / n_traced:,.1f}']
                        for n, (ms, c) in top], ['op', 'HLO', 'ms/step'])
    report['trace_top_ops'] = [{'name': n, 'hlo': ops.get(n, {}).get('hlo', ''),
                                'op_name': ops.get(n, {}).get('op_name', ''),
                                'ms_per_step': ms / n_traced, 'count': c}
                               for n, (ms, c) in top]
    classes = common.op_class_table(times, ops, n_traced)
    print('\nThe traced op time by class (ms per step; forward / backward from JAX\'s op_name):')
    common.print_table([[r['class'], f"{r['ms_per_step']:,.1f}", f"{100 * r['share']:.0f}%",
                         f"{r['forward_ms']:,.1f}", f"{r['backward_ms']:,.1f}", r['ops']]
                        for r in classes], ['class', 'ms/step', 'share', 'fwd', 'bwd', 'ops'])
    report['op_classes'] = classes

  # 3. Components, each jitted alone.
  params = side.state.params
  opt_state = side.state.opt_state
  batch = side.batch
  rng = jax.random.PRNGKey(1)
  loss_only = jax.jit(lambda p, b, r: model.loss_fn(p, b, r)[0])
  grad_fn = jax.jit(jax.value_and_grad(lambda p, b, r: model.loss_fn(p, b, r)[0]))

  def _update(g, o, p):
    updates, o = side.optimizer.update(g, o, p)
    return optax.apply_updates(p, updates), o
  update = jax.jit(_update)
  with trainer.mesh_context():
    _, grads = grad_fn(params, batch, rng)
    parts = {
        'forward (loss)': lambda: jax.block_until_ready(loss_only(params, batch, rng)),
        'forward + backward': lambda: jax.block_until_ready(grad_fn(params, batch, rng)),
        'optimizer update': lambda: jax.block_until_ready(update(grads, opt_state, params)),
        'full train step': side.step,
    }
    timings = {name: common.median_time(fn, warmup=2, repeats=args.repeats,
                                        inner=args.steps)['seconds']
               for name, fn in parts.items()}
  full = timings['full train step']
  print('\nrest-jax step split (each part jitted alone, median ms):')
  common.print_table([[n, f'{t * 1e3:,.1f}', f'{100 * t / full:.0f}%'] for n, t in timings.items()],
                     ['part', 'ms', 'of step'])
  report['components_ms'] = {n: t * 1e3 for n, t in timings.items()}
  return report


# -------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--arch', choices=sorted(common.ARCHS), default='tiny')
  p.add_argument('--json', help='write the results here')
  p.add_argument('--steps', type=int, default=5, help='steps per timed repeat')
  p.add_argument('--repeats', type=int, default=3, help='timed repeats (median; >= 3)')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps first (compilation)')
  p.add_argument('--dtype', choices=['float32', 'bfloat16', 'both'], default='both')
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--src-len', type=int, default=32)
  p.add_argument('--tgt-len', type=int, default=32)
  p.add_argument('--torch-threads', type=int, default=2)
  p.add_argument('--no-torch', action='store_true', help='rest-jax only')
  p.add_argument('--no-rest-jax', action='store_true',
                 help='PyTorch only (a control: PyTorch without JAX having run in the process)')
  p.add_argument('--profile', metavar='DIR', help='profile the rest-jax step into DIR')
  args = p.parse_args(argv)
  common.warn_if_busy()

  dtypes = ['float32', 'bfloat16'] if args.dtype == 'both' else [args.dtype]
  np_batch = make_batch(args.batch, args.src_len, args.tgt_len)
  tokens = args.batch * args.tgt_len
  flops = common.train_flops_per_step(args.arch, args.batch, args.src_len, args.tgt_len)

  print(f'train throughput, arch={args.arch}: batch {args.batch} x {args.src_len} source x '
        f'{args.tgt_len} target tokens; {flops["total"] / 1e9:.2f} GFLOP/step (formula); '
        f'{args.warmup} warm-up steps, median of {args.repeats} x {args.steps} steps',
        flush=True)

  results: dict[str, dict] = {}
  profile_report = None
  for dtype in dtypes:
    res = {}
    if not args.no_rest_jax:
      side = RestJaxSide(args.arch, dtype, np_batch)
      side.run(max(args.warmup, 1))  # compiles
      t = common.median_time(lambda: side.run(args.steps), warmup=0, repeats=args.repeats)
      res['rest_jax'] = {'seconds_per_step': t['seconds'] / args.steps,
                         'repeats_seconds_per_step': [x / args.steps for x in t['repeats']],
                         'loss': float(side.metrics['loss'])}
      print(f'  rest-jax {dtype}: {t["seconds"] / args.steps * 1e3:,.1f} ms/step', flush=True)
      if args.profile and profile_report is None:
        profile_report = profile_rest_jax(side, flops, args.profile, args)
        profile_report['dtype'] = dtype
      del side
    if not args.no_torch:
      tside = TorchSide(args.arch, dtype, np_batch, args.torch_threads)
      tside.run(max(args.warmup, 1))
      t = common.median_time(lambda: tside.run(args.steps), warmup=0, repeats=args.repeats)
      res['torch'] = {'seconds_per_step': t['seconds'] / args.steps,
                      'repeats_seconds_per_step': [x / args.steps for x in t['repeats']],
                      'loss': tside.step()}
      print(f'  torch    {dtype}: {t["seconds"] / args.steps * 1e3:,.1f} ms/step', flush=True)
      del tside
    results[dtype] = res

  # Measured last, so that `--no-rest-jax` times PyTorch with no JAX computation before it.
  peak = common.matmul_peak_flops()
  print(f'float32 matmul peak (jax.jit(jnp.dot)): {common.fmt_flops(peak["peak_flops"])} '
        f'{ {k: round(v / 1e9, 1) for k, v in peak["per_size"].items()} }', flush=True)
  for res in results.values():
    for side_name in list(res):
      s = res[side_name]['seconds_per_step']
      res[side_name]['tokens_per_s'] = tokens / s
      res[side_name]['flops_per_s'] = flops['total'] / s
      res[side_name]['mfu'] = flops['total'] / s / peak['peak_flops']

  def get(dtype, side, key):
    return results.get(dtype, {}).get(side, {}).get(key)

  rows = []
  for dtype in dtypes:
    for side_name, label in (('rest_jax', 'rest-jax (jit)'), ('torch', 'PyTorch + HF Marian')):
      if side_name not in results[dtype]:
        continue
      r = results[dtype][side_name]
      rows.append([label, dtype, f'{r["seconds_per_step"] * 1e3:,.1f}',
                   common.fmt_num(r['tokens_per_s']), common.fmt_flops(r['flops_per_s']),
                   f'{100 * r["mfu"]:.1f}%'])
  print()
  common.print_table(rows, ['side', 'dtype', 'ms/step', 'target tok/s', 'achieved',
                            'MFU (f32 dot peak)'])

  def ratio(dtype):
    a, b = get(dtype, 'rest_jax', 'tokens_per_s'), get(dtype, 'torch', 'tokens_per_s')
    return a / b if a and b else None

  for dtype in dtypes:
    if ratio(dtype):
      print(f'rest-jax / PyTorch ({dtype}): {ratio(dtype):.2f}x')

  out = {
      'arch': args.arch,
      'rest_jax_tokens_per_s': get('float32', 'rest_jax', 'tokens_per_s'),
      'torch_tokens_per_s': get('float32', 'torch', 'tokens_per_s'),
      'ratio': ratio('float32'),
      'peak_flops': peak['peak_flops'],
      'peak_flops_per_size': peak['per_size'],
      'mfu': get('float32', 'rest_jax', 'mfu'),
      'torch_mfu': get('float32', 'torch', 'mfu'),
      'rest_jax_flops_per_s': get('float32', 'rest_jax', 'flops_per_s'),
      'torch_flops_per_s': get('float32', 'torch', 'flops_per_s'),
      'flops_per_step': flops['total'],
      'flops_per_step_parts': flops,
      'flops_formula': common.FLOPS_FORMULA,
      'bf16': None if 'bfloat16' not in results else {
          'rest_jax_tokens_per_s': get('bfloat16', 'rest_jax', 'tokens_per_s'),
          'torch_tokens_per_s': get('bfloat16', 'torch', 'tokens_per_s'),
          'ratio': ratio('bfloat16'),
          'rest_jax_flops_per_s': get('bfloat16', 'rest_jax', 'flops_per_s'),
          'torch_flops_per_s': get('bfloat16', 'torch', 'flops_per_s'),
          'mfu_vs_f32_peak': get('bfloat16', 'rest_jax', 'mfu'),
      },
      'details': results,
      'settings': {
          'batch': args.batch, 'src_len': args.src_len, 'tgt_len': args.tgt_len,
          'tokens_per_step': tokens, 'tokens_counted': 'target tokens',
          'steps_per_repeat': args.steps, 'repeats': args.repeats,
          'warmup_steps': args.warmup, 'dtypes': dtypes, 'label_smoothing': LABEL_SMOOTHING,
          'dropout': DROPOUT, 'optimizer': 'AdamW lr 1e-3 b=(0.9, 0.98) eps 1e-9 wd 1e-4 '
          '(matrices), clip 1.0', 'torch_threads': args.torch_threads,
          'rest_jax_devices': 1, 'model': dict(common.ARCHS[args.arch],
                                                vocab_size=common.VOCAB_SIZE)},
      'versions': common.versions('torch', 'transformers'),
      'machine': common.machine_info(),
      'timestamp': common.timestamp(),
  }
  if profile_report:
    out['profile'] = profile_report
  if args.json:
    common.write_json(args.json, out)
    print(f'wrote {args.json}')
  return out


if __name__ == '__main__':
  main()
