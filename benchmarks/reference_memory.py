"""Peak memory of training against several references from the cache (MRPO) vs one (DPO).

prefopt computes each extra reference's log-probs once into the on-disk cache, before the policy is
loaded, and frees each model right after; while training only the policy is in memory. This script
checks that claim: it trains the same policy on the same pairs with

- ``dpo``: DPO, its one reference (the initial policy) read from the cache;
- ``mrpo``: MRPO with the initial policy plus ``--extra`` more references (default 2: three in all), every
  one read from the cache,

each in a fresh process, after a warm-up run of each that fills the caches, and prints the median peak
RSS over ``--repeats`` runs and the ratio mrpo / dpo. It also reports the cold runs (caches built in the
same process), where one reference model at a time is loaded before the policy.

The policy is a random-init SmolLM2-135M-shaped Llama (30 layers, hidden 576, vocab 49,152; ``--layers``
shrinks it) with SmolLM2's real tokenizer; the extra references are the same architecture with other
random weights. The pairs are plain English text. Nothing is downloaded.

    python benchmarks/reference_memory.py                 # 135M-shaped, 3 references, 3 repeats
    python benchmarks/reference_memory.py --layers 4      # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import provenance  # benchmarks/provenance.py, beside this script

OPENINGS = ["The movie was", "The acting in this film", "I left the theater feeling", "The soundtrack",
            "Overall, the story", "The director has made", "Critics will say the plot", "The final scene"]
GOOD = ["a joy from start to finish, with warmth and wit in every scene",
        "moving and beautifully made, a film I would gladly see again"]
BAD = ["a dull and tedious mess that never finds its footing",
       "loud, careless and far too long, with nothing to say"]


def build_assets(root: Path, layers: int, extra: int) -> dict:
    """Models (policy + extra references) and pairs, written once under ``root``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from prefopt.models.embedded import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    models = []
    for k in range(1 + extra):
        path = root / f"model-{k}"
        if not path.exists():
            torch.manual_seed(k)
            LlamaForCausalLM(config).save_pretrained(path)
            tokenizer.save_pretrained(path)
        models.append(str(path))
    rows = [{"prompt": f"{o} {i}:", "chosen": f" {GOOD[i % 2]}.", "rejected": f" {BAD[(i // 2) % 2]}."}
            for i, o in enumerate(OPENINGS * 4)]
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"models": models, "data": str(data)}


def recipe_tree(assets: dict, variant: str, out: str, steps: int) -> dict:
    loss = {"name": "dpo", "beta": 0.1} if variant == "dpo" else {"name": "mrpo", "beta": 0.1}
    reference = {"kind": "cache"}
    if variant == "mrpo":
        reference["extra"] = assets["models"][1:]
    return {
        "seed": 0,
        "model": {"path": assets["models"][0]},
        "data": {"path": assets["data"], "max_length": 128, "max_prompt_length": 32},
        "loss": loss,
        "reference": reference,
        "train": {"batch_size": 4, "micro_batch_size": 4, "max_steps": steps, "learning_rate": 1e-5},
        "eval": {"at_start": False, "task_metrics": False},
        "output": {"dir": out, "trackers": [], "save_model": False},
    }


def measure(args) -> dict:
    """One fresh process: train the recipe, report peak RSS and what the references did."""
    import torch

    from prefopt import engine
    from prefopt.registry.loading import default_plugins
    from prefopt.recipe import validate_tree

    torch.set_num_threads(args.threads)
    tree = json.loads(args.child)
    summary = engine.train(validate_tree(tree, default_plugins(), "benchmark"), show_progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    extra = summary["reference"].get("extra", [])
    return {"peak_mib": peak, "primary_hit": summary["reference"]["caches"][0]["hit"],
            "extra_hits": [e["hit"] for e in extra]}


def run_child(recipe: dict, threads: int, cache: str) -> dict:
    env = {**os.environ, "PREFOPT_CACHE": cache, "TQDM_DISABLE": "1"}
    command = [sys.executable, __file__, "--child", json.dumps(recipe), "--threads", str(threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30, help="decoder layers of the 135M-shaped models")
    parser.add_argument("--extra", type=int, default=2, help="references beyond the primary one, for mrpo")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the raw result here (with command, commit and load)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return

    record = provenance.start()
    with tempfile.TemporaryDirectory(prefix="prefopt-refmem-") as tmp:
        root = Path(tmp)
        assets = build_assets(root, args.layers, args.extra)
        cache = str(root / "cache")
        results: dict[str, dict[str, list[float]]] = {"dpo": {}, "mrpo": {}}
        for variant in ("dpo", "mrpo"):  # cold: the caches are built in the measured process
            cold = run_child(recipe_tree(assets, variant, str(root / f"cold-{variant}"), args.steps), args.threads, cache)
            results[variant]["cold"] = [cold["peak_mib"]]
        for r in range(args.repeats):  # warm, interleaved so machine noise hits both
            for variant in ("dpo", "mrpo"):
                warm = run_child(recipe_tree(assets, variant, str(root / f"warm-{variant}-{r}"), args.steps),
                                 args.threads, cache)
                assert warm["primary_hit"] and all(warm["extra_hits"]), "a warm run rebuilt a cache"
                results[variant].setdefault("warm", []).append(warm["peak_mib"])

    print(f"policy: 135M-shaped Llama with {args.layers} layers; mrpo: {1 + args.extra} references; "
          f"{args.steps} steps of 4 pairs x <=128 tokens; fp32 full fine-tuning; {args.threads} threads")
    print(f"{'':8}{'dpo MiB':>12}{'mrpo MiB':>12}{'mrpo/dpo':>10}")
    summary = {}
    for phase in ("warm", "cold"):
        dpo, mrpo = statistics.median(results["dpo"][phase]), statistics.median(results["mrpo"][phase])
        summary[phase] = {"dpo_peak_mib": dpo, "mrpo_peak_mib": mrpo, "ratio": mrpo / dpo}
        label = f"{phase} ({'median of ' + str(args.repeats) if phase == 'warm' else '1 run'})"
        print(f"{label:<22}{dpo:>8.0f}{mrpo:>12.0f}{mrpo / dpo:>10.3f}")
    print(json.dumps(results))
    if args.json:
        record.update(settings={k: v for k, v in vars(args).items() if k not in ("json", "child")},
                      peak_rss_mib=results, medians=summary)
        provenance.finish(record, args.json)
        print(f"-> {args.json}")


if __name__ == "__main__":
    main()
