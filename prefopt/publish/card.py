"""The model card every saved model carries: ``README.md`` with the metadata the Hugging Face Hub reads, and
what trained the model.

The metadata (``huggingface_hub.ModelCardData``): ``library_name`` ``transformers`` for full weights and
``peft`` for an unmerged LoRA adapter (so the hub's widget and "use this model" load it), ``tags``
(``prefopt``, the loss, the algorithm), ``base_model`` and ``datasets`` where the recipe names hub ids,
``license`` where the base model's own card states one (a local folder, or a hub card in the local cache:
never fetched), and ``pipeline_tag: text-generation``. The body: the base model, the data, the loss with
its paper and option values, the algorithm, the reference, the held-out metrics at the start and end and
the last training step's, the prefopt version, how to load the model, and the full recipe.

A card is rendered from plain inputs (``CardFacts``), so a finished run's card can be written again from
its files; ``use_repo_id`` points an existing card's loading snippet at the repository it is pushed to.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefopt.paths import atomic_write_text

__all__ = ["CARD_NAME", "CardFacts", "base_license", "gather_facts", "is_hub_id", "last_training_metrics",
           "render_card", "use_repo_id", "write_card"]

CARD_NAME = "README.md"
# The line of the loading snippet that names the model; ``use_repo_id`` rewrites it.
_MODEL_ID_LINE = re.compile(r'^model_id = ".*"$', re.M)


@dataclass
class CardFacts:
    """What a card says, gathered by whoever saves the model."""

    title: str  # the card's heading: the repository's name, else the run directory's
    recipe: dict  # the full recipe, defaults included (``recipe.model_dump(mode="json")``)
    recipe_yaml: str  # the same as the run's recipe.yaml holds it
    loss_summary: str  # the loss plugin's one-line summary
    loss_paper: str
    loss_options: dict[str, Any]  # the loss's validated Config values
    loss_option_help: dict[str, str]  # option -> its description
    adapter: bool  # an unmerged LoRA adapter (else full weights)
    model_id: str  # what the loading snippet loads: the hub repository, else the model folder
    summary: dict = field(default_factory=dict)  # the run's summary (summary.json)
    training: dict[str, float] = field(default_factory=dict)  # the last training step's metrics
    algorithm: str | None = None
    algorithm_paper: str = ""
    version: str = ""  # prefopt's
    license: str | None = None
    reward_model: bool = False  # a sequence scorer (its loss declares ``scores_sequences``), not a causal LM


def render_card(facts: CardFacts) -> str:
    """The card's text: YAML metadata between ``---`` lines, then the body."""
    from huggingface_hub import ModelCardData

    recipe = facts.recipe
    base, data = recipe["model"]["path"], recipe["data"].get("path")
    metadata = ModelCardData(
        library_name="peft" if facts.adapter else "transformers",
        tags=["prefopt", recipe["loss"]["name"], *([facts.algorithm] if facts.algorithm else []),
              *_adapter_tags(recipe["model"])],
        base_model=base if is_hub_id(base) else None,
        datasets=[data] if data and is_hub_id(data) else None,
        license=facts.license,
        pipeline_tag="text-classification" if facts.reward_model else "text-generation",
    )
    sections = [_heading(facts), _training(facts), _results(facts), _loading(facts), _recipe(facts)]
    return f"---\n{metadata.to_yaml()}\n---\n\n" + "\n\n".join(s for s in sections if s) + "\n"


def write_card(model_dir: Path, facts: CardFacts) -> Path:
    """Write (or replace, such as PEFT's empty template) ``<model_dir>/README.md``, atomically."""
    path = Path(model_dir) / CARD_NAME
    atomic_write_text(path, render_card(facts))
    return path


def use_repo_id(card_path: Path, repo_id: str) -> bool:
    """Point the loading snippet of the card at ``card_path`` to ``repo_id`` (atomically); False when the card
    has no snippet of prefopt's to point (a card written by hand is left as it is)."""
    text = Path(card_path).read_text(encoding="utf-8")
    if not _MODEL_ID_LINE.search(text):
        return False
    atomic_write_text(card_path, _MODEL_ID_LINE.sub(f"model_id = {json.dumps(repo_id)}", text, count=1))
    return True


# ----------------------------------------------------------------------------------------------------------
# the body


def _heading(facts: CardFacts) -> str:
    recipe = facts.recipe
    what = "A LoRA adapter" if facts.adapter else "A causal language model"
    if facts.reward_model:
        what = ("A LoRA adapter of a reward model" if facts.adapter else
                "A reward model (a sequence classifier: one score per sequence, read at its last token)")
    by = f" with algorithm `{facts.algorithm}`" if facts.algorithm else ""
    return (f"# {facts.title}\n\n{what} trained from `{recipe['model']['path']}` by preference optimization with "
            f"prefopt {facts.version}: loss `{recipe['loss']['name']}`{by}.")


def _training(facts: CardFacts) -> str:
    recipe, summary = facts.recipe, facts.summary
    t = recipe["train"]
    rows = [
        ("Base model", _base_model(recipe["model"])),
        ("Data", _data(recipe["data"], summary)),
        ("Loss", f"`{recipe['loss']['name']}`: {facts.loss_summary}"),
        ("Paper", facts.loss_paper or "-"),
        ("Algorithm", _algorithm(facts)),
        ("Reference", _reference(summary.get("reference"))),
        ("Steps", f"{summary.get('steps', '?')} optimizer steps of {t['batch_size']} pairs, learning rate "
                  f"{t['learning_rate']:g} ({t['lr_scheduler']['name']} schedule, {t['warmup_steps']} warmup "
                  f"steps), optimizer {t['optimizer']['name']}"),
        ("Precision", f"weights {recipe['model']['dtype']}, mixed precision {t['mixed_precision']}"),
        ("Weights", _weights(recipe, facts.adapter)),
        ("Seed", str(recipe["seed"])),
        ("prefopt", facts.version or "?"),
    ]
    table = _table(("", ""), rows)
    options = _table(("Loss option", "Value", "Meaning"),
                     [(f"`{k}`", f"`{json.dumps(v)}`", facts.loss_option_help.get(k, ""))
                      for k, v in facts.loss_options.items()])
    return f"## Training\n\n{table}" + (f"\n\n{options}" if facts.loss_options else "")


def _base_model(model: dict) -> str:
    from prefopt.models.embedded import EMBEDDED_MODELS

    revision = f" (revision `{model['revision']}`)" if model.get("revision") else ""
    embedded = EMBEDDED_MODELS.get(model["path"])
    if embedded is not None:
        return (f"`{model['path']}`: {embedded.display_name}, de-quantized from the GGUF in the "
                f"`{embedded.distribution}` package")
    return f"`{model['path']}`{revision}"


def _data(data: dict, summary: dict) -> str:
    if data.get("task"):
        source = f"task `{data['task']['name']}`"
    else:
        subset = f" (subset `{data['subset']}`)" if data.get("subset") else ""
        source = f"`{data['path']}`{subset}, split `{data['train_split']}`"
    pairs = f", {summary['train_pairs']} training pairs" if "train_pairs" in summary else ""
    held_out = ""
    if data.get("eval_split") and not data.get("task"):
        held_out = f"; held out: split `{data['eval_split']}`"
    if summary.get("eval_pairs"):
        held_out += f" ({summary['eval_pairs']} pairs)" if held_out else f"; {summary['eval_pairs']} held-out pairs"
    return source + pairs + held_out


def _algorithm(facts: CardFacts) -> str:
    if not facts.algorithm:
        return "none: one pass of training over the data"
    return f"`{facts.algorithm}`" + (f" ({facts.algorithm_paper})" if facts.algorithm_paper else "")


def _reference(info: Any) -> str:
    if not info:
        return "none (the loss uses no reference model)"
    kind, source = info.get("kind", "?"), info.get("source", "")
    text = f"{kind}" + (f", from `{source}`" if source else "")
    if info.get("extra"):
        text += f"; {len(info['extra'])} more reference(s): " + ", ".join(f"`{e.get('source')}`" for e in info["extra"])
    return text


def _adapter_tags(model: dict) -> list[str]:
    """Hub tags for the adapter a run trained: lora, or the peft tuner type (dora for LoRA with use_dora)."""
    peft = model.get("peft") or {}
    tags = []
    if model.get("lora") or str(peft.get("type", "")).upper() == "LORA":
        tags.append("lora")
    elif peft.get("type"):
        tags.append(str(peft["type"]).lower())
    if peft.get("use_dora"):
        tags.append("dora")
    if model.get("quantization"):
        tags.append(f"{model['quantization']['bits']}-bit")
    return tags


def _weights(recipe: dict, adapter: bool) -> str:
    model = recipe["model"]
    lora, peft = model.get("lora"), model.get("peft")
    if lora:
        shape = f"LoRA r={lora['r']}, alpha={lora['alpha']:g}, on {lora['target_modules']}"
    elif peft:
        fields = ", ".join(f"{k}={v}" for k, v in peft.items() if k != "type")
        shape = f"PEFT {peft.get('type', 'LORA')}" + (f" ({fields})" if fields else "")
    elif model.get("adapter"):
        shape = f"the adapter `{model['adapter']}`, trained further"
    else:
        return "every weight trained"
    if model.get("quantization"):
        shape += f", over {model['quantization']['bits']}-bit base weights (bitsandbytes)"
    return f"{shape}: this folder holds the adapter alone" if adapter else f"{shape}, merged into the weights"


def _results(facts: CardFacts) -> str:
    start, end = facts.summary.get("eval_start") or {}, facts.summary.get("eval_end") or {}
    parts = []
    if end:
        rows = [(f"`{k.removeprefix('eval/')}`", _number(start.get(k)), _number(v)) for k, v in sorted(end.items())]
        parts.append("Held-out metrics, before training and at the end:\n\n"
                     + _table(("Metric", "Start", "End"), rows))
    if facts.training:
        rows = [(f"`{k}`", _number(v)) for k, v in sorted(facts.training.items()) if k != "step"]
        step = facts.training.get("step", "?")
        parts.append(f"The last training step ({step}):\n\n" + _table(("Metric", "Value"), rows))
    return "## Results\n\n" + "\n\n".join(parts) if parts else ""


def _loading(facts: CardFacts) -> str:
    if facts.reward_model:
        return _loading_reward_model(facts)
    if facts.adapter:
        code = ("from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
                f"model_id = {json.dumps(facts.model_id)}\n"
                "model = AutoPeftModelForCausalLM.from_pretrained(model_id)  # the base model adapter_config.json "
                "names, with this adapter\ntokenizer = AutoTokenizer.from_pretrained(model_id)")
        note = ("\n\nThe adapter's base model is the one `adapter_config.json` names (`base_model_name_or_path`); "
                "where that is a local folder, load the base model yourself and add the adapter with "
                "`peft.PeftModel.from_pretrained(base, model_id)`.")
    else:
        code = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"model_id = {json.dumps(facts.model_id)}\n"
                "model = AutoModelForCausalLM.from_pretrained(model_id)\n"
                "tokenizer = AutoTokenizer.from_pretrained(model_id)")
        note = ""
    return f"## How to load it\n\n```python\n{code}\n```{note}"


def _loading_reward_model(facts: CardFacts) -> str:
    """A reward model scores prompt + response as one sequence, as it was trained and as the reward_model judge
    scores it."""
    if facts.adapter:  # peft builds the base model that adapter_config.json names, with one output
        imports = ("from peft import AutoPeftModelForSequenceClassification\nfrom transformers import AutoTokenizer")
        load = "AutoPeftModelForSequenceClassification.from_pretrained(model_id, num_labels=1)"
    else:
        imports = "from transformers import AutoModelForSequenceClassification, AutoTokenizer"
        load = "AutoModelForSequenceClassification.from_pretrained(model_id)"
    code = (f"import torch\n{imports}\n\nmodel_id = {json.dumps(facts.model_id)}\nmodel = {load}\n"
            "tokenizer = AutoTokenizer.from_pretrained(model_id)\nwith torch.no_grad():\n"
            "    score = model(**tokenizer(prompt + response, return_tensors=\"pt\")).logits[0, 0].item()")
    judge = ("prefopt's `reward_model` judge scores it so (from the merged model, `output.merge_lora: true`)"
             if facts.adapter else "prefopt's `reward_model` judge scores it so")
    note = ("\n\nThe score is of prompt + response as one sequence (text data: the prompt text followed by the "
            "response, no EOS added; conversations: rendered with the chat template), read at its last token that is "
            f"not the pad token. {judge}: `{{name: reward_model, path: <this model>, format: plain}}` for a model "
            "trained on text, `format: chat` for one trained on conversations.")
    return f"## How to load it\n\n```python\n{code}\n```{note}"


def _recipe(facts: CardFacts) -> str:
    return ("## Recipe\n\nThe full recipe, defaults included; `prefopt train` on it trains this model again "
            f"(with the same data and base model).\n\n```yaml\n{facts.recipe_yaml.rstrip()}\n```")


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|").replace("\n", " ") for cell in row) + " |"
              for row in rows]
    return "\n".join(lines)


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------------------------------------
# facts from a run


def gather_facts(recipe, loss_cls: type, summary: dict, run_dir: Path, *, adapter: bool, model_id: str,
                 plugins=None, reward_model: bool | None = None) -> CardFacts:
    """A card's facts from a validated ``recipe``, its loss plugin class, the run's ``summary`` and what the
    run directory holds (``metrics.jsonl``). ``plugins`` (default: the installed ones) give the algorithm's
    paper; the algorithm is the recipe's, or the one an algorithm's run names in its summary. ``reward_model``:
    the model is a sequence scorer; None: as the loss class declares (``scores_sequences``)."""
    from prefopt import __version__
    from prefopt.recipe import dump_recipe

    loss_options = recipe.loss.model_dump(mode="json", exclude={"name"})
    help_ = {k: (f.description or "").split(". ")[0].rstrip(".") for k, f in loss_cls.Config.model_fields.items()}
    algorithm = summary.get("algorithm") or (recipe.algorithm.name if recipe.algorithm is not None else None)
    return CardFacts(
        title=model_id.split("/")[-1] if is_hub_id(model_id) else Path(recipe.output.dir).resolve().name,
        recipe=recipe.model_dump(mode="json"), recipe_yaml=dump_recipe(recipe), loss_summary=loss_cls.summary(),
        loss_paper=loss_cls.paper, loss_options=loss_options, loss_option_help=help_, adapter=adapter,
        model_id=model_id, summary=summary, training=last_training_metrics(Path(run_dir) / "metrics.jsonl"),
        algorithm=algorithm, algorithm_paper=_algorithm_paper(algorithm, plugins), version=__version__,
        license=base_license(recipe.model.path, recipe.model.revision),
        reward_model=getattr(loss_cls, "scores_sequences", False) if reward_model is None else reward_model,
    )


def _algorithm_paper(name: str | None, plugins) -> str:
    if name is None:
        return ""
    if plugins is None:
        from prefopt.registry.loading import default_plugins

        plugins = default_plugins()
    return plugins.algorithms.get(name).paper if name in plugins.algorithms.names() else ""



def is_hub_id(path: str) -> bool:
    """Whether ``path`` (of a model or a dataset) names a hub repository: not an embedded model's alias, not a
    local path (``prefopt.data.load.looks_local``, or a file or folder that exists), and a valid repo id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from prefopt.data.load import looks_local
    from prefopt.models.embedded import EMBEDDED_MODELS

    if path in EMBEDDED_MODELS or looks_local(path) or os.path.exists(path):
        return False
    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def last_training_metrics(metrics_file: Path) -> dict[str, float]:
    """The last training step's line of ``metrics.jsonl`` (the last with a ``loss``: evaluations log
    ``eval/loss``), or {} when there is none."""
    try:
        lines = Path(metrics_file).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line torn by a crash
        if isinstance(record, dict) and "loss" in record and not record.get("before_step"):
            return record
    return {}


def base_license(model_path: str, revision: str | None = None) -> str | None:
    """The license the base model's own card states, read from a local folder or from the hub's local cache
    (never fetched); None when there is none to read."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.repocard import metadata_load

    local = Path(os.path.expanduser(model_path)) / CARD_NAME
    if local.is_file():
        card = local
    elif is_hub_id(model_path):
        cached = try_to_load_from_cache(model_path, CARD_NAME, revision=revision)
        card = Path(cached) if isinstance(cached, str) else None
    else:
        card = None
    try:
        license_ = (metadata_load(card) or {}).get("license") if card is not None else None
    except (OSError, ValueError):  # a card that is not readable or not YAML states nothing
        return None
    return license_ if isinstance(license_, str) else None
