"""The declared model interfaces (in the spirit of t5x's `BaseModel` / `BaseTransformerModel`).

Every model that `trainer.Trainer` trains is a `BaseModel`: the BC / Improve policy
(`EncoderDecoderModel`), the Improve wrapper that adds a loss's own parameters and the frozen
prior (`improve.ImproveModel`), and the reward model's training adapter
(`rewards.train_rm.RewardTrainModel`). The trainer checks this at construction
(`check_model`) instead of finding a missing method deep inside a jitted step.

`PolicyModel` adds what Grow, evaluation, scoring and the losses need of a sequence-to-sequence
policy: teacher-forced logits (optionally with the decoder's final hidden states, for value
heads), sequence scores, the decoding cache and `predict_batch` with a decoding method from the
`rest_jax.decoding` registry.

Shapes: `[batch, length]` int32 tokens (PAD = 0, EOS = 1), logits `[batch, length, vocab]`
float32, hidden states `[batch, length, emb_dim]`, log-probabilities in nats.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Mapping, Optional

import jax

Array = jax.Array
PyTree = Any
Batch = Mapping[str, Array]


class BaseModel(abc.ABC):
  """What `trainer.Trainer` needs: initial variables and a loss."""

  @property
  @abc.abstractmethod
  def config(self) -> Any:
    """The model's hyper-parameters (a frozen dataclass)."""

  @abc.abstractmethod
  def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, tuple[int, ...]],
                            input_types: Optional[Mapping[str, Any]] = None) -> PyTree:
    """{'params': ...} (with `nn.LogicallyPartitioned` boxes for sharded leaves) for inputs of
    `input_shapes`; traced under `jax.eval_shape` for shapes only."""

  @abc.abstractmethod
  def loss_fn(self, params: PyTree, batch: Batch, dropout_rng: Optional[Array]
              ) -> tuple[Array, dict[str, Array]]:
    """(scalar loss [] float32, scalar metrics); dropout on iff `dropout_rng` is given."""


class PolicyModel(BaseModel):
  """A sequence-to-sequence policy pi(y | x): what Grow, evaluation and the ReST losses use."""

  @abc.abstractmethod
  def encode(self, params: PyTree, encoder_input_tokens: Array,
             dropout_rng: Optional[Array] = None) -> Array:
    """[batch, src_len] int32 -> encoder states [batch, src_len, emb_dim]."""

  @abc.abstractmethod
  def decode(self, params: PyTree, encoded: Array, encoder_input_tokens: Array,
             decoder_input_tokens: Array, dropout_rng: Optional[Array] = None,
             return_hidden: bool = False) -> Array | tuple[Array, Array]:
    """Teacher-forced logits [batch, tgt_len, vocab] float32 (and, with `return_hidden`, the
    decoder's final hidden states [batch, tgt_len, emb_dim])."""

  @abc.abstractmethod
  def compute_logits(self, params: PyTree, batch: Batch, dropout_rng: Optional[Array] = None,
                     return_hidden: bool = False) -> Array | tuple[Array, Array]:
    """`decode(encode(x))` of a training batch."""

  @abc.abstractmethod
  def score_batch(self, params: PyTree, batch: Batch) -> Array:
    """Sequence log-likelihood of `decoder_target_tokens`, [batch] float32 nats, no dropout."""

  @abc.abstractmethod
  def init_decode_cache(self, params: PyTree, encoder_input_tokens: Array,
                        max_decode_len: int) -> PyTree:
    """The decoding cache of a batch of sources, leading dim batch, in `decoding.py`'s cache
    contract (per-row leaves are expanded / gathered, 'shared_' and 0-d leaves are not)."""

  @abc.abstractmethod
  def extend_decode_cache(self, cache: PyTree, max_decode_len: int) -> PyTree:
    """`cache` (from `init_decode_cache`, possibly expanded, compacted or stepped) able to hold
    `max_decode_len` positions: decoding may start with a short cache, whose per-step attention
    reads fewer positions, and extend it once `cur_index` reaches its length (Grow does)."""

  @abc.abstractmethod
  def make_tokens_to_logits(self, params: PyTree) -> Callable:
    """The `tokens_to_logits(state) -> (logits [batch, vocab], cache)` callback of the samplers."""

  @abc.abstractmethod
  def predict_batch(self, params: PyTree, batch: Batch, rng: Optional[Array] = None, *,
                    method: str = 'greedy', num_decodes: int = 1,
                    **decode_kwargs) -> tuple[Array, dict[str, Array]]:
    """tokens [batch, num_decodes, max_decode_len] int32 and aux arrays, by a registered
    decoding method (`decoding.decode_fn`)."""


def check_model(model: Any, kind: type = BaseModel) -> None:
  """Raises TypeError unless `model` is a `kind` (names the missing interface)."""
  if not isinstance(model, kind):
    raise TypeError(f'{type(model).__name__} is not a rest_jax.models.base.{kind.__name__}: '
                    f'subclass it and implement {sorted(kind.__abstractmethods__)}')
