"""Bradley-Terry: train a reward model (one scalar score per sequence) on preference pairs."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, hookimpl


class BradleyTerryConfig(LossConfig):
    center_rewards_coefficient: float = Field(
        0.0,
        ge=0,
        description="Weight of the penalty (r_c + r_r)^2 that keeps scores centred on zero (Eisenstein et al. 2023, "
        "arXiv:2312.09244, eq. 2; TRL's RewardConfig.center_rewards_coefficient, which recommends 0.01). 0 turns it "
        "off, TRL's default.",
    )


class BradleyTerry(PreferenceLoss):
    """Reward model: -log sigmoid(r_chosen - r_rejected) on one scalar score per sequence (Bradley-Terry).

    Bradley, Terry (1952), "Rank Analysis of Incomplete Block Designs: I. The Method of Paired Comparisons",
    Biometrika 39; as the reward-model loss of Ouyang et al. (2022), "Training language models to follow
    instructions with human feedback" (InstructGPT), NeurIPS 2022, arXiv:2203.02155, eq. 1.

    The model is a sequence scorer (``scores_sequences``): the engine loads ``model.path`` as
    ``AutoModelForSequenceClassification`` with one output (a fresh score head on a causal LM checkpoint) and
    reads r, the score of prompt + response, at the sequence's last token, where the ``reward_model`` judge
    reads the saved model's score. No reference model is run.

    Loss, per pair:  L = -log sigmoid(r_c - r_r) + c * (r_c + r_r)^2
    where r_c, r_r are the scores of the chosen and rejected sequences and c is ``center_rewards_coefficient``
    (default 0: plain Bradley-Terry). Under Bradley-Terry, P(chosen preferred) = sigmoid(r_c - r_r), so the
    first term is the negative log-likelihood of the observed preference; it fixes scores only up to a shared
    offset, which the second term pulls towards zero. The rewards returned (and logged as ``rewards/*``) are the
    scores themselves, so ``rewards/accuracies`` is the reward model's pairwise accuracy and
    ``rewards/margins`` its mean r_c - r_r. With c > 0 the penalty per pair is logged as ``loss/center_penalty``.

    Averaged over pairs, equals TRL's ``RewardTrainer.compute_loss`` (checked against TRL 1.16) without its
    optional per-pair ``margin`` column, which is not offered.
    """

    name = "bradley_terry"
    Config = BradleyTerryConfig
    paper = ("Bradley & Terry 1952, Biometrika 39; as InstructGPT's reward model, Ouyang et al. 2022, "
             "arXiv:2203.02155")
    requires_reference = False
    scores_sequences = True

    def __call__(self, logps: PairLogps) -> LossOutput:
        chosen, rejected = logps.policy_chosen, logps.policy_rejected  # scores, not log-probs
        loss = -F.logsigmoid(chosen - rejected)
        metrics = {}
        coefficient = self.config.center_rewards_coefficient
        if coefficient > 0:
            penalty = coefficient * (chosen + rejected) ** 2
            loss = loss + penalty
            metrics["center_penalty"] = penalty.detach()
        return LossOutput(loss, chosen.detach(), rejected.detach(), metrics)


@hookimpl
def prefopt_register_losses():
    return [BradleyTerry]
