"""Resume with a random state: a LoRA run with dropout, stopped mid-run and resumed, draws the dropout masks an
uninterrupted run draws, so its losses match to 1e-6. Without the checkpoint's random-generator states (restored
in ``prefopt.engine.checkpoint.load_checkpoint``) the resumed steps draw other masks and this test fails."""

from __future__ import annotations

import pytest

from helpers import tiny_recipe, train_losses, validated
from prefopt import engine

# 6 steps over the 12 pairs, one forward each, a checkpoint every 3; no final model (this test does not read it)
TRAIN = {"epochs": 2, "max_steps": 6, "micro_batch_size": 4, "save_every": 3}


def lora_run(tiny_model_dir, pairs_file, out, dropout: float, **train) -> dict:
    tree = tiny_recipe(tiny_model_dir, pairs_file, out, train={**TRAIN, **train},
                       model={"path": str(tiny_model_dir), "lora": {"r": 4, "alpha": 8, "dropout": dropout}})
    tree["output"]["save_model"] = False
    engine.train(validated(tree), show_progress=False)
    return train_losses(out)


def test_a_lora_run_with_dropout_resumes_to_the_uninterrupted_losses(tiny_model_dir, pairs_file, tmp_path, capsys):
    whole = lora_run(tiny_model_dir, pairs_file, tmp_path / "whole", 0.1)
    without_dropout = lora_run(tiny_model_dir, pairs_file, tmp_path / "plain", 0.0)
    assert whole[6] != pytest.approx(without_dropout[6], rel=0, abs=1e-6), "dropout must change the losses"

    lora_run(tiny_model_dir, pairs_file, tmp_path / "parts", 0.1, max_steps=3)  # stopped after step 3
    capsys.readouterr()
    resumed = lora_run(tiny_model_dir, pairs_file, tmp_path / "parts", 0.1)
    assert "resuming from" in capsys.readouterr().out
    assert list(resumed) == [1, 2, 3, 4, 5, 6]
    for step, loss in whole.items():
        assert resumed[step] == pytest.approx(loss, rel=0, abs=1e-6), step
