"""IPO, identity preference optimization: a squared loss that regresses the log-ratio margin to 1/(2 tau)."""

from __future__ import annotations

from pydantic import Field

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, dpo_rewards, hookimpl


class IPOConfig(LossConfig):
    beta: float = Field(
        0.1,
        gt=0,
        description="The paper's tau, the regularization strength: the margin is regressed to 1/(2*beta), so "
        "smaller beta asks for a larger margin. 0.1 is TRL's and HALOs' default.",
    )
    per_token: bool = Field(
        True,
        description="Average each response's log-ratio over its tokens before taking the margin (TRL, HALOs; "
        "the IPO authors confirmed this form to TRL). False uses summed log-ratios, the paper's Eq. 17 as the "
        "official DPO repository, OpenRLHF and TRL's online DPO compute it.",
    )


class IPO(PreferenceLoss):
    """Identity preference optimization: (margin - 1/(2*tau))^2, bounded where DPO's margin is not.

    Azar, Guo, Piot, Munos, Rowland, Valko, Calandriello (2024), "A General Theoretical Paradigm to
    Understand Learning from Human Preferences", AISTATS 2024, arXiv:2310.12036.

    Loss, per pair (Eq. 17):  L = (m - 1 / (2 * tau))^2, with tau = ``beta`` and
        m = (pc - rc)/Lc - (pr - rr)/Lr   (``per_token=True``, the default), or
        m = (pc - rc) - (pr - rr)         (``per_token=False``),
    where Lc, Lr are the responses' token counts (at least 1). DPO's logistic loss keeps rewarding a larger
    margin forever, so on deterministic preferences its optimum lies at infinity and the KL tie to the
    reference stops mattering; IPO's square has its optimum at the finite margin 1/(2 tau).

    Summed log-ratios grow with response length, and so does the squared loss; TRL therefore averages them
    per token, which TRL says the IPO authors confirmed is the form behind the paper's results. That is the
    default here. ``per_token=False`` gives the summed form; with it, tau must be re-tuned (the target margin
    is then in nats per response, not per token).

    Hyperparameters: ``beta`` = tau (> 0, default 0.1, as TRL and HALOs); ``per_token`` (default True).

    Equals TRL's ``DPOTrainer(loss_type="ipo")`` with the default ``per_token=True``. Rewards are DPO's,
    beta * (p - r) with summed log-ratios, as TRL >= 0.29 logs them (TRL <= 0.28 logged per-token averages).
    ``metrics["margin"]`` is m, whose target is 1/(2 tau).
    """

    name = "ipo"
    Config = IPOConfig
    paper = (
        "Azar et al. 2024, A General Theoretical Paradigm to Understand Learning from Human Preferences, "
        "arXiv:2310.12036"
    )

    def __call__(self, logps: PairLogps) -> LossOutput:
        chosen = logps.chosen_logratios
        rejected = logps.rejected_logratios
        if self.config.per_token:
            chosen = chosen / logps.chosen_tokens.clamp(min=1)
            rejected = rejected / logps.rejected_tokens.clamp(min=1)
        margin = chosen - rejected
        loss = (margin - 1 / (2 * self.config.beta)) ** 2
        chosen_rewards, rejected_rewards = dpo_rewards(self.config.beta, logps)
        return LossOutput(loss, chosen_rewards, rejected_rewards, {"margin": margin.detach()})


@hookimpl
def prefopt_register_losses():
    return [IPO]
