"""A real Grow against the synthetic Grow benchmark, in one script run (rest-jax only).

    python benchmarks/grow_real.py --json benchmarks/results/grow_real_tiny.json

1. The synthetic figure: `grow_throughput.py --arch tiny --sides rest_jax` (random-init `tiny`,
   32 sources x 32 tokens, 8 samples each at T = 0.8, exactly 64 new tokens each, EOS off):
   generated tokens per second, median of `--repeats`.
2. The real one: `rest_jax.grow.grow`, what `rest-jax grow` runs, with the shipped BC policy
   (`checkpoints/bc_tiny_libreoffice_de_en/params.npz`, the `tiny` model) on `--num-sources`
   libreoffice_help_de_en train sources (every `--source-every`-th, so they span the split), N = 8
   at T = 0.8, EOS on, `--batch-size` sources per batch, length buckets 16/32/64/128 and
   `decode_length_ratio` 2 as in the main job. It runs in one process into fresh directories:
   the first run compiles the samplers (one per length bucket, row count and cache window:
   `cold`), the later ones reuse them (`warm`: the steady state of a long Grow). Figures from
   each run's `manifest.json`: `sampled_tokens_per_second` = non-PAD generated tokens (EOS
   included) / sampling seconds; reference scoring and record building + writing seconds beside
   it.

The synthetic and the warm real runs alternate, `--rounds` times (on a shared 2-core machine the
speed drifts by tens of percent over minutes; alternating exposes both to the same drift):
`ratio` = warm real sampled tok/s / synthetic tok/s of the round whose ratio is the median
(issue 16's goal: >= 0.8); every round is in the JSON's `rounds`. The synthetic benchmark runs
every row for 64 steps; a real batch runs until its longest sample ends (or its bucket's length
bound), so rows that finished early cost steps they do not fill. The machine must be otherwise
idle (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (benchmarks/common.py)
import grow_throughput  # noqa: E402

POLICY = os.path.join(common.REPO, 'checkpoints', 'bc_tiny_libreoffice_de_en', 'params.npz')
TASK = 'libreoffice_help_de_en'


def make_model():
  """The `tiny` model from its gin file (one object for both runs: the samplers are cached per
  model object, so the second run reuses the first run's compilations)."""
  import gin
  from rest_jax import main as main_lib
  main_lib.register_gin_configurables()
  gin.clear_config()
  gin.parse_config_files_and_bindings([os.path.join(common.REPO, 'gin_configs', 'models',
                                                    'tiny.gin')], [])
  return gin.query_parameter('%MODEL').scoped_configurable_fn()


def real_grow(args, name: str, model) -> dict:
  """One `grow` run into a fresh temporary directory; its manifest's timings and counts."""
  from rest_jax import fileio, grow as grow_lib
  with tempfile.TemporaryDirectory(prefix=f'rest_jax_grow_real_{name}_') as d:
    out_dir = os.path.join(d, 'grow')
    grow_lib.grow(out_dir, model=model, policy_dir=args.policy, task=TASK, num_decodes=8,
                  temperature=0.8, max_decode_len=128, decode_length_ratio=2.0,
                  batch_size=args.batch_size, compact_factor=args.compact_factor,
                  first_window=args.first_window, chunk_size=args.num_sources,
                  max_sources=args.num_sources, source_every=args.source_every, seed=0)
    m = fileio.read_json(os.path.join(out_dir, 'manifest.json'))
  keys = ('sample_seconds', 'reference_score_seconds', 'write_seconds', 'wall_seconds',
          'sampled_tokens_per_second', 'generated_tokens_this_run')
  r = dict({k: m[k] for k in keys}, counts=m['counts'])
  print(f'  real Grow ({name}): {r["generated_tokens_this_run"]:,} tokens, sampling '
        f'{r["sample_seconds"]:.1f} s = {r["sampled_tokens_per_second"]:,.0f} tok/s; '
        f'reference scoring {r["reference_score_seconds"]:.1f} s, records '
        f'{r["write_seconds"]:.1f} s', flush=True)
  return r


def median_round(rounds: list[dict]) -> dict:
  """The round whose ratio is the median (the lower middle one for an even count): its
  synthetic and real figures are the ones reported, so that ratio = real / synthetic."""
  return sorted(rounds, key=lambda x: x['ratio'])[(len(rounds) - 1) // 2]


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--json', help='write the results here')
  p.add_argument('--policy', default=POLICY)
  p.add_argument('--num-sources', type=int, default=2000)
  p.add_argument('--source-every', type=int, default=15)
  p.add_argument('--batch-size', type=int, default=32, help='sources per decoding batch')
  p.add_argument('--compact-factor', type=int, default=None,
                 help='finished rows leave a batch in steps of this factor (0: never; default: '
                      'grow.COMPACT_FACTOR)')
  p.add_argument('--first-window', type=int, default=None,
                 help='decoding starts with a cache of this many positions (0: full length; '
                      'default: grow.FIRST_WINDOW)')
  p.add_argument('--repeats', type=int, default=3, help='synthetic benchmark: timed runs a round')
  p.add_argument('--rounds', type=int, default=3,
                 help='alternations of (synthetic benchmark, warm real Grow)')
  args = p.parse_args(argv)
  common.warn_if_busy()
  from rest_jax import grow as grow_lib
  if args.compact_factor is None:
    args.compact_factor = grow_lib.COMPACT_FACTOR
  if args.first_window is None:
    args.first_window = grow_lib.FIRST_WINDOW

  model = make_model()
  cold = real_grow(args, 'cold', model)
  rounds = []
  for r in range(args.rounds):
    print(f'round {r + 1}: synthetic (grow_throughput.py --arch tiny --sides rest_jax), then '
          'the warm real Grow', flush=True)
    synthetic = grow_throughput.main(['--arch', 'tiny', '--sides', 'rest_jax',
                                      '--repeats', str(args.repeats)])
    warm = real_grow(args, 'warm', model)
    rounds.append(dict(synthetic_tokens_per_s=synthetic['rest_jax_tokens_per_s'], warm=warm,
                       ratio=warm['sampled_tokens_per_second']
                       / synthetic['rest_jax_tokens_per_s']))
  mid = median_round(rounds)
  out = dict(benchmark='grow_real', arch='tiny', policy=os.path.relpath(args.policy, common.REPO),
             task=TASK, num_sources=args.num_sources, source_every=args.source_every,
             batch_size=args.batch_size, compact_factor=args.compact_factor,
             first_window=args.first_window, num_decodes=8, temperature=0.8,
             synthetic_tokens_per_s=mid['synthetic_tokens_per_s'],
             real=dict(cold=cold, warm=mid['warm']),
             real_tokens_per_s=mid['warm']['sampled_tokens_per_second'], ratio=mid['ratio'],
             rounds=[dict(synthetic_tokens_per_s=x['synthetic_tokens_per_s'],
                          real_tokens_per_s=x['warm']['sampled_tokens_per_second'],
                          real_sample_seconds=x['warm']['sample_seconds'], ratio=x['ratio'])
                     for x in rounds],
             synthetic_settings=synthetic['settings'],
             versions=common.versions('jax', 'jaxlib', 'flax'), machine=common.machine_info(),
             timestamp=common.timestamp())
  print(f'real / synthetic = {out["ratio"]:.2f} ({out["real_tokens_per_s"]:,.0f} / '
        f'{out["synthetic_tokens_per_s"]:,.0f} tok/s), the median of the rounds\' ' + ', '.join(
            f'{x["ratio"]:.2f}' for x in rounds), flush=True)
  if args.json:
    common.write_json(args.json, out)
  return out


if __name__ == '__main__':
  main()
