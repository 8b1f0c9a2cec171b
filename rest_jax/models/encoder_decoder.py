"""t5x-style wrapper around the encoder-decoder Transformer: init, loss, scoring,
incremental decoding (interface modelled on t5x.models.EncoderDecoderModel).

Batches are dicts as produced by seqio's EncDecFeatureConverter (no packing):
  encoder_input_tokens  [batch, src_len] int32 (PAD = 0)
  decoder_input_tokens  [batch, tgt_len] int32 (targets shifted right, starts with 0)
  decoder_target_tokens [batch, tgt_len] int32 (ends with EOS = 1, then PAD = 0)
  decoder_loss_weights  [batch, tgt_len] float32 (1 on real target tokens, 0 on
                        padding; offline-RL losses may put arbitrary weights here)

All log-probabilities and losses are in nats. Only jax / flax / numpy / optax are
imported (no TensorFlow).

Params from ``get_initial_variables`` are boxed (``nn.LogicallyPartitioned``) with
logical axis names; ``unbox`` (== ``flax.linen.meta.unbox``) strips the boxes and
``params_logical_axes`` returns the PartitionSpec tree of logical names (==
``nn.get_partition_spec``). Every method below accepts boxed or unboxed params.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from rest_jax.models import base
from rest_jax.models.transformer import EOS_ID, PAD_ID, Transformer, _check_length

Array = jax.Array
PyTree = Any
Batch = Mapping[str, Array]


def unbox(tree: PyTree) -> PyTree:
  """Strips flax partitioning metadata boxes (``nn.meta.unbox``)."""
  return nn.meta.unbox(tree)


def params_logical_axes(tree: PyTree) -> PyTree:
  """PartitionSpec tree of logical axis names for a boxed variables/params tree."""
  return nn.get_partition_spec(tree)


def cross_entropy_with_logits(logits: Array, targets: Array,
                              label_smoothing: float = 0.0
                              ) -> tuple[Array, Array]:
  """Per-token label-smoothed cross-entropy (t5x ``cross_entropy_with_logits``).

  Soft targets: 1 - ls on the target id, ls / (V - 1) elsewhere (Szegedy et al.
  2016). The entropy of the soft targets is subtracted (as in t5x), so the minimum
  achievable loss is 0; with ls = 0 this is exactly the NLL.

  Args:
    logits: [..., vocab] float32.
    targets: [...] int32.
    label_smoothing: ls in [0, 1).
  Returns:
    (loss [...] float32, nll [...] float32) in nats; nll = -log_softmax[target].
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  if label_smoothing == 0.0:
    return nll, nll
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab - 1)
  normalizing = -(confidence * jnp.log(confidence) +
                  (vocab - 1) * low * jnp.log(low + 1e-20))
  # -sum_v q_v log p_v with q = low everywhere except confidence at the target.
  sum_logp = jnp.sum(log_probs, axis=-1)
  loss = confidence * nll - low * (sum_logp + nll) - normalizing
  return loss, nll


def shift_right(targets: Array) -> Array:
  """[b, l] targets -> decoder inputs: prepend 0 (start), drop the last token."""
  return jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]


class EncoderDecoderModel(base.PolicyModel):
  """Encoder-decoder model wrapper with t5x's interface (`base.PolicyModel`).

  Args:
    module: a ``Transformer`` flax module.
    label_smoothing: label smoothing of the training loss (0 = plain NLL).
  """

  def __init__(self, module: Transformer, label_smoothing: float = 0.0):
    self.module = module
    self.label_smoothing = float(label_smoothing)

  @property
  def config(self):
    return self.module.config

  # ---------------------------------------------------------------------------
  # Initialisation.
  # ---------------------------------------------------------------------------
  def get_initial_variables(self, rng: Array,
                            input_shapes: Mapping[str, tuple[int, ...]],
                            input_types: Optional[Mapping[str, Any]] = None
                            ) -> PyTree:
    """Initial variables {'params': ...} with ``nn.LogicallyPartitioned`` boxes.

    Args:
      rng: PRNG key.
      input_shapes: must contain 'encoder_input_tokens' and 'decoder_input_tokens'
        ([batch, len]); other keys are ignored.
      input_types: unused (tokens are int32).
    Use ``unbox(variables)`` for plain arrays, ``params_logical_axes(variables)``
    for the logical PartitionSpecs. Wrap in ``jax.eval_shape`` for shapes only.
    """
    del input_types
    enc = jnp.ones(input_shapes['encoder_input_tokens'], jnp.int32)
    dec = jnp.ones(input_shapes['decoder_input_tokens'], jnp.int32)
    params_rng, dropout_rng = jax.random.split(rng)
    return self.module.init({'params': params_rng, 'dropout': dropout_rng}, enc, dec,
                            enable_dropout=False)

  # ---------------------------------------------------------------------------
  # Teacher-forced computations.
  # ---------------------------------------------------------------------------
  def encode(self, params: PyTree, encoder_input_tokens: Array,
             dropout_rng: Optional[Array] = None) -> Array:
    """[batch, src_len] int32 -> encoder states [batch, src_len, emb_dim] (dropout iff rng)."""
    rngs = {'dropout': dropout_rng} if dropout_rng is not None else None
    return self.module.apply({'params': params}, encoder_input_tokens,
                             enable_dropout=dropout_rng is not None, rngs=rngs,
                             method=Transformer.encode)

  def decode(self, params: PyTree, encoded: Array, encoder_input_tokens: Array,
             decoder_input_tokens: Array, dropout_rng: Optional[Array] = None,
             return_hidden: bool = False) -> Array | tuple[Array, Array]:
    """Teacher-forced logits [batch, tgt_len, vocab] float32 from encoder states; with
    `return_hidden`, also the decoder's final hidden states [batch, tgt_len, emb_dim]
    (`Transformer.decode`). Dropout iff `dropout_rng` is given."""
    rngs = {'dropout': dropout_rng} if dropout_rng is not None else None
    return self.module.apply({'params': params}, encoded, encoder_input_tokens,
                             decoder_input_tokens, enable_dropout=dropout_rng is not None,
                             rngs=rngs, return_hidden=return_hidden, method=Transformer.decode)

  def compute_logits(self, params: PyTree, batch: Batch,
                     dropout_rng: Optional[Array] = None,
                     return_hidden: bool = False) -> Array | tuple[Array, Array]:
    """Teacher-forced logits [batch, tgt_len, vocab] float32 (with `return_hidden`, also the
    decoder's final hidden states [batch, tgt_len, emb_dim], see `decode`).

    Dropout is enabled iff ``dropout_rng`` is given.
    """
    rngs = {'dropout': dropout_rng} if dropout_rng is not None else None
    return self.module.apply(
        {'params': params}, batch['encoder_input_tokens'],
        batch['decoder_input_tokens'], enable_dropout=dropout_rng is not None,
        rngs=rngs, return_hidden=return_hidden)

  def token_logprobs(self, params: PyTree, batch: Batch,
                     dropout_rng: Optional[Array] = None) -> Array:
    """log pi(decoder_target_tokens[b, t] | prefix, source): [batch, tgt_len] f32.

    Unmasked (padding positions hold the log-prob of PAD); callers weight them.
    """
    logits = self.compute_logits(params, batch, dropout_rng)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    targets = batch['decoder_target_tokens']
    return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]

  def score_batch(self, params: PyTree, batch: Batch) -> Array:
    """Sequence log-likelihood in nats [batch] float32 (no dropout).

    sum_t [decoder_loss_weights > 0] * log_softmax(logits)[target_t]. If the batch
    has no 'decoder_loss_weights', positions with target != PAD count.
    """
    weights = batch.get('decoder_loss_weights')
    if weights is None:
      weights = batch['decoder_target_tokens'] != PAD_ID
    mask = (weights > 0).astype(jnp.float32)
    return jnp.sum(self.token_logprobs(params, batch) * mask, axis=-1)

  def loss_fn(self, params: PyTree, batch: Batch, dropout_rng: Optional[Array]
              ) -> tuple[Array, dict[str, Array]]:
    """Token-weighted cross-entropy (label smoothing ``self.label_smoothing``).

    With w = decoder_loss_weights and l_t the per-token smoothed CE:
      loss = sum(w * l) / sum(w)     (0 when sum(w) == 0).
    Tokens with w == 0 contribute exactly nothing to the loss or its gradient.

    Returns:
      (loss [] f32, metrics) with scalar metrics:
        'loss': the loss above; 'nll': same weighting without smoothing (nats);
        'accuracy': argmax accuracy over tokens with w > 0 (unweighted; a target tied with
          the maximum logit counts as correct);
        'num_tokens': sum(w).
    """
    logits = self.compute_logits(params, batch, dropout_rng)
    targets = batch['decoder_target_tokens']
    weights = batch.get('decoder_loss_weights')
    if weights is None:
      weights = (targets != PAD_ID)
    weights = weights.astype(jnp.float32)
    token_loss, token_nll = cross_entropy_with_logits(logits, targets,
                                                      self.label_smoothing)
    total_w = jnp.sum(weights)
    denom = jnp.where(total_w != 0, total_w, 1.0)
    # where(): a zero weight must not propagate a non-finite value.
    nz = weights != 0
    loss = jnp.sum(jnp.where(nz, weights * token_loss, 0.0)) / denom
    nll = jnp.sum(jnp.where(nz, weights * token_nll, 0.0)) / denom
    active = (weights > 0).astype(jnp.float32)
    # The target's logit is the maximum: argmax accuracy up to exact ties, without the variadic
    # (value, index) reduction of jnp.argmax (~4% of a `tiny` CPU train step).
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    accuracy = jnp.sum(correct * active) / jnp.maximum(jnp.sum(active), 1.0)
    metrics = {'loss': loss, 'nll': nll, 'accuracy': accuracy, 'num_tokens': total_w}
    return loss, metrics

  # ---------------------------------------------------------------------------
  # Incremental decoding.
  # ---------------------------------------------------------------------------
  def init_decode_cache(self, params: PyTree, encoder_input_tokens: Array,
                        max_decode_len: int) -> PyTree:
    """Encodes the source and builds the decoding cache (leading dim batch).

    Runs the encoder once and a cache-creating decoder call on a [batch, 1] dummy
    input: self-attention K/V buffers [batch, heads, max_decode_len, kv] (zeros),
    cross-attention K/V of the source projected once ('shared_key' / 'shared_value'
    [batch, heads, src_len, kv]), ``cache_index`` = 0 [] (shared), ``shared_encoder_mask``
    [batch, src_len]. A decoding function expands it to N rows per source with
    ``decoding.expand_cache``, which leaves the 'shared_' leaves at one copy per source
    (the cache contract: ``transformer`` module docstring).
    """
    encoded = self.module.apply({'params': params}, encoder_input_tokens,
                                method=Transformer.encode)
    batch = encoder_input_tokens.shape[0]
    _, variables = self.module.apply(
        {'params': params}, encoded, encoder_input_tokens,
        jnp.zeros((batch, 1), jnp.int32), decode=True,
        max_decode_length=max_decode_len, mutable=['cache'],
        method=Transformer.decode)
    return variables['cache']

  def extend_decode_cache(self, cache: PyTree, max_decode_len: int) -> PyTree:
    """The self-attention K/V buffers ('cached_key' / 'cached_value' [rows, heads, len, kv])
    zero-padded along `len` to `max_decode_len` positions; every other leaf as it is.

    Positions past the written ones are masked by the attention, so a step over the extended
    cache computes what it computes over the short one (up to floating-point rounding of the
    longer reductions): decoding can run its first steps over a short cache, whose attention
    reads and masks fewer positions, and extend it when `cache_index` reaches its length.

    Raises:
      ValueError: `max_decode_len` is shorter than the cache, or past `config.max_len`.
    """
    _check_length('max_decode', max_decode_len, self.config.max_len)

    def pad(path, x):
      if getattr(path[-1], 'key', None) not in ('cached_key', 'cached_value'):
        return x
      if x.shape[2] > max_decode_len:
        raise ValueError(f'cannot shorten a decoding cache of {x.shape[2]} positions to '
                         f'{max_decode_len}')
      return jnp.pad(x, ((0, 0), (0, 0), (0, max_decode_len - x.shape[2]), (0, 0)))
    return jax.tree_util.tree_map_with_path(pad, cache)

  def decode_step(self, params: PyTree, cache: PyTree, tokens: Array
                  ) -> tuple[Array, PyTree]:
    """One decoding step: tokens [batch] int32 -> (logits [batch, vocab] f32, cache).

    ``tokens`` is the token at position cache_index - 1 (0 = start at index 0);
    the logits predict position cache_index.
    """
    logits, variables = self.module.apply(
        {'params': params, 'cache': cache}, None, None, tokens[:, None],
        decode=True, mutable=['cache'], method=Transformer.decode)
    return logits[:, 0, :], variables['cache']

  def make_tokens_to_logits(self, params: PyTree) -> Callable:
    """``tokens_to_logits(state: decoding.DecodingState) -> (logits, new_cache)``."""
    def tokens_to_logits(state):
      return self.decode_step(params, state.cache, state.cur_token)
    return tokens_to_logits

  def predict_batch(self, params: PyTree, batch: Batch, rng: Optional[Array] = None,
                    *, method: str = 'greedy', num_decodes: int = 1,
                    temperature: float = 1.0, topk: int = 0, topp: float = 0.0,
                    max_decode_len: Optional[int] = None, beam_alpha: float = 0.6,
                    first_window: Optional[int] = None) -> tuple[Array, dict[str, Array]]:
    """Decodes ``num_decodes`` outputs per source with a registered decoding method.

    Args:
      params: model params.
      batch: needs 'encoder_input_tokens' [batch, src_len]; 'decoder_input_tokens'
        (or 'decoder_target_tokens') fixes the default max_decode_len.
      rng: PRNG key (required for method='sample'); see
        ``decoding.temperature_sample`` for per-source keys.
      method: a name in ``decoding.DECODE_FNS``: 'greedy' (num_decodes must be 1),
        'sample' (temperature / top-k / top-p sampling), 'beam' (beam search with beam
        size num_decodes and the GNMT length penalty alpha=beam_alpha), or one a user
        registered with ``decoding.register_decode_fn``.
      first_window: a method registered ``windowed`` ('greedy', 'sample') starts with a
        self-attention cache of this many positions and doubles it as the position reaches
        its length (``decoding.cache_windows``; None: ``decoding.FIRST_WINDOW``, 0: the full
        length from the start); the tokens are those of a full-length cache, up to
        floating-point rounding.
    Returns:
      tokens [batch, num_decodes, max_decode_len] int32 (EOS kept, 0 after), and
      aux with 'logprobs' [batch, num_decodes] f32: log-likelihood in nats under
      the (untempered) model, comparable to ``score_batch``; 'lengths' [batch, N]
      int32 (tokens incl. EOS). Greedy/sample add 'sampling_logprobs' (under the
      sampling distribution: tempered, top-k/p-renormalised; 0 for greedy),
      'token_logprobs' and 'token_logprobs_policy' [batch, N, len]. Beam adds
      'scores' [batch, N] (length-normalised, beams best first).
    Raises:
      ValueError: an unregistered method, greedy with num_decodes > 1, sample without rng.
    """
    from rest_jax import decoding  # Local import: decoding imports no model code.

    fn = decoding.decode_fn(method)
    enc = batch['encoder_input_tokens']
    if max_decode_len is None:
      ref = batch.get('decoder_input_tokens', batch.get('decoder_target_tokens'))
      if ref is None:
        raise ValueError('max_decode_len is required without decoder tokens.')
      max_decode_len = ref.shape[1]
    windows, extra = [max_decode_len], {}
    if method in decoding.WINDOWED_FNS:
      windows = decoding.cache_windows(
          max_decode_len, decoding.FIRST_WINDOW if first_window is None else first_window)
      extra = dict(windows=windows, extend_cache=self.extend_decode_cache)
    cache = self.init_decode_cache(params, enc, windows[0])
    # An all-PAD source is a batch's padding (a real one ends in EOS): it must not keep the
    # decoding loop running.
    active = jnp.any(enc != PAD_ID, axis=-1)
    return fn(cache, self.make_tokens_to_logits(params), batch_size=enc.shape[0],
              max_decode_len=max_decode_len, eos_id=EOS_ID, num_decodes=num_decodes, rng=rng,
              temperature=temperature, topk=topk, topp=topp, beam_alpha=beam_alpha,
              active=active, **extra)
