"""benchmarks/README.md's tables rebuilt from the raw files in benchmarks/results/, and a check that they agree.

A table backed by a raw file sits between two marker comments; the first names the table (a function of
TABLES) and its raw file:

    <!-- table: trl_speed_runs (benchmarks/results/trl_speed_qwen56m.json) -->

    | configuration | ... |

    <!-- /table -->

A section whose numbers have no raw file carries ``<!-- table: none -->`` under its heading; ``--check``
lists those as unbacked, a warning and not a failure. A markdown table outside both kinds of section is a
failure, so a new table cannot slip in untraced. Numbers quoted in the prose from the same raw files (in
benchmarks/README.md and README.md) are checked too: QUOTES holds each sentence with ``{}`` where a
number goes, and the function that gives the numbers.

    python benchmarks/tables.py --check    # exit 1 naming each table or quote that differs, with a diff
    python benchmarks/tables.py --write    # rewrite them in place from the raw files
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Callable, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BENCH_README = ROOT / "benchmarks" / "README.md"
MAIN_README = ROOT / "README.md"

TRL_SPEED = "trl_speed_qwen56m.json"
TRL_QUICK = "restructure_parity/trl_quick-after.json"
LENGTH_BENCH = "length_bench.json"
EOS_PROBE = "length_eos_probe.json"
INTEGRITY = "integrity_cost.json"
QUICKSTART = "restructure_parity/quickstart-after-summary.json"
JUDGE = "judge_agreement.json"
REFERENCE_MEMORY = "reference_memory.json"
LAYOUTS = "layouts.json"
OWN_DATA = "own_data"  # one folder per judge: benchmarks/own_data.py
OWN_DATA_JUDGES = {"function": "VADER (function)", "reward_model": "reward model (prefopt)",
                   "llm_pairwise": "SmolLM2 (llm_pairwise)"}
RM_SUMMARY = "reward_model/summary.json"
RM_AGREEMENT = "reward_model_agreement.json"
CLAIMS = "claims"  # one folder per paper-claim bench, written by benchmarks/bench_raw.py
LENGTH_STOPPING, SDPO, MRPO, DPOP = "length-stopping", "sdpo-more-seeds", "mrpo-strong-reference", "dpop-small-edits"

MEMORY_GOAL = 0.6  # prefopt peak RSS <= 0.6 x TRL's leanest: the goal benchmarks/README.md states


@functools.cache
def raw(name: str):
    """A raw result file of benchmarks/results/, parsed."""
    return json.loads((RESULTS / name).read_text())


# Formatting: each as the README writes that kind of number.

def thousands(value: float) -> str:
    return f"{value:,.0f}"


def sci(value: float) -> str:
    """1.9e-5, not Python's 1.9e-05."""
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def spread(stats: dict, digits: int, emphasis: bool = False) -> str:
    """A mean over seeds with its [min, max]; ``emphasis`` puts the mean in bold."""
    mean = bold(f"{stats['mean']:.{digits}f}", emphasis)
    return f"{mean} [{stats['min']:.{digits}f}, {stats['max']:.{digits}f}]"


def bold(text: str, on: bool = True) -> str:
    return f"**{text}**" if on else text


def markdown(header: list[str], rows: list[list[str]]) -> str:
    rule = "|" + "|".join(["---"] * len(header)) + "|"
    return "\n".join(["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(cells) + " |" for cells in rows)])


# prefopt against TRL's DPOTrainer (benchmarks/trl_speed.py)

TRL_RUN_ROWS = [  # README order: TRL's configurations first
    ("trl-fastest", "TRL fastest: precomputed reference, no checkpointing"),
    ("trl-leanest", "TRL leanest: defaults, gradient checkpointing"),
    ("prefopt", "prefopt defaults (reference from the cache, padded)"),
    ("prefopt-gc", "prefopt, gradient checkpointing"),
    ("prefopt-prefix-shared", "prefopt, `train.layout=prefix_shared`"),
]
PREFOPT_ROWS = [
    ("prefopt", "defaults"),
    ("prefopt-gc", "gradient checkpointing"),
    ("prefopt-prefix-shared", "`train.layout=prefix_shared`"),
]


def summaries(result: dict, config: str) -> list[dict]:
    """Each repeat's summary of one configuration, in the order the repeats ran."""
    return [run["summary"] for run in result["runs"][config]]


def median_of(result: dict, config: str, key: str) -> float:
    return statistics.median(summary[key] for summary in summaries(result, config))


def repeat_ratios(result: dict, mine: str, theirs: str, key: str) -> list[float]:
    return [a[key] / b[key] for a, b in zip(summaries(result, mine), summaries(result, theirs))]


def median_ratio(result: dict, mine: str, theirs: str, key: str) -> float:
    """The median of the per-repeat ratios, as the README states its ratios."""
    return statistics.median(repeat_ratios(result, mine, theirs, key))


def compared_steps(result: dict) -> int:
    """Steps whose losses are compared: --compare-losses, capped by the steps run (warm-up included)."""
    return min(result["settings"]["compare_losses"], len(result["runs"]["trl-fastest"][0]["raw"]["losses"]))


def losses(result: dict, config: str, repeat: int = 0) -> list[float]:
    """One repeat's per-step losses over the compared steps."""
    return result["runs"][config][repeat]["raw"]["losses"][: compared_steps(result)]


def loss_gap(result: dict, config: str, baseline: str = "trl-fastest") -> float:
    """Max |loss - baseline's loss| over the compared steps of every repeat (same repeat, same step)."""
    repeats = range(len(result["runs"][config]))
    return max(abs(a - b) for i in repeats for a, b in zip(losses(result, config, i), losses(result, baseline, i)))


def fastest_prefopt(result: dict) -> str:
    """The prefopt configuration with the highest throughput against TRL's fastest."""
    speeds = {name: median_ratio(result, name, "trl-fastest", "tokens_per_s") for name, _ in PREFOPT_ROWS}
    return max(speeds, key=speeds.get)


def trl_speed_runs() -> str:
    result = raw(TRL_SPEED)
    repeats = len(result["runs"]["trl-fastest"])
    rows = []
    for name, label in TRL_RUN_ROWS:
        cells = [f"{thousands(s['tokens_per_s'])}, {thousands(s['peak_rss_mib'])}, {s['cpu_s_per_step']:.1f}"
                 for s in summaries(result, name)]
        median = (f"{thousands(median_of(result, name, 'tokens_per_s'))} tok/s, "
                  f"{thousands(median_of(result, name, 'peak_rss_mib'))} MiB")
        rows.append([label, *cells, bold(median)])
    return markdown(["configuration", *(f"repeat {i + 1}" for i in range(repeats)), "**median**"], rows)


def trl_speed_ratios() -> str:
    """Bold: the fastest prefopt configuration's throughput, and each peak RSS that meets the memory goal."""
    result = raw(TRL_SPEED)
    fastest = fastest_prefopt(result)
    rows = []
    for name, label in PREFOPT_ROWS:
        speed = median_ratio(result, name, "trl-fastest", "tokens_per_s")
        cpu = median_ratio(result, name, "trl-fastest", "cpu_s_per_step")
        memory = median_ratio(result, name, "trl-leanest", "peak_rss_mib")
        rows.append([label, bold(f"×{speed:.2f}", name == fastest), f"×{cpu:.2f}",
                     bold(f"×{memory:.2f}", memory <= MEMORY_GOAL), sci(loss_gap(result, name))])
    header = ["prefopt configuration", "tokens/s vs TRL fastest", "CPU s/step vs TRL fastest",
              "peak RSS vs TRL leanest",
              f"max \\|loss − TRL's\\| over {compared_steps(result)} steps"]
    return markdown(header, rows)


def trl_quick() -> str:
    """The --quick run: one repeat of every configuration, in the order they ran."""
    result = raw(TRL_QUICK)
    rows = []
    for config in result["configs"]:
        name = config["name"]
        summary = summaries(result, name)[0]
        gap = loss_gap(result, name)
        rows.append([f"`{name}`", thousands(summary["tokens_per_s"]), f"{summary['cpu_s_per_step']:.2f}",
                     thousands(summary["peak_rss_mib"]), "–" if name == "trl-fastest" else sci(gap) if gap else "0"])
    header = ["configuration", "tok/s", "CPU s/step", "peak RSS MiB",
              f"max \\|loss − TRL fastest's\\| over {compared_steps(result)} steps"]
    return markdown(header, rows)


def loss_text(values: list[float]) -> str:
    return " ".join(f"{value:.6f}" for value in values)


def checkpointing_cost(result: dict, mine: str, plain: str) -> tuple[str, str, str]:
    """Throughput lost to gradient checkpointing, in %, with the two medians it compares."""
    with_gc, without = median_of(result, mine, "tokens_per_s"), median_of(result, plain, "tokens_per_s")
    return f"{100 * (1 - with_gc / without):.0f}", thousands(with_gc), thousands(without)


# Model-FLOP utilisation and prefopt's defaults (benchmarks/trl_speed.py's MFU columns, --bf16)

MFU_RUNS = {"qwen56m": "mfu_qwen56m.json", "llama56m-untied": "mfu_llama56m_untied.json"}
SPEED_DEFAULTS = "speed_defaults_qwen56m.json"
# The MFU runs predate train.layout: auto, so their "prefopt" is the padded layout and prefix sharing (today's
# default) is its own configuration; in the defaults run "prefopt" is today's default.
MFU_LABELS = {"trl-fastest": "TRL fastest", "trl-leanest": "TRL leanest", "prefopt": "prefopt, padded",
              "prefopt-gc": "prefopt, padded + checkpointing",
              "prefopt-prefix-shared": "prefopt, prefix-shared (**the default now**)"}
DEFAULTS_LABELS = {"trl-fastest": "TRL fastest", "trl-leanest": "TRL leanest",
                   "prefopt": "**prefopt defaults** (`auto`: prefix-shared)",
                   "prefopt-gc": "prefopt defaults + gradient checkpointing",
                   "trl-fastest-bf16": "TRL fastest, `bf16=True`",
                   "prefopt-bf16": "prefopt defaults, `train.mixed_precision: bf16`"}


def speed_row(result: dict, name: str, label: str) -> list[str]:
    """One configuration's medians and its ratios to TRL's fastest (speed) and leanest (memory)."""
    m = result["medians"][name]
    speed = "–" if name.startswith("trl") else f"×{median_ratio(result, name, 'trl-fastest', 'tokens_per_s'):.2f}"
    memory = "–" if name.startswith("trl") else f"×{median_ratio(result, name, 'trl-leanest', 'peak_rss_mib'):.2f}"
    gap = "–" if name == "trl-fastest" else sci(loss_gap(result, name)) if loss_gap(result, name) else "0"
    return [label, thousands(m["tokens_per_s"]), f"{m['gflops_per_s']:.1f}", f"{100 * m['mfu']:.1f}%",
            thousands(m["peak_rss_mib"]), speed, memory, gap]


SPEED_HEADER = ["configuration", "tok/s", "GFLOP/s", "MFU", "peak RSS MiB", "tok/s vs TRL fastest",
                "peak RSS vs TRL leanest", "max \\|loss − TRL fastest's\\|"]


def mfu(model: str) -> Callable[[], str]:
    """One 56M model's MFU run: every configuration, in the order they ran."""
    def table() -> str:
        result = raw(MFU_RUNS[model])
        return markdown(SPEED_HEADER, [speed_row(result, c["name"], MFU_LABELS[c["name"]]) for c in result["configs"]])
    return table


def speed_defaults() -> str:
    result = raw(SPEED_DEFAULTS)
    return markdown(SPEED_HEADER, [speed_row(result, c["name"], DEFAULTS_LABELS[c["name"]])
                                   for c in result["configs"]])


def matmul_limits(name: str) -> tuple[str, str]:
    """The float32 and bfloat16 matmul limits a run measured, GFLOP/s."""
    limit = raw(name)["limit"]
    return tuple(f"{limit[dtype]['flops_per_s'] / 1e9:.1f}" for dtype in ("float32", "bfloat16"))


SCALING = "scaling.json"
PROFILE = "profile_qwen56m.json"
PROFILE_ROWS = 8


def scaling() -> str:
    """Every point in the order it ran; "rest" is the peak RSS over the process, weights, gradients and AdamW."""
    rows = []
    for p in raw(SCALING)["points"]:
        rest = p["memory"]["rest_mib"]
        rows.append([str(p["max_length"]), str(p["batch_size"]), thousands(p["tokens_per_step"]),
                     f"{p['median_step_s']:.2f}", thousands(p["tokens_per_s"]), f"{p['gflops_per_s']:.1f}",
                     thousands(p["peak_rss_mib"]), thousands(rest), f"{rest / p['tokens_per_step']:.2f}"])
    header = ["max_length", "batch", "tokens/step", "s/step", "tok/s", "GFLOP/s", "peak RSS MiB", "rest MiB",
              "rest MiB per token"]
    return markdown(header, rows)


def scaling_fixed() -> tuple[str, ...]:
    memory = raw(SCALING)["points"][0]["memory"]
    fixed = memory["weights_mib"] + memory["gradients_mib"] + memory["adamw_mib"]
    return thousands(memory["baseline_mib"]), thousands(fixed)


def scaling_extremes() -> tuple[str, ...]:
    """Throughput at the shortest and longest max_length of the length sweep."""
    points = [p for p in raw(SCALING)["points"] if "max_length" in p["sweeps"]]
    return thousands(points[0]["tokens_per_s"]), thousands(points[-1]["tokens_per_s"])


def profile() -> str:
    top = raw(PROFILE)["profile"]["top_ops"][:PROFILE_ROWS]
    rows = [[f"`{op['op']}`", str(op["calls"]), thousands(op["self_cpu_ms"]), f"{100 * op['self_share']:.1f}%"]
            for op in top]
    return markdown(["op", "calls", "self CPU ms", "share of the steps' CPU time"], rows)


def train_losses(name: str) -> dict[int, float]:
    """A run's per-step training losses from its metrics.jsonl under benchmarks/results/."""
    lines = [json.loads(line) for line in (RESULTS / name).read_text().splitlines() if line.strip()]
    return {line["step"]: line["loss"] for line in lines if "loss" in line}


def quickstart_layout_gap() -> tuple[str, ...]:
    """Steps compared and the largest loss difference of the quickstart under auto against its padded run."""
    padded, auto = train_losses("quickstart/metrics.jsonl"), train_losses("quickstart_auto/metrics.jsonl")
    return sci(max(abs(auto[step] - padded[step]) for step in padded)), str(len(padded))


def untied_gap() -> tuple[str, str]:
    """tokens/s that 3x TRL's fastest would take on the untied model, and how far above prefopt's default."""
    result = raw(MFU_RUNS["llama56m-untied"])
    need = 3 * median_of(result, "trl-fastest", "tokens_per_s")
    return thousands(need), f"{100 * (need / median_of(result, 'prefopt-prefix-shared', 'tokens_per_s') - 1):.0f}"


def checkpointing_gap() -> tuple[str, ...]:
    """How far checkpointing's memory ratio is over the 0.4 goal, and what it cost in throughput."""
    result = raw(SPEED_DEFAULTS)
    memory = median_ratio(result, "prefopt-gc", "trl-leanest", "peak_rss_mib")
    with_gc, without = median_of(result, "prefopt-gc", "tokens_per_s"), median_of(result, "prefopt", "tokens_per_s")
    return (f"{100 * (memory / 0.4 - 1):.0f}", f"{100 * (1 - with_gc / without):.0f}", thousands(with_gc),
            thousands(without))


# Where the default (prefix sharing) ran: the defaults run's "prefopt", the MFU runs' "prefopt-prefix-shared".
DEFAULT_RUNS = ((SPEED_DEFAULTS, "prefopt"), (MFU_RUNS["qwen56m"], "prefopt-prefix-shared"),
                (MFU_RUNS["llama56m-untied"], "prefopt-prefix-shared"))


def defaults_mfu() -> tuple[str, ...]:
    """MFU of prefix sharing in the two MFU runs and the defaults run, then of padding in the MFU runs."""
    runs = (*DEFAULT_RUNS[1:], DEFAULT_RUNS[0], (MFU_RUNS["qwen56m"], "prefopt"), (MFU_RUNS["llama56m-untied"], "prefopt"))
    return tuple(f"{100 * raw(name)['medians'][config]['mfu']:.1f}" for name, config in runs)


def defaults_against(theirs: str, key: str) -> tuple[str, ...]:
    """The default's ratio to a TRL configuration in the defaults run, then in the two MFU runs."""
    return tuple(ratio(raw(name), config, theirs, key, 2) for name, config in DEFAULT_RUNS)


def bf16_numbers() -> tuple[str, ...]:
    """bf16 against fp32 and against TRL's bf16; TRL's own bf16 gain; both tools' loss gaps to TRL's fp32."""
    result = raw(SPEED_DEFAULTS)
    return (ratio(result, "prefopt-bf16", "prefopt", "tokens_per_s", 2),
            ratio(result, "prefopt-bf16", "trl-fastest-bf16", "tokens_per_s", 2),
            ratio(result, "trl-fastest-bf16", "trl-fastest", "tokens_per_s", 2),
            sci(loss_gap(result, "prefopt-bf16")), str(compared_steps(result)), sci(loss_gap(result, "trl-fastest-bf16")))


# On-policy rounds: in-process vLLM against a vLLM server (benchmarks/online_rounds.py)

ONLINE_ROUNDS = {"tiny": "online_rounds_tiny.json", "smollm2-135m": "online_rounds_smollm2_135m.json"}
ONLINE_LABELS = {"vllm": "in-process `vllm`", "vllm_server": "`vllm_server` (reload transport)"}


def online_rounds(model: str) -> Callable[[], str]:
    """Each sampler's start-up and its median round split (rounds 2 and later), in seconds."""
    def table() -> str:
        rows = []
        for sampler, result in raw(ONLINE_ROUNDS[model])["results"].items():
            m = result["summary"]
            rows.append([ONLINE_LABELS[sampler], f"{m['startup_and_first_sync_s']:.1f}", f"{m['generate_s']:.2f}",
                         f"{m['sync_s']:.2f}", f"{m['train_s']:.2f}", f"{m['round_s']:.2f}",
                         f"{100 * m['sync_share']:.1f}%"])
        header = ["sampler", "start-up s", "generate s", "sync s", "train s", "round s", "sync share of a round"]
        return markdown(header, rows)
    return table


def online_sync_numbers() -> tuple[str, ...]:
    """SmolLM2-135M: the server's and the in-process engine's median sync seconds, then their shares of a round."""
    results = raw(ONLINE_ROUNDS["smollm2-135m"])["results"]
    summaries = [results[sampler]["summary"] for sampler in ("vllm_server", "vllm")]
    return (*(f"{m['sync_s']:.1f}" for m in summaries), *(f"{100 * m['sync_share']:.1f}" for m in summaries))


# Claim 3: length (recipes/bench/length.yaml and benchmarks/eos_probe.py)

LENGTH_NOTES = {"dpo-unbiased": ("VADER labels", " (on its own labels)")}  # entry -> (label note, accuracy note)


def length_entries() -> list[dict]:
    return raw(LENGTH_BENCH)["entries"]


def length_entry(name: str) -> dict:
    return next(entry for entry in length_entries() if entry["entry"] == name)


def entry_label(entry: dict) -> str:
    note = LENGTH_NOTES.get(entry["entry"], ("", ""))[0]
    alpha = [o.split("=", 1)[1] for o in entry["overrides"] if o.startswith("loss.alpha=")]
    note = note or (f"alpha {alpha[0]}" if alpha else "")
    return f"{entry['entry']} ({note})" if note else entry["entry"]


def length_bench() -> str:
    """Bold: the best mean reward and the longest mean length."""
    entries, initial = length_entries(), raw(LENGTH_BENCH)["initial"]
    best = max(e["reward"]["mean"] for e in entries)
    longest = max(e["length"]["mean"] for e in entries)
    rows = [[entry_label(e), spread(e["reward"], 3, e["reward"]["mean"] == best), spread(e["kl"], 2),
             spread(e["length"], 1, e["length"]["mean"] == longest),
             f"{e['accuracy']['mean']:.2f}{LENGTH_NOTES.get(e['entry'], ('', ''))[1]}"] for e in entries]
    rows.append(["initial model", f"{initial['reward']:.3f}", f"{initial['kl']:.0f}", f"{initial['length']:.1f}",
                 "–"])
    return markdown(["entry", "reward", "KL", "length (tokens)", "held-out accuracy"], rows)


def length_range() -> tuple[str, str]:
    """The shortest and longest seed mean length of any entry."""
    low = min(e["length"]["min"] for e in length_entries())
    high = max(e["length"]["max"] for e in length_entries())
    return f"{low:.1f}", f"{high:.1f}".removesuffix(".0")


EOS_COLUMNS = ["end chosen", "end rejected", "inside chosen", "inside rejected"]
EOS_HEADER = ["model", "where chosen ends", "where rejected ends", "inside chosen", "inside rejected"]
# The length-biased runs share held-out pairs 1e5920; dpo-unbiased (other labels, other pairs) is in the file
# but not in the table, which compares the losses on the same pairs.
EOS_ROWS = [("dpo-b0.1", "dpo"), ("rdpo-b0.1", "rdpo"), ("ld-dpo-b0.1", "ld-dpo")]
EOS_HELD_OUT = "1e5920"


def eos_row(model: str) -> dict:
    return next(row for row in raw(EOS_PROBE) if row["model"] == model)


def eos_seeds(entry: str) -> list[dict]:
    return [eos_row(f"{entry} seed {seed} ({EOS_HELD_OUT})") for seed in (0, 1)]


def length_eos_probe() -> str:
    """Bold: the lowest log p(EOS) where the chosen response ends (the model whose completions stop ending)."""
    initial = eos_row(f"initial ({EOS_HELD_OUT})")
    lowest = min(row["end chosen"] for entry, _ in EOS_ROWS for row in eos_seeds(entry))
    rows = [["initial", *(f"{initial[column]:.1f}" for column in EOS_COLUMNS)]]
    for entry, label in EOS_ROWS:
        seeds = eos_seeds(entry)
        cells = [" / ".join(f"{row[column]:.1f}" for row in seeds) for column in EOS_COLUMNS]
        cells[0] = bold(cells[0], any(row["end chosen"] == lowest for row in seeds))
        rows.append([f"{label}, seeds 0 / 1", *cells])
    return markdown(EOS_HEADER, rows)


def eos_shifts(entries: list[str]) -> list[float]:
    """log p(EOS) of each seed and position minus the initial model's, for these entries."""
    initial = eos_row(f"initial ({EOS_HELD_OUT})")
    return [row[c] - initial[c] for entry in entries for row in eos_seeds(entry) for c in EOS_COLUMNS]


# Batch layouts (benchmarks/layouts.py)

def layouts() -> str:
    """One row per case and layout, as the script prints them; bold: the fastest layout of each case."""
    rows = raw(LAYOUTS)["rows"]
    fastest = {}
    for row in rows:
        case = (row["prompt_tokens"], row["response_tokens"])
        fastest[case] = min(fastest.get(case, row["seconds_median"]), row["seconds_median"])
    body = []
    for row in rows:
        case = (row["prompt_tokens"], row["response_tokens"])
        ran = "" if row["layout_used"] == row["layout"] else f" (ran {row['layout_used']})"
        body.append([f"{case[0]}:{case[1]}", row["layout"] + ran,
                     bold(f"{row['seconds_median']:.2f}", row["seconds_median"] == fastest[case]),
                     f"{row['speedup']:.2f}x", f"{row['peak_mib_over_model']:.0f}", thousands(row["tokens"]),
                     thousands(row["attention_scores"]), sci(row["sum_drift"]) if row["sum_drift"] else "0"])
    return markdown(["prompt:response", "layout", "s/step", "speedup", "peak MiB over the model", "tokens computed",
                     "attention scores", "sum drift"], body)


def layouts_settings() -> tuple[str, ...]:
    """Repeats, and the 1-minute load average before and after."""
    result = raw(LAYOUTS)
    load = result["machine"]["load_average_1_5_15"]
    return str(result["settings"]["repeats"]), f"{load['before'][0]:.1f}", f"{load['after'][0]:.1f}"


# What verifying cached files costs (benchmarks/integrity_cost.py)

def integrity_cost() -> str:
    result = raw(INTEGRITY)
    setup = result["setup_seconds"]
    cache, data = result["reference_cache"], result["task_data"]
    rows = [
        [f"setup of the quickstart, median of {len(setup['timed'])} (min–max)",
         f"{setup['median']:.2f} s ({min(setup['timed']):.2f}–{max(setup['timed']):.2f} s)"],
        [f"verifying the reference cache ({len(cache['files'])} files, {cache['bytes'] / 1024:.0f} KiB)",
         f"{cache['verify_seconds_median'] * 1000:.2f} ms"],
        [f"verifying the task data ({data['bytes'] / 1024:.0f} KiB)", f"{data['verify_seconds_median'] * 1000:.2f} ms"],
        ["both checks, as a share of setup", f"{result['verify_share_of_setup'] * 100:.3f}%"],
    ]
    return markdown(["measured", "result"], rows)


def load_averages() -> tuple[str, str]:
    """The 1-minute load average before and after the run."""
    averages = raw(INTEGRITY)["machine"]["load_average_1_5_15"]
    return f"{averages['before'][0]:.1f}", f"{averages['after'][0]:.1f}"


# The LLM judge against VADER (benchmarks/judge_agreement.py)

def judge_settings() -> dict[bool, dict]:
    return {setting["both_orders"]: setting for setting in raw(JUDGE)["settings"]}


def judge_agreement() -> str:
    """Bold: the share of "first" answers of one order, the position bias the table is about."""
    rows = []
    for both_orders, label in ((False, "one order"), (True, "both orders (default)")):
        setting = judge_settings()[both_orders]
        pairs = setting["pairs"]
        said_first = f"{setting['said_first']}/{pairs}"
        rows.append([label, f"{setting['agrees_with_vader']}/{pairs}", bold(said_first, not both_orders),
                     f"{setting['seconds_median']:.1f} s"])
    return markdown(["judge setting", "agrees with VADER", 'said "first"', "time"], rows)


def judge_setup_numbers() -> tuple[str, ...]:
    """The pairs kept and the least VADER gap of a pair kept."""
    return str(judge_settings()[True]["pairs"]), f"{raw(JUDGE)['min_gap']:.1f}"


def judge_load() -> tuple[str, ...]:
    """The 1-minute load average at the end of the run."""
    return (f"{raw(JUDGE)['machine']['load_average_1_5_15']['after'][0]:.1f}",)


def judge_findings() -> tuple[str, ...]:
    """The both-orders runs' fastest and slowest seconds, then agreement with VADER as "n/pairs"."""
    both = judge_settings()[True]
    return (f"{min(both['seconds']):.0f}", f"{max(both['seconds']):.0f}", str(both["agrees_with_vader"]),
            str(both["pairs"]))


# One bench on the exported pairs, judged three ways (benchmarks/own_data.py)

def own_data_board(judge: str) -> dict:
    return raw(f"{OWN_DATA}/{judge}/leaderboard.json")


def completion_outcomes(judge: str) -> list[float]:
    """Every run's outcome against the initial model, completion by completion, in one fixed order."""
    outcomes = []
    for path in sorted((RESULTS / OWN_DATA / judge / "runs").glob("*/seed-*/bench-completions.jsonl")):
        outcomes += [json.loads(line)["outcome"] for line in path.read_text().splitlines()]
    return outcomes


def agreement_with_vader(judge: str) -> tuple[int, int]:
    """Comparisons where both the judge and VADER call a winner (outcome off 0.5), and how many they call
    alike. A pairwise judge's outcome is its preference averaged over both orders, a number in [0, 1]."""
    pairs = [(mine, truth) for mine, truth in zip(completion_outcomes(judge), completion_outcomes("function"))
             if mine != 0.5 and truth != 0.5]
    return sum((mine > 0.5) == (truth > 0.5) for mine, truth in pairs), len(pairs)


def own_data() -> str:
    """Per entry and judge: reward (score judges), win rate and LC win rate against the initial model."""
    rows = []
    for judge, label in OWN_DATA_JUDGES.items():
        for entry in sorted(own_data_board(judge)["entries"], key=lambda e: e["entry"]):
            reward = spread(entry["reward"], 3) if entry["reward"]["mean"] is not None else "-"
            rows.append([entry["entry"], label, reward, spread(entry["win_rate"], 3), spread(entry["lc_win_rate"], 3)])
    return markdown(["entry", "judge", "mean reward", "win rate", "LC win rate"], rows)


def own_data_judges() -> str:
    """Per judge: its initial-model reward, agreement with VADER, and the bench's wall time."""
    rows = []
    for judge, label in OWN_DATA_JUDGES.items():
        initial = own_data_board(judge)["initial"]["reward"]
        agree, called = agreement_with_vader(judge)
        seconds = raw(f"{OWN_DATA}/{judge}/provenance.json")["bench_wall_seconds"]
        rows.append([label, "-" if initial is None else f"{initial:.3f}",
                     "-" if judge == "function" else f"{agree}/{called}", f"{seconds:.0f} s"])
    return markdown(["judge", "initial model's reward", "calls the winner as VADER does", "bench time"], rows)


def own_data_load() -> tuple[str, ...]:
    """The 1-minute load average when the first bench started and when the last one ended."""
    first = raw(f"{OWN_DATA}/function/provenance.json")["machine"]["load_average_1_5_15"]["before"][0]
    last = raw(f"{OWN_DATA}/llm_pairwise/provenance.json")["machine"]["load_average_1_5_15"]["after"][0]
    return f"{first:.1f}", f"{last:.1f}"


def own_data_agreement() -> tuple[str, ...]:
    """Agreement with VADER of the reward model, then of the LLM judge, each as agreed and called."""
    return tuple(str(n) for judge in ("reward_model", "llm_pairwise") for n in agreement_with_vader(judge))


def own_data_runs() -> tuple[str, ...]:
    """KL and length of each entry (the same samples for every judge), from the VADER board."""
    board = {e["entry"]: e for e in own_data_board("function")["entries"]}
    return tuple(f"{board[name][key]['mean']:.1f}" for name in ("dpo-b0.1", "ipo-b0.5") for key in ("kl", "length"))


# Several references from the cache (benchmarks/reference_memory.py)

def reference_memory() -> str:
    result = raw(REFERENCE_MEMORY)
    repeats = result["settings"]["repeats"]
    rows = []
    for phase, label in (("warm", f"warm: caches already built (median of {repeats})"),
                         ("cold", "cold: caches built in the measured process (1 run)")):
        medians = result["medians"][phase]
        rows.append([label, f"{thousands(medians['dpo_peak_mib'])} MiB", f"{thousands(medians['mrpo_peak_mib'])} MiB",
                     bold(f"{medians['ratio']:.3f}", phase == "warm")])
    return markdown(["phase", "dpo peak RSS", "mrpo peak RSS", "mrpo / dpo"], rows)


def reference_memory_numbers() -> tuple[str, ...]:
    """The warm ratio, how far MRPO's peak is from DPO's in percent, and each variant's warm range in MiB."""
    result = raw(REFERENCE_MEMORY)
    ratio = result["medians"]["warm"]["ratio"]
    ranges = [(min(result["peak_rss_mib"][v]["warm"]), max(result["peak_rss_mib"][v]["warm"])) for v in ("dpo", "mrpo")]
    return (f"{ratio:.3f}", f"{abs(ratio - 1) * 100:.1f}", *(thousands(x) for low_high in ranges for x in low_high))


# A reward model trained with prefopt (recipes/reward/sentiment-rm.yaml, benchmarks/reward_model_agreement.py)

def reward_model_training() -> tuple[str, ...]:
    """Training pairs, steps, and held-out pair accuracy at the start and the end."""
    summary = raw(RM_SUMMARY)
    return (str(summary["train_pairs"]), str(summary["steps"]),
            *(f"{summary[key]['eval/rewards/accuracies']:.3f}" for key in ("eval_start", "eval_end")))


def reward_model_agreement() -> tuple[str, ...]:
    """Accuracy through the judge, pairs, completions, Spearman and Pearson with VADER."""
    result = raw(RM_AGREEMENT)
    return (f"{result['pair_accuracy']:.3f}", str(result["pairs"]), str(2 * result["pairs"]),
            f"{result['spearman']:.3f}", f"{result['pearson']:.3f}")


# The quickstart (README.md)

TIE = 1e-6  # |implicit reward| below this at step 0: the policy is its reference, every held-out pair a tie

def quickstart_wall() -> tuple[str, str]:
    """Minutes and seconds of the quickstart's wall time under ``/usr/bin/time -v`` (data already built)."""
    console = (RESULTS / "quickstart_auto" / "console.txt").read_text()
    minutes, seconds = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\d+):(\d+)", console).groups()
    return minutes, seconds


def quickstart_numbers() -> tuple[str, ...]:
    """Held-out accuracy, margin and mean VADER reward, start and end, rounded to 2 decimals.

    At step 0 the policy is its reference, so every held-out margin is zero up to float rounding and, by
    the tie rule (README.md), every pair counts half: the start accuracy is 0.50 by that rule. The raw
    file's start accuracy (0.349) predates the rule. The rule is applied only where the raw file shows the
    policy equal to its reference: mean implicit rewards of chosen and rejected within TIE of zero (they are
    1e-7 there, float rounding of log-probs about -100)."""
    summary = raw(QUICKSTART)
    start, end = summary["eval_start"], summary["eval_end"]
    ties = all(abs(start[f"eval/rewards/{side}"]) < TIE for side in ("chosen", "rejected"))
    start_accuracy = 0.5 if ties else start["eval/rewards/accuracies"]

    def two(value: float) -> str:
        return f"{value:.2f}".replace("-0.00", "0.00")

    return (two(start_accuracy), two(end["eval/rewards/accuracies"]), two(start["eval/rewards/margins"]),
            two(end["eval/rewards/margins"]), two(start["eval/reward/vader_mean"]), two(end["eval/reward/vader_mean"]))


# The papers' claims: one folder per bench under claims/, written by benchmarks/bench_raw.py

def claim_board(bench: str) -> dict:
    return raw(f"{CLAIMS}/{bench}/leaderboard.json")


@functools.cache
def claim_runs(bench: str) -> list[dict]:
    """The bench's results.jsonl: one row per entry x seed."""
    return [json.loads(line) for line in (RESULTS / CLAIMS / bench / "results.jsonl").read_text().splitlines()]


def claim_run(bench: str, entry: str, seed: int) -> dict:
    return next(row for row in claim_runs(bench) if row["entry"] == entry and row["seed"] == seed)


def per_seed(bench: str, entry: str, key: str, digits: int) -> str:
    """One entry's ``key`` seed by seed, in seed order: 0.671 / 0.686 / ..."""
    seeds = claim_board(bench)["seeds"]
    return " / ".join(f"{claim_run(bench, entry, seed)[key]:.{digits}f}" for seed in seeds)


def paired(bench: str, mine: str, theirs: str, key: str = "reward") -> list[float]:
    """``mine - theirs`` seed by seed. A seed fixes the training prompts, data order and LoRA init, so both
    entries of one seed saw the same pairs: the difference is the variant's, not the draw's."""
    return [claim_run(bench, mine, seed)[key] - claim_run(bench, theirs, seed)[key]
            for seed in claim_board(bench)["seeds"]]


def claim_table(bench: str, length: bool = False) -> Callable[[], str]:
    """Each entry's mean [min, max] over seeds and its reward seed by seed; bold: the best mean reward."""

    def table() -> str:
        board = claim_board(bench)
        best = max(e["reward"]["mean"] for e in board["entries"])
        seeds = " / ".join(str(seed) for seed in board["seeds"])
        rows = []
        for e in board["entries"]:
            cells = [e["entry"], spread(e["reward"], 3, e["reward"]["mean"] == best), spread(e["kl"], 2)]
            cells += [spread(e["length"], 1)] if length else []
            cells += [spread(e["accuracy"], 2), per_seed(bench, e["entry"], "reward", 3)]
            rows.append(cells)
        initial = board["initial"]
        rows.append(["initial model", f"{initial['reward']:.3f}", "0", *([f"{initial['length']:.1f}"] if length else []),
                     "–", ""])
        header = ["entry", "reward", "KL", *(["length (tokens)"] if length else []), "held-out accuracy",
                  f"reward, seeds {seeds}"]
        return markdown(header, rows)

    return table


def run_summary(bench: str, entry: str, seed: int) -> dict:
    return raw(f"{CLAIMS}/{bench}/runs/{entry}/seed-{seed}/summary.json")


def sdpo_stages() -> str:
    """Per seed: held-out loss and accuracy of sDPO's stage 1 (against the initial model) and stage 2 (against
    stage 1's model). Stage 1 below log 2 and above 0.5 means it did improve on the initial model, so stage 2's
    reference is better aligned: the mechanism the paper relies on."""
    rows = []
    for seed in claim_board(SDPO)["seeds"]:
        stages = run_summary(SDPO, "sdpo-score", seed)["stages"]
        cells = [f"{stage['eval_end'][key]:.3f}" for stage in stages for key in ("eval/loss", "eval/rewards/accuracies")]
        rows.append([str(seed), *cells])
    return markdown(["seed", "stage 1 loss", "stage 1 accuracy", "stage 2 loss", "stage 2 accuracy"], rows)


def paired_numbers(bench: str, mine: str, theirs: str, key: str = "reward", digits: int = 3) -> tuple[str, ...]:
    """``mine - theirs`` seed by seed, then their mean."""
    differences = paired(bench, mine, theirs, key)
    return (*(f"{d:.{digits}f}" for d in differences), f"{statistics.mean(differences):.{digits}f}")


def strong_reference_rewards() -> tuple[str, str]:
    """The quickstart model's held-out VADER reward at its start (the initial model) and end, as it measured them."""
    summary = raw(f"{CLAIMS}/{MRPO}/strong-reference-summary.json")
    return tuple(f"{summary[key]['eval/reward/vader_mean']:.3f}" for key in ("eval_start", "eval_end"))


def length_stopping_data() -> tuple[str, ...]:
    """Mean tokens of the chosen, then the rejected, training completions, seed by seed (labels biased to length)."""
    seeds = claim_board(LENGTH_STOPPING)["seeds"]
    splits = [raw(f"{CLAIMS}/{LENGTH_STOPPING}/data/seed-{seed}.json")["splits"]["train"] for seed in seeds]
    return tuple(f"{split[key]:.1f}" for key in ("mean_chosen_tokens", "mean_rejected_tokens") for split in splits)


def length_stopping_lengths() -> tuple[str, ...]:
    """The initial model's completion length, then each entry's, seed by seed."""
    board = claim_board(LENGTH_STOPPING)
    return (f"{board['initial']['length']:.1f}",
            *(f"{claim_run(LENGTH_STOPPING, entry, seed)['length']:.1f}"
              for entry in ("dpo-b0.1", "rdpo-b0.1", "ld-dpo-b0.1") for seed in board["seeds"]))



def held_out_chosen_logps(bench: str, entry: str, seed: int) -> dict[int, float]:
    """A run's summed log-prob of the held-out chosen responses at each evaluation, by step."""
    path = RESULTS / CLAIMS / bench / "runs" / entry / f"seed-{seed}" / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {row["step"]: row["eval/logps/chosen"] for row in rows if "eval/logps/chosen" in row}


DPOP_ENTRIES = {"dpo-b0.3": "DPO", "dpop-b0.3": "DPOP"}


def dpop_logps() -> str:
    """One row per entry and seed: the held-out chosen log-prob at every evaluation; bold: the last one."""
    rows, steps = [], []
    for entry, label in DPOP_ENTRIES.items():
        for seed in claim_board(DPOP)["seeds"]:
            logps = held_out_chosen_logps(DPOP, entry, seed)
            steps = sorted(logps)
            rows.append([f"{label}, seed {seed}", *(bold(f"{logps[step]:.1f}", step == steps[-1]) for step in steps)])
    return markdown(["step", *(str(step) for step in steps)], rows)


def dpop_changes() -> tuple[str, ...]:
    """Per entry, seed by seed: the held-out chosen log-prob's change from the first evaluation to the last."""
    changes = []
    for entry in DPOP_ENTRIES:
        for seed in claim_board(DPOP)["seeds"]:
            logps = held_out_chosen_logps(DPOP, entry, seed)
            changes.append(f"{logps[max(logps)] - logps[min(logps)]:.1f}")
    return tuple(changes)


TABLES: dict[str, tuple[str, Callable[[], str]]] = {
    "trl_speed_runs": (TRL_SPEED, trl_speed_runs),
    "trl_speed_ratios": (TRL_SPEED, trl_speed_ratios),
    "trl_quick": (TRL_QUICK, trl_quick),
    "length_bench": (LENGTH_BENCH, length_bench),
    "length_eos_probe": (EOS_PROBE, length_eos_probe),
    "integrity_cost": (INTEGRITY, integrity_cost),
    "judge_agreement": (JUDGE, judge_agreement),
    "reference_memory": (REFERENCE_MEMORY, reference_memory),
    "layouts": (LAYOUTS, layouts),
    "mfu_qwen56m": (MFU_RUNS["qwen56m"], mfu("qwen56m")),
    "mfu_llama56m_untied": (MFU_RUNS["llama56m-untied"], mfu("llama56m-untied")),
    "speed_defaults": (SPEED_DEFAULTS, speed_defaults),
    "scaling": (SCALING, scaling),
    "online_rounds_tiny": (ONLINE_ROUNDS["tiny"], online_rounds("tiny")),
    "online_rounds_smollm2_135m": (ONLINE_ROUNDS["smollm2-135m"], online_rounds("smollm2-135m")),
    "profile": (PROFILE, profile),
    "own_data": (OWN_DATA, own_data),
    "own_data_judges": (OWN_DATA, own_data_judges),
    "claim_length_stopping": (f"{CLAIMS}/{LENGTH_STOPPING}", claim_table(LENGTH_STOPPING, length=True)),
    "claim_sdpo": (f"{CLAIMS}/{SDPO}", claim_table(SDPO)),
    "claim_sdpo_stages": (f"{CLAIMS}/{SDPO}", sdpo_stages),
    "claim_mrpo": (f"{CLAIMS}/{MRPO}", claim_table(MRPO)),
    "claim_dpop": (f"{CLAIMS}/{DPOP}", claim_table(DPOP)),
    "claim_dpop_logps": (f"{CLAIMS}/{DPOP}", dpop_logps),
}


# NamedTuples, not dataclasses: tests load this script by path, with no sys.modules entry, where
# dataclass() cannot resolve its string annotations.
class Quote(NamedTuple):
    """A sentence of a README with ``{}`` for each number it quotes from a raw file, and those numbers.
    ``{losses}`` stands for a list of numbers. Whitespace in the sentence matches any whitespace, line
    breaks included."""

    name: str
    readme: Path
    sentence: str
    values: Callable[[], tuple[str, ...]]

    def pattern(self) -> re.Pattern:
        pieces = re.split(r"(\{\w*\})", self.sentence)
        return re.compile("".join(PLACEHOLDERS[piece] if piece in PLACEHOLDERS else
                                  r"\s+".join(re.escape(word) for word in re.split(r"\s+", piece)) for piece in pieces))


PLACEHOLDERS = {
    "{}": r"(-?\d[\d,]*(?:\.\d+)?(?:e-?\d+)?)",  # one number: 186, 7,803, -0.5, 2.1e-5
    "{losses}": r"(\d\.\d+(?: \d\.\d+)*)",  # numbers separated by single spaces
}


def ratio(result: dict, mine: str, theirs: str, key: str, digits: int) -> str:
    return f"{median_ratio(result, mine, theirs, key):.{digits}f}"


def trl_model_numbers() -> tuple[str, ...]:
    model = raw(TRL_SPEED)["model"]
    return f"{model['parameters'] / 1e6:.1f}", str(model["hidden_size"]), str(model["layers"])


def trl_data_numbers() -> tuple[str, ...]:
    result = raw(TRL_SPEED)
    data = result["data"]
    return (str(data["pairs"]), f"{data['prompt_tokens']['median']:.0f}", f"{data['response_tokens']['median']:.0f}",
            str(result["settings"]["max_length"]))


def tokenization_numbers(name: str) -> tuple[str, ...]:
    tokenization = raw(name)["tokenization"]
    return str(tokenization["pairs"][0]), thousands(tokenization["tokens"]["trl"])


def trl_settings_numbers() -> tuple[str, ...]:
    result = raw(TRL_SPEED)
    return str(result["settings"]["batch_size"]), str(result["threads"]), str(result["settings"]["steps"])


def trl_duration_numbers() -> tuple[str, ...]:
    """The runs; their minutes end to end (each child's wall time: they ran one after another); the repeats and
    configurations."""
    result = raw(TRL_SPEED)
    runs = [run for repeats in result["runs"].values() for run in repeats]
    minutes = sum(run["seconds"] for run in runs) / 60
    return str(len(runs)), f"{minutes:.0f}", str(result["settings"]["repeats"]), str(len(result["runs"]))


def trl_loaded_repeat() -> tuple[str, ...]:
    """prefopt / TRL fastest throughput in repeat 2, the one that shared the machine."""
    return (f"{repeat_ratios(raw(TRL_SPEED), 'prefopt', 'trl-fastest', 'tokens_per_s')[1]:.1f}",)


def trl_fastest_ratio() -> tuple[str, ...]:
    result = raw(TRL_SPEED)
    return (ratio(result, fastest_prefopt(result), "trl-fastest", "tokens_per_s", 2),)


def trl_loss_lists() -> tuple[str, ...]:
    result = raw(TRL_SPEED)
    return loss_text(losses(result, "trl-fastest")), loss_text(losses(result, fastest_prefopt(result)))


def trl_loss_range() -> tuple[str, ...]:
    """How far TRL's losses move from the first: the comparison is not of constants."""
    values = losses(raw(TRL_SPEED), "trl-fastest")
    return (f"{max(abs(value - values[0]) for value in values):.2f}",)


def trl_memory_ratios() -> tuple[str, ...]:
    result = raw(TRL_SPEED)
    return tuple(ratio(result, name, "trl-leanest", "peak_rss_mib", 2)
                 for name in ("prefopt-gc", "prefopt-prefix-shared", "prefopt"))


def trl_reference_seconds() -> tuple[str, ...]:
    """Building prefopt's reference cache against TRL's precompute, medians over repeats."""
    result = raw(TRL_SPEED)
    return tuple(f"{median_of(result, name, 'reference_s'):.0f}" for name in ("prefopt", "trl-fastest"))


def checkpointing_costs() -> tuple[str, ...]:
    result = raw(TRL_SPEED)
    return (*checkpointing_cost(result, "prefopt-gc", "prefopt"),
            *checkpointing_cost(result, "trl-leanest", "trl-fastest"))


def main_readme_trl_numbers() -> tuple[str, ...]:
    """README.md's summary: prefix sharing's speed, loss gap and memory, then gradient checkpointing's memory, speed."""
    result = raw(TRL_SPEED)
    return (ratio(result, "prefopt-prefix-shared", "trl-fastest", "tokens_per_s", 1),
            sci(loss_gap(result, "prefopt-prefix-shared")),
            ratio(result, "prefopt-prefix-shared", "trl-leanest", "peak_rss_mib", 2),
            ratio(result, "prefopt-gc", "trl-leanest", "peak_rss_mib", 2),
            ratio(result, "prefopt-gc", "trl-fastest", "tokens_per_s", 1))


def quick_settings() -> tuple[str, ...]:
    result = raw(TRL_QUICK)
    settings = result["settings"]
    return (f"{result['model']['parameters'] / 1e6:.1f}", str(result["data"]["pairs"]), str(settings["max_length"]),
            str(settings["batch_size"]), str(settings["steps"]), str(settings["repeats"]))


def quick_losses() -> tuple[str, ...]:
    """Steps compared, the largest gap of any prefopt configuration, and TRL's and prefopt's losses."""
    result = raw(TRL_QUICK)
    gap = max(loss_gap(result, c["name"]) for c in result["configs"] if c["tool"] == "prefopt")
    return (str(compared_steps(result)), sci(gap), loss_text(losses(result, "trl-fastest")),
            loss_text(losses(result, "prefopt")))


def quick_memory() -> tuple[str, ...]:
    return (ratio(raw(TRL_QUICK), "prefopt", "trl-leanest", "peak_rss_mib", 2),)


def length_numbers(*wanted: tuple[str, str, int]) -> Callable[[], tuple[str, ...]]:
    """The means of (entry, metric) pairs of the length bench, each to its number of digits."""
    return lambda: tuple(f"{length_entry(entry)[metric]['mean']:.{digits}f}" for entry, metric, digits in wanted)


def length_evaluation() -> tuple[str, ...]:
    evaluation = raw(LENGTH_BENCH)["eval"]
    return tuple(str(evaluation[key]) for key in ("max_new_tokens", "num_prompts", "samples_per_prompt"))


def length_samples() -> tuple[str, ...]:
    """DPO's length under the bias, the initial model's, unbiased DPO's, and the range of every seed's."""
    lengths = [length_entry("dpo-b0.1")["length"]["mean"], raw(LENGTH_BENCH)["initial"]["length"],
               length_entry("dpo-unbiased")["length"]["mean"]]
    return (*(f"{length:.1f}" for length in lengths), *length_range())


def eos_shift_numbers() -> tuple[str, ...]:
    """DPO's and R-DPO's largest move of log p(EOS), and the range LD-DPO lowers it by."""
    small = max(abs(shift) for shift in eos_shifts(["dpo-b0.1", "rdpo-b0.1"]))
    drops = [-shift for shift in eos_shifts(["ld-dpo-b0.1"])]
    return f"{small:.1f}", f"{min(drops):.1f}", f"{max(drops):.1f}"


QUOTES = [
    Quote("trl_speed model", BENCH_README, "{}M parameters, hidden {}, {} layers,", trl_model_numbers),
    Quote("trl_speed data", BENCH_README, "{} pairs from VADER movie-review snippets: median prompt {} tokens, "
          "median response {}, max_length {};", trl_data_numbers),
    Quote("trl_speed tokens", BENCH_README, "both tools tokenize all {} pairs to the same ids ({} non-pad tokens);",
          lambda: tokenization_numbers(TRL_SPEED)),
    Quote("trl_speed settings", BENCH_README, "batch {}, AdamW at a constant lr, beta 0.1, fp32, {} threads; {} "
          "timed steps after one warm-up step.", trl_settings_numbers),
    Quote("trl_speed minutes", BENCH_README, "The {} runs took {} minutes ({} repeats of the {} configurations, "
          "interleaved);", trl_duration_numbers),
    Quote("trl_speed repeat 2", BENCH_README, "(the per-repeat ratio stayed at {}).", trl_loaded_repeat),
    Quote("trl_speed fastest", BENCH_README, "Every prefopt configuration passes, the fastest by ×{}.",
          trl_fastest_ratio),
    Quote("trl_speed losses", BENCH_README, "`{losses}` and `{losses}`.", trl_loss_lists),
    Quote("trl_speed loss range", BENCH_README, "The losses move by up to {} from the first,", trl_loss_range),
    Quote("trl_speed memory", BENCH_README, "met** with gradient checkpointing (×{}) and with prefix sharing (×{}). "
          "prefopt's defaults, at ×{}, do not meet it.", trl_memory_ratios),
    Quote("trl_speed reference", BENCH_README, "Building that cache took {} s, against {} s for TRL's precompute.",
          trl_reference_seconds),
    Quote("trl_speed checkpointing", BENCH_README, "Gradient checkpointing cost prefopt {}% of its throughput here "
          "({} against {} tok/s) and TRL {}% ({} against {}).", checkpointing_costs),
    Quote("trl_quick settings", BENCH_README, "(tiny {}M Llama, SmolLM2 vocabulary, {} VADER pairs, max_length {}, "
          "batch {}, {} timed steps, {} repeat;", quick_settings),
    Quote("trl_quick tokens", BENCH_README, "TRL and prefopt tokenize all {} pairs to the same ids ({} non-pad "
          "tokens).", lambda: tokenization_numbers(TRL_QUICK)),
    Quote("trl_quick losses", BENCH_README, "Over the first {} steps, every prefopt configuration's losses equal "
          "TRL's within **{}**. For example, TRL gives `{losses}` and prefopt `{losses}`.", quick_losses),
    Quote("trl_quick memory", BENCH_README, "Peak RSS was ×{} of TRL's leanest.", quick_memory),
    Quote("length runs", BENCH_README, "`prefopt bench recipes/bench/length.yaml` trains {} entries on {} seeds.",
          lambda: (str(len(length_entries())), str(len(raw(LENGTH_BENCH)["seeds"])))),
    Quote("length evaluation", BENCH_README, "The evaluation samples up to {} new tokens for each of the {} held-out "
          "prompts, {} sample each.", length_evaluation),
    Quote("length samples", BENCH_README, "Under the length bias it samples {} tokens, against {} for the initial "
          "model and {} for DPO on unbiased labels. Every seed of every entry stays within {}–{} tokens.",
          length_samples),
    Quote("length ld-dpo kl", BENCH_README, "({} nats against {} for unbiased DPO).",
          length_numbers(("ld-dpo-b0.1", "kl", 1), ("dpo-unbiased", "kl", 1))),
    Quote("length reward cost", BENCH_README, "{} against {} with VADER labels.",
          length_numbers(("dpo-b0.1", "reward", 3), ("dpo-unbiased", "reward", 3))),
    Quote("length rdpo", BENCH_README, "R-DPO recovers a little ({};", length_numbers(("rdpo-b0.1", "reward", 3))),
    Quote("length ld-dpo reward", BENCH_README, "LD-DPO recovers nearly all of the reward ({}),",
          length_numbers(("ld-dpo-b0.1", "reward", 3))),
    Quote("eos shifts", BENCH_README, "DPO and R-DPO move log p(EOS) by at most {} nats. LD-DPO lowers it by {}–{} "
          "nats", eos_shift_numbers),
    Quote("judge setup", BENCH_README, "It uses the {} pairs of the quickstart recipe's held-out data whose VADER "
          "scores differ by more than {}.", judge_setup_numbers),
    Quote("judge load", BENCH_README, "shared with test runs (1-minute load average {} at the end)",
          judge_load),
    Quote("judge findings", BENCH_README, "the three both-orders runs took {}–{} s, so the table's times say more "
          "about the load than about the judge. - **Agreement:** at 135M parameters the model cannot judge "
          "sentiment: {}/{} is chance.", judge_findings),
    Quote("reference memory", BENCH_README, "The warm ratio is {}: MRPO peaked {}% below DPO, inside the spread "
          "between repeats (DPO's warm runs peaked at {}–{} MiB, MRPO's at {}–{} MiB).", reference_memory_numbers),
    Quote("reward model data", BENCH_README, "on the quickstart's {} sentiment pairs, one epoch of {} steps.",
          lambda: reward_model_training()[:2]),
    Quote("reward model accuracy", BENCH_README, "Held-out pair accuracy rose from {} to {} over the epoch.",
          lambda: reward_model_training()[2:]),
    Quote("reward model judge", BENCH_README, "the saved model gives {} on the same {} pairs",
          lambda: reward_model_agreement()[:2]),
    Quote("reward model vader", BENCH_README, "over the {} held-out completions, Spearman {} and Pearson {}",
          lambda: reward_model_agreement()[2:]),
    Quote("layouts settings", BENCH_README, "Each figure is the median of {} fresh processes, with the layouts "
          "interleaved. It ran at commit 650f6a5 on 2026-12-02 on the 2 cores (1-minute load average {} at the start, "
          "{} at the end", layouts_settings),
    Quote("layouts prefix", BENCH_README, "At a 6:1 prompt-to-response ratio it gave {}× with", lambda: (
          f"{raw(LAYOUTS)['rows'][2]['speedup']:.2f}",)),
    Quote("layouts long responses", BENCH_README, "With long responses (1:4) it still gave {}× here", lambda: (
          f"{raw(LAYOUTS)['rows'][5]['speedup']:.2f}",)),
    Quote("own data load", BENCH_README, "(1-minute load average {} at the start, {} at the end), so its times "
          "are indicative", own_data_load),
    Quote("own data runs", BENCH_README, "DPO {} nats and {} tokens, IPO {} nats and {} tokens", own_data_runs),
    Quote("own data initial length", BENCH_README, "(the initial model's completions average {} tokens)",
          lambda: (f"{own_data_board('function')['initial']['length']:.1f}",)),
    Quote("own data agreement", BENCH_README, "agrees with VADER on {} of the {} comparisons where both call a "
          "winner", lambda: own_data_agreement()[:2]),
    Quote("own data llm", BENCH_README, "The 135M LLM judge agrees on {} of {},", lambda: own_data_agreement()[2:]),
    Quote("integrity load", BENCH_README, "(1-minute load average {} at the start, {} at the end), so the setup "
          "time", load_averages),
    Quote("README trl_speed", MAIN_README, "trained at {}x the tokens/s of TRL's fastest configuration (precomputed "
          "reference log-probs) with per-step losses equal to TRL's within {}, and peaked at {}x the memory of TRL's "
          "leanest (gradient checkpointing); prefopt with `model.gradient_checkpointing: true` in the padded layout "
          "peaked at {}x, at {}x TRL's speed.", main_readme_trl_numbers),
    Quote("defaults mfu", BENCH_README, "Prefix sharing reached {}% on qwen56m and {}% on the untied model, and {}% "
          "in the defaults run. The padded layout reached {}% and {}%.", defaults_mfu),
    Quote("defaults speed", BENCH_README, "The default gave ×{} in the defaults run, and ×{} (qwen56m) and ×{} "
          "(untied) in the MFU runs.", lambda: defaults_against("trl-fastest", "tokens_per_s")),
    Quote("defaults memory", BENCH_README, "The default peaked at ×{} of TRL's leanest in the defaults run (×{} and "
          "×{} in the MFU runs); adding gradient checkpointing gave ×{},", lambda: (
          *defaults_against("trl-leanest", "peak_rss_mib"),
          ratio(raw(SPEED_DEFAULTS), "prefopt-gc", "trl-leanest", "peak_rss_mib", 2))),
    Quote("defaults bf16", BENCH_README, "trained at ×{} its fp32 tokens/s, and ×{} TRL's `bf16=True`, whose bf16 "
          "gave it ×{}. Its losses stayed within {} of TRL's fp32 losses over the first {} steps (TRL's bf16: {}).",
          bf16_numbers),
    Quote("defaults quickstart", BENCH_README, "gave per-step losses within {} of the padded run's "
          "(`benchmarks/results/quickstart/`) over all {} steps,", quickstart_layout_gap),
    Quote("profile mm", BENCH_README, "Matrix multiplications take {}% of the step's CPU time,", lambda: (
          f"{100 * raw(PROFILE)['profile']['top_ops'][0]['self_share']:.1f}",)),
    Quote("scaling fixed", BENCH_README, "RSS minus the process before the model ({} MiB: torch and transformers "
          "loaded), the weights, gradients and AdamW's two moments ({} MiB together, fp32):", scaling_fixed),
    Quote("scaling throughput", BENCH_README, "({} tok/s at 256 tokens, {} at 2,048)", scaling_extremes),
    Quote("limit qwen56m", BENCH_README, "the section above; float32 limit {} GFLOP/s, bfloat16 {}):",
          lambda: matmul_limits(MFU_RUNS["qwen56m"])),
    Quote("limit llama56m", BENCH_README, "vocabulary 32,000; float32 limit {} GFLOP/s, bfloat16 {}):",
          lambda: matmul_limits(MFU_RUNS["llama56m-untied"])),
    Quote("limit defaults", BENCH_README, "(float32 limit {} GFLOP/s, bfloat16 {}; the bf16 rows'",
          lambda: matmul_limits(SPEED_DEFAULTS)),
    Quote("defaults spread", BENCH_README, "two qwen56m runs ({} and {} tok/s); TRL's fastest moved more ({} and {} "
          "tok/s, and {} in the 3-repeat run", lambda: tuple(thousands(median_of(raw(name), config, "tokens_per_s"))
          for name, config in ((MFU_RUNS["qwen56m"], "prefopt-prefix-shared"), (SPEED_DEFAULTS, "prefopt"),
                               (MFU_RUNS["qwen56m"], "trl-fastest"), (SPEED_DEFAULTS, "trl-fastest"),
                               (TRL_SPEED, "trl-fastest")))),
    Quote("defaults untied gap", BENCH_README, "3× would need {} tok/s at its MFU run's speed, {}% more than measured.",
          untied_gap),
    Quote("defaults checkpointing", BENCH_README, "{}% over the goal, at {}% less throughput ({} against {} tok/s).",
          checkpointing_gap),
    Quote("scaling per token", BENCH_README, "at {}–{} MiB per token:", lambda: tuple(
          f"{f(p['memory']['rest_mib'] / p['tokens_per_step'] for p in raw(SCALING)['points']):.2f}" for f in (min, max))),
    Quote("scaling fixed part", BENCH_README, "The fixed part (process, weights, gradients, optimizer) is {} MiB,",
          lambda: (thousands(sum(float(v.replace(",", "")) for v in scaling_fixed())),)),
    Quote("scaling batch", BENCH_README, "throughput stays within {}–{} tok/s.", lambda: tuple(
          thousands(f(p["tokens_per_s"] for p in raw(SCALING)["points"] if "batch_size" in p["sweeps"]))
          for f in (min, max))),
    Quote("online load", BENCH_README, "(1-minute load average {}-{}, recorded)", lambda: (
          f"{min(raw(f)['machine']['load_average_1_5_15']['before'][0] for f in ONLINE_ROUNDS.values()):.1f}",
          f"{max(raw(f)['machine']['load_average_1_5_15']['after'][0] for f in ONLINE_ROUNDS.values()):.1f}")),
    Quote("online sync", BENCH_README, "Syncing through files took {} s against {} s, {}% of the round against {}%.",
          lambda: online_sync_numbers()),
    Quote("online startup", BENCH_README, "Launching and loading the server took {} s once, against {} s for the "
          "in-process engine.", lambda: tuple(
          f"{raw(ONLINE_ROUNDS['smollm2-135m'])['results'][sampler]['summary']['startup_and_first_sync_s']:.0f}"
          for sampler in ("vllm_server", "vllm"))),
    Quote("README layouts", MAIN_README, "`python benchmarks/layouts.py` on CPU measured it {}x as fast as `padded` "
          "at prompt 384 / responses 64 and {}x at prompt 64 / responses 256,", lambda: tuple(
          f"{raw(LAYOUTS)['rows'][index]['speedup']:.2f}" for index in (2, 5))),
    Quote("length stopping data", BENCH_README, "chosen completions averaged {} / {} / {} tokens and rejected "
          "ones {} / {} / {} (seeds 0 / 1 / 2)", length_stopping_data),
    Quote("length stopping lengths", BENCH_README, "from the starting model's {} tokens to {} / {} / {} (DPO, seeds 0 / "
          "1 / 2). R-DPO reached {} / {} / {}, and LD-DPO {} / {} / {}:", length_stopping_lengths),
    Quote("length stopping rdpo", BENCH_README, "R-DPO's length minus DPO's was {} / {} / {} tokens (mean {})",
          lambda: paired_numbers(LENGTH_STOPPING, "rdpo-b0.1", "dpo-b0.1", "length", 1)),
    Quote("dpop changes", BENCH_README, "DPO's held-out chosen log-prob changed by {} / {} nats (seeds 0 / 1), "
          "DPOP's by {} / {}", dpop_changes),
    Quote("sdpo over dpo", BENCH_README, "sDPO's reward minus DPO's, seed by seed: {} / {} / {} (mean {}).",
          lambda: paired_numbers(SDPO, "sdpo-score", "dpo")),
    Quote("mrpo over dpo", BENCH_README, "MRPO's reward was above DPO's on every seed: by {} / {} / {} / {} "
          "(mean {}).", lambda: paired_numbers(MRPO, "mrpo", "dpo")),
    Quote("mrpo over strong", BENCH_README, "MRPO's reward minus that of DPO held to the stronger model alone was {} / "
          "{} / {} / {} (mean {}):", lambda: paired_numbers(MRPO, "mrpo", "dpo-strong-ref")),
    Quote("mrpo strong reference", BENCH_README, "its held-out VADER reward went from {} to {} in its own "
          "evaluation", strong_reference_rewards),
    Quote("README quickstart time", MAIN_README, "With the data already built, the run took {}:{} minutes on 2 CPU "
          "cores", quickstart_wall),
    Quote("README quickstart", MAIN_README, "reward accuracy {} -> {}, margin {} -> {}, mean VADER reward of sampled "
          "completions {} -> {} (raw:", quickstart_numbers),
]


# Reading and checking a README

BLOCK = re.compile(r"^(?P<indent>[ \t]*)<!-- table: (?P<name>[\w-]+) \((?P<source>[^)]*)\) -->\n"
                   r"(?P<body>.*?)^(?P=indent)<!-- /table -->$", re.M | re.S)
NONE = re.compile(r"^[ \t]*<!-- table: none -->$", re.M)
HEADING = re.compile(r"^#+ (.*)$", re.M)
TABLE_RULE = re.compile(r"^[ \t]*\|(?:\s*:?-+:?\s*\|)+\s*$", re.M)


class Finding(NamedTuple):
    """What the check found: a failure (a table or quote that differs, or is missing) or an unbacked section."""

    name: str
    detail: str
    failure: bool = True


def block_text(table: str, indent: str) -> str:
    """A table as it stands between its markers: a blank line either side, so markdown renders it."""
    return "\n" + "\n".join(indent + line for line in table.splitlines()) + "\n\n"


def heading_before(text: str, position: int) -> str:
    headings = [m.group(1) for m in HEADING.finditer(text, 0, position)]
    return headings[-1] if headings else "(top)"


def diff(name: str, have: str, want: str) -> str:
    lines = difflib.unified_diff(have.splitlines(), want.splitlines(), f"{name} in README", f"{name} from raw file",
                                 n=0, lineterm="")
    return "\n".join(lines)


def check_tables(text: str) -> list[Finding]:
    findings, seen = [], set()
    for block in BLOCK.finditer(text):
        name, source = block["name"], block["source"]
        seen.add(name)
        if name not in TABLES:
            findings.append(Finding(name, f"no function in benchmarks/tables.py makes table {name!r}"))
            continue
        raw_file = f"benchmarks/results/{TABLES[name][0]}"
        if source != raw_file:
            findings.append(Finding(name, f"the marker names {source}, the table is made from {raw_file}"))
        want = block_text(TABLES[name][1](), block["indent"])
        if block["body"] != want:
            findings.append(Finding(name, diff(name, block["body"].strip("\n"), want.strip("\n"))))
    findings += [Finding(name, "table missing from the README (no marker)") for name in TABLES if name not in seen]
    return findings


def unbacked_sections(text: str) -> list[Finding]:
    return [Finding(heading_before(text, m.start()), "no raw file in benchmarks/results/", failure=False)
            for m in NONE.finditer(text)]


def untraced_tables(text: str) -> list[Finding]:
    """Markdown tables that are neither between markers nor in a section marked ``table: none``."""
    inside = [(m.start(), m.end()) for m in BLOCK.finditer(text)]
    sections = [m.start() for m in HEADING.finditer(text)] + [len(text)]
    findings = []
    for rule in TABLE_RULE.finditer(text):
        if any(start <= rule.start() < end for start, end in inside):
            continue
        begin = max((s for s in sections if s <= rule.start()), default=0)
        end = min(s for s in sections if s > rule.start())
        if not NONE.search(text, begin, end):
            findings.append(Finding(heading_before(text, rule.start()), "a table with no marker: back it with a raw "
                                    "file, or mark its section <!-- table: none -->"))
    return findings


def check_quotes(text: str, readme: Path) -> list[Finding]:
    findings = []
    for quote in (q for q in QUOTES if q.readme == readme):
        matches = list(quote.pattern().finditer(text))
        want = quote.values()
        if len(matches) != 1:
            findings.append(Finding(quote.name, f"sentence found {len(matches)} times, not once: {quote.sentence!r}"))
        elif matches[0].groups() != want:
            have = ", ".join(matches[0].groups())
            findings.append(Finding(quote.name, f"README has {have}; the raw file gives {', '.join(want)}"))
    return findings


def check(text: str, readme: Path = BENCH_README) -> list[Finding]:
    """Every finding for one README's text: tables (benchmarks/README.md only), quoted numbers, unbacked sections."""
    findings = check_quotes(text, readme)
    if readme == BENCH_README:
        findings = check_tables(text) + untraced_tables(text) + findings + unbacked_sections(text)
    return findings


def rewrite(text: str, readme: Path = BENCH_README) -> str:
    """The README's text with every marked table and every quoted number made from the raw files."""
    if readme == BENCH_README:
        text = BLOCK.sub(lambda m: m.group(0) if m["name"] not in TABLES else
                         f"{m['indent']}<!-- table: {m['name']} (benchmarks/results/{TABLES[m['name']][0]}) -->\n"
                         f"{block_text(TABLES[m['name']][1](), m['indent'])}{m['indent']}<!-- /table -->", text)
    for quote in (q for q in QUOTES if q.readme == readme):
        matches = list(quote.pattern().finditer(text))
        if len(matches) == 1:
            text = replace_groups(text, matches[0], quote.values())
    return text


def replace_groups(text: str, match: re.Match, values: tuple[str, ...]) -> str:
    for index in reversed(range(len(values))):
        start, end = match.span(index + 1)
        text = text[:start] + values[index] + text[end:]
    return text


def shown(path: Path) -> str:
    """A path relative to the checkout where it is inside it."""
    return str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 naming each table or quoted number that differs")
    mode.add_argument("--write", action="store_true", help="rewrite the tables and quoted numbers in place")
    parser.add_argument("--readme", type=Path, default=BENCH_README,
                        help="a copy of benchmarks/README.md to check or write instead (README.md is then left out)")
    args = parser.parse_args(argv)
    readmes = {BENCH_README: args.readme}
    if args.readme.resolve() == BENCH_README:
        readmes[MAIN_README] = MAIN_README
    failed = False
    for role, path in readmes.items():
        text = path.read_text()
        if args.write:
            new = rewrite(text, role)
            if new != text:
                path.write_text(new)
                print(f"rewrote {path}")
        for finding in check(path.read_text(), role):
            failed |= finding.failure
            label = "differs" if finding.failure else "unbacked (warning)"
            print(f"{shown(path)}: {finding.name}: {label}: {finding.detail}")
    print("tables and quoted numbers equal their raw files" if not failed else "some tables or quoted numbers differ "
          "from their raw files: python benchmarks/tables.py --write rewrites them")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
