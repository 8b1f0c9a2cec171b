"""Translation evaluation: batched jitted decoding and sacreBLEU / chrF with their signatures.

Pure JAX + sacrebleu; the detokenizer (ids -> text) is passed in, so no TensorFlow is needed.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import sacrebleu

from rest_jax import data as data_lib
from rest_jax import distributed, inference

LENGTH_BUCKETS = inference.LENGTH_BUCKETS


def corpus_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
  """Corpus sacreBLEU and chrF (0-100) with sacreBLEU's signature strings.

  Also BLEU's length statistics (Papineni et al. 2002, sec. 2.2.2): 'bleu_bp' (brevity penalty,
  1.0 when the hypotheses are at least as long as the references) and 'length_ratio'
  (hypothesis / reference length in sacreBLEU's 13a tokens).

  Raises:
    ValueError: different numbers of hypotheses and references, or none.
  """
  if len(hypotheses) != len(references) or not hypotheses:
    raise ValueError(f'{len(hypotheses)} hypotheses vs {len(references)} references')
  bleu = sacrebleu.metrics.BLEU()
  chrf = sacrebleu.metrics.CHRF()
  b = bleu.corpus_score(list(hypotheses), [list(references)])
  c = chrf.corpus_score(list(hypotheses), [list(references)])
  return {'bleu': b.score, 'chrf': c.score, 'bleu_bp': float(b.bp),
          'length_ratio': float(b.sys_len) / max(float(b.ref_len), 1.0),
          'bleu_signature': str(bleu.get_signature()),
          'chrf_signature': str(chrf.get_signature()), 'num_sentences': len(hypotheses)}


@functools.lru_cache(maxsize=8)
def _jitted_predict(model, method: str, max_decode_len: int, num_decodes: int, beam_alpha: float):
  def predict(params, batch):
    tokens, aux = model.predict_batch(params, batch, method=method, num_decodes=num_decodes,
                                      max_decode_len=max_decode_len, beam_alpha=beam_alpha)
    return {'tokens': tokens, 'logprobs': aux['logprobs']}
  return jax.jit(predict)


def decode_candidates(model, params, encoder_input_tokens: np.ndarray, *, method: str = 'greedy',
                      num_decodes: int = 1, batch_size: int = 64, max_decode_len: int = 128,
                      beam_alpha: float = 0.6, decode_length_ratio: float | None = 2.0,
                      mesh=None) -> dict[str, np.ndarray]:
  """Every decode of a deterministic method: 'tokens' [n, num_decodes, L] int32 (beams best
  first; EOS kept, 0 after) and 'logprobs' [n, num_decodes] float32 (nats, untempered policy).

  Sources are sorted by length and decoded in batches of `batch_size` rows (the last one
  zero-padded) trimmed to the length bucket of the batch's longest source
  (`inference.run_batched`, grouping 'sorted'), so decoding compiles once per bucket. A batch
  decodes at most `data.decode_length(bucket, max_decode_len, decode_length_ratio)` tokens.
  mesh: shard the batches over it (None: unsharded, on the default device).
  On several hosts every host decodes all sources with a host-local copy of `params`
  (`distributed.host_local`, a collective: every host calls this with the same sources).
  """
  params = distributed.host_local(params)
  def step(buckets, batch):
    predict = _jitted_predict(
        model, method, data_lib.decode_length(buckets[0], max_decode_len, decode_length_ratio),
        num_decodes, beam_alpha)
    return predict(params, batch)
  return inference.run_batched(
      step, {'encoder_input_tokens': np.asarray(encoder_input_tokens)},
      trim=('encoder_input_tokens',), buckets=LENGTH_BUCKETS, batch_size=batch_size, mesh=mesh,
      grouping='sorted')


def predict_ids(model, params, encoder_input_tokens: np.ndarray, batch_size: int = 64,
                max_decode_len: int = 128, method: str = 'greedy', beam_size: int = 4,
                beam_alpha: float = 0.6, decode_length_ratio: float | None = 2.0,
                mesh=None) -> list[list[int]]:
  """Decodes `[n, src_len]` int32 sources; returns n token-id lists (through EOS, no padding).

  `decode_candidates` (batching, buckets, decode lengths), keeping the only decode of 'greedy'
  or the best of `beam_size` beams (length penalty `beam_alpha`) of 'beam'.
  """
  if not len(encoder_input_tokens):
    return []
  out = decode_candidates(model, params, encoder_input_tokens, method=method,
                          num_decodes=1 if method == 'greedy' else beam_size,
                          batch_size=batch_size, max_decode_len=max_decode_len,
                          beam_alpha=beam_alpha, decode_length_ratio=decode_length_ratio,
                          mesh=mesh)
  return [data_lib.trim(t) for t in out['tokens'][:, 0]]


def translate(model, params, encoder_input_tokens: np.ndarray, detokenize: Callable,
              **kwargs) -> list[str]:
  """Translates `[n, src_len]` int32 sources; returns n strings (`predict_ids` + `detokenize`)."""
  return [detokenize(ids) for ids in predict_ids(model, params, encoder_input_tokens, **kwargs)]


def evaluate_translation(model, params, task_data, detokenize: Callable, **kwargs
                         ) -> tuple[dict[str, Any], list[str]]:
  """Decodes `task_data` (an `input_pipeline.TaskData`) and scores it against its references.

  Returns:
    (metrics with 'bleu', 'chrf', their signatures and 'decode_seconds', hypotheses).
  """
  start = time.perf_counter()
  hyps = translate(model, params, task_data.arrays['encoder_input_tokens'], detokenize, **kwargs)
  metrics = corpus_metrics(hyps, task_data.targets)
  metrics['decode_seconds'] = time.perf_counter() - start
  return metrics, hyps


def format_metrics(metrics: Mapping[str, Any]) -> str:
  return (f"BLEU {metrics['bleu']:.2f} chrF {metrics['chrf']:.2f} "
          f"({metrics['num_sentences']} sentences; {metrics['bleu_signature']})")
