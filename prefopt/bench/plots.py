"""The bench's figures, as PNG files (matplotlib's Agg canvas: no display needed).

- ``frontier.png``: reward vs KL to the reference (the DPO paper's Fig. 2, left). Each entry's mean over
  seeds with bars from its lowest to its highest seed on both axes, every run faint behind it, the untrained
  initial model as a star, and the Pareto front (no other point has more reward at less KL) as a step line.
- ``winrate_kl.png``: win rate against the initial model vs KL, drawn as the frontier is, with each entry's
  length-controlled win rate as a hollow marker of its colour; the initial model ties with itself (0.5).
- ``curves.png``: metrics.jsonl keys against the optimizer step (the bench recipe's ``plots.curves``), each
  entry's mean over seeds with a band from the lowest to the highest seed.
- ``length_reward.png``: reward against completion length (does an entry buy reward with length?).
- ``throughput_memory.png``: tokens per second and peak memory of training, with their spread over seeds.

Every ``*_figure`` function builds a matplotlib Figure without saving it (what tests read); ``write_plots``
saves them. A panel with nothing to show says "no data" and why, never stays blank. Figures share one width
and DPI, so that the HTML report shows them at their natural size side by side in one column.

matplotlib is imported here only, when a report is written, so the CLI starts without it.
"""

from __future__ import annotations

from pathlib import Path

from prefopt.paths import atomic_file

CURVE_KEYS = ("loss", "logps/chosen")  # the default of the bench recipe's plots.curves
CURVE_TITLES = {
    "loss": "training loss",
    "logps/chosen": "log-prob of chosen responses",
    "logps/rejected": "log-prob of rejected responses",
    "rewards/chosen": "beta x (log pi - log pi_ref) of chosen",
    "rewards/rejected": "beta x (log pi - log pi_ref) of rejected",
    "eval/logps/chosen": "log-prob of held-out chosen responses",
    "eval/logps/rejected": "log-prob of held-out rejected responses",
}
WIDTH = 9.6  # inches; at DPI, 1056 pixels: the HTML report's column, so figures show unscaled
DPI = 110
# Paul Tol's "muted" scheme (its colours stay apart under the common colour-vision deficiencies), then
# orange, blue and grey from his "vibrant" one: 12 entries, 12 colours.
PALETTE = ("#332288", "#CC6677", "#44AA99", "#DDCC77", "#882255", "#88CCEE", "#117733", "#AA4499", "#999933",
           "#EE7733", "#0077BB", "#555555")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "d")
LINESTYLES = ("-", "--", ":", "-.")  # past 12 entries, a colour comes back with another marker and dash
INITIAL = {"marker": "*", "color": "black", "s": 170, "label": "initial model (untrained)"}
FRONT_COLOUR = "0.45"
NO_DATA = "no data"
KL_LABEL = "KL to reference (nats per completion)"
LENGTH_LABEL = "mean completion length (tokens)"
WIN_RATE_LABEL = "win rate against the initial model"
EVEN = 0.5  # the win rate of a model as good as the initial one, and of the initial model against itself


def entry_styles(names: list[str]) -> dict[str, dict]:
    """A colour, marker and line style per entry: up to 12 entries each have their own colour and marker;
    past that a colour comes back with another marker and dash."""
    cycle = len(PALETTE)
    return {name: {"color": PALETTE[i % cycle], "marker": MARKERS[(i + i // cycle) % len(MARKERS)],
                   "linestyle": LINESTYLES[(i // cycle) % len(LINESTYLES)]}
            for i, name in enumerate(names)}


def pareto_front(points: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """The (name, kl, reward) points no other point dominates (at most its KL and at least its reward, one
    of them strictly), by KL ascending. Equal points dominate neither other: all of them stay."""
    def dominates(a, b) -> bool:
        return a[1] <= b[1] and a[2] >= b[2] and (a[1] < b[1] or a[2] > b[2])

    front = [p for p in points if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda p: (p[1], -p[2]))


def reward_label(rows: list[dict], initial: dict | None) -> str:
    """The y axis: "mean reward" and where it comes from: the judge that scored the completions when the
    evaluation records one (``judge``: {"name": ..., its options}), else the task that scored them (``task``),
    else the metric key it was read from, so one judge's score is not read as another's."""
    judge = judge_name(rows, initial)
    if judge:
        return f"mean reward (judge {judge})"
    task = next((r.get("task") for r in [initial or {}, *rows] if r.get("task")), None)
    if task:
        return f"mean reward (task {task})"
    for result in [*rows, initial or {}]:
        reward = result.get("reward")
        metrics = result.get("task_metrics") or result.get("metrics") or {}
        keys = [key for key, number in metrics.items() if reward is not None and number == reward]
        if keys:
            key = min(keys, key=lambda k: not k.startswith("reward"))  # the reward/* key when several tie
            return f"mean reward ({key})"
    return "mean reward"


def judge_name(rows: list[dict], initial: dict | None) -> str | None:
    """The judge the evaluation records, as its name and, when one of its options is text (a function, a
    model path), that option's last part: "function: completion_reward". None when none is recorded."""
    for result in [initial or {}, *rows]:
        judge = result.get("judge")
        if isinstance(judge, dict) and judge.get("name"):
            options = [value for key, value in judge.items() if key != "name"]
            options += [value for nested in options if isinstance(nested, dict) for value in nested.values()]
            # a name or a path, not a prompt template
            names = [value for value in options
                     if isinstance(value, str) and value and not any(c.isspace() for c in value)]
            if not names:
                return str(judge["name"])
            detail = names[0].rstrip("/").replace(":", "/").rsplit("/", 1)[-1]
            return f"{judge['name']}: {detail}"
    return None


def figure_texts(fig) -> list[str]:
    """Every text a figure shows (titles, labels, annotations, legends), for tests and checks."""
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


# ----------------------------------------------------------------------------------------------------------
# building blocks


def _figure(height: float, **subplots):
    """A Figure on the Agg canvas, not pyplot: nothing global to close, no display backend chosen."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH, height), dpi=DPI, layout="constrained")
    return fig, fig.subplots(**subplots)


def _no_data_figure(title: str, reason: str):
    """A short figure that says why it is empty, in place of a blank panel."""
    fig, ax = _figure(1.6)
    _no_data(ax, reason)
    ax.set_title(title)
    return fig


def _no_data(ax, reason: str) -> None:
    ax.text(0.5, 0.5, f"{NO_DATA}: {reason}", transform=ax.transAxes, ha="center", va="center",
            fontsize=10, color="0.35", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _legend_below(fig, ax, order: list[str], extra: list[str] = ()) -> None:
    """One legend under the axes, as wide as the figure, so it never hides data or gets clipped: the entries
    in ``order`` (the leaderboard's), then the other labelled artists (initial model, front), then ``extra``
    lines (entries with no data)."""
    from matplotlib.lines import Line2D

    found = dict(zip(*reversed(ax.get_legend_handles_labels())))
    labels = [name for name in order if name in found] + [name for name in found if name not in order]
    handles = [found[name] for name in labels]
    for line in extra:
        handles.append(Line2D([], [], linestyle="none"))
        labels.append(line)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(handles)), frameon=False,
                   fontsize=8, handlelength=2.5)


def _bounds(spread) -> list[list[float]]:
    """Error-bar lengths below and above the mean: down to the lowest seed, up to the highest."""
    return [[spread.mean - spread.min], [spread.max - spread.mean]]


def _spread_points(ax, rows: list[dict], records: list[dict], styles: dict, x: str, y: str) -> list[str]:
    """Every run faint, each entry's mean with min-max bars on both axes; returns the entries without data."""
    missing = []
    for record in records:
        sx, sy, entry = record[x], record[y], record["entry"]
        if sx.mean is None or sy.mean is None:
            missing.append(entry)
            continue
        style = styles[entry]
        seeds = [r for r in rows if r["entry"] == entry and r.get(x) is not None and r.get(y) is not None]
        ax.scatter([r[x] for r in seeds], [r[y] for r in seeds], s=18, alpha=0.3, color=style["color"],
                   marker=style["marker"], linewidths=0, zorder=2)
        ax.errorbar(sx.mean, sy.mean, xerr=_bounds(sx), yerr=_bounds(sy), fmt=style["marker"],
                    color=style["color"], markersize=7, markeredgecolor="black", markeredgewidth=0.6,
                    elinewidth=1.1, capsize=3, label=entry, zorder=3)
    return missing


def _initial_point(ax, initial: dict | None, x: str, y: str) -> tuple[float, float] | None:
    if initial is None or initial.get(x) is None or initial.get(y) is None:
        return None
    # Under the entry means: an entry that did not move (KL 0) shows on the star, not hidden behind it.
    ax.scatter(initial[x], initial[y], zorder=2.5, **INITIAL)
    return initial[x], initial[y]


def _missing_line(missing: list[str]) -> list[str]:
    return [f"{NO_DATA}: {', '.join(missing)}"] if missing else []


# ----------------------------------------------------------------------------------------------------------
# the figures


def frontier_figure(rows: list[dict], records: list[dict], initial: dict | None, styles: dict):
    title = "Reward vs KL to the reference"
    if all(r["reward"].mean is None or r["kl"].mean is None for r in records):
        return _no_data_figure(title, "no run has both a reward and a KL to the reference "
                                      "(a pairwise judge gives win rates only; with no judge and no task nothing "
                                      "is evaluated)")
    fig, ax = _figure(6.2)
    missing = _spread_points(ax, rows, records, styles, "kl", "reward")
    points = [(r["entry"], r["kl"].mean, r["reward"].mean) for r in records if r["entry"] not in missing]
    origin = _initial_point(ax, initial, "kl", "reward")
    if origin is not None:
        points.append((INITIAL["label"], *origin))
    _draw_front(ax, pareto_front(points))
    ax.margins(0.07)  # room for the names beside points at the edges
    ax.set_xlabel(KL_LABEL)
    ax.set_ylabel(reward_label(rows, initial))
    ax.set_title(f"{title}: up and to the left is better")
    ax.grid(alpha=0.3)
    _legend_below(fig, ax, [r["entry"] for r in records], _missing_line(missing))
    return fig


def _draw_front(ax, front: list[tuple[str, float, float]]) -> None:
    """The non-dominated points joined by a step line (the best reward reached within each KL budget), each
    named beside its marker."""
    if len(front) > 1:
        ax.step([p[1] for p in front], [p[2] for p in front], where="post", color=FRONT_COLOUR, linewidth=1.4,
                linestyle="--", zorder=1, label="Pareto front (no entry has more reward at less KL)")
    for name, kl, reward in front:
        # On a pale box: a name over a faint run or a whisker stays legible.
        ax.annotate("initial" if name == INITIAL["label"] else name, (kl, reward), xytext=(7, 6),
                    textcoords="offset points", fontsize=8, color="0.15",
                    bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.75})


def winrate_kl_figure(rows: list[dict], records: list[dict], initial: dict | None, styles: dict):
    """Win rate against the initial model (filled, with its seeds) and the length-controlled win rate
    (hollow, the same colour, joined to it by a thin line) at each entry's mean KL."""
    title = "Win rate against the initial model vs KL to the reference"
    if not any(r.get("win_rate") is not None for r in rows):
        return _no_data_figure(title, "no run has a win rate against the initial model "
                                      "(the bench's evaluation compared none)")
    if all(r["win_rate"].mean is None or r["kl"].mean is None for r in records):
        return _no_data_figure(title, "no run has both a win rate and a KL to the reference")
    fig, ax = _figure(6.2)
    ax.axhline(EVEN, color=FRONT_COLOUR, linestyle="--", linewidth=1.2, zorder=1,
               label="0.5: as good as the initial model")
    missing = _spread_points(ax, rows, records, styles, "kl", "win_rate")
    _length_controlled_points(ax, [r for r in records if r["entry"] not in missing], styles)
    kl = 0.0 if initial is None or initial.get("kl") is None else initial["kl"]
    ax.scatter(kl, EVEN, zorder=2.5, **INITIAL)  # ties with itself on every prompt, by definition
    ax.margins(0.07)
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, -0.03), min(high, 1.03))  # a rate: no room drawn past 0 or 1
    ax.set_xlabel(KL_LABEL)
    judge = judge_name(rows, initial)
    ax.set_ylabel(WIN_RATE_LABEL + (f" (judge {judge})" if judge else ""))
    ax.set_title(f"{title}: up and to the left is better")
    ax.grid(alpha=0.3)
    _legend_below(fig, ax, [r["entry"] for r in records], _missing_line(missing))
    return fig


def _length_controlled_points(ax, records: list[dict], styles: dict) -> None:
    """Each entry's mean length-controlled win rate as a hollow marker above or below its win rate, joined to
    it: the line's length is how much of the win (or the loss) length accounts for."""
    drawn = False
    for record in records:
        lc, kl, raw = record["lc_win_rate"].mean, record["kl"].mean, record["win_rate"].mean
        if lc is None:
            continue
        style = styles[record["entry"]]
        ax.plot([kl, kl], [raw, lc], color=style["color"], linewidth=1.0, linestyle=":", zorder=2)
        # Empty inside and larger than the entry's mean marker: where the two rates agree (equal lengths) it
        # rings that marker instead of hiding it, and a star or bar under it shows through.
        ax.scatter(kl, lc, s=110, marker=style["marker"], facecolors="none", edgecolors=style["color"],
                   linewidths=1.6, zorder=3.5)
        drawn = True
    if drawn:  # one legend line for every hollow marker, in a neutral colour
        ax.scatter([], [], s=110, marker="o", facecolors="none", edgecolors="0.3", linewidths=1.6,
                   label="hollow: length-controlled win rate (at equal length)")


def length_reward_figure(rows: list[dict], records: list[dict], initial: dict | None, styles: dict):
    title = "Reward vs completion length"
    if all(r["reward"].mean is None or r["length"].mean is None for r in records):
        return _no_data_figure(title, "no run has both a reward and a completion length "
                                      "(a pairwise judge gives win rates only; with no judge and no task nothing "
                                      "is evaluated)")
    fig, ax = _figure(5.8)
    missing = _spread_points(ax, rows, records, styles, "length", "reward")
    _initial_point(ax, initial, "length", "reward")
    ax.margins(0.07)
    ax.set_xlabel(LENGTH_LABEL)
    ax.set_ylabel(reward_label(rows, initial))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend_below(fig, ax, [r["entry"] for r in records], _missing_line(missing))
    return fig


def curves_figure(curves_by_entry: dict, order: list[str], styles: dict, keys: tuple[str, ...] = CURVE_KEYS):
    """One panel per metrics.jsonl key, two in a row. ``curves_by_entry``: entry -> key -> points, each
    (step, mean) or (step, mean, lowest seed, highest seed); sparse curves (eval/* keys) get markers."""
    from matplotlib.ticker import MaxNLocator

    columns = 1 if len(keys) == 1 else 2
    rows = -(-len(keys) // columns)
    fig, axes = _figure(3.4 * rows + 0.8, nrows=rows, ncols=columns, squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    band_alpha = 0.22 if len(order) <= 5 else 0.12  # many overlapping bands would hide the lines
    for ax, key in zip(axes, keys):
        drawn = [entry for entry in order if _draw_curve(ax, curves_by_entry.get(entry, {}).get(key, []),
                                                          entry, styles[entry], band_alpha)]
        ax.set_title(CURVE_TITLES.get(key, key), fontsize=10)
        if not drawn:
            _no_data(ax, f"no run logged {key}")
            continue
        missing = [entry for entry in order if entry not in drawn]
        # Entries without this key are named under the panel, where they cannot cover a curve.
        ax.set_xlabel("optimizer step" + (f"\n{NO_DATA}: {', '.join(missing)}" if missing else ""))
        ax.set_ylabel(key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle("Training curves: mean over seeds, shaded from the lowest to the highest seed", fontsize=11)
    _curve_legend(fig, axes[len(keys):], order, styles)
    return fig


def _curve_legend(fig, spare_axes, order: list[str], styles: dict) -> None:
    """Every entry's line and marker, in the grid's empty cell when it has one, else under the panels."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=styles[entry]["color"], linestyle=styles[entry]["linestyle"], linewidth=1.4,
                      marker=styles[entry]["marker"], markersize=4, label=entry) for entry in order]
    if not handles:
        return
    if len(spare_axes):
        spare = spare_axes[0]
        spare.set_visible(True)
        spare.axis("off")
        spare.legend(handles=handles, loc="center", frameon=False, fontsize=8, handlelength=3,
                     ncol=1 if len(handles) <= 8 else 2, title="entries (leaderboard order)", title_fontsize=8)
        return
    fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles)), frameon=False, fontsize=8,
               handlelength=3)


def _draw_curve(ax, points: list[tuple], entry: str, style: dict, band_alpha: float) -> bool:
    if not points:
        return False
    steps = [p[0] for p in points]
    means = [p[1] for p in points]
    sparse = len(points) <= 20
    ax.plot(steps, means, color=style["color"], linestyle=style["linestyle"], linewidth=1.4, label=entry,
            marker=style["marker"] if sparse else None, markersize=4)
    if len(points[0]) == 4:
        lows, highs = [p[2] for p in points], [p[3] for p in points]
        if len(points) > 1:
            ax.fill_between(steps, lows, highs, color=style["color"], alpha=band_alpha, linewidth=0)
        else:  # a band needs two steps; one step shows its seeds' range as a bar
            ax.errorbar(steps, means, yerr=[[means[0] - lows[0]], [highs[0] - means[0]]], color=style["color"],
                        capsize=3, fmt="none")
    return True


THROUGHPUT_PANELS = (
    ("tokens_per_s", "Training throughput", "tokens per second (median over steps)"),
    ("peak_rss_mib", "Peak memory of training", "peak resident memory (MiB)"),
)


def throughput_memory_figure(records: list[dict], styles: dict):
    """Horizontal bars in leaderboard order; error bars span the lowest to the highest seed."""
    height = max(2.8, 0.34 * len(records) + 1.6)
    fig, axes = _figure(height, nrows=1, ncols=2, sharey=True)
    names = [r["entry"] for r in records]
    positions = list(range(len(records)))
    for ax, (key, title, label) in zip(axes, THROUGHPUT_PANELS):
        ax.set_title(title, fontsize=10)
        measured = [(pos, r) for pos, r in zip(positions, records) if r[key].mean is not None]
        if not measured:
            _no_data(ax, f"no run recorded {key}")
            continue
        for pos, record in measured:
            ax.barh(pos, record[key].mean, xerr=_bounds(record[key]), color=styles[record["entry"]]["color"],
                    edgecolor="black", linewidth=0.4, capsize=3, height=0.7)
        for pos in sorted(set(positions) - {p for p, _ in measured}):
            ax.annotate(NO_DATA, (0, pos), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8,
                        color="0.35")
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(positions, names, fontsize=8)
    axes[0].invert_yaxis()  # best reward on top, as in the leaderboard
    return fig


# ----------------------------------------------------------------------------------------------------------
# files


def save(fig, path: Path) -> Path:
    """Atomically, so a report rebuilt while someone reads it never shows half a PNG."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.15, facecolor="white")
    return path


def write_plots(out_dir: Path, rows: list[dict], records: list[dict], initial: dict | None,
                curves_by_entry: dict, curve_keys: tuple[str, ...] = CURVE_KEYS) -> dict[str, Path]:
    """Every figure into ``out_dir``; returns {name: path} in the order the report shows them."""
    order = [r["entry"] for r in records]
    styles = entry_styles(order)
    figures = {
        "frontier": frontier_figure(rows, records, initial, styles),
        "winrate_kl": winrate_kl_figure(rows, records, initial, styles),
        "curves": curves_figure(curves_by_entry, order, styles, curve_keys),
        "length_reward": length_reward_figure(rows, records, initial, styles),
        "throughput_memory": throughput_memory_figure(records, styles),
    }
    return {name: save(fig, Path(out_dir) / f"{name}.png") for name, fig in figures.items()}
