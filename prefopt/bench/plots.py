"""The bench's figures, as PNG files (matplotlib's Agg backend: no display needed).

- ``frontier.png``: reward vs KL to the reference, one small point per run and a labelled mean per entry,
  with the untrained initial model at KL 0 (the DPO paper's Fig. 2, left).
- ``curves.png``: training loss and chosen log-prob against the step, each entry's mean over seeds (the
  bench recipe's ``plots.curves`` picks other metrics.jsonl keys, held-out eval/* ones included).
- ``length_reward.png``: reward against completion length (does an entry buy reward with length?).
- ``throughput_memory.png``: tokens per second and peak memory of training, with their spread over seeds.

matplotlib is imported here only, when a report is written, so the CLI starts without it.
"""

from __future__ import annotations

from pathlib import Path

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
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _styles(names: list[str]) -> dict[str, dict]:
    """A colour and marker per entry: 20 colours, then the same colours with the next marker."""
    import matplotlib

    colours = matplotlib.colormaps["tab20"]
    # tab20 holds 10 hues, each dark then light: the 10 dark ones first, so neighbours differ in hue.
    shade = lambda i: (2 * i) % 20 + (i // 10) % 2  # noqa: E731
    return {name: {"color": colours(shade(i)), "marker": MARKERS[(i // 20) % len(MARKERS)]}
            for i, name in enumerate(names)}


def _scatter(ax, rows: list[dict], records: list[dict], styles: dict, x: str, y: str, initial: dict | None) -> None:
    """Every run as a faint point, each entry's mean as a labelled marker, the initial model as a star."""
    for row in rows:
        if row.get(x) is not None and row.get(y) is not None:
            style = styles[row["entry"]]
            ax.scatter(row[x], row[y], s=14, alpha=0.35, color=style["color"], marker=style["marker"], linewidths=0)
    for record in records:
        mx, my = record[x].mean, record[y].mean
        if mx is None or my is None:
            continue
        style = styles[record["entry"]]
        ax.scatter(mx, my, s=50, color=style["color"], marker=style["marker"], edgecolors="black", linewidths=0.5,
                   label=record["entry"], zorder=3)
        ax.annotate(record["entry"], (mx, my), xytext=(4, 3), textcoords="offset points", fontsize=7)
    if initial is not None and initial.get(x) is not None and initial.get(y) is not None:
        ax.scatter(initial[x], initial[y], s=120, marker="*", color="black", label="initial model", zorder=4)
        ax.annotate("initial", (initial[x], initial[y]), xytext=(4, -9), textcoords="offset points", fontsize=7)
    ax.grid(alpha=0.3)


def _legend(ax, count: int) -> None:
    if count:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
                  ncol=1 if count <= 22 else 2)


def frontier(path: Path, rows: list[dict], records: list[dict], initial: dict | None, styles: dict) -> Path:
    return _scatter_figure(path, rows, records, initial, styles, "kl",
                           "KL(policy || reference) of sampled completions (nats per sequence)",
                           "Reward vs KL: one faint point per run, the entry mean labelled")


def length_reward(path: Path, rows: list[dict], records: list[dict], initial: dict | None, styles: dict) -> Path:
    return _scatter_figure(path, rows, records, initial, styles, "length", "mean completion length (tokens)",
                           "Reward vs completion length")


def _scatter_figure(path: Path, rows: list[dict], records: list[dict], initial: dict | None, styles: dict,
                    x: str, xlabel: str, title: str) -> Path:
    """Reward (y) against ``x``: every run, each entry's mean, the initial model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    _scatter(ax, rows, records, styles, x, "reward", initial)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean reward of sampled completions")
    ax.set_title(title)
    _legend(ax, len(records) + (initial is not None))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def curves(path: Path, curves_by_entry: dict, order: list[str], styles: dict,
           keys: tuple[str, ...] = CURVE_KEYS) -> Path:
    """One panel per metrics.jsonl key, up to 3 in a row; sparse curves (eval/* keys) get markers."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    columns = min(len(keys), 3)
    rows = -(-len(keys) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns + 1, 4.5 * rows), squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes, keys):
        for entry in order:
            points = curves_by_entry.get(entry, {}).get(key, [])
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, color=styles[entry]["color"], linewidth=1.2, label=entry,
                        marker="o" if len(points) <= 20 else None, markersize=3)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{CURVE_TITLES.get(key, key)} (mean over seeds)", fontsize=10)
        ax.grid(alpha=0.3)
    # One legend beside the last panel, of every entry plotted anywhere (that panel may have no data).
    lines = {line.get_label(): line for ax in axes for line in ax.lines}
    if lines:
        axes[len(keys) - 1].legend(lines.values(), lines.keys(), fontsize=7, loc="center left",
                                   bbox_to_anchor=(1.01, 0.5), frameon=False, ncol=1 if len(lines) <= 22 else 2)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def throughput_memory(path: Path, records: list[dict], styles: dict) -> Path:
    """Horizontal bars in leaderboard order; error bars span min to max over seeds."""
    plt = _pyplot()
    height = max(2.5, 0.28 * len(records) + 1.2)
    fig, axes = plt.subplots(1, 2, figsize=(12, height), sharey=True)
    names = [r["entry"] for r in records]
    positions = list(range(len(records)))
    for ax, key, label in ((axes[0], "tokens_per_s", "training tokens / s (median over steps)"),
                           (axes[1], "peak_rss_mib", "peak RSS of the training process (MiB)")):
        means = [r[key].mean or 0.0 for r in records]
        low = [(r[key].mean - r[key].min) if r[key].mean is not None else 0.0 for r in records]
        high = [(r[key].max - r[key].mean) if r[key].mean is not None else 0.0 for r in records]
        ax.barh(positions, means, xerr=[low, high], color=[styles[n]["color"] for n in names], capsize=2)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(positions, names, fontsize=8)
    axes[0].invert_yaxis()  # best reward on top, as in the leaderboard
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_plots(out_dir: Path, rows: list[dict], records: list[dict], initial: dict | None,
                curves_by_entry: dict, curve_keys: tuple[str, ...] = CURVE_KEYS) -> dict[str, Path]:
    """Every figure into ``out_dir``; returns {name: path} in the order the report shows them."""
    order = [r["entry"] for r in records]
    styles = _styles(order)
    return {
        "frontier": frontier(out_dir / "frontier.png", rows, records, initial, styles),
        "curves": curves(out_dir / "curves.png", curves_by_entry, order, styles, curve_keys),
        "length_reward": length_reward(out_dir / "length_reward.png", rows, records, initial, styles),
        "throughput_memory": throughput_memory(out_dir / "throughput_memory.png", records, styles),
    }
