"""The bench's figures and the HTML report around them, on synthetic results (no training): the Pareto
front, error bars that span the seeds, "no data" in place of blank panels, and a caption per figure.

The results are made in the shape results.py gives them: a row per run (with a metrics.jsonl in its run
directory for the curves) and the initial model's evaluation.
"""

from __future__ import annotations

import html
import json
import math
import random
from pathlib import Path

import pytest
import yaml

from prefopt.bench import plots
from prefopt.bench.plots import NO_DATA, figure_texts, pareto_front
from prefopt.bench.recipe import load_bench
from prefopt.bench.report import FIGURES, seed_bands, write_report
from prefopt.bench.results import aggregate

NAMES = ("dpo", "ipo", "simpo", "orpo", "kto-pair", "rdpo", "ld-dpo", "dpop", "mrpo", "sdpo", "cpo", "beta-dpo")
REWARD_KEY = "reward/vader_mean"
PNG = b"\x89PNG\r\n\x1a\n"
SCORED = "5e" * 32  # the held-out data's digest: every run scored on the same prompts


def synthetic_rows(folder: Path, entries: int, seeds: int = 3, *, reward: bool = True, steps: int = 30,
                   eval_every: int | None = 10, eval_by: set[str] | None = None) -> list[dict]:
    """A result row per entry x seed, as results.run_row makes them, and each run's metrics.jsonl: loss
    falling from log 2, the chosen log-prob drifting, held-out log-probs every ``eval_every`` steps (only for
    the entries in ``eval_by``, all when None). Without ``reward`` the task evaluation reported nothing."""
    rows = []
    for index, entry in enumerate(NAMES[:entries]):
        for seed in range(seeds):
            noise = random.Random(index * 100 + seed)
            run_dir = folder / "runs" / entry / f"seed-{seed}"
            lines = []
            for step in range(1, steps + 1):
                loss = 0.693 * math.exp(-step * (0.02 + 0.01 * index)) + noise.gauss(0, 0.02)
                lines.append({"step": step, "loss": loss, "logps/chosen": -40 - 0.3 * index * step + noise.gauss(0, 1),
                              "tokens_per_s": 900 + 40 * index + noise.gauss(0, 20)})
                if eval_every and step % eval_every == 0 and (eval_by is None or entry in eval_by):
                    lines.append({"step": step, "eval/logps/chosen": -45 - 0.2 * step + noise.gauss(0, 1)})
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
            kl = 2.0 + 3.0 * index + noise.gauss(0, 0.4)
            value = 0.1 + 0.6 * (1 - math.exp(-kl / 8)) - 0.03 * (index % 3) + noise.gauss(0, 0.03)
            rows.append({
                "entry": entry, "seed": seed, "overrides": [f"loss.name={entry}"],
                "reward": value if reward else None, "kl": kl if reward else None,
                "length": 20 + 2 * index + noise.gauss(0, 1) if reward else None,
                "win_rate": None, "lc_win_rate": None,  # no comparison with the initial model's completions
                "accuracy": 0.6 + noise.uniform(0, 0.1), "tokens_per_s": 900 + 40 * index, "pairs_per_s": 3.0,
                "peak_rss_mib": 2000 + 150 * index + noise.gauss(0, 30), "wall_s": 60.0, "final_loss": loss,
                "steps": steps, "resumed": False, "eval_s": 5.0,
                "task_metrics": {REWARD_KEY: value, "reward/vader_std": 0.4} if reward else {},
                "eval_data_sha256": SCORED if reward else None, "scored_data_sha256": SCORED if reward else None,
                "run_dir": str(run_dir),
            })
    return rows


def initial_eval(reward: bool = True) -> dict:
    return {"task": "sentiment" if reward else None, "reward": 0.05 if reward else None,
            "kl": 0.0 if reward else None, "length": 19.0 if reward else None,
            "metrics": {REWARD_KEY: 0.05} if reward else {}, "eval_data_sha256": SCORED if reward else None,
            "scored_data_sha256": SCORED if reward else None}


def synthetic_bench(folder: Path, rows: list[dict], initial: dict | None, curves=("loss", "eval/logps/chosen")):
    """A bench recipe naming the rows' entries, with the initial model's evaluation in place."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.yaml").write_text("seed: 0\n")
    entries = list(dict.fromkeys(r["entry"] for r in rows))
    (folder / "bench.yaml").write_text(yaml.safe_dump({
        "base": "base.yaml", "seeds": sorted({r["seed"] for r in rows}),
        "entries": [{"name": name} for name in entries], "plots": {"curves": list(curves)},
        "output": {"dir": str(folder / "out")},
    }))
    bench = load_bench(folder / "bench.yaml", with_runs=False)
    if initial is not None:
        bench.initial_dir.mkdir(parents=True, exist_ok=True)
        (bench.initial_dir / "bench-eval.json").write_text(json.dumps(initial))
    return bench


def figures_of(rows: list[dict], initial: dict | None, keys=("loss", "eval/logps/chosen")) -> dict:
    records = aggregate(rows, list(NAMES))
    styles = plots.entry_styles([r["entry"] for r in records])
    order = [r["entry"] for r in records]
    return {
        "frontier": plots.frontier_figure(rows, records, initial, styles),
        "curves": plots.curves_figure(seed_bands(rows, keys), order, styles, keys),
        "length_reward": plots.length_reward_figure(rows, records, initial, styles),
        "throughput_memory": plots.throughput_memory_figure(records, styles),
    }


def no_data_lines(fig) -> list[str]:
    return [text for text in figure_texts(fig) if text.startswith(NO_DATA)]


# ----------------------------------------------------------------------------------------------------------
# the Pareto front


def test_pareto_front_keeps_the_points_no_other_beats_on_both_axes():
    points = [
        ("initial", 0.0, 0.10),
        ("b", 1.0, 0.50),
        ("low-at-same-kl", 1.0, 0.30),  # b has its KL and more reward
        ("c", 2.0, 0.40),  # b: less KL, more reward
        ("d", 2.0, 0.80),
        ("d-again", 2.0, 0.80),  # equal to d: neither dominates the other, both stay
        ("same-reward-more-kl", 3.0, 0.80),  # d has its reward at less KL
        ("worse-than-initial", 0.5, 0.05),
        ("top", 6.0, 0.90),
    ]
    assert pareto_front(points) == [("initial", 0.0, 0.10), ("b", 1.0, 0.50), ("d", 2.0, 0.80),
                                    ("d-again", 2.0, 0.80), ("top", 6.0, 0.90)]
    assert pareto_front([("only", 1.0, 0.2)]) == [("only", 1.0, 0.2)]
    assert pareto_front([]) == []
    # the front is sorted by KL whatever the input order, and its rewards then rise
    shuffled = pareto_front(list(reversed(points)))
    assert [p[1] for p in shuffled] == sorted(p[1] for p in shuffled)


def test_frontier_draws_the_front_through_the_initial_model_and_labels_it(tmp_path):
    rows = synthetic_rows(tmp_path, 5)
    initial = initial_eval()
    fig = figures_of(rows, initial)["frontier"]
    ax = fig.axes[0]
    records = aggregate(rows, list(NAMES))
    expected = pareto_front([(r["entry"], r["kl"].mean, r["reward"].mean) for r in records]
                            + [(plots.INITIAL["label"], 0.0, 0.05)])
    assert expected[0][0] == plots.INITIAL["label"] and len(expected) >= 3  # the data has a real front
    front_line = next(line for line in ax.lines if line.get_label().startswith("Pareto front"))
    # a "post" step line passes through every front point (and the corners between them)
    drawn = set(zip(front_line.get_xdata(), front_line.get_ydata()))
    assert {(kl, reward) for _, kl, reward in expected} <= drawn
    texts = figure_texts(fig)
    assert ax.get_xlabel() == "KL to reference (nats per completion)"
    assert ax.get_ylabel() == "mean reward (task sentiment)"
    assert ax.get_title() and any(t.startswith("Pareto front") for t in texts)  # in the legend
    assert {name for name, *_ in expected if name != plots.INITIAL["label"]} <= set(texts)  # front points named
    assert not no_data_lines(fig)


def test_error_bars_span_each_entrys_seeds_and_every_seed_is_drawn(tmp_path):
    rows = synthetic_rows(tmp_path, 3, seeds=3)
    figures = figures_of(rows, initial_eval())
    for name, x in (("frontier", "kl"), ("length_reward", "length")):
        ax = figures[name].axes[0]
        bars = {c.get_label(): c for c in ax.containers}
        for entry in NAMES[:3]:
            mine = [r for r in rows if r["entry"] == entry]
            xs, ys = [r[x] for r in mine], [r["reward"] for r in mine]
            _, _, (x_bars, y_bars) = bars[entry].lines
            (x_low, y_at), (x_high, _) = x_bars.get_segments()[0]
            (x_at, y_low), (_, y_high) = y_bars.get_segments()[0]
            assert (x_low, x_high) == pytest.approx((min(xs), max(xs)), rel=1e-12)
            assert (y_low, y_high) == pytest.approx((min(ys), max(ys)), rel=1e-12)
            # the bars cross at the mean over seeds
            assert (x_at, y_at) == pytest.approx((sum(xs) / 3, sum(ys) / 3), rel=1e-12)
        faint = sorted(tuple(p) for c in ax.collections if c.get_alpha() == 0.3 for p in c.get_offsets())
        assert faint == sorted((r[x], r["reward"]) for r in rows)


def test_throughput_bars_span_the_seeds(tmp_path):
    rows = synthetic_rows(tmp_path, 2, seeds=3)
    records = aggregate(rows, list(NAMES))
    fig = figures_of(rows, None)["throughput_memory"]
    memory = fig.axes[1]
    segments = [seg for c in memory.containers if hasattr(c, "has_xerr") for seg in c.lines[2][0].get_segments()]
    expected = [(r["peak_rss_mib"].min, r["peak_rss_mib"].max) for r in records]
    drawn = [(seg[0][0], seg[1][0]) for seg in segments]
    assert len(drawn) == 2 and all(d == pytest.approx(e, rel=1e-12) for d, e in zip(drawn, expected))


# ----------------------------------------------------------------------------------------------------------
# what has no data says so


def test_a_bench_without_reward_or_kl_says_no_data_instead_of_blank_panels(tmp_path):
    rows = synthetic_rows(tmp_path, 3, reward=False)
    figures = figures_of(rows, initial_eval(reward=False))
    for name in ("frontier", "length_reward"):
        lines = no_data_lines(figures[name])
        assert len(lines) == 1 and "reward" in lines[0], (name, figure_texts(figures[name]))
        assert figures[name].axes[0].get_title()
    for name in ("curves", "throughput_memory"):  # training metrics are there
        assert not no_data_lines(figures[name])


def test_entries_or_keys_without_data_are_named(tmp_path):
    rows = synthetic_rows(tmp_path, 4, eval_by={"dpo", "ipo"})
    rows = [r | {"reward": None, "kl": None} if r["entry"] == "orpo" else r for r in rows]
    rows = [r | {"tokens_per_s": None} if r["entry"] == "simpo" else r for r in rows]
    figures = figures_of(rows, initial_eval(), keys=("loss", "eval/logps/chosen", "x/never"))
    assert no_data_lines(figures["frontier"]) == ["no data: orpo"]  # in the legend, under the plotted entries
    curves = figures["curves"]
    loss, held_out, never = curves.axes[:3]
    assert "no data" not in loss.get_xlabel()
    assert held_out.get_xlabel().endswith("no data: simpo, orpo")  # the entries without eval lines
    assert no_data_lines(curves) == ["no data: no run logged x/never"]
    spare = curves.axes[3]  # 3 panels in a 2-column grid: the fourth cell holds the legend, not a blank panel
    assert not spare.axison and [t.get_text() for t in spare.get_legend().get_texts()] \
        == [r["entry"] for r in aggregate(rows, list(NAMES))]
    assert no_data_lines(figures["throughput_memory"]) == [NO_DATA]  # beside simpo's missing bar


def test_curves_are_seed_means_with_min_max_bands(tmp_path):
    rows = synthetic_rows(tmp_path, 1, seeds=3, steps=4, eval_every=2)
    lines = {r["seed"]: [json.loads(x) for x in Path(r["run_dir"], "metrics.jsonl").read_text().splitlines()]
             for r in rows}
    bands = seed_bands(rows, ("loss", "eval/logps/chosen"))["dpo"]
    for key, steps in (("loss", [1, 2, 3, 4]), ("eval/logps/chosen", [2, 4])):
        assert [b[0] for b in bands[key]] == steps
        for step, mean, low, high in bands[key]:
            seeds = [line[key] for lines_ in lines.values() for line in lines_ if line["step"] == step and key in line]
            assert len(seeds) == 3
            assert (mean, low, high) == pytest.approx((sum(seeds) / 3, min(seeds), max(seeds)), rel=1e-12)
    fig = plots.curves_figure({"dpo": bands}, ["dpo"], plots.entry_styles(["dpo"]), ("loss", "eval/logps/chosen"))
    loss = fig.axes[0]
    band = loss.collections[0].get_paths()[0].vertices  # fill_between's polygon: the lows, then the highs
    assert band[:, 1].min() == pytest.approx(min(b[2] for b in bands["loss"]))
    assert band[:, 1].max() == pytest.approx(max(b[3] for b in bands["loss"]))
    assert loss.get_xlabel() == "optimizer step" and loss.get_ylabel() == "loss" and loss.get_title()


# ----------------------------------------------------------------------------------------------------------
# sizes, styles, files


def test_twelve_entries_get_distinct_markers_and_distinct_looks():
    styles = plots.entry_styles(list(NAMES))
    assert len({s["marker"] for s in styles.values()}) == 12
    assert len({s["color"] for s in styles.values()}) == 12
    # past 12, a colour comes back, but never with the same marker and dash
    more = plots.entry_styles([f"e{i}" for i in range(30)])
    assert len({(s["color"], s["marker"], s["linestyle"]) for s in more.values()}) == 30


@pytest.mark.parametrize("entries,seeds", [(1, 1), (5, 3), (12, 2)])
def test_write_plots_writes_every_figure_at_one_width(tmp_path, entries, seeds):
    from PIL import Image

    rows = synthetic_rows(tmp_path, entries, seeds)
    records = aggregate(rows, list(NAMES))
    keys = ("loss", "logps/chosen", "eval/logps/chosen")
    written = plots.write_plots(tmp_path, rows, records, initial_eval(), seed_bands(rows, keys), keys)
    assert list(written) == list(FIGURES)
    widths = []
    for path in written.values():
        assert path.read_bytes()[:8] == PNG
        with Image.open(path) as image:
            widths.append(image.size[0])
            assert image.info["dpi"] == pytest.approx((plots.DPI, plots.DPI), abs=0.01)
    # bbox_inches="tight" trims each figure to what it draws: within a few percent of the design width
    assert all(abs(w - plots.WIDTH * plots.DPI) < 0.08 * plots.WIDTH * plots.DPI for w in widths), widths
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left over


def test_html_report_shows_each_figure_under_a_heading_and_a_reading(tmp_path):
    rows = synthetic_rows(tmp_path / "results", 3)
    bench = synthetic_bench(tmp_path, rows, initial_eval())
    report = write_report(bench, rows)
    page = report["html"].read_text()
    for name, (heading, reading) in FIGURES.items():
        block = page[page.index(f"<figure id='{name}'>"):]
        block = block[:block.index("</figure>")]
        assert f"<h3>{html.escape(heading)}</h3>" in block
        assert f"<figcaption>{html.escape(reading)}</figcaption>" in block
        assert block.count("data:image/png;base64,") == 1
    assert "max-width: 100%" in page and "http" not in page
    # numbers right-aligned, names left; a spread may go under its mean but never breaks itself
    best = aggregate(rows, list(NAMES))[0]
    reward = best["reward"]
    assert (f"<tr><td class='num'>1</td><td class='text entry'>{best['entry']}</td><td class='num'>3</td>"
            f"<td class='num'>{reward.mean:.3f} <span class='spread'>± {reward.std:.3f}</span></td>") in page
    markdown = report["markdown"].read_text()
    for heading, reading in FIGURES.values():
        assert f"### {heading}\n\n{reading}\n\n![{heading}](" in markdown


def test_report_of_a_bench_without_rewards_has_every_figure(tmp_path):
    rows = synthetic_rows(tmp_path / "results", 2, reward=False)
    bench = synthetic_bench(tmp_path, rows, initial_eval(reward=False))
    report = write_report(bench, rows)
    assert all(report[name].read_bytes()[:8] == PNG for name in FIGURES)
    assert report["html"].read_text().count("<figcaption>") == len(FIGURES)
    assert json.loads(report["json"].read_text())["entries"][0]["reward"]["mean"] is None


def test_synthetic_rows_pass_the_results_reader(tmp_path):
    from prefopt.bench.results import read_results, write_results

    rows = synthetic_rows(tmp_path, 2)  # what these tests plot stands for what a bench reads back
    write_results(tmp_path / "results.jsonl", rows)
    assert read_results(tmp_path) == rows
