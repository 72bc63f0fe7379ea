"""benchmarks/gpu_dpo.py: its --quick path end to end on the CPU (in this process), the arithmetic of its GPU
matmul limit with a fake timer, its budget and its source digest. No timing is asserted."""

import json
import math

import pytest
from helpers import load_benchmark

gpu_dpo = load_benchmark("gpu_dpo")

# The tiny decoder of tests/test_flops.py: per layer q/o 8x8, k/v 4x8, gate/up 16x8, down 8x16; head 32x8.
TINY = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 4, "vocab_size": 32, "tie_word_embeddings": True}


def test_the_limit_weights_each_shape_as_a_step_does():
    limit = gpu_dpo.gpu_matmul_limit(TINY, 10, 5, __import__("torch").float32, 1.0, device="cpu",
                                     timer=lambda run, budget: 1e-3)
    # 3 matmuls x 2 x rows x out x in per shape: q/o 6*10*64 = 3840, k/v 6*10*32 = 1920, gate/up 6*10*128 = 7680,
    # down 6*10*128 = 7680, head 6*5*256 = 7680 (5 head rows). Weighted by per-step counts 4, 4, 4, 2, 1 (two
    # layers, two matrices per grouped shape): 15360 + 7680 + 30720 + 15360 + 7680 = 76800 FLOPs; every shape
    # takes 3 x 1 ms, so 15 x 3 ms = 0.045 s in all.
    assert [s["flops"] for s in limit["shapes"]] == [3840, 1920, 7680, 7680, 7680]
    assert limit["flops_per_s"] == pytest.approx(76800 / 0.045, rel=1e-12)
    assert limit["dtype"] == "float32"


def test_the_tf32_limit_is_named_so_and_the_setting_is_restored():
    import torch

    before = torch.backends.cuda.matmul.allow_tf32
    limit = gpu_dpo.gpu_matmul_limit(TINY, 4, 4, torch.float32, 1.0, tf32=True, device="cpu",
                                     timer=lambda run, budget: 1e-3)
    assert limit["dtype"] == "tf32"
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_a_configuration_gets_what_is_left_at_most_its_cap_or_is_skipped():
    margin = gpu_dpo.WRITE_MARGIN_S
    assert gpu_dpo.time_for_next(100 + margin, cap=200, least=60) == 100
    assert gpu_dpo.time_for_next(500, cap=200, least=60) == 200
    assert gpu_dpo.time_for_next(59 + margin, cap=200, least=60) is None


def test_without_trl_its_configuration_is_left_out_with_a_line():
    configs, left_out = gpu_dpo.configurations("cpu", None)
    assert [c["name"] for c in configs][:3] == ["prefopt-padded", "prefopt-prefix-shared", "prefopt-packed"]
    assert "trl" not in [c["name"] for c in configs]
    assert any(line.startswith("trl: skipped") for line in left_out)
    # bf16 autocast only on the GPU
    assert not any("mixed_precision" in o for c in configs for o in c["overrides"])
    gpu_configs, _ = gpu_dpo.configurations("cuda", "1.0")
    assert all("train.mixed_precision=bf16" in c["overrides"] for c in gpu_configs if c["tool"] == "prefopt")


def test_the_source_digest_follows_the_code(tmp_path):
    for name, text in (("pyproject.toml", "[project]\n"), ("prefopt/a.py", "A = 1\n"), ("plugins/b.py", ""),
                       ("benchmarks/c.py", "")):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    first = gpu_dpo.source_digest(tmp_path)
    (tmp_path / "prefopt" / "__pycache__").mkdir()
    (tmp_path / "prefopt" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    assert gpu_dpo.source_digest(tmp_path) == first  # compiled files are not code
    (tmp_path / "prefopt" / "a.py").write_text("A = 2\n")
    assert gpu_dpo.source_digest(tmp_path) != first


def test_the_quick_path_trains_every_layout_and_trl_on_the_same_pairs(tmp_path, tokenizer_dir):
    out = tmp_path / "gpu_dpo.json"
    gpu_dpo.main(["--quick", "--in-process", "--tokenizer", str(tokenizer_dir), "--json", str(out)])
    record = json.loads(out.read_text())
    assert record["complete"] and record["mfu_against"] == "float32"
    runs = record["runs"]
    names = ["prefopt-padded", "prefopt-prefix-shared", "prefopt-packed"]
    assert set(names) <= set(runs)
    for name in names:  # the layout asked for ran (prefopt falls back to padded where a model cannot)
        assert runs[name]["raw"]["layout"] == name.removeprefix("prefopt-").replace("-", "_")
    # At the first step the policy is the reference, so the DPO loss is -log sigmoid(0) = ln 2; the float32
    # log-probs of a ~100-token sequence differ between layouts by ~1e-6, times beta 0.1.
    for name, run in runs.items():
        assert run["summary"]["first_loss"] == pytest.approx(math.log(2), abs=1e-4), name
        assert run["summary"]["mfu"] > 0 and run["summary"]["tokens_per_s"] > 0
    # Both tools read the same pairs at every step and count their tokens alike.
    tokens = {run["summary"]["timed_tokens"] for run in runs.values()}
    assert len(tokens) == 1
    last = [run["summary"]["last_loss"] for run in runs.values()]
    assert max(last) - min(last) < 1e-4
