"""The loss contract: everything a loss plugin sees and returns.

A loss is pure tensor math. The engine batches, runs the models, computes log-probs (``prefopt.forward.logprobs``)
and reduces; a loss maps per-sequence log-probs (a reward model's scores, for a loss that declares
``scores_sequences``) to per-pair losses and rewards. What a loss needs beyond the policy's summed log-probs it
*declares* as class attributes, and the engine computes exactly that; the engine never looks at a loss's name.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor

from prefopt.api.plugin import Plugin, PluginConfig

__all__ = ["LossConfig", "LossOutput", "PairLogps", "PreferenceLoss"]


@dataclass(frozen=True)
class PairLogps:
    """Log-probs of one micro-batch of preference pairs; every tensor has B rows, one per pair.

    Sums are over response tokens only (the prompt and padding are masked). Per-token tensors are
    (B, T) with zeros where ``*_mask`` is False, and are present only when the loss declares
    ``requires_token_logps``; reference tensors are present only when it declares ``requires_reference``.

    For a loss that declares ``scores_sequences`` (a reward model), ``policy_chosen`` and ``policy_rejected`` hold
    the model's scalar score of each whole sequence (prompt + response), not log-probs; the token counts are as
    usual, and nothing else is present.

    For a loss that declares ``unpaired``, row i is one unpaired example (x_i, y_i) instead of a pair:
    the ``*chosen*`` fields are its completion y_i, ``labels[i]`` says whether y_i is desirable, and the
    ``*rejected*`` fields are a mismatched completion y_j (another example's) after the same prompt x_i,
    the sample KTO estimates its KL term from (``prefopt.data.unpaired``). ``labels`` is None for pairs.
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    chosen_tokens: Tensor  # number of response tokens, float, (B,)
    rejected_tokens: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    policy_chosen_token_logps: Tensor | None = None
    policy_rejected_token_logps: Tensor | None = None
    ref_chosen_token_logps: Tensor | None = None
    ref_rejected_token_logps: Tensor | None = None
    chosen_mask: Tensor | None = None  # bool (B, T): which positions of the token tensors are response
    rejected_mask: Tensor | None = None
    # log sum_v p_v^2 of the policy's next-token distribution at each response position (B, T), detached;
    # present only when the loss declares ``requires_token_log_collision`` (WPO's weights).
    policy_chosen_token_log_collision: Tensor | None = None
    policy_rejected_token_log_collision: Tensor | None = None
    labels: Tensor | None = None  # bool (B,): desirable or not; only for a loss that declares ``unpaired``
    # Every reference's summed log-probs, (K, B): row 0 is the primary reference (the one in ``ref_chosen``),
    # rows 1.. the models in the recipe's ``reference.extra``, in order. Only for a ``multi_reference`` loss.
    refs_chosen: Tensor | None = None
    refs_rejected: Tensor | None = None

    @property
    def policy_chosen_mean(self) -> Tensor:
        """Per-token average log-prob of the chosen response (SimPO-style length normalization)."""
        return self.policy_chosen / self.chosen_tokens.clamp(min=1)

    @property
    def policy_rejected_mean(self) -> Tensor:
        return self.policy_rejected / self.rejected_tokens.clamp(min=1)

    # The log-ratios of DPO-family losses. Each is computed afresh on every read, never cached: a cached value
    # first read under ``torch.no_grad()`` (as ``dpo_rewards`` reads it) would carry no gradient to a loss.
    @property
    def chosen_logratios(self) -> Tensor:
        """log pi(y_c|x) - log pi_ref(y_c|x): the chosen response's log-ratio, pc - rc (DPO's reward / beta)."""
        return self.policy_chosen - self._reference("ref_chosen")

    @property
    def rejected_logratios(self) -> Tensor:
        """log pi(y_r|x) - log pi_ref(y_r|x): the rejected response's log-ratio, pr - rr."""
        return self.policy_rejected - self._reference("ref_rejected")

    @property
    def logratio_margin(self) -> Tensor:
        """DPO's margin (pc - rc) - (pr - rr), the chosen log-ratio minus the rejected one (DPO paper, eq. 7).

        Computed in that order, as DPO writes it and TRL computes it: (pc - pr) - (rc - rr) is the same number
        in exact arithmetic but can differ in the last bits in floating point."""
        return self.chosen_logratios - self.rejected_logratios

    def _reference(self, name: str) -> Tensor:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"PairLogps.{name} is None: only a loss that declares requires_reference gets "
                             "reference log-probs, and with them its log-ratios")
        return value


@dataclass(frozen=True)
class LossOutput:
    """What a loss returns. ``loss`` is per pair: the engine reduces it, so gradient accumulation and
    world size never change the update. Rewards are detached and only logged."""

    loss: Tensor  # (B,)
    chosen_rewards: Tensor  # (B,)
    rejected_rewards: Tensor  # (B,)
    metrics: Mapping[str, Tensor] = field(default_factory=dict)  # logged as loss/<key>, averaged over pairs
    # For unpaired examples the metrics read ``chosen_rewards`` only (the reward of each example's own
    # completion), averaged over desirable and over undesirable examples; ``rejected_rewards`` is unused.


class LossConfig(PluginConfig):
    """Base of every loss's hyper-parameter model. Unknown keys are errors; configs are immutable."""


class PreferenceLoss(Plugin):
    """Base class of every loss plugin.

    Subclasses set ``name`` (the recipe's ``loss.name``), ``Config`` (a ``LossConfig`` subclass whose
    fields carry descriptions and bounds) and ``paper`` (a citation with its arXiv id), write a docstring
    whose first line is the one-line summary ``prefopt list`` shows, and implement ``__call__``.
    """

    Config: ClassVar[type[LossConfig]]

    # Declared needs: the engine computes only what these ask for.
    requires_reference: ClassVar[bool] = True
    requires_token_logps: ClassVar[bool] = False
    requires_token_log_collision: ClassVar[bool] = False  # implies the per-token log-probs and masks
    # Trains on unpaired examples (a completion labelled desirable or not, KTO) instead of pairs: paired
    # data is split into two examples per pair, every example gets a mismatched completion as its
    # "rejected" sequence, and ``PairLogps.labels`` is set (see PairLogps). A paired loss refuses
    # unpaired data.
    unpaired: ClassVar[bool] = False
    # Reads several references at once (``PairLogps.refs_chosen``/``refs_rejected``); the recipe names the
    # references beyond the primary one in ``reference.extra``. A single-reference loss refuses extras.
    multi_reference: ClassVar[bool] = False
    # Trains a reward model, not a policy: the model is a sequence scorer with one scalar per sequence
    # (AutoModelForSequenceClassification, num_labels=1), read at each sequence's last token as the
    # ``reward_model`` judge reads it, and ``PairLogps.policy_chosen`` / ``policy_rejected`` then hold the scores,
    # not log-probs. Such a loss runs no reference (``requires_reference = False``) and asks for no per-token
    # values; the recipe may not ask for what only a generating model does (sampling, an algorithm), and the
    # saved model is the scorer, with its head.
    scores_sequences: ClassVar[bool] = False

    def __init__(self, config: LossConfig) -> None:
        self.config = config
        # True while the engine trains, False while it evaluates: running statistics update only in training.
        self.training = True

    def train(self, mode: bool = True) -> "PreferenceLoss":
        self.training = mode
        return self

    @abc.abstractmethod
    def __call__(self, logps: PairLogps) -> LossOutput:
        """Map one micro-batch of log-probs to per-pair losses and rewards."""

    # Running state (a reward shift, running statistics) is saved in checkpoints through these two.
    # Stateless losses keep the defaults.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"loss {self.name!r} keeps no state but the checkpoint holds {sorted(state)}")


def dpo_rewards(beta: float, logps: PairLogps) -> tuple[Tensor, Tensor]:
    """The implicit rewards beta * (policy - reference) of both responses, detached (DPO paper, eq. 5)."""
    with torch.no_grad():
        return beta * logps.chosen_logratios, beta * logps.rejected_logratios


def chosen_nll_per_pair(logps: PairLogps) -> tuple[Tensor, Tensor]:
    """The chosen responses' negative log-likelihood as a token mean over the micro-batch, split into pairs.

    TRL's CPO and ORPO trainers (``nn.CrossEntropyLoss()`` over the chosen rows) average the NLL over
    *all* chosen tokens of the micro-batch, nll = -sum_j pc_j / sum_j Lc_j, so a long response weighs
    more than a short one (ORPO's trainer counts prompt tokens too). The engine instead averages
    per-pair losses, so pair i carries

        nll_i = -pc_i * B / sum_j Lc_j        (B pairs in this micro-batch)

    whose mean over the B pairs is exactly that token mean. A pair's own value depends on the lengths of
    the other pairs in its micro-batch, so only the micro-batch mean is meaningful.

    Under gradient accumulation the engine adds the micro-batches' per-pair losses and divides by the
    step's pair count: the step's NLL is the mean of the micro-batches' token means weighted by their pair
    counts. TRL divides each micro-batch's loss by the accumulation steps, an unweighted mean of the same
    token means; the two agree whenever micro-batches hold equally many pairs, as the engine's training
    micro-batches do on every process (the engine requires it). Neither is a token mean over the whole
    step, so in both, changing the micro-batch size changes how the tokens of different pairs are
    weighed; the preference terms are unaffected.

    Returns (per-pair contributions, the micro-batch token mean as a detached scalar for logging).
    """
    pairs = logps.policy_chosen.shape[0]
    tokens = logps.chosen_tokens.sum().clamp(min=1)  # an all-empty micro-batch gives 0, not NaN
    per_pair = -logps.policy_chosen * (pairs / tokens)
    return per_pair, (-logps.policy_chosen.sum() / tokens).detach()
