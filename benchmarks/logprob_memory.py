"""Peak memory and time of one policy forward + backward: prefopt's chunked head path vs full logits.

The plain way to score responses (and TRL's on CPU) is the model's full logits, (2B, T, V), then a
float32 log-softmax over every position. prefopt asks the model for no logits and applies the head to
response positions only, a chunk at a time, recomputing each chunk in backward. This script measures
both on the same random-init model (SmolLM2-135M-shaped by default: vocab 49,152), the same batch and
the same thread count; each measurement runs in a fresh process so peak RSS is its own.

    python benchmarks/logprob_memory.py                          # 135M-shaped model, 4 pairs x 512 tokens
    python benchmarks/logprob_memory.py --layers 2 --repeats 5   # quicker

It prints, per path, the median over repeats of peak RSS (MiB) and seconds per forward+backward, then
the ratios prefopt / plain, and checks that both paths give the same summed log-probs.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def measure(args) -> dict:
    """One fresh process: build the model, run one forward+backward on the chosen path, report."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefopt.forward.batching import collate_pairs
    from prefopt.data.types import TokenizedPair
    from prefopt.forward.logprobs import sequence_logps

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=4096,
    )
    model = LlamaForCausalLM(config)
    prompt = args.length - args.response
    generator = torch.Generator().manual_seed(1)
    ids = lambda n: tuple(torch.randint(3, args.vocab, (n,), generator=generator).tolist())  # noqa: E731
    pairs = [TokenizedPair(i, ids(prompt), ids(args.response), ids(args.response)) for i in range(args.pairs)]
    batch = collate_pairs(pairs, range(args.pairs), pad_id=0)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    result = sequence_logps(model, batch, chunk_size=args.chunk, use_head_path=args.path == "prefopt")
    result.sums.sum().backward()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mib": peak, "model_mib": baseline, "seconds": seconds, "sums": result.sums.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--length", type=int, default=512, help="tokens per sequence (prompt + response)")
    parser.add_argument("--response", type=int, default=256, help="response tokens per sequence")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--path", choices=["prefopt", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.path:  # child process
        print(json.dumps(measure(args)))
        return

    results: dict[str, list[dict]] = {"prefopt": [], "plain": []}
    for _ in range(args.repeats):
        for path in results:  # interleaved, so drift on a shared machine hits both alike
            argv = [sys.executable, __file__, *sys.argv[1:], "--path", path]
            out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
            results[path].append(json.loads(out.strip().splitlines()[-1]))

    print(f"{args.pairs} pairs x {args.length} tokens ({args.response} response), vocab {args.vocab}, "
          f"{args.layers} layers, median of {args.repeats}")
    medians = {}
    for path, runs in results.items():
        medians[path] = {
            "peak_mib": statistics.median(r["peak_mib"] for r in runs),
            "model_mib": statistics.median(r["model_mib"] for r in runs),
            "seconds": statistics.median(r["seconds"] for r in runs),
        }
        m = medians[path]
        print(f"  {path:8s} peak RSS {m['peak_mib']:8.0f} MiB (model and batch alone {m['model_mib']:.0f}), "
              f"{m['seconds']:.2f} s per forward+backward")
    p, q = medians["prefopt"], medians["plain"]
    print(f"  prefopt / plain: peak RSS x{p['peak_mib'] / q['peak_mib']:.2f}, "
          f"memory above the model x{(p['peak_mib'] - p['model_mib']) / (q['peak_mib'] - q['model_mib']):.2f}, "
          f"time x{p['seconds'] / q['seconds']:.2f}")
    drift = max(abs(a - b) for a, b in zip(results["prefopt"][0]["sums"], results["plain"][0]["sums"]))
    print(f"  largest difference in summed log-probs between the paths: {drift:.2e}")


if __name__ == "__main__":
    main()
