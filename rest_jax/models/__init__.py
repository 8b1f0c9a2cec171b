"""Encoder-decoder Transformer models (flax.linen) and the t5x-style wrapper."""

from rest_jax.models.encoder_decoder import (
    EncoderDecoderModel,
    cross_entropy_with_logits,
    params_logical_axes,
    shift_right,
    unbox,
)
from rest_jax.models.transformer import (
    EOS_ID,
    PAD_ID,
    UNK_ID,
    Transformer,
    TransformerConfig,
    sinusoidal_table,
)

__all__ = [
    'EOS_ID', 'PAD_ID', 'UNK_ID', 'EncoderDecoderModel', 'Transformer',
    'TransformerConfig', 'cross_entropy_with_logits', 'params_logical_axes',
    'shift_right', 'sinusoidal_table', 'unbox',
]
