"""ExPO model extrapolation: the weights it writes, ties, adapters, and what a user sees when it refuses."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from helpers import one_line_error
from prefopt.cli import main
from prefopt.errors import PrefoptError
from prefopt.models.extrapolate import extrapolate


def _load(path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _perturbed_copy(src: Path, dst: Path, tokenizer, seed: int) -> Path:
    """``src``'s model with every parameter moved a little: a stand-in for an aligned checkpoint."""
    model = _load(src)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return dst


def _random_model(dst: Path, tokenizer, seed: int, **config) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_config(len(tokenizer), **config)).save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return dst


def _assert_extrapolated(out: Path, sft: Path, aligned: Path, alpha: float) -> None:
    result, theta0, theta1 = (dict(_load(p).named_parameters()) for p in (out, sft, aligned))
    assert result.keys() == theta0.keys()
    for name, param in result.items():
        expected = theta0[name] + alpha * (theta1[name] - theta0[name])
        torch.testing.assert_close(param, expected, atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def sft(tiny_model_dir) -> Path:
    return tiny_model_dir


@pytest.fixture(scope="module")
def aligned(tmp_path_factory, tiny_model_dir, tokenizer) -> Path:
    return _perturbed_copy(tiny_model_dir, tmp_path_factory.mktemp("aligned"), tokenizer, seed=1)


def test_output_is_sft_plus_alpha_times_the_difference(sft, aligned, tmp_path):
    out = extrapolate(str(sft), str(aligned), tmp_path / "expo", alpha=1.3, show_progress=False)
    _assert_extrapolated(out, sft, aligned, 1.3)
    record = json.loads((out / "extrapolation.json").read_text())
    assert record["sft"] == str(sft) and record["aligned"] == str(aligned)
    assert record["alpha"] == 1.3 and record["paper_alpha"] == 0.3
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert (out / "tokenizer_config.json").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name != "expo"]  # no staging directory left behind


def test_alpha_one_reproduces_the_aligned_weights_exactly(sft, aligned, tmp_path):
    out = extrapolate(str(sft), str(aligned), tmp_path / "copy", alpha=1, show_progress=False)
    expected = load_file(aligned / "model.safetensors")
    written = load_file(out / "model.safetensors")
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)


def test_alpha_below_one_interpolates_and_says_so(sft, aligned, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="prefopt.models.extrapolate"):
        out = extrapolate(str(sft), str(aligned), tmp_path / "mid", alpha=0.5, show_progress=False)
    assert "interpolates" in caplog.text
    _assert_extrapolated(out, sft, aligned, 0.5)


def test_cli_paper_alpha_is_alpha_minus_one(sft, aligned, tmp_path, capsys):
    base = ["extrapolate", str(sft), str(aligned), "--no-progress", "--out"]
    assert main(base + [str(tmp_path / "paper"), "--paper-alpha", "0.3"]) == 0
    assert main(base + [str(tmp_path / "common"), "--alpha", "1.3"]) == 0
    assert "paper alpha 0.3" in capsys.readouterr().out
    paper, common = (load_file(tmp_path / d / "model.safetensors") for d in ("paper", "common"))
    assert paper.keys() == common.keys()
    assert all(torch.equal(paper[k], common[k]) for k in paper)
    _assert_extrapolated(tmp_path / "paper", sft, aligned, 1.3)


def test_bfloat16_weights_are_combined_in_float32_and_saved_in_bfloat16(sft, aligned, tmp_path):
    out = extrapolate(str(sft), str(aligned), tmp_path / "bf16", alpha=1.3, dtype="bfloat16", show_progress=False)
    written = load_file(out / "model.safetensors")
    theta0, theta1 = (load_file(p / "model.safetensors") for p in (sft, aligned))
    for name, tensor in written.items():
        assert tensor.dtype == torch.bfloat16
        a, b = theta0[name].bfloat16().float(), theta1[name].bfloat16().float()
        # Within bf16 rounding of the float32 result (one bf16 step is 2**-8 relative).
        torch.testing.assert_close(tensor.float(), b + 0.3 * (b - a), rtol=2**-8, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


def test_output_loads_and_generates(sft, aligned, tmp_path):
    from transformers import AutoTokenizer

    out = extrapolate(str(sft), str(aligned), tmp_path / "expo", alpha=1.5, show_progress=False)
    model, tokenizer = _load(out), AutoTokenizer.from_pretrained(out)
    inputs = tokenizer("The movie was", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == inputs.input_ids.shape[1] + 3


def test_tied_embeddings_stay_tied(sft, aligned, tmp_path):
    out = extrapolate(str(sft), str(aligned), tmp_path / "expo", alpha=1.4, show_progress=False)
    model = _load(out)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" not in load_file(out / "model.safetensors")


def test_untied_output_head_is_extrapolated_on_its_own(tmp_path, tokenizer):
    sft = _random_model(tmp_path / "sft", tokenizer, seed=0, tie_word_embeddings=False)
    aligned = _perturbed_copy(sft, tmp_path / "aligned", tokenizer, seed=2)
    out = extrapolate(str(sft), str(aligned), tmp_path / "expo", alpha=1.3, show_progress=False)
    _assert_extrapolated(out, sft, aligned, 1.3)
    model = _load(out)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_a_different_architecture_is_one_line_naming_the_parameter(sft, tmp_path, tokenizer, capsys):
    other = _random_model(tmp_path / "other", tokenizer, seed=0, intermediate_size=48)
    err = one_line_error(capsys, ["extrapolate", str(sft), str(other), "--out", str(tmp_path / "o"),
                                   "--alpha", "1.3", "--no-progress"])
    assert "'model.layers.0.mlp.gate_proj.weight' has shape (64, 32) in the SFT model and (48, 32)" in err
    assert not (tmp_path / "o").exists()


def test_a_tie_in_only_one_model_is_named(sft, tmp_path, tokenizer):
    untied = _random_model(tmp_path / "untied", tokenizer, seed=0, tie_word_embeddings=False)
    with pytest.raises(PrefoptError, match="'lm_head.weight' is in the aligned model but not in the SFT .*"
                                           "tie_word_embeddings is True in the SFT model and False"):
        extrapolate(str(sft), str(untied), tmp_path / "o", alpha=1.3, show_progress=False)


def test_a_lora_adapter_is_merged_before_extrapolating(sft, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    lora = get_peft_model(_load(sft), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # lora_B starts at zero; a trained adapter's is not
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)  # no tokenizer: the base's is used
    assert (adapter / "adapter_config.json").is_file()

    merged = tmp_path / "merged"
    PeftModel.from_pretrained(_load(sft), adapter).merge_and_unload().save_pretrained(merged)
    out = extrapolate(str(sft), str(adapter), tmp_path / "expo", alpha=1.3, show_progress=False)
    _assert_extrapolated(out, sft, merged, 1.3)
    assert not any("lora" in k for k in load_file(out / "model.safetensors"))
    assert (out / "tokenizer_config.json").is_file()
    assert json.loads((out / "extrapolation.json").read_text())["aligned_adapter_base"] == str(sft)


@pytest.mark.parametrize("flags", [[], ["--alpha", "1.3", "--paper-alpha", "0.3"]], ids=["neither", "both"])
def test_cli_needs_exactly_one_alpha_flag(flags, tmp_path, capsys):
    err = one_line_error(capsys, ["extrapolate", "sft", "aligned", "--out", str(tmp_path / "o")] + flags)
    assert "exactly one of --alpha A or --paper-alpha A" in err


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), "1.3", True])
def test_alpha_must_be_a_finite_number(alpha, tmp_path):
    with pytest.raises(PrefoptError, match="must be a finite number"):
        extrapolate("sft", "aligned", tmp_path / "o", alpha=alpha, show_progress=False)


def test_a_non_empty_output_is_kept_unless_overwrite(sft, aligned, tmp_path, capsys):
    out = tmp_path / "expo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["extrapolate", str(sft), str(aligned), "--out", str(out), "--alpha", "1.3", "--no-progress"]
    assert "exists and is not empty" in one_line_error(capsys, argv)
    assert (out / "keep.txt").read_text() == "mine"
    assert main(argv + ["--overwrite"]) == 0
    assert not (out / "keep.txt").exists()
    _assert_extrapolated(out, sft, aligned, 1.3)
    assert [p.name for p in tmp_path.iterdir()] == ["expo"]  # the old output is gone, nothing half-written


def test_an_input_directory_is_never_the_output(sft, aligned, capsys):
    err = one_line_error(capsys, ["extrapolate", str(sft), str(aligned), "--out", str(aligned),
                                   "--alpha", "1.3", "--overwrite", "--no-progress"])
    assert "holds the input model" in err
