"""`rest-jax translate`: translate your own text with any policy, optionally best-of-N by a reward model.

    rest-jax translate --gin_file=gin_configs/models/tiny.gin \
        --policy=checkpoints/bc_tiny_libreoffice_de_en/params.npz --input=de.txt --output=en.txt
    echo 'Klicken Sie auf OK.' | rest-jax translate --gin_file=gin_configs/models/tiny.gin \
        --policy=workdir/improve_2_3 --method=sample --num_decodes=8 \
        --rm_dir=checkpoints/rm_small_libreoffice_de_en --jsonl

One source a line (UTF-8). The policy is a run directory (`rest-jax train` / `improve`; its best
checkpoint) or a shipped `.npz`; its recorded vocabulary (`vocab.json`, sha256 of the SentencePiece
model) must be the task's (`input_pipeline.check_policy_vocab`). Decoding:

  * `method='greedy'` (one output) or `'beam'` (`beam_size` beams, the best one);
  * `num_decodes=N > 1`: N candidates per source (`'sample'`: `grow.sample_candidates` at
    `temperature` / `topk`, the Grow sampler; `'beam'`: the N beams), reranked by a learned
    reward model (`rm_dir`): best-of-N, the candidate with the highest calibrated reward (the
    first drawn on ties). Metric rewards (BLEU, chrF) need references and are refused.

Output: one translation a line, or with `jsonl` one JSON object a line: source, translation,
and with a reward model its reward in [0, 1] (and, for N > 1, every candidate with its reward and
policy log-prob in nats). An empty source line gives an empty translation; a source longer than
`inputs_length - 1` tokens is an error naming the line (nothing is written).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Sequence, TextIO

import gin
import jax
import numpy as np

from rest_jax import data as data_lib
from rest_jax import evaluation, fileio, input_pipeline, partitioning, trainer as trainer_lib
from rest_jax.models.transformer import EOS_ID

METHODS = ('greedy', 'beam', 'sample')


def tokenize_sources(lines: Sequence[str], task: str, inputs_length: int) -> np.ndarray:
  """Source lines -> [n, inputs_length] int32 (SentencePiece ids + EOS, PAD = 0).

  Raises:
    ValueError: a line longer than `inputs_length - 1` tokens (names the 1-based line number).
  """
  vocab = input_pipeline.get_vocabulary(task)
  out = np.zeros((len(lines), inputs_length), np.int32)
  for i, line in enumerate(lines):
    ids = [int(t) for t in vocab.encode(line)] + [EOS_ID]
    if len(ids) > inputs_length:
      raise ValueError(f'line {i + 1}: {len(ids) - 1} tokens, more than inputs_length - 1 = '
                       f'{inputs_length - 1}; split it or raise translate.inputs_length')
    out[i, :len(ids)] = ids
  return out


def _candidates(model, params, enc: np.ndarray, *, method: str, num_decodes: int,
                beam_alpha: float, temperature: float, topk: int, seed: int,
                max_decode_len: int, decode_length_ratio: float | None, batch_size: int,
                mesh) -> tuple[list, np.ndarray]:
  """[n][N] candidate id lists (through EOS) and [n, N] policy log-probs (nats)."""
  from rest_jax import grow as grow_lib
  if method == 'sample':
    s = grow_lib.sample_candidates(model, params, enc, np.arange(len(enc)), seed=seed,
                                   num_decodes=num_decodes, temperature=temperature, topk=topk,
                                   max_decode_len=max_decode_len,
                                   decode_length_ratio=decode_length_ratio, mesh=mesh,
                                   batch_size=batch_size)
    ids = [[[int(t) for t in s['tokens'][b, j, :s['lengths'][b, j]]] for j in range(num_decodes)]
           for b in range(len(enc))]
    return ids, s['logprob_policy']
  # Beam: all N beams (best first) of one search per source.
  out = evaluation.decode_candidates(model, params, enc, method='beam', num_decodes=num_decodes,
                                     batch_size=batch_size, max_decode_len=max_decode_len,
                                     beam_alpha=beam_alpha,
                                     decode_length_ratio=decode_length_ratio, mesh=mesh)
  ids = [[data_lib.trim(row) for row in beams] for beams in out['tokens']]
  return ids, out['logprobs']


@gin.configurable(denylist=['lines', 'mesh', 'params'])
def translate_lines(lines: Sequence[str],
                    policy: str = gin.REQUIRED,
                    model=gin.REQUIRED,
                    task: str = 'libreoffice_help_de_en',
                    method: str = 'greedy',
                    num_decodes: int = 1,
                    beam_size: int = 4,
                    beam_alpha: float = 0.6,
                    temperature: float = 0.8,
                    topk: int = 0,
                    seed: int = 0,
                    reward: str = 'rm',
                    rm_dir: str | None = None,
                    inputs_length: int = 128,
                    max_decode_len: int = 128,
                    decode_length_ratio: float | None = 2.0,
                    batch_size: int = 32,
                    mesh=None,
                    params=None) -> list[dict[str, Any]]:
  """Translates `lines`; returns one dict per line (see the module docstring for the options).

  Returns:
    [{'source', 'translation'} plus, with `rm_dir`, 'reward' (calibrated, [0, 1]) and, for
    num_decodes > 1, 'candidates': [{'translation', 'reward', 'logprob'}] in draw / beam order].

  Raises:
    ValueError: an unknown method; num_decodes > 1 without `rm_dir` or with greedy; a reward
      other than 'rm' (metrics need references); a mismatched vocabulary (names both hashes);
      an overlong line.
  """
  if method not in METHODS:
    raise ValueError(f'unknown method {method!r}: use one of {METHODS}')
  if reward != 'rm':
    raise ValueError(f'reward {reward!r} is a metric of a translation against its reference, '
                     "and text to translate has none: rerank with a learned reward model "
                     "(reward='rm', rm_dir=...)")
  if num_decodes > 1 and method == 'greedy':
    raise ValueError("greedy decoding has one output: use method='sample' or 'beam' with "
                     'num_decodes > 1')
  if num_decodes > 1 and rm_dir is None:
    raise ValueError('num_decodes > 1 reranks best-of-N by a learned reward model: give rm_dir '
                     '(e.g. checkpoints/rm_small_libreoffice_de_en)')
  input_pipeline.check_vocab_size(task, model.config.vocab_size)
  input_pipeline.check_policy_vocab(policy, task)
  mesh = mesh if mesh is not None else partitioning.create_mesh(devices=jax.local_devices())
  if params is None:
    params = trainer_lib.restore_policy(policy, trainer_lib.abstract_params(model, mesh))
  detok = input_pipeline.detokenizer(task)
  keep = [i for i, line in enumerate(lines) if line.strip()]
  out: list[dict[str, Any]] = [{'source': line, 'translation': ''} for line in lines]
  if not keep:
    return out
  enc = tokenize_sources([lines[i] for i in keep], task, inputs_length)
  scorer = None
  if rm_dir is not None:
    from rest_jax.rewards import model as rm_model
    input_pipeline.check_policy_vocab(rm_dir, task)
    scorer = rm_model.load_reward_model(rm_dir, mesh=mesh)
  src_ids = [data_lib.trim(row) for row in enc]
  if num_decodes == 1:
    ids = evaluation.predict_ids(model, params, enc, batch_size=batch_size,
                                 max_decode_len=max_decode_len,
                                 method='beam' if method == 'beam' else 'greedy',
                                 beam_size=beam_size, beam_alpha=beam_alpha,
                                 decode_length_ratio=decode_length_ratio)
    rewards = scorer.score_ids(src_ids, ids) if scorer else None
    for k, i in enumerate(keep):
      out[i]['translation'] = detok(ids[k])
      if rewards is not None:
        out[i]['reward'] = float(rewards[k])
    return out
  cands, logprobs = _candidates(model, params, enc, method=method, num_decodes=num_decodes,
                                beam_alpha=beam_alpha, temperature=temperature, topk=topk,
                                seed=seed, max_decode_len=max_decode_len,
                                decode_length_ratio=decode_length_ratio, batch_size=batch_size,
                                mesh=mesh)
  flat = [c for cs in cands for c in cs]
  rewards = scorer.score_ids([s for s, cs in zip(src_ids, cands) for _ in cs], flat)
  rewards = np.asarray(rewards, np.float32).reshape(len(keep), num_decodes)
  for k, i in enumerate(keep):
    best = int(np.argmax(rewards[k]))  # First maximum: the earliest drawn / best beam on ties.
    out[i].update(translation=detok(cands[k][best]), reward=float(rewards[k, best]),
                  candidates=[{'translation': detok(c), 'reward': float(r), 'logprob': float(lp)}
                              for c, r, lp in zip(cands[k], rewards[k], logprobs[k])])
  return out


def read_lines(stream: TextIO) -> list[str]:
  """Lines of a UTF-8 text stream without their newlines."""
  return [line.rstrip('\r\n') for line in stream]


def run(input_path: str | None, output_path: str | None, jsonl: bool = False, **kwargs) -> None:
  """Reads `input_path` (None: stdin), translates (`translate_lines`, gin-configured), writes
  `output_path` atomically (None: stdout)."""
  if input_path:
    with fileio.open_file(input_path, 'rb') as f:
      lines = read_lines(f.read().decode('utf-8').splitlines(keepends=True))
  else:
    lines = read_lines(sys.stdin)
  rows = translate_lines(lines, **kwargs)
  text = ''.join((json.dumps(r, ensure_ascii=False) if jsonl else r['translation']) + '\n'
                 for r in rows)
  if output_path:
    fileio.write_text(output_path, text)
    logging.info('translate: %d lines -> %s', len(rows), output_path)
  else:
    sys.stdout.write(text)
    sys.stdout.flush()
