"""Pre-LayerNorm encoder-decoder Transformer in flax.linen (Vaswani et al. 2017).

Architecture (choices stated explicitly):
  * Pre-LayerNorm residual blocks (x + Dropout(Sublayer(LN(x)))), a final LayerNorm
    after the last encoder layer and after the last decoder layer.
  * One token embedding ``E`` [vocab, emb_dim] shared by the encoder input, the
    decoder input and the output projection. Following t5x, ``E ~ N(0, 1)``, the
    input embedding is NOT scaled, and the output logits are
    ``logits = x @ E.T / sqrt(emb_dim)``.
  * Fixed sinusoidal absolute positions (Vaswani et al. 2017, Sec. 3.5), laid out as
    ``[sin(pos * w_0..w_{d/2-1}), cos(pos * w_0..w_{d/2-1})]``,
    ``w_i = 10000^(-2i/d)``, added to the token embedding.
  * Multi-head dot-product attention with q/k/v kernels [embed, heads, kv] and output
    kernel [heads, kv, embed], all with biases; queries scaled by 1/sqrt(head_dim);
    softmax in float32.
  * Position-wise MLP ``wo(act(wi x))`` with ReLU by default (``config.activation``,
    'relu' as in Vaswani et al. or 'gelu').
  * Dropout (``config.dropout_rate``) on embeddings + positions and on every
    sub-layer output; optional attention-probability dropout.
  * Computation in ``config.dtype`` (e.g. bfloat16), params in ``config.param_dtype``;
    LayerNorm statistics and softmax in float32; logits returned in float32.

Padding: token id 0 (PAD) in ``encoder_input_tokens`` is masked out as an attention
key (encoder self-attention and decoder cross-attention). Decoder self-attention is
causal only: with right padding, real positions never see later (padded) positions.

Incremental decoding (``decode=True``), t5x style, in the flax ``'cache'`` collection:
  cache = {'decoder': {
      'cache_index':  [] int32  next position to write (== position of the token fed in
                      this call; used for the sinusoidal position too), shared by all rows,
      'shared_encoder_mask': [sources, src_len] bool, source tokens != PAD,
      'layers_i': {
          'self_attention':          {'cached_key', 'cached_value'}:
                                     [rows, heads, cache_len, kv] (dtype); cache_len is the
                                     max_decode_len of the cache-creating call, and
                                     ``EncoderDecoderModel.extend_decode_cache`` lengthens it
                                     (decoding may start short: ``decoding.cache_windows``),
          'encoder_decoder_attention': {'shared_key', 'shared_value'}:
                                     [sources, heads, src_len, kv] (dtype),
      }}}
This is ``decoding.py``'s cache contract: a decoding library expands (and, for beam
search, gathers) the per-row leaves along axis 0 to ``rows = sources * N`` (row
``s * N + j`` is sample or beam ``j`` of source ``s``), leaves the 0-d ``cache_index``
alone, and never copies the 'shared_' leaves: the N rows of a source read one copy of its
cross-attention keys / values, their N queries stacked into one [N, kv] x [kv, src_len]
GEMM per (source, head) instead of N matrix-vector products over N tiled copies (N is
``rows // sources``, read from the shapes; a cache whose 'shared_' leaves were tiled to
``rows`` too, N = 1, gives the same result). All rows decode in lockstep, so one index
serves them all and each step writes its keys/values with one in-place
``dynamic_update_slice`` (a per-row index would rewrite the whole [batch,
max_decode_len] buffer with a select at every step). The cross-attention keys/values of the encoded source are
projected ONCE, when the cache is initialised (the first ``decode=True`` call, made
with ``mutable=['cache']`` and no cache present), and only read afterwards.
See ``EncoderDecoderModel.init_decode_cache`` for the intended usage.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

Array = jax.Array
Dtype = Any

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2

_NEG_INF = -1e10  # Masked attention logit (t5x convention), applied in float32.


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of the encoder-decoder Transformer.

  Attributes:
    vocab_size: Size of the shared source/target vocabulary.
    emb_dim: Model width d_model.
    num_heads: Number of attention heads.
    head_dim: Per-head width of queries/keys/values ('kv' axis).
    mlp_dim: Hidden width of the position-wise MLP.
    num_encoder_layers / num_decoder_layers: Depths.
    dropout_rate: Dropout on embeddings and sub-layer outputs (training only).
    attention_dropout_rate: Dropout on attention probabilities.
    dtype: Activation / compute dtype (jnp.float32 or jnp.bfloat16).
    param_dtype: Parameter storage dtype.
    max_len: Length of the sinusoidal position table (max source/target length).
    activation: 'relu' (Vaswani et al. 2017) or 'gelu'.
  """
  vocab_size: int = 8000
  emb_dim: int = 256
  num_heads: int = 4
  head_dim: int = 64
  mlp_dim: int = 1024
  num_encoder_layers: int = 3
  num_decoder_layers: int = 3
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  max_len: int = 512
  activation: str = 'relu'


# ------------------------------------------------------------------------------
# Initialisers (all carry logical axis names for partitioning).
# ------------------------------------------------------------------------------

def _init(init_fn: Callable, names: tuple[str, ...]) -> Callable:
  return nn.with_logical_partitioning(init_fn, names)


_embed_init = nn.initializers.normal(stddev=1.0)
_qkv_init = nn.initializers.variance_scaling(
    1.0, 'fan_in', 'truncated_normal', in_axis=0, out_axis=(1, 2))
_out_init = nn.initializers.variance_scaling(
    1.0, 'fan_in', 'truncated_normal', in_axis=(0, 1), out_axis=2)
_dense_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')
_zeros = nn.initializers.zeros_init()
_ones = nn.initializers.ones_init()


def sinusoidal_table(max_len: int, dim: int) -> np.ndarray:
  """Sinusoidal position table [max_len, dim] float32 (Vaswani et al. 2017, 3.5).

  Row ``p`` is ``[sin(p * w), cos(p * w)]`` with ``w_i = 10000^(-2i / dim)``,
  i = 0..dim/2-1 (an odd ``dim`` gets a trailing zero column).
  """
  half = dim // 2
  pos = np.arange(max_len, dtype=np.float64)[:, None]
  freq = np.exp(-math.log(10000.0) * (2.0 * np.arange(half) / dim))[None, :]
  table = np.zeros((max_len, dim), dtype=np.float32)
  table[:, :half] = np.sin(pos * freq)
  table[:, half:2 * half] = np.cos(pos * freq)
  return table


def _activation(name: str) -> Callable[[Array], Array]:
  if name == 'relu':
    return nn.relu
  if name == 'gelu':
    return nn.gelu
  raise ValueError(f'Unknown activation {name!r}')


# ------------------------------------------------------------------------------
# Modules.
# ------------------------------------------------------------------------------

class Embed(nn.Module):
  """Shared token embedding; ``attend`` gives the tied output projection."""
  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.embedding = self.param(
        'embedding', _init(_embed_init, ('vocab', 'embed')),
        (cfg.vocab_size, cfg.emb_dim), cfg.param_dtype)

  def __call__(self, tokens: Array) -> Array:
    """tokens [batch, length] int32 -> [batch, length, emb_dim] (config.dtype)."""
    x = jnp.take(self.embedding, tokens, axis=0).astype(self.config.dtype)
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed'))

  def attend(self, x: Array) -> Array:
    """x [batch, length, emb_dim] -> logits [batch, length, vocab] float32.

    logits = x @ E.T / sqrt(emb_dim) (t5x convention for a shared embedding).
    """
    cfg = self.config
    logits = _dense(x.astype(cfg.dtype), self.embedding.astype(cfg.dtype).T)
    logits = logits.astype(jnp.float32) * (1.0 / math.sqrt(cfg.emb_dim))
    return nn.with_logical_constraint(logits, ('batch', 'length', 'vocab'))


def _dense(x: Array, kernel: Array, in_dims: int = 1) -> Array:
  """x [..., *in] @ kernel [*in, *out] -> [..., *out], as one 2-D matmul.

  Flattening to [rows, in] @ [in, out] lets XLA's CPU backend use its plain GEMM; a batched
  `einsum` over [batch, length, ...] ran ~25% slower on the output projection (measured with
  benchmarks/train_throughput.py).
  """
  lead, inner = x.shape[:x.ndim - in_dims], x.shape[x.ndim - in_dims:]
  out = kernel.shape[in_dims:]
  y = x.reshape(-1, math.prod(inner)) @ kernel.reshape(math.prod(inner), -1)
  return y.reshape(lead + out)


def _check_length(what: str, length: int, max_len: int) -> None:
  if length > max_len:
    raise ValueError(f'{what} length {length} exceeds config.max_len={max_len} '
                     '(size of the sinusoidal position table).')


def add_positions(x: Array, positions: Array, max_len: int) -> Array:
  """Adds sinusoidal positions. x [b, l, d]; positions [l] or [b, l] int32."""
  table = jnp.asarray(sinusoidal_table(max_len, x.shape[-1]))
  pe = jnp.take(table, positions, axis=0).astype(x.dtype)
  if pe.ndim == 2:
    pe = pe[None]
  return x + pe


def LayerNorm(config: TransformerConfig, name: str) -> nn.LayerNorm:
  """LayerNorm (statistics in float32) with ('embed',) scale and bias, eps 1e-6."""
  return nn.LayerNorm(
      epsilon=1e-6, dtype=config.dtype, param_dtype=config.param_dtype,
      scale_init=_init(_ones, ('embed',)), bias_init=_init(_zeros, ('embed',)),
      name=name)


class Dropout(nn.Module):
  """Inverted dropout (Srivastava et al. 2014) with a mask of 16-bit uniforms.

  Our choice, for speed: flax's `nn.Dropout` draws one threefry hash (a uint32) per element;
  here each uint32 of `jax.random.bits` gives two 16-bit uniforms u (its low and high halves,
  for positions j and j + ceil(d / 2) of the last axis), an element is kept iff
  u < t = round((1 - rate) * 2**16), and kept elements are scaled by 2**16 / t, so the mask
  costs half the hashes and E[output] = input exactly; the keep probability is t / 2**16,
  within 2**-17 of 1 - rate. The mask's key is `make_rng('dropout')`, as in flax, so a step is
  a pure function of its RNG.
  """
  rate: float
  deterministic: Optional[bool] = None

  @nn.compact
  def __call__(self, x: Array, deterministic: Optional[bool] = None) -> Array:
    """x [..., d] -> x with elements zeroed at `rate`, the others scaled (x.dtype)."""
    deterministic = nn.merge_param('deterministic', self.deterministic, deterministic)
    if self.rate == 0.0 or deterministic:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    threshold = min(max(round((1.0 - self.rate) * 65536), 1), 65535)
    *lead, last = x.shape
    bits = jax.random.bits(self.make_rng('dropout'), (*lead, -(-last // 2)), jnp.uint32)
    u16 = jnp.concatenate([bits & 0xFFFF, bits >> 16], axis=-1)[..., :last]
    keep = u16 < jnp.uint32(threshold)
    return lax.select(keep, x * jnp.asarray(65536.0 / threshold, x.dtype), jnp.zeros_like(x))


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array,
                          dropout_fn: Optional[Callable[[Array], Array]] = None,
                          heads_major: bool = False) -> Array:
  """Scaled dot-product attention (Vaswani et al. 2017, eq. 1).

  Args:
    q: [batch, q_len, heads, kv] queries, already scaled by 1/sqrt(kv).
    k, v: [batch, kv_len, heads, kv], or [groups, heads, kv_len, kv] with `heads_major` (the
      layout of the decoding cache: both einsums are then plain batched GEMMs over
      (groups, heads) with no transpose of the cache; with the cache in [batch, kv_len, ...]
      XLA's CPU backend re-laid it out at every step, ~70% of a `tiny` decode step).
      `groups` is `batch` (self-attention) or, with `q_len` 1, a divisor of it: query rows
      g * N .. g * N + N - 1 all attend to keys g (the samples of one source reading its
      shared cross-attention cache, N = batch // groups).
    mask: bool, broadcastable to [batch, heads, q_len, kv_len] ([groups, heads, N, kv_len]
      when keys are shared); True = attend.
    dropout_fn: optional dropout applied to the attention probabilities.
    heads_major: the layout of k and v, see above.
  Returns:
    [batch, q_len, heads, kv] in q.dtype.
  """
  if heads_major:
    batch, q_len, heads, kv = q.shape
    groups = k.shape[0]
    if groups != batch and (q_len != 1 or batch % groups):
      raise ValueError(f'{batch} query rows of length {q_len} cannot share keys of {groups} rows')
    # [groups, heads, N * q_len, kv]: N == 1 unless the keys are shared.
    qg = jnp.swapaxes(q.reshape(groups, batch // groups * q_len, heads, kv), 1, 2)
    logits = jnp.einsum('bhqd,bhkd->bhqk', qg, k)
  else:
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k)
  logits = jnp.where(mask, logits.astype(jnp.float32), _NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  if dropout_fn is not None:
    probs = dropout_fn(probs)
  if heads_major:
    out = jnp.swapaxes(jnp.einsum('bhqk,bhkd->bhqd', probs, v), 1, 2)
    return out.reshape(q.shape)
  return jnp.einsum('bhqk,bkhd->bqhd', probs, v)


class MultiHeadAttention(nn.Module):
  """Multi-head attention, self (causal or not) or encoder-decoder, with KV cache.

  Params: query/key/value kernels [embed, heads, kv] + biases [heads, kv];
  out kernel [heads, kv, embed] + bias [embed].
  """
  config: TransformerConfig
  is_cross: bool = False
  causal: bool = False

  def _proj(self, names: tuple[str, ...], x: Array) -> tuple[Array, ...]:
    """The projections `names` of x [batch, len, embed] -> each [batch, len, heads, kv].

    One GEMM for all of them (kernels concatenated along heads: [embed, n * heads, kv]): on
    XLA's CPU backend one [rows, embed] x [embed, 3 * heads * kv] product beats three
    [embed, heads * kv] ones (benchmarks/README.md). Params stay one kernel and bias per name.
    """
    cfg = self.config
    kernels, biases = [], []
    for name in names:
      kernels.append(self.param(f'{name}_kernel', _init(_qkv_init, ('embed', 'heads', 'kv')),
                                (cfg.emb_dim, cfg.num_heads, cfg.head_dim), cfg.param_dtype))
      biases.append(self.param(f'{name}_bias', _init(_zeros, ('heads', 'kv')),
                               (cfg.num_heads, cfg.head_dim), cfg.param_dtype))
    if len(names) == 1:
      kernel, bias = kernels[0], biases[0]
    else:
      kernel, bias = jnp.concatenate(kernels, axis=1), jnp.concatenate(biases, axis=0)
    y = _dense(x, kernel.astype(cfg.dtype)) + bias.astype(cfg.dtype)
    out = jnp.split(y, len(names), axis=2) if len(names) > 1 else [y]
    return tuple(nn.with_logical_constraint(o, ('batch', 'length', 'heads', 'kv')) for o in out)

  @nn.compact
  def __call__(self, x: Array, kv_inputs: Optional[Array], mask: Optional[Array], *,
               deterministic: bool = True, decode: bool = False,
               decode_index: Optional[Array] = None,
               max_decode_length: Optional[int] = None) -> Array:
    """Attention.

    Args:
      x: queries' inputs [batch, q_len, emb_dim] (config.dtype).
      kv_inputs: cross-attention only: encoded source [batch, src_len, emb_dim];
        may be None in decode mode once the cache holds the projected keys/values.
      mask: bool mask broadcastable to [batch, heads, q_len, kv_len] (True = attend).
        For causal self-attention it may be None (built here).
      deterministic: disables attention dropout.
      decode: incremental decoding with the 'cache' collection.
      decode_index: [] int32, position of the current token, shared by all rows (decode
        mode); below the cache's length (a write past it would be clamped by
        `dynamic_update_slice`: the samplers stop at the length, `decoding.sample_steps`).
      max_decode_length: self-attention cache length when the cache is created
        (default q_len).
    Returns:
      [batch, q_len, emb_dim] in config.dtype.
    """
    cfg = self.config
    scale = jnp.asarray(1.0 / math.sqrt(cfg.head_dim), cfg.dtype)
    if self.is_cross:
      q, = self._proj(('query',), x)
    else:
      q, k, v = self._proj(('query', 'key', 'value'), x)
    q = q * scale
    batch, q_len = x.shape[0], x.shape[1]
    cache_shape_dtype = None
    heads_major = False  # True when k, v come from the cache ([batch, heads, len, kv]).
    to_heads_major = lambda a: jnp.swapaxes(a, 1, 2)

    if self.is_cross:
      if decode:
        # Per source, read by its N rows (module docstring): never expanded or gathered.
        initialized = self.has_variable('cache', 'shared_key')
        if initialized:
          k = self.variable('cache', 'shared_key', None).value
          v = self.variable('cache', 'shared_value', None).value
          heads_major = True
        else:
          k, v = self._proj(('key', 'value'), kv_inputs)
          self.variable('cache', 'shared_key', lambda: to_heads_major(k))
          self.variable('cache', 'shared_value', lambda: to_heads_major(v))
      else:
        k, v = self._proj(('key', 'value'), kv_inputs)
    else:
      if decode:
        initialized = self.has_variable('cache', 'cached_key')
        length = max_decode_length or q_len
        cache_shape_dtype = ((batch, cfg.num_heads, length, cfg.head_dim), cfg.dtype)
        cached_key = self.variable('cache', 'cached_key', jnp.zeros, *cache_shape_dtype)
        cached_value = self.variable('cache', 'cached_value', jnp.zeros,
                                     *cache_shape_dtype)
        if initialized:
          if q_len != 1:
            raise ValueError(f'decode=True expects one token per call, got {q_len}.')
          length = cached_key.value.shape[2]
          at = (0, 0, decode_index, 0)
          k = lax.dynamic_update_slice(cached_key.value, to_heads_major(k.astype(cfg.dtype)), at)
          v = lax.dynamic_update_slice(cached_value.value, to_heads_major(v.astype(cfg.dtype)),
                                       at)
          cached_key.value = k
          cached_value.value = v
          heads_major = True
          # Attend to positions <= current index: [1, 1, 1, L].
          mask = (jnp.arange(length, dtype=jnp.int32) <= decode_index)[None, None, None, :]
      if mask is None and self.causal:
        kv_len = k.shape[2] if heads_major else k.shape[1]
        mask = (jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None])[None, None]
      if mask is None:
        mask = jnp.ones((1, 1, 1, 1), bool)

    dropout_fn = None
    if cfg.attention_dropout_rate > 0.0 and not deterministic:
      dropout_fn = Dropout(rate=cfg.attention_dropout_rate, deterministic=False)
    out = dot_product_attention(q, k, v, mask, dropout_fn, heads_major)  # [b, q, h, kv]

    out_kernel = self.param('out_kernel', _init(_out_init, ('heads', 'kv', 'embed')),
                            (cfg.num_heads, cfg.head_dim, cfg.emb_dim), cfg.param_dtype)
    out_bias = self.param('out_bias', _init(_zeros, ('embed',)), (cfg.emb_dim,),
                          cfg.param_dtype)
    y = _dense(out, out_kernel.astype(cfg.dtype), in_dims=2)
    y = y + out_bias.astype(cfg.dtype)
    return nn.with_logical_constraint(y, ('batch', 'length', 'embed'))


class MlpBlock(nn.Module):
  """Position-wise MLP: wo(act(wi x + bi)) + bo; wi [embed, mlp], wo [mlp, embed]."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    wi = self.param('wi_kernel', _init(_dense_init, ('embed', 'mlp')),
                    (cfg.emb_dim, cfg.mlp_dim), cfg.param_dtype)
    bi = self.param('wi_bias', _init(_zeros, ('mlp',)), (cfg.mlp_dim,), cfg.param_dtype)
    wo = self.param('wo_kernel', _init(_dense_init, ('mlp', 'embed')),
                    (cfg.mlp_dim, cfg.emb_dim), cfg.param_dtype)
    bo = self.param('wo_bias', _init(_zeros, ('embed',)), (cfg.emb_dim,),
                    cfg.param_dtype)
    h = _dense(x, wi.astype(cfg.dtype)) + bi.astype(cfg.dtype)
    h = _activation(cfg.activation)(h)
    h = nn.with_logical_constraint(h, ('batch', 'length', 'mlp'))
    y = _dense(h, wo.astype(cfg.dtype)) + bo.astype(cfg.dtype)
    return nn.with_logical_constraint(y, ('batch', 'length', 'embed'))


class EncoderLayer(nn.Module):
  """Pre-LN encoder layer: x += Drop(SelfAttn(LN(x))); x += Drop(MLP(LN(x)))."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
    cfg = self.config
    h = LayerNorm(cfg, name='pre_attention_layer_norm')(x)
    h = MultiHeadAttention(cfg, name='attention')(h, None, mask,
                                                  deterministic=deterministic)
    x = x + Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    h = LayerNorm(cfg, name='pre_mlp_layer_norm')(x)
    h = MlpBlock(cfg, name='mlp')(h)
    x = x + Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed'))


class DecoderLayer(nn.Module):
  """Pre-LN decoder layer: causal self-attn, encoder-decoder attn, MLP."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, encoded: Optional[Array], encoder_mask: Array,
               deterministic: bool, decode: bool, decode_index: Optional[Array],
               max_decode_length: Optional[int]) -> Array:
    cfg = self.config
    h = LayerNorm(cfg, name='pre_self_attention_layer_norm')(x)
    h = MultiHeadAttention(cfg, causal=True, name='self_attention')(
        h, None, None, deterministic=deterministic, decode=decode,
        decode_index=decode_index, max_decode_length=max_decode_length)
    x = x + Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    h = LayerNorm(cfg, name='pre_cross_attention_layer_norm')(x)
    h = MultiHeadAttention(cfg, is_cross=True, name='encoder_decoder_attention')(
        h, encoded, encoder_mask, deterministic=deterministic, decode=decode)
    x = x + Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    h = LayerNorm(cfg, name='pre_mlp_layer_norm')(x)
    h = MlpBlock(cfg, name='mlp')(h)
    x = x + Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed'))


class Encoder(nn.Module):
  config: TransformerConfig
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoder_input_tokens: Array, enable_dropout: bool = False) -> Array:
    cfg = self.config
    deterministic = not enable_dropout
    src_len = encoder_input_tokens.shape[1]
    _check_length('source', src_len, cfg.max_len)
    x = self.shared_embedding(encoder_input_tokens)
    x = add_positions(x, jnp.arange(src_len), cfg.max_len)
    x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    # Keys that are PAD are masked out: [b, 1, 1, src_len].
    mask = (encoder_input_tokens != PAD_ID)[:, None, None, :]
    for i in range(cfg.num_encoder_layers):
      x = EncoderLayer(cfg, name=f'layers_{i}')(x, mask, deterministic)
    x = LayerNorm(cfg, name='encoder_norm')(x)
    x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed'))


class Decoder(nn.Module):
  config: TransformerConfig
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoded: Optional[Array], encoder_input_tokens: Optional[Array],
               decoder_input_tokens: Array, enable_dropout: bool = False,
               decode: bool = False, max_decode_length: Optional[int] = None,
               return_hidden: bool = False) -> Array | tuple[Array, Array]:
    cfg = self.config
    deterministic = not enable_dropout
    batch, tgt_len = decoder_input_tokens.shape
    _check_length('target', tgt_len, cfg.max_len)
    if decode and max_decode_length is not None:
      _check_length('max_decode', max_decode_length, cfg.max_len)
    decode_index = None
    cache_ready = False
    if decode:
      cache_ready = self.has_variable('cache', 'cache_index')
      if cache_ready:
        index_var = self.variable('cache', 'cache_index', None)
        enc_mask_var = self.variable('cache', 'shared_encoder_mask', None)
        decode_index = index_var.value
        encoder_mask = enc_mask_var.value
        positions = decode_index[None]  # [1]
        index_var.value = decode_index + 1
      else:
        # Cache initialisation call: creates every cache variable (cross-attention
        # K/V are projected here, once). Its outputs are meant to be discarded.
        encoder_mask = encoder_input_tokens != PAD_ID
        self.variable('cache', 'cache_index', lambda: jnp.zeros((), jnp.int32))
        self.variable('cache', 'shared_encoder_mask', lambda: encoder_mask)
        positions = jnp.arange(tgt_len)
    else:
      encoder_mask = encoder_input_tokens != PAD_ID
      positions = jnp.arange(tgt_len)
    encoder_mask = encoder_mask[:, None, None, :]  # [b, 1, 1, src_len]

    x = self.shared_embedding(decoder_input_tokens)
    x = add_positions(x, positions, cfg.max_len)
    x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    for i in range(cfg.num_decoder_layers):
      x = DecoderLayer(cfg, name=f'layers_{i}')(
          x, encoded, encoder_mask, deterministic, decode, decode_index,
          max_decode_length)
    x = LayerNorm(cfg, name='decoder_norm')(x)
    x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    logits = self.shared_embedding.attend(x)
    return (logits, x) if return_hidden else logits


class Transformer(nn.Module):
  """Encoder-decoder Transformer (Vaswani et al. 2017), pre-LN, t5x-style API.

  Param tree: {'token_embedder': {'embedding'}, 'encoder': {...}, 'decoder': {...}}.
  """
  config: TransformerConfig

  def setup(self):
    self.token_embedder = Embed(self.config)
    self.encoder = Encoder(self.config, shared_embedding=self.token_embedder)
    self.decoder = Decoder(self.config, shared_embedding=self.token_embedder)

  def encode(self, encoder_input_tokens: Array, enable_dropout: bool = False) -> Array:
    """encoder_input_tokens [batch, src_len] int32 -> [batch, src_len, emb_dim]."""
    return self.encoder(encoder_input_tokens, enable_dropout=enable_dropout)

  def decode(self, encoded: Optional[Array], encoder_input_tokens: Optional[Array],
             decoder_input_tokens: Array, enable_dropout: bool = False,
             decode: bool = False, max_decode_length: Optional[int] = None,
             return_hidden: bool = False) -> Array | tuple[Array, Array]:
    """Decoder forward.

    Args:
      encoded: [batch, src_len, emb_dim] encoder output. Unused (may be None) in
        decode mode once the cache exists.
      encoder_input_tokens: [batch, src_len] int32 (PAD=0 masked). Same remark.
      decoder_input_tokens: [batch, tgt_len] int32, targets shifted right (start 0);
        [batch, 1] per call when decode=True and the cache exists.
      enable_dropout: training-mode dropout (needs a 'dropout' rng).
      decode: use/update the 'cache' collection (apply with mutable=['cache']).
        The first decode call, without a cache, creates it (self-attention K/V
        buffers of length ``max_decode_length``, projected cross-attention K/V,
        cache_index=0, encoder_mask).
      max_decode_length: self-attention cache length at cache creation.
      return_hidden: also return the decoder's final hidden states (after the final LayerNorm
        and dropout: the inputs of the output projection), e.g. for a value head.
    Returns:
      logits [batch, tgt_len, vocab] float32; with `return_hidden`, (logits, hidden states
      [batch, tgt_len, emb_dim] in `config.dtype`).
    """
    return self.decoder(encoded, encoder_input_tokens, decoder_input_tokens,
                        enable_dropout=enable_dropout, decode=decode,
                        max_decode_length=max_decode_length, return_hidden=return_hidden)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               enable_dropout: bool = False, decode: bool = False,
               return_hidden: bool = False) -> Array | tuple[Array, Array]:
    """Teacher-forced logits [batch, tgt_len, vocab] float32 = decode(encode(x)) (with
    `return_hidden`, also the decoder's final hidden states, see `decode`)."""
    encoded = self.encode(encoder_input_tokens, enable_dropout=enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       enable_dropout=enable_dropout, decode=decode,
                       return_hidden=return_hidden)
