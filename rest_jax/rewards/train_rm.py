"""`rest-jax train_rm`: trains the learned reward model on Grow records (ReST, sec. 2 and 4).

ReST (Gulcehre et al. 2023) filters Grow samples with a reward model. Human preference data is
not available here, so the labels come from a SIMULATED preference oracle: every candidate of a
source is scored by a reference-based metric against that source's reference (`oracle`, default
chrF, `metrics.sentence_rewards`), and the reward model, which never sees the reference, learns
to reproduce the oracle's order. No human ratings are involved anywhere.

Data, per Grow source (`grow.read_grow_records`): the reference record and the distinct policy
samples; with `add_negatives`, also the five synthetic candidates of `negatives.KINDS` (copy of
the source, empty output, reference twice, first half of the reference, another source's
reference) and two degraded copies (`negatives.SAMPLE_KINDS`: twice, first half) of each of the
first `degraded_samples` policy samples, all labelled by the same oracle. Sources are split into
train / dev by a deterministic hash of `source_index` (`is_dev`), the same in every run.

Model init: the token embedding starts from cross-lingual LSI vectors of the task's parallel
train split (`lsi_embedding`; the dev sources' pairs left out) and by default stays fixed; the
rest is random (`model.RewardModel`).

Training: one batch = `batch_size` sources x K candidates (K = the most candidates of any
source; absent ones masked). `objective`: 'bradley_terry' (`model.bradley_terry_loss`),
'regression' (`model.regression_loss` of the raw score to the oracle reward) or their sum
'bradley_terry+regression' (the pairs order the candidates of a source, the regression ties the
scores of different sources to one scale, which Improve's single threshold needs). Bradley-Terry
pairs form inside comparison groups of a source only: the policy's samples with the reference;
the reference with its synthetic negatives; each degraded sample with its original. The oracle
ranks a repeated or half reference above most policy samples, and such cross-group pairs teach
"long and reference-like beats everything" rather than "a degraded candidate is worse than its
original". AdamW (`trainer.make_optimizer`, cosine decay), the jitted sharded step of
`trainer.Trainer` (dropout rng `fold_in(PRNGKey(seed), step)`).

Evaluation on the dev sources: pairwise accuracy against the oracle (pairs within a source),
Kendall tau and Pearson r of the raw scores against the oracle (pooled over dev records), and the
same against sentence BLEU; once on the Grow records (reference + samples) and once with the
synthetic negatives added. Calibration: the 1% / 99% quantiles of the raw scores of the dev Grow
records are mapped to 0 / 1 (`model.calibrate`, clipped), stored in `rm_config.json`.

Outputs in `output_dir`: `settings.json` (the pinned settings, written first), `checkpoints/`
(orbax, `trainer.Checkpointer`; the final step only once done), `rm_config.json` (model config,
calibration, task, oracle, objective), `rm_summary.json` (written last: settings, dev metrics,
steps, minutes, counts), TensorBoard event files (`rest_jax.summaries`: `train/loss`,
`train/pairwise_accuracy`, `train/learning_rate`, `train/minutes` every 10 steps and at the last;
the dev metrics against the oracle at the last step: `dev/pairwise_accuracy`, `dev/kendall_tau`,
`dev/pearson` on the Grow records, `dev/with_negatives/...` with the negatives). A finished
output dir is returned as is on a rerun with the same settings. Training is resumable: the
`TrainState` is saved every `checkpoint_every` steps, and a killed run resumes from its latest
checkpoint to the params of an uninterrupted run (`fit`, `train_reward_model`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats
from tqdm import tqdm

from rest_jax import data as data_lib
from rest_jax import fileio, grow as grow_lib, inference, partitioning, records as records_lib
from rest_jax import distributed, summaries, trainer as trainer_lib
from rest_jax.models import base
from rest_jax.rewards import metrics as metrics_lib
from rest_jax.rewards import model as rm_model
from rest_jax.rewards import negatives as neg_lib

SUMMARY_FILE = 'rm_summary.json'
GROW_KINDS = ('reference', 'sample')
# Comparison groups (bit masks; Bradley-Terry pairs only form inside a group): the policy's
# candidates with the reference; the reference with its synthetic negatives; the d-th degraded
# sample with its degraded copies (bit GROUP_SAMPLE_NEGATIVES << d).
GROUP_GROW, GROUP_REFERENCE_NEGATIVES, GROUP_SAMPLE_NEGATIVES = 1, 2, 4
OBJECTIVES = ('bradley_terry', 'regression', 'bradley_terry+regression')


def is_dev(source_index: int, dev_fraction: float) -> bool:
  """Whether a source is held out: sha256 of its index, as a number in [0, 1), < dev_fraction."""
  h = int(hashlib.sha256(str(int(source_index)).encode()).hexdigest()[:12], 16)
  return h / float(1 << 48) < dev_fraction


@dataclasses.dataclass
class Candidates:
  """A flat list of m candidates (of several sources) with their oracle labels."""
  source_index: np.ndarray           # [m] int64.
  kind: list[str]                    # 'reference', 'sample' or one of `negatives.KINDS`.
  source_ids: list[list[int]]
  candidate_ids: list[list[int]]
  candidate: list[str]
  reference: list[str]
  labels: dict[str, np.ndarray]      # metric name -> [m] float32 reward vs the reference.
  groups: np.ndarray | None = None   # [m] int comparison-group bit masks (None: one group).

  def __len__(self):
    return len(self.kind)

  def select(self, keep: np.ndarray) -> 'Candidates':
    idx = np.flatnonzero(keep)
    pick = lambda xs: [xs[i] for i in idx]
    return Candidates(self.source_index[idx], pick(self.kind), pick(self.source_ids),
                      pick(self.candidate_ids), pick(self.candidate), pick(self.reference),
                      {k: v[idx] for k, v in self.labels.items()},
                      None if self.groups is None else self.groups[idx])


def build_candidates(records: Sequence[Mapping[str, Any]], *, add_negatives: bool,
                     tokenize: Callable[[str], Sequence[int]] | None, seed: int,
                     metrics: Sequence[str], degraded_samples: int = 1) -> Candidates:
  """The Grow records (+ synthetic negatives per source) with their metric labels.

  Args:
    records: Grow records (`grow.RECORD_FIELDS`), any order; per source the reference record and
      the samples.
    add_negatives: add `negatives.KINDS` per source (the 'other_reference' one is the reference
      of a random other source, `negatives.other_indices`, `seed`) and the `negatives.SAMPLE_KINDS`
      of its first `degraded_samples` non-empty samples (each sample with its degraded copies in
      a comparison group of its own).
    tokenize: text -> ids (no EOS) for the negatives' ids.
    metrics: labels to compute (`metrics.sentence_rewards` of candidate vs reference).
  """
  by_source: dict[int, list] = {}
  for r in records:
    by_source.setdefault(int(r['source_index']), []).append(r)
  sources = sorted(by_source)
  refs = {i: next(r for r in by_source[i] if r['origin'] == 'reference') for i in sources}
  others = neg_lib.other_indices(len(sources), seed)
  cols: dict[str, list] = {k: [] for k in ('source_index', 'kind', 'source_ids',
                                           'candidate_ids', 'candidate', 'reference', 'groups')}

  def add(i, kind, text, ids, group):
    for k, v in zip(cols, (i, kind, list(refs[i]['source_ids']), list(ids), text,
                           refs[i]['reference'], group)):
      cols[k].append(v)

  for n, i in enumerate(sources):
    # The first non-empty samples by candidate index (arbitrary draws) get degraded copies.
    samples = sorted((r for r in by_source[i] if r['origin'] == 'sample' and
                      r['candidate'].strip()), key=lambda r: r['candidate_index'])
    degraded = samples[:degraded_samples] if add_negatives else []
    for r in sorted(by_source[i], key=lambda r: r['candidate_index']):
      group = GROUP_GROW
      if add_negatives and r['origin'] == 'reference':
        group |= GROUP_REFERENCE_NEGATIVES
      for d, s in enumerate(degraded):
        if r is s:
          group |= GROUP_SAMPLE_NEGATIVES << d
      add(i, r['origin'], r['candidate'], r['candidate_ids'], group)
    if add_negatives:
      other = refs[sources[others[n]]]['reference']
      for kind, text, ids in neg_lib.synthetic_candidates(refs[i]['source'], refs[i]['reference'],
                                                          other, tokenize):
        add(i, kind, text, ids, GROUP_REFERENCE_NEGATIVES)
    for d, s in enumerate(degraded):
      for kind, text, ids in neg_lib.degraded_samples(s['candidate'], tokenize):
        add(i, kind, text, ids, GROUP_SAMPLE_NEGATIVES << d)
  labels = metrics_lib.sentence_rewards(cols['candidate'], cols['reference'], metrics)
  return Candidates(np.asarray(cols['source_index'], np.int64), cols['kind'], cols['source_ids'],
                    cols['candidate_ids'], cols['candidate'], cols['reference'], labels,
                    np.asarray(cols['groups'], np.int32))


def sample_rank(cands: Candidates) -> np.ndarray:
  """[m] int: a policy sample's rank among its source's samples (in list order), -1 otherwise."""
  seen: dict[int, int] = {}
  out = -np.ones((len(cands),), np.int64)
  for j, (i, kind) in enumerate(zip(cands.source_index, cands.kind)):
    if kind == 'sample':
      out[j] = seen.get(int(i), 0)
      seen[int(i)] = out[j] + 1
  return out


def group_by_source(source_index: np.ndarray) -> np.ndarray:
  """[S, K] int: row s lists the positions of the s-th source's candidates, -1 padded."""
  sources, counts = np.unique(source_index, return_counts=True)
  out = -np.ones((len(sources), int(counts.max()) if len(counts) else 0), np.int64)
  for s, i in enumerate(sources):
    pos = np.flatnonzero(source_index == i)
    out[s, :len(pos)] = pos
  return out


def pack_by_source(cands: Candidates, targets: np.ndarray, max_len: int) -> dict[str, np.ndarray]:
  """Training arrays, one row per source: tokens / segment_ids [S, K, max_len] int32, targets
  [S, K] float32 (the oracle rewards), mask [S, K] float32 (1 = a real candidate), groups [S, K]
  int32 (comparison-group bit masks, 0 on padding; all 1 if `cands.groups` is None)."""
  tokens, segs = rm_model.pack_inputs(cands.source_ids, cands.candidate_ids, max_len)
  idx = group_by_source(cands.source_index)
  safe, real = np.maximum(idx, 0), idx >= 0
  groups = np.ones((len(cands),), np.int32) if cands.groups is None else cands.groups
  return {'tokens': tokens[safe] * real[..., None], 'segment_ids': segs[safe] * real[..., None],
          'targets': np.asarray(targets, np.float32)[safe] * real,
          'mask': real.astype(np.float32), 'groups': groups[safe] * real}


@functools.lru_cache(maxsize=2)
def _plan(lengths: tuple, batch_size: int, seed: int, epoch: int, pool_batches: int):
  rng = np.random.default_rng([seed, epoch])
  n = len(lengths) // batch_size * batch_size
  order = rng.permutation(len(lengths))[:n]
  key = np.asarray(lengths)
  pool = pool_batches * batch_size
  order = np.concatenate([c[np.argsort(key[c], kind='stable')]
                          for c in np.split(order, np.arange(pool, n, pool))])
  plan = order.reshape(-1, batch_size)
  return plan[rng.permutation(len(plan))]


def epoch_plan(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
               pool_batches: int = 32) -> np.ndarray:
  """[S // batch_size, batch_size] source rows of one epoch, a pure function of (seed, epoch).

  As `data.ArrayBatcher`: a seeded permutation, sorted by `lengths` inside pools of
  `pool_batches` batches (so a batch's rows have similar lengths and it is cut to a short bucket),
  cut into batches, batch order shuffled; the last partial batch is dropped.
  """
  return _plan(tuple(int(l) for l in lengths), batch_size, seed, epoch, pool_batches)


def lsi_embedding(sources: np.ndarray, targets: np.ndarray, vocab_size: int,
                  dim: int) -> tuple[np.ndarray, np.ndarray]:
  """Cross-lingual LSI token vectors from a parallel corpus (Dumais et al. 1997, after Deerwester
  et al. 1990), to initialise the reward model's token embedding.

  Every sentence pair is one document holding the ids of its source and of its target (PAD, EOS and
  UNK dropped). The token x pair matrix holds log(1 + count) * idf, idf = log((n + 1) / (df + 1));
  its rank-`dim` truncated SVD U S V^T gives token i the vector (U S)[i]. A word and its
  translation occur in the same pairs, so their vectors are close although they never share a
  sentence; mean-pooled over a sentence, they make a source and its translation similar.

  Args:
    sources, targets: [n, length] int token ids of the n pairs (0 = PAD).
    vocab_size: rows of the result. dim: vector size (< min(vocab_size, n)).

  Returns:
    (E [vocab_size, dim] float32 scaled to unit standard deviation like `Embed`'s N(0, 1) init,
     present [vocab_size] bool: the token occurs in the corpus; other rows of E are 0).

  Raises:
    ValueError: dim >= the number of pairs or of tokens.
  """
  import scipy.sparse as sp
  from scipy.sparse.linalg import svds
  n = len(sources)
  if dim >= min(n, vocab_size):
    raise ValueError(f'LSI of dimension {dim} needs more than {dim} pairs and tokens ({n} pairs)')
  rows, cols = [], []
  for a in (np.asarray(sources), np.asarray(targets)):
    r, c = np.nonzero(a > 2)
    rows.append(a[r, c])
    cols.append(r)
  rows, cols = np.concatenate(rows), np.concatenate(cols)
  m = sp.csr_matrix((np.ones(len(rows), np.float64), (rows, cols)), shape=(vocab_size, n))
  m.data = np.log1p(m.data)  # csr_matrix sums duplicate entries first: log(1 + count).
  df = np.asarray((m > 0).sum(axis=1)).ravel()
  m = sp.diags(np.log((n + 1.0) / (df + 1.0))) @ m
  u, s, _ = svds(m, k=dim, random_state=0)
  e = u[:, ::-1] * s[::-1]  # Largest singular value first.
  present = df > 0
  e = e / max(float(e[present].std()), 1e-12)
  e[~present] = 0.0
  return e.astype(np.float32), present


def init_params(config: rm_model.RewardModelConfig, seed: int,
                embedding: tuple[np.ndarray, np.ndarray] | None = None) -> Any:
  """Fresh (unboxed) params; with `embedding` = (E, present), token rows with present=True are E."""
  x = jnp.ones((1, 8), jnp.int32)
  params = jax.jit(lambda r: nn.meta.unbox(rm_model.RewardModel(config).init(r, x, x)['params']))(
      jax.random.PRNGKey(seed))
  if embedding is not None:
    e, present = embedding
    old = params['token_embedder']['embedding']
    params['token_embedder']['embedding'] = jnp.where(jnp.asarray(present)[:, None],
                                                      jnp.asarray(e, old.dtype), old)
  return params


class RewardTrainModel(base.BaseModel):
  """Adapts `RewardModel` to `trainer.Trainer` (get_initial_variables, loss_fn) on [B, K, L]."""

  def __init__(self, config: rm_model.RewardModelConfig, objective: str):
    if objective not in OBJECTIVES:
      raise ValueError(f'unknown objective {objective!r}: use one of {OBJECTIVES}')
    self.module = rm_model.RewardModel(config)
    self.objective = objective

  @property
  def config(self) -> rm_model.RewardModelConfig:
    return self.module.config

  def get_initial_variables(self, rng, input_shapes, input_types=None):
    del input_types
    x = jnp.ones((1, input_shapes['tokens'][-1]), jnp.int32)
    return self.module.init(rng, x, x)

  def loss_fn(self, params, batch, rng):
    b, k, l = batch['tokens'].shape
    scores = self.module.apply(
        {'params': params}, batch['tokens'].reshape(b * k, l),
        batch['segment_ids'].reshape(b * k, l), enable_dropout=rng is not None,
        rngs={'dropout': rng} if rng is not None else None).reshape(b, k)
    loss = 0.0
    if 'bradley_terry' in self.objective:
      loss += rm_model.bradley_terry_loss(scores, batch['targets'], batch['mask'], batch['groups'])
    if 'regression' in self.objective:
      loss += rm_model.regression_loss(scores, batch['targets'], batch['mask'])
    acc = rm_model.pairwise_accuracy(scores, batch['targets'], batch['mask'], batch['groups'])
    return loss, {'pairwise_accuracy': acc, 'num_tokens': jnp.sum(batch['mask'])}


def fit(config: rm_model.RewardModelConfig, arrays: Mapping[str, np.ndarray], *,
        objective: str = 'bradley_terry', num_steps: int = 1000, batch_size: int = 16,
        learning_rate: float = 1e-3, warmup_steps: int = 100, weight_decay: float = 1e-4,
        max_minutes: float | None = None, seed: int = 0, mesh=None, params: Any = None,
        train_embedding: bool = True, desc: str = 'train_rm', writer=None,
        checkpointer: trainer_lib.Checkpointer | None = None,
        checkpoint_every: int | None = None) -> tuple[Any, dict[str, Any]]:
  """Trains a fresh `RewardModel` on `pack_by_source` arrays, resuming from `checkpointer`.

  Step s trains on the sources `epoch_plan(lengths, bs, seed, s // per_epoch)[s % per_epoch]`
  with the dropout rng `fold_in(PRNGKey(seed), s)` (`trainer.Trainer`): both are functions of
  the step, so a run resumed from the checkpoint of step c (the whole `TrainState`: params, the
  AdamW moments and the schedule's count, the frozen embedding's `multi_transform` state) ends
  with the params of an uninterrupted run.

  Args:
    config: the model. arrays: tokens / segment_ids [S, K, L], targets / mask [S, K].
    objective: 'bradley_terry' or 'regression' (see the module docstring).
    num_steps: optimizer steps (the cosine schedule decays to 0 there).
    batch_size: sources per batch, rounded up to a multiple of the mesh's `data` axis; each batch
      is cut to the length bucket (32 / 64 / 128 / 256 tokens, at most `config.max_len`) of its
      longest packed row, so the step compiles once per bucket.
    learning_rate, warmup_steps, weight_decay: AdamW (`trainer.make_optimizer`, clip norm 1).
    max_minutes: also stop after this much training time (wall-clock from the first step,
      compilation included), summed over the restarts of a resumed run: each checkpoint
      stores the seconds up to it (`train_seconds` in its metrics); the time of steps after the
      last checkpoint of a killed run is not counted, those steps are trained again.
    seed: init, batch order and dropout seed. mesh: default `partitioning.create_mesh()`.
    params: start from these (unboxed) params instead of a random init (`init_params`).
    train_embedding: False keeps the token embedding fixed (e.g. at its LSI init): the other
      parameters are few, so the model learns rules instead of memorising tokens.
    writer: a `summaries.metric_writer` for the `train/*` scalars (None: none written); flushed
      before every checkpoint.
    checkpointer: where the run's `TrainState` is saved and resumed from (None: nothing saved,
      always from step 0). Its latest checkpoint (`Checkpointer.restore_latest`) is restored
      first; the caller makes sure it is one of this run's settings (`train_reward_model`).
    checkpoint_every: with `checkpointer`, save every this many steps (0 / None: only at the
      end); the end (num_steps or the max_minutes stop) is always saved. A save stores the state,
      `train_seconds` and the last step's `loss` / `pairwise_accuracy` (so a run resumed at its
      end reports the same final figures).

  Returns:
    (the final `trainer.TrainState` (params on the mesh), info: steps, train_seconds (over all
    restarts), final_loss, final_train_pairwise_accuracy, resumed_from (the step restored, 0 for
    a fresh start)).

  Raises:
    ValueError: an unknown objective, or fewer sources than one batch; a checkpoint of another
      model (orbax's shape / structure errors) or none of the checkpoints restores.
    trainer.NonFiniteLossError: a NaN / infinite loss (read every 10 steps) or non-finite params
      (checked before every save); the state of that step is not saved.
  """
  mesh = mesh if mesh is not None else partitioning.create_mesh()
  bs = inference.global_batch(batch_size, mesh)
  num_sources = len(arrays['mask'])
  if num_sources < bs:
    raise ValueError(f'{num_sources} training sources cannot fill one batch of {bs}')
  opt, schedule = trainer_lib.make_optimizer(
      learning_rate=learning_rate, warmup_steps=warmup_steps, schedule='cosine',
      decay_steps=num_steps, weight_decay=weight_decay, b1=0.9, b2=0.98, eps=1e-9, clip_norm=1.0,
      with_schedule=True)
  if not train_embedding:
    label = lambda p: {k: (jax.tree.map(lambda _: 'frozen', v) if k == 'token_embedder' else
                           jax.tree.map(lambda _: 'train', v)) for k, v in p.items()}
    opt = optax.multi_transform({'train': opt, 'frozen': optax.set_to_zero()}, label)
  t = trainer_lib.Trainer(RewardTrainModel(config, objective), opt, mesh, seed=seed)
  state = t.init_state({'tokens': (bs, 1, 8)}, params=params)
  m, start_step, seconds_before = {}, 0, 0.0
  restored = checkpointer.restore_latest(state) if checkpointer is not None else None
  if restored is not None:
    state, start_step = restored, int(jax.device_get(restored.step))
    saved = checkpointer.latest_metrics(start_step)
    seconds_before = float(saved.get('train_seconds', 0.0))
    m = {k: saved[k] for k in ('loss', 'pairwise_accuracy') if k in saved}
    logging.info('%s: resumed from step %d (%.1f min trained)', desc, start_step,
                 seconds_before / 60)
  clock = time.perf_counter()
  elapsed = lambda: seconds_before + time.perf_counter() - clock
  buckets = sorted({b for b in rm_model.LENGTH_BUCKETS if b < config.max_len} | {config.max_len})
  lengths = (arrays['segment_ids'] != 0).sum(-1).max(-1)  # [S] longest packed row per source.
  per_epoch = num_sources // bs
  mine = distributed.host_rows(bs, mesh)
  bar = tqdm(total=num_steps, initial=start_step, desc=desc, unit='step', dynamic_ncols=True,
             mininterval=2.0, disable=jax.process_index() != 0)
  step = start_step
  guard = trainer_lib.LossGuard(desc, checkpointer)

  def log(m):
    if writer:
      writer.write_scalars(step, summaries.train_scalars(
          m, summaries.last_learning_rate(schedule, step), minutes=elapsed() / 60))

  def save(m):
    guard.check(state)  # Pending losses and the params: only a finite state is saved.
    if writer:
      writer.flush()
    m = jax.device_get(m)
    checkpointer.save(state, dict(train_seconds=elapsed(), loss=m['loss'],
                                  pairwise_accuracy=m['pairwise_accuracy']))

  while step < num_steps:
    if max_minutes is not None and elapsed() >= max_minutes * 60:
      break
    plan = epoch_plan(lengths, bs, seed, step // per_epoch)[step % per_epoch]
    n = data_lib.bucket_length(max(int(lengths[plan].max()), 1), buckets)
    rows = plan[mine]  # This host's rows of the global batch.
    batch = {k: v[rows][..., :n] if v.ndim == 3 else v[rows] for k, v in arrays.items()}
    state, m = t.train_step(state, partitioning.shard_batch(batch, mesh))
    step += 1
    guard.add(step, m['loss'])
    if step % 10 == 0 or step == num_steps:
      m = jax.device_get(m)
      guard.check()
      bar.update(step - bar.n)
      bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['pairwise_accuracy']:.3f}")
      log(m)
    if checkpointer is not None and checkpoint_every and step % checkpoint_every == 0:
      save(m)
  bar.close()
  guard.check(state)
  m = jax.device_get(m)
  if step > start_step and step % 10 and step != num_steps:  # Stopped by max_minutes.
    log(m)
  if checkpointer is not None and step > start_step:
    save(m)  # (A no-op if this step was just saved: `Checkpointer.save` skips a saved step.)
  info = dict(steps=step, train_seconds=elapsed(), final_loss=float(m.get('loss', np.nan)),
              final_train_pairwise_accuracy=float(m.get('pairwise_accuracy', np.nan)),
              resumed_from=start_step)
  return state, info


def _correlations(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
  if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
    return {'kendall_tau': float('nan'), 'pearson': float('nan')}
  return {'kendall_tau': float(stats.kendalltau(x, y).statistic),
          'pearson': float(stats.pearsonr(x, y).statistic)}


def evaluate_scores(raw: np.ndarray, cands: Candidates,
                    against: Sequence[str] = ('chrf', 'bleu')) -> dict[str, Any]:
  """Reward-model scores vs metric labels on a set of candidates.

  Args:
    raw: [m] raw scores of `cands`. against: label names of `cands.labels`.

  Returns:
    per label: pairwise_accuracy (all pairs within a source, no comparison groups;
    `model.pairwise_accuracy`), num_pairs,
    kendall_tau and pearson (scipy.stats, pooled over all m candidates; NaN if a side is
    constant); plus num_records and num_sources.
  """
  idx = group_by_source(cands.source_index)
  safe, mask = np.maximum(idx, 0), (idx >= 0)
  out: dict[str, Any] = {'num_records': len(cands), 'num_sources': len(idx)}
  for name in against:
    y = cands.labels[name]
    pairs = int(np.asarray(rm_model.preference_pairs(y[safe], mask)).sum())
    acc = float(rm_model.pairwise_accuracy(raw[safe], y[safe], mask))
    out[name] = dict(pairwise_accuracy=acc, num_pairs=pairs, **_correlations(raw, y))
  return out


def _check_settings(output_dir: str, settings: Mapping[str, Any]) -> dict | None:
  """The summary of a finished run with these settings, None if there is none; raises if the
  output dir holds a run with other settings. `settings` are portable
  (`records.portable_settings`); an older summary's absolute `grow_dir` is compared as the
  portable path it names."""
  path = os.path.join(output_dir, SUMMARY_FILE)
  if not fileio.exists(path):
    return None
  summary = fileio.read_json(path)
  old = records_lib.portable_settings(summary.get('settings', {}),
                                      records_lib.workdir_of(output_dir), ('grow_dir',),
                                      stored=True)
  diff = records_lib.settings_diff(old, json.loads(json.dumps(settings)))
  if diff:
    raise ValueError(f'{output_dir} holds a reward model trained with other settings '
                     f'({"; ".join(diff)}); use another output dir')
  return summary


@gin.configurable(denylist=['output_dir', 'tokenize', 'corpus', 'mesh'])
def train_reward_model(output_dir: str,
                       grow_dir: str = gin.REQUIRED,
                       task: str = 'libreoffice_help_de_en',
                       objective: str = 'bradley_terry+regression',
                       oracle: str = 'chrf',
                       num_steps: int = 2000,
                       batch_size: int = 8,
                       learning_rate: float = 5e-3,
                       warmup_steps: int = 50,
                       weight_decay: float = 1e-4,
                       max_minutes: float | None = None,
                       dev_fraction: float = 0.1,
                       add_negatives: bool = True,
                       degraded_samples: int = 3,
                       max_samples: int | None = 4,
                       seed: int = 0,
                       config: rm_model.RewardModelConfig = rm_model.RewardModelConfig(),
                       embedding_init: str | None = 'lsi',
                       train_embedding: bool = False,
                       eval_batch_size: int = 64,
                       checkpoint_every: int | None = 200,
                       tokenize: Callable[[str], Sequence[int]] | None = None,
                       corpus: tuple[np.ndarray, np.ndarray] | None = None,
                       mesh=None) -> dict[str, Any]:
  """Trains a reward model on a Grow's records labelled by a simulated oracle (module docstring).

  Resuming: the settings are pinned in `output_dir/settings.json` (`records.pin_settings`,
  'record_format' included, which means nothing here) before the first step. A rerun with the
  same settings resumes from the latest checkpoint, keeps the TensorBoard event files (the steps
  between that checkpoint and the kill are logged twice) and ends with the params of an
  uninterrupted run; `train_minutes` in the summary sums the restarts' training time,
  `wall_minutes` is this invocation's. A rerun with other settings is refused (ValueError) and
  leaves the directory as it is, as Grow, scoring and a finished reward model refuse one: our
  choice, since the differing setting is more likely a slip of the configuration than a wish to
  throw the trained steps away (another output dir, or deleting this one, starts over).
  Checkpoints without a `settings.json` (a run of the code before settings were pinned) are of
  unknown settings: deleted, with the event files, and training starts at step 0; so are the
  event files of any run that has no checkpoint to resume. When done, `checkpoints/` holds the
  final step only, as the loaders (`trainer.restore_params`, latest step) expect.

  Args:
    output_dir: where checkpoints/, rm_config.json and rm_summary.json go (`<workdir>/rm`).
    grow_dir: a finished Grow (`rest-jax grow` output).
    task: SeqIO task whose SentencePiece vocabulary tokenizes the negatives (the policy's).
    objective: 'bradley_terry' (pairs within the comparison groups of a source), 'regression'
      (MSE of the raw score to the oracle reward) or 'bradley_terry+regression' (their sum).
    oracle: the metric that labels every candidate vs its reference: 'chrf', 'bleu', 'ter' or a
      mean such as 'chrf+ter' (`metrics.sentence_rewards`).
    num_steps, batch_size (sources per batch), learning_rate, warmup_steps, weight_decay,
      max_minutes: see `fit`.
    dev_fraction: share of sources held out for evaluation and calibration (`is_dev`; at least
      one source).
    add_negatives: add the synthetic `negatives.KINDS` to every source (train and dev), and the
      `negatives.SAMPLE_KINDS` of its first `degraded_samples` policy samples.
    max_samples: train on at most this many policy samples per source (the first by candidate
      index; None: all): fewer candidates per step, more steps in `max_minutes`. Dev uses all.
    seed: init / batch order / dropout and the choice of the 'other_reference' negative.
    config: the `RewardModelConfig` (gin: `RM_CONFIG`).
    embedding_init: 'lsi': the token embedding starts from `lsi_embedding` of the task's train
      split (pairs of the dev sources left out), else (None) random N(0, 1).
    train_embedding: also train the token embedding (False: it stays at its init; with the LSI
      init this generalised better from ~1.3k training sources than fine-tuning it).
    eval_batch_size: rows per forward pass when scoring the dev records.
    checkpoint_every: save the `TrainState` to `output_dir/checkpoints` every this many steps
      (0 / None: only at the end), so that a killed run resumes there (`fit`). Not a setting (not
      pinned, not in the summary): where a run saves does not change its result. Our default, 200
      steps: a kill loses at most 199 steps (the main job's 1,200 steps save 6 times).
    tokenize: text -> ids without EOS (default: the task's vocabulary; tests pass their own).
    corpus: (sources, targets) [n, length] int ids for the LSI instead of the task's train split.
    mesh: training mesh (default `partitioning.create_mesh()`).

  Returns:
    The summary, also `output_dir/rm_summary.json`.

  Raises:
    ValueError: `output_dir` holds a reward model trained (or being trained) with other
      settings; an unknown oracle or objective; too few training sources for one batch.
    FileNotFoundError: `grow_dir` is no finished Grow.
  """
  metrics_lib.components(oracle)  # Raises on an unknown oracle.
  if objective not in OBJECTIVES:
    raise ValueError(f'unknown objective {objective!r}: use one of {OBJECTIVES}')
  if embedding_init not in ('lsi', None):
    raise ValueError(f"unknown embedding_init {embedding_init!r}: use 'lsi' or None")
  grow_manifest = records_lib.read_manifest(grow_dir, records_lib.GROW)
  given = dict(grow_dir=grow_dir, grow_settings_hash=grow_manifest.get(
      'settings_hash'), task=task, objective=objective, oracle=oracle, num_steps=num_steps,
                  batch_size=batch_size, learning_rate=learning_rate, warmup_steps=warmup_steps,
                  weight_decay=weight_decay, max_minutes=max_minutes, dev_fraction=dev_fraction,
                  add_negatives=add_negatives, degraded_samples=degraded_samples,
                  max_samples=max_samples, seed=seed, config=config.to_json(),
                  embedding_init=embedding_init, train_embedding=train_embedding)
  settings = records_lib.portable_settings(given, records_lib.workdir_of(output_dir),
                                           ('grow_dir',))
  done = _check_settings(output_dir, settings)
  if done is not None:
    logging.info('train_rm: %s is complete', output_dir)
    return done
  start = time.perf_counter()
  fileio.makedirs(output_dir)
  first = not fileio.exists(os.path.join(output_dir, records_lib.SETTINGS_FILE))
  records_lib.pin_settings(output_dir, given, what='a reward model', path_keys=('grow_dir',),
                           write=jax.process_index() == 0)  # Raises for other settings.
  if first:  # Checkpoints of unknown settings (written before they were pinned).
    fileio.rmtree(os.path.join(output_dir, 'checkpoints'))
  ckpt = trainer_lib.Checkpointer(output_dir, keep=2)
  if ckpt.latest.latest_step() is None:  # A killed run's curves: this run starts at step 0.
    for name in fileio.listdir(output_dir):
      if name.startswith('events.out.tfevents.'):
        fileio.remove(os.path.join(output_dir, name))
  if tokenize is None:
    tokenize = rm_model.text_tokenizer(task)

  records = grow_lib.read_grow_records(grow_dir)
  label_names = sorted({oracle, 'bleu', 'chrf'})
  cands = build_candidates(records, add_negatives=add_negatives, tokenize=tokenize, seed=seed,
                           metrics=label_names, degraded_samples=degraded_samples)
  sources = np.unique(cands.source_index)
  dev_sources = {int(i) for i in sources if is_dev(i, dev_fraction)}
  if not dev_sources and dev_fraction > 0:  # Tiny Grows: hold out at least one source.
    dev_sources = {int(min(sources, key=lambda i: hashlib.sha256(str(int(i)).encode()).digest()))}
  dev_rows = np.isin(cands.source_index, list(dev_sources))
  train, dev = cands.select(~dev_rows), cands.select(dev_rows)
  if max_samples is not None:
    train = train.select(sample_rank(train) < max_samples)
  logging.info('train_rm: %d train / %d dev sources, %d / %d candidates (oracle %s)',
               len(sources) - len(dev_sources), len(dev_sources), len(train), len(dev), oracle)

  embedding = None
  if embedding_init == 'lsi':
    if corpus is None:
      from rest_jax import input_pipeline
      cache = fileio.local_cache_dir(fileio.parent(output_dir))
      td = input_pipeline.cached_task_data(task, 'train', 128, 128, cache)
      corpus = (td.arrays['encoder_input_tokens'], td.arrays['decoder_target_tokens'])
    dev_src = {tuple(ids) for ids, keep in zip(dev.source_ids, dev.kind) if keep == 'reference'}
    keep = np.array([tuple(data_lib.trim(row)) not in dev_src for row in corpus[0]])
    embedding = lsi_embedding(corpus[0][keep], corpus[1][keep], config.vocab_size,
                              config.emb_dim)
    logging.info('train_rm: LSI embedding from %d pairs (%d of dev sources left out)',
                 int(keep.sum()), int((~keep).sum()))

  mesh = mesh if mesh is not None else partitioning.create_mesh()
  arrays = pack_by_source(train, train.labels[oracle], config.max_len)
  writer = summaries.metric_writer(output_dir)
  state, info = fit(config, arrays, objective=objective, num_steps=num_steps,
                    batch_size=batch_size, learning_rate=learning_rate,
                    warmup_steps=warmup_steps, weight_decay=weight_decay,
                    max_minutes=max_minutes, seed=seed, mesh=mesh,
                    params=init_params(config, seed, embedding), train_embedding=train_embedding,
                    writer=writer, checkpointer=ckpt, checkpoint_every=checkpoint_every)
  ckpt.save(state)  # Saved by `fit` already unless it ran no step (e.g. max_minutes=0).
  for step in ckpt.latest.all_steps():  # The final state only (the loaders read the latest).
    if step != info['steps']:
      ckpt.latest.delete(step)

  scorer = rm_model.RewardScorer(config, state.params, None, task=task, mesh=mesh)
  raw = scorer.raw_scores(dev.source_ids, dev.candidate_ids, eval_batch_size)
  grow_rows = np.isin(dev.kind, GROW_KINDS)
  if grow_rows.any():
    low, high = np.quantile(raw[grow_rows], [0.01, 0.99])
  else:
    low, high = float(raw.min()), float(raw.max())
  calibration = dict(method='quantile', quantiles=[0.01, 0.99], low=float(low), high=float(high),
                     num_records=int(grow_rows.sum()))
  against = [oracle] + [n for n in label_names if n != oracle]
  dev_metrics = {'grow_records': evaluate_scores(raw[grow_rows], dev.select(grow_rows), against)}
  if add_negatives:
    dev_metrics['with_negatives'] = evaluate_scores(raw, dev, against)
  by_kind = {}
  for kind in sorted(set(dev.kind)):
    sel = np.asarray(dev.kind) == kind
    by_kind[kind] = dict(mean_reward=float(rm_model.calibrate(raw[sel], calibration).mean()),
                         mean_oracle=float(dev.labels[oracle][sel].mean()), count=int(sel.sum()))
  dev_metrics['by_kind'] = by_kind
  if writer:
    scalars = {}
    for part, prefix in (('grow_records', 'dev/'), ('with_negatives', 'dev/with_negatives/')):
      for k, v in dev_metrics.get(part, {}).get(oracle, {}).items():
        if k != 'num_pairs':
          scalars[prefix + k] = v
    writer.write_scalars(info['steps'], scalars)
    writer.close()

  fileio.write_json(os.path.join(output_dir, rm_model.CONFIG_FILE), dict(
      config=config.to_json(), calibration=calibration, task=task, oracle=oracle,
      objective=objective, step=info['steps'], grow_dir=settings['grow_dir']))
  count = lambda c: {k: int(np.sum(np.asarray(c.kind) == k)) for k in sorted(set(c.kind))}
  summary = dict(
      settings=settings, oracle_note=(
          f'SIMULATED preference oracle: candidates are labelled by sentence {oracle} against '
          'the reference; no human ratings'),
      dev=dev_metrics, calibration=calibration, steps=info['steps'],
      train_minutes=info['train_seconds'] / 60, wall_minutes=(time.perf_counter() - start) / 60,
      final_loss=info['final_loss'],
      final_train_pairwise_accuracy=info['final_train_pairwise_accuracy'],
      counts=dict(train_sources=len(sources) - len(dev_sources), dev_sources=len(dev_sources),
                  train_candidates=count(train), dev_candidates=count(dev),
                  grow_records=len(records)))
  fileio.write_json(os.path.join(output_dir, SUMMARY_FILE), summary)
  g = dev_metrics['grow_records']
  logging.info('train_rm: %d steps in %.1f min; dev pairwise accuracy vs %s %.3f, Kendall tau '
               '%.3f, Pearson %.3f', info['steps'], info['train_seconds'] / 60, oracle,
               g[oracle]['pairwise_accuracy'], g[oracle]['kendall_tau'], g[oracle]['pearson'])
  return summary
