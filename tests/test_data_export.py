"""``prefopt data RECIPE --export DIR``: a task's pairs as a plain preference folder, read back as splits."""

import json

from prefopt.data.export import export_pairs
from prefopt.data.load import load_rows


def write_lines(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_exported_pairs_read_back_as_the_train_and_test_splits(tmp_path):
    train = write_lines(tmp_path / "built-train.jsonl", [
        {"prompt": "A film", "chosen": " is a delight.", "rejected": " is dull.", "chosen_reward": 0.6},
        {"prompt": "The plot", "chosen": " sings.", "rejected": " sags.", "chosen_reward": 0.2},
    ])
    held_out = write_lines(tmp_path / "built-eval.jsonl", [
        {"prompt": "Its score", "chosen": " soars, naïvely.", "rejected": " drones.", "rejected_reward": -0.3},
    ])
    written = export_pairs(train, held_out, tmp_path / "pairs")
    assert {split: count for split, (_, count) in written.items()} == {"train": 2, "test": 1}
    # Only the three preference fields travel: the task's own bookkeeping (its rewards) stays behind.
    assert load_rows(str(tmp_path / "pairs"), "train").to_list() == [
        {"prompt": "A film", "chosen": " is a delight.", "rejected": " is dull."},
        {"prompt": "The plot", "chosen": " sings.", "rejected": " sags."},
    ]
    assert load_rows(str(tmp_path / "pairs"), "test").to_list() == [
        {"prompt": "Its score", "chosen": " soars, naïvely.", "rejected": " drones."}]
    assert not list((tmp_path / "pairs").glob(".*"))  # no staging file left behind
