"""NCA (pairwise): noise-contrastive alignment, which scores each response's reward on its own, not only their gap."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, dpo_rewards, hookimpl


class NCAPairConfig(LossConfig):
    beta: float = Field(
        0.01,
        gt=0,
        description="Scale of each response's implicit reward beta * (p - r). 0.01 is the official code's "
        "(`yamls/preference_qlora.yaml`) and the TRL paper index's; TRL's default is 0.1.",
    )


class NCAPair(PreferenceLoss):
    """Noise contrastive alignment, pairwise: -log sig(sc) - 1/2 log sig(-sc) - 1/2 log sig(-sr).

    Chen, He, Yuan, Cui, Su, Zhu (2024), "Noise Contrastive Alignment of Language Models with Explicit
    Rewards", NeurIPS 2024, arXiv:2402.05369.

    Loss, per pair, with the implicit rewards sc = beta * (pc - rc), sr = beta * (pr - rr):
        L = -log sigmoid(sc) - 1/2 * log sigmoid(-sc) - 1/2 * log sigmoid(-sr)
    DPO's loss depends only on sc - sr, so it can lower both responses' likelihood as long as the rejected
    one falls faster, and in practice it often does. NCA classifies each response's reward absolutely
    against the reference: the first two terms pull the chosen reward up to sc = log 2 (where they balance),
    the last pushes the rejected reward down. The chosen likelihood is therefore kept from collapsing. (The
    paper's InfoNCA with K = 2 is DPO; NCA is its absolute-likelihood counterpart.)

    Hyperparameters: ``beta`` (> 0, default 0.01, the official code's and TRL index's; TRL's default is 0.1).

    Equals TRL's ``DPOTrainer(loss_type="nca_pair")``, which matches the official ``NCATrainer_pairwise``.
    Rewards are DPO's, beta * (p - r).
    """

    name = "nca_pair"
    Config = NCAPairConfig
    paper = "Chen et al. 2024, Noise Contrastive Alignment of Language Models with Explicit Rewards, arXiv:2402.05369"

    def __call__(self, logps: PairLogps) -> LossOutput:
        beta = self.config.beta
        chosen = beta * logps.chosen_logratios
        rejected = beta * logps.rejected_logratios
        loss = -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
        chosen_rewards, rejected_rewards = dpo_rewards(beta, logps)
        return LossOutput(loss, chosen_rewards, rejected_rewards)


@hookimpl
def prefopt_register_losses():
    return [NCAPair]
