"""Tokenize preference examples into pairs of token ids that share one prompt.

The rules follow TRL's DPO tokenization where it is sensible:

- Message lists go through the tokenizer's chat template once, as text: the prompt with the generation
  prompt, and the whole conversation; the response is the conversation after the prompt text. Both
  are then tokenized without special tokens, since the template already wrote them.
- Plain text: the prompt is tokenized with the tokenizer's special tokens (its BOS, if it adds one)
  and the responses without.
- A prompt never starts with two BOS tokens (a text that already begins with BOS, tokenized by a
  tokenizer that adds one), and a response never ends with two EOS tokens.
- Truncation keeps the end of the prompt (the question is usually last) and the start of the
  responses, so that prompt + response fits ``max_length``.

Unpaired examples (``label`` set) are tokenized the same way, their mismatched completion as the
rejected response; that the two come out equal is no reason to drop one (see ``prefopt.data.unpaired``).
Prompt-only examples (no responses) go through the same prompt path, so a conversational prompt gets
the same ids as in a preference row; they come out as pairs with empty responses, and a prompt must still
leave room in ``max_length`` for the response an algorithm will sample.
"""

from __future__ import annotations

import hashlib
import json
import sys
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prefopt.data.formats import count_unusable
from prefopt.data.types import PreferenceExample, TokenizedPair, TokenizedPairs
from prefopt.errors import PrefoptError

INVALID_ROWS = ("error", "skip")
PROMPT_TOO_LONG = "prompt longer than max_length (no room left for a response)"
SAME_AFTER_TRUNCATION = "chosen and rejected identical after truncation to max_length"
# reasons that a longer max_length (or shorter max_prompt_length) would fix
LENGTH_REASONS = (PROMPT_TOO_LONG, SAME_AFTER_TRUNCATION)


def tokenize_examples(
    examples: Sequence[PreferenceExample],
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None,
    append_eos: bool,
    invalid_rows: str,
    source: str,
    skipped: dict[str, int] | None = None,
    first_skipped_row: dict[str, int] | None = None,
) -> TokenizedPairs:
    """Tokenize and truncate examples, then fail on or drop the unusable rows.

    Args:
        examples (Sequence[PreferenceExample]): from ``to_examples``, through ``for_loss`` (which
            gives every unpaired example its rejected response).
        tokenizer: a transformers tokenizer; it needs a chat template for message lists and an EOS
            token when ``append_eos``.
        max_length (int): most tokens in prompt + one response.
        max_prompt_length (int | None): most prompt tokens, kept from the prompt's end; None for no limit.
        append_eos (bool): end every response with EOS unless its text already ends with it
            (ignoring trailing whitespace, which chat templates often put after their end token).
        invalid_rows (str): ``"error"``: any unusable row fails, naming the first; ``"skip"``: they are
            dropped and counted.
        source (str): where the rows came from, for messages.
        skipped (dict[str, int] | None): unusable rows found earlier (by ``to_examples``), by reason.
        first_skipped_row (dict[str, int] | None): the first row of each of those reasons.

    Returns:
        TokenizedPairs: the pairs in row order, every unusable reason counted, and the fingerprint.

    Raises:
        PrefoptError: a setting is out of range; the tokenizer lacks what the data needs; any row is
            unusable and ``invalid_rows == "error"``; or no row is usable at all.
    """
    _check_settings(tokenizer, max_length, max_prompt_length, append_eos, invalid_rows, examples, source)
    if any(example.rejected is None and not example.prompt_only for example in examples):
        raise ValueError("unpaired examples need their mismatched completion first: pass them through for_loss")
    skipped = dict(skipped or {})
    first_skipped_row = dict(first_skipped_row or {})

    def unusable(reason: str, row: int) -> None:
        count_unusable(skipped, first_skipped_row, reason, row)

    rendered = _render_all(examples, tokenizer, source, unusable)
    pairs = _tokenize_rendered(rendered, tokenizer, append_eos, max_length, max_prompt_length, unusable)
    if skipped and invalid_rows == "error":
        raise _unusable_rows_error(source, skipped, first_skipped_row, max_prompt_length)
    if not pairs:
        raise PrefoptError(
            f"{source}: no usable rows ({_describe(skipped) or 'the split is empty'}); "
            f"{_fix(skipped, max_prompt_length)}"
        )
    settings = {"max_length": max_length, "max_prompt_length": max_prompt_length, "append_eos": append_eos}
    return TokenizedPairs(source, pairs, skipped, first_skipped_row, _fingerprint(tokenizer, settings, pairs))


def _render_all(
    examples: Sequence[PreferenceExample], tokenizer: Any, source: str, unusable: Callable[[str, int], None]
) -> list[_RenderedPair]:
    """Every example as text; one that cannot be rendered is passed to ``unusable`` with its reason."""
    rendered = []
    for example in examples:
        text = _render(example, tokenizer, source)
        if isinstance(text, str):
            unusable(text, example.row)
        else:
            rendered.append(text)
    return rendered


def _tokenize_rendered(
    rendered: list[_RenderedPair], tokenizer: Any, append_eos: bool, max_length: int, max_prompt_length: int | None,
    unusable: Callable[[str, int], None],
) -> list[TokenizedPair]:
    """Token ids of every rendered example, EOS appended and truncated; one left unusable by truncation is
    passed to ``unusable`` with its reason."""
    pairs = []
    encoded = _encode(rendered, tokenizer)
    for text, (prompt_ids, chosen_ids, rejected_ids) in zip(rendered, encoded, strict=True):
        prompt_ids = _without_doubled_bos(prompt_ids, tokenizer.bos_token_id)
        if append_eos and not text.prompt_only:
            chosen_ids = _with_eos(chosen_ids, text.chosen, tokenizer)
            rejected_ids = _with_eos(rejected_ids, text.rejected, tokenizer)
        pair = _truncate(text, prompt_ids, chosen_ids, rejected_ids, max_length, max_prompt_length)
        if isinstance(pair, str):
            unusable(pair, text.row)
        else:
            pairs.append(pair)
    return pairs


def _check_settings(
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int | None,
    append_eos: bool,
    invalid_rows: str,
    examples: Sequence[PreferenceExample],
    source: str,
) -> None:
    if invalid_rows not in INVALID_ROWS:
        raise PrefoptError(f"data.invalid_rows={invalid_rows!r}: use one of {', '.join(INVALID_ROWS)}")
    if max_length < 2:
        raise PrefoptError(
            f"data.max_length={max_length}: it must be at least 2 (one prompt and one response token)"
        )
    if max_prompt_length is not None and not 1 <= max_prompt_length < max_length:
        raise PrefoptError(
            f"data.max_prompt_length={max_prompt_length}: it must be at least 1 and less than "
            f"data.max_length ({max_length}), to leave room for the response"
        )
    if append_eos and tokenizer.eos_token_id is None:
        raise PrefoptError(
            "data.append_eos=true, but the tokenizer has no EOS token; set data.append_eos=false "
            "or use a tokenizer with one"
        )
    if getattr(tokenizer, "chat_template", None) is None and any(
        isinstance(e.prompt, list) for e in examples
    ):
        raise PrefoptError(
            f"{source}: the rows are conversations, but the tokenizer has no chat template to "
            f"render them; use an instruct/chat model's tokenizer, or plain-text data "
            f"(data.format=standard)"
        )


@dataclass(frozen=True)
class _RenderedPair:
    """One example as text; ``templated`` text already holds its special tokens."""

    row: int
    prompt: str
    chosen: str
    rejected: str
    templated: bool
    label: bool | None = None
    prompt_only: bool = False  # no responses: chosen and rejected are empty text


def _render(example: PreferenceExample, tokenizer: Any, source: str) -> _RenderedPair | str:
    """The example as text, or the reason it cannot be rendered."""
    if isinstance(example.prompt, str):
        return _RenderedPair(
            example.row, example.prompt, example.chosen or "", example.rejected or "", templated=False,
            label=example.label, prompt_only=example.prompt_only,
        )
    # a prompt-only example renders its prompt as a pair's does, and has no conversations to cut
    responses = () if example.prompt_only else (example.chosen, example.rejected)
    try:
        prompt = tokenizer.apply_chat_template(example.prompt, add_generation_prompt=True, tokenize=False)
        conversations = [
            tokenizer.apply_chat_template(example.prompt + response, tokenize=False) for response in responses
        ]
    except Exception as exc:  # jinja raises for, e.g., roles that do not alternate
        return f"the chat template rejects the messages: {_first_line(exc)}"
    if example.prompt_only:
        return _RenderedPair(example.row, prompt, "", "", templated=True, prompt_only=True)
    for conversation in conversations:
        if not conversation.startswith(prompt):
            raise PrefoptError(
                f"{source}: row {example.row}: the tokenizer's chat template renders the prompt differently "
                f"alone than at the start of the conversation, so the response cannot be cut "
                f"from it; use another tokenizer or plain-text data (data.format=standard)"
            )
    chosen, rejected = (conversation[len(prompt) :] for conversation in conversations)
    return _RenderedPair(example.row, prompt, chosen, rejected, templated=True, label=example.label)


def _encode(rendered: list[_RenderedPair], tokenizer: Any) -> list[tuple[list[int], list[int], list[int]]]:
    """Token ids of every prompt and response, tokenized in batches (the fast tokenizers parallelize)."""
    prompts: list[list[int]] = [[] for _ in rendered]
    for templated in (False, True):
        # templated text carries its own special tokens; plain prompts get the tokenizer's
        which = [i for i, text in enumerate(rendered) if text.templated == templated]
        ids = _ids(tokenizer, [rendered[i].prompt for i in which], add_special_tokens=not templated)
        for i, prompt_ids in zip(which, ids, strict=True):
            prompts[i] = prompt_ids
    chosen = _ids(tokenizer, [text.chosen for text in rendered], add_special_tokens=False)
    rejected = _ids(tokenizer, [text.rejected for text in rendered], add_special_tokens=False)
    return list(zip(prompts, chosen, rejected, strict=True))


def _ids(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=add_special_tokens, return_attention_mask=False)
    return encoded["input_ids"]


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _without_doubled_bos(ids: list[int], bos_token_id: int | None) -> list[int]:
    # happens when the text already starts with BOS and the tokenizer adds another
    while bos_token_id is not None and len(ids) >= 2 and ids[0] == ids[1] == bos_token_id:
        ids = ids[1:]
    return ids


def _with_eos(ids: list[int], text: str, tokenizer: Any) -> list[int]:
    # A chat template ends a turn with its end token and often a newline ("<|im_end|>\n"): the text
    # without trailing whitespace, not only the last id, says whether the response is already closed.
    if text.rstrip().endswith(tokenizer.eos_token) or (ids and ids[-1] == tokenizer.eos_token_id):
        return ids
    return ids + [tokenizer.eos_token_id]


def _truncate(
    text: _RenderedPair,
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    max_length: int,
    max_prompt_length: int | None,
) -> TokenizedPair | str:
    """The pair cut to fit, or the reason nothing usable fits."""
    if max_prompt_length is not None:
        prompt = prompt[-max_prompt_length:]
    if not prompt:
        return "prompt has no tokens"  # the first response token would have nothing to be predicted from
    if len(prompt) >= max_length:
        return PROMPT_TOO_LONG
    if text.prompt_only:
        return TokenizedPair(text.row, tuple(prompt), (), ())
    room = max_length - len(prompt)
    chosen, rejected = chosen[:room], rejected[:room]
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if not response:
            return f"{name} response has no tokens"
    if chosen == rejected and text.label is None:
        return SAME_AFTER_TRUNCATION  # a pair that prefers nothing; an unpaired example may repeat itself
    return TokenizedPair(text.row, tuple(prompt), tuple(chosen), tuple(rejected), text.label)


def _unusable_rows_error(
    source: str, skipped: dict[str, int], first_skipped_row: dict[str, int], max_prompt_length: int | None
) -> PrefoptError:
    reason = min(first_skipped_row, key=first_skipped_row.get)
    total = sum(skipped.values())
    others = f"; {total} unusable rows in all ({_describe(skipped)})" if total > 1 else ""
    return PrefoptError(
        f"{source}: row {first_skipped_row[reason]} (counting from 0) is unusable: {reason}"
        f"{others}; {_fix([reason], max_prompt_length)}, or set data.invalid_rows=skip to drop "
        f"such rows"
    )


def _describe(skipped: dict[str, int]) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in skipped.items())


def _fix(reasons: Iterable[str], max_prompt_length: int | None) -> str:
    """How to make rows with these reasons usable."""
    if any(reason in LENGTH_REASONS for reason in reasons):
        prompt_fix = (
            "set data.max_prompt_length" if max_prompt_length is None else "lower data.max_prompt_length"
        )
        return f"raise data.max_length or {prompt_fix}"
    return "fix or remove those rows in the data"


def _fingerprint(tokenizer: Any, settings: dict, pairs: list[TokenizedPair]) -> str:
    """sha256 over the tokenizer's content, the tokenization settings, every token id in order, and the
    labels of unpaired examples.

    Token ids are hashed as packed little-endian int64 arrays, not as Python reprs: about 0.3 s for
    five million tokens. Paired data adds nothing for labels, so its fingerprints (and reference
    caches) are those it had before labels existed.
    """
    digest = hashlib.sha256()
    digest.update(_tokenizer_identity(tokenizer))
    digest.update(json.dumps(settings, sort_keys=True).encode())
    lengths, ids = array("q"), array("q")
    for pair in pairs:
        lengths.extend((len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)))
        ids.extend(pair.prompt_ids)
        ids.extend(pair.chosen_ids)
        ids.extend(pair.rejected_ids)
    if sys.byteorder == "big":
        lengths.byteswap()
        ids.byteswap()
    digest.update(lengths.tobytes())
    digest.update(ids.tobytes())
    if any(pair.label is not None for pair in pairs):
        digest.update(b"labels" + bytes(int(bool(pair.label)) for pair in pairs))
    return digest.hexdigest()


def _tokenizer_identity(tokenizer: Any) -> bytes:
    """What makes the tokenizer what it is, by content: ``name_or_path`` names a place, not a tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # transformers leaves the last call's truncation and padding on the backend; neither is identity
        state.pop("truncation", None)
        state.pop("padding", None)
        vocabulary = json.dumps(state)  # to_str's own key order is stable, so no sorting
    else:
        vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")}
    chat_template = str(getattr(tokenizer, "chat_template", None))
    return json.dumps([special, chat_template]).encode() + vocabulary.encode()
