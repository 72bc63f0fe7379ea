"""A task's built pairs written out as a plain preference folder: what ``prefopt data RECIPE --export DIR`` does.

The folder holds ``train.jsonl`` and ``test.jsonl``, one ``{"prompt", "chosen", "rejected"}`` line per pair, the
names ``datasets`` reads as the train and test splits. A recipe then trains on it with ``data.path: DIR`` and
``data.eval_split: test``, exactly as on a user's own files, and a bench judges it with ``eval.judge``: the
task's data with none of the task's machinery, to compare the two paths or to start a dataset of one's own.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefopt.paths import atomic_write_text

__all__ = ["export_pairs"]

FIELDS = ("prompt", "chosen", "rejected")
SPLITS = {"train": "train.jsonl", "test": "test.jsonl"}  # split -> file name in the folder


def export_pairs(train: Path, held_out: Path, folder: Path) -> dict[str, tuple[Path, int]]:
    """Write the pairs of ``train`` and ``held_out`` (JSON lines with at least FIELDS) into ``folder``; each
    file is written whole or not at all. Returns split -> (file, pairs written)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, source in (("train", train), ("test", held_out)):
        lines = [json.dumps({key: json.loads(line)[key] for key in FIELDS}, ensure_ascii=False)
                 for line in Path(source).read_text(encoding="utf-8").splitlines() if line.strip()]
        target = folder / SPLITS[split]
        atomic_write_text(target, "".join(line + "\n" for line in lines))
        written[split] = (target, len(lines))
    return written
