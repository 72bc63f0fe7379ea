"""NLL: the chosen responses' negative log-likelihood on its own, supervised fine-tuning on the preferred data."""

from __future__ import annotations

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, chosen_nll_per_pair, hookimpl


class NLLConfig(LossConfig):
    """No options: the loss has no hyperparameter, and its weight in a mixture is the mixture's ``weight``."""


class NLL(PreferenceLoss):
    """Negative log-likelihood of the chosen responses (SFT on the preferred data), a token mean over the batch.

    Rafailov et al. (2023), "Direct Preference Optimization", arXiv:2305.18290, §6: the "Preferred-FT"
    baseline, supervised fine-tuning on the chosen responses only. It is also the NLL term that RPO
    (arXiv:2404.19733) and MPO (arXiv:2411.10442) add to a preference loss, which is where it is mostly used:
    as a component of ``mix`` (``{name: nll, weight: alpha}``).

    Loss, per micro-batch of B pairs:  L = -(sum_i pc_i) / (sum_i Lc_i)
    with pc_i the policy's summed log-prob of chosen response i and Lc_i its token count: every chosen token
    of the micro-batch counts once, so longer responses weigh more. The rejected response plays no part, and
    no reference model is run.

    Per-pair form. The engine averages per-pair losses, so pair i carries the share -pc_i * B / sum_j Lc_j,
    whose mean over the B pairs is the token mean above (``prefopt.chosen_nll_per_pair`` explains the split
    and what it means under gradient accumulation). Only the micro-batch mean of the shares is meaningful: a
    pair's share depends on the lengths of the other pairs.

    No hyperparameters.

    Equals TRL's ``DPOTrainer(loss_type="sft")`` on a micro-batch, loss and gradient (checked against TRL 1.16;
    TRL <= 0.28's ``rpo_alpha`` term is the same token mean, but it also dropped tokens with id 0). The logged
    rewards differ: there is no reference and no beta, so they are the policy's summed log-probs pc and pr,
    and the logged margin is pc - pr; TRL logs beta * (p - r) from the reference it always uses.
    """

    name = "nll"
    Config = NLLConfig
    paper = "Rafailov et al. 2023, Direct Preference Optimization (Preferred-FT baseline), arXiv:2305.18290"
    requires_reference = False

    def __call__(self, logps: PairLogps) -> LossOutput:
        loss, _ = chosen_nll_per_pair(logps)
        return LossOutput(loss, logps.policy_chosen.detach(), logps.policy_rejected.detach())


@hookimpl
def prefopt_register_losses():
    return [NLL]
