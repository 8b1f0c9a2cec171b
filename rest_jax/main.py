"""The `rest-jax` command: gin-configured entry points, t5x-style flags.

    rest-jax train --gin_file=gin_configs/runs/train_bc.gin [--gin.NAME=VALUE ...] [--workdir=DIR]
    rest-jax eval  --gin_file=gin_configs/runs/train_bc.gin [--model_dir=DIR]
    rest-jax grow  --gin_file=gin_configs/runs/grow.gin --gin.grow.policy_dir="'workdir/bc'"
    rest-jax improve --gin_file=gin_configs/runs/improve.gin --gin.improve.scored_dir=... \
        --gin.improve.init_policy_dir=... --gin.improve.rm_dir=... [--model_dir=DIR]
    rest-jax rest  --gin_file=gin_configs/runs/rest_libreoffice_de_en_cpu.gin [--workdir=DIR]
    rest-jax rest-em --gin_file=gin_configs/runs/rest_em_arithmetic_cpu.gin [--workdir=DIR]
    rest-jax online --gin_file=gin_configs/runs/ppo_libreoffice_de_en_cpu.gin [--workdir=DIR]
    rest-jax translate --gin_file=gin_configs/models/tiny.gin \
        --policy=checkpoints/bc_tiny_libreoffice_de_en/params.npz [--input=F] [--output=F] \
        [--method=greedy|beam|sample] [--num_decodes=N --rm_dir=DIR] [--jsonl]

Multi-host: the same command on every host with `--distributed` (or `REST_JAX_DISTRIBUTED=1`),
plus `--coordinator_address=HOST:PORT --num_processes=P --process_id=I` where JAX cannot detect
them (`rest_jax.distributed`). Independent Grow / scoring workers: the same command in several
processes with one `REST_JAX_JOB_ID` (they share the chunks, `records.claim_chunks`).
`--gin_file` may repeat; `--gin.NAME=VALUE` adds one binding (`--gin.train.batch_size=32`);
`--gin_search_path` (default: the repo root and `gin_configs/`) resolves `include` lines.
`--workdir` (default ./workdir) holds every stage of a run; `--model_dir` defaults to
`<workdir>/bc` (`<workdir>/grow_<grow_step>` for grow). Commands that write it (all but eval,
rm-check and translate) hold its job lock (`rest_jax.joblock`): a second job on the same work
directory is refused, naming the first. `--repair` regenerates chunks that fail their markers'
check (`rest_jax.records`) instead of stopping with an error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

import gin

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_REGISTERED = False


def register_gin_configurables() -> None:
  """Imports every gin-configurable module; the model classes become `models.<Name>`."""
  global _REGISTERED
  if _REGISTERED:
    return
  import jax.numpy as jnp
  import tasks  # noqa: F401  (SeqIO tasks; `tasks.translation.*` bindings)
  from rest_jax import train  # noqa: F401  (train, evaluate, make_optimizer, create_mesh)
  from rest_jax import grow  # noqa: F401  (grow)
  from rest_jax.rewards import check, model, scoring, train_rm  # noqa: F401  (reward side)
  from rest_jax import filtering, improve, losses, online, rest, rest_em  # noqa: F401  (loops)
  from rest_jax import translate  # noqa: F401  (translate_lines)
  from rest_jax.models import encoder_decoder, transformer
  gin.external_configurable(transformer.TransformerConfig, 'TransformerConfig', module='models')
  gin.external_configurable(transformer.Transformer, 'Transformer', module='models')
  gin.external_configurable(encoder_decoder.EncoderDecoderModel, 'EncoderDecoderModel',
                            module='models')
  gin.constant('models.bfloat16', jnp.bfloat16)
  gin.constant('models.float32', jnp.float32)
  _REGISTERED = True


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str] = ()) -> None:
  """Parses gin files then bindings (later ones win), t5x-style.

  Raises:
    FileNotFoundError: a gin file not found on the search path.
  """
  register_gin_configurables()
  roots = [os.getcwd()] + list(search_paths) + [os.path.join(_ROOT, 'gin_configs'), _ROOT]
  for path in roots[1:]:
    gin.add_config_file_search_path(path)
  # gin logs an ERROR for every search-path entry an `include` is not under: noise, not errors.
  logging.getLogger().addFilter(lambda r: not str(r.msg).startswith('Path not found'))
  resolved = []
  for name in gin_files:  # Absolute paths: gin's resource reader chokes on namespace packages.
    found = [os.path.join(r, name) for r in roots if os.path.exists(os.path.join(r, name))]
    if not found:
      raise FileNotFoundError(f'gin file {name!r} not found in {roots}')
    resolved.append(os.path.abspath(found[0]))
  gin.parse_config_files_and_bindings(resolved, list(bindings), finalize_config=False)
  from tasks import translation
  translation.register_tasks()  # Again, now with the gin-bound vocabulary size.


def _split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Pulls `--gin.NAME=VALUE` flags out of argv (argparse can't declare them)."""
  bindings, rest = [], []
  for arg in argv:
    if arg.startswith('--gin.'):
      name, sep, value = arg[len('--gin.'):].partition('=')
      if not sep:
        raise SystemExit(f'{arg}: expected --gin.NAME=VALUE')
      bindings.append(f'{name} = {value}')
    else:
      rest.append(arg)
  return bindings, rest


def _persistent_jit_cache(path: str) -> None:
  """XLA's persistent compilation cache in the work directory (unless one is set already).

  Every stage of the ReST loop builds its own jitted steps (and a resumed run starts afresh), but
  they compile the same programs: the cache turns their recompilation (tens of seconds a shape
  on 2 CPU cores) into a file read.
  """
  import jax
  if not jax.config.jax_compilation_cache_dir:
    os.makedirs(path, exist_ok=True)
    jax.config.update('jax_compilation_cache_dir', os.path.abspath(path))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def main(argv: Sequence[str] | None = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  command_line = ' '.join(['rest-jax'] + argv)
  bindings, argv = _split_gin_flags(argv)
  parser = argparse.ArgumentParser(prog='rest-jax', description=__doc__.splitlines()[0])
  parser.add_argument('command', choices=['train', 'eval', 'grow', 'improve', 'rest', 'rest-em',
                                          'online', 'compare_losses', 'train_rm', 'score',
                                          'rm-check', 'translate'])
  parser.add_argument('--gin_file', action='append', default=[])
  parser.add_argument('--gin_search_path', action='append', default=[])
  parser.add_argument('--workdir', default='workdir')
  parser.add_argument('--model_dir', default=None)
  parser.add_argument('--log_level', default='INFO')
  parser.add_argument('--distributed', action='store_true',
                      help='join a multi-host job (jax.distributed; also $REST_JAX_DISTRIBUTED=1)')
  parser.add_argument('--coordinator_address', default=None,
                      help='host:port of process 0 (default: auto-detected by JAX)')
  parser.add_argument('--num_processes', type=int, default=None)
  parser.add_argument('--process_id', type=int, default=None)
  parser.add_argument('--repair', action='store_true',
                      help='regenerate corrupt or missing record chunks instead of stopping')
  # translate (each also a gin parameter of `translate_lines` when not given here):
  parser.add_argument('--policy', default=None, help='run dir or .npz (translate)')
  parser.add_argument('--input', default=None, help='source lines (translate; default stdin)')
  parser.add_argument('--output', default=None, help='(translate; default stdout)')
  parser.add_argument('--method', default=None, choices=['greedy', 'beam', 'sample'])
  parser.add_argument('--num_decodes', type=int, default=None)
  parser.add_argument('--rm_dir', default=None, help='reward model for best-of-N (translate)')
  parser.add_argument('--jsonl', action='store_true', help='JSON lines with rewards (translate)')
  args = parser.parse_args(argv)
  logging.basicConfig(level=args.log_level, format='%(asctime)s %(levelname)s %(message)s')
  for noisy in ('absl', 'jax._src', 'orbax', 'tensorflow'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  from rest_jax import distributed
  if distributed.requested(args.distributed):
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  if args.command == 'translate' and not any(b.startswith('translate_lines.model')
                                             for b in bindings):
    bindings.insert(0, 'translate_lines.model = %MODEL')  # The model gin file's MODEL.
  parse_gin(args.gin_file, bindings, args.gin_search_path)
  from rest_jax import fileio
  _persistent_jit_cache(os.path.join(fileio.local_cache_dir(args.workdir), 'jit'))
  from rest_jax import joblock, records
  records.set_repair(args.repair)
  try:
    if args.command in ('eval', 'rm-check', 'translate'):  # Readers: no lock.
      _run(args)
    else:
      with joblock.hold(args.workdir, command=command_line):
        _run(args)
  finally:
    records.set_repair(False)


def _run(args: argparse.Namespace) -> None:
  """Runs `args.command` (gin parsed)."""
  model_dir = args.model_dir or os.path.join(args.workdir, 'bc')
  from rest_jax import train as train_lib
  if args.command == 'train':
    summary = train_lib.train(model_dir)
    logging.info('done: %d steps, %.1f training minutes', summary['steps'],
                 summary['train_seconds'] / 60)
  elif args.command == 'eval':  # --model_dir may be an .npz: eval files go to <workdir>/eval.
    train_lib.evaluate(model_dir, output_dir=os.path.join(args.workdir, 'eval')
                       if model_dir.endswith('.npz') else None)
  elif args.command == 'grow':
    from rest_jax import grow as grow_lib
    try:
      grow_step = gin.query_parameter('grow.grow_step')
    except ValueError:  # Not bound: the default.
      grow_step = 1
    grow_lib.grow(args.model_dir or os.path.join(args.workdir, f'grow_{grow_step}'))
  elif args.command in ('train_rm', 'score', 'rm-check'):
    # train_rm -> <workdir>/rm from <workdir>/grow_1; score -> <workdir>/scored_<g> of the bound
    # score.grow_dir (else <workdir>/grow_1) with <workdir>/rm; rm-check of <workdir>/rm. A bound
    # `<fn>.grow_dir` / `<fn>.rm_dir` wins; --model_dir replaces the output dir.
    import re
    from rest_jax.rewards import check, scoring, train_rm

    def bound(name):  # The gin binding, or None.
      try:
        return gin.query_parameter(name)
      except ValueError:
        return None
    rm_dir = args.model_dir or os.path.join(args.workdir, 'rm')
    grow_dir = os.path.join(args.workdir, 'grow_1')
    if args.command == 'train_rm':
      train_rm.train_reward_model(rm_dir, **({} if bound('train_reward_model.grow_dir')
                                             else {'grow_dir': grow_dir}))
    elif args.command == 'score':
      kw = {} if bound('score.grow_dir') else {'grow_dir': grow_dir}
      m = re.search(r'grow_(\d+)/*$', bound('score.grow_dir') or grow_dir)
      if not bound('score.rm_dir'):
        kw['rm_dir'] = os.path.join(args.workdir, 'rm')
      out = os.path.join(args.workdir, f'scored_{m.group(1) if m else 1}')
      scoring.score(args.model_dir or out, **kw)
    else:
      check.rm_check(rm_dir, **({} if bound('rm_check.rm_dir') else {'rm_dir': rm_dir}))
  elif args.command == 'improve':
    from rest_jax import improve as improve_lib
    improve_lib.improve(args.model_dir or os.path.join(args.workdir, 'improve'))
  elif args.command == 'rest':
    from rest_jax import rest as rest_lib
    rest_lib.rest(args.workdir)
  elif args.command == 'rest-em':
    from rest_jax import rest_em as rest_em_lib
    rest_em_lib.rest_em(args.workdir)
  elif args.command == 'online':
    from rest_jax import online as online_lib
    online_lib.online(args.workdir)
  elif args.command == 'translate':
    from rest_jax import translate as translate_lib
    kw = {k: v for k, v in dict(policy=args.policy, method=args.method,
                                num_decodes=args.num_decodes, rm_dir=args.rm_dir).items()
          if v is not None}
    translate_lib.run(args.input, args.output, jsonl=args.jsonl, **kw)
  elif args.command == 'compare_losses':
    from rest_jax import rest as rest_lib
    rest_lib.compare_losses(args.workdir)


if __name__ == '__main__':
  main()
