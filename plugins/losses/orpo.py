"""ORPO: NLL on the chosen response plus a log-odds-ratio preference term, without a reference model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, chosen_nll_per_pair, hookimpl


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012): log1p(-exp(x)) loses digits
    as x -> 0 and log(-expm1(x)) as x -> -inf, so switch between them at x = -log 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class ORPOConfig(LossConfig):
    beta: float = Field(
        0.1,
        gt=0,
        description="The paper's lambda: weight of the odds-ratio term against the NLL (typical 0.05-1.0). "
        "0.1 is TRL's default and the paper's Mistral-ORPO setting; the official code's --alpha defaults "
        "to 1.0. Also scales the logged rewards.",
    )


class ORPO(PreferenceLoss):
    """Odds Ratio Preference Optimization: NLL(chosen) - beta * log sigmoid(log odds ratio), no reference.

    Hong, Lee, Thorne (2024), "ORPO: Monolithic Preference Optimization without Reference Model",
    EMNLP 2024, arXiv:2403.07691.

    With ac = pc / Lc and ar = pr / Lr the policy's average per-token log-probs of the chosen and
    rejected responses, the odds of a response are P / (1 - P) with P = exp(a), and
        log OR = (ac - ar) - (log(1 - exp(ac)) - log(1 - exp(ar)))
        L      = (-sum_i pc_i / sum_i Lc_i) - beta * mean_i[log sigmoid(log OR_i)]
    The NLL term is supervised fine-tuning on the chosen responses; the odds-ratio term, on the same
    forward pass, penalises the rejected style, so preference alignment needs neither an SFT stage before
    it nor a reference model. The NLL is returned as per-pair contributions whose mean is the micro-batch
    token mean (see ``prefopt.chosen_nll_per_pair``, also for gradient accumulation).

    Hyperparameter: ``beta`` (the paper's lambda, TRL's ``beta``; default 0.1). Rewards are beta * ac and
    beta * ar, as in TRL. Metrics, as TRL logs them: ``nll`` (the micro-batch token-mean NLL),
    ``log_odds_ratio`` (log sigmoid(log OR)) and ``log_odds_chosen`` (log OR).

    Matches TRL's ``ORPOTrainer`` except for one deliberate difference: TRL's NLL, like the official
    code's default, averages over the chosen row's prompt tokens *and* its response tokens
    (trl/experimental/orpo/orpo_trainer.py, ``concatenated_forward``, lines 793-800 in TRL 1.16: labels
    are the input ids wherever the attention mask is 1), while the engine scores response tokens only
    (``PairLogps``), so this NLL averages over response tokens. The two agree when the prompt is a single
    token, which no position predicts; with longer prompts TRL also fine-tunes on the prompts. The
    official code can drop the prompt tokens with ``--disable_prompt_loss``, which is this form. TRL
    also computes the odds in float32 whatever the model's dtype (``odds_ratio_loss``, ``.float()``);
    here they keep the log-probs' dtype.
    """

    name = "orpo"
    Config = ORPOConfig
    paper = "Hong, Lee, Thorne 2024, ORPO: Monolithic Preference Optimization without Reference Model, arXiv:2403.07691"
    requires_reference = False

    def __call__(self, logps: PairLogps) -> LossOutput:
        beta = self.config.beta
        chosen, rejected = logps.policy_chosen_mean, logps.policy_rejected_mean
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        log_odds_ratio = F.logsigmoid(log_odds)
        nll, nll_mean = chosen_nll_per_pair(logps)
        loss = nll - beta * log_odds_ratio
        metrics = {"nll": nll_mean, "log_odds_ratio": log_odds_ratio.detach(), "log_odds_chosen": log_odds.detach()}
        return LossOutput(loss, beta * chosen.detach(), beta * rejected.detach(), metrics=metrics)


@hookimpl
def prefopt_register_losses():
    return [ORPO]
