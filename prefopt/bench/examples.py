"""The report's "Completions" section: the first held-out prompts, each with the initial model's completion
and every entry's (its first seed), with the judge's score and the outcome against the initial model.

Read from ``bench-completions.jsonl`` (``files.COMPLETIONS_FILE``) in ``<bench>/initial/`` and in each run
directory, one JSON line per completion: {"prompt_index", "sample", "prompt" (text or chat messages),
"completion", "num_tokens", "finished", "score", "kl", "outcome"}. Only each prompt's first sample is shown:
the same sample (the same seed) on every side, so the rows of a prompt compare like for like.

Every text a model wrote, or a user's prompt, is escaped: in the HTML as HTML; in the markdown every
character that markdown would read as markup is backslash-escaped, and line breaks are shown as ⏎.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from prefopt.bench.files import COMPLETIONS_FILE, read_completions as read_completion_records

OUTCOMES = {1.0: "win", 0.5: "tie", 0.0: "loss"}
INITIAL_LABEL = "initial model (untrained)"
BASELINE = "baseline"  # the initial model's outcome cell: the others are measured against it
LINE_BREAK = " ⏎ "  # a line break inside a markdown table cell, which cannot hold a real one
MARKDOWN_SPECIAL = set("\\`*_[]<>|#~&!")  # CommonMark lets any of them be backslash-escaped


@dataclass(frozen=True)
class Example:
    """One held-out prompt and what each model made of it: (label, completion record or None) pairs, the
    initial model first, then the entries in leaderboard order."""

    prompt_index: int
    prompt: object
    completions: list[tuple[str, dict | None]]


def read_completions(path: Path) -> dict[tuple[int, int], dict] | None:
    """(prompt_index, sample) -> the completion's record; None when the file does not exist."""
    records = read_completion_records(path)
    if records is None:
        return None
    return {(record["prompt_index"], record["sample"]): record for record in records}


def collect_examples(initial_dir: Path, rows: list[dict], records: list[dict],
                     count: int) -> list[Example] | None:
    """The first ``count`` prompts (by prompt_index) with their first sample on every side; None when no
    completions file exists at all (a bench evaluated before they were kept)."""
    sides = [(INITIAL_LABEL, read_completions(Path(initial_dir) / COMPLETIONS_FILE))]
    for record in records:
        first = [r for r in rows if r["entry"] == record["entry"] and r["seed"] == record["seeds"][0]]
        sides.append((record["entry"], read_completions(Path(first[0]["run_dir"]) / COMPLETIONS_FILE)
                      if first else None))
    if all(found is None for _, found in sides):
        return None
    keys = sorted({key for _, found in sides for key in found or {}})
    first_sample = {}
    for index, sample in keys:  # sorted: the first seen is the lowest sample
        first_sample.setdefault(index, sample)
    examples = []
    for index, sample in list(first_sample.items())[:count]:
        pairs = [(label, (found or {}).get((index, sample))) for label, found in sides]
        prompt = next((record["prompt"] for _, record in pairs if record is not None and "prompt" in record), "")
        examples.append(Example(index, prompt, pairs))
    return examples


def prompt_text(prompt) -> str:
    """A prompt as text: chat messages as "role: content" lines."""
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, dict) else str(m)
                         for m in prompt)
    return str(prompt)


def outcome_word(label: str, record: dict | None) -> str:
    if label == INITIAL_LABEL:
        return BASELINE
    outcome = None if record is None else record.get("outcome")
    return OUTCOMES.get(outcome, "–") if isinstance(outcome, (int, float)) else "–"


def score_text(record: dict | None) -> str:
    score = None if record is None else record.get("score")
    return format(score, ".3f") if isinstance(score, (int, float)) else "–"


def tokens_text(record: dict | None) -> str:
    """The completion's length, marked "cut" when it stopped at the token limit rather than at its end."""
    if record is None or not isinstance(record.get("num_tokens"), int):
        return "–"
    return f"{record['num_tokens']}" + ("" if record.get("finished", True) else " (cut)")


# ----------------------------------------------------------------------------------------------------------
# HTML

HTML_STYLE = """
.example { margin: 1.2em 0 1.8em; }
.prompt { white-space: pre-wrap; overflow-wrap: anywhere; background: #f6f6f6; border-left: 3px solid #bbb;
          padding: 0.4em 0.7em; margin: 0.3em 0 0.5em; font-size: 13px; }
table.completions { width: 100%; table-layout: fixed; }
table.completions .model { width: 11em; overflow-wrap: anywhere; }
table.completions .completion { white-space: pre-wrap; overflow-wrap: anywhere; }
table.completions .tokens, table.completions .score, table.completions .outcome { width: 5.5em; }
td.win { background: #e2f1e4; } td.loss { background: #f7e0e0; } td.tie { background: #eeeeee; }
td.baseline { color: #666; font-style: italic; }
"""


def examples_html(examples: list[Example], intro: str) -> str:
    parts = ["<h2 id='completions'>Completions</h2>", f"<p>{html.escape(intro)}</p>"]
    for example in examples:
        rows = "".join(_html_row(label, record) for label, record in example.completions)
        parts.append(
            f"<div class='example'><h3>Prompt {example.prompt_index}</h3>"
            f"<div class='prompt'>{html.escape(prompt_text(example.prompt))}</div>"
            "<table class='completions'><thead><tr><th class='model text'>model</th>"
            "<th class='completion text'>completion</th><th class='tokens num'>tokens</th>"
            "<th class='score num'>score</th><th class='outcome text'>outcome</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></div>")
    return "\n".join(parts)


def _html_row(label: str, record: dict | None) -> str:
    completion = "(no completion recorded)" if record is None else str(record.get("completion", ""))
    outcome = outcome_word(label, record)
    return (f"<tr><td class='model text'>{html.escape(label)}</td>"
            f"<td class='completion text'>{html.escape(completion)}</td>"
            f"<td class='tokens num'>{html.escape(tokens_text(record))}</td>"
            f"<td class='score num'>{score_text(record)}</td>"
            f"<td class='outcome text {outcome if outcome != '–' else ''}'>{outcome}</td></tr>")


# ----------------------------------------------------------------------------------------------------------
# markdown


def markdown_text(text: str, cut: int, *, in_table: bool) -> str:
    """One line of literal markdown: at most ``cut`` characters of ``text`` (then "…"), line breaks as ⏎,
    markup characters escaped (in a table cell but "|", which the table writer escapes itself)."""
    shown = text if len(text) <= cut else text[:cut].rstrip() + "…"
    escaped = "".join(f"\\{c}" if c in MARKDOWN_SPECIAL and not (in_table and c == "|") else c for c in shown)
    return LINE_BREAK.join(escaped.splitlines())


def examples_markdown(examples: list[Example], intro: str, cut: int, table) -> list[str]:
    """The section's lines; ``table(header, body)`` writes a markdown table (the report's)."""
    parts = ["## Completions", "", intro + f" Completions and prompts are cut at {cut} characters here; the HTML "
             "report shows them whole.", ""]
    for example in examples:
        body = [[label, "(no completion recorded)" if record is None
                 else markdown_text(str(record.get("completion", "")), cut, in_table=True),
                 tokens_text(record), score_text(record), outcome_word(label, record)]
                for label, record in example.completions]
        prompt = markdown_text(prompt_text(example.prompt), cut, in_table=False)
        parts += [f"**Prompt {example.prompt_index}.** {prompt}", "",
                  table(["model", "completion", "tokens", "score", "outcome"], body), ""]
    return parts
