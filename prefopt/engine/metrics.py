"""Preference metrics: sums over pairs within a step, gathered across processes, then averaged.

Metrics are accumulated as sums and counts, so micro-batching, gradient accumulation and the number
of processes do not change their values (a mean of means would). ``totals`` (token counts, say) are
summed over processes in the same collective call.

Pairs: every metric is a mean over the step's pairs. Unpaired examples (``PairLogps.labels`` set),
as TRL's KTOTrainer logs them: ``rewards/chosen`` and ``logps/chosen`` average the examples' own
rewards and log-probs over the desirable examples, ``rewards/rejected`` and ``logps/rejected`` over the
undesirable ones, ``rewards/margins`` is the difference of the two reward means, and there is no
``rewards/accuracies`` (no pair to rank). A step without desirable (or undesirable) examples logs no
value for the keys that average over them.

Token statistics (evaluation only: ``add_token_stats``), as TRL's DPOTrainer logs them: ``logits/chosen`` and
``logits/rejected`` are the mean over the vocabulary of the policy's logits, averaged over every response token
of the chosen (rejected) responses; ``entropy`` is the mean entropy of the policy's next-token distribution over
every response token of both. Means over tokens, not over pairs: a long response weighs more. For unpaired
examples ``logits/chosen`` averages the desirable examples' completions, ``logits/rejected`` the undesirable
ones', and ``entropy`` every example's own completion (not the KL samples).

A reward model (a loss that declares ``scores_sequences``; ``PairMetrics(scores=True)``) logs no ``logps/*``: its
``policy_chosen`` / ``policy_rejected`` are the scores, which its loss returns as its rewards, so ``rewards/*``
already holds them (``rewards/accuracies`` is the reward model's pairwise accuracy, ``rewards/margins`` its mean
score margin) and ``logps/*`` would repeat them under a name that says log-probs.

Ties: ``rewards/accuracies`` counts a pair the policy ranks first as 1, second as 0 (TRL's count), and one
whose log-ratio margin is float rounding away from zero as 0.5, so step 0 (policy = reference) gives exactly
0.5 whatever the reduction order of the two forwards (``TIE_RTOL``).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from prefopt.api.loss import LossOutput, PairLogps
from prefopt.forward.logprobs import SequenceLogps

# Unpaired metrics that are a difference of two means, computed after the sums are gathered.
UNPAIRED_DIFFERENCES = {"rewards/margins": ("rewards/chosen", "rewards/rejected")}


class PairMetrics:
    """Running sums of per-pair (or per-example) quantities and how many values each holds;
    ``reduced()`` gives the logged means. ``scores``: the model is a reward model, so no ``logps/*``."""

    def __init__(self, *, scores: bool = False) -> None:
        self.scores = scores
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)
        self.differences: dict[str, tuple[str, str]] = {}
        self.pairs = 0
        self.totals: dict[str, float] = {}  # summed over processes by reduced(); read back with total()
        self._reduced_totals: dict[str, float] = {}

    @torch.no_grad()
    def add(self, logps: PairLogps, output: LossOutput) -> None:
        values = _paired(logps, output) if logps.labels is None else self._unpaired(logps, output)
        if self.scores:
            values = {key: value for key, value in values.items() if not key.startswith("logps/")}
        per_pair = output.chosen_rewards
        for key, value in output.metrics.items():
            value = value.detach().float()
            # A per-pair metric sums over pairs; a scalar counts once per pair in this micro-batch.
            values[f"loss/{key}"] = value if value.ndim else value.expand_as(per_pair)
        for key, value in values.items():
            self.sums[key] += float(value.sum())
            self.counts[key] += value.numel()
        self.pairs += int(per_pair.numel())

    @torch.no_grad()
    def add_token_stats(self, policy: SequenceLogps, labels: Tensor | None = None) -> None:
        """The policy's ``logits/chosen``, ``logits/rejected`` and ``entropy`` on a batch (its ``sequence_logps``
        with ``token_stats``; ``labels`` for unpaired examples): sums over response tokens, counted in tokens."""
        chosen, rejected = policy.split()
        if labels is None:
            parts = {"logits/chosen": (chosen.mean_logit_sums, chosen.token_counts),
                     "logits/rejected": (rejected.mean_logit_sums, rejected.token_counts),
                     "entropy": (policy.entropy_sums, policy.token_counts)}
        else:
            desirable = labels.to(chosen.token_counts.device)
            parts = {"logits/chosen": (chosen.mean_logit_sums[desirable], chosen.token_counts[desirable]),
                     "logits/rejected": (chosen.mean_logit_sums[~desirable], chosen.token_counts[~desirable]),
                     "entropy": (chosen.entropy_sums, chosen.token_counts)}
        for key, (sums, tokens) in parts.items():
            self.sums[key] += float(sums.double().sum())
            self.counts[key] += float(tokens.sum())

    def _unpaired(self, logps: PairLogps, output: LossOutput) -> dict[str, Tensor]:
        # Each example's own completion is its chosen sequence; the rejected one is only a KL sample.
        desirable = logps.labels.to(output.chosen_rewards.device)
        rewards, policy = output.chosen_rewards.float(), logps.policy_chosen.detach().float()
        self.differences = UNPAIRED_DIFFERENCES
        return {
            "loss": output.loss.detach().float(),
            "rewards/chosen": rewards[desirable],
            "rewards/rejected": rewards[~desirable],
            "logps/chosen": policy[desirable],
            "logps/rejected": policy[~desirable],
        }

    def reduced(self, accelerator) -> dict[str, float]:
        """Means over every value seen by every process (with several processes: two collective calls,
        the key lists, then the sums)."""
        keys = sorted(self.sums)
        distributed = accelerator is not None and accelerator.num_processes > 1
        if distributed:
            # A process can hold fewer keys (no eval pair in its shard, say); the sums must line up.
            from accelerate.utils import gather_object

            keys = sorted(set().union(*gather_object([keys])))
        sums = [self.sums.get(k, 0.0) for k in keys]
        counts = [self.counts.get(k, 0.0) for k in keys]
        names = sorted(self.totals)
        local = torch.tensor(sums + counts + [self.totals[k] for k in names], dtype=torch.float64)
        if distributed:
            local = accelerator.reduce(local.to(accelerator.device), reduction="sum").cpu()
        values = local.tolist()
        totals, numbers = values[: len(keys)], values[len(keys) : 2 * len(keys)]
        self._reduced_totals = dict(zip(names, values[2 * len(keys) :]))
        means = {key: total / number for key, total, number in zip(keys, totals, numbers) if number > 0}
        for key, (first, second) in self.differences.items():
            if first in means and second in means:
                means[key] = means[first] - means[second]
        return dict(sorted(means.items()))

    def total(self, name: str) -> float:
        """``totals[name]`` summed over every process, after ``reduced()``."""
        return self._reduced_totals[name]


# A pair whose policy log-ratio margin is within this share of its four log-probs' size is ranked by the
# policy exactly as by the reference: a tie. Two float32 forwards of the same weights over differently padded
# batches (the reference cache is built in length-sorted batches, training and evaluation batch otherwise)
# differ by float rounding, about 1e-9 of the log-probs' size on the quickstart (margins of 1e-8 nats
# against sums of about 50); 1e-6 leaves a thousandfold room, while a step of training moves margins by
# 1e-3 nats and more on sums of that size.
TIE_RTOL = 1e-6


def _paired(logps: PairLogps, output: LossOutput) -> dict[str, Tensor]:
    chosen, rejected = output.chosen_rewards.float(), output.rejected_rewards.float()
    return {
        "loss": output.loss.detach().float(),
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": _accuracies(logps, chosen, rejected),
        "logps/chosen": logps.policy_chosen.detach().float(),
        "logps/rejected": logps.policy_rejected.detach().float(),
    }


def _accuracies(logps: PairLogps, chosen: Tensor, rejected: Tensor) -> Tensor:
    """1 where the implicit reward ranks the chosen response first, 0 where it ranks it second, as TRL counts;
    0.5 for a tie: a pair whose policy log-ratio margin is float rounding away from 0 (``TIE_RTOL``). So at
    step 0, where the policy is its reference, accuracy is exactly 0.5 instead of a count of rounding signs."""
    wins = (chosen > rejected).float()
    if logps.ref_chosen is None or logps.ref_rejected is None:
        return wins  # no reference: a margin of 0 is not a rounding artefact, and rewards rarely tie exactly
    terms = (logps.policy_chosen, logps.policy_rejected, logps.ref_chosen, logps.ref_rejected)
    size = sum(t.detach().double().abs() for t in terms)
    margin = logps.logratio_margin.detach().double()
    tie = (margin.abs() <= TIE_RTOL * size).to(wins.device)
    return torch.where(tie, torch.full_like(wins, 0.5), wins)
