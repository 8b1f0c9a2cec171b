"""The reward side of ReST (Gulcehre et al. 2023, arXiv 2308.08998, sec. 2 and 4).

* `metrics`: reference-based sentence rewards (sacreBLEU BLEU, chrF, inverted TER) in [0, 1].
* `model`: a reference-free learned reward model (source + candidate -> scalar), its losses and
  the `RewardScorer` used at scoring time.
* `train_rm`: trains the reward model on Grow records labelled by a *simulated* preference oracle
  (a metric against the reference; no human ratings).
* `negatives`: the synthetic bad candidates (copy of the source, empty, repeated, truncated,
  another reference) used as extra training data and by the sanity check.
* `scoring`: scores every Grow record once (`scored-*.tfrecord`, resumable per chunk).
* `check`: sanity check of a reward on hand-made bad candidates (`rm_check.json`).
* `verifiers`: ReST-EM's binary verifier (the final answer after `####`, optionally every step),
  its scorer, and the sampled-solution metrics pass@k and maj@k (Singh et al. 2023).
"""
