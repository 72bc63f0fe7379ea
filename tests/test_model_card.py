"""The model card every saved model carries: hub metadata, what trained it, its metrics, how to load it.

Cards of real runs (full weights, a merged LoRA, an unmerged adapter) are read back with huggingface_hub's
own ``ModelCard``, and each card's loading snippet is run on the folder it describes.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from helpers import validated
from prefopt import __version__, engine
from prefopt.publish.card import CARD_NAME, base_license, gather_facts, is_hub_id, render_card, use_repo_id
from prefopt.registry.loading import default_plugins
from prefopt.testing import tiny_recipe


def trained_card(tmp_path, **sections):
    """Train the tiny model 3 steps with held-out pairs (measured before and after) and save it; its folder,
    its card as huggingface_hub reads it, and the card's text."""
    from huggingface_hub import ModelCard

    tree = tiny_recipe(tmp_path, steps=3, data={"eval_split": "train", "max_eval_pairs": 4},
                       eval={"at_start": True}, **sections)
    tree["output"] = {**tree["output"], "save_model": True, **sections.get("output", {})}
    engine.run(validated(tree), show_progress=False)
    model_dir = tmp_path / "run" / "model"
    return model_dir, ModelCard.load(model_dir / CARD_NAME), (model_dir / CARD_NAME).read_text()


def snippet(text: str) -> str:
    """The card's python block: how to load the model."""
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_a_full_model_card_says_what_trained_it_and_loads(tmp_path):
    model_dir, card, text = trained_card(tmp_path)
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.tags == ["prefopt", "dpo"]
    assert data.base_model is None and data.datasets is None  # local folders are no hub ids
    assert f"prefopt {__version__}" in text
    assert f"| Base model | `{tmp_path / 'tiny-model'}` |" in text
    assert f"| Data | `{tmp_path / 'pairs.jsonl'}`, split `train`, 12 training pairs; held out: split `train` (4 " \
           "pairs) |" in text
    assert "arXiv:2305.18290" in text and "| `beta` | `0.1` | Strength of the KL tie to the reference" in text
    assert "| Algorithm | none: one pass of training over the data |" in text
    assert "| Reference | cache, from `initial policy` |" in text
    assert "| Weights | every weight trained |" in text
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("eval/loss", "eval/rewards/accuracies"):
        start, end = summary["eval_start"][key], summary["eval_end"][key]
        assert f"| `{key.removeprefix('eval/')}` | {start:.4g} | {end:.4g} |" in text
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line][-1]
    assert "The last training step (3)" in text and f"| `loss` | {last['loss']:.4g} |" in text
    recipe_block = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    assert yaml.safe_load(recipe_block) == yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    namespace: dict = {}
    exec(snippet(text), namespace)  # the card's own instructions load this folder
    assert namespace["model_id"] == str(model_dir.resolve())
    assert type(namespace["model"]).__name__ == "LlamaForCausalLM"


def test_an_adapter_card_replaces_peft_template_and_loads_with_peft(tmp_path):
    model_dir, card, text = trained_card(tmp_path, model={"lora": {"r": 4, "alpha": 8}},
                                         output={"merge_lora": False})
    assert (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").exists()
    assert "[More Information Needed]" not in text  # PEFT's empty template is gone
    assert card.data.library_name == "peft" and card.data.tags == ["prefopt", "dpo", "lora"]
    assert "| Weights | LoRA r=4, alpha=8, on all-linear: this folder holds the adapter alone |" in text
    assert "AutoPeftModelForCausalLM" in snippet(text) and "base_model_name_or_path" in text
    namespace: dict = {}
    exec(snippet(text), namespace)
    assert type(namespace["model"]).__name__ == "PeftModelForCausalLM"


def test_a_merged_lora_card_is_a_transformers_card(tmp_path):
    model_dir, card, text = trained_card(tmp_path, model={"lora": {"r": 4, "alpha": 8}})
    assert (model_dir / "config.json").is_file() and not (model_dir / "adapter_config.json").exists()
    assert card.data.library_name == "transformers"
    assert "| Weights | LoRA r=4, alpha=8, on all-linear, merged into the weights |" in text
    assert "AutoModelForCausalLM.from_pretrained(model_id)" in snippet(text)


def test_hub_ids_become_metadata_and_an_algorithm_its_tag_and_paper(tmp_path):
    tree = tiny_recipe(tmp_path, steps=1)
    tree["model"] = {"path": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    tree["data"] = {"path": "trl-lib/ultrafeedback_binarized", "eval_split": "test"}
    recipe = validated(tree)
    plugins = default_plugins()
    facts = gather_facts(recipe, plugins.losses.get("dpo"), {"algorithm": "online_dpo", "steps": 1}, tmp_path,
                         adapter=False, model_id="me/tiny-dpo", plugins=plugins)
    text = render_card(facts)
    metadata = yaml.safe_load(text.split("---\n")[1])
    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert metadata["datasets"] == ["trl-lib/ultrafeedback_binarized"]
    assert metadata["tags"] == ["prefopt", "dpo", "online_dpo"]
    assert text.splitlines()[metadata_lines(text)] == "# tiny-dpo"
    assert "| Algorithm | `online_dpo` (Guo et al. 2024" in text
    assert 'model_id = "me/tiny-dpo"' in text


def metadata_lines(text: str) -> int:
    """The index of the line after the metadata block and the blank line that follows it."""
    return text.splitlines().index("---", 1) + 2


@pytest.mark.parametrize("path, hub", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", True), ("gpt2", True), ("smollm2-135m-instruct", False),
    ("./model", False), ("/abs/model", False), ("data/train.jsonl", False), ("a/b/c", False), ("data/*.json", False),
])
def test_only_hub_ids_are_named_as_hub_ids(path, hub):
    assert is_hub_id(path) is hub


def test_the_license_comes_from_the_base_model_card_when_there_is_one(tmp_path):
    (tmp_path / CARD_NAME).write_text("---\nlicense: apache-2.0\n---\n# base\n")
    assert base_license(str(tmp_path)) == "apache-2.0"
    (tmp_path / CARD_NAME).write_text("# no metadata\n")
    assert base_license(str(tmp_path)) is None
    assert base_license(str(tmp_path / "missing")) is None


def test_use_repo_id_points_the_snippet_at_the_repository(tmp_path):
    card = tmp_path / CARD_NAME
    card.write_text('text\n```python\nmodel_id = "/runs/x/model"\nmodel = f(model_id)\n```\n')
    assert use_repo_id(card, "me/x")
    assert card.read_text() == 'text\n```python\nmodel_id = "me/x"\nmodel = f(model_id)\n```\n'
    card.write_text("a card written by hand\n")
    assert not use_repo_id(card, "me/x") and card.read_text() == "a card written by hand\n"


def test_peft_methods_adapter_starts_and_quantization_are_described():
    from prefopt.publish.card import _adapter_tags, _weights

    dora = {"path": "m", "peft": {"type": "LORA", "r": 8, "use_dora": True}, "quantization": {"bits": 4}}
    assert _adapter_tags(dora) == ["lora", "dora", "4-bit"]
    assert _weights({"model": dora}, adapter=True) == (
        "PEFT LORA (r=8, use_dora=True), over 4-bit base weights (bitsandbytes): this folder holds the adapter alone")
    assert _adapter_tags({"path": "m", "peft": {"type": "IA3"}}) == ["ia3"]
    start = {"path": "m", "adapter": "runs/sft/model"}
    assert _weights({"model": start}, adapter=False) == (
        "the adapter `runs/sft/model`, trained further, merged into the weights")
    assert _weights({"model": {"path": "m"}}, adapter=False) == "every weight trained"
