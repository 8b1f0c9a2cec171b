"""`rest-jax rest`: the ReST loop (Gulcehre et al. 2023, arXiv 2308.08998, Algorithm 1).

    BC policy -> for g = 1..G: Grow_g -> score_g -> Improve_{g,0..I-1}  -> evaluation, report

All stages live in one work directory, each in its own folder with a completion marker
(`stage.json`: the stage's result and timing) and its gin config:

    bc/                 the starting policy (trained here, or imported from a shipped checkpoint)
    grow_<g>/           Grow g (`rest_jax.grow`): samples of the current policy, chunked TFRecords
    rm/                 the learned reward model, trained once on grow_1 (`rewards.train_rm`);
                        absent with a metric reward (`rest.reward='chrf+ter'`)
    scored_<g>/         grow_<g> scored by the reward (`rewards.scoring`)
    eval/<stage>/       the stage's dev / test metrics and greedy translations (jsonl)
    improve_<g>_<i>/    Improve step i of Grow g at threshold tau_i (`rest_jax.improve`)
    report.json, report.md, plots/

A killed loop resumes at the stage where it stopped (Grow, scoring and Improve also resume inside
the stage, from their chunks and checkpoints). Stage names in the report follow the paper's Table
1: `bc`, `G1I0` (Grow 1, Improve step 0 at tau_0 = 0.0: all records), `G1I2`, `G2I0`, ...; each
Grow runs I = `rest.improve_steps_per_grow` Improve steps, indexed 0..I-1.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Sequence

import gin
import numpy as np
from tqdm import tqdm

from rest_jax import fileio
from rest_jax import data as data_lib
from rest_jax import evaluation, filtering, grow as grow_lib, improve as improve_lib
from rest_jax import input_pipeline, partitioning, records as records_lib, report as report_lib
from rest_jax import trainer as trainer_lib
from rest_jax.rewards import metrics as metrics_lib

STAGE_FILE = 'stage.json'


def stage_output_problem(stage_dir: str) -> str | None:
  """What is wrong with a finished stage's outputs, or None if they verify.

  Checked: chunked records (every chunk against its marker: `records.verify_output`) and
  training runs (a `best/` or `checkpoints/` step to restore). Evaluation files are not checked
  (a stage that only evaluates keeps its figures in `stage.json` itself).
  """
  kinds = [k for k in (records_lib.GROW, records_lib.SCORED)
           if fileio.glob(stage_dir, f'{k.prefix}-*.done') or
           fileio.glob(stage_dir, f'{k.prefix}-*.tfrecord')]
  if fileio.exists(os.path.join(stage_dir, records_lib.MANIFEST_FILE)) and not kinds:
    return f'{stage_dir} has a manifest but no chunk files or markers'
  for kind in kinds:
    try:
      records_lib.verify_output(stage_dir, kind)
    except (FileNotFoundError, ValueError) as e:
      return str(e)
  for sub in ('best', 'checkpoints'):
    d = os.path.join(stage_dir, sub)
    if fileio.isdir(d):
      if not any(n.isdigit() for n in fileio.listdir(d)):
        return f'{d} holds no checkpoint'
      break
  return None


def _stage_done(stage_dir: str) -> dict | None:
  """The stage's `stage.json`, if it is there and the stage's outputs verify; else None.

  Raises:
    ValueError: `stage.json` is there but the outputs do not verify (names the problem and the
      way back: `--repair`, which reruns the stage; Grow and scoring then redo only the bad
      chunks).
  """
  path = os.path.join(stage_dir, STAGE_FILE)
  if not fileio.exists(path):
    return None
  problem = stage_output_problem(stage_dir)
  if problem is None:
    return fileio.read_json(path)
  if records_lib.repair_enabled():
    logging.warning('repair: stage %s is marked done but %s; rerunning it', stage_dir, problem)
    fileio.remove(path)
    return None
  raise ValueError(f'stage {stage_dir} is marked done but its outputs do not verify: {problem} '
                   '(rerun with --repair to redo what is missing)')


def _mark_done(stage_dir: str, result: dict) -> dict:
  fileio.makedirs(stage_dir)
  fileio.write_text(os.path.join(stage_dir, 'config.gin'), gin.config_str())
  fileio.write_json(os.path.join(stage_dir, STAGE_FILE), result)
  return result


def _run_stage(stage_dir: str, fn, *args, recheck: bool = False, **kwargs) -> dict:
  """Runs `fn` unless `stage_dir` is marked done; records its wall time in minutes.

  recheck: for stages that pin their settings (Grow, scoring, reward-model training), call `fn`
    even when the stage is done: it returns at once for the same settings and raises ValueError
    listing the differences for a work directory made by another configuration.
  """
  done = _stage_done(stage_dir)
  if done is not None:
    if recheck:
      fn(*args, **kwargs)
    logging.info('rest: %s already done (%.1f min)', stage_dir, done.get('minutes', 0.0))
    return done
  start = time.perf_counter()
  result = fn(*args, **kwargs) or {}
  result = dict(result, minutes=(time.perf_counter() - start) / 60)
  tqdm.write(f'[rest] {os.path.basename(stage_dir)} done in {result["minutes"]:.1f} min')
  return _mark_done(stage_dir, result)


def improve_step_count(improve_steps_per_grow: int | None, num_improve_steps: int | None,
                       default: int = 3) -> int:
  """How many Improve steps each Grow runs (steps 0..n-1), from the new name or the old one.

  `num_improve_steps` is the old name (gin files before the rename), which meant the *last step
  index* (so `num_improve_steps = 3` ran four steps, 0..3); it is still read, as
  `num_improve_steps + 1` steps. None for both: `default`.

  Raises:
    ValueError: both given and they disagree; fewer than 1 step.
  """
  old = None if num_improve_steps is None else num_improve_steps + 1
  if old is not None:
    logging.warning('num_improve_steps (the last Improve step index) is deprecated: use '
                    'improve_steps_per_grow = %d (the number of steps)', old)
    if improve_steps_per_grow is not None and improve_steps_per_grow != old:
      raise ValueError(f'improve_steps_per_grow={improve_steps_per_grow} and the old '
                       f'num_improve_steps={num_improve_steps} (= {old} steps) disagree')
  n = improve_steps_per_grow if improve_steps_per_grow is not None else old
  n = default if n is None else n
  if n < 1:
    raise ValueError(f'improve_steps_per_grow must be >= 1, got {n}')
  return n


def _policy_params(model, policy_dir: str, mesh):
  return trainer_lib.restore_params(policy_dir, trainer_lib.abstract_params(model, mesh))


def import_policy(model_dir: str, model, params_file: str) -> dict:
  """Makes `model_dir` a BC run whose best checkpoint holds the params of `params_file` (.npz)."""
  params_file = fileio.repo_path(params_file)
  params = fileio.load_params_npz(
      params_file, trainer_lib.abstract_params(model, partitioning.create_mesh()))
  ckpt = trainer_lib.Checkpointer(model_dir, best_metric='imported')
  ckpt.save_best(trainer_lib.TrainState(step=np.int32(0), params=params, opt_state=None),
                 {'imported': 1.0})
  vocab = os.path.join(input_pipeline.policy_dir_of(params_file), input_pipeline.VOCAB_FILE)
  if fileio.exists(vocab):  # The imported policy keeps its vocabulary's record.
    fileio.write_json(os.path.join(model_dir, input_pipeline.VOCAB_FILE), fileio.read_json(vocab))
  return {'imported_from': fileio.abspath(params_file)}


def _sources(data: input_pipeline.TaskData) -> list[list[int]]:
  enc = data.arrays['encoder_input_tokens']
  return [[int(t) for t in row[:n]] for row, n in zip(enc, data_lib.lengths(enc))]


TRANSLATION_FIELDS = ('key', 'source', 'reference', 'translation', 'reward', 'oracle')


def write_translations(path: str, data: input_pipeline.TaskData, translations: Sequence[str],
                       rewards: np.ndarray, oracle: np.ndarray) -> None:
  """One JSON line per pair: provenance key, source, reference, greedy translation, its reward in
  [0, 1] (the loop's reward: the learned RM's normalised score, or the metric) and its oracle
  reward in [0, 1] (`evaluate_policy.oracle` against the reference). Written to a temporary file
  and renamed (no partial file)."""
  rows = []
  for row in zip(data.keys, data.inputs, data.targets, translations, rewards, oracle):
    rows.append(dict(zip(TRANSLATION_FIELDS, row[:4] + tuple(round(float(v), 6)
                                                              for v in row[4:]))))
  fileio.write_jsonl(path, rows)


def rank_agreement(reward: np.ndarray, oracle: np.ndarray) -> float:
  """Kendall's tau-b (scipy.stats) between per-sentence rewards and oracle rewards, both
  `[num_sentences]` float; NaN with fewer than two sentences or a constant side. Measured on a
  stage's own translations it shows whether the reward still ranks that policy's outputs as the
  oracle does: a falling value while the reward rises is the reward model being exploited."""
  from scipy import stats
  reward, oracle = np.asarray(reward, np.float64), np.asarray(oracle, np.float64)
  if len(reward) < 2 or np.ptp(reward) == 0 or np.ptp(oracle) == 0:
    return float('nan')
  return float(stats.kendalltau(reward, oracle).statistic)


@gin.configurable(denylist=['model', 'policy_dir', 'scorer', 'dev', 'test', 'detokenize',
                            'out_dir', 'params'])
def evaluate_policy(model, policy_dir: str | None, scorer, dev, test, detokenize,
                    max_decode_len: int = 128, batch_size: int = 64,
                    oracle: str = 'chrf+ter',
                    out_dir: str | None = None, params=None) -> dict[str, Any]:
  """Greedy translations of dev and test: mean RM reward (0-100), sacreBLEU (+ signature), chrF,
  BLEU's brevity penalty and length ratio (`evaluation.corpus_metrics`), and `<split>_oracle`:
  the mean sentence reward (0-100) of the metric `oracle` against the references
  (`rewards.metrics`; 'chrf+ter' is the simulated preference the default reward model learns to
  imitate, so a learned reward that rises while the oracle falls is being exploited), and
  `<split>_rm_oracle_kendall`: `rank_agreement` of the per-sentence rewards and oracle rewards.

  `dev` may be None (an Improve step already measured its best policy on the same dev pairs).
  With `out_dir`, each split's translations are written to `out_dir/<split>_translations.jsonl`
  (`TRANSLATION_FIELDS`, one line per pair, in split order) for inspection and diffing between
  stages. `params`: evaluate these (unboxed) policy params instead of restoring `policy_dir`
  (the online loop evaluates its policy in memory).
  """
  if params is None:
    params = _policy_params(model, policy_dir, partitioning.create_mesh())
  out = {}
  for split, data in (('dev', dev), ('test', test)):
    if data is None:
      continue
    ids = evaluation.predict_ids(model, params, data.arrays['encoder_input_tokens'],
                                 batch_size=batch_size, max_decode_len=max_decode_len)
    reward = scorer.score_ids(_sources(data), ids, references=data.targets)
    hyps = [detokenize(i) for i in ids]
    m = evaluation.corpus_metrics(hyps, data.targets)
    oracle_reward = np.asarray(metrics_lib.sentence_rewards(hyps, data.targets, (oracle,))[oracle])
    if out_dir:
      write_translations(os.path.join(out_dir, f'{split}_translations.jsonl'), data, hyps, reward,
                         oracle_reward)
    out[f'{split}_reward'] = 100.0 * float(np.mean(reward))
    out[f'{split}_oracle'] = 100.0 * float(np.mean(oracle_reward))
    out[f'{split}_rm_oracle_kendall'] = rank_agreement(reward, oracle_reward)
    out[f'{split}_bleu'] = m['bleu']
    out[f'{split}_chrf'] = m['chrf']
    out[f'{split}_bleu_bp'] = m['bleu_bp']
    out[f'{split}_length_ratio'] = m['length_ratio']
    out['bleu_signature'] = m['bleu_signature']
    out['chrf_signature'] = m['chrf_signature']
    out[f'{split}_sentences'] = m['num_sentences']
  return out


@gin.configurable(denylist=['model', 'policy_dir', 'scorer', 'test', 'detokenize'])
def best_of_n(model, policy_dir: str, scorer, test, detokenize,
              ns: Sequence[int] = (1, 4, 16, 64), temperature: float = 0.8,
              seed: int = 0, batch_size: int = 16, max_decode_len: int = 128) -> dict[str, Any]:
  """Best-of-N reranking by the reward model (ReST sec. 5): for each N, the RM's favourite of N
  samples per test source. The N-candidate sets are nested (the first N of max(ns) samples).

  Returns:
    {'n': [...], 'reward': [mean RM reward of the picked candidate, 0-100], 'bleu': [corpus
    sacreBLEU of the picked candidates], 'chrf': [...], 'sources': int}.
  """
  mesh = partitioning.create_mesh()
  params = _policy_params(model, policy_dir, mesh)
  n_max = max(ns)
  enc = test.arrays['encoder_input_tokens']
  samples = grow_lib.sample_candidates(model, params, enc, np.arange(len(enc)), seed=seed,
                                       num_decodes=n_max, temperature=temperature,
                                       max_decode_len=max_decode_len, mesh=mesh,
                                       batch_size=batch_size)
  src = _sources(test)
  cands = [[[int(t) for t in samples['tokens'][b, j, :samples['lengths'][b, j]]]
            for j in range(n_max)] for b in range(len(enc))]
  flat = [c for row in cands for c in row]
  rewards = scorer.score_ids([s for s in src for _ in range(n_max)], flat,
                            references=[t for t in test.targets for _ in range(n_max)]
                            ).reshape(len(enc), n_max)
  out = {'n': list(ns), 'reward': [], 'bleu': [], 'chrf': [], 'sources': len(enc),
         'temperature': temperature}
  for n in ns:
    pick = np.argmax(rewards[:, :n], axis=1)
    m = evaluation.corpus_metrics([detokenize(cands[b][pick[b]]) for b in range(len(enc))],
                                  test.targets)
    out['reward'].append(100.0 * float(rewards[np.arange(len(enc)), pick].mean()))
    out['bleu'].append(m['bleu'])
    out['chrf'].append(m['chrf'])
  return out


@gin.configurable(denylist=['workdir'])
def rest(workdir: str,
         model=gin.REQUIRED,
         task: str = 'libreoffice_help_de_en',
         bc_params_file: str | None = None,
         bc_policy_dir: str | None = None,
         num_grow_steps: int = 2,
         improve_steps_per_grow: int | None = None,
         num_improve_steps: int | None = None,
         reward: str = 'rm',
         rm_dir: str | None = None,
         retrain_rm: bool = False,
         dev_examples: int = 200,
         test_examples: int | None = 500,
         best_of_n_examples: int = 100,
         best_of_n_stages: Sequence[str] = ('bc', 'last'),
         inputs_length: int = 128,
         targets_length: int = 128,
         alarm_bleu_drop: float | None = 1.0,
         alarm_oracle_drop: float | None = 1.0) -> dict[str, Any]:
  """The whole ReST loop in `workdir`; returns the report (also `report.json` / `report.md`).

  Args:
    workdir: the run's folder (stages, report). Rerunning resumes a killed loop.
    model: the policy's `EncoderDecoderModel` (gin: `MODEL`).
    task: SeqIO task (train sources for Grow; dev and test splits for evaluation).
    bc_params_file: start from this shipped policy (`fileio.save_params_npz` file) ...
    bc_policy_dir: ... or from this `rest-jax train` run; with neither, `bc/` is trained here by
      `train.train` (its gin bindings: `train.max_minutes`, ...).
    num_grow_steps: G. improve_steps_per_grow: I, the number of Improve steps of each Grow
      (None: 3): steps 0..I-1 use the thresholds tau_0..tau_{I-1} of
      `filtering.threshold_schedule` (tau_0 = 0.0).
    num_improve_steps: the old name, deprecated: the last step index, i.e. I - 1
      (`improve_step_count`); still read so that older gin files run what they ran.
    reward: 'rm' (the learned reward model, trained on grow_1) or a reference-based metric
      ('chrf+ter', 'bleu', ...; `rewards.metrics.MetricScorer`): the reward that scores Grow,
      selects Improve checkpoints on dev, reranks best-of-N and is reported. With a metric no
      reward model is trained.
    rm_dir: a finished reward model (a `rest-jax train_rm` output dir, or an exported one,
      `rewards.model.export_reward_model`; a relative path not found here is looked up in the
      repository) to use instead of training one on grow_1, e.g. the shipped
      'checkpoints/rm_small_libreoffice_de_en' (trained once on a larger Grow).
    retrain_rm: train a new reward model on every Grow (default: once, on grow_1).
    dev_examples, test_examples: first pairs of the dev / test split used for stage evaluation
      (None: all); Improve's early stopping uses the same dev pairs.
    best_of_n_examples: test sources for best-of-N reranking, on the stages `best_of_n_stages`
      ('bc', 'last' or stage names).
    alarm_bleu_drop: the reward-hacking alarm fires when a stage's test RM reward rises over the
      previous stage's (or BC's) while its test BLEU falls by more than this many points ...
    alarm_oracle_drop: ... or while its test oracle (mean sentence chrF+TER vs the reference,
      0-100) falls by more than this many points (`report.reward_hacking_alarms`; None: off).

  Raises:
    ValueError: `rm_dir` with `retrain_rm` or with a metric `reward`; fewer thresholds than
      `improve_steps_per_grow`; the two names of it given and disagreeing.
  """
  from rest_jax import train as train_lib
  from rest_jax.rewards import model as rm_model, scoring, train_rm
  schedule = filtering.threshold_schedule()
  taus, mode = [t.tau for t in schedule], schedule[0].mode
  improve_steps = improve_step_count(improve_steps_per_grow, num_improve_steps)
  if improve_steps > len(taus):
    raise ValueError(f'improve_steps_per_grow={improve_steps} needs {improve_steps} thresholds, '
                     f'the schedule has {len(taus)}: {taus}')
  start = time.perf_counter()
  fileio.makedirs(workdir)
  cache = fileio.local_cache_dir(workdir)
  input_pipeline.check_vocab_size(task, model.config.vocab_size)
  detok = input_pipeline.detokenizer(task)
  metric_scorer = None if reward == 'rm' else metrics_lib.MetricScorer(reward, detok)
  dev = input_pipeline.cached_task_data(task, 'validation', inputs_length, targets_length, cache,
                                        max_examples=dev_examples)
  test = input_pipeline.cached_task_data(task, 'test', inputs_length, targets_length, cache,
                                         max_examples=test_examples)
  loss_name = gin.query_parameter('improve.loss') if is_bound('improve.loss') else 'bc'
  if rm_dir and (retrain_rm or reward != 'rm'):
    raise ValueError(f'rest.rm_dir={rm_dir!r} is a reward model to use as it is: it needs '
                     f"reward='rm' (not {reward!r}) and retrain_rm=False")
  given_rm_dir = fileio.abspath(fileio.repo_path(rm_dir)) if rm_dir else None

  # -- BC ------------------------------------------------------------------------------------------
  bc_dir = os.path.join(workdir, 'bc')
  if bc_params_file:
    bc = _run_stage(bc_dir, import_policy, bc_dir, model, bc_params_file)
  elif bc_policy_dir:
    bc_dir = bc_policy_dir
    bc = {'policy_dir': fileio.abspath(bc_policy_dir), 'minutes': 0.0}
  else:
    bc = _run_stage(bc_dir, lambda: {'train': train_lib.train(bc_dir)})
  stages = [dict(name='bc', dir=bc_dir, grow=0, improve=None, tau=None, loss='nll',
                 num_train_records=None, stage_minutes=bc['minutes'])]

  # -- Grow / score / Improve, each stage evaluated as soon as it is done -------------------------
  policy_dir, rm_dir, scorer = bc_dir, given_rm_dir or os.path.join(workdir, 'rm'), None
  grows = []

  def evaluate_stage(st, dev_metrics=None):
    """Test (and, unless an Improve step measured it already, dev) metrics of a stage's policy."""
    ev_dir = os.path.join(workdir, 'eval', st['name'])
    ev = _run_stage(ev_dir, evaluate_policy, model, st['dir'], scorer,
                    None if dev_metrics else dev, test, detok, out_dir=ev_dir)
    if dev_metrics:
      ev.update({f'dev_{k}': dev_metrics[k] for k in ('reward', 'bleu', 'chrf')})
    st.update({k: v for k, v in ev.items() if k != 'minutes'})
    st['eval_minutes'] = ev['minutes']
    st['minutes'] = st['stage_minutes'] + ev['minutes']

  for g in range(1, num_grow_steps + 1):
    grow_dir = os.path.join(workdir, f'grow_{g}')
    gr = _run_stage(grow_dir, lambda: {'manifest': grow_lib.grow(
        grow_dir, model=model, policy_dir=policy_dir, task=task, grow_step=g)}, recheck=True)
    if metric_scorer is not None:
      rm_dir, scorer = None, metric_scorer
    elif given_rm_dir and g == 1:
      scorer = rm_model.load_reward_model(rm_dir)
    elif g == 1 or retrain_rm:
      rm_dir = os.path.join(workdir, 'rm' if g == 1 else f'rm_{g}')
      _run_stage(rm_dir, lambda: {'summary': train_rm.train_reward_model(
          rm_dir, grow_dir=grow_dir, task=task)}, recheck=True)
      scorer = rm_model.load_reward_model(rm_dir)
    if g == 1:
      evaluate_stage(stages[0])
    scored_dir = os.path.join(workdir, f'scored_{g}')
    sc = _run_stage(scored_dir, lambda: {'manifest': scoring.score(
        scored_dir, grow_dir=grow_dir, rm_dir=rm_dir, task=task, reward=reward)}, recheck=True)
    grows.append(dict(grow=g, dir=grow_dir, scored_dir=scored_dir, policy_dir=policy_dir,
                      rm_dir=rm_dir, grow_minutes=gr['minutes'], score_minutes=sc['minutes'],
                      counts=gr['manifest']['counts']))
    records = None
    for i in range(improve_steps):
      step_dir = os.path.join(workdir, f'improve_{g}_{i}')
      if _stage_done(step_dir) is None and records is None:
        records = scoring.read_scored_records(scored_dir)
      prev, prev_dev = policy_dir, {k: stages[-1][f'dev_{k}'] for k in ('reward', 'bleu', 'chrf')}
      imp = _run_stage(step_dir, lambda: {'summary': improve_lib.improve(
          step_dir, model=model, scored_dir=scored_dir, init_policy_dir=prev, rm_dir=rm_dir,
          prior_policy_dir=bc_dir, task=task, tau=taus[i], threshold_mode=mode,
          dev_examples=dev_examples, records=records, scorer=scorer, initial_dev=prev_dev)})
      s = imp['summary']
      diff = [f'{k} {s.get(k)!r} -> {v!r}' for k, v in
              (('loss', loss_name), ('tau', taus[i]), ('threshold_mode', mode))
              if s.get(k) != v]
      if diff:
        raise ValueError(f'{step_dir} holds an Improve step made by another configuration '
                         f'({"; ".join(diff)}); use another --workdir')
      st = dict(name=f'G{g}I{i}', dir=step_dir, grow=g, improve=i, tau=taus[i], loss=s['loss'],
                num_train_records=s['filter']['kept_records'],
                train_references=s['filter'].get('kept_references'),
                distinct_sources=s['filter']['distinct_sources'], stage_minutes=imp['minutes'],
                best_step=s['best_step'], steps=s['steps'])
      best = max(s['history'], key=lambda e: e['reward'])
      evaluate_stage(st, dev_metrics=best)
      stages.append(st)
      policy_dir = step_dir

  bon = {}
  test_bon = test.subset(min(best_of_n_examples, len(test)))
  for name in best_of_n_stages:
    st = stages[-1] if name == 'last' else next(s for s in stages if s['name'] == name)
    bon_dir = os.path.join(workdir, f'best_of_n_{st["name"]}')
    bon[st['name']] = _run_stage(bon_dir, best_of_n, model, st['dir'], scorer, test_bon, detok)

  report = report_lib.build_report(stages, grows, bon, alarm_bleu_drop=alarm_bleu_drop,
                                   alarm_oracle_drop=alarm_oracle_drop,
                                   taus=taus, mode=mode, loss=loss_name, reward=reward,
                                   total_minutes=(time.perf_counter() - start) / 60)
  report_lib.write_report(workdir, report)
  return report


def is_bound(name: str) -> bool:
  """Whether the gin config binds `name` (a `fn.param` or a `%MACRO`)."""
  try:
    gin.query_parameter(name)
    return True
  except ValueError:
    return False


def _same_improve(loop_dir: str, loss: str, tau: float, mode: str, init_policy_dir: str) -> bool:
  """Whether the loop's finished Improve step in `loop_dir` is the run compare_losses would do."""
  done = _stage_done(loop_dir)
  if done is None:
    return False
  s = done['summary']
  recorded = fileio.relocate(s.get('init_policy_dir'), s.get('model_dir'), loop_dir)
  return (s.get('loss') == loss and s.get('tau') == tau and s.get('threshold_mode') == mode and
          recorded is not None and fileio.abspath(recorded) == fileio.abspath(init_policy_dir))


@gin.configurable(denylist=['workdir'])
def compare_losses(workdir: str,
                   model=gin.REQUIRED,
                   losses: Sequence[str] = ('bc', 'gold', 'bvmpo', 'oac'),
                   reference_control: bool = True,
                   grow_step: int = 1,
                   improve_steps_per_grow: int | None = None,
                   num_improve_steps: int | None = None,
                   task: str = 'libreoffice_help_de_en',
                   dev_examples: int = 200,
                   test_examples: int | None = 500,
                   inputs_length: int = 128,
                   targets_length: int = 128) -> dict[str, Any]:
  """The offline-RL losses compared on the same scored Grow data (ReST sec. 5, Table 1's losses).

  Reads a finished loop in `workdir` (its `bc/` or the policy that grew `grow_<grow_step>`, `rm/`,
  `scored_<grow_step>/`) and, for every loss, runs Improve steps 0..I-1 (I =
  `improve_steps_per_grow`, None: 3; `num_improve_steps`, the old name, is I - 1) from that
  Grow's policy into `workdir/losses/<loss>/improve_<g>_<i>/`, then evaluates the last one on
  test (`workdir/losses/<loss>/eval/`). An Improve step the loop itself already ran with the same
  loss, threshold and starting policy (the loop's own loss) is reused from
  `workdir/improve_<g>_<i>/`, not run again. Resumable like the loop. Writes
  `workdir/losses.json` and `workdir/losses.md`.

  `reference_control` adds the row `bc_references` (in `workdir/losses/bc_references/`): the same
  Improve steps with the `bc` loss on the kept *references only* (`improve.origins`), i.e.
  continued supervised training on the original pairs that pass the same thresholds. The gap
  between `bc` and this row is what the policy's own Grow samples add.
  """
  from rest_jax.rewards import model as rm_model, scoring
  cache = fileio.local_cache_dir(workdir)
  detok = input_pipeline.detokenizer(task)
  dev = input_pipeline.cached_task_data(task, 'validation', inputs_length, targets_length, cache,
                                        max_examples=dev_examples)
  test = input_pipeline.cached_task_data(task, 'test', inputs_length, targets_length, cache,
                                         max_examples=test_examples)
  start_policy = records_lib.read_settings(os.path.join(workdir, f'grow_{grow_step}'),
                                      ('policy_dir',))['policy_dir']
  scored_dir = os.path.join(workdir, f'scored_{grow_step}')
  bc_dir = os.path.join(workdir, 'bc')
  scored = records_lib.read_settings(scored_dir, ('rm_dir', 'grow_dir'))
  reward = scored['reward']  # The loop's reward: 'rm' or a metric, and its reward model.
  rm_dir = scored.get('rm_dir')  # (<workdir>/rm when that path is gone: a moved work directory)
  rm_dir = rm_dir if rm_dir and fileio.isdir(rm_dir) else os.path.join(workdir, 'rm')
  if reward == 'rm':
    scorer = rm_model.load_reward_model(rm_dir)
  else:
    scorer, rm_dir = metrics_lib.MetricScorer(reward, detok), None
  schedule = filtering.threshold_schedule()
  taus, mode = [t.tau for t in schedule], schedule[0].mode
  improve_steps = improve_step_count(improve_steps_per_grow, num_improve_steps)
  last = improve_steps - 1
  start_dir = os.path.join(workdir, 'losses', 'start_eval')
  start = _run_stage(start_dir, evaluate_policy, model, start_policy, scorer, dev, test, detok,
                     out_dir=start_dir)
  records = None
  rows = []
  runs = [(loss, loss, improve_lib.ORIGINS) for loss in losses]
  if reference_control:
    runs.append(('bc_references', 'bc', ('reference',)))
  for name, loss, origins in runs:
    policy_dir = start_policy
    prev_dev = {k: start[f'dev_{k}'] for k in ('reward', 'bleu', 'chrf')}
    kept = []
    for i in range(improve_steps):
      step_dir = os.path.join(workdir, 'losses', name, f'improve_{grow_step}_{i}')
      loop_dir = os.path.join(workdir, f'improve_{grow_step}_{i}')
      if name == loss and _same_improve(loop_dir, loss, taus[i], mode, policy_dir):
        step_dir = loop_dir  # The loop already ran this very Improve step: reuse it.
      if _stage_done(step_dir) is None and records is None:
        records = scoring.read_scored_records(scored_dir)
      prev = policy_dir
      imp = _run_stage(step_dir, lambda: {'summary': improve_lib.improve(
          step_dir, model=model, scored_dir=scored_dir, init_policy_dir=prev, rm_dir=rm_dir,
          prior_policy_dir=bc_dir, task=task, tau=taus[i], threshold_mode=mode, loss=loss,
          origins=origins, dev_examples=dev_examples, records=records, scorer=scorer,
          initial_dev=prev_dev)})
      best = max(imp['summary']['history'], key=lambda e: e['reward'])
      prev_dev = {k: best[k] for k in ('reward', 'bleu', 'chrf')}
      kept.append(imp['summary']['filter']['kept_records'])
      policy_dir = step_dir
    ev_dir = os.path.join(workdir, 'losses', name, 'eval')
    ev = _run_stage(ev_dir, evaluate_policy, model, step_dir, scorer, None, test, detok,
                    out_dir=ev_dir)
    rows.append(dict(loss=name, stage=f'G{grow_step}I{last}',
                     origins=list(origins), train_records=kept,
                     dev_reward=prev_dev['reward'], test_reward=ev['test_reward'],
                     test_bleu=ev['test_bleu'], test_chrf=ev['test_chrf'],
                     test_oracle=ev.get('test_oracle')))
  result = {'start': {k: start.get(k) for k in ('dev_reward', 'test_reward', 'test_oracle',
                                                'test_bleu', 'test_chrf')},
            'start_policy': start_policy, 'losses': rows, 'taus': taus[:improve_steps],
            'mode': mode, 'reward': reward, 'bleu_signature': start['bleu_signature']}
  fileio.write_json(os.path.join(workdir, 'losses.json'), result)
  f2 = report_lib.fmt
  lines = [f'# Offline-RL losses on the same Grow {grow_step} data', '',
           f'Improve steps 0..{last} (tau {taus[:improve_steps]}, {mode}) '
           f'from `{start_policy}`; rewards: '
           f"{'learned RM' if reward == 'rm' else repr(reward) + ' vs the reference'}, 0-100; "
           "oracle: mean sentence 'chrf+ter' vs the reference, 0-100; BLEU: greedy, "
           f'`{start["bleu_signature"]}`. `bc_references`: `bc` on the kept references only '
           '(continued supervised training, the control).', '',
           '| loss | train records per step | dev reward | test reward | test oracle | test BLEU '
           '| test chrF |', '|---|---|---|---|---|---|---|',
           f"| (start) | | {f2(start['dev_reward'])} | {f2(start['test_reward'])} "
           f"| {f2(start.get('test_oracle'))} | {f2(start['test_bleu'])} "
           f"| {f2(start['test_chrf'])} |"]
  lines += [f"| {r['loss']} | {', '.join(map(str, r['train_records']))} "
            f"| {f2(r['dev_reward'])} | {f2(r['test_reward'])} | {f2(r['test_oracle'])} "
            f"| {f2(r['test_bleu'])} | {f2(r['test_chrf'])} |" for r in rows]
  fileio.write_text(os.path.join(workdir, 'losses.md'), '\n'.join(lines) + '\n')
  print('\n'.join(lines))
  return result
