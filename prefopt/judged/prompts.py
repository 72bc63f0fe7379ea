"""The held-out prompts a run is evaluated on, as the data wrote them and as the model sees them.

The task's own (``Task.eval_prompts``), else the distinct prompts of the held-out rows (``data.eval_split``,
or the task's held-out file): the prompts ``eval.samples`` samples while training
(``prefopt.engine.samples``), tokenized as training tokenizes prompts (chat messages
through the chat template, cut to their last ``data.max_prompt_length`` tokens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from prefopt.api.task import Text
from prefopt.errors import PrefoptError

__all__ = ["HeldOutPrompts", "held_out_prompts", "held_out_rows_prompts", "prompt_texts", "tokenized"]


@dataclass(frozen=True)
class HeldOutPrompts:
    texts: list[Text]  # as the data wrote them: what scorers and judges read
    ids: list[tuple[int, ...]]  # as training tokenizes them: what the model continues
    source: str  # where they come from, for messages


def held_out_prompts(recipe, tokenizer, task, task_data, count: int | None, key: str = "eval.num_prompts"
                     ) -> HeldOutPrompts:
    """The first ``count`` held-out prompts (all of them when None); asking for more than there are is a
    one-line error naming ``key``. A prompt too long to leave room for a completion is left out."""
    texts, source = prompt_texts(recipe, task, task_data)
    if count is not None:
        if count > len(texts):
            raise PrefoptError(f"{key} is {count}, but {source} holds {len(texts)} distinct prompts; ask for fewer")
        texts = texts[:count]
    if not texts:
        raise PrefoptError(f"{source} holds no prompts to evaluate on")
    return tokenized(texts, tokenizer, recipe.data, source)


def prompt_texts(recipe, task, task_data) -> tuple[list[Text], str]:
    """Every held-out prompt in order, as the data wrote it (the task's own, else the held-out rows' distinct
    prompts), and where they come from."""
    texts = task.eval_prompts(task_data) if task is not None else None
    if texts is not None:
        return list(texts), f"task {task.name!r}'s held-out prompts"
    return held_out_rows_prompts(recipe, task_data)


def held_out_rows_prompts(recipe, task_data) -> tuple[list[Text], str]:
    """The distinct prompts of the held-out rows in order (``data.eval_split``, or the task's held-out file),
    and where they come from."""
    from prefopt.data.formats import to_examples
    from prefopt.data.load import load_rows

    d = recipe.data
    path, split = (str(task_data.eval), "train") if task_data is not None else (d.path, d.eval_split)
    source = f"{path} (split {split})"
    rows = load_rows(path, split, d.subset, recipe.model.trust_remote_code)
    examples, _, _ = to_examples(rows, d.columns.model_dump(), d.format, source)
    distinct = {json.dumps(example.prompt, sort_keys=True): example.prompt for example in examples}
    return list(distinct.values()), source


def tokenized(texts: list[Text], tokenizer, data_config, source: str) -> HeldOutPrompts:
    """``texts`` tokenized as training tokenizes prompts (``data_config``: the recipe's ``data``); a prompt too
    long to leave room for a completion is left out."""
    from prefopt.data.tokenize import tokenize_examples
    from prefopt.data.types import PreferenceExample

    d = data_config
    examples = [PreferenceExample(row=i, prompt=text, chosen=None, rejected=None) for i, text in enumerate(texts)]
    pairs = tokenize_examples(examples, tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                              append_eos=d.append_eos, invalid_rows="skip", source=source)
    return HeldOutPrompts([texts[pair.row] for pair in pairs.pairs], [pair.prompt_ids for pair in pairs.pairs],
                          source)
