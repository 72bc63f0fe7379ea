"""Mix: a weighted sum of other registered losses, per pair (MPO = DPO + BCO + NLL, RPO = DPO + NLL, ...)."""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import Field, ValidationError
from torch import Tensor

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, format_problems, hookimpl
from prefopt.errors import PrefoptError, did_you_mean
from prefopt.registry.loading import Registry, default_plugins

# Keys of a component that belong to the mixture, not to the component's loss.
RESERVED = ("name", "weight")


class MixConfig(LossConfig):
    components: list[dict[str, Any]] = Field(
        ...,
        min_length=1,
        description="The losses to add up, in order, e.g. [{name: dpo, beta: 0.1, weight: 0.8}, {name: nll}]. "
        "Each names a registered loss (not mix), may give a weight > 0 (default 1.0; TRL's loss_weights) and "
        "takes that loss's own options. The first component's rewards are the mixture's.",
    )


class _Weight(LossConfig):
    weight: float = Field(1.0, gt=0, description="A component's factor in the weighted sum.")


def _problems(exc: ValidationError, where: str, loss_name: str, options: list[str]) -> list[str]:
    """One line per error, naming the key's full path, in the recipe's wording."""
    return format_problems(exc, where=where, siblings=options, owner=f"loss {loss_name!r}")


class Mix(PreferenceLoss):
    """A weighted sum of registered losses: sum_k weight_k * loss_k, per pair.

    Recipes combine losses this way instead of through one class per combination. MPO (Wang et al. 2024,
    "Enhancing the Reasoning Ability of Multimodal Large Language Models via Mixed Preference Optimization",
    arXiv:2411.10442) is the best-known mixture: a preference loss (DPO), a quality loss (BCO) and a generation
    loss (NLL of the chosen response), weighted 0.8, 0.2 and 1.0:

        loss: {name: mix, components: [{name: dpo, beta: 0.1, weight: 0.8},
                                        {name: bco_pair, beta: 0.1, weight: 0.2}, {name: nll, weight: 1.0}]}

    Loss, per pair:  L = sum_k weight_k * L_k
    with L_k the per-pair loss of component k. The engine averages per-pair losses, so the micro-batch loss is
    sum_k weight_k * mean(L_k), TRL's weighted multi-loss. Each component keeps its own hyperparameters (each
    its own beta, where TRL shares one beta across its loss types).

    Options: ``components``, a non-empty list; each entry has ``name`` (a registered loss other than mix),
    ``weight`` (> 0, default 1.0) and that loss's own options, validated by its Config when the mixture is
    built. A mistake raises ``PrefoptError`` naming its path (``loss.components[1].beta: ...``).

    What the mixture declares and returns:
    - needs: the union of its components' (a reference if any component needs one, per-token log-probs or
      log collision probabilities likewise); each component reads only the fields it needs. Unpaired losses
      (KTO) mix only with each other: their rows are labelled examples, not pairs. Likewise reward-model losses
      (``scores_sequences``, bradley_terry): their rows hold scores of a sequence scorer, not log-probs.
    - rewards: the first component's, so list the loss whose implicit reward is meant to be logged first.
    - metrics: each component's unweighted per-pair loss as ``<name>`` and its own metrics as
      ``<name>/<key>``; a loss listed twice is told apart by position, ``<name>[<position>]``.
    - state (a running statistic such as BCO's delta) is saved and restored per component, keyed
      ``"<position>:<name>"``, and ``train(mode)`` reaches every component.

    Equals TRL's ``DPOTrainer(loss_type=[...], loss_weights=[...])`` (checked against TRL 1.16) when every
    component equals its TRL loss type and shares TRL's beta: MPO is ``loss_type=["sigmoid", "bco_pair", "sft"]`` with
    ``loss_weights=[0.8, 0.2, 1.0]`` (``bco_pair`` with ``running_shift: false``, as TRL >= 0.29 has no shift).
    """

    name = "mix"
    Config = MixConfig
    paper = "Wang et al. 2024, Mixed Preference Optimization (MPO), arXiv:2411.10442"

    def __init__(self, config: MixConfig, *, losses: Registry[PreferenceLoss] | None = None) -> None:
        """``losses`` is the registry components are resolved in; the process's plugins by default."""
        super().__init__(config)
        losses = default_plugins().losses if losses is None else losses
        self.components: list[tuple[str, float, PreferenceLoss]] = []  # (metric key, weight, loss)
        problems: list[str] = []
        names = [spec.get("name") for spec in config.components]
        for i, spec in enumerate(config.components):
            where = f"loss.components[{i}]"
            try:
                component, weight = self._build(spec, where, losses)
            except _Invalid as invalid:
                problems.extend(invalid.problems)
                continue
            key = component.name if names.count(component.name) == 1 else f"{component.name}[{i}]"
            self.components.append((key, weight, component))
        if problems:
            if len(problems) == 1:
                raise PrefoptError(problems[0])
            raise PrefoptError(f"loss.components: {len(problems)} problems" + "".join(f"\n  {p}" for p in problems))
        # The engine reads these from the instance: it computes whatever any component asks for.
        parts = [component for _, _, component in self.components]
        self.requires_reference = any(c.requires_reference for c in parts)
        self.requires_token_logps = any(c.requires_token_logps for c in parts)
        self.requires_token_log_collision = any(c.requires_token_log_collision for c in parts)
        # A row is a pair for a paired loss and one labelled example for an unpaired one (KTO), so the two kinds
        # cannot share a batch; a mixture of unpaired losses is itself unpaired.
        unpaired = [getattr(c, "unpaired", False) for c in parts]
        if any(unpaired) and not all(unpaired):
            kinds = ", ".join(f"{key} ({'unpaired' if u else 'paired'})"
                              for (key, _, _), u in zip(self.components, unpaired))
            raise PrefoptError(f"loss.components: paired and unpaired losses cannot be mixed: {kinds}; their "
                               "batches hold different rows (pairs vs labelled examples)")
        self.unpaired = all(unpaired)
        # A reward model's rows hold scores, not log-probs, so a mixture is all scorers (itself one) or none.
        scorers = [getattr(c, "scores_sequences", False) for c in parts]
        if any(scorers) and not all(scorers):
            kinds = ", ".join(f"{key} ({'reward model' if s else 'log-probs'})"
                              for (key, _, _), s in zip(self.components, scorers))
            raise PrefoptError(f"loss.components: reward-model losses (one score per sequence) and log-prob losses "
                               f"cannot be mixed: {kinds}; their models differ")
        self.scores_sequences = all(scorers)

    @staticmethod
    def _build(spec: Mapping[str, Any], where: str, losses: Registry[PreferenceLoss]) -> tuple[PreferenceLoss, float]:
        name = spec.get("name")
        if name is None:
            raise _Invalid([f"{where}.name: required but missing; name a registered loss"])
        if not isinstance(name, str):
            raise _Invalid([f"{where}.name: must be a loss name, got {name!r}"])
        if name == Mix.name:
            raise _Invalid([f"{where}.name: a mix cannot contain a mix; list its components here instead"])
        if name not in losses:
            choices = [n for n in losses.names() if n != Mix.name]
            raise _Invalid([
                f"{where}.name: unknown loss {name!r}{did_you_mean(name, choices)}; registered: {', '.join(choices)}"
            ])
        cls = losses.get(name)
        if issubclass(cls, Mix):
            raise _Invalid([f"{where}.name: {name!r} is a mix; a mix cannot contain a mix"])
        clash = [key for key in RESERVED if key in cls.Config.model_fields]
        if clash:
            raise _Invalid([f"{where}: loss {name!r} has its own option {clash[0]!r}, which mix reserves; "
                            "it cannot be a component"])
        options = {k: v for k, v in spec.items() if k not in RESERVED}
        problems: list[str] = []
        weight = 1.0
        try:
            weight = _Weight.model_validate({k: spec[k] for k in ("weight",) if k in spec}).weight
        except ValidationError as exc:
            problems += _problems(exc, where, name, [])
        try:
            config = cls.Config.model_validate(options)
        except ValidationError as exc:
            problems += _problems(exc, where, name, [*cls.Config.model_fields, *RESERVED])
        if problems:
            raise _Invalid(problems)
        try:
            return cls(config), weight
        except PrefoptError as exc:
            raise _Invalid([f"{where}: {exc}"]) from None

    def __call__(self, logps: PairLogps) -> LossOutput:
        total: Tensor | None = None
        metrics: dict[str, Tensor] = {}
        first: LossOutput | None = None
        for key, weight, component in self.components:
            out = component(logps)
            if first is None:
                first = out
            total = weight * out.loss if total is None else total + weight * out.loss
            metrics[key] = out.loss.detach()
            metrics.update({f"{key}/{name}": value for name, value in out.metrics.items()})
        assert total is not None and first is not None  # at least one component, by the Config
        return LossOutput(total, first.chosen_rewards, first.rejected_rewards, metrics)

    def train(self, mode: bool = True) -> "Mix":
        self.training = mode
        for _, _, component in self.components:
            component.train(mode)
        return self

    def _state_keys(self) -> list[str]:
        return [f"{i}:{component.name}" for i, (_, _, component) in enumerate(self.components)]

    def state_dict(self) -> dict[str, Any]:
        states = {key: component.state_dict() for key, (_, _, component) in zip(self._state_keys(), self.components)}
        # Stateless mixtures save nothing, like any stateless loss.
        return states if any(states.values()) else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        keys = self._state_keys()
        if not state and not self.state_dict():
            return
        if set(state) != set(keys):
            raise ValueError(
                f"loss 'mix' expects state for its components {keys}, but the checkpoint holds {sorted(state)}; "
                "was it saved with other components?"
            )
        for key, (_, _, component) in zip(keys, self.components):
            component.load_state_dict(state[key])


class _Invalid(Exception):
    """Problems with one component, collected so that every component's problems are reported at once."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@hookimpl
def prefopt_register_losses():
    return [Mix]
