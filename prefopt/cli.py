"""The ``prefopt`` command.

    prefopt train RECIPE [dotted.key=value ...]     train (resumes from the run's newest intact checkpoint)
        [--resume-from CHECKPOINT] [--allow-changed KEY,...]
    prefopt validate RECIPE [dotted.key=value ...]  report every recipe problem at once (also of a bench recipe)
    prefopt list [KIND]                              plugins by kind (loss, task, ...), or the example recipes
    prefopt show KIND NAME                           a plugin's summary, paper, package and every option
    prefopt init [NAME] [--force]                    write an example recipe (default dpo) into this folder
    prefopt data RECIPE [dotted.key=value ...]      build (or find) the recipe's task data and print its paths
    prefopt extrapolate SFT ALIGNED --out DIR (--alpha A | --paper-alpha A)
                                                     ExPO: write SFT + alpha * (ALIGNED - SFT), a new model
    prefopt bench BENCH [--only ENTRY ...] [--report-only] [--check]
                                                     train and evaluate variants x seeds; leaderboard and plots
    prefopt push RUN_DIR REPO_ID [--private] [--revision R] [--token-env VAR]
                                                     a finished run's model and its card to the Hugging Face Hub

A mistake the user can fix ends with one line on stderr and exit status 2, never a traceback; training that
stopped on a non-finite loss or gradient ends the same way with exit status 3.

Startup stays well under a second: this module imports only the standard library and ``prefopt.errors``, and
each command imports what it needs when it runs. ``list`` and ``show`` read the plugin catalogue
(``prefopt.registry.catalogue``), so they import no plugin and no torch.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from prefopt.errors import PrefoptError, did_you_mean
from prefopt.publish import commands as publish  # its parser only: `push` imports the hub client when it runs

WIDTH = 100  # what list and show fit their lines to
RECIPE_KIND = ("recipe", "recipes")  # `prefopt list recipe`: the example recipes, beside the plugin kinds


# --- the parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefopt", description="DPO-family preference optimization.")
    parser.add_argument("--version", action=_Version, help="print the versions of prefopt, torch and transformers")
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
    with_recipe("validate",
                "Check a recipe (or a bench recipe: every entry x seed) and report every problem at once.")
    _add_browsing(commands)
    data = with_recipe("data", "Build the recipe's task data (if any) and print where it is.")
    data.add_argument("--no-progress", action="store_true")
    data.add_argument("--export", metavar="DIR", help="also write the pairs to DIR/train.jsonl and DIR/test.jsonl "
                      "(prompt, chosen, rejected): a plain preference folder for data.path")
    _add_extrapolate(commands)
    _add_bench(commands)
    publish.add_parser(commands)
    return parser


def _add_browsing(commands) -> None:
    """list, show and init: what is installed and what to start from; none of them loads a plugin."""
    kinds = "loss, task, algorithm, sampler, judge or recipe"
    help = "List plugins by kind (name, paper, summary), or the example recipes."
    sub = commands.add_parser("list", help=help, description=help)
    sub.add_argument("kind", nargs="?", metavar="KIND", help=f"only this kind: {kinds} (plural too)")
    help = "Show a plugin's summary, paper, package and every option (type, default, bounds), or a recipe."
    sub = commands.add_parser("show", help=help, description=help)
    sub.add_argument("kind", metavar="KIND", help=kinds)
    sub.add_argument("name", metavar="NAME", help="the plugin's name as recipes write it (e.g. dpo), or a recipe's")
    help = "Write an example recipe into the current folder (`prefopt list recipe` lists them)."
    sub = commands.add_parser("init", help=help, description=help)
    sub.add_argument("name", nargs="?", default="dpo", metavar="NAME", help="the example's name (default: dpo)")
    sub.add_argument("--force", "--overwrite", action="store_true", help="replace a file of the same name")


def _add_bench(commands) -> None:
    help = "Compare variants x seeds on one recipe: train, evaluate, write a leaderboard with plots."
    sub = commands.add_parser("bench", help=help, description=help)
    sub.add_argument("recipe", metavar="BENCH", help="a bench recipe, e.g. recipes/bench/frontier-reduced.yaml")
    sub.add_argument("--only", nargs="+", metavar="ENTRY", help="run only these entries (the report shows all results)")
    sub.add_argument("--report-only", action="store_true",
                     help="train nothing: rebuild the leaderboard and plots from results.jsonl")
    sub.add_argument("--check", action="store_true",
                     help="train nothing: validate every entry x seed's recipe, as prefopt validate does")
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


class _Version(argparse.Action):
    """``--version``: the versions from the installed packages' metadata, which imports none of them."""

    def __init__(self, option_strings, dest, help=None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def version_line() -> str:
    import importlib.metadata
    import platform

    import prefopt

    def installed(name: str) -> str:
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            return f"{name} not installed"

    return (f"prefopt {prefopt.__version__} ({installed('torch')}, {installed('transformers')}, "
            f"Python {platform.python_version()})")


# --- training and checking


def cmd_validate(args) -> int:
    from pathlib import Path

    from prefopt.recipe import load_recipe, read_yaml

    if _is_bench_recipe(read_yaml(Path(args.recipe))):
        return _validate_bench(args.recipe, args.overrides)
    load_recipe(args.recipe, args.overrides)
    print(f"{args.recipe}: ok")
    return 0


def _is_bench_recipe(tree: dict) -> bool:
    # A training recipe has neither key at its top level (its sections are the engine's and the plugins'),
    # and a bench recipe needs both, so one of them is enough to read the file as a bench recipe.
    return "entries" in tree or "base" in tree


def _validate_bench(path: str, overrides: list[str]) -> int:
    """A bench recipe, checked as ``prefopt bench`` checks it before training: every entry x seed."""
    from prefopt.bench.recipe import load_bench

    if overrides:
        raise PrefoptError(
            f"{path} is a bench recipe, which takes no KEY=VALUE overrides; put them in its overrides: "
            "list (every entry) or in an entry's overrides"
        )
    bench = load_bench(path)
    entries, seeds = len(bench.spec.entries), len(bench.spec.seeds)
    print(f"{path}: ok (bench recipe: {entries} entries x {seeds} seeds = {len(bench.runs)} runs)")
    return 0


def cmd_train(args) -> int:
    from prefopt.api.run import train
    from prefopt.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    allowed = [key.strip() for text in args.allow_changed for key in text.split(",") if key.strip()]
    result = train(recipe, progress=not args.no_progress, resume_from=args.resume_from, allow_changed=allowed)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # one report per run, not one per process
        return 0
    start, end = result.initial_eval_metrics or {}, result.eval_metrics
    keys = [k for k in ("eval/rewards/accuracies", "eval/rewards/margins", "eval/loss") if k in end]
    keys += sorted(k for k in end if k.startswith("eval/reward/"))
    if keys:
        print("held-out metrics (start -> end):")
        for key in keys:
            before = f"{start[key]:.4f}" if key in start else "-"
            print(f"  {key.removeprefix('eval/'):<24} {before} -> {end[key]:.4f}")
    print(f"run: {result.run_dir}")
    return 0


def cmd_data(args) -> int:
    from pathlib import Path

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
    if args.export:
        from prefopt.data.export import export_pairs

        for split, (path, count) in export_pairs(data.train, data.eval, Path(args.export)).items():
            print(f"exported {count} {split} pairs to {path}")
        print(f"train on them with data.path={args.export} data.eval_split=test (and no data.task)")
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

    if args.check:
        if args.report_only or args.only:
            raise PrefoptError("bench --check validates every entry x seed; leave out --only and --report-only")
        return _validate_bench(args.recipe, [])
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


# --- browsing: list, show, init


def cmd_list(args) -> int:
    if args.kind is not None and args.kind.lower() in RECIPE_KIND:
        _print_lines(_recipe_lines())
        return 0
    from prefopt.registry.catalogue import catalogue

    found = catalogue()
    kinds = [_plugin_kind(found, args.kind)] if args.kind is not None else list(found.kinds)
    entries = [entry for kind in kinds for entry in found.of_kind(kind.name)]
    name_width = min(max((len(entry.name) for entry in entries), default=4), 20)
    lines = []
    for kind in kinds:
        of_kind = found.of_kind(kind.name)
        lines += [f"{kind.name} ({len(of_kind)}; a recipe names one in {kind.recipe_key}.name)"]
        lines += [_entry_line(entry, name_width) for entry in of_kind] or ["  (none installed)"]
    hints = ["prefopt show KIND NAME: its options"]
    if args.kind is None:
        hints += ["prefopt list KIND: one kind", "prefopt list recipe: examples"]
    _print_lines([*lines, "", "; ".join(hints)])
    return 0


def _plugin_kind(found, word: str):
    """The plugin kind ``word`` names (singular or plural); else one line naming every kind."""
    kind = next((k for k in found.kinds if word.lower() in (k.name, k.plural)), None)
    if kind is None:
        names = [k.name for k in found.kinds] + [RECIPE_KIND[0]]
        raise PrefoptError(f"unknown kind {word!r}{did_you_mean(word.lower(), names)}; kinds: {', '.join(names)}")
    return kind


def _entry_line(entry, name_width: int) -> str:
    """One plugin in 100 columns: name, paper (its arXiv id), the package unless it is prefopt's, summary."""
    paper = _short_paper(entry.paper)
    package = "" if entry.provider.startswith("prefopt ") else f"[{entry.provider}] "
    head = f"  {entry.name:<{name_width}}  {paper:<16}  {package}"
    return head + _cut(entry.summary, WIDTH - len(head))


def _short_paper(paper: str) -> str:
    """The first arXiv id of a citation; else its first part (authors and year) cut to 16 characters."""
    import re

    found = re.search(r"arXiv:\s*(\d{4}\.\d{4,5})", paper)
    if found:
        return f"arXiv:{found.group(1)}"
    return _cut(paper.split(",")[0].strip(), 16) or "-"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 3, 0)].rstrip() + "..."


def _recipe_lines() -> list[str]:
    from prefopt.recipe import examples

    names = examples.names()
    width = max((len(name) for name in names), default=4)
    lines = [f"recipe ({len(names)}; prefopt init NAME writes one here)"]
    for name in names:
        head = f"  {name:<{width}}  "
        lines.append(head + _cut(examples.describe(name), WIDTH - len(head)))
    return [*lines, "", "prefopt show recipe NAME: print one; prefopt init NAME: write it into this folder"]


def cmd_show(args) -> int:
    if args.kind.lower() in RECIPE_KIND:
        from prefopt.recipe import examples

        text = examples.text(args.name)
        print(text, end="" if text.endswith("\n") else "\n")
        return 0
    from prefopt.registry.catalogue import catalogue

    found = catalogue()
    kind = _plugin_kind(found, args.kind)
    _print_lines(_entry_details(found.entry(kind.name, args.name), kind))
    return 0


def _entry_details(entry, kind) -> list[str]:
    """Everything about one plugin, wrapped to 100 columns."""
    fields = [("summary", entry.summary or "-"), ("paper", entry.paper or "-"),
              ("package", f"{entry.provider} (module {entry.module})"),
              ("recipe", _recipe_snippet(kind.recipe_key, entry))]
    lines = [f"{kind.name} {entry.name}"]
    for label, value in fields:
        lines += textwrap.wrap(value, WIDTH, initial_indent=f"  {label:<9}", subsequent_indent=" " * 11,
                               break_on_hyphens=False)
    lines += ["", f"options ({kind.recipe_key}.OPTION):" if entry.options else "options: none"]
    for option in entry.options:
        lines += _option_lines(option)
    return lines


def _recipe_snippet(recipe_key: str, entry) -> str:
    """Where a recipe names the plugin, as YAML: ``algorithm: {sampler: {name: vllm, ...}}``."""
    snippet = "{name: " + entry.name + (", ..." if entry.options else "") + "}"
    for key in reversed(recipe_key.split(".")):
        snippet = "{" + key + ": " + snippet + "}"
    return snippet[1:-1]


def _option_lines(option) -> list[str]:
    head = f"{option.name}: {option.type}"
    head += " (required)" if option.default is None else f" = {option.default}"
    if option.bounds:
        head += f"  ({_bounds_text(option.bounds)})"
    lines = textwrap.wrap(head, WIDTH, initial_indent="  ", subsequent_indent="      ", break_on_hyphens=False)
    if option.description:
        lines += textwrap.wrap(option.description, WIDTH, initial_indent="      ", subsequent_indent="      ",
                               break_on_hyphens=False)
    return lines


BOUND_SIGNS = {"ge": ">= {}", "gt": "> {}", "le": "<= {}", "lt": "< {}", "min_length": "length >= {}",
               "max_length": "length <= {}"}


def _bounds_text(bounds: dict) -> str:
    return ", ".join(BOUND_SIGNS.get(key, key + " {}").format(_number(value)) for key, value in bounds.items())


def _number(value: float) -> str:
    return repr(value) if isinstance(value, float) and not value.is_integer() else format(value, "g")


def cmd_init(args) -> int:
    from pathlib import Path

    from prefopt.recipe import examples

    path = examples.write(args.name, Path.cwd(), overwrite=args.force)  # an unknown name: one line, closest name
    shown = os.path.relpath(path)
    print(f"wrote {shown}")
    print(_next_steps(args.name.split("/")[0], shown))
    return 0


def _next_steps(folder: str, shown: str) -> str:
    """The commands that use an example of ``folder`` (its group: a training recipe, bench, accelerate)."""
    if folder == "bench":
        return f"check it: prefopt bench {shown} --check\nrun it:   prefopt bench {shown}"
    if folder == "accelerate":  # an accelerate config, not a recipe: it says how to launch one
        return f"use it:   accelerate launch --config_file {shown} -m prefopt.cli train RECIPE.yaml"
    return f"check it: prefopt validate {shown}\ntrain it: prefopt train {shown}"


def _print_lines(lines: list[str]) -> None:
    sys.stdout.write("".join(line + "\n" for line in lines))


# --- running a command

COMMANDS = {"train": cmd_train, "validate": cmd_validate, "list": cmd_list, "show": cmd_show, "init": cmd_init,
            "data": cmd_data, "extrapolate": cmd_extrapolate, "bench": cmd_bench, "push": publish.run}
# The commands that load models or data: they import torch, transformers and datasets anyway, and quiet them.
WITH_LIBRARIES = {"train", "validate", "data", "extrapolate", "bench"}


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
    try:
        if args.command in WITH_LIBRARIES:
            _quiet_libraries()
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
