"""A pairwise judge that asks a causal language model which of two completions is better.

``algorithm.judge: {name: llm_pairwise, path: <hub id, local directory or smollm2-135m-instruct>}`` loads
the model with ``AutoModelForCausalLM`` (its own code only with ``trust_remote_code: true``) the first time
it judges. For each (prompt, first, second) it fills ``template`` and reads the model's next-token logits
of the two answers in ``labels``, the first naming ``first`` and the second naming ``second``: after the
question and any tokens both answers begin with (SmolLM2 writes " 1" as a space token, then "1"), the
logits of the first token where they differ. The probability that ``first`` is better is the softmax over
those two logits alone (the rest of the vocabulary does not count): a model that would say neither still
has to lean one way.

LLM judges favour one position (Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and Chatbot
Arena", arXiv:2306.05685). With ``both_orders`` (the default) every pair is asked in both orders, and the
probability is the mean of the two answers, so swapping the completions gives exactly 1 - p. It costs two
forwards per pair.

``format`` says how the filled template reaches the model:

- ``chat``: as the user's message, rendered with the model's chat template and its generation prompt, so
  the answer is the assistant's first token; ``labels`` default to ``["1", "2"]``;
- ``plain``: the text followed by ``"\\nAnswer:"``; ``labels`` default to ``[" 1", " 2"]``;
- ``auto`` (default): ``chat`` when the model's tokenizer has a chat template, else ``plain``.

A prompt given as chat messages is written into the template one ``role: content`` line per message.
Each completion is cut to its first ``max_completion_tokens`` tokens (of the judge's tokenizer) before it
goes into the template, so a runaway sample cannot make the judge's input unbounded.
"""

from __future__ import annotations

import inspect
import string
from typing import Literal, Optional, Sequence

import torch
from pydantic import Field, field_validator

from prefopt import JudgeConfig, JudgeContext, PairwiseJudge, hookimpl, pad_token_ids
from prefopt.errors import PrefoptError
from prefopt.api.judge import drop_models

DEFAULT_TEMPLATE = (
    "Below are a request and two responses to it. Which response is better: more helpful, more accurate "
    "and better written?\n\n"
    "### Request\n{prompt}\n\n"
    "### Response 1\n{first}\n\n"
    "### Response 2\n{second}\n\n"
    "Reply with the number of the better response only: 1 or 2."
)
PLACEHOLDERS = {"prompt", "first", "second"}
DEFAULT_LABELS = {"chat": ("1", "2"), "plain": (" 1", " 2")}
PLAIN_SUFFIX = "\nAnswer:"


class LLMPairwiseConfig(JudgeConfig):
    path: str = Field(
        ..., description="The judging model: a hub id, a local directory with a causal LM, or "
        "smollm2-135m-instruct (the embedded default). An instruction-tuned model judges best.",
    )
    revision: Optional[str] = Field(None, description="Hub revision of path; None: the default branch.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Precision the judging model is loaded and run in."
    )
    trust_remote_code: bool = Field(
        False, description="Run code that ships with the checkpoint; only for a model you trust."
    )
    template: str = Field(
        DEFAULT_TEMPLATE, description="The question put to the model, with the placeholders {prompt}, {first} "
        "and {second} (each exactly once; write other braces doubled, {{ and }}).",
    )
    labels: Optional[tuple[str, str]] = Field(
        None, description="The answers naming the first and the second response; the model's logits of the "
        "first token where they differ are compared. None: [\"1\", \"2\"] for format chat, [\" 1\", \" 2\"] for plain.",
    )
    format: Literal["auto", "chat", "plain"] = Field(
        "auto", description="chat: the template is the user's message in the model's chat template. plain: the "
        "template text then \"\\nAnswer:\". auto: chat when the tokenizer has a chat template, else plain.",
    )
    both_orders: bool = Field(
        True, description="Ask every pair in both orders and average, which cancels the judge's position bias "
        "(two forwards per pair).",
    )
    max_completion_tokens: int = Field(
        512, ge=1, le=1_000_000, description="Each completion is cut to its first this many tokens before it "
        "is put in the template.",
    )
    batch_size: int = Field(8, ge=1, le=4096, description="Questions per forward pass.")

    @field_validator("template")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(value) if name is not None]
        except ValueError as exc:
            raise ValueError(f"{exc}; write a literal brace doubled ({{{{ or }}}})") from None
        if sorted(fields) != sorted(PLACEHOLDERS):
            raise ValueError(
                f"needs each of {{prompt}}, {{first}} and {{second}} exactly once, found "
                f"{', '.join('{' + f + '}' for f in fields) or 'none'}; write a literal brace doubled"
            )
        return value

    @field_validator("labels")
    @classmethod
    def _distinct(cls, value):
        if value is not None and (value[0] == value[1] or not value[0] or not value[1]):
            raise ValueError(f"needs two different, non-empty answers, got {list(value)}")
        return value


class LLMPairwiseJudge(PairwiseJudge):
    """Ask a causal LM which of two completions is better, in both orders (an LLM-as-a-judge).

    The model is loaded on first use on the online algorithm's device, in eval mode, and run without
    gradients; ``close()`` frees it. See the module docstring for the template, labels and formats.
    """

    name = "llm_pairwise"
    Config = LLMPairwiseConfig

    def __init__(self, config: LLMPairwiseConfig, context: JudgeContext) -> None:
        super().__init__(config, context)
        self._model = None
        self._tokenizer = None
        self._pad_id = 0
        self._chat = False
        self._keeps_logits = False  # whether the model's forward takes logits_to_keep (transformers' own do)
        self._answer_start: list[int] = []  # tokens both answers begin with, appended to every question
        self._answer_ids: tuple[int, int] = (0, 0)  # the first token where the answers differ

    # ------------------------------------------------------------------------------------------------------

    def prefer(self, prompts: Sequence, first: Sequence[str], second: Sequence[str]) -> list[float]:
        if not prompts:
            return []
        self._load()
        first, second = [self._cut(c) for c in first], [self._cut(c) for c in second]  # once for both orders
        forward = self._first_is_better(prompts, first, second)
        if not self.config.both_orders:
            return forward
        backward = self._first_is_better(prompts, second, first)
        return [(f + (1.0 - b)) / 2 for f, b in zip(forward, backward)]

    def close(self) -> None:
        drop_models(self, "_model", "_tokenizer")

    # ------------------------------------------------------------------------------------------------------

    def _first_is_better(self, prompts: Sequence, first: Sequence[str], second: Sequence[str]) -> list[float]:
        """P(first is better) for each question, asked in this order only."""
        sequences = [self._encode(p, a, b) for p, a, b in zip(prompts, first, second)]
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))  # similar lengths per batch
        device = next(self._model.parameters()).device
        answer_ids = torch.tensor(self._answer_ids, device=device)
        result = [0.0] * len(sequences)
        with torch.no_grad():
            for start in range(0, len(order), self.config.batch_size):
                chunk = order[start : start + self.config.batch_size]
                batch = [sequences[i] for i in chunk]
                input_ids, attention_mask = pad_token_ids(batch, self._pad_id, device=device)
                last = torch.tensor([len(ids) - 1 for ids in batch], device=device)  # right padding: exact
                pair_logits = self._answer_logits(input_ids, attention_mask, last)[:, answer_ids].float()
                for i, p in zip(chunk, pair_logits.softmax(-1)[:, 0].tolist()):
                    result[i] = p
        return result

    def _answer_logits(self, input_ids, attention_mask, last):
        """Each row's next-token logits after its position ``last``. Only the positions some row ends at go
        through the output head (``logits_to_keep``), not the whole batch: a full-vocabulary row per token
        would dominate the judge's memory."""
        rows = torch.arange(len(last), device=last.device)
        if not self._keeps_logits:
            return self._model(input_ids=input_ids, attention_mask=attention_mask).logits[rows, last]
        kept, where = torch.unique(last, return_inverse=True)  # sorted positions, and each row's among them
        logits = self._model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=kept).logits
        return logits[rows, where]

    def _load(self) -> None:
        if self._model is not None:
            return
        from prefopt.models.loading import load_causal_lm, load_tokenizer, resolve_model_path

        cfg = self.config
        path = resolve_model_path(cfg.path)
        common = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code, "key": "algorithm.judge.path"}
        tokenizer = load_tokenizer(path, **common)
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if cfg.format == "chat" and not has_template:
            raise PrefoptError(
                f"algorithm.judge.format is chat but the tokenizer of {cfg.path!r} has no chat template; "
                "use format plain"
            )
        self._chat = cfg.format == "chat" or (cfg.format == "auto" and has_template)
        self._tokenizer = tokenizer
        # Padding is masked and each row is read at its own last token, so any id pads: a tokenizer with neither
        # a pad nor an EOS token (load_tokenizer pads with EOS) pads with 0.
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._answer_start, self._answer_ids = self._find_answers(
            cfg.labels or DEFAULT_LABELS["chat" if self._chat else "plain"]
        )
        model = load_causal_lm(path, dtype=cfg.dtype, **common)
        self._model = model.to(self.context.device).eval().requires_grad_(False)
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    def _find_answers(self, labels: tuple[str, str]) -> tuple[list[int], tuple[int, int]]:
        """The tokens both answers start with (a leading space, often) and the first token where they differ,
        read in place after a rendered question: tokenizers can merge across that boundary, so a label
        tokenized alone can differ."""
        question = self._render("a request", "one answer", "another answer")
        question_ids = self._ids(question)
        answers = []
        for label in labels:
            with_answer = self._ids(question + label)
            if with_answer[: len(question_ids)] != question_ids:
                raise PrefoptError(
                    f"algorithm.judge.labels: the answer {label!r} merges with the end of the question in the "
                    f"tokenizer of {self.config.path!r}; give labels that start a new token (e.g. with or without "
                    "a leading space)"
                )
            answers.append(with_answer[len(question_ids) :])
        shared = 0
        while shared < min(map(len, answers)) and answers[0][shared] == answers[1][shared]:
            shared += 1
        if shared == min(map(len, answers)):
            raise PrefoptError(
                f"algorithm.judge.labels {list(labels)}: one answer's tokens begin the other's in the tokenizer of "
                f"{self.config.path!r}, so no token tells them apart; give answers that differ (e.g. \"1\" and \"2\")"
            )
        return answers[0][:shared], (answers[0][shared], answers[1][shared])

    def _encode(self, prompt, first: str, second: str) -> list[int]:
        request = prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
        return self._ids(self._render(request, first, second)) + self._answer_start

    def _render(self, request: str, first: str, second: str) -> str:
        question = self.config.template.format(prompt=request, first=first, second=second)
        if not self._chat:
            return question + PLAIN_SUFFIX
        messages = [{"role": "user", "content": question}]
        return self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _ids(self, text: str) -> list[int]:
        # a rendered chat template writes its own special tokens; plain text gets the tokenizer's (its BOS)
        return list(self._tokenizer(text, add_special_tokens=not self._chat)["input_ids"])

    def _cut(self, completion: str) -> str:
        ids = self._tokenizer(completion, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.config.max_completion_tokens:
            return completion
        return self._tokenizer.decode(ids[: self.config.max_completion_tokens])


@hookimpl
def prefopt_register_judges():
    return [LLMPairwiseJudge]
