"""Per-stage compute estimate of a ReST / ReST-EM run config on TPU or GPU slices (rest_jax/compute.py
states the assumptions: vendor peak figures, training at an assumed MFU, bandwidth-bound sampling).

    python scripts/compute_estimate.py gin_configs/runs/rest_iwslt14_de_en.gin \
        --accelerator=v5e-8 --accelerator=a100x8 [--mfu=0.4] [--num_sources=N] [--json=OUT.json]

Prints one markdown table per accelerator; --json writes every estimate (params, stages, the chip's
figures) to one file. Parameter counts come from the config's model under jax.eval_shape (CPU,
no memory). Extra `--gin.NAME=VALUE` flags are applied after the config, as in rest-jax.
"""

import argparse
import json
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rest_jax import accelerators, compute  # noqa: E402


def run(config: str, accelerator_names, mfu: float = 0.4, num_sources=None, bindings=()) -> dict:
  """{'config', 'loop', 'estimates': {accelerator name: compute.estimate(...)}} of one config."""
  import gin
  from rest_jax import main as main_lib
  gin.clear_config()
  main_lib.parse_gin([config], list(bindings))
  w = compute.workload_from_gin(num_sources=num_sources)
  model = gin.query_parameter(f"{w['loop']}.model").scoped_configurable_fn()
  shape = compute.policy_shape(model)
  rm_params = None
  if w.get('rm'):
    rm_params = compute.reward_model_params(
        gin.query_parameter('train_reward_model.config').scoped_configurable_fn())
  fn = compute.estimate
  if w['loop'] == 'online':
    from rest_jax import rest
    fn = compute.estimate_online
    # The reward model's size from the config's RM_CONFIG (the RM it loads has that shape).
    if w['online']['reward'] == 'rm' and rest.is_bound('%RM_CONFIG'):
      config_ = gin.query_parameter('%RM_CONFIG').scoped_configurable_fn()
      rm_params = compute.reward_model_params(config_)
      w['online']['rm_max_len'] = config_.max_len
  return {'config': config, 'loop': w['loop'], 'task': w['task'],
          'estimates': {name: fn(w, shape, rm_params, accelerators.parse(name), mfu)
                        for name in accelerator_names}}


def main(argv=None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  bindings = [a[len('--gin.'):].replace('=', ' = ', 1) for a in argv if a.startswith('--gin.')]
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('config', nargs='+')
  parser.add_argument('--accelerator', action='append', default=None)
  parser.add_argument('--mfu', type=float, default=0.4)
  parser.add_argument('--num_sources', type=int, default=None)
  parser.add_argument('--json', default=None)
  args = parser.parse_args([a for a in argv if not a.startswith('--gin.')])
  results = []
  for config in args.config:
    r = run(config, args.accelerator or ['v5e-8'], args.mfu, args.num_sources, bindings)
    results.append(r)
    for name, est in r['estimates'].items():
      p = est['params']
      rm = f", reward model {p['reward_model'] / 1e6:.2f}M" if p['reward_model'] else ''
      print(f"\n{config} ({r['loop']}, {r['task']}) on {name}: policy "
            f"{p['policy_total'] / 1e6:.1f}M params{rm}; MFU {args.mfu}\n")
      print(compute.format_table(est))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
