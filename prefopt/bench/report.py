"""The leaderboard: ``leaderboard.md``, a self-contained ``leaderboard.html`` (figures embedded as base64
PNG, no external assets; each under a heading and a sentence on how to read it), ``leaderboard.json`` (the
per-entry statistics) and the PNG figures (``plots.py``).

Entries are sorted by mean reward (by mean win rate when no entry has a reward). Each cell is the mean over
seeds with its spread: the sample standard deviation for 3 seeds or more, the [min, max] range for 2 (a
standard deviation of two values says little), nothing for 1. The win-rate columns show only when some run
has a win rate (benches evaluated before them have none).

Where the evaluation kept its completions (``bench-completions.jsonl``), a "Completions" section shows the
first held-out prompts side by side: the initial model's completion and each entry's, with their scores and
outcomes.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from prefopt.bench.examples import HTML_STYLE as EXAMPLES_STYLE
from prefopt.bench.examples import Example, collect_examples, examples_html, examples_markdown
from prefopt.bench.files import EVAL_FILE, read_json
from prefopt.bench.plots import EVEN, judge_name, write_plots
from prefopt.bench.recipe import Bench
from prefopt.bench.results import METRICS, Spread, aggregate, metric_lines
from prefopt.paths import atomic_write_text

COLUMNS = {  # metric -> (header, format)
    "reward": ("reward", ".3f"),
    "kl": ("KL", ".2f"),
    "length": ("length", ".1f"),
    "win_rate": ("win rate", ".2f"),
    "lc_win_rate": ("LC win rate", ".2f"),
    "accuracy": ("accuracy", ".2f"),
    "tokens_per_s": ("tokens/s", ".0f"),
    "peak_rss_mib": ("peak RSS MiB", ".0f"),
    "wall_s": ("train s", ".0f"),
    "final_loss": ("final loss", ".3f"),
}
FIGURES = {  # figure -> (heading, how to read it)
    "frontier": ("Reward vs KL to the reference (DPO paper, Fig. 2 left)",
                 "Up and to the left is better: each outlined marker is an entry's mean over seeds with bars "
                 "from its lowest to its highest seed on both axes, the faint markers behind it are its runs, "
                 "the star is the untrained initial model, and the dashed step line joins the entries that no "
                 "other entry beats on both reward and KL (the Pareto front)."),
    "winrate_kl": ("Win rate against the initial model vs KL to the reference",
                   "Up and to the left is better: each outlined marker is an entry's win rate over the initial "
                   "model's completions of the same prompts and seeds (a tie counts half), its mean over seeds with "
                   "bars from its lowest to its highest seed, and its runs faint behind it; the hollow marker of the "
                   "same colour, joined to it, is its length-controlled win rate (the win rate at equal length), so "
                   "a long join means length accounts for much of the difference; the star is the initial model, "
                   "which ties with itself, and above the dashed line at 0.5 an entry beats it."),
    "curves": ("Training curves",
               "Each line is an entry's mean over seeds against the optimizer step, and its shaded band spans "
               "the lowest to the highest seed at that step; a panel names the entries that did not log its key."),
    "length_reward": ("Reward vs completion length",
                      "An entry that sits far to the right of the others at a similar reward buys its reward "
                      "with length; bars span the lowest to the highest seed."),
    "throughput_memory": ("Throughput and peak memory",
                          "Longer bars are faster training (left) and more memory (right), entries in "
                          "leaderboard order; the whiskers span the lowest to the highest seed."),
}
TEXT_COLUMNS = {"entry", "overrides", "run"}  # left-aligned; every other column holds numbers
WIN_RATES = ("win_rate", "lc_win_rate")
EXAMPLE_PROMPTS = 8  # the completions section's prompts: enough to see a style, few enough to read
MARKDOWN_CUT = 300  # characters of a completion or prompt the markdown shows; the HTML shows them whole
EXPLANATION = (
    "reward: mean score of completions sampled from the trained model on held-out prompts (the task's "
    "ground-truth reward, or the bench's judge). "
    "KL: mean over those samples of log pi(y|x) - log pi_ref(y|x) summed over the completion's tokens "
    "(nats; pi_ref is the run's reference). length: completion tokens. accuracy: held-out preference "
    "accuracy of the implicit reward after training. tokens/s: median over training steps. peak RSS: "
    "maximum resident memory of the training process. train s: its wall time, which for the first run of a "
    "seed includes building the caches later runs share (task data, reference log-probs)."
)
WIN_RATE_EXPLANATION = (
    "win rate: the share of the initial model's completions that the entry's completions beat, on the same "
    "held-out prompts sampled with the same seeds, by the judge's scores or, for a pairwise judge, by its "
    "preference asked both ways round; a tie counts half, so the initial model, the baseline, has 0.5. LC win "
    "rate: the length-controlled win rate, the win rate at equal length (as in AlpacaEval 2): a logistic "
    "regression of each outcome on the two completions' length difference, read at a difference of zero."
)


def cell(spread: Spread, fmt: str) -> str:
    if spread.mean is None:
        return "–"
    text = format(spread.mean, fmt)
    if spread.n >= 3 and spread.std is not None:
        return f"{text} ± {format(spread.std, fmt)}"
    if spread.n == 2:
        return f"{text} [{format(spread.min, fmt)}, {format(spread.max, fmt)}]"
    return text


def value(number, fmt: str) -> str:
    return "–" if number is None else format(number, fmt)


def shown_columns(rows: list[dict]) -> dict[str, tuple[str, str]]:
    """COLUMNS, less the win rates when no run has one (a bench evaluated before them, or without a judge)."""
    has_win_rates = any(r.get(m) is not None for r in rows for m in WIN_RATES)
    return {m: c for m, c in COLUMNS.items() if has_win_rates or m not in WIN_RATES}


def explanation(columns: dict) -> str:
    return EXPLANATION + (" " + WIN_RATE_EXPLANATION if "win_rate" in columns else "")


def sort_line(records: list[dict]) -> str:
    """How the entries are ranked: by mean reward, or by mean win rate where no entry has a reward."""
    by_reward = any(r["reward"].mean is not None for r in records)
    by_win_rate = not by_reward and any(r["win_rate"].mean is not None for r in records)
    key = "mean win rate against the initial model" if by_win_rate else "mean reward"
    return (f"Entries sorted by {key}; each cell is the mean over seeds, ± the standard deviation for 3 or more "
            "seeds, [min, max] for 2.")


def initial_result(bench: Bench) -> dict | None:
    """The untrained initial model's evaluation, when it was made."""
    return read_json(bench.initial_dir / EVAL_FILE)


def _setup_lines(bench: Bench, rows: list[dict], initial: dict | None) -> list[str]:
    spec = bench.spec
    entries_done = len({r["entry"] for r in rows})
    overrides = ", ".join(f"`{o}`" for o in spec.overrides) or "none"
    e = spec.eval
    asked = [f"{e.num_prompts} held-out prompts" if e.num_prompts else "the task's held-out prompts",
             f"{e.samples_per_prompt} sample{'s' * (e.samples_per_prompt > 1)} each" if e.samples_per_prompt
             else "the task's samples per prompt",
             f"up to {e.max_new_tokens} new tokens" if e.max_new_tokens else "the task's length limit"]
    judge = judge_name(rows, initial)
    if judge:
        asked.append(f"scored by the judge {judge}")
    scored = _digests(rows, initial, "scored_data_sha256")
    if None in scored:  # results evaluated before the scored file was recorded: the held-out pairs stand in
        scored = _digests(rows, initial, "eval_data_sha256")
    scored.discard(None)
    pairs = _digests(rows, initial, "eval_data_sha256") - {None}
    if len(scored) > 1:
        same = ("**warning: the runs were scored on different held-out data**, so their rewards do not compare; "
                "make the task's held-out split independent of the seed (sentiment: data.task.eval_seed=0 in the "
                "bench's overrides)")
    elif scored:
        same = f"the same held-out data for every run (sha256 {next(iter(scored))[:12]})"
        if len(pairs) > 1:  # the same prompts, labelled otherwise (another labeller, or per seed)
            same += ("; the held-out pairs' labels differ between runs, so accuracies compare only between runs "
                     "with the same labels")
    elif judge:
        same = "the held-out data's digest was not recorded"
    else:
        same = "no task evaluation (the recipe has no data.task)"
    return [
        f"Base recipe `{bench.base}`; overrides for every entry: {overrides}; seeds "
        f"{', '.join(map(str, spec.seeds))}; {entries_done} of {len(spec.entries)} entries have results "
        f"({len(rows)} runs).",
        f"Evaluation: {', '.join(asked)}; {same}.",
    ]


def _digests(rows: list[dict], initial: dict | None, key: str) -> set:
    """The distinct values of ``key`` over the runs and the initial model's evaluation (None where absent)."""
    return {r.get(key) for r in rows} | ({initial.get(key)} if initial else set())


def _table(records: list[dict], initial: dict | None, columns: dict) -> tuple[list[str], list[list[str]]]:
    header = ["#", "entry", "seeds", *[header for header, _ in columns.values()], "overrides"]
    body = []
    for rank, record in enumerate(records, start=1):
        body.append([str(rank), record["entry"], str(len(record["seeds"])),
                     *[cell(record[m], fmt) for m, (_, fmt) in columns.items()],
                     " ".join(record["overrides"])])
    if initial is not None:
        # the baseline of the win rates: its completions tie with themselves
        known = {"reward": initial.get("reward"), "kl": initial.get("kl"), "length": initial.get("length"),
                 "win_rate": EVEN, "lc_win_rate": EVEN}
        body.append(["", "initial model (untrained)", "",
                     *[value(known.get(m), fmt) for m, (_, fmt) in columns.items()], ""])
    return header, body


def _run_table(rows: list[dict], columns: dict) -> tuple[list[str], list[list[str]]]:
    header = ["entry", "seed", *[header for header, _ in columns.values()], "run"]
    body = [[r["entry"], str(r["seed"]), *[value(r.get(m), fmt) for m, (_, fmt) in columns.items()], r["run_dir"]]
            for r in rows]
    return header, body


def _markdown_table(header: list[str], body: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, body)])


def _html_table(header: list[str], body: list[list[str]]) -> str:
    """Numbers right-aligned (their digits line up), names and paths left; wide tables scroll sideways."""
    kinds = [f"text {h}" if h in TEXT_COLUMNS else "num" for h in header]
    head = "".join(f"<th class='{k}'>{html.escape(h)}</th>" for h, k in zip(header, kinds))
    rows = "".join("<tr>" + "".join(f"<td class='{k}'>{_html_cell(c, k)}</td>" for c, k in zip(row, kinds))
                   + "</tr>" for row in body)
    return f"<div class='wide'><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>"


def _html_cell(text: str, kind: str) -> str:
    """A mean and its spread ("0.5 ± 0.1", "0.5 [0.4, 0.6]") may break between the two, never inside
    either, so a wide table narrows by putting spreads under their means; overrides and paths break after
    a "=" or "/" first."""
    escaped = html.escape(text)
    if kind != "num":
        return escaped.replace("=", "=<wbr>").replace("/", "/<wbr>")
    mean, _, spread = escaped.partition(" ")
    return f"{mean} <span class='spread'>{spread}</span>" if spread.startswith(("±", "[")) else escaped


def examples_intro(examples: list[Example]) -> str:
    return (f"The first {len(examples)} held-out prompts, each with its first sample: the initial model's completion "
            "and each entry's (from its first seed), its score, and the outcome against the initial model's "
            "completion of the same prompt and seed (win, tie or loss). A completion marked \"cut\" stopped at the "
            "token limit.")


def write_markdown(path: Path, bench: Bench, rows, records, initial, figures: dict[str, Path],
                   examples: list[Example] | None = None) -> Path:
    columns = shown_columns(rows)
    parts = [f"# Bench `{bench.path}`", "", *_setup_lines(bench, rows, initial), "",
             f"{sort_line(records)} {explanation(columns)}", "",
             _markdown_table(*_table(records, initial, columns)), "", "## Figures", ""]
    for name, figure in figures.items():
        heading, reading = FIGURES[name]
        parts += [f"### {heading}", "", reading, "", f"![{heading}]({figure.name})", ""]
    if examples:
        parts += examples_markdown(examples, examples_intro(examples), MARKDOWN_CUT, _markdown_table)
    parts += ["## Runs", "", _markdown_table(*_run_table(rows, columns)), ""]
    atomic_write_text(path, "\n".join(parts))
    return path


# The column is as wide as the figures are drawn (plots.WIDTH x plots.DPI), so they show unscaled on a wide
# window and shrink with it on a narrow one.
HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1.5em; max-width: 1060px; color: #222;
       line-height: 1.45; }
.wide { overflow-x: auto; margin: 1em 0; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 6px; vertical-align: top; }
th { background: #f0f0f0; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.spread { white-space: nowrap; color: #555; }
.text { text-align: left; }
.overrides, .run { overflow-wrap: anywhere; min-width: 7em; }  /* these wrap, rather than the numbers */
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 0 0 2em; }
figcaption { margin: 0.2em 0 0.6em; color: #444; }
img { display: block; max-width: 100%; height: auto; }
h3 { margin: 1.6em 0 0.2em; }
"""


def write_html(path: Path, bench: Bench, rows, records, initial, figures: dict[str, Path],
               examples: list[Example] | None = None) -> Path:
    columns = shown_columns(rows)
    parts = [
        "<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
        f"<title>Bench {html.escape(str(bench.path))}</title><style>{HTML_STYLE}{EXAMPLES_STYLE}</style></head><body>",
        f"<h1>Bench <code>{html.escape(str(bench.path))}</code></h1>",
        *(f"<p>{html.escape(line).replace('`', '')}</p>" for line in _setup_lines(bench, rows, initial)),
        f"<p>{html.escape(sort_line(records))} {html.escape(explanation(columns))}</p>",
        _html_table(*_table(records, initial, columns)),
        "<h2>Figures</h2>",
    ]
    for name, figure in figures.items():
        # Embedded, so the page is one file that can be mailed or attached.
        data = base64.b64encode(figure.read_bytes()).decode("ascii")
        heading, reading = (html.escape(text) for text in FIGURES[name])
        parts += [f"<figure id='{name}'><h3>{heading}</h3><figcaption>{reading}</figcaption>",
                  f"<img alt='{heading}' src='data:image/png;base64,{data}'></figure>"]
    if examples:
        parts.append(examples_html(examples, examples_intro(examples)))
    parts += ["<h2>Runs</h2>", _html_table(*_run_table(rows, columns)), "</body></html>"]
    atomic_write_text(path, "\n".join(parts))
    return path


def write_json_summary(path: Path, bench: Bench, records, initial) -> Path:
    summary = {
        "bench": str(bench.path),
        "base": str(bench.base),
        "overrides": list(bench.spec.overrides),
        "seeds": list(bench.spec.seeds),
        "eval": bench.spec.eval.model_dump(),
        "entries": [{"entry": r["entry"], "seeds": r["seeds"], "overrides": r["overrides"],
                     **{m: r[m].as_dict() for m in METRICS}} for r in records],
        "initial": None if initial is None else {k: initial.get(k) for k in ("reward", "kl", "length")},
    }
    atomic_write_text(path, json.dumps(summary, indent=1) + "\n")
    return path


def seed_bands(rows: list[dict], keys: tuple[str, ...]) -> dict[str, dict[str, list[tuple[int, float, float, float]]]]:
    """entry -> key -> [(step, mean, lowest, highest)] over the seeds that logged ``key`` at that step, from
    each run's metrics.jsonl (training lines, and evaluation lines for eval/* keys): curves.png's lines and
    bands."""
    values: dict[str, dict[str, dict[int, list[float]]]] = {}
    for row in rows:
        per_key = values.setdefault(row["entry"], {key: {} for key in keys})
        for line in metric_lines(Path(row["run_dir"])):
            for key in keys:
                number = line.get(key)
                if isinstance(number, (int, float)):
                    per_key[key].setdefault(line["step"], []).append(number)
    bands = {}
    for entry, per_key in values.items():
        bands[entry] = {}
        for key, steps in per_key.items():
            spreads = [(step, Spread.of(seeds)) for step, seeds in sorted(steps.items())]
            # Spread drops non-finite values; a step left with none is skipped rather than drawn as a gap.
            bands[entry][key] = [(step, s.mean, s.min, s.max) for step, s in spreads if s.mean is not None]
    return bands


def write_report(bench: Bench, rows: list[dict]) -> dict[str, Path]:
    """Every report file from the result rows (and the initial model's evaluation); returns {name: path}."""
    bench.dir.mkdir(parents=True, exist_ok=True)
    initial = initial_result(bench)
    records = aggregate(rows, bench.entry_names)
    keys = tuple(bench.spec.plots.curves)
    figures = write_plots(bench.dir, rows, records, initial, seed_bands(rows, keys), keys) if rows else {}
    examples = collect_examples(bench.initial_dir, rows, records, EXAMPLE_PROMPTS)
    return {
        "markdown": write_markdown(bench.dir / "leaderboard.md", bench, rows, records, initial, figures, examples),
        "html": write_html(bench.dir / "leaderboard.html", bench, rows, records, initial, figures, examples),
        "json": write_json_summary(bench.dir / "leaderboard.json", bench, records, initial),
        **figures,
    }
