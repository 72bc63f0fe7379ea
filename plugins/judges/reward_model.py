"""A judge that scores completions with a reward model: a transformers sequence-classification checkpoint.

``algorithm.judge: {name: reward_model, path: <hub id or local directory>}`` loads the checkpoint with
``AutoModelForSequenceClassification`` (safetensors weights only; its own code only with
``trust_remote_code: true``) the first time it scores, and reads one logit per (prompt, completion) as
the completion's reward. How the two are put together is ``format``:

- ``chat``: the reward model's chat template renders ``[user: prompt, assistant: completion]`` (a prompt
  that is already a list of chat messages is kept as it is, and the completion appended as the
  assistant's turn); the rendered text is tokenized without adding special tokens, since the template
  writes its own;
- ``plain``: the prompt text followed directly by the completion, tokenized as the tokenizer does by
  default (its BOS or CLS included);
- ``auto`` (default): ``chat`` when the reward model's tokenizer has a chat template, since reward models
  that ship one were trained on conversations rendered with it; ``plain`` otherwise.

Sequences are right-padded in batches of similar length with the tokenizer's pad token (its EOS when it has
none), and ``model.config.pad_token_id`` is set to that token, because a decoder reward model reads its
score at the last token that is not padding. A sequence longer than ``max_length`` tokens is cut to its
first ``max_length`` tokens (the end of the completion is then not seen; a warning counts them).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Literal, Optional, Sequence, Union

import torch
from pydantic import Field, field_validator

from prefopt import JudgeConfig, JudgeContext, ScoreJudge, hookimpl, pad_token_ids
from prefopt.errors import PrefoptError, did_you_mean
from prefopt.api.judge import drop_models

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RewardModelConfig(JudgeConfig):
    path: str = Field(
        ..., description="The reward model: a hub id or a local directory holding a sequence-classification "
        "checkpoint (config.json, safetensors weights, tokenizer).",
    )
    revision: Optional[str] = Field(
        None, description="Hub revision (branch, tag or commit) of path; None: the default branch."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Precision the reward model is loaded and run in."
    )
    batch_size: int = Field(8, ge=1, le=4096, description="Sequences scored per forward pass.")
    max_length: int = Field(
        2048, ge=1, le=1_000_000, description="Longest sequence (prompt and completion, in the reward model's "
        "tokens) scored whole; a longer one is cut to its first max_length tokens.",
    )
    trust_remote_code: bool = Field(
        False, description="Run code that ships with the checkpoint; only for a reward model you trust."
    )
    format: Literal["auto", "plain", "chat"] = Field(
        "auto", description="How prompt and completion become one sequence. chat: the reward model's chat "
        "template over [user: prompt, assistant: completion]. plain: prompt text then completion. auto: chat "
        "when the reward model's tokenizer has a chat template, else plain.",
    )
    label: Optional[Union[int, str]] = Field(
        None, description="For a model with several outputs, the one that is the reward: its index, or its "
        "name in the model's id2label. None: the model must have exactly one output.",
    )

    @field_validator("label")
    @classmethod
    def _label_index(cls, value):
        if isinstance(value, int) and value < 0:
            raise ValueError(f"{value} is negative; give an output index (0 for the first) or a label name")
        return value


class RewardModelJudge(ScoreJudge):
    """Score each completion with a sequence-classification reward model (hub id or local directory).

    The model is loaded on first use on the online algorithm's device, in eval mode, and run without
    gradients; ``close()`` frees it. See the module docstring for ``format``, padding and truncation.
    """

    name = "reward_model"
    Config = RewardModelConfig

    def __init__(self, config: RewardModelConfig, context: JudgeContext) -> None:
        super().__init__(config, context)
        self._model = None
        self._tokenizer = None
        self._pad_id: Optional[int] = None
        self._label_index = 0

    # ------------------------------------------------------------------------------------------------------

    def scores(self, prompts: Sequence, completions: Sequence[str]) -> list[float]:
        if not completions:
            return []
        self._load()
        sequences = [self._encode(prompt, completion) for prompt, completion in zip(prompts, completions)]
        truncated = sum(len(ids) > self.config.max_length for ids in sequences)
        if truncated:
            log.warning("reward model judge: %d of %d sequences are longer than algorithm.judge.max_length=%d "
                        "tokens and were cut", truncated, len(sequences), self.config.max_length)
            sequences = [ids[: self.config.max_length] for ids in sequences]
        # Longest first, so each batch holds sequences of similar length (little padding).
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        batch_size = self.config.batch_size if self._pad_id is not None else 1
        device = next(self._model.parameters()).device
        scores = [0.0] * len(sequences)
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                input_ids, attention_mask = pad_token_ids([sequences[i] for i in chunk], self._pad_id, device=device)
                logits = self._model(input_ids=input_ids, attention_mask=attention_mask).logits
                for i, value in zip(chunk, logits[:, self._label_index].float().tolist()):
                    scores[i] = value
        for i, value in enumerate(scores):
            if not math.isfinite(value):
                raise PrefoptError(
                    f"algorithm.judge.path {self.config.path!r}: the reward model gave a non-finite score ({value}) "
                    f"for completion {i}; try algorithm.judge.dtype=float32"
                )
        return scores

    def close(self) -> None:
        drop_models(self, "_model", "_tokenizer")

    # ------------------------------------------------------------------------------------------------------

    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        cfg = self.config
        where = f"algorithm.judge.path {cfg.path!r}"
        source = os.path.expanduser(cfg.path)
        if (cfg.path.startswith(("./", "../", "~")) or os.path.isabs(source)) and not os.path.isdir(source):
            raise PrefoptError(f"{where}: no such directory; give a hub id or a local reward-model directory")
        common = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **common)
            model, info = AutoModelForSequenceClassification.from_pretrained(
                source, dtype=DTYPES[cfg.dtype], use_safetensors=True, output_loading_info=True, **common
            )
        except OSError as exc:
            raise PrefoptError(
                f"{where}: cannot load a reward model ({_first_line(exc)}); give a hub id or a local directory "
                "with config.json, safetensors weights and a tokenizer"
            ) from None
        except ValueError as exc:
            if "trust_remote_code" in str(exc):
                raise PrefoptError(
                    f"{where} ships its own code; set algorithm.judge.trust_remote_code=true if you trust it"
                ) from None
            raise PrefoptError(
                f"{where}: cannot load it as a sequence-classification model ({_first_line(exc)})"
            ) from None
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise PrefoptError(
                f"{where} is not a reward model: its checkpoint lacks {shown}, which would be random; give a "
                "sequence-classification checkpoint (a trained reward head)"
            )
        self._label_index = self._resolve_label(model.config)

        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
            tokenizer.pad_token = tokenizer.eos_token
        self._pad_id = tokenizer.pad_token_id  # None: no pad and no EOS token, so sequences go one at a time
        # The model finds each sequence's last real token as the last one that is not its pad token.
        model.config.pad_token_id = self._pad_id
        text_config = model.config.get_text_config()
        if text_config is not model.config:
            text_config.pad_token_id = self._pad_id

        self._tokenizer = tokenizer
        self._model = model.to(self.context.device).eval().requires_grad_(False)

    def _resolve_label(self, model_config) -> int:
        cfg, where = self.config, f"algorithm.judge.path {self.config.path!r}"
        count = int(model_config.num_labels)
        names = {str(name): int(index) for index, name in (model_config.id2label or {}).items()}
        if cfg.label is None:
            if count != 1:
                listed = ", ".join(f"{index}={name}" for name, index in sorted(names.items(), key=lambda x: x[1]))
                raise PrefoptError(
                    f"{where} has {count} outputs ({listed}); set algorithm.judge.label to the one that is the "
                    "reward (its index or name)"
                )
            return 0
        if isinstance(cfg.label, int):
            if cfg.label >= count:
                raise PrefoptError(
                    f"algorithm.judge.label is {cfg.label} but {cfg.path!r} has {count} output(s); give an index "
                    f"from 0 to {count - 1}"
                )
            return cfg.label
        if cfg.label not in names:
            raise PrefoptError(
                f"algorithm.judge.label {cfg.label!r} is not a label of {cfg.path!r} (labels: "
                f"{', '.join(sorted(names))}){did_you_mean(cfg.label, names)}"
            )
        return names[cfg.label]

    def _encode(self, prompt, completion: str) -> list[int]:
        tokenizer, cfg = self._tokenizer, self.config
        has_template = bool(getattr(tokenizer, "chat_template", None))
        chat = cfg.format == "chat" or (cfg.format == "auto" and has_template)
        if chat:
            if not has_template:
                raise PrefoptError(
                    f"algorithm.judge.format is chat but the tokenizer of {cfg.path!r} has no chat template; "
                    "use format plain (text prompts only)"
                )
            messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            messages.append({"role": "assistant", "content": completion})
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not isinstance(prompt, str):
            if cfg.format == "plain":
                raise PrefoptError(
                    "algorithm.judge.format is plain but a prompt is a list of chat messages; use format chat or auto"
                )
            raise PrefoptError(
                f"a prompt is a list of chat messages but the tokenizer of {cfg.path!r} has no chat template to "
                "render it (algorithm.judge.format auto); give text prompts or a reward model with a chat template"
            )
        return list(tokenizer(prompt + completion)["input_ids"])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@hookimpl
def prefopt_register_judges():
    return [RewardModelJudge]
