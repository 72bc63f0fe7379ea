"""A round of online DPO, split into generate / sync / judge / train: in-process vLLM against a vLLM server.

Both runs are real ``prefopt train`` runs of ``online_dpo`` (the engine, not a mock-up), on the same prompts,
model, seed and settings, differing only in ``algorithm.sampler``:

- ``vllm``: the engine in the training process, weights pushed into it in place (``load_weights``);
- ``vllm_server``: a ``vllm serve`` the run launches on localhost (``launch:``), weights pushed by the
  ``reload`` transport (safetensors written for the server, reloaded through its development RPC), the
  only one a CPU has. On CPU both share the machine's cores with training.

The split comes from the run's own metrics: the online algorithm logs each round's ``time/sync_s`` (the
sampler's ``load_weights``), ``time/sample_s`` (``sample``) and ``time/judge_s``; a round's train time is
the sum of its steps' ``batch_size / pairs_per_s``. Round 1 also builds the engine or launches the server,
so its sync is reported as start-up and the medians are over rounds 2 and later. The sync's share of a round
is sync / (generate + sync + judge + train).

The prompts are openings of the VADER movie-review snippets (the sentiment task's corpus), the judge is the
task's VADER reward. Model: a tiny random-init Llama with SmolLM2's vocabulary (2 layers, hidden 64, the
smallest vLLM's CPU attention accepts) or ``--model`` a local directory. Nothing is downloaded (the VADER
corpus and SmolLM2's tokenizer are the embedded model's, cached by the quickstart).

    python benchmarks/online_rounds.py --json benchmarks/results/online_rounds_tiny.json
    python benchmarks/online_rounds.py --model ~/models/smollm2-135m --rounds 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402  (benchmarks/ is not a package)
import sampling  # noqa: E402  (its prompts and tiny model)
from sampling import openings  # noqa: E402


def tiny_model(root: Path) -> str:
    """benchmarks/sampling.py's tiny Llama, with SmolLM2's tokenizer."""
    from prefopt.models.loading import load_tokenizer, resolve_model_path

    return sampling.tiny_model(root, load_tokenizer(resolve_model_path("smollm2-135m-instruct")))


def recipe(model: str, prompts: Path, out: Path, sampler: dict, args) -> dict:
    return {
        "seed": 0,
        "model": {"path": model, "dtype": "float32"},
        "data": {"path": str(prompts), "format": "prompt_only", "max_length": 96, "max_prompt_length": 24},
        "loss": {"name": "dpo", "beta": 0.1},
        "reference": {"kind": "live"},
        "algorithm": {
            "name": "online_dpo", "rounds": args.rounds, "prompts_per_round": args.prompts,
            "samples_per_prompt": args.samples, "steps_per_round": args.steps,
            "sampler": {"max_new_tokens": args.new_tokens, **sampler},
            "judge": {"name": "function", "function": "prefopt_plugins.tasks.sentiment:completion_reward"},
        },
        "train": {"batch_size": args.batch, "micro_batch_size": args.batch, "learning_rate": 1e-4,
                  "lr_scheduler": "constant", "save_every": 10_000},
        "eval": {"at_start": False, "task_metrics": False},
        "output": {"dir": str(out), "trackers": []},
    }  # fmt: skip


def run(name: str, tree: dict) -> dict:
    """Train ``tree``; its rounds' time split, read back from its metrics.jsonl."""
    from prefopt import engine
    from prefopt.recipe import validate_tree
    from prefopt.registry.loading import default_plugins

    started = time.perf_counter()
    engine.run(validate_tree(tree, default_plugins(), name), show_progress=False)
    wall = time.perf_counter() - started
    lines = [json.loads(line) for line in (Path(tree["output"]["dir"]) / "metrics.jsonl").read_text().splitlines()]
    steps_per_round, batch = tree["algorithm"]["steps_per_round"], tree["train"]["batch_size"]
    rounds = []
    for line in lines:
        if "round/index" in line and "time/sync_s" in line:
            rounds.append({"round": int(line["round/index"]), "sync_s": line["time/sync_s"],
                           "generate_s": line["time/sample_s"], "judge_s": line["time/judge_s"],
                           "sample_tokens_per_s": line["round/sample_tokens_per_s"], "train_s": 0.0})  # fmt: skip
    for line in lines:
        if "pairs_per_s" in line:
            rounds[(line["step"] - 1) // steps_per_round]["train_s"] += batch / line["pairs_per_s"]
    for r in rounds:
        r["round_s"] = r["sync_s"] + r["generate_s"] + r["judge_s"] + r["train_s"]
        r["sync_share"] = r["sync_s"] / r["round_s"]
    return {"wall_s": wall, "rounds": rounds}


def summary(result: dict) -> dict:
    later = result["rounds"][1:]
    keys = ("generate_s", "sync_s", "judge_s", "train_s", "round_s", "sync_share")
    return {"startup_and_first_sync_s": result["rounds"][0]["sync_s"],
            **{key: statistics.median(r[key] for r in later) for key in keys}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny (random-init, built here) or a local model directory")
    parser.add_argument("--samplers", default="vllm,vllm_server", help="comma-separated: vllm, vllm_server")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per run (round 1 is start-up)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per round")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per round")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--kv-mib", type=int, default=256, help="KV cache of the engine and of the server")
    parser.add_argument("--json", type=Path, help="write every raw number here")
    args = parser.parse_args()
    record = provenance.start()
    record["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    kv = args.kv_mib << 20
    samplers = {
        "vllm": {"name": "vllm", "max_model_len": 256, "kv_cache_memory_bytes": kv},
        "vllm_server": {"name": "vllm_server", "transport": "reload",
                        "launch": {"max_model_len": 256, "kv_cache_memory_bytes": kv}},
    }
    with tempfile.TemporaryDirectory(prefix="online-rounds-") as tmp:
        root = Path(tmp)
        model = tiny_model(root / "tiny") if args.model == "tiny" else str(Path(args.model).expanduser())
        prompts = root / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in openings(args.prompts * args.rounds)))
        results = {}
        for name in args.samplers.split(","):
            print(f"[{name}] {args.rounds} rounds of {args.prompts} prompts x {args.samples} samples ...", flush=True)
            results[name] = run(name, recipe(model, prompts, root / name, samplers[name], args))
            results[name]["summary"] = summary(results[name])
            rounds_file = root / name / "rounds" / "round-00001.jsonl"
            results[name]["round1_completions"] = [
                [c["token_ids"] for c in json.loads(line)["completions"]] for line in rounds_file.read_text().splitlines()
            ]  # fmt: skip
    if {"vllm", "vllm_server"} <= results.keys():
        # the same seeds and initial weights: do the two samplers draw the same round-1 completions?
        record["same_round1_completions"] = (results["vllm"]["round1_completions"]
                                             == results["vllm_server"]["round1_completions"])  # fmt: skip
    record["model"] = args.model
    record["results"] = results
    print(f"{'sampler':<12} {'start-up':>9} {'generate':>9} {'sync':>8} {'judge':>8} {'train':>8} {'round':>8} "
          f"{'sync share':>10}   (seconds; medians of rounds 2..{args.rounds})")  # fmt: skip
    for name, result in results.items():
        s = result["summary"]
        print(f"{name:<12} {s['startup_and_first_sync_s']:9.2f} {s['generate_s']:9.3f} {s['sync_s']:8.3f} "
              f"{s['judge_s']:8.3f} {s['train_s']:8.3f} {s['round_s']:8.3f} {s['sync_share']:10.1%}")  # fmt: skip
    if "same_round1_completions" in record:
        print(f"round-1 completions identical across samplers: {record['same_round1_completions']}")
    if args.json:
        provenance.finish(record, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
