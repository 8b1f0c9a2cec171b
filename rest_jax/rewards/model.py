"""A reference-free learned reward model r(x, y) for ReST (Gulcehre et al. 2023, sec. 2 and 4).

ReST filters Grow samples by a reward model's score. This one reads the source x and a candidate y
(no reference) and returns one scalar:

  * Input: one sequence, the source ids followed by the candidate ids (`pack_inputs`), with
    `segment_ids` 0 = padding, 1 = source, 2 = candidate. Both use the policy's SentencePiece
    vocabulary (PAD = 0, EOS = 1 ending each part, as in the policy's features).
  * Token embedding + a learned segment embedding [3, emb_dim] + sinusoidal positions over the
    packed sequence, then `num_layers` bidirectional pre-LN encoder layers (the `EncoderLayer` of
    `rest_jax.models.transformer`: self-attention over every non-padding position, ReLU MLP) and a
    final LayerNorm.
  * Pooling: u = the mean of the final states over the source positions, v = the same over the
    candidate positions (a zero vector for a part without tokens, so an empty candidate works).
    The head reads [u, v, u * v, |u - v|] (the sentence-pair features of Conneau et al. 2017,
    InferSent, sec. 3.2) and six `surface_features` computed from the ids: the two lengths and
    their ratio (mean pooling forgets them; they give away truncated, repeated or unrelated
    candidates), the share of candidate tokens copied from the source and the shares of repeated
    candidate tokens and bigrams.
  * Head: a ReLU layer [4 * emb_dim + 6, mlp_dim] and a linear layer [mlp_dim, 1]: raw score
    [batch] float32 (unbounded; `RewardScorer` maps it to [0, 1] with the calibration stored beside
    the checkpoint).

Parameters carry the logical axis names of `rest_jax.partitioning` ('vocab', 'embed', 'heads', 'kv',
'mlp'), so the same rules shard the reward model and the policy.

Losses (hand-checkable, see the tests): `regression_loss` (weighted MSE to an oracle reward) and
`bradley_terry_loss` (pairwise preferences of the candidates of one source; InstructGPT, Ouyang et
al. 2022, eq. 1), with `pairwise_accuracy` as the matching metric.

Scoring: `load_reward_model(rm_dir) -> RewardScorer`; `scorer.score_ids(src_ids, cand_ids)` gives
calibrated rewards in [0, 1].
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from rest_jax import fileio, inference, partitioning
from rest_jax.models import transformer as tfm

Array = jax.Array

PAD_SEGMENT, SOURCE_SEGMENT, CANDIDATE_SEGMENT = 0, 1, 2
NUM_SEGMENTS = 3
LENGTH_BUCKETS = (32, 64, 128, 256)
CONFIG_FILE = 'rm_config.json'
PARAMS_FILE = 'params.npz'  # An exported reward model's params (`export_reward_model`).


@dataclasses.dataclass(frozen=True)
class RewardModelConfig:
  """Hyper-parameters of `RewardModel`.

  Attributes:
    vocab_size: token vocabulary (the policy's SentencePiece vocabulary, 8000 pieces here).
    emb_dim: model width.
    num_heads, head_dim: attention heads and their width ('kv' axis).
    mlp_dim: hidden width of the position-wise MLP.
    num_layers: bidirectional encoder layers.
    dropout_rate: dropout on embeddings and sub-layer outputs (training only).
    max_len: longest packed source + candidate sequence (tokens); longer inputs are cut by
      `pack_inputs` (source first).
    dtype: activation dtype (params are float32).
  """
  vocab_size: int = 8000
  emb_dim: int = 256
  num_heads: int = 4
  head_dim: int = 64
  mlp_dim: int = 1024
  num_layers: int = 2
  dropout_rate: float = 0.1
  max_len: int = 256
  dtype: Any = jnp.float32

  def transformer_config(self) -> tfm.TransformerConfig:
    """The `TransformerConfig` of the reused encoder layers (no decoder)."""
    return tfm.TransformerConfig(
        vocab_size=self.vocab_size, emb_dim=self.emb_dim, num_heads=self.num_heads,
        head_dim=self.head_dim, mlp_dim=self.mlp_dim, num_encoder_layers=self.num_layers,
        num_decoder_layers=0, dropout_rate=self.dropout_rate, dtype=self.dtype,
        max_len=self.max_len)

  def to_json(self) -> dict[str, Any]:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(RewardModelConfig)}
    d['dtype'] = jnp.dtype(self.dtype).name
    return d

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> 'RewardModelConfig':
    return cls(**dict(d, dtype=jnp.dtype(d['dtype'])))


gin.external_configurable(RewardModelConfig, 'RewardModelConfig', module='rewards')


NUM_SURFACE_FEATURES = 6


def surface_features(tokens: Array, segment_ids: Array) -> Array:
  """Six surface features of each (source, candidate) row, [batch, 6] float32.

  [log(1 + n_s), log(1 + n_c), log((1 + n_c) / (1 + n_s)), copy rate, repeat rate, bigram repeat
  rate], with n_s / n_c the source / candidate token counts (EOS included). Lengths and their
  ratio are baseline features of translation quality estimation (QuEst, Specia et al. 2013); mean
  pooling alone would forget them. Over the candidate's content tokens (ids > EOS): the copy rate
  is the share that occur in the source, the repeat rate the share equal to an earlier content
  token, the bigram repeat rate the share of adjacent content-token pairs equal to an earlier
  pair. They expose the degenerate outputs a policy can drift to (copying the source, looping),
  which a small model trained for minutes would not find on its own.
  """
  src = segment_ids == SOURCE_SEGMENT
  cand = segment_ids == CANDIDATE_SEGMENT
  n_s = jnp.sum(src, axis=1).astype(jnp.float32)
  n_c = jnp.sum(cand, axis=1).astype(jnp.float32)
  same = tokens[:, :, None] == tokens[:, None, :]  # [b, i, j]
  content = cand & (tokens > tfm.EOS_ID)
  in_source = jnp.any(same & src[:, None, :], axis=-1) & content
  copy_rate = jnp.sum(in_source, axis=1) / jnp.maximum(jnp.sum(content, axis=1), 1)
  earlier = jnp.tril(jnp.ones(same.shape[1:], bool), k=-1)[None]  # [1, i, j]: j < i.
  repeats = jnp.any(same & content[:, None, :] & earlier, axis=-1) & content
  repeat_rate = jnp.sum(repeats, axis=1) / jnp.maximum(jnp.sum(content, axis=1), 1)
  pair = content[:, :-1] & content[:, 1:]  # Bigram (i, i + 1) of candidate content tokens.
  same_pair = same[:, :-1, :-1] & same[:, 1:, 1:] & pair[:, None, :]
  pair_repeats = jnp.any(same_pair & earlier[:, :-1, :-1], axis=-1) & pair
  pair_repeat_rate = jnp.sum(pair_repeats, axis=1) / jnp.maximum(jnp.sum(pair, axis=1), 1)
  return jnp.stack([jnp.log1p(n_s), jnp.log1p(n_c), jnp.log((1 + n_c) / (1 + n_s)), copy_rate,
                    repeat_rate, pair_repeat_rate], axis=-1).astype(jnp.float32)


class RewardModel(nn.Module):
  """Source + candidate -> raw scalar reward (see the module docstring for the architecture)."""
  config: RewardModelConfig

  @nn.compact
  def __call__(self, tokens: Array, segment_ids: Array, enable_dropout: bool = False) -> Array:
    """Raw scores.

    Args:
      tokens: [batch, length] int32, source ids then candidate ids then PAD (0); `pack_inputs`.
      segment_ids: [batch, length] int32, 0 padding, 1 source, 2 candidate.
      enable_dropout: training-mode dropout (needs a 'dropout' rng).

    Returns:
      [batch] float32 raw scores.

    Raises:
      ValueError: length > config.max_len.
    """
    cfg = self.config
    tcfg = cfg.transformer_config()
    deterministic = not enable_dropout
    length = tokens.shape[1]
    tfm._check_length('reward model input', length, cfg.max_len)
    x = tfm.Embed(tcfg, name='token_embedder')(tokens)
    seg = self.param('segment_embedding', tfm._init(tfm._embed_init, (None, 'embed')),
                     (NUM_SEGMENTS, cfg.emb_dim), jnp.float32)
    x = x + jnp.take(seg, segment_ids, axis=0).astype(cfg.dtype)
    x = tfm.add_positions(x, jnp.arange(length), cfg.max_len)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    valid = segment_ids != PAD_SEGMENT
    mask = valid[:, None, None, :]  # Padding keys masked: [b, 1, 1, length].
    for i in range(cfg.num_layers):
      x = tfm.EncoderLayer(tcfg, name=f'layers_{i}')(x, mask, deterministic)
    x = tfm.LayerNorm(tcfg, name='encoder_norm')(x).astype(jnp.float32)
    pooled = []
    for seg_id in (SOURCE_SEGMENT, CANDIDATE_SEGMENT):
      w = (segment_ids == seg_id).astype(jnp.float32)[:, :, None]  # [b, length, 1]
      pooled.append(jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0))
    u, v = pooled
    h = jnp.concatenate([u, v, u * v, jnp.abs(u - v), surface_features(tokens, segment_ids)],
                        axis=-1)  # [b, 4 * embed + NUM_SURFACE_FEATURES]
    wi = self.param('head_hidden_kernel', tfm._init(tfm._dense_init, (None, 'mlp')),
                    (h.shape[-1], cfg.mlp_dim), jnp.float32)
    bi = self.param('head_hidden_bias', tfm._init(tfm._zeros, ('mlp',)), (cfg.mlp_dim,),
                    jnp.float32)
    h = nn.relu(h @ wi + bi)
    wo = self.param('score_kernel', tfm._init(tfm._dense_init, ('mlp', None)),
                    (cfg.mlp_dim, 1), jnp.float32)
    bo = self.param('score_bias', tfm._init(tfm._zeros, (None,)), (1,), jnp.float32)
    return (h @ wo + bo)[:, 0]


def pack_inputs(source_ids_list: Sequence[Sequence[int]],
                candidate_ids_list: Sequence[Sequence[int]],
                max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Packs (source, candidate) id lists into the model's input, left-aligned.

  Row i is `source_ids_list[i] + candidate_ids_list[i]` followed by PAD. If the pair is longer
  than `max_len`, the source is cut first (its tail, EOS included); a candidate alone longer than
  `max_len` is cut to `max_len`. An empty candidate list is valid (the row is the source only).

  Returns:
    (tokens, segment_ids), both [n, max_len] int32; segment ids 0 pad, 1 source, 2 candidate.

  Raises:
    ValueError: different numbers of sources and candidates.
  """
  if len(source_ids_list) != len(candidate_ids_list):
    raise ValueError(f'{len(source_ids_list)} sources vs {len(candidate_ids_list)} candidates')
  n = len(source_ids_list)
  tokens = np.zeros((n, max_len), np.int32)
  segs = np.zeros((n, max_len), np.int32)
  for i, (src, cand) in enumerate(zip(source_ids_list, candidate_ids_list)):
    cand = list(cand)[:max_len]
    src = list(src)[:max_len - len(cand)]
    ls, lc = len(src), len(cand)
    tokens[i, :ls], tokens[i, ls:ls + lc] = src, cand
    segs[i, :ls], segs[i, ls:ls + lc] = SOURCE_SEGMENT, CANDIDATE_SEGMENT
  return tokens, segs


# -- losses and metrics ----------------------------------------------------------------------------

def regression_loss(pred: Array, target: Array, weights: Array) -> Array:
  """Weighted mean squared error sum_b w_b (pred_b - target_b)^2 / sum_b w_b ([] float32).

  pred, target, weights: [B] (or any equal shapes) float; weight 0 = padding. 0 if no weight.
  """
  w = jnp.asarray(weights, jnp.float32)
  err = (jnp.asarray(pred, jnp.float32) - jnp.asarray(target, jnp.float32)) ** 2
  return jnp.sum(w * err) / jnp.maximum(jnp.sum(w), 1e-8)


def preference_pairs(targets: Array, mask: Array, groups: Array | None = None) -> Array:
  """[B, K, K] bool: P[b, i, j] = candidates i and j of row b are valid and targets_i > targets_j.

  Ties (targets_i == targets_j) make no pair. With `groups` ([B, K] int bit masks), i and j must
  also share a comparison group (groups_i & groups_j != 0).
  """
  m = jnp.asarray(mask).astype(bool)
  t = jnp.asarray(targets, jnp.float32)
  p = m[:, :, None] & m[:, None, :] & (t[:, :, None] > t[:, None, :])
  if groups is not None:
    g = jnp.asarray(groups, jnp.int32)
    p = p & ((g[:, :, None] & g[:, None, :]) != 0)
  return p


def bradley_terry_loss(scores: Array, targets: Array, mask: Array,
                       groups: Array | None = None) -> Array:
  """Pairwise Bradley-Terry loss of the candidates of each source ([] float32, nats).

  For every row b (one source) and every pair (i, j) of its valid candidates with
  targets[b, i] > targets[b, j] (ties skipped):  -log sigmoid(scores[b, i] - scores[b, j]);
  the loss is the mean over all such pairs of the batch (0 if there is none). This is the reward
  model loss of InstructGPT (Ouyang et al. 2022, eq. 1), whose K-choose-2 comparisons of one
  prompt also sit in one batch element; here the mean is over the batch's pairs rather than
  1 / C(K, 2) per prompt, so sources with more distinct candidates weigh more.

  Args:
    scores: [B, K] float raw reward-model scores.
    targets: [B, K] float oracle rewards (only their order within a row matters).
    mask: [B, K] bool / {0, 1}, 1 = a real candidate.
    groups: optional [B, K] int bit masks: only candidates sharing a bit are compared
      (`preference_pairs`); None compares all.
  """
  p = preference_pairs(targets, mask, groups).astype(jnp.float32)
  s = jnp.asarray(scores, jnp.float32)
  diff = s[:, :, None] - s[:, None, :]
  return jnp.sum(p * -jax.nn.log_sigmoid(diff)) / jnp.maximum(jnp.sum(p), 1.0)


def pairwise_accuracy(scores: Array, targets: Array, mask: Array,
                      groups: Array | None = None) -> Array:
  """Share of the `preference_pairs` the scores order like the targets ([] float32).

  A pair (i preferred over j) counts 1 if scores_i > scores_j, 1/2 if the scores tie, 0 otherwise;
  0 if there is no pair. Arguments as in `bradley_terry_loss`.
  """
  p = preference_pairs(targets, mask, groups).astype(jnp.float32)
  s = jnp.asarray(scores, jnp.float32)
  diff = s[:, :, None] - s[:, None, :]
  correct = (diff > 0).astype(jnp.float32) + 0.5 * (diff == 0).astype(jnp.float32)
  return jnp.sum(p * correct) / jnp.maximum(jnp.sum(p), 1.0)


# -- scoring ---------------------------------------------------------------------------------------

def _boxed_shapes(config: RewardModelConfig):
  def init(rng):
    x = jnp.ones((1, 8), jnp.int32)
    return RewardModel(config).init(rng, x, x)['params']
  return init, jax.eval_shape(init, jax.random.PRNGKey(0))


def param_shardings(config: RewardModelConfig, mesh) -> Any:
  """Shardings of the (unboxed) params on `mesh` by the logical-axis rules."""
  return partitioning.params_shardings(mesh, _boxed_shapes(config)[1])


def abstract_params(config: RewardModelConfig, mesh) -> Any:
  """The params as `jax.ShapeDtypeStruct`s carrying their shardings (for restoring)."""
  boxed = _boxed_shapes(config)[1]
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      nn.meta.unbox(boxed), param_shardings(config, mesh))


def calibrate(raw: np.ndarray, calibration: Mapping[str, float] | None) -> np.ndarray:
  """Raw scores -> rewards in [0, 1]: clip((raw - low) / (high - low), 0, 1), float32.

  `calibration` holds `low` / `high` (the 1% / 99% quantiles of the raw scores on the held-out
  dev records, see `train_rm`); None: the raw scores are only clipped to [0, 1].
  """
  raw = np.asarray(raw, np.float32)
  if calibration is None:
    return np.clip(raw, 0.0, 1.0)
  low, high = float(calibration['low']), float(calibration['high'])
  return np.clip((raw - low) / max(high - low, 1e-6), 0.0, 1.0).astype(np.float32)


def text_tokenizer(task: str) -> Callable[[str], list[int]]:
  """`text -> ids` with the task's SentencePiece vocabulary (the policy's), without EOS."""
  from rest_jax import input_pipeline
  vocab = input_pipeline.get_vocabulary(task)
  return lambda text: [int(i) for i in vocab.encode(text)]


@functools.lru_cache(maxsize=8)
def _score_fn(config: RewardModelConfig):
  module = RewardModel(config)
  return jax.jit(lambda params, tokens, segs: module.apply({'params': params}, tokens, segs))


class RewardScorer:
  """Scores (source, candidate) pairs with a trained `RewardModel` (inference only).

  Args:
    config: the model's `RewardModelConfig`.
    params: its (unboxed) params; placed on `mesh` by the logical-axis rules.
    calibration: {'low', 'high'} raw-score bounds mapped to 0 and 1 (see `calibrate`), or None.
    task: SeqIO task whose vocabulary `score_text` tokenizes with.
    mesh: a `Mesh(('data', 'model'))`; default this host's devices (`create_mesh` partitions).
    tokenize: `text -> ids` (no EOS) instead of the task's vocabulary (tests).
  """

  def __init__(self, config: RewardModelConfig, params: Any,
               calibration: Mapping[str, float] | None = None,
               task: str = 'libreoffice_help_de_en', mesh=None,
               tokenize: Callable[[str], list[int]] | None = None):
    self.config = config
    self.calibration = dict(calibration) if calibration else None
    self.task = task
    self.mesh = mesh if mesh is not None else partitioning.create_mesh(
        devices=jax.local_devices())
    self.params = jax.device_put(nn.meta.unbox(params), param_shardings(config, self.mesh))
    self._tokenize = tokenize
    self.buckets = tuple(sorted({b for b in LENGTH_BUCKETS if b < config.max_len} |
                                {config.max_len}))

  def raw_scores(self, source_ids: Sequence[Sequence[int]],
                 candidate_ids: Sequence[Sequence[int]], batch_size: int = 64) -> np.ndarray:
    """Raw model scores, [n] float32.

    Args:
      source_ids, candidate_ids: n id lists each (EOS-terminated like the policy's; PAD = 0 never
        appears inside). Packed by `pack_inputs` (long pairs cut, source first).
      batch_size: rows per forward pass, rounded up to a multiple of the mesh's `data` axis. Rows
        are grouped by the length bucket (32 / 64 / 128 / 256 tokens, at most `max_len`) of their
        own packed length; the last batch of a bucket is padded with empty rows, so each bucket
        compiles once.
    """
    tokens, segs = pack_inputs(source_ids, candidate_ids, self.config.max_len)
    if not len(tokens):
      return np.zeros((0,), np.float32)
    fn = _score_fn(self.config)
    return inference.run_batched(
        lambda buckets, b: fn(self.params, b['tokens'], b['segment_ids']),
        {'tokens': tokens, 'segment_ids': segs}, trim=('tokens', 'segment_ids'),
        buckets=self.buckets, batch_size=batch_size, mesh=self.mesh, grouping='row',
        bucket_lengths=(segs != PAD_SEGMENT).sum(1)).astype(np.float32)

  def calibrate(self, raw: np.ndarray) -> np.ndarray:
    """Raw scores -> rewards in [0, 1] with this model's calibration (`calibrate`)."""
    return calibrate(raw, self.calibration)

  def score_ids(self, source_ids: Sequence[Sequence[int]],
                candidate_ids: Sequence[Sequence[int]], batch_size: int = 64,
                references: Sequence[str] | None = None) -> np.ndarray:
    """Calibrated rewards in [0, 1], [n] float32 (arguments as in `raw_scores`).

    `references` is ignored (the model is reference-free); it is accepted so that callers treat
    this and `metrics.MetricScorer` alike.
    """
    del references
    return self.calibrate(self.raw_scores(source_ids, candidate_ids, batch_size))

  def tokenize(self, text: str) -> list[int]:
    """`text -> ids + [EOS]` with the task's vocabulary (or the `tokenize` given)."""
    if self._tokenize is None:
      self._tokenize = text_tokenizer(self.task)
    return list(self._tokenize(text)) + [tfm.EOS_ID]

  def score_text(self, sources: Sequence[str], candidates: Sequence[str],
                 batch_size: int = 64) -> np.ndarray:
    """Calibrated rewards in [0, 1], [n] float32, of untokenized texts (EOS appended to each)."""
    return self.score_ids([self.tokenize(s) for s in sources],
                          [self.tokenize(c) for c in candidates], batch_size)


def load_reward_model(rm_dir: str, mesh=None,
                      tokenize: Callable[[str], list[int]] | None = None) -> RewardScorer:
  """The `RewardScorer` of a `train_rm.train_reward_model` output dir, or of an exported one.

  Reads `rm_dir/rm_config.json` (model config, calibration, task) and restores the params of the
  orbax checkpoint in `rm_dir/checkpoints`, or, in a dir written by `export_reward_model` (no
  checkpoints/), loads `rm_dir/params.npz`. A relative `rm_dir` that does not exist is looked up
  in the repository (shipped reward models, `checkpoints/...`).

  Raises:
    FileNotFoundError: no `rm_config.json`, or neither a checkpoint nor `params.npz`, in `rm_dir`.
  """
  from rest_jax import trainer as trainer_lib
  rm_dir = fileio.repo_path(rm_dir)
  path = os.path.join(rm_dir, CONFIG_FILE)
  if not fileio.exists(path):
    raise FileNotFoundError(f'{path} missing: {rm_dir} holds no finished reward model '
                            '(run `rest-jax train_rm`)')
  saved = fileio.read_json(path)
  config = RewardModelConfig.from_json(saved['config'])
  mesh = mesh if mesh is not None else partitioning.create_mesh(devices=jax.local_devices())
  npz = os.path.join(rm_dir, PARAMS_FILE)
  if fileio.exists(npz) and not fileio.isdir(os.path.join(rm_dir, 'checkpoints')):
    params = fileio.load_params_npz(npz, abstract_params(config, mesh))
  else:
    params = trainer_lib.restore_params(rm_dir, abstract_params(config, mesh))
  return RewardScorer(config, params, saved.get('calibration'), task=saved.get('task'),
                      mesh=mesh, tokenize=tokenize)


def export_reward_model(rm_dir: str, out_dir: str) -> str:
  """Writes a trained reward model as two files to ship or share: `out_dir/rm_config.json` (a
  copy: config, calibration, oracle, task) and `out_dir/params.npz` (float32, so the exported
  model scores exactly as the original). `load_reward_model(out_dir)` and `rest.rm_dir` use it.

  Returns: `out_dir`.
  Raises: FileNotFoundError as `load_reward_model` (rm_dir is no finished reward model).
  """
  rm_dir = fileio.repo_path(rm_dir)
  scorer = load_reward_model(rm_dir)
  fileio.makedirs(out_dir)
  saved = fileio.read_json(os.path.join(rm_dir, CONFIG_FILE))
  fileio.save_params_npz(os.path.join(out_dir, PARAMS_FILE), scorer.params, dtype=np.float32)
  fileio.write_json(os.path.join(out_dir, CONFIG_FILE), saved)
  return out_dir
