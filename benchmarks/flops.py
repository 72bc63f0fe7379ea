"""What one DPO training step needs in FLOPs, what this machine can do, and the ratio of the two (MFU).

``model_flops`` counts the FLOPs of the policy's forward + backward for one step of a Llama/Qwen2-style
decoder, from its config and the step's token counts (``step_tokens`` derives those from a batch's pair
lengths and layout). ``matmul_limit`` measures, on this machine, the throughput of the matrix products
that step is made of, at the model's own shapes; that measured figure, not a spec-sheet peak, is the limit
``mfu`` divides by. So an MFU of 1.0 means "as fast as the same matmuls run alone on this CPU", and what is
missing from 1.0 is everything else: attention, softmax, norms, the optimizer, data handling, padding.

    python benchmarks/flops.py --model qwen56m --tokens 2800 --head-tokens 1400   # the limit, fp32 and bf16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterable, Mapping

# The matmuls of training a linear layer y = x W^T, each 2 x M x N x K FLOPs for x of M rows.
MATMULS = ("forward", "grad_input", "grad_weight")


# The config keys the FLOP count reads (transformers' names).
CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "vocab_size", "tie_word_embeddings")


def config_fields(config) -> dict:
    """The ``CONFIG_KEYS`` of a transformers config as a plain dict, which every function here also takes."""
    return {key: _field(config, key) for key in CONFIG_KEYS}


def _field(config, name: str, default=None):
    """A config value from a transformers config object or a plain mapping (e.g. one read back from JSON)."""
    value = config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)
    return default if value is None else value


def dimensions(config) -> dict:
    """The sizes ``model_flops`` and ``matmul_limit`` need; head_dim defaults to hidden / heads, kv heads to heads."""
    hidden, heads = _field(config, "hidden_size"), _field(config, "num_attention_heads")
    return {
        "hidden": hidden, "intermediate": _field(config, "intermediate_size"),
        "layers": _field(config, "num_hidden_layers"), "heads": heads,
        "kv_heads": _field(config, "num_key_value_heads", heads), "head_dim": _field(config, "head_dim", hidden // heads),
        "vocab": _field(config, "vocab_size"), "tied": bool(_field(config, "tie_word_embeddings", False)),
    }


def layer_linears(config) -> list[tuple[str, int, int]]:
    """(name, out_features, in_features) of every linear map in one decoder layer."""
    d = dimensions(config)
    q, kv = d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    h, i = d["hidden"], d["intermediate"]
    return [("q", q, h), ("k", kv, h), ("v", kv, h), ("o", h, q), ("gate", i, h), ("up", i, h), ("down", h, i)]


def parameters(config) -> dict:
    """Weight-matrix parameter counts (biases and norms left out: under 0.1% of a step's FLOPs).

    ``head`` is vocab x hidden whether or not it is tied: a tied head still runs its own matmul. ``matrices``
    counts each distinct matrix once, so a tied embedding adds nothing and an untied one adds vocab x hidden.
    """
    d = dimensions(config)
    decoder = d["layers"] * sum(out * inp for _, out, inp in layer_linears(config))
    head = d["vocab"] * d["hidden"]
    return {"decoder_linear": decoder, "head": head, "embedding": head,
            "matrices": decoder + head + (0 if d["tied"] else head)}


def model_flops(config, batch: Mapping) -> dict:
    """FLOPs of one training step (the policy's forward + backward) for a decoder ``config`` and the step's
    token counts ``batch`` (``step_tokens``: ``forwarded``, ``head``, ``sum_sq_lengths``).

    linear    = 6 x (decoder linear params) x forwarded
    head      = 6 x (vocab x hidden) x head
    attention = 6 x 2 x layers x (q heads x head_dim) x sum_sq_lengths / 2
    total     = linear + head + attention

    6 = 2 FLOPs per multiply-add x 3 matmuls (forward, gradient of the input, gradient of the weight).
    ``forwarded`` is the tokens the decoder runs, ``head`` the positions whose logits are computed (prefopt:
    response positions; TRL on CPU: every position), ``sum_sq_lengths`` the sum over sequences of L^2. The
    attention term is QK^T and AV (2 matmuls of L x L x q-width each, hence the 2), counted CAUSAL: halved,
    only the lower triangle an ideal causal kernel computes. Embedding lookups are free; norms, activations,
    softmax and the loss are left out (a few FLOPs per element, not per parameter). Recomputation (gradient
    checkpointing) and a reference model's forward are not part of it: they are work the method adds, not
    work the step needs, so they show as lower MFU.
    """
    d, p = dimensions(config), parameters(config)
    linear = 6 * p["decoder_linear"] * batch["forwarded"]
    head = 6 * p["head"] * batch["head"]
    attention = 6 * 2 * d["layers"] * d["heads"] * d["head_dim"] * batch["sum_sq_lengths"] // 2
    return {"linear": linear, "head": head, "attention": attention, "total": linear + head + attention,
            "parameters": p}


def step_tokens(pairs: Iterable[tuple[int, int, int]], layout: str = "padded", head: str = "response") -> dict:
    """Token counts of one step over ``pairs``: (prompt, chosen, rejected) lengths after truncation, EOS in the
    responses. What the step needs (padding excluded):

    - ``forwarded``: P + C + P + R per pair; P + C + R in the prefix-shared layout (the prompt runs once).
    - ``head``: C + R per pair with ``head="response"`` (prefopt scores response positions only); with
      ``head="all"`` every non-pad position, i.e. ``forwarded`` (TRL on CPU, and prefopt's plain logits path).
    - ``sum_sq_lengths``: (P + C)^2 + (P + R)^2 per pair; prefix-shared: minus P^2, the prompt's attention to
      itself being computed once.

    ``executed`` holds the same counts for what the layout really runs, padding and dense masks included:
    padded: 2B rows of the batch's width W (the longest P + C or P + R), and W^2 attention entries per row;
    packed: one row of all tokens, whose dense block-diagonal mask costs (sum of L)^2; prefix-shared: B rows of
    the longest P + C + R. The head runs on every executed position with ``head="all"``.
    """
    if layout not in ("padded", "packed", "prefix_shared"):
        raise ValueError(f"unknown layout {layout!r}")
    if head not in ("response", "all"):
        raise ValueError(f"head must be 'response' or 'all', got {head!r}")
    pairs = list(pairs)
    shared = layout == "prefix_shared"
    forwarded = sum((p if shared else 2 * p) + c + r for p, c, r in pairs)
    responses = sum(c + r for _, c, r in pairs)
    sum_sq = sum((p + c) ** 2 + (p + r) ** 2 - (p * p if shared else 0) for p, c, r in pairs)
    if layout == "padded":
        width = max((p + max(c, r) for p, c, r in pairs), default=0)
        executed = {"forwarded": 2 * len(pairs) * width, "sum_sq_lengths": 2 * len(pairs) * width ** 2}
    elif layout == "packed":
        executed = {"forwarded": forwarded, "sum_sq_lengths": forwarded ** 2}
    else:
        width = max((p + c + r for p, c, r in pairs), default=0)
        executed = {"forwarded": len(pairs) * width, "sum_sq_lengths": len(pairs) * width ** 2}
    executed["head"] = executed["forwarded"] if head == "all" else responses
    return {"forwarded": forwarded, "head": forwarded if head == "all" else responses, "sum_sq_lengths": sum_sq,
            "executed": executed}


def mfu(step_flops: float, step_seconds: float, limit_flops_per_s: float) -> float:
    """Model-FLOP utilisation: the step's FLOPs per second over the measured limit."""
    return step_flops / step_seconds / limit_flops_per_s


# ----------------------------------------------------------------------------------------------------------
# The limit: this machine's matmul throughput at the model's own shapes


def median_seconds(run: Callable[[], object], budget: float, least: int = 3) -> float:
    """Median wall time of ``run()``: one untimed warm-up call, then repeats until ``budget`` seconds have
    gone (at least ``least`` of them)."""
    run()
    times: list[float] = []
    spent_until = time.perf_counter() + budget
    while len(times) < least or time.perf_counter() < spent_until:
        begin = time.perf_counter()
        run()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def distinct_shapes(config) -> list[dict]:
    """The distinct linear shapes of one step: each decoder shape (layers sharing it grouped, e.g. k/v and
    gate/up) counted per layer times layers, then the head once."""
    d = dimensions(config)
    groups: dict[tuple[int, int], list[str]] = {}
    for name, out, inp in layer_linears(config):
        groups.setdefault((out, inp), []).append(name)
    shapes = [{"name": "/".join(names), "out": out, "in": inp, "per_step": len(names) * d["layers"], "head": False}
              for (out, inp), names in groups.items()]
    return shapes + [{"name": "head", "out": d["vocab"], "in": d["hidden"], "per_step": 1, "head": True}]


def matmul_limit(config, tokens: int, dtype=None, threads: int | None = None, seconds: float = 2.0, *,
                 head_tokens: int | None = None,
                 timer: Callable[[str, str, Callable[[], object]], float] | None = None) -> dict:
    """This machine's measured matmul throughput for ``config``'s own layer shapes.

    For every distinct linear shape of a decoder layer and for the head, the three matmuls of training are
    timed with M = ``tokens`` rows (``head_tokens`` for the head; default ``tokens``) in ``dtype`` (default
    float32) with ``torch.set_num_threads(threads)``: forward x @ W^T, grad input dy @ W, grad weight
    dy^T @ x; each a warm-up call, then the median over repeats within ``seconds / (3 x shapes)`` seconds.
    Returns FLOP/s per shape and overall, the overall figure being total FLOPs / total time with every
    shape weighted as one step weights it (each decoder shape x its count x layers, the head once).
    ``timer(shape name, matmul name, run)`` returns one call's seconds (tests pass a fake one).
    """
    import torch

    dtype = dtype or torch.float32
    head_tokens = tokens if head_tokens is None else head_tokens
    shapes = distinct_shapes(config)
    if timer is None:
        budget = seconds / (len(MATMULS) * len(shapes))
        timer = lambda _shape, _matmul, run: median_seconds(run, budget)  # noqa: E731
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        measured = [_time_shape(shape, head_tokens if shape["head"] else tokens, dtype, timer) for shape in shapes]
    finally:
        torch.set_num_threads(previous)
    total_flops = sum(s["per_step"] * s["flops"] for s in measured)
    total_seconds = sum(s["per_step"] * s["seconds_total"] for s in measured)
    return {"dtype": str(dtype).removeprefix("torch."), "threads": threads or previous, "tokens": tokens,
            "head_tokens": head_tokens, "flops_per_s": total_flops / total_seconds, "shapes": measured}


def _time_shape(shape: dict, rows: int, dtype, timer) -> dict:
    """The three training matmuls of one shape, timed; preallocated outputs so allocation is not timed."""
    import torch

    out, inp = shape["out"], shape["in"]
    generator = torch.Generator().manual_seed(0)
    make = lambda *size: torch.randn(*size, generator=generator).to(dtype)  # noqa: E731
    x, weight, grad_out = make(rows, inp), make(out, inp), make(rows, out)
    y, grad_x, grad_w = torch.empty(rows, out, dtype=dtype), torch.empty(rows, inp, dtype=dtype), torch.empty(out, inp, dtype=dtype)
    runs = {
        "forward": lambda: torch.mm(x, weight.t(), out=y),
        "grad_input": lambda: torch.mm(grad_out, weight, out=grad_x),
        "grad_weight": lambda: torch.mm(grad_out.t(), x, out=grad_w),
    }
    seconds = {name: timer(shape["name"], name, runs[name]) for name in MATMULS}
    flops = len(MATMULS) * 2 * rows * out * inp
    total = sum(seconds.values())
    return {**shape, "rows": rows, "flops": flops, "seconds": seconds, "seconds_total": total,
            "flops_per_s": flops / total}


def describe_limit(limit: dict) -> str:
    """One line per shape and the overall figure, for a console report."""
    lines = [f"matmul limit ({limit['dtype']}, torch threads {limit['threads']}, M = {limit['tokens']} rows, head "
             f"{limit['head_tokens']}): {limit['flops_per_s'] / 1e9:.1f} GFLOP/s overall, weighted as one step"]
    for s in limit["shapes"]:
        lines.append(f"  {s['name']:10s} {s['out']:6d} x {s['in']:<6d} x{s['per_step']:<3d} "
                     f"{s['flops_per_s'] / 1e9:7.1f} GFLOP/s  (" + ", ".join(
                         f"{k} {1e3 * v:.2f} ms" for k, v in s["seconds"].items()) + ")")
    return "\n".join(lines)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen56m", help="a --model of benchmarks/trl_speed.py")
    parser.add_argument("--tokens", type=int, default=2048, help="rows M of the decoder matmuls (tokens per step)")
    parser.add_argument("--head-tokens", type=int, default=None, help="rows of the head matmuls (default --tokens)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=3.0, help="time budget per dtype")
    args = parser.parse_args()
    import tempfile
    from pathlib import Path

    from trl_speed import model_config, save_tokenizer  # beside this script

    with tempfile.TemporaryDirectory(prefix="flops-") as directory:
        tokenizer = save_tokenizer(Path(directory))
    # Every token id possible: qwen56m takes the tokenizer's vocabulary, as in the reported runs.
    config, _ = model_config(args.model, tokenizer, len(tokenizer) - 1, 2048)
    for dtype in (torch.float32, torch.bfloat16):
        print(describe_limit(matmul_limit(config, args.tokens, dtype, args.threads, args.seconds,
                                          head_tokens=args.head_tokens)))


if __name__ == "__main__":
    main()
