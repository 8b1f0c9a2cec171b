"""One decoding step's draw: temperature / top-k / top-p sampling from logits.

``sample_logits`` is the per-step draw of ``decoding.temperature_sample`` and
``decoding.greedy_decode`` (and through them of Grow, the E-step, evaluation and the
online-RL rollouts; beam search does not sample). It is pure and
batched over rows (``[rows, vocab]``), takes one uniform per row (all its randomness,
so a row's draw does not depend on the other rows), and is built for CPU speed: an
inverse-CDF draw instead of Gumbel-max, a two-level CDF and argmax over large
vocabularies, and a sort-free nucleus (our choices; the distributions are the standard
ones, exactly).

Only jax and numpy are imported.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PAD_ID = 0  # The decoder start token and the padding after EOS: never sampled.
NEG_INF = -1.0e7  # finite "minus infinity" (as in t5x): masks PAD here, dead beams in beam search
# Static temperatures at or below this are treated as greedy (argmax).
MIN_TEMPERATURE = 1e-4


def _argmax_flat(x: jnp.ndarray) -> jnp.ndarray:
  iota = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  m = jnp.max(x, axis=-1, keepdims=True)
  return jnp.min(jnp.where(x == m, iota, x.shape[-1] - 1), axis=-1)


def _argmax(x: jnp.ndarray) -> jnp.ndarray:
  """argmax over the last axis of [rows, n] (first maximal index), int32.

  Two-level (block maxima, then inside the winning block) with plain max/min
  reductions: several times faster on CPU than the variadic (value, index)
  reduction behind ``jnp.argmax``.
  """
  rows, n = x.shape
  if n <= 1024:
    return _argmax_flat(x)
  b = _block_size(n)
  nb = -(-n // b)
  if nb * b != n:
    x = jnp.pad(x, ((0, 0), (0, nb * b - n)), constant_values=-jnp.inf)
  blocks = x.reshape(rows, nb, b)
  bi = _argmax_flat(jnp.max(blocks, axis=-1))
  within = jnp.take_along_axis(blocks, bi[:, None, None], axis=1)[:, 0]
  return bi * b + _argmax_flat(within)


def _last_positive(w: jnp.ndarray) -> jnp.ndarray:
  """Index of the last entry > 0 along the last axis, [..] int32 (0 if none)."""
  iota = lax.broadcasted_iota(jnp.int32, w.shape, w.ndim - 1)
  return jnp.max(jnp.where(w > 0, iota, 0), axis=-1)


def _block_size(n: int) -> int:
  """Block size for the two-level inverse CDF: a divisor of n near sqrt(n)
  if there is one (no padding), else ceil(sqrt(n))."""
  r = math.sqrt(n)
  divisors = [d for d in range(max(1, int(r / 2)), int(2 * r) + 1) if n % d == 0]
  return min(divisors, key=lambda d: abs(d - r)) if divisors else int(math.ceil(r))


def _inverse_cdf_draw(w: jnp.ndarray, u: jnp.ndarray):
  """Draws one index per row with probability proportional to ``w``.

  Args:
    w: [rows, n] f32 non-negative weights (e.g. exp(scaled - max)); each row
      needs a positive entry. Zero-weight entries are never drawn.
    u: [rows] f32 uniforms in (0, 1].

  Returns:
    (idx [rows] int32, total [rows] f32 = sum of w over the row).

  One uniform per row, compared against the cumulative weights: the drawn
  index is the first j with cdf[j] >= u * total. For large n the CDF is
  two-level (block sums, then a cumsum inside the one selected block), since a
  full-width cumsum is slow on CPU; either way it is far cheaper than the n
  uniforms + logs of Gumbel-max (``jax.random.categorical``).
  """
  rows, n = w.shape
  if n <= 1024:
    cdf = jnp.cumsum(w, axis=-1)
    total = cdf[:, -1]
    idx = jnp.sum(cdf < (u * total)[:, None], axis=-1, dtype=jnp.int32)
    return jnp.minimum(idx, _last_positive(w)), total
  b = _block_size(n)
  nb = -(-n // b)
  if nb * b != n:
    w = jnp.pad(w, ((0, 0), (0, nb * b - n)))
  blocks = w.reshape(rows, nb, b)
  bsum = jnp.sum(blocks, axis=-1)  # [rows, nb]
  bcdf = jnp.cumsum(bsum, axis=-1)
  total = bcdf[:, -1]
  thresh = u * total
  bi = jnp.minimum(jnp.sum(bcdf < thresh[:, None], axis=-1, dtype=jnp.int32), nb - 1)
  before = jnp.take_along_axis(bcdf, jnp.maximum(bi - 1, 0)[:, None], axis=-1)[:, 0]
  before = jnp.where(bi > 0, before, 0.0)
  within = jnp.take_along_axis(blocks, bi[:, None, None], axis=1)[:, 0]  # [rows, b]
  wcdf = before[:, None] + jnp.cumsum(within, axis=-1)
  wi = jnp.sum(wcdf < thresh[:, None], axis=-1, dtype=jnp.int32)
  # Rounding between the two levels must not push us onto a zero weight.
  return bi * b + jnp.minimum(wi, _last_positive(within)), total


def _nucleus_threshold(w: jnp.ndarray, topp: float) -> jnp.ndarray:
  """Per-row tau such that {w >= tau} is the nucleus of mass >= topp.

  w: [rows, n] f32 non-negative, row max 1. Returns tau [rows] f32: the
  largest value among the w such that sum(w[w >= tau]) >= topp * sum(w), i.e.
  the smallest top set with mass >= topp (Holtzman et al. 2020); entries tied
  with the boundary value are all kept. Exact bisection over the float32 bit
  patterns (order-preserving for non-negative floats) instead of a full-vocab
  sort, which is ~30x slower than one pass on CPU. tau lies in
  [(1 - topp) * total / n, 1] (below that, the excluded mass would be less
  than 1 - topp), which bounds the search to ~27 passes.
  """
  n = w.shape[-1]
  total = jnp.sum(w, axis=-1)
  target = topp * total
  to_bits = lambda x: lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  lo = to_bits((1.0 - topp) * total / n * (1 - 1e-6))  # mass(w >= lo) >= target
  hi = jnp.full_like(lo, to_bits(jnp.float32(1.0)) + 1)  # mass(w >= hi) == 0
  iters = int(math.ceil(math.log2(max(2.0, 2.0**23 * (math.log2(n / (1 - topp)) + 2)))))

  def body(_, c):
    lo, hi = c
    mid = lo + (hi - lo) // 2
    tau = lax.bitcast_convert_type(mid, jnp.float32)
    ok = jnp.sum(jnp.where(w >= tau[:, None], w, 0.0), axis=-1) >= target
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = lax.fori_loop(0, iters, body, (lo, hi))
  return lax.bitcast_convert_type(lo, jnp.float32)


def sample_logits(logits: jnp.ndarray, u: jnp.ndarray, *, temperature=1.0,
                  topk: int = 0, topp: float = 0.0):
  """Samples one token per row.

  Args:
    logits: [rows, vocab] float, untempered policy logits.
    u: [rows] f32 uniforms in [0, 1) (one per row; that is all the randomness).
    temperature: Python float (static branch; <= MIN_TEMPERATURE means argmax)
      or a jnp scalar (traced; greedy selected with ``jnp.where``).
    topk: static int; if 0 < topk < vocab keep only the topk largest logits
      (``lax.top_k``, sample among the k, map back).
    topp: static float; if 0 < topp < 1 keep the smallest set of
      highest-probability tokens (under the tempered, top-k-filtered
      distribution) whose mass is >= topp; the top token is always kept
      (nucleus sampling, Holtzman et al. 2020). With topk the k sorted values
      are used; without, a sort-free bisection (``_nucleus_threshold``).

  Returns:
    tokens [rows] int32, never PAD (0); logp [rows] f32 log-prob of the token under
    the sampling distribution (PAD removed, tempered, filtered, renormalised; 0 for
    greedy);
    logp_policy [rows] f32 = log_softmax(logits)[token]. All in nats.
  """
  policy_logits = logits.astype(jnp.float32)
  # PAD (0) is the start token and the padding after EOS: never emitted. It is removed from the
  # distribution that is sampled from; `logp_policy` stays the policy's own log-prob.
  logits = policy_logits.at[:, PAD_ID].set(NEG_INF)
  vocab = logits.shape[-1]
  u = 1.0 - u  # (0, 1]: never selects a leading zero-probability entry.

  static_t = isinstance(temperature, (int, float, np.floating, np.integer))
  if static_t and float(temperature) <= MIN_TEMPERATURE:
    tok = _argmax(logits)
    logp = jnp.zeros(tok.shape, jnp.float32)
  else:
    if static_t:
      inv_t = 1.0 / float(temperature)
    else:
      t = jnp.asarray(temperature, jnp.float32)
      inv_t = 1.0 / jnp.maximum(t, MIN_TEMPERATURE)
    use_k = 0 < topk < vocab
    use_p = 0.0 < topp < 1.0
    ids = None
    if use_k:
      vals, ids = lax.top_k(logits, topk)  # sorted descending, [rows, k]
    else:
      vals = logits
    # Tempered weights w = exp(logits / T - max) computed as exp((x - max) / T)
    # so the scaled logits are never materialised.
    m0 = jnp.max(vals, axis=-1, keepdims=True)
    w = jnp.exp((vals - m0) * inv_t)  # [rows, n], max 1
    if use_p and use_k:  # sorted: exclusive cumsum < topp keeps the nucleus
      mass_before = jnp.cumsum(w, axis=-1) - w
      w = jnp.where(mass_before < topp * jnp.sum(w, -1, keepdims=True), w, 0.0)
    elif use_p:
      w = jnp.where(w >= _nucleus_threshold(w, topp)[:, None], w, 0.0)
    j, total = _inverse_cdf_draw(w, u)
    chosen = jnp.take_along_axis(vals, j[:, None], axis=-1)[:, 0]
    logp = (chosen - m0[:, 0]) * inv_t - jnp.log(total)
    if use_k:
      tok = jnp.take_along_axis(ids, j[:, None], axis=-1)[:, 0].astype(jnp.int32)
    else:
      tok = j
    if not static_t:
      greedy = t <= MIN_TEMPERATURE
      tok = jnp.where(greedy, _argmax(logits), tok)
      logp = jnp.where(greedy, 0.0, logp)
  lse = jax.nn.logsumexp(policy_logits, axis=-1)
  logp_policy = jnp.take_along_axis(policy_logits, tok[:, None], axis=-1)[:, 0] - lse
  return tok, logp, logp_policy
