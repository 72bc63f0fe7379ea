"""Sampling for online DPO: the vllm sampler (an in-process vLLM engine) against transformers generate.

Both samplers are the prefopt plugins (``algorithm.sampler.name`` vllm and transformers), sampling the
same prompts from the same fp32 weights: openings of the VADER movie-review snippets (their first 4 to 8
words, as the sentiment task's prompts). For each job size (sequences per sample() call = prompts x
samples per prompt; ``--sizes``) it reports generated tokens per second of each (EOS included, medians
of ``--repeats``) and their ratio vllm / transformers. The transformers sampler uses batch_size
min(size, 64) sequences per generate call (64 is its default). The vllm sampler runs twice: with the
policy's dtype (fp32: it samples exactly the policy's weights) and with ``dtype: bfloat16`` (the weights
rounded to bf16 in the engine; the policy still trains in fp32), each its own engine.

It also times what else an online round does, so the weight sync can be put in proportion:

- sync: ``load_weights`` of a vllm sampler, which pushes the policy's weights into the engine in place
  (the transformers sampler has nothing to sync);
- train: one DPO training step's policy compute, a forward and backward pass on ``--pairs`` pairs built
  from the round's samples, and an AdamW step (the reference's log-probs come from prefopt's cache);
- round = sync + generation of the largest size + train, and the sync's share of it.

Models: SmolLM2-135M-Instruct (the embedded converted checkpoint) and a tiny random-init Llama with its
vocabulary (2 layers, hidden 64: the smallest vLLM's CPU attention accepts), where per-token overheads
dominate. Nothing is downloaded.

    python benchmarks/sampling.py                  # 135M and tiny, sizes 4..256, 3 repeats
    python benchmarks/sampling.py --quick          # a few minutes: sizes 4..64, 16 new tokens, 1 repeat
    python benchmarks/sampling.py --json benchmarks/results/sampling.json   # also the raw result
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402  (benchmarks/provenance.py, beside this script)


def openings(count: int) -> list[str]:
    """The first 4 to 8 words of ``count`` movie-review snippets."""
    from prefopt_plugins.tasks.sentiment import load_snippets

    texts = []
    for index, snippet in enumerate(load_snippets()):
        words = snippet.text.split()
        n = 4 + index % 5
        if len(words) > n:
            texts.append(" ".join(words[:n]))
        if len(texts) == count:
            return texts
    raise SystemExit(f"only {len(texts)} snippets are long enough")


def tiny_model(root: Path, tokenizer) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return str(root)


def train_step(model, optimizer, prompts: list[list[int]], samples, pairs: int, pad_id: int) -> float:
    """Forward + backward of the policy on ``pairs`` (prompt + first sample, prompt + second sample)
    sequences, and an optimizer step; returns seconds."""
    import torch

    sequences, labels = [], []
    for prompt, row in zip(prompts[:pairs], samples[:pairs]):
        for sample in row[:2]:
            sequences.append(list(prompt) + list(sample.token_ids))
            labels.append([-100] * len(prompt) + list(sample.token_ids))
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id)
    target = torch.full((len(sequences), width), -100)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(zip(sequences, labels)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        target[row, : len(ids)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    model.train()
    start = time.perf_counter()
    loss = model(input_ids=input_ids, attention_mask=mask, labels=target).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def bench_model(label: str, path: str, texts: list[str], args) -> dict:
    import torch

    from prefopt import SamplerContext
    from prefopt.models.loading import load_causal_lm, load_tokenizer
    from prefopt_plugins.samplers.hf_generate import TransformersSampler
    from prefopt_plugins.samplers.vllm_engine import VllmSampler

    tokenizer = load_tokenizer(path)
    policy = load_causal_lm(path)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-7)
    prompts = [tokenizer(t).input_ids for t in texts]
    context = SamplerContext(model_path=path, tokenizer=tokenizer, dtype="float32")
    hf = {size: TransformersSampler(TransformersSampler.Config(max_new_tokens=args.new_tokens,
                                                               batch_size=min(size, 64)), context)
          for size in args.sizes}  # fmt: skip
    for sampler in hf.values():
        sampler.load_weights(policy)
    engines, builds = {}, {}
    for name, dtype in (("vllm", None), ("vllm-bf16", "bfloat16")):
        engines[name] = VllmSampler(VllmSampler.Config(max_new_tokens=args.new_tokens, max_model_len=512, dtype=dtype,
                                                       kv_cache_memory_bytes=int(args.kv_gib * 2**30)), context)
        start = time.perf_counter()
        engines[name].load_weights(policy)
        builds[name] = time.perf_counter() - start
        print(f"[{label}] {name} engine built and synced in {builds[name]:.1f} s; threads {torch.get_num_threads()}",
              flush=True)  # fmt: skip
        engines[name].sample(prompts[:1], args.samples, seed=999)  # warm-up
    hf[args.sizes[0]].sample(prompts[:1], args.samples, seed=999)

    names = ("transformers", *engines)
    times: dict[str, dict[int, list[float]]] = {name: {} for name in names}
    tokens: dict[str, dict[int, list[int]]] = {name: {} for name in names}
    syncs: dict[str, list[float]] = {name: [] for name in engines}
    trains = []
    for repeat in range(args.repeats):
        for size in args.sizes:  # interleaved, so the machine's load hits every sampler alike
            batch = prompts[: size // args.samples]
            for name in names:
                if name in engines:
                    start = time.perf_counter()
                    engines[name].load_weights(policy)
                    syncs[name].append(time.perf_counter() - start)
                sampler = engines.get(name) or hf[size]
                start = time.perf_counter()
                samples = sampler.sample(batch, args.samples, seed=repeat)
                times[name].setdefault(size, []).append(time.perf_counter() - start)
                tokens[name].setdefault(size, []).append(sum(len(s.token_ids) for row in samples for s in row))
                print(f"[{label}] repeat {repeat + 1} size {size:>4} {name:>12}: {times[name][size][-1]:7.2f} s, "
                      f"{tokens[name][size][-1]} tokens", flush=True)  # fmt: skip
        trains.append(train_step(policy, optimizer, batch, samples, args.pairs, tokenizer.pad_token_id))
    for engine in engines.values():
        engine.close()

    result = {"label": label, "build_s": builds, "sync_s": {name: statistics.median(s) for name, s in syncs.items()},
              "train_s": statistics.median(trains), "sizes": {}}  # fmt: skip
    for size in args.sizes:
        row = {}
        for name in names:
            rates = [n / t for n, t in zip(tokens[name][size], times[name][size])]
            row[name] = {"tok_s": statistics.median(rates), "s": statistics.median(times[name][size]),
                         "tokens": statistics.median(tokens[name][size])}  # fmt: skip
        result["sizes"][size] = row
    return result


def report(result: dict, args) -> None:
    print(f"\n{result['label']}: {args.samples} samples per prompt, {args.new_tokens} new tokens, fp32, "
          f"{args.threads} threads, median of {args.repeats}")  # fmt: skip
    print(f"{'sequences':>10}{'transformers':>14}{'vllm fp32':>11}{'vllm bf16':>11}   tok/s; ratios to transformers")
    for size, row in result["sizes"].items():
        hf = row["transformers"]["tok_s"]
        print(f"{size:>10}{hf:>14.1f}{row['vllm']['tok_s']:>11.1f}{row['vllm-bf16']['tok_s']:>11.1f}"
              f"   {row['vllm']['tok_s'] / hf:.2f}x  {row['vllm-bf16']['tok_s'] / hf:.2f}x")
    largest = result["sizes"][max(result["sizes"])]
    train = result["train_s"]
    hf_round = largest["transformers"]["s"] + train
    hf_share = largest["transformers"]["s"] / hf_round
    print(f"train step ({args.pairs} pairs) {train:.2f} s; round of {max(result['sizes'])} sequences = sync + "
          f"generation + train step: transformers {hf_round:.1f} s (generation {hf_share:.0%})")
    for name in ("vllm", "vllm-bf16"):
        sync = result["sync_s"][name]
        total = sync + largest[name]["s"] + train
        print(f"  {name}: engine start {result['build_s'][name]:.1f} s, sync {sync:.2f} s; round {total:.1f} s "
              f"(sync {sync / total:.1%}, generation {largest[name]['s'] / total:.0%}, train {train / total:.0%}); "
              f"round speed-up {hf_round / total:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="135m,tiny", help="comma-separated: 135m, tiny")
    parser.add_argument("--sizes", default="4,16,64,256", help="sequences per sample() call (prompts x samples)")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--pairs", type=int, default=16, help="pairs in the timed training step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kv-gib", type=float, default=2.0, help="vLLM KV cache (block size 128 on CPU)")
    parser.add_argument("--quick", action="store_true", help="sizes 4,16,64, 16 new tokens, 1 repeat")
    parser.add_argument("--json", type=Path, help="also write the raw result here (with command, commit and load)")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.new_tokens, args.repeats = "4,16,64", 16, 1
    args.sizes = sorted(int(s) for s in args.sizes.split(","))
    if any(size % args.samples for size in args.sizes):
        raise SystemExit(f"every size must be a multiple of --samples {args.samples}")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from prefopt.models.loading import load_tokenizer, resolve_model_path

    torch.set_num_threads(args.threads)
    record = provenance.start()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}", flush=True)
    texts = openings(max(args.sizes) // args.samples)
    smollm = resolve_model_path("smollm2-135m-instruct")
    results = []
    with tempfile.TemporaryDirectory(prefix="prefopt-sampling-") as tmp:
        for label in args.models.split(","):
            if label == "135m":
                path = smollm
            elif label == "tiny":
                path = tiny_model(Path(tmp) / "tiny", load_tokenizer(smollm))
            else:
                raise SystemExit(f"unknown model {label!r}: 135m or tiny")
            results.append(bench_model({"135m": "SmolLM2-135M", "tiny": "tiny Llama (2x64)"}[label], path, texts, args))
            report(results[-1], args)
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(json.dumps(results))
    if args.json:
        settings = {key: getattr(args, key) for key in ("sizes", "samples", "new_tokens", "pairs", "repeats", "threads")}
        record.update(settings=settings, results=results)
        provenance.finish(record, args.json)
        print(f"-> {args.json}")


if __name__ == "__main__":
    main()
