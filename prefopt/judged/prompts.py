"""The held-out prompts a run is evaluated on, as the data wrote them and as the model sees them.

The task's own (``Task.eval_prompts``), else the distinct prompts of the held-out rows (``data.eval_split``,
or the task's held-out file): the prompts ``eval.samples`` samples while training
(``prefopt.engine.samples.held_out_rows_prompts``), tokenized as training tokenizes prompts (chat messages
through the chat template, cut to their last ``data.max_prompt_length`` tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from prefopt.api.task import Text
from prefopt.errors import PrefoptError

__all__ = ["HeldOutPrompts", "held_out_prompts"]


@dataclass(frozen=True)
class HeldOutPrompts:
    texts: list[Text]  # as the data wrote them: what scorers and judges read
    ids: list[tuple[int, ...]]  # as training tokenizes them: what the model continues
    source: str  # where they come from, for messages


def held_out_prompts(recipe, tokenizer, task, task_data, count: int | None, key: str = "eval.num_prompts"
                     ) -> HeldOutPrompts:
    """The first ``count`` held-out prompts (all of them when None); asking for more than there are is a
    one-line error naming ``key``. A prompt too long to leave room for a completion is left out."""
    from prefopt.data.tokenize import tokenize_examples
    from prefopt.data.types import PreferenceExample
    from prefopt.engine.samples import held_out_rows_prompts

    texts = task.eval_prompts(task_data) if task is not None else None
    source = f"task {task.name!r}'s held-out prompts" if texts is not None else None
    if texts is None:
        texts, source = held_out_rows_prompts(recipe, task_data)
    texts = list(texts)
    if count is not None:
        if count > len(texts):
            raise PrefoptError(f"{key} is {count}, but {source} holds {len(texts)} distinct prompts; ask for fewer")
        texts = texts[:count]
    if not texts:
        raise PrefoptError(f"{source} holds no prompts to evaluate on")
    d = recipe.data
    examples = [PreferenceExample(row=i, prompt=text, chosen=None, rejected=None) for i, text in enumerate(texts)]
    pairs = tokenize_examples(examples, tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                              append_eos=d.append_eos, invalid_rows="skip", source=source)
    return HeldOutPrompts([texts[pair.row] for pair in pairs.pairs], [pair.prompt_ids for pair in pairs.pairs],
                          source)
