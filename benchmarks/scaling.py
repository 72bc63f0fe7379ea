"""prefopt's step time and peak memory as the step grows: against max_length, and against batch size.

prefopt's default configuration (benchmarks/trl_speed.py's ``prefopt``: the reference read from its on-disk
cache, ``train.layout: auto``, which is prefix sharing on this model, one forward per step, fp32, AdamW) on
the same random-init model and the same kind
of synthetic pairs as trl_speed.py, whose model and data builders and child-process runner this script
reuses. Two sweeps:

- max_length in ``--lengths`` (256, 512, 1024, 2048) at batch ``--length-batch`` (4);
- batch size in ``--batch-sizes`` (2, 4, 8) at max_length ``--batch-length`` (512).

Each point runs in a fresh process (so its peak RSS is its own): ``--steps`` timed steps after one warm-up;
reported are the median step time, tokens per second (non-pad tokens, the prompt counted twice, as
trl_speed.py counts them), peak RSS, and a memory breakdown: weights, gradients and AdamW's two moments
computed from the parameter count (4 bytes each in fp32), the process baseline (RSS after the imports,
before the model loads), and the rest = peak - baseline - weights - gradients - AdamW states, i.e.
activations, the head's logits, the reference-cache build and allocator slack. The model is the one
trl_speed.py reports for ``--model`` (qwen56m: vocab 49152, whatever the data; built once for all points).

``--plot PATH.png`` draws two panels against the tokens a step trains on, both sweeps in each. Left: seconds
per step; a straight line through the origin is constant throughput, and a curve bending upward is the
attention's L^2, which the max_length sweep has and the batch sweep (more sequences of the same length) does
not. Right: peak RSS (solid) over the fixed costs (dotted: the process before the model; then plus weights,
gradients and AdamW states), with the part that grows with the step drawn on its own (dashed).

    python benchmarks/scaling.py --quick --plot /tmp/scaling.png           # tiny model, 2 points per sweep
    python benchmarks/scaling.py --json benchmarks/results/scaling.json --plot scaling.png
    python benchmarks/scaling.py --lengths 512,1024 --batch-sizes 4 --steps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # trl_speed.py and provenance.py sit beside this script
import provenance  # noqa: E402
import trl_speed  # noqa: E402

MIB = 1024 * 1024


def memory_breakdown(parameters: int, peak_mib: float, baseline_mib: float, bytes_per_value: int = 4) -> dict:
    """Peak RSS split into: the process before the model, weights, gradients, AdamW's two moments (each
    ``parameters`` x ``bytes_per_value``), and the rest (activations, logits, allocator); all in MiB."""
    per_copy = parameters * bytes_per_value / MIB
    weights, gradients, adamw = per_copy, per_copy, 2 * per_copy
    return {"baseline_mib": baseline_mib, "weights_mib": weights, "gradients_mib": gradients, "adamw_mib": adamw,
            "rest_mib": peak_mib - baseline_mib - weights - gradients - adamw, "peak_mib": peak_mib}


def points(args) -> list[dict]:
    """Every (max_length, batch size) to measure, once each, with the sweeps it belongs to."""
    wanted: dict[tuple[int, int], list[str]] = {}
    for length in args.lengths:
        wanted.setdefault((length, args.length_batch), []).append("max_length")
    for batch in args.batch_sizes:
        wanted.setdefault((args.batch_length, batch), []).append("batch_size")
    return [{"max_length": length, "batch_size": batch, "sweeps": sweeps} for (length, batch), sweeps in wanted.items()]


def point_args(args, point: dict) -> argparse.Namespace:
    """The trl_speed.py options of one point: its prefopt configuration only."""
    return argparse.Namespace(
        model=args.model, steps=args.steps, batch_size=point["batch_size"], max_length=point["max_length"],
        seed=args.seed, threads=args.threads, learning_rate=1e-4, configs="prefopt", profile=None,
        prefopt_override=args.prefopt_override,
    )


def measure(args, point: dict, workdir: Path, tokenizer, model: dict) -> dict:
    """One point in its own child process (trl_speed.py's runner); its readings, or the error."""
    folder = workdir / f"L{point['max_length']}-B{point['batch_size']}"
    folder.mkdir()
    spec = trl_speed.prepare(point_args(args, point), folder, tokenizer=tokenizer, model=model)
    spec_path = folder / "spec.json"
    spec_path.write_text(json.dumps(spec))
    out = trl_speed.run_child(folder, spec_path, spec["configs"][0], 0)
    if "error" in out:
        return {**point, "error": out["error"]}
    return {**point, **summarize(out["raw"], point["batch_size"], model), "raw": out["raw"]}


def summarize(raw: dict, batch_size: int, model: dict) -> dict:
    marks = raw["marks"]
    step_seconds = [b[0] - a[0] for a, b in zip(marks[1:-1], marks[2:])]  # the steps after the warm-up
    summary = trl_speed.summarize(raw, batch_size)
    return {
        "median_step_s": statistics.median(step_seconds), "step_seconds": step_seconds,
        "tokens_per_step": summary["timed_tokens"] / summary["timed_steps"], "tokens_per_s": summary["tokens_per_s"],
        "peak_rss_mib": raw["peak_rss_mib"], "rss_before_training_mib": summary["rss_before_training_mib"],
        "memory": memory_breakdown(model["parameters"], raw["peak_rss_mib"], raw["imported"][2]),
        **trl_speed.flops_summary(raw, model["config"], None),
    }


def print_point(p: dict) -> None:
    where = f"max_length {p['max_length']:5d} batch {p['batch_size']:2d}"
    if "error" in p:
        print(f"  {where}: FAILED\n    " + "\n    ".join(p["error"]), flush=True)
        return
    m = p["memory"]
    print(f"  {where}: {p['tokens_per_step']:7.0f} tok/step {p['median_step_s']:7.2f} s/step {p['tokens_per_s']:7.0f} "
          f"tok/s  peak {m['peak_mib']:7.0f} MiB = baseline {m['baseline_mib']:.0f} + weights {m['weights_mib']:.0f} "
          f"+ grads {m['gradients_mib']:.0f} + AdamW {m['adamw_mib']:.0f} + rest {m['rest_mib']:.0f}", flush=True)


def plot(results: list[dict], args, path: Path) -> None:
    """Step time and peak memory against tokens per step, both sweeps (see the module's docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (timing, memory) = plt.subplots(1, 2, figsize=(12, 5.5))
    sweeps = {"max_length": ("o", "C0", f"max_length sweep (batch {args.length_batch})", "L"),
              "batch_size": ("s", "C1", f"batch-size sweep (max_length {args.batch_length})", "B")}
    measured = [p for p in results if "error" not in p]
    for sweep, (marker, colour, label, letter) in sweeps.items():
        row = sorted((p for p in measured if sweep in p["sweeps"]), key=lambda p: p["tokens_per_step"])
        if not row:
            continue
        x = [p["tokens_per_step"] for p in row]
        timing.plot(x, [p["median_step_s"] for p in row], marker=marker, color=colour, label=label)
        memory.plot(x, [p["memory"]["peak_mib"] for p in row], marker=marker, color=colour, label=f"peak RSS, {label}")
        memory.plot(x, [p["memory"]["rest_mib"] for p in row], marker=marker, color=colour, linestyle="--",
                    label=f"rest (activations, logits, allocator), {label.split(' (')[0]}")
        for p in row:
            value = p["max_length"] if sweep == "max_length" else p["batch_size"]
            timing.annotate(f"{letter}={value}", (p["tokens_per_step"], p["median_step_s"]), textcoords="offset points",
                            xytext=(4, -10 if sweep == "batch_size" else 4), fontsize=8, color=colour)
    if measured:
        baseline = statistics.median(p["memory"]["baseline_mib"] for p in measured)
        states = sum(measured[0]["memory"][k] for k in ("weights_mib", "gradients_mib", "adamw_mib"))
        memory.axhline(baseline, color="grey", linestyle=":", label=f"process before the model ({baseline:.0f} MiB)")
        memory.axhline(baseline + states, color="black", linestyle=":",
                       label=f"+ weights, gradients, AdamW states ({states:.0f} MiB)")
    timing.set(xlabel="non-pad tokens per step", ylabel="seconds per step (median)", title="step time")
    memory.set(xlabel="non-pad tokens per step", ylabel="MiB", title="peak memory (RSS)")
    for axes in (timing, memory):
        axes.set_xlim(left=0)
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.suptitle(f"prefopt default configuration, {args.model}, {args.steps} timed steps per point", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(staging, dpi=120)
    plt.close(fig)
    staging.replace(path)


def integers(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "qwen56m", "llama56m-untied", "smollm2-135m"], default="qwen56m")
    parser.add_argument("--lengths", type=integers, default=[256, 512, 1024, 2048], help="max_length sweep")
    parser.add_argument("--length-batch", type=int, default=4, help="batch size of the max_length sweep")
    parser.add_argument("--batch-sizes", type=integers, default=[2, 4, 8], help="batch-size sweep")
    parser.add_argument("--batch-length", type=int, default=512, help="max_length of the batch-size sweep")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per point (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefopt-override", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for every point (repeatable)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny model, max_length 64,128 at batch 2, batch 1,2 at max_length 64, 2 steps")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write every number here")
    parser.add_argument("--plot", type=Path, default=None, metavar="PATH.png", help="draw the two panels here")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.lengths, args.length_batch = "tiny", [64, 128], 2
        args.batch_sizes, args.batch_length, args.steps = [1, 2], 64, 2
    if args.steps < 1 or min(args.lengths + args.batch_sizes, default=0) < 1:
        parser.error("--steps, --lengths and --batch-sizes must be at least 1")
    return args


def main() -> None:
    import shutil

    import torch

    args = parse_args()
    record = provenance.start()
    args.threads = args.threads or torch.get_num_threads()
    workdir = Path(tempfile.mkdtemp(prefix="scaling-"))
    try:
        tokenizer = trl_speed.save_tokenizer(workdir / "tokenizer")
        # Every token id the tokenizer has: qwen56m takes its whole vocabulary, the same model at every point.
        model = trl_speed.save_model(args.model, tokenizer, len(tokenizer) - 1,
                                     max(args.lengths + [args.batch_length]), workdir / "model")
        print(f"model {args.model}: {model['architecture']}, {model['parameters'] / 1e6:.1f}M parameters, "
              f"{model['vocab_note']}; {args.steps} timed steps per point, {args.threads} threads", flush=True)
        results = []
        for point in points(args):
            results.append(measure(args, point, workdir, tokenizer, model))
            print_point(results[-1])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.plot:
        plot(results, args, args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        record.update({
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "model": {k: v for k, v in model.items() if k != "dir"}, "points": results,
        })
        provenance.finish(record, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
