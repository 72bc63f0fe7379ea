"""The report's win rates and completions, on hand-made results (no training): the win-rate columns and
their explanation, the win rate vs KL figure, the judge in the reward's label, the "Completions" section
with every text escaped, and a bench from before win rates and completions, which still reports without
empty columns."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pytest

from prefopt.bench import plots
from prefopt.bench.examples import markdown_text, read_completions
from prefopt.bench.plots import NO_DATA, figure_texts
from prefopt.bench.report import EXAMPLE_PROMPTS, FIGURES, write_report
from prefopt.bench.results import aggregate
from prefopt.errors import PrefoptError
from test_bench_figures import NAMES, PNG, initial_eval, synthetic_bench, synthetic_rows

JUDGE = {"name": "function", "function": "prefopt_plugins.tasks.sentiment:completion_reward"}
WIN_RATES = {  # entry -> its seeds' (win rate, LC win rate)
    "dpo": [(0.60, 0.55), (0.70, 0.60), (0.65, 0.62)],
    "ipo": [(0.80, 0.70), (0.90, 0.75), (0.85, 0.71)],
    "simpo": [(0.40, 0.45), (0.50, 0.52), (0.45, 0.50)],
}
PROMPTS = 10  # more than the section shows
HOSTILE = "<script>alert('x')</script> & *not bold* | `tick`"  # what a model may write; shown literally


def rows_with_win_rates(folder: Path) -> list[dict]:
    rows = synthetic_rows(folder, 3, seeds=3)
    for row in rows:
        row["win_rate"], row["lc_win_rate"] = WIN_RATES[row["entry"]][row["seed"]]
    return rows


def completion(index: int, sample: int, text: str, outcome: float | None, prompt=None) -> dict:
    return {"prompt_index": index, "sample": sample, "prompt": prompt or f"prompt {index}: tell me",
            "completion": text, "num_tokens": 10 + index, "finished": index != 1, "score": index / 10,
            "kl": None if outcome is None else 0.25, "outcome": outcome}


def write_completions(directory: Path, lines: list[dict]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bench-completions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def judged_bench(tmp_path: Path):
    """Three entries x three seeds with win rates, the initial model judged by JUDGE, and completions of
    PROMPTS prompts x 2 samples for every run: the initial model writes "initial i/s", a run of entry e and
    seed k writes "e seed k: i/s" (sample 0 of prompt 0 with HOSTILE text appended, prompt 2 as chat
    messages); outcomes cycle win, tie, loss over the prompts."""
    rows = rows_with_win_rates(tmp_path / "results")
    bench = synthetic_bench(tmp_path, rows, initial_eval() | {"judge": JUDGE})
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Review <Heat>"}]

    def lines(name: str, outcome_of) -> list[dict]:
        return [completion(i, s, f"{name}: {i}/{s}" + (f" {HOSTILE}" if (i, s) == (0, 0) else ""), outcome_of(i),
                           prompt=chat if i == 2 else None)
                for i in range(PROMPTS) for s in range(2)]

    write_completions(bench.initial_dir, lines("initial", lambda i: None))
    for row in rows:
        write_completions(Path(row["run_dir"]), lines(f"{row['entry']} seed {row['seed']}",
                                                      lambda i: (1.0, 0.5, 0.0)[i % 3]))
    return bench, rows


def section(page: str, start: str, end: str) -> str:
    block = page[page.index(start):]
    return block[:block.index(end)]


# ----------------------------------------------------------------------------------------------------------
# the win rate vs KL figure


def test_win_rate_figure_draws_seeds_length_control_and_the_initial_model(tmp_path):
    rows = rows_with_win_rates(tmp_path)
    records = aggregate(rows, list(NAMES))
    styles = plots.entry_styles([r["entry"] for r in records])
    fig = plots.winrate_kl_figure(rows, records, initial_eval() | {"judge": JUDGE}, styles)
    ax = fig.axes[0]
    assert ax.get_xlabel() == plots.KL_LABEL
    assert ax.get_ylabel() == "win rate against the initial model (judge function: completion_reward)"
    texts = figure_texts(fig)
    assert {"dpo", "ipo", "simpo", "0.5: as good as the initial model", plots.INITIAL["label"],
            "hollow: length-controlled win rate (at equal length)"} <= set(texts)
    assert not [t for t in texts if t.startswith(NO_DATA)]
    even = next(line for line in ax.lines if line.get_label().startswith("0.5"))
    assert set(even.get_ydata()) == {0.5} and even.get_linestyle() == "--"
    # the bars span each entry's seeds and cross at the mean
    bars = {c.get_label(): c for c in ax.containers}
    for entry, seeds in WIN_RATES.items():
        kls = [r["kl"] for r in rows if r["entry"] == entry]
        wins = [w for w, _ in seeds]
        _, _, (_, y_bars) = bars[entry].lines
        (x_at, y_low), (_, y_high) = y_bars.get_segments()[0]
        assert (x_at, y_low, y_high) == pytest.approx((sum(kls) / 3, min(wins), max(wins)), rel=1e-12)
    # hollow markers: each entry's mean LC win rate at its mean KL, empty inside and edged in its colour
    from matplotlib.collections import PathCollection
    from matplotlib.colors import to_rgba

    markers = [c for c in ax.collections if isinstance(c, PathCollection) and len(c.get_offsets()) == 1]
    hollow = {tuple(c.get_edgecolor()[0]): tuple(c.get_offsets()[0]) for c in markers if not len(c.get_facecolor())}
    assert len(hollow) == 3

    for entry, seeds in WIN_RATES.items():
        kl = sum(r["kl"] for r in rows if r["entry"] == entry) / 3
        assert hollow[to_rgba(styles[entry]["color"])] == pytest.approx((kl, sum(lc for _, lc in seeds) / 3))
    star = next(c for c in ax.collections if c.get_label() == plots.INITIAL["label"])
    assert tuple(star.get_offsets()[0]) == (0.0, 0.5)
    low, high = ax.get_ylim()
    assert -0.03 <= low < 0.4 and 0.9 < high <= 1.03  # the data and the star, nothing drawn past a rate's range


def test_win_rate_figure_says_no_data_without_win_rates_and_names_entries_without(tmp_path):
    rows = synthetic_rows(tmp_path, 3)  # no run compared with the initial model
    records = aggregate(rows, list(NAMES))
    styles = plots.entry_styles([r["entry"] for r in records])
    empty = plots.winrate_kl_figure(rows, records, initial_eval(), styles)
    assert [t for t in figure_texts(empty) if t.startswith(NO_DATA)] == [
        "no data: no run has a win rate against the initial model (the bench's evaluation compared none)"]
    some = rows_with_win_rates(tmp_path)
    some = [r | {"win_rate": None, "lc_win_rate": None} if r["entry"] == "simpo" else r for r in some]
    records = aggregate(some, list(NAMES))
    partial = plots.winrate_kl_figure(some, records, None, styles)  # no initial evaluation: the star at KL 0
    assert [t for t in figure_texts(partial) if t.startswith(NO_DATA)] == ["no data: simpo"]


def test_reward_label_names_the_judge_when_the_evaluation_records_one():
    initial = initial_eval()
    assert plots.reward_label([], initial) == "mean reward (task sentiment)"  # the task's own score
    assert plots.reward_label([], initial | {"task": None}) == "mean reward (reward/vader_mean)"  # the metric key
    assert plots.reward_label([], initial | {"judge": JUDGE}) == "mean reward (judge function: completion_reward)"
    local_model = {"name": "reward_model", "path": "/models/deberta-rm/", "batch_size": 8}
    assert plots.reward_label([{"judge": local_model}], None) == "mean reward (judge reward_model: deberta-rm)"
    # a template is no name: the judge's name alone
    templated = {"name": "custom", "template": "Which is better?\n{first}\n{second}"}
    assert plots.reward_label([], {"judge": templated}) == "mean reward (judge custom)"
    assert plots.reward_label([], {"judge": None}) == "mean reward"


# ----------------------------------------------------------------------------------------------------------
# the report


def test_report_shows_win_rate_columns_figure_and_explanation(tmp_path):
    bench, rows = judged_bench(tmp_path)
    report = write_report(bench, rows)
    assert report["winrate_kl"].read_bytes()[:8] == PNG
    page = report["html"].read_text()
    header = section(page, "<thead>", "</thead>")
    assert "<th class='num'>win rate</th><th class='num'>LC win rate</th>" in header
    ipo = next(r for r in aggregate(rows, list(NAMES)) if r["entry"] == "ipo")
    assert ipo["win_rate"].mean == pytest.approx(0.85) and ipo["win_rate"].std == pytest.approx(0.05)
    assert ("<td class='num'>0.85 <span class='spread'>± 0.05</span></td>"
            "<td class='num'>0.72 <span class='spread'>± 0.03</span></td>") in page
    # the initial model is the baseline: 0.5 against itself
    initial_row = section(page, "initial model (untrained)</td>", "</tr>")
    assert initial_row.count("<td class='num'>0.50</td>") == 2
    for words in ("a tie counts half", "the initial model, the baseline, has 0.5", "the win rate at equal length",
                  "AlpacaEval 2", "scored by the judge function: completion_reward"):
        assert html.escape(words) in page
    block = section(page, "<figure id='winrate_kl'>", "</figure>")
    assert f"<figcaption>{html.escape(FIGURES['winrate_kl'][1])}</figcaption>" in block
    markdown = report["markdown"].read_text()
    assert "| length | win rate | LC win rate | accuracy |" in markdown
    assert "| 0.85 ± 0.05 | 0.72 ± 0.03 |" in markdown
    board = json.loads(report["json"].read_text())
    assert {e["entry"]: e["win_rate"]["mean"] for e in board["entries"]} == pytest.approx(
        {"dpo": 0.65, "ipo": 0.85, "simpo": 0.45})


def test_completions_section_shows_the_first_prompts_escaped_with_scores_and_outcomes(tmp_path):
    bench, rows = judged_bench(tmp_path)
    page = write_report(bench, rows)["html"].read_text()
    completions = section(page, "<h2 id='completions'>", "<h2>Runs</h2>")
    shown = [i for i in range(PROMPTS) if f"<h3>Prompt {i}</h3>" in completions]
    assert shown == list(range(EXAMPLE_PROMPTS))
    # the hostile text is shown as text, never as markup
    assert html.escape(HOSTILE) in completions and "<script>" not in page
    first = section(completions, "<h3>Prompt 0</h3>", "</table>")
    assert "<div class='prompt'>prompt 0: tell me</div>" in first
    # every side's first sample; an entry's completion from its first seed; scores and outcomes
    assert "initial: 0/0" in first and "initial: 0/1" not in first
    assert "dpo seed 0: 0/0" in first and "seed 1" not in first and "seed 2" not in first
    assert first.count("<td class='score num'>0.000</td>") == 4  # the initial model and 3 entries
    assert "<td class='outcome text baseline'>baseline</td>" in first
    assert first.count("<td class='outcome text win'>win</td>") == 3
    assert section(completions, "<h3>Prompt 1</h3>", "</table>").count("'outcome text tie'>tie<") == 3
    assert section(completions, "<h3>Prompt 2</h3>", "</table>").count("'outcome text loss'>loss<") == 3
    # a completion that stopped at the token limit says so; chat messages show their roles
    assert "<td class='tokens num'>11 (cut)</td>" in section(completions, "<h3>Prompt 1</h3>", "</table>")
    assert "system: Be brief.\nuser: Review &lt;Heat&gt;" in section(completions, "<h3>Prompt 2</h3>", "</table>")


def test_markdown_completions_are_short_escaped_lines(tmp_path):
    bench, rows = judged_bench(tmp_path)
    markdown = write_report(bench, rows)["markdown"].read_text()
    completions = markdown[markdown.index("## Completions"):markdown.index("## Runs")]
    assert "**Prompt 0.** prompt 0: tell me" in completions and "**Prompt 8.**" not in completions
    assert ("| initial model (untrained) | initial: 0/0 \\<script\\>alert('x')\\</script\\> \\& \\*not bold\\* \\| "
            "\\`tick\\` | 10 | 0.000 | baseline |") in completions
    assert "**Prompt 2.** system: Be brief. ⏎ user: Review \\<Heat\\>" in completions
    assert "| dpo | dpo seed 0: 1/0 | 11 (cut) | 0.100 | tie |" in completions


def test_markdown_text_escapes_markup_cuts_and_keeps_one_line():
    assert markdown_text("a*b*_c_ [x](y) <b> #1 | ~", 100, in_table=False) == \
        "a\\*b\\*\\_c\\_ \\[x\\](y) \\<b\\> \\#1 \\| \\~"
    assert markdown_text("a | b", 100, in_table=True) == "a | b"  # the table writer escapes it once
    assert markdown_text("line one\nline two\r\nthree", 100, in_table=True) == "line one ⏎ line two ⏎ three"
    assert markdown_text("abcdef ghij", 6, in_table=True) == "abcdef…"


def test_an_entry_or_prompt_without_completions_is_marked_not_dropped(tmp_path):
    bench, rows = judged_bench(tmp_path)
    ipo_first = next(r for r in rows if r["entry"] == "ipo" and r["seed"] == 0)
    (Path(ipo_first["run_dir"]) / "bench-completions.jsonl").unlink()
    (bench.initial_dir / "bench-completions.jsonl").unlink()  # prompts then come from the entries' files
    page = write_report(bench, rows)["html"].read_text()
    first = section(page, "<h3>Prompt 0</h3>", "</table>")
    assert first.count("(no completion recorded)") == 2  # the initial model and ipo's first seed
    assert "dpo seed 0: 0/0" in first and "<div class='prompt'>prompt 0: tell me</div>" in first


def test_a_damaged_completions_file_is_a_one_line_error_naming_it(tmp_path):
    path = tmp_path / "bench-completions.jsonl"
    path.write_text(json.dumps(completion(0, 0, "fine", None)) + "\n{not json\n")
    with pytest.raises(PrefoptError, match=r"bench-completions.jsonl line 2: not a completion record") as error:
        read_completions(path)
    assert "\n" not in str(error.value)
    assert read_completions(tmp_path / "absent.jsonl") is None


@pytest.mark.parametrize("keys", ["absent", "None"])
def test_a_bench_from_before_win_rates_and_completions_still_reports(tmp_path, keys):
    # rows written before win rates existed lack the keys (read_results fills them with None; rows given
    # directly may not), and there are no completions files
    rows = synthetic_rows(tmp_path / "results", 2)
    if keys == "absent":
        rows = [{k: v for k, v in r.items() if k not in ("win_rate", "lc_win_rate")} for r in rows]
    bench = synthetic_bench(tmp_path, rows, initial_eval())
    report = write_report(bench, rows)
    page, markdown = report["html"].read_text(), report["markdown"].read_text()
    for text in (page, markdown):
        assert "win rate" not in text.split("Figures")[0]  # no empty columns, no explanation of them
        assert "Completions" not in text
        assert "Entries sorted by mean reward" in text
    assert all(report[name].read_bytes()[:8] == PNG for name in FIGURES)
    assert page.count("<figcaption>") == len(FIGURES)  # the win-rate figure says "no data" under its heading
    header = next(line for line in markdown.splitlines() if line.startswith("| # |"))
    assert header.startswith("| # | entry | seeds | reward | KL | length | accuracy |")


def test_without_rewards_entries_are_ranked_by_win_rate(tmp_path):
    # a pairwise judge gives win rates and no reward
    rows = [r | {"reward": None} for r in rows_with_win_rates(tmp_path / "results")]
    bench = synthetic_bench(tmp_path, rows, initial_eval(reward=False))
    page = write_report(bench, rows)["html"].read_text()
    assert "Entries sorted by mean win rate against the initial model" in page
