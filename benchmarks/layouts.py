"""Time and peak memory of one policy forward + backward in each batch layout: padded, packed, prefix_shared.

Same random-init Llama-style model (hidden 512, 8 layers, vocab 49,152, float32 by default), same
synthetic pairs, same thread count; only ``sequence_logps``'s ``layout`` changes. Each case is a
prompt:response length ratio (``--cases 384:64,64:256``); ``--jitter`` draws each response's length
uniformly from [(1 - jitter) x response, response], so the padded layout carries padding. Every
measurement runs in a fresh process (so peak RSS is its own), after one untimed warm-up step, and the
processes are interleaved over layouts and cases, so drift on a shared machine hits all alike.

    python benchmarks/layouts.py                                # both default cases, median of 3
    python benchmarks/layouts.py --cases 384:64 --jitter 0.5 --repeats 5
    python benchmarks/layouts.py --json benchmarks/results/layouts.json   # also the raw result

It prints, per case and layout, the median seconds per forward+backward, peak RSS above the loaded model
(MiB), the tokens the model runs and the attention-score entries it computes, then the speedups over
padded, and the largest relative difference of a sequence's summed log-probs from padded's.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import provenance  # benchmarks/provenance.py, beside this script

LAYOUTS = ("padded", "packed", "prefix_shared")


def _pairs(args, prompt: int, response: int):
    import torch

    from prefopt.data.types import TokenizedPair

    generator = torch.Generator().manual_seed(1)
    ids = lambda n: tuple(torch.randint(3, args.vocab, (n,), generator=generator).tolist())  # noqa: E731
    shortest = max(1, round((1 - args.jitter) * response))
    length = lambda: int(torch.randint(shortest, response + 1, (1,), generator=generator))  # noqa: E731
    return [TokenizedPair(i, ids(prompt), ids(length()), ids(length())) for i in range(args.pairs)]


def measure(args) -> dict:
    """One fresh process: build the model, run a warm-up and a timed forward+backward in one layout."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefopt.forward.batching import collate_pairs
    from prefopt.forward.layouts import layout_inputs
    from prefopt.forward.logprobs import sequence_logps

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128,
        tie_word_embeddings=True, max_position_embeddings=4096,
    )
    model = LlamaForCausalLM(config)  # sdpa attention, float32
    prompt, response = args.case
    pairs = _pairs(args, prompt, response)
    batch = collate_pairs(pairs, range(len(pairs)), pad_id=0)
    inputs = layout_inputs(model, batch, args.layout)
    rows, width = inputs.input_ids.shape
    if inputs.attention_mask is not None and inputs.attention_mask.dim() == 4:
        scores = int(inputs.attention_mask.shape[0]) * width * width  # a dense custom mask: every entry computed
    else:
        scores = rows * width * width

    def step():
        result = sequence_logps(model, batch, chunk_size=args.chunk, layout=args.layout)
        result.sums.sum().backward()
        model.zero_grad(set_to_none=True)
        return result

    step()  # warm-up: first-call allocations and kernel choices
    started = time.perf_counter()
    result = step()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_mib": peak, "tokens": rows * width, "scores": scores,
            "real_tokens": int(batch.attention_mask.sum()), "sums": result.sums.tolist(), "layout_used": inputs.layout}


def _model_mib(args) -> float:
    """RSS of a process that only builds the model: subtracted to show what the step itself takes."""
    code = (
        "import resource, torch; from transformers import LlamaConfig, LlamaForCausalLM; "
        f"LlamaForCausalLM(LlamaConfig(vocab_size={args.vocab}, hidden_size={args.hidden}, "
        f"intermediate_size={args.hidden * 8 // 3}, num_hidden_layers={args.layers}, "
        f"num_attention_heads={args.hidden // 64}, num_key_value_heads={args.hidden // 128}, "
        "tie_word_embeddings=True)); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def _case(text: str) -> tuple[int, int]:
    prompt, response = text.split(":")
    return int(prompt), int(response)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--pairs", type=int, default=4, help="pairs per forward (a micro-batch)")
    parser.add_argument("--cases", default="384:64,64:256", help="prompt:response token counts, comma-separated")
    parser.add_argument("--jitter", type=float, default=0.0, help="responses vary down to (1 - jitter) x length")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the raw result here (with command, commit and load)")
    parser.add_argument("--layout", choices=LAYOUTS, help=argparse.SUPPRESS)
    parser.add_argument("--case", type=_case, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.layout:  # child process
        print(json.dumps(measure(args)))
        return

    record = provenance.start()
    cases = [_case(c) for c in args.cases.split(",")]
    results = {(case, layout): [] for case in cases for layout in LAYOUTS}
    for _ in range(args.repeats):
        for case in cases:
            for layout in LAYOUTS:  # interleaved, so drift on a shared machine hits every layout alike
                argv = [sys.executable, __file__, *_child_args(sys.argv[1:]), "--layout", layout,
                        "--case", "%d:%d" % case]
                out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
                results[case, layout].append(json.loads(out.strip().splitlines()[-1]))
    model_mib = _model_mib(args)

    print(f"{args.pairs} pairs per forward, Llama-style hidden {args.hidden}, {args.layers} layers, "
          f"vocab {args.vocab}, float32, sdpa, {args.threads} threads, jitter {args.jitter}; "
          f"median of {args.repeats}, fresh process each")
    header = f"{'prompt:response':>16} {'ratio':>6} {'layout':>14} {'s/step':>8} {'speedup':>8} {'peak MiB':>9} " \
             f"{'tokens':>7} {'real':>6} {'attn scores':>12} {'sum drift':>10}"
    print(header)
    rows = []
    for case in cases:
        padded = results[case, "padded"]
        padded_seconds = statistics.median(r["seconds"] for r in padded)
        for layout in LAYOUTS:
            runs = results[case, layout]
            seconds = statistics.median(r["seconds"] for r in runs)
            peak = statistics.median(r["peak_mib"] for r in runs) - model_mib
            # Relative to the sum: these sum hundreds of log-probs of about -11 (a random model, vocab 49,152).
            drift = max(abs(a - b) / abs(b) for a, b in zip(runs[0]["sums"], padded[0]["sums"]))
            rows.append({"prompt_tokens": case[0], "response_tokens": case[1], "layout": layout,
                         "layout_used": runs[0]["layout_used"], "seconds": [r["seconds"] for r in runs],
                         "seconds_median": seconds, "speedup": padded_seconds / seconds,
                         "peak_mib_over_model": peak, "tokens": runs[0]["tokens"],
                         "real_tokens": runs[0]["real_tokens"], "attention_scores": runs[0]["scores"],
                         "sum_drift": drift})
            used = "" if runs[0]["layout_used"] == layout else f" (ran {runs[0]['layout_used']})"
            print(f"{'%d:%d' % case:>16} {case[0] / case[1]:>6.2f} {layout + used:>14} {seconds:>8.3f} "
                  f"{padded_seconds / seconds:>7.2f}x {peak:>9.0f} {runs[0]['tokens']:>7} {runs[0]['real_tokens']:>6} "
                  f"{runs[0]['scores']:>12,} {drift:>10.1e}")
    if args.json:
        record.update(settings={k: v for k, v in vars(args).items() if k not in ("json", "layout", "case")},
                      model_mib=model_mib, rows=rows)
        provenance.finish(record, args.json)
        print(f"-> {args.json}")


def _child_args(argv: list[str]) -> list[str]:
    """The parent's arguments without --json (a child prints its one measurement)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--json":
            skip = True
        elif not arg.startswith("--json="):
            kept.append(arg)
    return kept

if __name__ == "__main__":
    main()
