"""SAPO: self-augmented preference optimization, from (prompt, preferred response) data alone."""

from __future__ import annotations

import time
from typing import Optional

import torch
from pydantic import Field

from prefopt import (
    Algorithm, AlgorithmConfig, Phase, PhaseContext, PluginSpec, derive_recipe, eos_token_ids, hookimpl, plugin_config,
)
from prefopt.api.algorithm import check_on_policy_recipe, check_on_policy_run
from prefopt.data.types import TokenizedPair, TokenizedPairs
from prefopt.errors import PrefoptError
from prefopt.api.sampler import SamplerContext

from .sapo_parts import (
    DEFAULT_EMA_DECAY,
    DEFAULT_MAX_SIZE,
    DEFAULT_SEGMENT_LEN,
    REFERENCE_REFRESH_EVERY,
    ReplayBuffer,
    ReplayItem,
    augmentation_due,
    compose_rejected,
    cut_point,
    generation_prompt,
    reference_refresh_due,
)

# The official code samples the EMA model's segments at temperature 0.7, top-p 0.95, top-k 50.
DEFAULT_SAMPLER = PluginSpec(name="transformers", temperature=0.7, top_p=0.95, top_k=50)


class SAPOConfig(AlgorithmConfig):
    ema_decay: float = Field(DEFAULT_EMA_DECAY, ge=0, lt=1, description="Weight of the old EMA weights at each "
                             "update: ema <- decay * ema + (1 - decay) * policy (the official configs: 0.5).")
    ema_every: int = Field(1, ge=1, description="Optimizer steps between EMA updates.")
    segment_tokens: int = Field(DEFAULT_SEGMENT_LEN, ge=1, le=32768, description="Tokens of the preferred response "
                                "the EMA model rewrites (the official configs: 256).")
    sample_every: int = Field(1, ge=1, description="Optimizer steps between augmentations: each makes one rejected "
                              "response per pair of the step's batch and adds them to the replay buffer.")
    buffer_size: int = Field(DEFAULT_MAX_SIZE, ge=1, description="Replay-buffer capacity (oldest pairs leave first).")
    reference_refresh_every: Optional[int] = Field(
        REFERENCE_REFRESH_EVERY, ge=1, description="Steps between copies of the EMA weights into the reference "
        "(the official code: 108); none keeps the initial model. Ignored by a reference-free loss (ORPO).",
    )
    sampler: PluginSpec = Field(DEFAULT_SAMPLER, description="Sampler plugin for the EMA model's segments; "
                                "max_new_tokens is segment_tokens.")


class SAPO(Algorithm):
    """SAPO: rejected responses made by an EMA model rewriting a segment of the preferred one, trained from a replay buffer.

    Yin et al. (2024), "Self-Augmented Preference Optimization: Off-Policy Paradigms for Language Model
    Alignment", arXiv:2405.20830. Only each pair's prompt and chosen response are read. Every step (in the
    official code's order): the EMA of the policy is updated; every ``reference_refresh_every`` steps the
    reference takes the EMA weights; every ``sample_every`` steps the step's batch of preferred responses is
    cut at a random point t, the EMA model continues prompt + y+[:t] for ``segment_tokens`` tokens, and
    y+[:t] + generated + y+[t+L:] (or up to the generated EOS) becomes the rejected response, added to a
    FIFO replay buffer; the step then trains on ``train.batch_size`` pairs drawn from the buffer with
    probability proportional to 1 / (1 + times drawn). Any paired loss trains on them; the paper uses DPO
    and ORPO. The buffer and the EMA weights are in every checkpoint, so a resumed run continues exactly.
    Several processes: the main process generates and broadcasts the new pairs; every process keeps the same
    buffer and draws with the same seeded generator.
    """

    name = "sapo"
    Config = SAPOConfig
    paper = "Yin et al. 2024, Self-Augmented Preference Optimization, arXiv:2405.20830"

    def check(self, recipe, plugins=None) -> None:
        check_on_policy_recipe(self.name, recipe)
        if plugins is not None:
            plugin_config(plugins.samplers, self.config.sampler, "algorithm.sampler")

    def run(self, recipe, plugins, *, show_progress: bool = True) -> dict:
        from prefopt import engine

        self.check(recipe, plugins)
        # a fixed reference must score new completions, so it is live, never a cache
        derived = derive_recipe(recipe, plugins, {"algorithm": None, "reference.kind": "live"},
                                f"{recipe.output.dir} ({self.name})")
        return engine.train(derived, plugins, phase=SAPOPhase(self.config, plugins), show_progress=show_progress)


class SAPOPhase(Phase):
    """The EMA model, the replay buffer and the augmentation, run from the engine's step hooks."""

    def __init__(self, config: SAPOConfig, plugins) -> None:
        super().__init__(reference_follows_policy=config.reference_refresh_every is not None)
        self.config, self.plugins = config, plugins
        self.sampler = None

    def start(self, ctx: PhaseContext) -> None:
        from prefopt.reference.following import FollowingWeights

        check_on_policy_run(SAPO.name, ctx)
        ctx.summary["algorithm"] = SAPO.name
        config = self.config
        self.ctx, self.recipe = ctx, ctx.recipe
        self.data = ctx.train_pairs  # the real (prompt, preferred response) pairs; rejected ones are not read
        self.policy = ctx.model
        self.ema = FollowingWeights(self.policy)
        self.buffer = ReplayBuffer(config.buffer_size)
        ctx.say(f"sapo: EMA decay {config.ema_decay}, segments of {config.segment_tokens} tokens, buffer of "
                f"{config.buffer_size}, reference from the EMA every {config.reference_refresh_every} steps")

    def restore(self, extra: dict, load_tensors) -> None:
        self.buffer.load_state_dict(extra["buffer"])
        self.ema.load_state_dict(load_tensors("ema"))

    def checkpoint_state(self):
        return {"buffer": self.buffer.state_dict()}, {"ema": self.ema.state_dict()}

    def pairs_of_step(self, step: int) -> list[int]:
        return list(range(len(self.ctx.train_pairs)))  # the batch ``before_step`` drew from the buffer, whole

    def before_step(self, ctx: PhaseContext, step: int) -> dict[str, float]:
        cfg = self.config
        if step % cfg.ema_every == 0:
            self.ema.ema_update(self.policy, cfg.ema_decay)
        if ctx.follows_policy and reference_refresh_due(step, cfg.reference_refresh_every):
            ctx.set_reference(self.ema.state_dict())
        metrics: dict[str, float] = {}
        if augmentation_due(step, cfg.sample_every):
            metrics = self._augment(step)
        size = self.recipe.train.batch_size
        if len(self.buffer) < size:
            raise PrefoptError(f"sapo: the replay buffer holds {len(self.buffer)} pairs, fewer than train.batch_size "
                               f"({size}); lower algorithm.sample_every")
        drawn = self.buffer.sample(size, torch.Generator().manual_seed(self.recipe.seed * 1_000_003 + step))
        items = [self.buffer[i] for i in drawn]
        ctx.replace_train_pairs(TokenizedPairs(
            source=f"sapo replay buffer (step {step + 1})",
            pairs=[TokenizedPair(row=it.row, prompt_ids=it.prompt_ids, chosen_ids=it.chosen_ids,
                                 rejected_ids=it.rejected_ids) for it in items],
        ))
        metrics["sapo/buffer_size"] = float(len(self.buffer))
        return metrics

    def _augment(self, step: int) -> dict[str, float]:
        """One rejected response per real pair of this step's batch, made by the EMA model; the main process
        generates, every process adds the same pairs to its buffer."""
        from accelerate.utils import broadcast_object_list

        from prefopt.engine import planned_pairs

        ctx, cfg = self.ctx, self.config
        indices = planned_pairs(self.recipe.seed, len(self.data), self.recipe.train.batch_size, step)
        payload, metrics = [None], {}
        if ctx.is_main:
            rng = torch.Generator().manual_seed(self.recipe.seed * 7_919 + step)
            real = [self.data.pairs[i] for i in indices]
            cuts = [cut_point(len(p.chosen_ids), cfg.segment_tokens, rng) for p in real]
            prompts = [generation_prompt(p.prompt_ids, p.chosen_ids, t) for p, t in zip(real, cuts)]
            started = time.perf_counter()
            generated = self._generate(prompts, seed=self.recipe.seed * 1_000_003 + step)
            metrics["time/sample_s"] = time.perf_counter() - started
            eos = eos_token_ids(self.policy, ctx.tokenizer)
            payload = [[
                ReplayItem(p.prompt_ids, p.chosen_ids, compose_rejected(p.chosen_ids, t, cfg.segment_tokens,
                                                                        g.token_ids, eos), p.row).to_dict()
                for p, t, g in zip(real, cuts, generated)
            ]]
        if ctx.num_processes > 1:
            broadcast_object_list(payload, from_process=0)
        new = [ReplayItem(d["prompt_ids"], d["chosen_ids"], d["rejected_ids"], d["row"]) for d in payload[0]]
        self.buffer.add(new)
        metrics["sapo/rejected_tokens"] = sum(len(it.rejected_ids) for it in new) / len(new)
        metrics["sapo/unchanged"] = sum(it.rejected_ids == it.chosen_ids for it in new) / len(new)
        return metrics

    def _generate(self, prompts, seed: int):
        """The EMA model's continuation of each prompt: the EMA weights are put into the policy module while
        the sampler reads them, and the policy's own put back bitwise after."""
        from prefopt.reference.following import substituted

        if self.sampler is None:
            cls, config = plugin_config(self.plugins.samplers, self.config.sampler, "algorithm.sampler")
            config = config.model_copy(update={"max_new_tokens": self.config.segment_tokens})
            m = self.recipe.model
            from prefopt.models.loading import resolve_model_path

            self.sampler = cls(config, SamplerContext(
                model_path=resolve_model_path(m.path), tokenizer=self.ctx.tokenizer, dtype=m.dtype,
                trust_remote_code=m.trust_remote_code, device=str(self.ctx.device), seed=self.recipe.seed,
            ))
        with substituted(self.policy, self.ema.tensors):
            self.sampler.load_weights(self.policy)
            groups = self.sampler.sample(prompts, 1, seed=seed)
        return [group[0] for group in groups]

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None


@hookimpl
def prefopt_register_algorithms():
    return [SAPO]
