"""The ``prefopt`` command.

    prefopt train RECIPE [dotted.key=value ...]     train (resumes from the run's newest intact checkpoint)
        [--resume-from CHECKPOINT] [--allow-changed KEY,...]
    prefopt validate RECIPE [dotted.key=value ...]  report every recipe problem at once (also of a bench recipe)
    prefopt list                                     every registered plugin
    prefopt data RECIPE [dotted.key=value ...]      build (or find) the recipe's task data and print its paths
    prefopt extrapolate SFT ALIGNED --out DIR (--alpha A | --paper-alpha A)
                                                     ExPO: write SFT + alpha * (ALIGNED - SFT), a new model
    prefopt bench BENCH [--only ENTRY ...] [--report-only]
                                                     train and evaluate variants x seeds; leaderboard and plots

A mistake the user can fix ends with one line on stderr and exit status 2, never a traceback; training that
stopped on a non-finite loss or gradient ends the same way with exit status 3.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from prefopt.errors import PrefoptError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefopt", description="DPO-family preference optimization.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_recipe(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("recipe", help="path to a YAML recipe, e.g. recipes/dpo/quickstart.yaml")
        sub.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted-key overrides, e.g. loss.beta=0.2")
        return sub

    train = with_recipe("train", "Train a model from a recipe.")
    train.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and CI)")
    train.add_argument("--resume-from", metavar="CHECKPOINT",
                       help="continue from this checkpoint folder (<run>/checkpoints/step-N) instead of the newest")
    train.add_argument("--allow-changed", action="append", default=[], metavar="KEY,...",
                       help="recipe keys (or sections) that may differ from the checkpoint's recipe when resuming, "
                       "e.g. train.learning_rate; added to train.allow_changed")
    with_recipe("validate", "Check a recipe (or a bench recipe: every entry x seed) and report every problem at once.")
    data = with_recipe("data", "Build the recipe's task data (if any) and print where it is.")
    data.add_argument("--no-progress", action="store_true")
    commands.add_parser("list", help="List registered plugins: kind, name, package, paper, summary.")
    _add_extrapolate(commands)
    _add_bench(commands)
    return parser


def _add_bench(commands) -> None:
    help = "Compare variants x seeds on one recipe: train, evaluate, write a leaderboard with plots."
    sub = commands.add_parser("bench", help=help, description=help)
    sub.add_argument("recipe", metavar="BENCH", help="a bench recipe, e.g. recipes/bench/frontier-reduced.yaml")
    sub.add_argument("--only", nargs="+", metavar="ENTRY", help="run only these entries (the report shows all results)")
    sub.add_argument("--report-only", action="store_true",
                     help="train nothing: rebuild the leaderboard and plots from results.jsonl")
    sub.add_argument("--no-progress", action="store_true", help="no progress bar (for logs and CI)")


def _add_extrapolate(commands) -> None:
    help = "ExPO (arXiv:2404.16792): write SFT + alpha * (ALIGNED - SFT) as a new model."
    sub = commands.add_parser("extrapolate", help=help, description=help)
    sub.add_argument("sft", metavar="SFT", help="the SFT model: hub id, local directory or smollm2-135m-instruct")
    sub.add_argument("aligned", metavar="ALIGNED", help="the aligned model trained from SFT, or a PEFT adapter dir")
    sub.add_argument("--out", required=True, metavar="DIR", help="output directory (Hugging Face format)")
    # Not an argparse group: "exactly one of" is checked in cmd_extrapolate so that a mistake is one line.
    sub.add_argument("--alpha", type=float, metavar="A", help="weight on the difference: 1 = ALIGNED, 1.3 = ExPO")
    sub.add_argument("--paper-alpha", type=float, metavar="A", help="the paper's alpha: --alpha 1+A (e.g. 0.3)")
    sub.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                     help="precision to load and save in; the arithmetic is float32 (default: float32)")
    sub.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the models")
    sub.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    sub.add_argument("--no-progress", action="store_true")


def cmd_validate(args) -> int:
    from pathlib import Path

    from prefopt.recipe import load_recipe, read_yaml

    if _is_bench_recipe(read_yaml(Path(args.recipe))):
        return _validate_bench(args)
    load_recipe(args.recipe, args.overrides)
    print(f"{args.recipe}: ok")
    return 0


def _is_bench_recipe(tree: dict) -> bool:
    # A training recipe has neither key at its top level (its sections are the engine's and the plugins'),
    # and a bench recipe needs both, so one of them is enough to read the file as a bench recipe.
    return "entries" in tree or "base" in tree


def _validate_bench(args) -> int:
    """A bench recipe, checked as ``prefopt bench`` checks it before training: every entry x seed."""
    from prefopt.bench.recipe import load_bench

    if args.overrides:
        raise PrefoptError(
            f"{args.recipe} is a bench recipe, which takes no KEY=VALUE overrides; put them in its overrides: "
            "list (every entry) or in an entry's overrides"
        )
    bench = load_bench(args.recipe)
    entries, seeds = len(bench.spec.entries), len(bench.spec.seeds)
    print(f"{args.recipe}: ok (bench recipe: {entries} entries x {seeds} seeds = {len(bench.runs)} runs)")
    return 0


def cmd_list(args) -> int:
    from prefopt.registry.kinds import KINDS
    from prefopt.registry.loading import default_plugins

    plugins = default_plugins()
    rows = [("KIND", "NAME", "PACKAGE", "PAPER / SUMMARY")]
    for kind in KINDS:
        for info in plugins.registry(kind).infos():
            rows.append((kind.name, info.name, info.provider, info.cls.paper or "-"))
            rows.append(("", "", "", info.cls.summary()))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    return 0


def cmd_train(args) -> int:
    from prefopt.engine import run
    from prefopt.recipe import derive_recipe, load_recipe
    from prefopt.registry.loading import default_plugins

    recipe = load_recipe(args.recipe, args.overrides)
    allowed = [key.strip() for text in args.allow_changed for key in text.split(",") if key.strip()]
    if allowed:
        change = {"train.allow_changed": [*recipe.train.allow_changed, *allowed]}
        recipe = derive_recipe(recipe, default_plugins(), change, args.recipe)
    summary = run(recipe, show_progress=not args.no_progress, resume_from=args.resume_from)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # one report per run, not one per process
        return 0
    start, end = summary.get("eval_start", {}), summary.get("eval_end", {})
    keys = [k for k in ("eval/rewards/accuracies", "eval/rewards/margins", "eval/loss") if k in end]
    keys += sorted(k for k in end if k.startswith("eval/reward/"))
    if keys:
        print("held-out metrics (start -> end):")
        for key in keys:
            before = f"{start[key]:.4f}" if key in start else "-"
            print(f"  {key.removeprefix('eval/'):<24} {before} -> {end[key]:.4f}")
    print(f"run: {recipe.output.dir}")
    return 0


def cmd_data(args) -> int:
    from prefopt.engine import build_task_data
    from prefopt.models.loading import load_causal_lm, load_tokenizer, resolve_model_path
    from prefopt.registry.loading import default_plugins
    from prefopt.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.data.task is None:
        raise PrefoptError(f"{args.recipe}: data.task is not set; this recipe reads {recipe.data.path} directly")
    m = recipe.model
    model_path = resolve_model_path(m.path)
    tokenizer = load_tokenizer(model_path, revision=m.revision, trust_remote_code=m.trust_remote_code)

    def load_model():
        return load_causal_lm(model_path, dtype=m.dtype, revision=m.revision,
                              trust_remote_code=m.trust_remote_code).eval()

    _, data = build_task_data(recipe, default_plugins(), model_path, tokenizer, load_model, not args.no_progress)
    print(f"train: {data.train}\neval:  {data.eval}")
    return 0


def cmd_extrapolate(args) -> int:
    from prefopt.models.extrapolate import extrapolate

    if (args.alpha is None) == (args.paper_alpha is None):
        raise PrefoptError("extrapolate: give exactly one of --alpha A or --paper-alpha A (= --alpha 1+A)")
    alpha = args.alpha if args.alpha is not None else 1 + args.paper_alpha
    out = extrapolate(args.sft, args.aligned, args.out, alpha=alpha, dtype=args.dtype,
                      trust_remote_code=args.trust_remote_code, overwrite=args.overwrite,
                      show_progress=not args.no_progress)
    print(f"wrote {out}: SFT + {alpha:g} * (ALIGNED - SFT)  (paper alpha {alpha - 1:g})")
    return 0


def cmd_bench(args) -> int:
    from prefopt.bench.recipe import load_bench

    if args.report_only:
        from prefopt.bench.report import write_report
        from prefopt.bench.results import read_results

        bench = load_bench(args.recipe, with_runs=False)
        report = write_report(bench, read_results(bench.dir))
        print(f"leaderboard: {report['markdown']}  {report['html']}")
        return 0
    from prefopt.bench.runner import run_bench

    outcome = run_bench(load_bench(args.recipe), only=args.only, show_progress=not args.no_progress)
    print(f"results: {len(outcome.rows)} runs in {outcome.report['markdown'].parent / 'results.jsonl'}")
    print(f"leaderboard: {outcome.report['markdown']}  {outcome.report['html']}")
    if outcome.failures:
        print(f"prefopt: error: {len(outcome.failures)} runs failed (rerun the same command to retry them):",
              file=sys.stderr)
        for line in outcome.failures:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


COMMANDS = {"train": cmd_train, "validate": cmd_validate, "list": cmd_list, "data": cmd_data,
            "extrapolate": cmd_extrapolate, "bench": cmd_bench}


def _quiet_libraries() -> None:
    """Library chatter (deprecations, per-file progress bars) drowns a run's own output; errors still show."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "no_progress", False):
        os.environ["TQDM_DISABLE"] = "1"  # also silences libraries' own bars (e.g. GGUF conversion)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()
    try:
        return COMMANDS[args.command](args)
    except PrefoptError as exc:
        message = str(exc)
        first, _, rest = message.partition("\n")
        # one write per message: processes launched side by side share stderr, and print's separate
        # newline write lets their lines run together
        details = textwrap.indent(textwrap.dedent(rest), "  ") + "\n" if rest else ""
        sys.stderr.write(f"prefopt: error: {first}\n{details}")
        sys.stderr.flush()
        return exc.exit_status  # 2, or 3 for training stopped on a non-finite loss or gradient
    except KeyboardInterrupt:
        print("prefopt: interrupted; rerun the same command to resume from the newest checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
