"""Turn dataset rows, in any of TRL's preference formats, into ``PreferenceExample``s.

Formats (``data.format``):

- ``standard``: ``prompt``, ``chosen`` and ``rejected`` hold text.
- ``conversational``: ``prompt`` holds a list of ``{"role", "content"}`` messages (text is taken as one
  user message) and ``chosen``/``rejected`` hold the assistant messages that answer it. Responses that
  repeat the prompt messages first (as in HuggingFaceH4/ultrafeedback_binarized) have them removed.
- ``implicit_prompt``: no prompt column; ``chosen`` and ``rejected`` are whole texts or whole
  conversations, and their longest common prefix is the prompt.
- ``unpaired``: ``prompt``, ``completion`` and ``label`` (a bool, or 0/1): one completion judged
  desirable (true) or undesirable (false) on its own, as KTO trains on (TRL's unpaired preference
  format). The completion is text, or assistant messages answering the prompt as in ``conversational``
  (decided by the first completion). Examples come out with ``label`` set and ``rejected`` None.
- ``prompt_only``: only ``prompt``, holding text or a list of messages (TRL's prompt-only format);
  other columns are not read. Examples come out with ``chosen`` and ``rejected`` None: they are for an
  algorithm that samples and judges its own responses (the engine refuses them for any run that trains
  on the data's responses). A conversational prompt is tokenized exactly as in ``conversational`` rows.
- ``auto``: ``prompt_only`` when the rows have the prompt column and no value in any of ``chosen``,
  ``rejected`` and ``completion`` (absent columns or all null), else ``unpaired`` when they have
  ``completion`` and ``label`` columns and no ``chosen``, else ``implicit_prompt`` when the prompt
  column is absent, else ``conversational`` when the first ``chosen`` value is a list, else ``standard``.

A row that cannot be used (an empty value, a value of the wrong kind, chosen equal to rejected, a
label that is not a bool or 0/1) is not an error here: it is counted by reason, and
``data.invalid_rows`` later decides whether that fails.
"""

from __future__ import annotations

import os
from typing import Any

import datasets

from prefopt.data.types import Messages, PreferenceExample, Text
from prefopt.errors import PrefoptError, did_you_mean

FORMATS = ("auto", "standard", "conversational", "implicit_prompt", "unpaired", "prompt_only")
KEYS = ("prompt", "chosen", "rejected")
UNPAIRED_KEYS = ("prompt", "completion", "label")
# columns that hold responses: rows with a prompt and no value in any of these are prompt-only
RESPONSE_KEYS = ("chosen", "rejected", "completion")
# what each column holds, for the messages that ask for it
HOLDS = {"label": "labels (true for a desirable completion, false for an undesirable one)"}


def to_examples(
    rows: datasets.Dataset, columns: dict[str, str], fmt: str, source: str
) -> tuple[list[PreferenceExample], dict[str, int], dict[str, int]]:
    """Normalize rows into examples, counting the rows that cannot be used.

    Args:
        rows (datasets.Dataset): one split, as returned by ``load_rows``.
        columns (dict[str, str]): ``data.columns``: which column holds ``prompt``, ``chosen``,
            ``rejected``, ``completion`` and ``label``; a missing key means the column of that name.
        fmt (str): one of ``FORMATS``.
        source (str): where the rows came from, for messages, e.g. ``"data/train.jsonl (split train)"``.

    Returns:
        tuple: the usable examples in row order; unusable reason -> number of rows; unusable reason ->
        first (0-based) row with it.

    Raises:
        PrefoptError: an unknown format, a missing column (naming the columns there are), or a first
            value whose kind contradicts an explicit format.
    """
    if fmt not in FORMATS:
        raise PrefoptError(
            f"data.format={fmt!r} is not a format{did_you_mean(fmt, FORMATS)}; "
            f"use one of {', '.join(FORMATS)}"
        )
    names = {key: columns.get(key, key) for key in KEYS + UNPAIRED_KEYS}
    if fmt == "prompt_only" or (fmt == "auto" and _looks_prompt_only(rows, names)):
        return _prompt_only_examples(rows, names, source)
    if fmt == "unpaired" or (fmt == "auto" and _looks_unpaired(rows, names)):
        return _unpaired_examples(rows, names, source)
    for key in ("chosen", "rejected"):
        _require_column(rows, key, names[key], source)
    if fmt == "auto":
        fmt = _detect_format(rows, names, source)
    uses_prompt = fmt != "implicit_prompt"
    if uses_prompt:
        _require_column(rows, "prompt", names["prompt"], source)
    _check_first_value(rows, names["chosen"], fmt, source)

    read = list(dict.fromkeys(names[key] for key in KEYS if uses_prompt or key != "prompt"))
    values = rows.select_columns(read).to_dict()  # one conversion to Python, not one per row
    prompts = values[names["prompt"]] if uses_prompt else [None] * len(rows)
    triples = zip(prompts, values[names["chosen"]], values[names["rejected"]], strict=True)
    normalize = _NORMALIZERS[fmt]
    examples: list[PreferenceExample] = []
    skipped: dict[str, int] = {}
    first_skipped_row: dict[str, int] = {}
    for row, (prompt, chosen, rejected) in enumerate(triples):
        normalized = normalize(prompt, chosen, rejected, names)
        if isinstance(normalized, str):
            count_unusable(skipped, first_skipped_row, normalized, row)
        else:
            examples.append(PreferenceExample(row, *normalized))
    return examples, skipped, first_skipped_row


def _looks_prompt_only(rows: datasets.Dataset, names: dict[str, str]) -> bool:
    if names["prompt"] not in rows.column_names:
        return False
    # A column that holds no value counts as absent: the splits of a directory of JSON files all get every
    # file's columns, so prompts in train.jsonl beside pairs in test.jsonl come with null responses.
    return all(names[key] not in rows.column_names or _first_value(rows, names[key]) is None
               for key in RESPONSE_KEYS)


def _prompt_only_examples(
    rows: datasets.Dataset, names: dict[str, str], source: str
) -> tuple[list[PreferenceExample], dict[str, int], dict[str, int]]:
    """``to_examples`` for ``data.format=prompt_only``: one example per usable prompt, without responses."""
    _require_column(rows, "prompt", names["prompt"], source)
    prompts = rows.select_columns([names["prompt"]]).to_dict()[names["prompt"]]
    examples: list[PreferenceExample] = []
    skipped: dict[str, int] = {}
    first_skipped_row: dict[str, int] = {}
    for row, prompt in enumerate(prompts):
        normalized = _prompt_only(prompt, names)
        if isinstance(normalized, str):
            count_unusable(skipped, first_skipped_row, normalized, row)
        else:
            examples.append(PreferenceExample(row, normalized[0], None, None))
    return examples, skipped, first_skipped_row


def _looks_unpaired(rows: datasets.Dataset, names: dict[str, str]) -> bool:
    have = set(rows.column_names)
    return names["completion"] in have and names["label"] in have and names["chosen"] not in have


def _unpaired_examples(
    rows: datasets.Dataset, names: dict[str, str], source: str
) -> tuple[list[PreferenceExample], dict[str, int], dict[str, int]]:
    """``to_examples`` for ``data.format=unpaired``: one labelled example per usable row."""
    for key in UNPAIRED_KEYS:
        _require_column(rows, key, names[key], source)
    read = list(dict.fromkeys(names[key] for key in UNPAIRED_KEYS))
    values = rows.select_columns(read).to_dict()
    # one split is one kind, as for the paired formats: the first completion decides it
    conversational = isinstance(_first_value(rows, names["completion"]), list)
    examples: list[PreferenceExample] = []
    skipped: dict[str, int] = {}
    first_skipped_row: dict[str, int] = {}
    columns = (values[names[key]] for key in UNPAIRED_KEYS)
    for row, (prompt, completion, label) in enumerate(zip(*columns, strict=True)):
        normalized = _unpaired(prompt, completion, label, names, conversational)
        if isinstance(normalized, str):
            count_unusable(skipped, first_skipped_row, normalized, row)
        else:
            prompt, completion, label = normalized
            examples.append(PreferenceExample(row, prompt, completion, None, label))
    return examples, skipped, first_skipped_row


def count_unusable(skipped: dict[str, int], first_skipped_row: dict[str, int], reason: str, row: int) -> None:
    """Add one unusable row to the per-reason counts, remembering the first row of each reason."""
    skipped[reason] = skipped.get(reason, 0) + 1
    first_skipped_row.setdefault(reason, row)


def _require_column(rows: datasets.Dataset, key: str, name: str, source: str) -> None:
    if name not in rows.column_names:
        hint = did_you_mean(name, rows.column_names)
        raise PrefoptError(
            f"{source}: no column {name!r}{hint}; the columns are {', '.join(rows.column_names)}; "
            f"set data.columns.{key}=<name> to the one that holds the {HOLDS.get(key, key + ' text')}"
        )


def _detect_format(rows: datasets.Dataset, names: dict[str, str], source: str) -> str:
    if names["prompt"] not in rows.column_names:
        if names["prompt"] != "prompt":
            # a prompt column was named explicitly, so its absence is a mistake, not an implicit prompt
            _require_column(rows, "prompt", names["prompt"], source)
        return "implicit_prompt"
    first = _first_value(rows, names["chosen"])
    return "conversational" if isinstance(first, list) else "standard"


def _first_value(rows: datasets.Dataset, name: str) -> Any:
    """The first non-null value of a column (a leading empty row should not decide the format)."""
    for value in rows[name]:
        if value is not None:
            return value
    return None


def _check_first_value(rows: datasets.Dataset, name: str, fmt: str, source: str) -> None:
    """Fail early when the whole split is in another format, instead of reporting every row unusable."""
    first = _first_value(rows, name)
    if fmt == "standard" and isinstance(first, list):
        raise PrefoptError(
            f"{source}: data.format=standard expects text in column {name!r}, but it holds "
            f"lists of messages; set data.format=conversational (or auto)"
        )
    if fmt == "conversational" and isinstance(first, str):
        raise PrefoptError(
            f"{source}: data.format=conversational expects lists of messages in column "
            f"{name!r}, but it holds text; set data.format=standard (or auto)"
        )


# Each normalizer returns (prompt, chosen, rejected) or the reason the row is unusable.
Normalized = tuple[Text, Text, Text] | str


def _standard(prompt: Any, chosen: Any, rejected: Any, names: dict[str, str]) -> Normalized:
    reason = _text_reason(names, prompt=prompt, chosen=chosen, rejected=rejected)
    if reason is not None:
        return reason
    if chosen == rejected:
        return f"same value in columns {names['chosen']!r} and {names['rejected']!r}"
    return prompt, chosen, rejected


def _text_reason(names: dict[str, str], **values: Any) -> str | None:
    """Why these values (column key -> value) are not all non-empty text, or None when they are."""
    for key, value in values.items():
        if value is not None and not isinstance(value, str):
            return f"column {names[key]!r} is not text"
        if _empty(value):
            return f"empty value in column {names[key]!r}"
    return None


def _conversational(prompt: Any, chosen: Any, rejected: Any, names: dict[str, str]) -> Normalized:
    normalized = _conversation(names, prompt, chosen=chosen, rejected=rejected)
    if isinstance(normalized, str):
        return normalized
    prompt, chosen, rejected = normalized
    if chosen == rejected:
        return f"same value in columns {names['chosen']!r} and {names['rejected']!r}"
    return prompt, chosen, rejected


def _conversation(names: dict[str, str], prompt: Any, **responses: Any) -> tuple[Messages, ...] | str:
    """(prompt, *responses) as message lists, or why they are not a prompt and its assistant answers.

    Text prompts become one user message; responses that repeat the prompt messages first lose them.
    """
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    normalized = {}
    for key, value in {"prompt": prompt, **responses}.items():
        if value is None:
            return f"empty value in column {names[key]!r}"
        messages = _messages(value)
        if messages is None:
            return f"column {names[key]!r} is not a list of role/content messages"
        normalized[key] = messages
    prompt = normalized.pop("prompt")
    answers = {key: _drop_prefix(messages, prompt) for key, messages in normalized.items()}
    for key, messages in {"prompt": prompt, **answers}.items():
        if _empty(messages):
            return f"empty value in column {names[key]!r}"
    for key, messages in answers.items():
        if messages[0]["role"] != "assistant":
            return f"column {names[key]!r} does not start with an assistant message"
    return (prompt, *answers.values())


def _unpaired(
    prompt: Any, completion: Any, label: Any, names: dict[str, str], conversational: bool
) -> tuple[Text, Text, bool] | str:
    """(prompt, completion, label) of an unpaired row, or the reason it is unusable.

    The completion follows the rules of ``standard`` or ``conversational`` (``conversational`` says
    which); a completion equal to another row's is fine, unlike a chosen equal to its rejected.
    """
    if label is None:
        return f"empty value in column {names['label']!r}"
    # bool, or the numbers 0 and 1 that booleans are often stored as (0.0 and 1.0 where a column of
    # numbers has gaps, which makes pandas write floats)
    if not (isinstance(label, bool) or (isinstance(label, (int, float)) and label in (0, 1))):
        return f"column {names['label']!r} is not a bool or 0/1"
    if conversational:
        normalized = _conversation(names, prompt, completion=completion)
        if isinstance(normalized, str):
            return normalized
        prompt, completion = normalized
    else:
        reason = _text_reason(names, prompt=prompt, completion=completion)
        if reason is not None:
            return reason
    return prompt, completion, bool(label)


def _prompt_only(prompt: Any, names: dict[str, str]) -> tuple[Text] | str:
    """(prompt,) of a prompt-only row, or the reason it is unusable. Each value decides its own kind: a
    list is messages (normalized as a ``conversational`` prompt is), anything else must be text."""
    if isinstance(prompt, list):
        return _conversation(names, prompt)
    reason = _text_reason(names, prompt=prompt)
    return reason if reason is not None else (prompt,)


def _implicit_prompt(_: Any, chosen: Any, rejected: Any, names: dict[str, str]) -> Normalized:
    both = f"columns {names['chosen']!r} and {names['rejected']!r}"
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if value is None:
            return f"empty value in column {names[key]!r}"
    if isinstance(chosen, list) and isinstance(rejected, list):
        chosen, rejected = _messages(chosen), _messages(rejected)
        if chosen is None or rejected is None:
            return f"{both} are not lists of role/content messages"
    elif not (isinstance(chosen, str) and isinstance(rejected, str)):
        return f"{both} are not both text or both lists of messages"
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if _empty(value):
            return f"empty value in column {names[key]!r}"
    if chosen == rejected:
        return f"same value in {both}"
    prompt = _common_prefix(chosen, rejected)
    chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
    if _empty(prompt):
        return f"no shared prompt at the start of {both}"
    for key, response in (("chosen", chosen), ("rejected", rejected)):
        if _empty(response):
            return f"column {names[key]!r} has nothing after the prompt it shares with the other"
        if isinstance(response, list) and response[0]["role"] != "assistant":
            # the chat template would answer the shared prompt with an assistant turn, not this one
            return f"column {names[key]!r} does not continue the shared prompt with an assistant message"
    return prompt, chosen, rejected


_NORMALIZERS = {"standard": _standard, "conversational": _conversational, "implicit_prompt": _implicit_prompt}


def _common_prefix(chosen: Text, rejected: Text) -> Text:
    """The longest common prefix of two strings (characters) or two message lists (whole messages)."""
    if isinstance(chosen, str):
        return os.path.commonprefix([chosen, rejected])
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared]


def _messages(value: Any) -> Messages | None:
    """``value`` as a list of messages without null fields, or None when it is not one.

    Arrow gives every message the union of all messages' keys, filling the missing ones with None;
    those would reach the chat template as ``tool_calls: None`` and the like, so they are dropped.
    """
    if not isinstance(value, list):
        return None
    messages = []
    for message in value:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and "content" in message):
            return None
        messages.append({k: v for k, v in message.items() if v is not None})
    return messages


def _drop_prefix(response: Messages, prompt: Messages) -> Messages:
    """The response without a leading copy of the prompt messages."""
    return response[len(prompt) :] if response[: len(prompt)] == prompt else response


def _empty(value: Text | None) -> bool:
    """None, whitespace-only text, or messages none of which has content."""
    if isinstance(value, list):
        return all(_empty_content(message.get("content")) for message in value)
    return _empty_content(value)


def _empty_content(content: Any) -> bool:
    # content is text, or a list of parts (multimodal messages)
    if isinstance(content, str):
        return not content.strip()
    return content is None or (isinstance(content, list) and not content)
