"""One split of a recipe's data: rows read, turned into examples for the loss, tokenized."""

from __future__ import annotations

from typing import Literal

from prefopt.api.loss import PreferenceLoss
from prefopt.data.formats import to_examples
from prefopt.data.load import load_rows
from prefopt.data.tokenize import tokenize_examples
from prefopt.data.types import TokenizedPairs
from prefopt.data.unpaired import for_loss
from prefopt.errors import PrefoptError


def load_split(recipe, tokenizer, path: str, split: str, limit: int | None, loss: PreferenceLoss, say,
               select=None, *, prompt_only: Literal["refuse", "accept", "drop"] = "refuse") -> TokenizedPairs | None:
    """One split, tokenized for ``loss``. ``prompt_only`` says what prompt-only rows become: ``refuse`` (a
    run that trains on the data's responses), ``accept`` (an algorithm that makes its own pairs) or ``drop``
    (held-out data: no pairs to score, so None)."""
    d = recipe.data
    rows = load_rows(path, split, d.subset, recipe.model.trust_remote_code)
    source = f"{path} (split {split})"
    examples, skipped, first = to_examples(rows, d.columns.model_dump(), d.format, source)
    if limit is not None:
        examples = examples[:limit]  # counts rows: a pair split for an unpaired loss gives two examples
    # checked before tokenizing, so that an unusable row does not hide that the whole split cannot be used
    if d.format == "prompt_only" or any(example.prompt_only for example in examples):
        if prompt_only == "refuse":
            raise prompt_only_refused(source, d, rows.column_names)
        if prompt_only == "drop":
            say(f"data: {source}: prompt-only rows hold no pairs, so no held-out pair metrics (eval/loss, "
                f"eval/rewards/*) are computed; set data.eval_split to preference data for them")
            return None
    else:
        examples = for_loss(examples, unpaired=loss.unpaired, loss_name=loss.name, fmt=d.format, source=source)
    pairs = tokenize_examples(
        examples, tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
        append_eos=d.append_eos, invalid_rows=d.invalid_rows, source=source, skipped=skipped,
        first_skipped_row=first,
    )
    note = ""
    if pairs.skipped:
        reasons = "; ".join(f"{n} {reason} (first: row {pairs.first_skipped_row[reason]})"
                            for reason, n in pairs.skipped.items())
        note = f", left out {sum(pairs.skipped.values())}: {reasons}"
    say(f"data: {source}: {pairs.describe()}{note}")
    if select is not None:
        pairs = select(pairs, rows)
    return pairs


def prompt_only_refused(source: str, data, columns: list[str]) -> PrefoptError:
    # under auto, responses in columns the recipe does not name look like prompt-only data: say which columns
    # were looked for and which there are
    looked_for = ", ".join(repr(getattr(data.columns, key)) for key in ("chosen", "rejected", "completion"))
    found = "data.format=prompt_only" if data.format == "prompt_only" else (
        f"data.format={data.format} found no value in columns {looked_for}; the columns are {', '.join(columns)}")
    return PrefoptError(
        f"{source}: the rows are prompts with no responses ({found}), but this run trains on the data's "
        f"responses; use preference data (data.columns.* name its columns), or an algorithm that samples its "
        f"own pairs from prompts (see `prefopt list`)"
    )
